# cython: language_level=3
cdef extern from "virtio_queue/includes/vq_copy.h" nogil:
    void vq_copy(void *dst, const void *src, size_t n) noexcept
    int vq_have_avx2() noexcept
    int vq_copy_force_libc
    enum:
        VQ_COPY_VECTOR_MIN
