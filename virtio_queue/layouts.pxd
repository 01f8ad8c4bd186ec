"""Byte layouts that vhost-user shares with the layers below it, declared once.

vhost-user payloads and shared areas are in no system header, so they are declared
here as packed structs (STYLE.md §2); their ``sizeof`` is asserted against the spec in
tests/virtio_queue/test_layouts.py.  They live in virtio_queue, the layer that
vhost_backends (the wire format), xen (the region description of F_XEN_MMAP) and
queue.pyx (which keeps the inflight area current) all sit on, so that none of them
imports a layer above it.  Multi-byte fields are little-endian.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


# QEMU docs/interop/vhost-user.rst, "Memory region description".
cdef packed struct MemoryRegionDesc:
    uint64_t guest_addr
    uint64_t size
    uint64_t user_addr
    uint64_t mmap_offset

# The same with VHOST_USER_PROTOCOL_F_XEN_MMAP: two more u32 (STYLE.md §3 asks for a
# second struct, not a conditional field).
cdef packed struct XenMemoryRegionDesc:
    uint64_t guest_addr
    uint64_t size
    uint64_t user_addr
    uint64_t mmap_offset
    uint32_t xen_mmap_flags
    uint32_t domid

# "Inflight I/O tracking", split rings: one DescStateSplit per descriptor ...
cdef packed struct DescStateSplit:
    uint8_t inflight
    uint8_t padding[5]
    uint16_t next
    uint64_t counter

# ... after the QueueRegionSplit head of each queue's area (the spec's flexible
# ``desc[]`` member is reached with inflight_desc()).
cdef packed struct QueueRegionSplit:
    uint64_t features
    uint16_t version
    uint16_t desc_num
    uint16_t last_batch_head
    uint16_t used_idx


cdef inline DescStateSplit *inflight_desc(QueueRegionSplit *region, uint16_t head) noexcept nogil:
    """The DescStateSplit of ``head`` (no range check: callers compare with desc_num)."""
    return (<DescStateSplit *>(region + 1)) + head
