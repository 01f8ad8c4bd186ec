# cython: language_level=3
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy
from posix.uio cimport iovec

from virtio_queue.includes.endian cimport le16toh, le32toh, le64toh
from virtio_queue.includes.virtio_ring cimport (VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
                                                vring_desc)
from virtio_queue.memory cimport MemorySnapshot, snap_ptr
from virtio_queue.source cimport ByteSource

# Status codes of nogil code (STYLE.md §2); raise_for_status() turns them into errors.
cdef enum:
    VQ_OK = 0
    VQ_E_DESC_INDEX = -1        # next (or head) index outside the table
    VQ_E_TTL = -2               # more descriptors than the table has: a cycle
    VQ_E_INDIRECT_NEXT = -3     # INDIRECT and NEXT on one descriptor
    VQ_E_NESTED_INDIRECT = -4   # an indirect table inside an indirect table
    VQ_E_INDIRECT_LEN = -5      # indirect table length 0 or not a multiple of 16
    VQ_E_TABLE_MEM = -6         # the indirect table is not in guest memory
    VQ_E_CHAIN_LEN = -7         # total length above 2^32
    VQ_E_BUF_MEM = -8           # a buffer is not in (writable) guest memory

cdef struct ChainCursor:
    # The current table (main or indirect) is either one host range (`table`, the
    # fast case) or, when it runs over adjacent regions, read descriptor by
    # descriptor through the snapshot: then `table` is NULL, `table_len` 0 (so that
    # chain_next's index check sends every step to chain_next_split) and
    # `split_len` its real number of entries.
    const unsigned char *table  # host address of the current table, or NULL (split)
    uint32_t table_len          # entries readable through `table` (0 when split)
    uint32_t next_index         # index of the next descriptor to read
    uint32_t ttl                # descriptors that may still be read from this table
    uint64_t total_len          # sum of buffer lengths so far
    uint64_t bad_value          # the offending value, for the error message
    bint has_next
    bint in_indirect
    uint64_t table_gpa          # guest address of a split table
    uint32_t split_len          # entries of a split table
    int mem_rc                  # for VQ_E_TABLE_MEM/VQ_E_BUF_MEM: the GM_* status
    uint64_t bad_addr           # ... and the address it names


cdef inline void chain_init(ChainCursor *c, const unsigned char *table, uint16_t queue_size,
                            uint16_t head) noexcept nogil:
    c.table = table
    c.table_len = queue_size
    c.next_index = head
    c.ttl = queue_size
    c.total_len = 0
    c.bad_value = 0
    c.has_next = True
    c.in_indirect = False


cdef inline void chain_init_split(ChainCursor *c, uint64_t table_gpa, uint16_t queue_size,
                                  uint16_t head) noexcept nogil:
    """chain_init for a main table that runs over adjacent regions (read through
    the snapshot, see ChainCursor)."""
    chain_init(c, NULL, 0, head)
    c.table_gpa = table_gpa
    c.split_len = queue_size
    c.ttl = queue_size


cdef inline void chain_start(ChainCursor *c, const unsigned char *table, uint64_t table_gpa,
                             uint16_t queue_size, uint16_t head) noexcept nogil:
    """chain_init, or chain_init_split when the queue's table has no host pointer."""
    if table != NULL:
        chain_init(c, table, queue_size, head)
    else:
        chain_init_split(c, table_gpa, queue_size, head)


cdef int chain_enter_indirect(MemorySnapshot snap, ChainCursor *c, vring_desc *d) noexcept nogil
cdef int chain_next_split(MemorySnapshot snap, ChainCursor *c, vring_desc *out) noexcept nogil


cdef inline void desc_load(const unsigned char *p, vring_desc *out) noexcept nogil:
    """Read the descriptor at ``p`` into *out, field by field: a table need not be
    aligned, the guest may change the descriptor under us (we act on this copy
    only), and same-size loads of what was just stored forward cheaply."""
    memcpy(&out.addr, p, 8)
    memcpy(&out.len, p + 8, 4)
    memcpy(&out.flags, p + 12, 2)
    memcpy(&out.next, p + 14, 2)
    out.flags = le16toh(out.flags)
    out.len = le32toh(out.len)
    out.addr = le64toh(out.addr)
    out.next = le16toh(out.next)


cdef inline int chain_next(MemorySnapshot snap, ChainCursor *c, vring_desc *out) noexcept nogil:
    """Read the next descriptor of the chain into *out: 1 if one was read, 0 at the
    end, a VQ_E_* code (< 0) if the chain is malformed.

    Every step is bounded (VIRTIO 1.2 §2.7.5.2, §2.7.5.3): an index outside its
    table, a walk longer than the table (a cycle), nested indirect tables, INDIRECT
    with NEXT, and a total length above 2^32 all stop the walk.  The common path
    is small enough to inline into every walker; entering an indirect table is
    out of line (chain_enter_indirect), and so is a step through a table that runs
    over adjacent regions (chain_next_split)."""
    cdef int rc
    while True:
        if not c.has_next:
            return 0
        if c.next_index >= c.table_len:
            # An index out of range, or a table over adjacent regions (out of line).
            return chain_next_split(snap, c, out)
        if c.ttl == 0:
            c.bad_value = c.table_len
            return VQ_E_TTL
        c.ttl -= 1
        desc_load(c.table + 16 * <size_t>c.next_index, out)
        if out.flags & VRING_DESC_F_INDIRECT:
            rc = chain_enter_indirect(snap, c, out)
            if rc < 0:
                return rc
            continue
        c.total_len += out.len
        if c.total_len > (<uint64_t>1 << 32):
            c.bad_value = c.total_len
            return VQ_E_CHAIN_LEN
        c.has_next = (out.flags & VRING_DESC_F_NEXT) != 0
        c.next_index = out.next
        return 1


cdef int raise_for_status(int rc, ChainCursor *c, uint16_t head) except -1


cdef class Descriptor:
    cdef readonly uint64_t addr
    cdef readonly uint32_t len
    cdef readonly uint16_t flags
    cdef readonly uint16_t next


cdef class DescriptorChain:
    cdef MemorySnapshot snap
    cdef object _memory
    cdef const unsigned char *table     # NULL: the table runs over regions (table_gpa)
    cdef uint64_t table_gpa
    cdef uint16_t queue_size
    cdef readonly uint16_t head_index
    cdef ChainCursor cur


cdef int chain_check_order(DescriptorChain ch) except -1


cdef DescriptorChain make_chain(MemorySnapshot snap, object memory, const unsigned char *table,
                                uint64_t table_gpa, uint16_t queue_size, uint16_t head)


cdef class _Stream:
    cdef MemorySnapshot snap
    cdef iovec *segs
    cdef Py_ssize_t nsegs
    cdef Py_ssize_t cap
    cdef Py_ssize_t idx          # current segment
    cdef size_t off              # offset inside it
    cdef size_t avail            # bytes left (bounds every operation)
    cdef size_t done             # bytes moved so far
    cdef iovec inline_segs[16]

    cdef int _grow(self) except -1
    cdef int _collect(self, DescriptorChain ch, bint want_write) except -1
    cdef void _advance(self, size_t n) noexcept nogil
    cdef int _iov(self, iovec *out, int maxn, size_t n, size_t *got) noexcept nogil
    cdef size_t copy_out(self, unsigned char *dst, size_t n) noexcept nogil
    cdef size_t copy_in(self, const unsigned char *src, size_t n) noexcept nogil
    cdef object _split(self, _Stream other, Py_ssize_t offset)
    cdef size_t _copy_py(self, object buffer, bint into_guest, bint exact) except? 0
    cdef size_t _fd_io(self, int fd, Py_ssize_t n, long long offset, bint reading,
                       ByteSource source=*, int flags=*, size_t nogil_min=*) except? 0
    cdef size_t _fd_loop(self, int fd, size_t want, long long offset, bint reading,
                         ByteSource source, int flags, int *err) noexcept nogil


cdef inline int stream_append(_Stream s, unsigned char *p, size_t n) except -1:
    """Add a segment (the common case stays inline; growing is out of line).

    A buffer that continues the previous one in this process's address space
    extends it instead: a driver often lays a chain's buffers out back to back,
    and one long copy or iovec is cheaper than many short ones (every segment
    lies in the stream's one snapshot, which keeps all its regions mapped)."""
    cdef iovec *last
    if s.nsegs:
        last = &s.segs[s.nsegs - 1]
        if <unsigned char *>last.iov_base + last.iov_len == p:
            last.iov_len += n
            s.avail += n
            return 0
    if s.nsegs == s.cap:
        s._grow()
    s.segs[s.nsegs].iov_base = p
    s.segs[s.nsegs].iov_len = n
    s.nsegs += 1
    s.avail += n
    return 0


cdef class Reader(_Stream):
    pass


cdef class Writer(_Stream):
    pass


cdef Reader make_reader(DescriptorChain ch)
cdef Writer make_writer(DescriptorChain ch)
