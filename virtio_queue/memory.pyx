# cython: language_level=3, embedsignature=True
"""Guest memory: regions mapped into this process and checked address translation.

The equivalent of rust-vmm's vm-memory ``GuestMemoryMmap``.  A :class:`GuestMemory`
is mutable (vhost-user adds and removes regions at any time), but every change
publishes a new immutable :class:`MemorySnapshot`.  Whatever translated an address
(a descriptor chain, a Reader/Writer, an exported memoryview, a worker thread's I/O)
holds the snapshot it used, and through it the regions: removing a region therefore
defers its unmap until the last user lets go, and a use-after-unmap cannot happen.
"""

import os
import struct

from cpython.buffer cimport (PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_FillInfo,
                             PyBuffer_Release, PyObject_GetBuffer)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.errno cimport errno
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap
from posix.unistd cimport sysconf

from virtio_queue.includes.endian cimport (htole16, htole32, htole64, le16toh,
                                           le32toh, le64toh)
from virtio_queue.includes.vq_copy cimport vq_copy

from virtio_queue.errors import GuestMemoryError

cdef extern from "<unistd.h>":
    enum: _SC_PAGESIZE

# Counters for debug builds (STYLE.md §3): mappings made and undone.  Tests assert
# that they balance once every user is gone.
cdef Py_ssize_t _n_maps = 0
cdef Py_ssize_t _n_unmaps = 0
cdef Py_ssize_t _n_views = 0
cdef Py_ssize_t _n_view_releases = 0


def debug_counters():
    """Mappings made/unmapped and buffer views taken/released since import."""
    return {"maps": _n_maps, "unmaps": _n_unmaps,
            "views": _n_views, "view_releases": _n_view_releases}


cdef uint64_t _U64_MAX = 0xFFFFFFFFFFFFFFFF


cdef class GuestRegion:
    """One contiguous guest-physical range mapped into this process.

    Build one with :meth:`from_fd` (``mmap`` of a file at an offset, ``MAP_SHARED``:
    what vhost-user's SET_MEM_TABLE passes), :meth:`memfd`, or :meth:`from_buffer`
    (any writable buffer, for tests and embedding VMMs).  The mapping is undone when
    the last reference goes away, never while a chain or view still uses it.
    """

    def __cinit__(self):
        self.hva = NULL
        self._map_base = NULL
        self._map_len = 0
        self._has_view = False
        self._writable = True

    def __dealloc__(self):
        global _n_unmaps, _n_view_releases
        if self._map_base != NULL:
            munmap(self._map_base, self._map_len)
            self._map_base = NULL
            _n_unmaps += 1
        if self._has_view:
            PyBuffer_Release(&self._view)
            self._has_view = False
            _n_view_releases += 1

    @classmethod
    def from_fd(cls, int fd, uint64_t size, uint64_t guest_addr, uint64_t offset=0, *,
                bint writable=True):
        """Map ``size`` bytes of ``fd`` at ``offset`` as guest range ``guest_addr``.

        The fd is not kept (it may be closed right after).  ``offset`` need not be
        page aligned (vhost-user's mmap_offset is not required to be).

        Raises:
            GuestMemoryError: zero size, a range that overflows, or mmap failed.
        """
        global _n_maps
        cdef GuestRegion r
        cdef uint64_t page = <uint64_t>sysconf(_SC_PAGESIZE)
        cdef uint64_t delta = offset % page
        cdef size_t maplen
        cdef void *p
        cdef int prot = PROT_READ | (PROT_WRITE if writable else 0)
        _check_range(guest_addr, size)
        if offset + size < offset:
            raise GuestMemoryError(f"region file range overflows: offset {offset:#x} size {size:#x}")
        maplen = <size_t>(size + delta)
        with nogil:
            p = mmap(NULL, maplen, prot, MAP_SHARED, fd, <long>(offset - delta))
        if p == MAP_FAILED:
            err = OSError(os.strerror(_errno()))
            raise GuestMemoryError(
                f"mmap of fd {fd} (size {size:#x}, offset {offset:#x}) failed: {err}") from None
        r = cls.__new__(cls)
        r._map_base = p
        r._map_len = maplen
        r.hva = <unsigned char *>p + delta
        r.guest_addr = guest_addr
        r.size = size
        r._writable = writable
        _n_maps += 1
        return r

    @classmethod
    def memfd(cls, uint64_t size, uint64_t guest_addr, str name="guest-ram"):
        """A new anonymous shared region: returns ``(region, fd)``; the caller owns fd
        (to share it with a backend, e.g. through SET_MEM_TABLE) and closes it."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            return cls.from_fd(fd, size, guest_addr), fd
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_buffer(cls, buffer, uint64_t guest_addr):
        """A region over an exported buffer (bytearray, mmap, memoryview...), which
        stays exported (so it cannot be resized or closed) while the region lives.
        A read-only buffer gives a read-only region (writes through it are refused)."""
        global _n_views
        cdef GuestRegion r = cls.__new__(cls)
        try:
            PyObject_GetBuffer(buffer, &r._view, PyBUF_WRITABLE)
            r._writable = True
        except BufferError:
            PyObject_GetBuffer(buffer, &r._view, PyBUF_SIMPLE)
            r._writable = False
        r._has_view = True
        _n_views += 1
        if r._view.len == 0:
            raise GuestMemoryError("a guest memory region cannot be empty")
        _check_range(guest_addr, <uint64_t>r._view.len)
        r.hva = <unsigned char *>r._view.buf
        r.guest_addr = guest_addr
        r.size = <uint64_t>r._view.len
        return r

    @property
    def last_addr(self):
        """The last guest address inside the region."""
        return self.guest_addr + self.size - 1

    @property
    def host_addr(self):
        """Where the region starts in this process (for diagnostics and ioctls)."""
        return <size_t>self.hva

    @property
    def writable(self):
        return self._writable

    def __len__(self):
        return self.size

    def __repr__(self):
        return (f"<{type(self).__name__} gpa={self.guest_addr:#x} size={self.size:#x}"
                f"{'' if self._writable else ' read-only'}>")


cdef int _errno() noexcept:
    return errno


cdef int _check_range(uint64_t gpa, uint64_t size) except -1:
    if size == 0:
        raise GuestMemoryError("a guest memory region cannot be empty")
    if gpa + (size - 1) < gpa:
        raise GuestMemoryError(f"region [{gpa:#x}, +{size:#x}) overflows the address space")
    return 0


cdef class MemorySnapshot:
    """An immutable, sorted table of regions (internal: see the module docstring)."""

    def __cinit__(self, tuple regions=()):
        cdef Py_ssize_t i
        cdef GuestRegion r
        self.entries = NULL
        self.n = 0
        self.last_hit = 0
        ordered = tuple(sorted(regions, key=lambda x: (<GuestRegion>x).guest_addr))
        for i in range(1, len(ordered)):
            prev = <GuestRegion>ordered[i - 1]
            r = <GuestRegion>ordered[i]
            if r.guest_addr <= prev.guest_addr + (prev.size - 1):
                raise GuestMemoryError(f"region {r!r} overlaps {prev!r}")
        self.regions = ordered
        if ordered:
            self.entries = <MemEntry *>malloc(len(ordered) * sizeof(MemEntry))
            if self.entries == NULL:
                raise MemoryError()
        for i, obj in enumerate(ordered):
            r = <GuestRegion>obj
            self.entries[i].gpa = r.guest_addr
            self.entries[i].last = r.guest_addr + (r.size - 1)
            self.entries[i].hva = r.hva
            self.entries[i].writable = r._writable
        self.n = len(ordered)

    def __dealloc__(self):
        free(self.entries)


cdef class _GuestView:
    """A buffer exporter over a piece of guest memory that holds its snapshot, so a
    memoryview of guest memory can never outlive the mapping."""
    cdef MemorySnapshot snap
    cdef unsigned char *ptr
    cdef Py_ssize_t length
    cdef bint readonly

    def __getbuffer__(self, Py_buffer *view, int flags):
        PyBuffer_FillInfo(view, self, self.ptr, self.length, self.readonly, flags)

    def __releasebuffer__(self, Py_buffer *view):
        pass


cdef object make_view(MemorySnapshot snap, unsigned char *ptr, Py_ssize_t length, bint readonly):
    cdef _GuestView v = _GuestView.__new__(_GuestView)
    v.snap = snap
    v.ptr = ptr
    v.length = length
    v.readonly = readonly
    return memoryview(v)


cdef int snap_check(MemorySnapshot s, uint64_t gpa, uint64_t length, bint write,
                    uint64_t align, uint64_t *bad) noexcept nogil:
    """Whether ``[gpa, gpa+length)`` is mapped, in one region or over several that
    follow each other in guest-physical memory: GM_OK, or a GM_* code with ``bad``
    the address it is about.

    A driver addresses guest-physical memory (VIRTIO 1.2 §2.7) and cannot know how
    the VMM split it into regions, so a range may run from one region into the next
    (rust-vmm's ``check_range`` accepts it too); a hole anywhere is refused.  With
    ``write`` every byte must be writable; with ``align`` > 1 every boundary inside
    the range must fall on a multiple of ``align``, so that no aligned field of that
    size is split (a ring's u16/u32 fields are loaded and stored in one access).
    The slow path, taken only when one region does not hold the whole range."""
    cdef uint64_t cur = gpa, left = length
    cdef MemEntry *e
    bad[0] = gpa
    if length and gpa + (length - 1) < gpa:
        return GM_OVERFLOW
    while True:
        e = snap_entry(s, cur, 1)
        if e == NULL:
            bad[0] = cur
            return GM_UNMAPPED if cur == gpa else GM_GAP
        if write and not e.writable:
            bad[0] = cur
            return GM_READ_ONLY
        if cur != gpa and align > 1 and cur % align:
            bad[0] = cur
            return GM_SPLIT_FIELD
        if left <= 1 or left - 1 <= e.last - cur:
            return GM_OK
        # e.last - cur < left - 1 here, so neither step overflows.
        left -= e.last - cur + 1
        cur = e.last + 1


cdef int snap_copy(MemorySnapshot s, uint64_t gpa, unsigned char *buf, size_t length,
                   bint to_guest, uint64_t *bad) noexcept nogil:
    """Copy between ``buf`` and ``[gpa, gpa+length)`` (into the guest if
    ``to_guest``), region by region: all of it, or nothing and a GM_* code from
    :func:`snap_check`."""
    cdef int rc = snap_check(s, gpa, length, to_guest, 1, bad)
    cdef size_t done = 0, take
    cdef MemEntry *e
    cdef unsigned char *p
    if rc != GM_OK:
        return rc
    while done < length:
        e = snap_entry(s, gpa, 1)      # checked above: not NULL
        p = e.hva + (gpa - e.gpa)
        take = length - done
        if e.last - gpa < take - 1:
            take = <size_t>(e.last - gpa + 1)
        if to_guest:
            vq_copy(p, buf + done, take)
        else:
            vq_copy(buf + done, p, take)
        done += take
        gpa += take
    return GM_OK


cdef str gm_text(int rc, uint64_t bad):
    """What a GM_* status says about a range (the end of an error message)."""
    if rc == GM_OVERFLOW:
        return "overflows the address space"
    if rc == GM_UNMAPPED:
        return f"is not mapped at {bad:#x}"
    if rc == GM_GAP:
        return f"crosses a gap at {bad:#x}"
    if rc == GM_READ_ONLY:
        return f"is read-only at {bad:#x}"
    if rc == GM_SPLIT_FIELD:
        return f"has a region boundary inside a field at {bad:#x}"
    return f"is not in guest memory (status {rc})"


cdef int gm_raise(int rc, uint64_t gpa, uint64_t length, uint64_t bad, str what="guest range") except -1:
    """Raise the GuestMemoryError that a GM_* code of ``[gpa, gpa+length)`` means."""
    raise GuestMemoryError(f"{what} [{gpa:#x}, +{length:#x}) {gm_text(rc, bad)}")


cdef int gm_copy(GuestMemory m, uint64_t gpa, void *buf, size_t length, bint to_guest) except -1:
    """Copy between ``buf`` and guest memory at ``gpa``: one copy when one region
    holds the range, else region by region (:func:`snap_copy`).

    Raises:
        GuestMemoryError: the range is not all mapped (writable, for ``to_guest``).
    """
    cdef MemEntry *e = snap_entry(m.snap, gpa, length)
    cdef uint64_t bad
    cdef int rc
    if e != NULL and (e.writable or not to_guest):
        if to_guest:
            vq_copy(e.hva + (gpa - e.gpa), buf, length)
        else:
            vq_copy(buf, e.hva + (gpa - e.gpa), length)
        return 0
    rc = snap_copy(m.snap, gpa, <unsigned char *>buf, length, to_guest, &bad)
    if rc != GM_OK:
        gm_raise(rc, gpa, length, bad)
    return 0


cdef extern from *:
    """
    /* One access of the scalar's width (n is 2, 4 or 8, both addresses aligned to
       it): a field the other side of the ring changes meanwhile (used->idx,
       avail->idx) is never read or written in pieces.  Acquire on the load and
       release on the store, as the ring indexes need (VIRTIO 1.2 2.7.13). */
    static inline void vq_scalar_copy(void *dst, const void *src, size_t n) {
        switch (n) {
        case 2:
            __atomic_store_n((uint16_t *)dst,
                             __atomic_load_n((const uint16_t *)src, __ATOMIC_ACQUIRE), __ATOMIC_RELEASE);
            break;
        case 4:
            __atomic_store_n((uint32_t *)dst,
                             __atomic_load_n((const uint32_t *)src, __ATOMIC_ACQUIRE), __ATOMIC_RELEASE);
            break;
        default:
            __atomic_store_n((uint64_t *)dst,
                             __atomic_load_n((const uint64_t *)src, __ATOMIC_ACQUIRE), __ATOMIC_RELEASE);
        }
    }
    """
    void vq_scalar_copy(void *dst, const void *src, size_t n) noexcept nogil


cdef int gm_scalar(GuestMemory m, uint64_t gpa, void *v, size_t n, bint to_guest) except -1:
    """gm_copy of a little-endian scalar of ``n`` bytes (2, 4 or 8): one access of
    that width where one region holds it at an aligned address, which is where a
    ring index lives.  A byte-wise copy (what memcpy may do for 2 bytes) lets a
    reader see half of an index being changed: 0x58FF becoming 0x5900 read as
    0x59FF.  Elsewhere (unaligned, over two regions) it is gm_copy.

    Raises:
        GuestMemoryError: the range is not all mapped (writable, for ``to_guest``).
    """
    cdef MemEntry *e = snap_entry(m.snap, gpa, n)
    cdef unsigned char *p
    if e != NULL and (e.writable or not to_guest):
        p = e.hva + (gpa - e.gpa)
        if (<size_t>p & (n - 1)) == 0:
            if to_guest:
                vq_scalar_copy(p, v, n)
            else:
                vq_scalar_copy(v, p, n)
            return 0
    return gm_copy(m, gpa, v, n, to_guest)


cdef unsigned char *gm_ptr(GuestMemory m, uint64_t gpa, uint64_t length, bint write) except NULL:
    """One host pointer for ``[gpa, gpa+length)``, which must lie in one region (a
    host address or a zero-copy view cannot span two mappings).

    Raises:
        GuestMemoryError: not mapped, read-only for ``write``, or over a boundary.
    """
    cdef MemEntry *e = snap_entry(m.snap, gpa, length)
    cdef uint64_t bad
    cdef int rc
    if e == NULL:
        rc = snap_check(m.snap, gpa, length, write, 1, &bad)
        if rc != GM_OK:
            gm_raise(rc, gpa, length, bad)
        e = snap_entry(m.snap, gpa, 1)
        raise GuestMemoryError(
            f"guest range [{gpa:#x}, +{length:#x}) is mapped but crosses from one region into "
            f"the next at {e.last + 1:#x}: one host pointer cannot span both "
            "(copy it with read/write or a Reader/Writer)")
    if write and not e.writable:
        raise GuestMemoryError(f"guest range [{gpa:#x}, +{length:#x}) is read-only at {gpa:#x}")
    return e.hva + (gpa - e.gpa)


cdef class GuestMemory:
    """An ordered, non-overlapping set of :class:`GuestRegion` s.

    Every change (:meth:`add_region`, :meth:`remove_region`, :meth:`clear`) bumps
    :attr:`generation`, which queues use to re-translate their ring addresses.
    Translation of ``[gpa, gpa+len)`` is overflow-checked.  Copies (:meth:`read`,
    :meth:`write`, the scalars, a Reader/Writer) run over regions that follow each
    other in guest-physical memory; a host address or a zero-copy view
    (:meth:`translate`, :meth:`get_slice`) needs the range inside one region.
    """

    def __cinit__(self):
        self.snap = MemorySnapshot(())
        self._generation = 0

    def __init__(self, regions=()):
        self.snap = MemorySnapshot(tuple(regions))

    @classmethod
    def from_buffer(cls, buffer, uint64_t guest_addr=0):
        """Memory made of one region over ``buffer`` (tests)."""
        return cls([GuestRegion.from_buffer(buffer, guest_addr)])

    @classmethod
    def memfd(cls, uint64_t size, uint64_t guest_addr=0):
        """Memory made of one new memfd region; returns ``(memory, fd)``."""
        region, fd = GuestRegion.memfd(size, guest_addr)
        return cls([region]), fd

    @property
    def regions(self):
        return self.snap.regions

    @property
    def generation(self):
        return self._generation

    @property
    def total_size(self):
        return sum((<GuestRegion>r).size for r in self.snap.regions)

    def snapshot(self):
        """The current immutable table (holding it keeps every region mapped)."""
        return self.snap

    def add_region(self, GuestRegion region not None):
        """Add a region.

        Raises:
            GuestMemoryError: it overlaps a region already there.
        """
        self.snap = MemorySnapshot(self.snap.regions + (region,))
        self._generation += 1

    def remove_region(self, uint64_t guest_addr, size=None):
        """Remove the region that starts at ``guest_addr`` (and has ``size``, if given)
        and return it.  It is unmapped once nothing uses it any more.

        Raises:
            GuestMemoryError: no such region.
        """
        cdef GuestRegion r
        keep = []
        found = None
        for obj in self.snap.regions:
            r = <GuestRegion>obj
            if found is None and r.guest_addr == guest_addr and (size is None or r.size == size):
                found = r
            else:
                keep.append(r)
        if found is None:
            raise GuestMemoryError(f"no region at {guest_addr:#x}"
                                   + ("" if size is None else f" of size {size:#x}"))
        self.snap = MemorySnapshot(tuple(keep))
        self._generation += 1
        return found

    def clear(self):
        """Remove every region (each is unmapped once nothing uses it)."""
        self.snap = MemorySnapshot(())
        self._generation += 1

    def find_region(self, uint64_t gpa):
        cdef GuestRegion r
        for obj in self.snap.regions:
            r = <GuestRegion>obj
            if r.guest_addr <= gpa <= r.guest_addr + (r.size - 1):
                return r
        return None

    def check_range(self, uint64_t gpa, uint64_t length):
        """Whether ``[gpa, gpa+length)`` is mapped: inside one region, or over regions
        that follow each other with no gap (rust-vmm's ``check_range``)."""
        cdef uint64_t bad
        return (snap_entry(self.snap, gpa, length) != NULL
                or snap_check(self.snap, gpa, length, False, 1, &bad) == GM_OK)

    def check_access(self, uint64_t gpa, uint64_t length, bint write=False):
        """Raise unless ``[gpa, gpa+length)`` is mapped (and writable, for ``write``),
        possibly over adjacent regions.

        Raises:
            GuestMemoryError: naming the first unmapped (or read-only) address, and
                whether the range starts there ("not mapped at") or runs into it
                from a mapped region ("crosses a gap at").
        """
        cdef uint64_t bad
        cdef int rc = snap_check(self.snap, gpa, length, write, 1, &bad)
        if rc != GM_OK:
            gm_raise(rc, gpa, length, bad)

    def translate(self, uint64_t gpa, uint64_t length):
        """The host address of ``[gpa, gpa+length)``, which must lie in one region.

        Raises:
            GuestMemoryError: unmapped, overflowing, or crossing into the next region.
        """
        return <size_t>gm_ptr(self, gpa, length, False)

    def read(self, uint64_t gpa, Py_ssize_t length):
        """Copy ``length`` bytes out of guest memory (over adjacent regions too).

        Raises:
            GuestMemoryError: a byte of the range is not mapped.
        """
        if length < 0:
            raise ValueError("negative length")
        out = PyBytes_FromStringAndSize(NULL, length)
        gm_copy(self, gpa, PyBytes_AS_STRING(out), <size_t>length, False)
        return out

    def readinto(self, uint64_t gpa, buffer):
        """Fill ``buffer`` from guest memory at ``gpa`` (over adjacent regions too)."""
        cdef Py_buffer view
        PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE)
        try:
            gm_copy(self, gpa, view.buf, <size_t>view.len, False)
        finally:
            PyBuffer_Release(&view)

    def write(self, uint64_t gpa, data):
        """Copy ``data`` (any bytes-like object) into guest memory at ``gpa``, all of it
        or nothing (over adjacent regions too).

        Raises:
            GuestMemoryError: a byte of the range is not mapped or is read-only.
        """
        cdef Py_buffer view
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            gm_copy(self, gpa, view.buf, <size_t>view.len, True)
        finally:
            PyBuffer_Release(&view)

    # Little-endian scalars: what the rings and most virtio structures are made of.
    def read_u8(self, uint64_t gpa):
        return (<uint8_t *>gm_ptr(self, gpa, 1, False))[0]

    def read_u16(self, uint64_t gpa):
        cdef uint16_t v
        gm_scalar(self, gpa, &v, 2, False)
        return le16toh(v)

    def read_u32(self, uint64_t gpa):
        cdef uint32_t v
        gm_scalar(self, gpa, &v, 4, False)
        return le32toh(v)

    def read_u64(self, uint64_t gpa):
        cdef uint64_t v
        gm_scalar(self, gpa, &v, 8, False)
        return le64toh(v)

    def write_u8(self, uint64_t gpa, uint8_t value):
        (<uint8_t *>gm_ptr(self, gpa, 1, True))[0] = value

    def write_u16(self, uint64_t gpa, uint16_t value):
        cdef uint16_t v = htole16(value)
        gm_scalar(self, gpa, &v, 2, True)

    def write_u32(self, uint64_t gpa, uint32_t value):
        cdef uint32_t v = htole32(value)
        gm_scalar(self, gpa, &v, 4, True)

    def write_u64(self, uint64_t gpa, uint64_t value):
        cdef uint64_t v = htole64(value)
        gm_scalar(self, gpa, &v, 8, True)

    def read_obj(self, uint64_t gpa, str fmt):
        """Unpack a little-endian struct (``struct`` format, no byte-order prefix)."""
        st = struct_for(fmt)
        return st.unpack(self.read(gpa, st.size))

    def write_obj(self, uint64_t gpa, str fmt, *values):
        """Pack a little-endian struct into guest memory."""
        self.write(gpa, struct_for(fmt).pack(*values))

    def get_slice(self, uint64_t gpa, Py_ssize_t length):
        """A memoryview straight into guest memory (no copy).  It keeps the region
        mapped for as long as it (or anything made from it) lives."""
        if length < 0:
            raise ValueError("negative length")
        cdef MemEntry *e = snap_entry(self.snap, gpa, <uint64_t>length)
        if e == NULL:
            gm_ptr(self, gpa, <uint64_t>length, False)  # raises the precise error
        return make_view(self.snap, e.hva + (gpa - e.gpa), length, not e.writable)

    def __len__(self):
        return self.snap.n

    def __iter__(self):
        return iter(self.snap.regions)

    def __repr__(self):
        return f"<GuestMemory {list(self.snap.regions)!r} gen={self._generation}>"


_structs = {}


cdef object struct_for(str fmt):
    """The cached little-endian ``struct.Struct`` of ``fmt`` (no byte-order prefix)."""
    st = _structs.get(fmt)
    if st is None:
        st = _structs[fmt] = struct.Struct("<" + fmt)
    return st
