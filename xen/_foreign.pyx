# cython: language_level=3, embedsignature=True
"""Xen foreign-memory regions: a guest's frames mapped through /dev/xen/privcmd.

Compiled only by a ``XEN=1`` build.  The mapping follows rust-vmm's
``MmapXenForeign`` (vm-memory ``src/mmap/xen.rs``): ``mmap`` a privcmd fd for the
region's whole pages, then ``IOCTL_PRIVCMD_MMAPBATCH_V2`` with the list of the
region's guest frame numbers fills that VMA with the domain's frames.  Unlike
rust-vmm we also read the per-frame error array: with MMAPBATCH_V2 the kernel
returns 0 from the ioctl for most per-frame failures (only paged-out frames give
-ENOENT), so a zero return alone does not prove the region is mapped.

Every system call goes through a :class:`xen.flags.XenSys` object (the real one
is :class:`LinuxXenSys`, the module attribute :data:`SYS`), which tests replace:
no Xen exists on the test machines.

This module also holds :class:`LinuxXenSys` for ``xen._grant``: both modules are
compiled together, and setup.py builds exactly these two.
"""

import logging
import os

cimport cython
from libc.errno cimport errno
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset
from posix.mman cimport (MAP_FAILED, MAP_NORESERVE, MAP_SHARED, PROT_READ, PROT_WRITE, mmap,
                         munmap)
from posix.types cimport off_t

from virtio_queue.memory cimport GuestRegion
from xen._ioctl cimport IOCTL_PRIVCMD_MMAPBATCH_V2, ioctl, privcmd_mmapbatch_v2, xen_pfn_t

from xen.errors import XenMapError
from xen.flags import PRIVCMD_PATH, XenMmapFlags, check_region, device_error

log = logging.getLogger(__name__)

# Mappings made and undone (STYLE.md §3: tests assert they balance).
cdef Py_ssize_t _n_maps = 0
cdef Py_ssize_t _n_unmaps = 0


def debug_counters():
    """Foreign mappings made and unmapped since import."""
    return {"maps": _n_maps, "unmaps": _n_unmaps}


cdef class LinuxXenSys:
    """The real system calls behind the Xen region types (see :class:`xen.flags.XenSys`)."""

    def open(self, str path):
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def close(self, int fd):
        os.close(fd)

    def dup(self, int fd):
        return os.dup(fd)

    def ioctl(self, int fd, unsigned long request, size_t arg):
        cdef int rc
        cdef int err = 0
        # A privcmd batch over a large region can take long in the hypervisor.
        with nogil:
            rc = ioctl(fd, request, <void *>arg)
            if rc < 0:
                err = errno
        if rc < 0:
            raise OSError(err, os.strerror(err))

    def mmap(self, size_t length, int prot, int flags, int fd, uint64_t offset):
        cdef void *p
        cdef int err = 0
        with nogil:
            p = mmap(NULL, length, prot, flags, fd, <off_t>offset)
            if p == MAP_FAILED:
                err = errno
        if p == MAP_FAILED:
            raise OSError(err, os.strerror(err))
        return <size_t>p

    def munmap(self, size_t addr, size_t length):
        if munmap(<void *>addr, length) != 0:
            err = errno
            raise OSError(err, os.strerror(err))


#: The system calls the regions use by default; tests pass their own instead.
SYS = LinuxXenSys()


def ioctl_layout():
    """Request number and field offsets of ``privcmd_mmapbatch_v2`` as compiled,
    for the tests that check them against the uapi ABI."""
    cdef privcmd_mmapbatch_v2 b
    cdef size_t base = <size_t>&b
    return {
        "IOCTL_PRIVCMD_MMAPBATCH_V2": IOCTL_PRIVCMD_MMAPBATCH_V2,
        "privcmd_mmapbatch_v2": sizeof(privcmd_mmapbatch_v2),
        "privcmd_mmapbatch_v2.num": <size_t>&b.num - base,
        "privcmd_mmapbatch_v2.dom": <size_t>&b.dom - base,
        "privcmd_mmapbatch_v2.addr": <size_t>&b.addr - base,
        "privcmd_mmapbatch_v2.arr": <size_t>&b.arr - base,
        "privcmd_mmapbatch_v2.err": <size_t>&b.err - base,
        "xen_pfn_t": sizeof(xen_pfn_t),
    }


cdef object _map_frames(object xs, int fd, uint64_t first_pfn, Py_ssize_t count, size_t map_len,
                        uint32_t domid, int prot):
    """mmap ``map_len`` bytes of the privcmd fd and fill them with the frames
    ``first_pfn..+count`` of ``domid``; return the address.  Undoes the mmap on failure."""
    cdef xen_pfn_t *arr = NULL
    cdef int *err = NULL
    cdef privcmd_mmapbatch_v2 batch
    cdef Py_ssize_t i
    try:
        addr = xs.mmap(map_len, prot, MAP_SHARED | MAP_NORESERVE, fd, 0)
    except OSError as e:
        raise XenMapError(f"mmap of {map_len:#x} bytes of privcmd fd {fd} failed: {e}") from e
    try:
        arr = <xen_pfn_t *>calloc(count, sizeof(xen_pfn_t))
        err = <int *>calloc(count, sizeof(int))
        if arr == NULL or err == NULL:
            raise MemoryError()
        for i in range(count):
            arr[i] = <xen_pfn_t>(first_pfn + <uint64_t>i)
        memset(&batch, 0, sizeof(batch))
        batch.num = <unsigned int>count
        batch.dom = <uint16_t>domid
        batch.addr = <uint64_t><size_t>addr
        batch.arr = arr
        batch.err = err
        try:
            xs.ioctl(fd, IOCTL_PRIVCMD_MMAPBATCH_V2, <size_t>&batch)
        except OSError as e:
            raise XenMapError(
                f"IOCTL_PRIVCMD_MMAPBATCH_V2 for pfns {first_pfn:#x}..+{count:#x} of domain {domid} "
                f"failed: {e}") from e
        bad = [i for i in range(count) if err[i] != 0]
        if bad:
            i = bad[0]
            raise XenMapError(
                f"privcmd could not map pfn {first_pfn + <uint64_t>i:#x} of domain {domid}: "
                f"{os.strerror(-err[i])} ({len(bad)} of {count} pages failed)")
    except BaseException:
        try:
            xs.munmap(addr, map_len)
        except OSError as e:
            log.error("munmap of a failed privcmd mapping at %#x: %s", addr, e)
        raise
    finally:
        free(arr)
        free(err)
    return addr


@cython.no_gc_clear     # __dealloc__ needs _sys: never let the GC clear it first
cdef class XenForeignRegion(GuestRegion):
    """A region of a Xen guest mapped through privcmd (xen mmap flags FOREIGN).

    The whole region is mapped at creation, as FOREIGN requires (rust-vmm's
    ``is_valid``); the mapping is undone when the last reference goes away.
    """
    cdef readonly uint32_t domid
    cdef object _sys
    cdef size_t _xen_addr
    cdef size_t _xen_len

    def __cinit__(self):
        self._sys = None
        self._xen_addr = 0
        self._xen_len = 0

    def __dealloc__(self):
        global _n_unmaps
        if self._xen_len:
            try:
                self._sys.munmap(self._xen_addr, self._xen_len)
            except BaseException as e:   # nothing can be raised from here
                log.error("munmap of Xen foreign region at %#x failed: %s", self._xen_addr, e)
            self._xen_len = 0
            _n_unmaps += 1

    @classmethod
    def map(cls, fd, uint64_t size, uint64_t guest_addr, uint32_t domid, *, bint writable=True,
            xen_sys=None):
        """Map the frames of ``[guest_addr, guest_addr + size)`` of domain ``domid``.

        ``fd`` is a /dev/xen/privcmd fd (what a Xen front-end sends with the region;
        it is not kept) or None to open /dev/xen/privcmd for the call.

        Raises:
            XenMapError: privcmd cannot be opened, the mmap or ioctl failed, a frame
                was refused, or the range breaks the Xen limits (xen.flags.check_region).
        """
        global _n_maps
        cdef XenForeignRegion r
        cdef int prot = PROT_READ | (PROT_WRITE if writable else 0)
        xs = SYS if xen_sys is None else xen_sys
        span = check_region("foreign", guest_addr, size, 0, domid)
        own_fd = fd is None
        if own_fd:
            try:
                fd = xs.open(PRIVCMD_PATH)
            except OSError as e:
                raise device_error(PRIVCMD_PATH, e) from e
        try:
            addr = _map_frames(xs, fd, span.first_pfn, span.count, span.map_len, domid, prot)
        finally:
            # The VMA keeps the privcmd file alive; the fd is not needed any more.
            if own_fd:
                xs.close(fd)
        r = cls.__new__(cls)
        r._sys = xs
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
        return XenMmapFlags.FOREIGN

    @property
    def map_len(self):
        """Length of the host mapping: the region rounded up to whole pages."""
        return self._xen_len
