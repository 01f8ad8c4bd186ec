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
from libc.string cimport memcpy
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


cdef unsigned char *gm_ptr(GuestMemory m, uint64_t gpa, uint64_t length, bint write) except NULL:
    """Checked translation for the Python-level helpers; raises GuestMemoryError."""
    cdef MemEntry *e = snap_entry(m.snap, gpa, length)
    if e == NULL:
        if gpa + length < gpa and length:
            raise GuestMemoryError(f"guest range [{gpa:#x}, +{length:#x}) overflows")
        raise GuestMemoryError(
            f"guest range [{gpa:#x}, +{length:#x}) is not inside one mapped region")
    if write and not e.writable:
        raise GuestMemoryError(f"guest range [{gpa:#x}, +{length:#x}) is read-only")
    return e.hva + (gpa - e.gpa)


cdef class GuestMemory:
    """An ordered, non-overlapping set of :class:`GuestRegion` s.

    Every change (:meth:`add_region`, :meth:`remove_region`, :meth:`clear`) bumps
    :attr:`generation`, which queues use to re-translate their ring addresses.
    Translation of ``[gpa, gpa+len)`` is overflow-checked and never crosses regions.
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
        """Whether ``[gpa, gpa+length)`` lies inside one region."""
        return snap_entry(self.snap, gpa, length) != NULL

    def translate(self, uint64_t gpa, uint64_t length):
        """The host address of ``[gpa, gpa+length)``.

        Raises:
            GuestMemoryError: unmapped, overflowing, or crossing a region boundary.
        """
        return <size_t>gm_ptr(self, gpa, length, False)

    def read(self, uint64_t gpa, Py_ssize_t length):
        """Copy ``length`` bytes out of guest memory."""
        if length < 0:
            raise ValueError("negative length")
        cdef unsigned char *p = gm_ptr(self, gpa, <uint64_t>length, False)
        out = PyBytes_FromStringAndSize(NULL, length)
        vq_copy(PyBytes_AS_STRING(out), p, <size_t>length)
        return out

    def readinto(self, uint64_t gpa, buffer):
        """Fill ``buffer`` from guest memory at ``gpa``."""
        cdef Py_buffer view
        PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE)
        try:
            vq_copy(view.buf, gm_ptr(self, gpa, <uint64_t>view.len, False), <size_t>view.len)
        finally:
            PyBuffer_Release(&view)

    def write(self, uint64_t gpa, data):
        """Copy ``data`` (any bytes-like object) into guest memory at ``gpa``."""
        cdef Py_buffer view
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            vq_copy(gm_ptr(self, gpa, <uint64_t>view.len, True), view.buf, <size_t>view.len)
        finally:
            PyBuffer_Release(&view)

    # Little-endian scalars: what the rings and most virtio structures are made of.
    def read_u8(self, uint64_t gpa):
        return (<uint8_t *>gm_ptr(self, gpa, 1, False))[0]

    def read_u16(self, uint64_t gpa):
        cdef uint16_t v
        memcpy(&v, gm_ptr(self, gpa, 2, False), 2)
        return le16toh(v)

    def read_u32(self, uint64_t gpa):
        cdef uint32_t v
        memcpy(&v, gm_ptr(self, gpa, 4, False), 4)
        return le32toh(v)

    def read_u64(self, uint64_t gpa):
        cdef uint64_t v
        memcpy(&v, gm_ptr(self, gpa, 8, False), 8)
        return le64toh(v)

    def write_u8(self, uint64_t gpa, uint8_t value):
        (<uint8_t *>gm_ptr(self, gpa, 1, True))[0] = value

    def write_u16(self, uint64_t gpa, uint16_t value):
        cdef uint16_t v = htole16(value)
        memcpy(gm_ptr(self, gpa, 2, True), &v, 2)

    def write_u32(self, uint64_t gpa, uint32_t value):
        cdef uint32_t v = htole32(value)
        memcpy(gm_ptr(self, gpa, 4, True), &v, 4)

    def write_u64(self, uint64_t gpa, uint64_t value):
        cdef uint64_t v = htole64(value)
        memcpy(gm_ptr(self, gpa, 8, True), &v, 8)

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
