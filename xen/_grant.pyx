# cython: language_level=3, embedsignature=True
"""Xen grant regions: pages a guest granted us, mapped through /dev/xen/gntdev.

Compiled only by a ``XEN=1`` build.  The mapping follows rust-vmm's
``MmapXenGrant`` (vm-memory ``src/mmap/xen.rs``): ``IOCTL_GNTDEV_MAP_GRANT_REF``
with one ``{domid, ref}`` per page (the references are the region's page numbers
without :data:`xen.flags.XEN_GRANT_ADDR_OFF`) makes the driver reserve them and
return an offset, ``index``; ``mmap`` of the gntdev fd at that offset maps them.
Teardown is the reverse: ``munmap``, then ``IOCTL_GNTDEV_UNMAP_GRANT_REF``.

The region keeps its own gntdev fd (a ``dup`` of the one passed, or one it opened)
because the unmap ioctl needs it when the region dies.  Only advance mapping is
done: NO_ADVANCE_MAP regions are refused by :func:`xen.map_region`.
"""

import logging

cimport cython
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from posix.mman cimport MAP_NORESERVE, MAP_SHARED, PROT_READ, PROT_WRITE

from virtio_queue.memory cimport GuestRegion
from xen._ioctl cimport (IOCTL_GNTDEV_MAP_GRANT_REF, IOCTL_GNTDEV_UNMAP_GRANT_REF,
                         ioctl_gntdev_grant_ref, ioctl_gntdev_map_grant_ref,
                         ioctl_gntdev_unmap_grant_ref)

from xen._foreign import SYS
from xen.errors import XenMapError
from xen.flags import GNTDEV_PATH, XenMmapFlags, check_region, device_error, grant_ref_base

log = logging.getLogger(__name__)

# Mappings and grant reservations made and undone (STYLE.md §3).
cdef Py_ssize_t _n_maps = 0
cdef Py_ssize_t _n_unmaps = 0
cdef Py_ssize_t _n_grant_maps = 0
cdef Py_ssize_t _n_grant_unmaps = 0


def debug_counters():
    """Grant mmaps and MAP/UNMAP_GRANT_REF ioctls done since import."""
    return {"maps": _n_maps, "unmaps": _n_unmaps,
            "grant_maps": _n_grant_maps, "grant_unmaps": _n_grant_unmaps}


def ioctl_layout():
    """Request numbers and field offsets of the gntdev structures as compiled, for
    the tests that check them against the uapi ABI."""
    cdef ioctl_gntdev_map_grant_ref m
    cdef ioctl_gntdev_unmap_grant_ref u
    cdef size_t mb = <size_t>&m
    cdef size_t ub = <size_t>&u
    return {
        "IOCTL_GNTDEV_MAP_GRANT_REF": IOCTL_GNTDEV_MAP_GRANT_REF,
        "IOCTL_GNTDEV_UNMAP_GRANT_REF": IOCTL_GNTDEV_UNMAP_GRANT_REF,
        "ioctl_gntdev_grant_ref": sizeof(ioctl_gntdev_grant_ref),
        "ioctl_gntdev_map_grant_ref": sizeof(ioctl_gntdev_map_grant_ref),
        "ioctl_gntdev_map_grant_ref.count": <size_t>&m.count - mb,
        "ioctl_gntdev_map_grant_ref.index": <size_t>&m.index - mb,
        "ioctl_gntdev_map_grant_ref.refs": <size_t>&m.refs - mb,
        "ioctl_gntdev_unmap_grant_ref": sizeof(ioctl_gntdev_unmap_grant_ref),
        "ioctl_gntdev_unmap_grant_ref.index": <size_t>&u.index - ub,
        "ioctl_gntdev_unmap_grant_ref.count": <size_t>&u.count - ub,
    }


cdef object _map_grant_refs(object xs, int fd, uint32_t domid, uint64_t base_ref, Py_ssize_t count):
    """IOCTL_GNTDEV_MAP_GRANT_REF for references ``base_ref..+count``; returns the
    mmap offset the driver chose."""
    cdef ioctl_gntdev_map_grant_ref *m
    cdef Py_ssize_t i
    # refs is declared refs[1]: the structure already holds one reference.
    cdef size_t nbytes = sizeof(ioctl_gntdev_map_grant_ref) + \
        <size_t>(count - 1) * sizeof(ioctl_gntdev_grant_ref)
    m = <ioctl_gntdev_map_grant_ref *>calloc(1, nbytes)
    if m == NULL:
        raise MemoryError()
    try:
        m.count = <uint32_t>count
        for i in range(count):
            m.refs[i].domid = domid
            m.refs[i].ref = <uint32_t>(base_ref + <uint64_t>i)
        try:
            xs.ioctl(fd, IOCTL_GNTDEV_MAP_GRANT_REF, <size_t>m)
        except OSError as e:
            raise XenMapError(
                f"IOCTL_GNTDEV_MAP_GRANT_REF for grant refs {base_ref:#x}..+{count:#x} of domain "
                f"{domid} failed: {e}") from e
        return m.index
    finally:
        free(m)


cdef int _unmap_grant_refs(object xs, int fd, uint64_t index, uint32_t count) except -1:
    global _n_grant_unmaps
    cdef ioctl_gntdev_unmap_grant_ref u
    u.index = index
    u.count = count
    u.pad = 0
    _n_grant_unmaps += 1
    xs.ioctl(fd, IOCTL_GNTDEV_UNMAP_GRANT_REF, <size_t>&u)
    return 0


@cython.no_gc_clear     # __dealloc__ needs _sys: never let the GC clear it first
cdef class XenGrantRegion(GuestRegion):
    """A region of granted pages mapped through gntdev (xen mmap flags GRANT).

    ``guest_addr`` is the address the guest uses (with XEN_GRANT_ADDR_OFF set, as
    grant DMA addresses are); ``index`` is the gntdev offset of the mapping.
    """
    cdef readonly uint32_t domid
    cdef readonly uint64_t index
    cdef object _sys
    cdef int _fd
    cdef uint32_t _count
    cdef size_t _xen_addr
    cdef size_t _xen_len

    def __cinit__(self):
        self._sys = None
        self._fd = -1
        self._count = 0
        self._xen_addr = 0
        self._xen_len = 0

    def __dealloc__(self):
        global _n_unmaps
        # As rust-vmm's unmap_range: the VMA goes first, then the grant reservation.
        if self._xen_len:
            try:
                self._sys.munmap(self._xen_addr, self._xen_len)
            except BaseException as e:   # nothing can be raised from here
                log.error("munmap of Xen grant region at %#x failed: %s", self._xen_addr, e)
            self._xen_len = 0
            _n_unmaps += 1
        if self._count:
            try:
                _unmap_grant_refs(self._sys, self._fd, self.index, self._count)
            except BaseException as e:
                log.error("IOCTL_GNTDEV_UNMAP_GRANT_REF (index %#x) failed: %s", self.index, e)
            self._count = 0
        if self._fd >= 0:
            try:
                self._sys.close(self._fd)
            except BaseException as e:
                log.error("close of gntdev fd %d failed: %s", self._fd, e)
            self._fd = -1

    @classmethod
    def map(cls, fd, uint64_t size, uint64_t guest_addr, uint32_t domid, *, bint writable=True,
            xen_sys=None):
        """Map the pages domain ``domid`` granted for ``[guest_addr, guest_addr + size)``.

        ``fd`` is a /dev/xen/gntdev fd (duplicated: the caller keeps its own) or None
        to open /dev/xen/gntdev.

        Raises:
            XenMapError: gntdev cannot be opened, the ioctl or mmap failed, or the
                range breaks the Xen limits (xen.flags.check_region).
        """
        global _n_maps, _n_grant_maps
        cdef XenGrantRegion r
        cdef int prot = PROT_READ | (PROT_WRITE if writable else 0)
        xs = SYS if xen_sys is None else xen_sys
        span = check_region("grant", guest_addr, size, 0, domid)
        try:
            gfd = xs.open(GNTDEV_PATH) if fd is None else xs.dup(fd)
        except OSError as e:
            if fd is None:
                raise device_error(GNTDEV_PATH, e) from e
            raise XenMapError(f"cannot duplicate gntdev fd {fd}: {e}") from e
        try:
            index = _map_grant_refs(xs, gfd, domid, grant_ref_base(guest_addr), span.count)
            _n_grant_maps += 1
            try:
                addr = xs.mmap(span.map_len, prot, MAP_SHARED | MAP_NORESERVE, gfd, index)
            except OSError as e:
                try:
                    _unmap_grant_refs(xs, gfd, index, span.count)
                except OSError as e2:
                    log.error("IOCTL_GNTDEV_UNMAP_GRANT_REF after a failed mmap: %s", e2)
                raise XenMapError(
                    f"mmap of {span.map_len:#x} bytes of gntdev at index {index:#x} failed: {e}") from e
        except BaseException:
            xs.close(gfd)
            raise
        r = cls.__new__(cls)
        r._sys = xs
        r._fd = gfd
        r._count = span.count
        r.index = index
        r._xen_addr = <size_t>addr
        r._xen_len = <size_t>span.map_len
        r.hva = <unsigned char *><size_t>addr
        r.guest_addr = guest_addr
        r.size = size
        r._writable = writable
        r.domid = domid
        _n_maps += 1
        return r

    @property
    def xen_mmap_flags(self):
        return XenMmapFlags.GRANT

    @property
    def map_len(self):
        """Length of the host mapping: the region rounded up to whole pages."""
        return self._xen_len
