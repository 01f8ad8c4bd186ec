"""Test helpers for Xen regions: the uapi ABI as expected, and a fake :class:`XenSys`.

No Xen exists on the test machines, so the regions' system calls go to
:class:`FakeXenSys`.  It behaves like the privcmd and gntdev drivers as far as a
caller can see: it checks fds and arguments as the kernel does, decodes every
ioctl structure from the address it is given (as the kernel would copy it in),
writes back what the driver writes (gntdev's ``index``, privcmd's per-frame
errors), and hands out real anonymous shared memory for ``mmap`` so a mapped
region can be read and written through :class:`virtio_queue.GuestMemory`.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
from dataclasses import dataclass, field

from xen.flags import GNTDEV_PATH, PRIVCMD_PATH

__all__ = ["EXPECTED_LAYOUT", "FakeXenSys", "GrantMap", "MmapBatch", "ioc"]

_IOC_NONE = 0  # asm-generic (x86, Arm, RISC-V); powerpc, mips and sparc differ


def ioc(direction: int, kind: str, nr: int, size: int) -> int:
    """Linux's ``_IOC()`` for the asm-generic encoding: dir:2 size:14 type:8 nr:8."""
    return (direction << 30) | (size << 16) | (ord(kind) << 8) | nr


#: The uapi ABI on LP64 asm-generic Linux (x86_64, aarch64, riscv64), written down
#: from include/uapi/xen/privcmd.h and gntdev.h with C's natural alignment:
#: sizes and field offsets in bytes, request numbers from _IOC(_IOC_NONE, ...).
EXPECTED_LAYOUT: dict[str, int] = {
    # struct privcmd_mmapbatch_v2 { u32 num; u16 dom; u64 addr; xen_pfn_t *arr; int *err; }
    "privcmd_mmapbatch_v2": 32,
    "privcmd_mmapbatch_v2.num": 0,
    "privcmd_mmapbatch_v2.dom": 4,
    "privcmd_mmapbatch_v2.addr": 8,
    "privcmd_mmapbatch_v2.arr": 16,
    "privcmd_mmapbatch_v2.err": 24,
    "xen_pfn_t": 8,
    "IOCTL_PRIVCMD_MMAPBATCH_V2": ioc(_IOC_NONE, "P", 4, 32),
    # struct ioctl_gntdev_grant_ref { u32 domid; u32 ref; }
    "ioctl_gntdev_grant_ref": 8,
    # struct ioctl_gntdev_map_grant_ref { u32 count; u32 pad; u64 index; refs[1]; }
    "ioctl_gntdev_map_grant_ref": 24,
    "ioctl_gntdev_map_grant_ref.count": 0,
    "ioctl_gntdev_map_grant_ref.index": 8,
    "ioctl_gntdev_map_grant_ref.refs": 16,
    "IOCTL_GNTDEV_MAP_GRANT_REF": ioc(_IOC_NONE, "G", 0, 24),
    # struct ioctl_gntdev_unmap_grant_ref { u64 index; u32 count; u32 pad; }
    "ioctl_gntdev_unmap_grant_ref": 16,
    "ioctl_gntdev_unmap_grant_ref.index": 0,
    "ioctl_gntdev_unmap_grant_ref.count": 8,
    "IOCTL_GNTDEV_UNMAP_GRANT_REF": ioc(_IOC_NONE, "G", 1, 16),
}

_PRIVCMD_REQ = EXPECTED_LAYOUT["IOCTL_PRIVCMD_MMAPBATCH_V2"]
_MAP_REQ = EXPECTED_LAYOUT["IOCTL_GNTDEV_MAP_GRANT_REF"]
_UNMAP_REQ = EXPECTED_LAYOUT["IOCTL_GNTDEV_UNMAP_GRANT_REF"]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


@dataclass(frozen=True)
class MmapBatch:
    """One IOCTL_PRIVCMD_MMAPBATCH_V2 as the driver received it."""

    fd: int
    num: int
    dom: int
    addr: int
    pfns: tuple[int, ...]


@dataclass(frozen=True)
class GrantMap:
    """One IOCTL_GNTDEV_MAP_GRANT_REF: its ``(domid, ref)`` pairs and the index given."""

    fd: int
    refs: tuple[tuple[int, int], ...]
    index: int


def _err(code: int, what: str = "") -> OSError:
    return OSError(code, os.strerror(code), *((what,) if what else ()))


@dataclass
class FakeXenSys:
    """A stand-in for /dev/xen/privcmd and /dev/xen/gntdev (see the module docstring).

    ``missing``: device paths that do not exist.  ``fail``: a method name
    (``"open"``, ``"dup"``, ``"mmap"``, ``"munmap"``) or an ioctl request number
    mapped to the OSError that call raises.  ``page_errors``: pfn → negative errno
    that privcmd reports for that frame (the ioctl itself returns 0, as the kernel
    does for non-paging errors).
    """

    missing: set[str] = field(default_factory=set)
    fail: dict[str | int, OSError] = field(default_factory=dict)
    page_errors: dict[int, int] = field(default_factory=dict)
    page_size: int = mmap.PAGESIZE
    #: Every call, in order: (method, args...).
    calls: list[tuple[object, ...]] = field(default_factory=list)
    #: Open fake fds → the device path they were opened on.
    open_fds: dict[int, str] = field(default_factory=dict)
    #: Live mappings: address → (length, fd, offset).
    mappings: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    batches: list[MmapBatch] = field(default_factory=list)
    grant_maps: list[GrantMap] = field(default_factory=list)
    #: (index, count) of each IOCTL_GNTDEV_UNMAP_GRANT_REF.
    grant_unmaps: list[tuple[int, int]] = field(default_factory=list)
    #: Grant reservations not unmapped yet: index → count.
    live_grants: dict[int, int] = field(default_factory=dict)
    #: Treat fds this fake did not open as fds of this device node (the fds a
    #: front-end sends with its regions); None refuses them with EBADF.
    foreign_fds_are: str | None = None
    _next_fd: int = 1000
    _next_index: int = 0

    def _maybe_fail(self, key: str | int) -> None:
        if key in self.fail:
            raise self.fail[key]

    def _device(self, fd: int) -> str:
        if fd not in self.open_fds and self.foreign_fds_are is not None and fd >= 0:
            # A real fd that arrived over a socket (a front-end's privcmd/gntdev fd).
            return self.foreign_fds_are
        if fd not in self.open_fds:
            raise _err(errno.EBADF)
        return self.open_fds[fd]

    def open(self, path: str) -> int:
        self.calls.append(("open", path))
        self._maybe_fail("open")
        if path in self.missing or path not in (PRIVCMD_PATH, GNTDEV_PATH):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        fd = self._next_fd
        self._next_fd += 1
        self.open_fds[fd] = path
        return fd

    def close(self, fd: int) -> None:
        self.calls.append(("close", fd))
        self._device(fd)
        del self.open_fds[fd]

    def dup(self, fd: int) -> int:
        self.calls.append(("dup", fd))
        self._maybe_fail("dup")
        path = self._device(fd)
        new = self._next_fd
        self._next_fd += 1
        self.open_fds[new] = path
        return new

    def mmap(self, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
        self.calls.append(("mmap", length, prot, flags, fd, offset))
        self._maybe_fail("mmap")
        path = self._device(fd)
        if not flags & mmap.MAP_SHARED or length <= 0 or length % self.page_size:
            raise _err(errno.EINVAL)
        if path == PRIVCMD_PATH and offset != 0:
            raise _err(errno.EINVAL)
        if path == GNTDEV_PATH:
            # gntdev maps only a whole reservation, at the index MAP_GRANT_REF gave.
            count = self.live_grants.get(offset)
            if count is None or count * self.page_size != length:
                raise _err(errno.EINVAL)
        addr = _libc.mmap(
            None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS, -1, 0
        )
        if addr is None or addr == _MAP_FAILED:
            raise _err(ctypes.get_errno())
        self.mappings[addr] = (length, fd, offset)
        return int(addr)

    def munmap(self, addr: int, length: int) -> None:
        self.calls.append(("munmap", addr, length))
        self._maybe_fail("munmap")
        if self.mappings.get(addr, (None,))[0] != length:
            raise _err(errno.EINVAL)
        del self.mappings[addr]
        if _libc.munmap(addr, length) != 0:
            raise _err(ctypes.get_errno())

    def ioctl(self, fd: int, request: int, arg: int) -> None:
        self.calls.append(("ioctl", fd, request))
        self._maybe_fail(request)
        path = self._device(fd)
        if request == _PRIVCMD_REQ and path == PRIVCMD_PATH:
            self._mmapbatch_v2(fd, arg)
        elif request == _MAP_REQ and path == GNTDEV_PATH:
            self._map_grant_ref(fd, arg)
        elif request == _UNMAP_REQ and path == GNTDEV_PATH:
            index, count, _pad = struct.unpack("<QII", ctypes.string_at(arg, 16))
            self.grant_unmaps.append((index, count))
            if self.live_grants.get(index) != count:
                raise _err(errno.EINVAL)
            if any(
                off == index
                for _len, mfd, off in self.mappings.values()
                if self.open_fds.get(mfd) == GNTDEV_PATH
            ):
                # Still mapped: the driver defers the unmap; a correct caller munmaps first.
                raise _err(errno.EBUSY)
            del self.live_grants[index]
        else:
            raise _err(errno.ENOTTY)

    def _mmapbatch_v2(self, fd: int, arg: int) -> None:
        num, dom, addr, arr, err = struct.unpack("<IH2xQQQ", ctypes.string_at(arg, 32))
        pfns = struct.unpack(f"<{num}Q", ctypes.string_at(arr, 8 * num)) if num else ()
        self.batches.append(MmapBatch(fd, num, dom, addr, pfns))
        # As privcmd: the range must be exactly one VMA of this fd.
        mapping = self.mappings.get(addr)
        if mapping is None or mapping[1] != fd or mapping[0] != num * self.page_size:
            raise _err(errno.EINVAL)
        for i, pfn in enumerate(pfns):
            if pfn in self.page_errors:
                ctypes.c_int.from_address(err + 4 * i).value = self.page_errors[pfn]

    def _map_grant_ref(self, fd: int, arg: int) -> None:
        count, _pad, _index = struct.unpack("<IIQ", ctypes.string_at(arg, 16))
        words = struct.unpack(f"<{2 * count}I", ctypes.string_at(arg + 16, 8 * count))
        refs = tuple(zip(words[0::2], words[1::2], strict=True))
        index = self._next_index
        self._next_index += count * self.page_size
        ctypes.c_uint64.from_address(arg + 8).value = index
        self.live_grants[index] = count
        self.grant_maps.append(GrantMap(fd, refs, index))
