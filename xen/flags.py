"""Xen mmap flags, the Xen memory region description, and :func:`map_region`.

Pure Python, installed and tested in every build.  The flag values and rules are
rust-vmm's (``vm-memory`` ``src/mmap/xen.rs``, ``MmapXenFlags``), which the Rust
daemons and the Xen front-ends (xen-vhost-frontend) interoperate with.

vhost-user (QEMU ``docs/interop/vhost-user.rst``, "Memory region description"):
once ``VHOST_USER_PROTOCOL_F_XEN_MMAP`` (bit 17) is negotiated, every memory
region description carries two more fields, ``xen mmap flags`` (u32) and
``domid`` (u32), after ``mmap offset``.

One known discrepancy: the spec text calls the "cannot be mapped in advance"
flag *bit 8* (0x100), while rust-vmm defines ``NO_ADVANCE_MAP = 0x8`` (bit 3).
We follow rust-vmm, the implementation front-ends are tested against, and refuse
0x100 with a message that names the discrepancy rather than guessing.
"""

from __future__ import annotations

import enum
import errno
import mmap
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import virtio_queue
from virtio_queue import layouts
from xen.errors import InvalidXenFlags, XenMapError

if TYPE_CHECKING:
    from virtio_queue import GuestRegion

__all__ = [
    "DOMID_MAX",
    "GNTDEV_PATH",
    "KNOWN_FLAGS",
    "MEMORY_REGION",
    "PRIVCMD_PATH",
    "SPEC_NO_ADVANCE_MAP_BIT8",
    "VHOST_USER_PROTOCOL_F_XEN_MMAP",
    "XEN_GRANT_ADDR_OFF",
    "XEN_MEMORY_REGION",
    "MappingKind",
    "PageSpan",
    "XenMemoryRegion",
    "XenMmapFlags",
    "XenSys",
    "check_region",
    "device_error",
    "grant_ref_base",
    "map_region",
    "mapping_kind",
    "mmap_in_advance",
    "page_span",
    "validate_flags",
]

#: vhost-user protocol feature bit: region descriptions carry Xen mmap fields.
VHOST_USER_PROTOCOL_F_XEN_MMAP = 17

#: Device nodes of the Linux Xen drivers (xen-privcmd, xen-gntdev).
PRIVCMD_PATH = "/dev/xen/privcmd"
GNTDEV_PATH = "/dev/xen/gntdev"

#: Grant-mapped guest addresses carry this bit (rust-vmm's XEN_GRANT_ADDR_OFF); the
#: grant reference is the page number of the address without it.
XEN_GRANT_ADDR_OFF = 1 << 63

#: Xen's domid_t is 16 bits (the privcmd ioctl takes a u16): a larger domid from the
#: u32 descriptor field would be silently truncated, so it is refused instead.
DOMID_MAX = 0xFFFF

#: The spec's "bit 8" no-advance-map flag, which rust-vmm does not use (see above).
SPEC_NO_ADVANCE_MAP_BIT8 = 0x100


class XenMmapFlags(enum.IntFlag):
    """The ``xen mmap flags`` of a region description (rust-vmm ``MmapXenFlags``)."""

    #: Standard Unix mapping of the region's fd (the value with no bit set).
    UNIX = 0x0
    #: Xen foreign memory, mapped through /dev/xen/privcmd.
    FOREIGN = 0x1
    #: Xen grant memory, mapped through /dev/xen/gntdev.
    GRANT = 0x2
    #: The region must not be mapped in advance (only pieces, on demand).
    NO_ADVANCE_MAP = 0x8


KNOWN_FLAGS = XenMmapFlags.FOREIGN | XenMmapFlags.GRANT | XenMmapFlags.NO_ADVANCE_MAP

MappingKind = Literal["unix", "foreign", "grant"]

#: The vhost-user memory region description (guest address, size, user address,
#: mmap offset), little-endian, 32 bytes.  Both layouts are declared once, as packed
#: structs in virtio_queue/layouts.pxd: the layer xen plugs into, which
#: vhost_backends' wire format uses too (xen never imports vhost_backends).
MEMORY_REGION: struct.Struct = layouts.MEMORY_REGION.struct
#: The same with ``xen mmap flags`` and ``domid`` appended (F_XEN_MMAP), 40 bytes.
XEN_MEMORY_REGION: struct.Struct = layouts.XEN_MEMORY_REGION.struct


def validate_flags(flags: int) -> XenMmapFlags:
    """Check ``xen mmap flags`` as rust-vmm's ``MmapXenFlags::is_valid`` does.

    Exactly one of unix (no bit), FOREIGN or GRANT; FOREIGN and UNIX must be mapped
    in advance (NO_ADVANCE_MAP clear); GRANT may carry NO_ADVANCE_MAP.

    Raises:
        InvalidXenFlags: unknown bits, FOREIGN with GRANT, FOREIGN or UNIX with
            NO_ADVANCE_MAP; the message names the rule and the value.
    """
    if not 0 <= flags <= 0xFFFFFFFF:
        raise InvalidXenFlags(f"xen mmap flags {flags:#x} do not fit the 32-bit field")
    unknown = flags & ~int(KNOWN_FLAGS)
    if unknown & SPEC_NO_ADVANCE_MAP_BIT8:
        raise InvalidXenFlags(
            f"xen mmap flags {flags:#x}: bit 8 (0x100) is the vhost-user spec's 'cannot be mapped "
            "in advance' bit, but rust-vmm and this implementation use NO_ADVANCE_MAP = 0x8"
        )
    if unknown:
        raise InvalidXenFlags(f"xen mmap flags {flags:#x}: unknown bits {unknown:#x}")
    f = XenMmapFlags(flags)
    if XenMmapFlags.GRANT in f and XenMmapFlags.FOREIGN in f:
        raise InvalidXenFlags(f"xen mmap flags {flags:#x}: FOREIGN and GRANT are exclusive")
    if XenMmapFlags.FOREIGN in f and XenMmapFlags.NO_ADVANCE_MAP in f:
        raise InvalidXenFlags(
            f"xen mmap flags {flags:#x}: a FOREIGN region must be mapped in advance (NO_ADVANCE_MAP set)"
        )
    if f == XenMmapFlags.NO_ADVANCE_MAP:
        raise InvalidXenFlags(
            f"xen mmap flags {flags:#x}: a UNIX region must be mapped in advance (NO_ADVANCE_MAP set)"
        )
    return f


def mapping_kind(flags: int) -> MappingKind:
    """Which mapping valid ``flags`` ask for.  Raises InvalidXenFlags if invalid."""
    f = validate_flags(flags)
    if XenMmapFlags.FOREIGN in f:
        return "foreign"
    if XenMmapFlags.GRANT in f:
        return "grant"
    return "unix"


def mmap_in_advance(flags: int) -> bool:
    """Whether the whole region may be mapped at once (NO_ADVANCE_MAP clear)."""
    return XenMmapFlags.NO_ADVANCE_MAP not in validate_flags(flags)


@dataclass(frozen=True)
class PageSpan:
    """The whole pages a Xen mapping covers: pfn of the first, their number, and the
    length of the host mapping (``count * page_size``, at least ``size``)."""

    first_pfn: int
    count: int
    map_len: int

    @property
    def pfns(self) -> range:
        """The guest frame numbers, in order: what privcmd's MMAPBATCH_V2 gets."""
        return range(self.first_pfn, self.first_pfn + self.count)


def page_span(guest_addr: int, size: int, page_size: int = mmap.PAGESIZE) -> PageSpan:
    """The pages of ``[guest_addr, guest_addr + size)`` for a region starting on a page.

    As rust-vmm, the count rounds ``size`` up to whole pages.

    Raises:
        XenMapError: zero size, or ``guest_addr`` not page aligned (the host mapping
            starts on a page, so an offset inside it would shift every address).
    """
    if size <= 0:
        raise XenMapError("a Xen memory region cannot be empty")
    if guest_addr % page_size:
        raise XenMapError(
            f"Xen region guest address {guest_addr:#x} is not page aligned (page size {page_size:#x})"
        )
    count = -(-size // page_size)
    return PageSpan(guest_addr // page_size, count, count * page_size)


def grant_ref_base(guest_addr: int, page_size: int = mmap.PAGESIZE) -> int:
    """The first grant reference of a grant region: its page number without
    :data:`XEN_GRANT_ADDR_OFF` (rust-vmm ``MmapXenGrant::mmap_ioctl``)."""
    return (guest_addr & ~XEN_GRANT_ADDR_OFF) // page_size


def check_region(
    kind: MappingKind,
    guest_addr: int,
    size: int,
    mmap_offset: int,
    domid: int,
    *,
    page_size: int = mmap.PAGESIZE,
) -> PageSpan:
    """Check a foreign or grant region against the limits of the Xen interfaces.

    Raises:
        XenMapError: the range overflows 2^64, is empty or unaligned, ``mmap_offset``
            is not 0 (privcmd and gntdev map from offset 0 / the ioctl's index, as
            rust-vmm's ``validate_file`` requires), ``domid`` does not fit domid_t,
            or a grant region's references do not fit 32 bits.
    """
    if guest_addr < 0 or size < 0 or guest_addr + size > 1 << 64:
        raise XenMapError(f"Xen region [{guest_addr:#x}, +{size:#x}) overflows the address space")
    span = page_span(guest_addr, size, page_size)
    if span.count > 0xFFFFFFFF:
        raise XenMapError(f"Xen region of {span.count:#x} pages is over the 32-bit page count of the ioctls")
    if mmap_offset != 0:
        raise XenMapError(f"a Xen {kind} region must have mmap offset 0 (got {mmap_offset:#x})")
    if not 0 <= domid <= DOMID_MAX:
        raise XenMapError(f"domid {domid:#x} does not fit Xen's 16-bit domid_t")
    if kind == "grant":
        base = grant_ref_base(guest_addr, page_size)
        if base + span.count - 1 > 0xFFFFFFFF:
            raise XenMapError(
                f"grant references {base:#x}..+{span.count:#x} of region {guest_addr:#x} do not fit 32 bits"
            )
    return span


@dataclass(frozen=True)
class XenMemoryRegion:
    """One vhost-user memory region description with the F_XEN_MMAP fields."""

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int
    xen_mmap_flags: int
    domid: int

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> XenMemoryRegion:
        """Parse exactly one 40-byte description.

        Raises:
            XenMapError: wrong length (a front-end that did not switch layouts).
        """
        if len(data) != XEN_MEMORY_REGION.size:
            raise XenMapError(
                f"a Xen memory region description is {XEN_MEMORY_REGION.size} bytes, got {len(data)}"
            )
        return cls(*XEN_MEMORY_REGION.unpack(data))

    def pack(self) -> bytes:
        return XEN_MEMORY_REGION.pack(
            self.guest_addr, self.size, self.user_addr, self.mmap_offset, self.xen_mmap_flags, self.domid
        )

    @property
    def flags(self) -> XenMmapFlags:
        """The validated flags.  Raises InvalidXenFlags."""
        return validate_flags(self.xen_mmap_flags)

    def validate(self) -> MappingKind:
        """Check the flags and, for foreign/grant, the Xen limits; return the kind.

        Raises:
            InvalidXenFlags: bad flags.
            XenMapError: see :func:`check_region`.
        """
        kind = mapping_kind(self.xen_mmap_flags)
        if kind != "unix":
            check_region(kind, self.guest_addr, self.size, self.mmap_offset, self.domid)
        return kind


class XenSys(Protocol):
    """The system calls under the Xen region types: the seam tests replace.

    The real one is ``xen._foreign.LinuxXenSys``; :class:`xen.testing.FakeXenSys`
    records calls and decodes the ioctl structures.  Every method raises
    :class:`OSError` on failure.  ``arg`` of :meth:`ioctl` is the address of the
    argument structure; :meth:`mmap` returns the address of the mapping.
    """

    def open(self, path: str) -> int: ...
    def close(self, fd: int) -> None: ...
    def dup(self, fd: int) -> int: ...
    def ioctl(self, fd: int, request: int, arg: int) -> None: ...
    def mmap(self, length: int, prot: int, flags: int, fd: int, offset: int) -> int: ...
    def munmap(self, addr: int, length: int) -> None: ...


def _built_with_xen() -> bool:
    return bool(virtio_queue.BUILT_WITH_XEN)


def map_region(  # noqa: PLR0917 - the fields of a region description, in order
    fd: int | None,
    size: int,
    guest_addr: int,
    mmap_offset: int,
    flags: int,
    domid: int,
    *,
    writable: bool = True,
    xen_sys: XenSys | None = None,
) -> GuestRegion:
    """Map one region of a Xen guest, as the ``xen mmap flags`` ask.

    - FOREIGN: ``fd`` is a /dev/xen/privcmd fd (what a Xen front-end sends with the
      region); None opens /dev/xen/privcmd.  The fd is not kept.
    - GRANT: ``fd`` is a /dev/xen/gntdev fd, duplicated and kept for the unmap
      ioctl; None opens /dev/xen/gntdev.  NO_ADVANCE_MAP is refused (see Raises).
    - UNIX (no bit): a plain ``mmap`` of ``fd`` (:meth:`GuestRegion.from_fd`).

    ``xen_sys`` replaces the system calls (tests); the default is the real ones.

    Raises:
        XenMapError: this is not a ``XEN=1`` build; a missing device node; a failed
            ioctl or mmap; a pfn the hypervisor refused; Xen limits (check_region);
            GRANT with NO_ADVANCE_MAP, whose on-demand mapping per access this
            implementation does not do (every region is mapped whole).
        InvalidXenFlags: bad flags (validate_flags).
    """
    # The flags first: a front-end sending nonsense hears so whatever the build.
    kind = mapping_kind(flags)
    if not _built_with_xen():
        raise XenMapError(
            "Xen memory mapping needs the Xen build of vhost-device-py: rebuild with XEN=1 "
            "(XEN=1 pip install . / XEN=1 python setup.py build_ext --inplace)"
        )
    if kind == "unix":
        if fd is None:
            raise XenMapError("a UNIX-mapped region needs the region's fd")
        return virtio_queue.GuestRegion.from_fd(fd, size, guest_addr, mmap_offset, writable=writable)
    check_region(kind, guest_addr, size, mmap_offset, domid)
    # The region types exist only in a XEN=1 build, hence the imports here.
    if xen_sys is None:
        from xen._foreign import SYS  # noqa: PLC0415

        xen_sys = SYS
    if kind == "foreign":
        from xen._foreign import XenForeignRegion  # noqa: PLC0415

        return XenForeignRegion.map(fd, size, guest_addr, domid, writable=writable, xen_sys=xen_sys)
    if not mmap_in_advance(flags):
        raise XenMapError(
            f"grant region {guest_addr:#x} has NO_ADVANCE_MAP: on-demand grant mapping is not "
            "supported (every region is mapped whole); the front-end must allow advance mapping"
        )
    from xen._grant import XenGrantRegion  # noqa: PLC0415

    return XenGrantRegion.map(fd, size, guest_addr, domid, writable=writable, xen_sys=xen_sys)


def device_error(path: str, err: OSError) -> XenMapError:
    """The error for a Xen device node that cannot be opened, with the likely cause."""
    hint = ""
    if err.errno == errno.ENOENT:
        hint = " (not a Xen dom0/driver domain, or the xen-privcmd/xen-gntdev driver is not loaded)"
    elif err.errno in (errno.EACCES, errno.EPERM):
        hint = " (needs root or access to the device node)"
    return XenMapError(f"cannot open {path}: {os.strerror(err.errno or 0)}{hint}")
