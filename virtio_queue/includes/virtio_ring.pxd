# cython: language_level=3
# Split-ring layout and flags from the kernel's uapi header, the same source that
# rust-vmm's virtio-bindings are generated from (VIRTIO 1.2 §2.7).
from libc.stdint cimport uint16_t, uint32_t, uint64_t

cdef extern from "<linux/virtio_ring.h>":
    enum:
        VRING_DESC_F_NEXT
        VRING_DESC_F_WRITE
        VRING_DESC_F_INDIRECT
        VRING_USED_F_NO_NOTIFY
        VRING_AVAIL_F_NO_INTERRUPT

    struct vring_desc:
        uint64_t addr
        uint32_t len
        uint16_t flags
        uint16_t next

    struct vring_used_elem:
        uint32_t id
        uint32_t len
