# cython: language_level=3
# Ring-index ordering (VIRTIO 1.2 §2.7.13, §2.7.14): the device reads avail->idx with
# acquire semantics before reading the ring entries it covers, and publishes used->idx
# with release semantics after writing the used elements.  EVENT_IDX additionally needs
# a full fence between publishing used->idx and reading used_event (the store-load
# ordering that Linux's virtio_ring uses virtio_mb() for).
from libc.stdint cimport uint16_t

cdef extern from *:
    """
    static inline uint16_t vq_load_acquire16(const void *p) {
        return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE);
    }
    static inline void vq_store_release16(void *p, uint16_t v) {
        __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE);
    }
    static inline void vq_fence_seqcst(void) {
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
    }
    """
    uint16_t vq_load_acquire16(const void *p) noexcept nogil
    void vq_store_release16(void *p, uint16_t v) noexcept nogil
    void vq_fence_seqcst() noexcept nogil
