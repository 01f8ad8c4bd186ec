# cython: language_level=3, embedsignature=True
"""Descriptor chains and the Reader/Writer that copy through them.

The equivalent of rust-vmm virtio-queue's ``DescriptorChain``, ``Descriptor``,
``Reader`` and ``Writer``.  A chain is walked with a C cursor (``ChainCursor`` in
chain.pxd); no Python object is made per descriptor on the I/O path.  A Reader sees
the device-readable buffers of a chain, a Writer the device-writable ones (a buffer
that runs over adjacent guest memory regions is one segment per region), each as
one byte stream that can be split, copied to/from Python buffers, or moved straight
to/from a file descriptor with ``readv``/``writev`` (GIL released).
"""

import os

cimport cython
from cpython.buffer cimport (PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release,
                             PyObject_GetBuffer)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from posix.uio cimport iovec

from virtio_queue.includes.virtio_ring cimport (VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
                                                VRING_DESC_F_WRITE, vring_desc)
from virtio_queue.includes.vq_copy cimport vq_copy
from virtio_queue.memory cimport (GM_OK, MemEntry, MemorySnapshot, gm_text, make_view,
                                  snap_check, snap_copy, snap_entry, snap_ptr, snap_ptr_w,
                                  struct_for)
from virtio_queue.includes.vq_io cimport preadv2, pwritev2
from virtio_queue.source cimport fd_iov

from virtio_queue.errors import (DescriptorChainOverflow, GuestMemoryError, InvalidChain,
                                 InvalidDescriptorIndex, InvalidIndirectDescriptor)

cdef extern from *:
    """
    static void vq_set_force_libc(int v) { vq_copy_force_libc = v; }
    """
    void _set_force_libc "vq_set_force_libc"(int v) noexcept nogil

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

cdef enum:
    # iovecs per readv/writev call (IOV_MAX is 1024 on Linux; a chain rarely has more
    # than a few dozen buffers, and a longer one just takes several calls).
    IOV_BATCH = 64
    # Copies of at least this size release the GIL: shorter ones finish well before
    # another thread could use the interpreter, and releasing costs more than it gives.
    NOGIL_COPY_MIN = 262144


def set_copy_mode(str mode):
    """Select the copy routine: "auto" (vector loop for large copies) or "libc"
    (plain memcpy).  For benchmarks that show the difference; not thread-safe."""
    if mode == "auto":
        _set_force_libc(0)
    elif mode == "libc":
        _set_force_libc(1)
    else:
        raise ValueError(f"copy mode must be 'auto' or 'libc', not {mode!r}")


cdef int chain_enter_indirect(MemorySnapshot snap, ChainCursor *c, vring_desc *d) noexcept nogil:
    """Switch the cursor to the indirect table that *d refers to (VIRTIO 1.2
    §2.7.5.3): 0, or a VQ_E_* code if the table is not allowed or not mapped.  The
    table may run over adjacent regions (then it is read through the snapshot)."""
    cdef const unsigned char *p
    cdef uint32_t n
    cdef int rc
    # §2.7.5.3.1: the driver MUST NOT set INDIRECT in a descriptor of an indirect
    # table, nor INDIRECT together with NEXT.
    if c.in_indirect:
        return VQ_E_NESTED_INDIRECT
    if d.flags & VRING_DESC_F_NEXT:
        return VQ_E_INDIRECT_NEXT
    # A table of more than 2^16 entries cannot be addressed by u16 `next`.
    if d.len == 0 or d.len % 16 != 0 or d.len // 16 > 65536:
        c.bad_value = d.len
        return VQ_E_INDIRECT_LEN
    n = d.len // 16
    p = snap_ptr(snap, d.addr, d.len)
    if p != NULL:
        c.table_len = n
    else:
        # Not in one region: a table that runs on into the next region is read
        # descriptor by descriptor (chain_next_split); one with a hole is refused.
        rc = snap_check(snap, d.addr, d.len, False, 1, &c.bad_addr)
        if rc != GM_OK:
            c.mem_rc = rc
            c.bad_value = d.addr
            c.total_len = d.len
            return VQ_E_TABLE_MEM
        c.table_len = 0
        c.table_gpa = d.addr
        c.split_len = n
    c.table = p
    c.ttl = n
    c.next_index = 0
    c.in_indirect = True
    return 0


cdef int chain_next_split(MemorySnapshot snap, ChainCursor *c, vring_desc *out) noexcept nogil:
    """chain_next's slow step, taken when the index is not below ``table_len``: the
    VQ_E_* code of an index outside its table or of a walk longer than it (VIRTIO
    1.2 §2.7.5.2), or the step through a table that runs over adjacent regions,
    whose descriptor is copied piece by piece; then the same rules as chain_next."""
    cdef unsigned char raw[16]
    cdef int rc
    if c.table != NULL or c.next_index >= c.split_len:
        c.bad_value = c.next_index
        return VQ_E_DESC_INDEX
    if c.ttl == 0:
        c.bad_value = c.split_len
        return VQ_E_TTL
    c.ttl -= 1
    # The table was checked when the walk entered it and the snapshot cannot
    # change, so this copy fails only if that check was skipped (a bug).
    rc = snap_copy(snap, c.table_gpa + 16 * <uint64_t>c.next_index, raw, 16, False, &c.bad_addr)
    if rc != GM_OK:
        c.mem_rc = rc
        c.bad_value = c.table_gpa
        c.total_len = 16 * <uint64_t>c.split_len
        return VQ_E_TABLE_MEM
    desc_load(raw, out)
    if out.flags & VRING_DESC_F_INDIRECT:
        rc = chain_enter_indirect(snap, c, out)
        if rc < 0:
            return rc
        return chain_next(snap, c, out)     # the indirect table's first descriptor
    c.total_len += out.len
    if c.total_len > (<uint64_t>1 << 32):
        c.bad_value = c.total_len
        return VQ_E_CHAIN_LEN
    c.has_next = (out.flags & VRING_DESC_F_NEXT) != 0
    c.next_index = out.next
    return 1


cdef int raise_for_status(int rc, ChainCursor *c, uint16_t head) except -1:
    """Turn a VQ_E_* code from nogil code into the matching VirtioError."""
    where = f"chain {head}"
    if rc == VQ_E_DESC_INDEX:
        raise InvalidDescriptorIndex(
            f"{where}: descriptor index {c.bad_value} out of range "
            f"(table size {c.table_len if c.table != NULL else c.split_len})")
    if rc == VQ_E_TTL:
        raise InvalidChain(
            f"{where}: longer than its table of {c.bad_value} descriptors (a cycle)")
    if rc == VQ_E_INDIRECT_NEXT:
        raise InvalidIndirectDescriptor(
            f"{where}: INDIRECT together with NEXT (VIRTIO 1.2 §2.7.5.3.1)")
    if rc == VQ_E_NESTED_INDIRECT:
        raise InvalidIndirectDescriptor(
            f"{where}: INDIRECT inside an indirect table (VIRTIO 1.2 §2.7.5.3.1)")
    if rc == VQ_E_INDIRECT_LEN:
        raise InvalidIndirectDescriptor(
            f"{where}: indirect table length {c.bad_value} is zero, not a multiple of 16 "
            "or too large")
    if rc == VQ_E_TABLE_MEM:
        raise GuestMemoryError(f"{where}: indirect table [{c.bad_value:#x}, +{c.total_len:#x}) "
                               f"{gm_text(c.mem_rc, c.bad_addr)}")
    if rc == VQ_E_CHAIN_LEN:
        raise DescriptorChainOverflow(
            f"{where}: total length {c.bad_value} exceeds 2^32 (VIRTIO 1.2 §2.7.5.2)")
    if rc == VQ_E_BUF_MEM:
        raise GuestMemoryError(f"{where}: buffer [{c.bad_value:#x}, +{c.total_len:#x}) "
                               f"{gm_text(c.mem_rc, c.bad_addr)}")
    raise InvalidChain(f"{where}: error {rc}")


@cython.freelist(64)
cdef class Descriptor:
    """One descriptor as the device read it: a copy, the guest may change its table."""

    def __init__(self, uint64_t addr, uint32_t len, uint16_t flags=0, uint16_t next=0):
        self.addr = addr
        self.len = len
        self.flags = flags
        self.next = next

    def is_write_only(self):
        """Device-writable buffer (VIRTQ_DESC_F_WRITE)."""
        return (self.flags & VRING_DESC_F_WRITE) != 0

    def has_next(self):
        return (self.flags & 1) != 0

    def refers_to_indirect_table(self):
        return (self.flags & 4) != 0

    def __eq__(self, other):
        if not isinstance(other, Descriptor):
            return NotImplemented
        cdef Descriptor o = <Descriptor>other
        return (self.addr == o.addr and self.len == o.len and self.flags == o.flags
                and self.next == o.next)

    def __hash__(self):
        return hash((self.addr, self.len, self.flags, self.next))

    def __repr__(self):
        return (f"Descriptor(addr={self.addr:#x}, len={self.len}, flags={self.flags:#x}, "
                f"next={self.next})")


# Not tracked by the cyclic GC (no_gc): a chain refers only to its memory snapshot
# and GuestMemory, which never refer back, so it cannot be part of a cycle; a Writer
# or Reader the same, and tracking them costs time on every chain (docs/performance.md).
@cython.freelist(64)
@cython.no_gc
cdef class DescriptorChain:
    """A chain popped from a :class:`~virtio_queue.Queue`.

    Iterating it yields its :class:`Descriptor` s (an indirect table is walked in
    place of the descriptor that refers to it), bounded by the rules of VIRTIO 1.2
    §2.7.5.  :meth:`reader` and :meth:`writer` walk the whole chain again from the
    head, so they work whether or not the chain was iterated.

    Raises (while walking): InvalidDescriptorIndex, InvalidChain,
    InvalidIndirectDescriptor, DescriptorChainOverflow, GuestMemoryError.
    """

    def __init__(self):
        raise TypeError("DescriptorChain objects come from Queue.pop_chain()")

    @property
    def memory(self):
        return self._memory

    def __iter__(self):
        return self

    def __next__(self):
        cdef vring_desc d
        cdef int rc = chain_next(self.snap, &self.cur, &d)
        if rc == 0:
            raise StopIteration
        if rc < 0:
            self.cur.has_next = False   # a broken chain stays broken
            raise_for_status(rc, &self.cur, self.head_index)
        cdef Descriptor out = Descriptor.__new__(Descriptor)
        out.addr = d.addr
        out.len = d.len
        out.flags = d.flags
        out.next = d.next
        return out

    def descriptors(self):
        """Every descriptor of the chain from the head (a fresh walk)."""
        cdef ChainCursor c
        cdef vring_desc d
        cdef int rc
        cdef Descriptor x
        out = []
        chain_start(&c, self.table, self.table_gpa, self.queue_size, self.head_index)
        while True:
            rc = chain_next(self.snap, &c, &d)
            if rc == 0:
                return out
            if rc < 0:
                raise_for_status(rc, &c, self.head_index)
            x = Descriptor.__new__(Descriptor)
            x.addr, x.len, x.flags, x.next = d.addr, d.len, d.flags, d.next
            out.append(x)

    def check_order(self):
        """Check that no device-readable descriptor follows a device-writable one.

        VIRTIO 1.2 §2.7.4.2: the driver MUST place any device-writable descriptor
        elements after any device-readable descriptor elements.  Reader and Writer
        do not enforce it (each sees its own direction only, as rust-vmm's do); a
        device whose request format depends on it (virtio-scsi, §5.6.6.1) asks
        here.  A fresh walk from the head, with no object made per descriptor.

        Raises:
            InvalidChain: a device-readable descriptor follows a device-writable
                one (the message names its position in the chain); also any error
                of the walk itself (see the class).
        """
        chain_check_order(self)

    def reader(self):
        """A :class:`Reader` over the chain's device-readable buffers."""
        return make_reader(self)

    def writer(self):
        """A :class:`Writer` over the chain's device-writable buffers."""
        return make_writer(self)

    def __repr__(self):
        return f"<DescriptorChain head={self.head_index} queue_size={self.queue_size}>"


cdef int chain_check_order(DescriptorChain ch) except -1:
    """:meth:`DescriptorChain.check_order` for compiled callers (chain.pxd)."""
    cdef ChainCursor c
    cdef vring_desc d
    cdef int rc
    cdef uint32_t pos = 0
    cdef bint seen_write = False
    chain_start(&c, ch.table, ch.table_gpa, ch.queue_size, ch.head_index)
    while True:
        rc = chain_next(ch.snap, &c, &d)
        if rc == 0:
            return 0
        if rc < 0:
            raise_for_status(rc, &c, ch.head_index)
        if d.flags & VRING_DESC_F_WRITE:
            seen_write = True
        elif seen_write:
            raise InvalidChain(
                f"chain {ch.head_index}: descriptor {pos} is device-readable after a "
                "device-writable one (VIRTIO 1.2 §2.7.4.2)")
        pos += 1


cdef DescriptorChain make_chain(MemorySnapshot snap, object memory, const unsigned char *table,
                                uint64_t table_gpa, uint16_t queue_size, uint16_t head):
    """The chain at ``head`` of a main table at host address ``table`` or, if NULL,
    of one that runs over adjacent regions from ``table_gpa``."""
    cdef DescriptorChain ch = DescriptorChain.__new__(DescriptorChain)
    ch.snap = snap
    ch._memory = memory
    ch.table = table
    ch.table_gpa = table_gpa
    ch.queue_size = queue_size
    ch.head_index = head
    chain_start(&ch.cur, table, table_gpa, queue_size, head)
    return ch


cdef struct _Collected:
    # The segments a walk is collecting, in locals of the walk (see _collect).
    iovec *segs
    Py_ssize_t n
    unsigned char *end       # where the last segment ends (a buffer there joins it)
    size_t avail


cdef inline int _collect_take(_Stream s, _Collected *a, unsigned char *p, size_t length) except -1:
    """Add buffer ``[p, p+length)`` to what a walk collects, as :func:`stream_append`
    does (inlined into the walk, where ``a`` lives in registers)."""
    a.avail += length
    if p == a.end:
        a.segs[a.n - 1].iov_len += length
    else:
        if a.n == s.cap:
            s.nsegs = a.n
            s._grow()
            a.segs = s.segs
        a.segs[a.n].iov_base = p
        a.segs[a.n].iov_len = length
        a.n += 1
    a.end = p + length
    return 0


cdef int _collect_pieces(_Stream s, _Collected *a, MemorySnapshot snap, uint64_t gpa,
                         uint32_t length) except -1:
    """Add a buffer that snap_check found mapped over adjacent regions, one
    segment per region (the slow path of _collect)."""
    cdef MemEntry *e
    cdef uint64_t take
    while length:
        e = snap_entry(snap, gpa, 1)
        take = length
        if e.last - gpa < take - 1:
            take = e.last - gpa + 1
        _collect_take(s, a, e.hva + (gpa - e.gpa), <size_t>take)
        gpa += take
        length -= <uint32_t>take
    return 0


# Cython keeps a freelist for the base class only; it serves Reader and Writer,
# which add no fields (same size).
@cython.freelist(32)
@cython.no_gc
cdef class _Stream:
    """The common cursor of Reader and Writer: an array of host iovecs, a position
    and a byte budget (``avail``) that bounds every operation."""

    def __cinit__(self):
        self.segs = self.inline_segs
        self.cap = 16
        self.nsegs = 0
        self.idx = 0
        self.off = 0
        self.avail = 0
        self.done = 0

    def __dealloc__(self):
        if self.segs != self.inline_segs:
            free(self.segs)

    cdef int _grow(self) except -1:
        cdef iovec *grown
        cdef Py_ssize_t i
        if self.segs == self.inline_segs:
            grown = <iovec *>malloc(2 * self.cap * sizeof(iovec))
            if grown != NULL:
                for i in range(self.nsegs):
                    grown[i] = self.inline_segs[i]
        else:
            grown = <iovec *>realloc(self.segs, 2 * self.cap * sizeof(iovec))
        if grown == NULL:
            raise MemoryError()
        self.segs = grown
        self.cap *= 2
        return 0

    cdef int _collect(self, DescriptorChain ch, bint want_write) except -1:
        """Walk the whole chain, keeping the buffers of one direction.

        The segment array, its count and the byte budget are kept in a local
        struct (stores into the array would otherwise force the compiler to reload
        the fields of ``self`` after each one), which :func:`_collect_take` fills,
        joining back-to-back buffers as :func:`stream_append` does.

        It first walks the main table's direct descriptors itself, with its state
        in plain locals (the cursor's address is taken, so the compiler keeps it in
        memory) and the last region that held a buffer at hand.  A run of
        descriptors whose ``next`` is the following index (what drivers lay out)
        is walked by address, so the CPU can read ahead instead of waiting for each
        ``next`` (docs/performance.md has the figure).  That
        walk only consumes descriptors none of whose checks can fail; at the
        first unusual one (INDIRECT, an index, TTL or length error, a buffer
        outside guest memory) it hands the cursor to the general walk, which reads
        that descriptor again and handles or reports it: every rule of VIRTIO 1.2
        §2.7.5 stays in chain_next.  The general walk also takes a buffer that runs
        from one region into the next (one segment per region, _collect_pieces) and
        a main table over regions (no host pointer: the fast walk is skipped)."""
        cdef ChainCursor c
        cdef vring_desc d
        cdef int rc
        cdef unsigned char *p
        cdef MemorySnapshot snap = ch.snap
        cdef uint16_t want = VRING_DESC_F_WRITE if want_write else 0
        cdef _Collected a
        cdef const unsigned char *table = ch.table
        cdef const unsigned char *dp
        cdef vring_desc dsc       # the fast walk's descriptor
        cdef uint32_t idx = ch.head_index, ttl = ch.queue_size, tlen = ch.queue_size
        cdef uint64_t total = 0, last
        cdef MemEntry *e
        cdef uint64_t hit_gpa = 1, hit_last = 0     # an empty range: no region yet
        cdef unsigned char *hit_hva = NULL
        # The fast walk reads the main table by host address: not one over regions.
        cdef bint fast = table != NULL
        a.segs = self.segs
        a.n = self.nsegs
        a.avail = self.avail
        a.end = NULL
        if a.n:
            a.end = <unsigned char *>a.segs[a.n - 1].iov_base + a.segs[a.n - 1].iov_len
        self.snap = snap
        chain_start(&c, table, ch.table_gpa, ch.queue_size, ch.head_index)
        while fast and idx < tlen:
            dp = table + 16 * <size_t>idx
            while True:                 # a run of descriptors at idx, idx+1, ...
                if ttl == 0:
                    fast = False
                    break
                desc_load(dp, &dsc)
                if dsc.flags & VRING_DESC_F_INDIRECT or total + dsc.len > (<uint64_t>1 << 32):
                    fast = False
                    break
                if (dsc.flags & VRING_DESC_F_WRITE) == want and dsc.len != 0:
                    last = dsc.addr + (dsc.len - 1)
                    if hit_gpa <= dsc.addr and last <= hit_last and last >= dsc.addr:
                        p = hit_hva + (dsc.addr - hit_gpa)
                    else:
                        e = snap_entry(snap, dsc.addr, dsc.len)
                        if e == NULL or (want_write and not e.writable):
                            fast = False
                            break
                        hit_gpa = e.gpa
                        hit_last = e.last
                        hit_hva = e.hva
                        p = hit_hva + (dsc.addr - hit_gpa)
                    _collect_take(self, &a, p, dsc.len)
                ttl -= 1
                total += dsc.len
                if not (dsc.flags & VRING_DESC_F_NEXT):
                    c.has_next = False
                    fast = False
                    break
                if dsc.next != idx + 1 or dsc.next >= tlen:
                    idx = dsc.next       # a jump (or out of range: the next pass stops)
                    break
                idx += 1
                dp += 16
        c.next_index = idx
        c.ttl = ttl
        c.total_len = total
        rc = 0
        while c.has_next:
            rc = chain_next(snap, &c, &d)
            if rc != 1:
                break
            if (d.flags & VRING_DESC_F_WRITE) != want or d.len == 0:
                continue
            p = snap_ptr_w(snap, d.addr, d.len) if want_write else snap_ptr(snap, d.addr, d.len)
            if p != NULL:
                _collect_take(self, &a, p, d.len)
                continue
            # Not in one region: a buffer that runs on into the next region(s) is
            # taken as one segment per region; one with a hole is refused.
            c.mem_rc = snap_check(snap, d.addr, d.len, want_write, 1, &c.bad_addr)
            if c.mem_rc != GM_OK:
                rc = VQ_E_BUF_MEM
                c.bad_value = d.addr
                c.total_len = d.len
                break
            _collect_pieces(self, &a, snap, d.addr, d.len)
        self.nsegs = a.n
        self.avail = a.avail
        if rc < 0:
            raise_for_status(rc, &c, ch.head_index)
        return 0

    cdef void _advance(self, size_t n) noexcept nogil:
        cdef size_t step
        self.avail -= n
        self.done += n
        while n:
            step = self.segs[self.idx].iov_len - self.off
            if n < step:
                self.off += n
                return
            n -= step
            self.idx += 1
            self.off = 0

    cdef int _iov(self, iovec *out, int maxn, size_t n, size_t *got) noexcept nogil:
        """Describe the next ``n`` bytes (at most maxn segments) as iovecs."""
        cdef int k = 0
        cdef Py_ssize_t i = self.idx
        cdef size_t off = self.off
        cdef size_t take
        got[0] = 0
        if n > self.avail:
            n = self.avail
        while n and k < maxn and i < self.nsegs:
            take = self.segs[i].iov_len - off
            if take > n:
                take = n
            if take:
                out[k].iov_base = <unsigned char *>self.segs[i].iov_base + off
                out[k].iov_len = take
                k += 1
                n -= take
                got[0] += take
            i += 1
            off = 0
        return k

    cdef size_t copy_out(self, unsigned char *dst, size_t n) noexcept nogil:
        """Copy up to n bytes from the guest buffers to dst and advance."""
        cdef size_t total = 0
        cdef size_t take
        if n > self.avail:
            n = self.avail
        while total < n:
            take = self.segs[self.idx].iov_len - self.off
            if take > n - total:
                take = n - total
            vq_copy(dst + total, <unsigned char *>self.segs[self.idx].iov_base + self.off, take)
            total += take
            self.off += take
            if self.off == self.segs[self.idx].iov_len:
                self.idx += 1
                self.off = 0
        self.avail -= total
        self.done += total
        return total

    cdef size_t copy_in(self, const unsigned char *src, size_t n) noexcept nogil:
        """Copy up to n bytes from src into the guest buffers and advance."""
        cdef size_t total = 0
        cdef size_t take
        if n > self.avail:
            n = self.avail
        while total < n:
            take = self.segs[self.idx].iov_len - self.off
            if take > n - total:
                take = n - total
            vq_copy(<unsigned char *>self.segs[self.idx].iov_base + self.off, src + total, take)
            total += take
            self.off += take
            if self.off == self.segs[self.idx].iov_len:
                self.idx += 1
                self.off = 0
        self.avail -= total
        self.done += total
        return total

    cdef size_t _fd_io(self, int fd, Py_ssize_t n, long long offset, bint reading,
                       ByteSource source=None, int flags=0, size_t nogil_min=0) except? 0:
        """Move up to ``n`` bytes (all if -1) between the buffers and ``fd``:
        ``readv``/``preadv`` into them when ``reading``, else ``writev``/``pwritev``
        out of them, at ``offset`` if >= 0; GIL released.  With ``source``, its
        ``readv`` fills them instead (``reading``; ``fd`` and ``offset`` unused).
        Short counts (end of file, a full or empty pipe or socket, EAGAIN) end the
        call; EINTR is retried; an error after some bytes moved reports the bytes
        (the cursor has moved past them, the error shows again on the next call).
        ``flags`` != 0: ``preadv2``/``pwritev2`` with them (``RWF_NOWAIT``: EAGAIN
        instead of blocking, which ends the call like a short count).  The GIL is
        released when at least ``nogil_min`` bytes are to move (always by default):
        a caller on a non-blocking socket keeps it for short copies, which end sooner
        than another thread would give it back."""
        cdef size_t want = self.avail if n < 0 or <size_t>n > self.avail else <size_t>n
        cdef size_t total
        cdef int err = 0
        if want >= nogil_min:
            with nogil:
                total = self._fd_loop(fd, want, offset, reading, source, flags, &err)
        else:
            total = self._fd_loop(fd, want, offset, reading, source, flags, &err)
        if err and total == 0:
            raise OSError(err, os.strerror(err))
        return total

    cdef size_t _fd_loop(self, int fd, size_t want, long long offset, bint reading,
                         ByteSource source, int flags, int *err) noexcept nogil:
        """:meth:`_fd_io`'s system calls, with or without the GIL: the bytes moved;
        ``err`` gets the errno that ended it (0: a short count or all moved)."""
        cdef iovec iov[IOV_BATCH]
        cdef size_t total = 0, got
        cdef ssize_t r
        cdef int k
        while total < want:
            # Back-to-back buffers are one segment already (stream_append):
            # few iovecs, which the kernel handles without allocating (up to 8).
            k = self._iov(iov, IOV_BATCH, want - total, &got)
            if source is not None:
                r = source.readv(iov, k)
            elif flags:
                r = (preadv2(fd, iov, k, offset + <long long>total if offset >= 0 else -1, flags)
                     if reading else
                     pwritev2(fd, iov, k, offset + <long long>total if offset >= 0 else -1, flags))
            else:
                r = fd_iov(fd, iov, k, offset + <long long>total if offset >= 0 else -1, reading)
            if r < 0:
                if errno == EINTR:
                    continue
                if errno != EAGAIN:
                    err[0] = errno
                break
            self._advance(<size_t>r)
            total += <size_t>r
            if <size_t>r < got:
                break
        return total

    cdef size_t _copy_py(self, object buffer, bint into_guest, bint exact) except? 0:
        """Copy between the guest buffers and a Python buffer (into the guest for a
        Writer, out of it for a Reader); ``exact``: all of the buffer or nothing
        (DescriptorChainOverflow).  The GIL is released for long copies."""
        cdef Py_buffer view
        cdef size_t got
        PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE if into_guest else PyBUF_WRITABLE)
        try:
            if exact and <size_t>view.len > self.avail:
                raise DescriptorChainOverflow(
                    f"{'write' if into_guest else 'read'} of {view.len} bytes exceeds the "
                    f"{self.avail} {'device-writable' if into_guest else 'available'} bytes "
                    "of the chain")
            if <size_t>view.len >= NOGIL_COPY_MIN:
                with nogil:
                    got = (self.copy_in(<const unsigned char *>view.buf, <size_t>view.len)
                           if into_guest else
                           self.copy_out(<unsigned char *>view.buf, <size_t>view.len))
            elif into_guest:
                got = self.copy_in(<const unsigned char *>view.buf, <size_t>view.len)
            else:
                got = self.copy_out(<unsigned char *>view.buf, <size_t>view.len)
        finally:
            PyBuffer_Release(&view)
        return got

    def available_bytes(self):
        """Bytes left to read (Reader) or to fill (Writer)."""
        return self.avail

    def consume(self, Py_ssize_t n):
        """Skip up to ``n`` bytes; returns how many were skipped."""
        if n < 0:
            raise ValueError("negative count")
        cdef size_t k = <size_t>n if <size_t>n < self.avail else self.avail
        self._advance(k)
        return k

    def buffers(self, Py_ssize_t n=-1):
        """memoryviews of the next ``n`` bytes (all if -1), segment by segment, for
        ``socket.sendmsg``/``recvmsg_into``.  Nothing is consumed; call
        :meth:`consume` with what the I/O moved.  The views keep the memory mapped."""
        cdef iovec iov[IOV_BATCH]
        cdef size_t want = self.avail if n < 0 or <size_t>n > self.avail else <size_t>n
        cdef size_t got
        cdef int k, j
        cdef bint ro = not isinstance(self, Writer)
        out = []
        # Walk a copy of the cursor so nothing moves.
        cdef Py_ssize_t save_idx = self.idx
        cdef size_t save_off = self.off, save_avail = self.avail, save_done = self.done
        try:
            while want:
                k = self._iov(iov, IOV_BATCH, want, &got)
                for j in range(k):
                    out.append(make_view(self.snap, <unsigned char *>iov[j].iov_base,
                                         <Py_ssize_t>iov[j].iov_len, ro))
                self._advance(got)
                want -= got
        finally:
            self.idx, self.off, self.avail, self.done = save_idx, save_off, save_avail, save_done
        return out

    cdef object _split(self, _Stream other, Py_ssize_t offset):
        """Move everything after ``offset`` into ``other``; self keeps the first part."""
        if offset < 0 or <size_t>offset > self.avail:
            raise DescriptorChainOverflow(
                f"split at {offset} is beyond the {self.avail} bytes available")
        cdef iovec iov[IOV_BATCH]
        cdef size_t got, rest
        cdef int k, j
        cdef Py_ssize_t save_idx = self.idx
        cdef size_t save_off = self.off, save_done = self.done
        other.snap = self.snap
        self._advance(<size_t>offset)
        rest = self.avail
        while rest:
            k = self._iov(iov, IOV_BATCH, rest, &got)
            for j in range(k):
                stream_append(other, <unsigned char *>iov[j].iov_base, iov[j].iov_len)
            self._advance(got)
            rest -= got
        self.idx, self.off, self.done = save_idx, save_off, save_done
        self.avail = <size_t>offset
        return other


cdef Reader make_reader(DescriptorChain ch):
    cdef Reader r = Reader.__new__(Reader)
    r._collect(ch, False)
    return r


cdef Writer make_writer(DescriptorChain ch):
    cdef Writer w = Writer.__new__(Writer)
    w._collect(ch, True)
    return w


cdef class Reader(_Stream):
    """Reads the device-readable buffers of a chain as one byte stream (rust-vmm's
    ``Reader``).  Made by :meth:`DescriptorChain.reader`."""

    def __init__(self, DescriptorChain chain not None):
        self._collect(chain, False)

    def bytes_read(self):
        return self.done

    def read(self, Py_ssize_t n=-1):
        """Up to ``n`` bytes (all that is left if -1)."""
        cdef size_t want = self.avail if n < 0 or <size_t>n > self.avail else <size_t>n
        out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>want)
        self.copy_out(<unsigned char *>PyBytes_AS_STRING(out), want)
        return out

    def readinto(self, buffer):
        """Fill ``buffer`` with as many bytes as are left; returns the count."""
        return self._copy_py(buffer, False, False)

    def read_exact_into(self, buffer):
        """Fill all of ``buffer``, or raise DescriptorChainOverflow and read nothing."""
        self._copy_py(buffer, False, True)

    def read_obj(self, str fmt):
        """Read a little-endian struct (``struct`` format without byte-order prefix).

        Raises:
            DescriptorChainOverflow: fewer bytes are left than the struct needs.
        """
        st = struct_for(fmt)
        cdef Py_ssize_t size = st.size
        if <size_t>size > self.avail:
            raise DescriptorChainOverflow(
                f"read of {size} bytes exceeds the {self.avail} bytes available")
        return st.unpack(self.read(size))

    def split_at(self, Py_ssize_t offset):
        """Keep the first ``offset`` bytes; return a Reader over the rest."""
        return self._split(Reader.__new__(Reader), offset)

    def write_to_fd(self, int fd, Py_ssize_t n=-1, long long offset=-1, int flags=0):
        """Drain up to ``n`` bytes (all if -1) into ``fd`` with ``writev`` (``pwritev``
        at ``offset`` if >= 0), GIL released.  Returns the bytes written, which may
        be short (a full pipe or socket, EAGAIN: then possibly 0).  EINTR is retried.
        ``flags`` (``os.RWF_*``) != 0 uses ``pwritev2`` with them: with
        ``os.RWF_NOWAIT`` a write that would block stops short (possibly at 0).

        Raises:
            OSError: any other error of the system call, if nothing was written.
        """
        return self._fd_io(fd, n, offset, False, None, flags)

    def __repr__(self):
        return f"<Reader available={self.avail} read={self.done}>"


cdef class Writer(_Stream):
    """Writes into the device-writable buffers of a chain as one byte stream
    (rust-vmm's ``Writer``).  Made by :meth:`DescriptorChain.writer`.

    Only buffers flagged VIRTQ_DESC_F_WRITE are ever written (VIRTIO 1.2 §2.7.5:
    the device MUST NOT write to a device-readable buffer)."""

    def __init__(self, DescriptorChain chain not None):
        self._collect(chain, True)

    def bytes_written(self):
        return self.done

    def write(self, data):
        """Write as much of ``data`` as fits; returns the count."""
        return self._copy_py(data, True, False)

    def write_all(self, data):
        """Write all of ``data``, or raise DescriptorChainOverflow and write nothing."""
        self._copy_py(data, True, True)

    def write_obj(self, str fmt, *values):
        """Write a little-endian struct, all of it or nothing."""
        self.write_all(struct_for(fmt).pack(*values))

    def split_at(self, Py_ssize_t offset):
        """Keep the first ``offset`` bytes; return a Writer over the rest."""
        return self._split(Writer.__new__(Writer), offset)

    def read_from_fd(self, int fd, Py_ssize_t n=-1, long long offset=-1, int flags=0):
        """Fill up to ``n`` bytes (all if -1) straight from ``fd`` with ``readv``
        (``preadv`` at ``offset`` if >= 0), GIL released: the payload never passes
        through a Python object.  Returns the bytes read; short at end of file, or
        when a pipe/socket has no more now (EAGAIN: possibly 0).  EINTR is retried.
        ``flags`` (``os.RWF_*``) != 0 uses ``preadv2`` with them: with
        ``os.RWF_NOWAIT`` only what the page cache holds is read, the rest stops
        short (possibly at 0) instead of waiting for the disk.

        Raises:
            OSError: any other error of the system call, if nothing was read.
        """
        return self._fd_io(fd, n, offset, True, None, flags)

    def read_from(self, ByteSource source not None, Py_ssize_t n=-1):
        """Fill up to ``n`` bytes (all if -1) straight from ``source``
        (:class:`~virtio_queue.source.ByteSource`), GIL released, as
        :meth:`read_from_fd` does from an fd: short counts (possibly 0 on
        ``EAGAIN``) end it, EINTR is retried.

        Raises:
            OSError: the source failed before giving anything.
        """
        return self._fd_io(-1, n, -1, True, source)

    def __repr__(self):
        return f"<Writer available={self.avail} written={self.done}>"
