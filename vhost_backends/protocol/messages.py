"""Wire format of vhost-user messages: header, payload structs and their validation.

Layouts are those of QEMU's ``docs/interop/vhost-user.rst`` ("Message
specification"); all fields are little-endian (the spec says host order, and every
host we build for is little-endian; ``<`` also pins the packing).  Parsing uses
precompiled :class:`struct.Struct` objects and ``__slots__`` records, one Python
object per message at most, which keeps a message in the low microseconds.

Every ``unpack`` checks the payload size exactly and every field the spec bounds;
it raises :class:`InvalidMessage` (a :class:`ValueError`) naming the field and the
offending value.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Sequence
from typing import NamedTuple

from virtio_queue import layouts

from .codes import (
    INFLIGHT_ALIGNMENT,
    MAX_ATTACHED_FDS,
    MAX_MSG_SIZE,
    VHOST_USER_CONFIG_SPACE_SIZE,
    VHOST_USER_HEADER_RESERVED,
    VHOST_USER_MAX_CONFIG_SIZE,
    VHOST_USER_VERSION,
    VHOST_USER_VERSION_MASK,
    VHOST_USER_VRING_IDX_MASK,
    VHOST_USER_VRING_NOFD_MASK,
    BackendReq,
    FrontendReq,
    VhostUserHeaderFlag,
)
from .errors import IncorrectFds, InvalidMessage, OversizedMessage

__all__ = [
    "CONFIG_HEADER",
    "DEVICE_STATE_TRANSFER",
    "HEADER",
    "HEADER_SIZE",
    "INFLIGHT",
    "INFLIGHT_DESC",
    "INFLIGHT_QUEUE_HEADER",
    "LOG",
    "MEMORY_REGION",
    "MEMORY_TABLE_HEADER",
    "U64",
    "VRING_ADDR",
    "VRING_STATE",
    "XEN_MEMORY_REGION",
    "ConfigMsg",
    "Header",
    "Inflight",
    "Log",
    "MemoryRegion",
    "VringAddr",
    "VringState",
    "check_fds",
    "close_fds",
    "expected_fds",
    "inflight_queue_size",
    "pack_config",
    "pack_header",
    "pack_memory_table",
    "pack_single_region",
    "pack_u64",
    "parse_header",
    "unpack_config",
    "unpack_inflight",
    "unpack_log",
    "unpack_memory_table",
    "unpack_single_region",
    "unpack_u64",
    "unpack_vring_addr",
    "unpack_vring_fd_index",
    "unpack_vring_state",
]

# -- struct layouts (sizes asserted against the spec in tests) ----------------------
#: request u32, flags u32, size u32.
HEADER = struct.Struct("<III")
HEADER_SIZE = HEADER.size
#: A 64-bit number (features, status, u64 replies, vring fd payloads).
U64 = struct.Struct("<Q")
#: vring state: index u32, num u32.
VRING_STATE = struct.Struct("<II")
#: vring address: index u32, flags u32, descriptor u64, used u64, available u64, log u64.
VRING_ADDR = struct.Struct("<IIQQQQ")
#: memory region: guest address, size, user address, mmap offset (all u64).  Declared
#: once, as a packed struct in virtio_queue/layouts.pxd (xen.flags uses it too).
MEMORY_REGION = layouts.MEMORY_REGION.struct
#: Xen memory region: the four u64 plus xen_mmap_flags u32 and domid u32.
XEN_MEMORY_REGION = layouts.XEN_MEMORY_REGION.struct
#: memory table: num_regions u32, padding u32, then the regions.
MEMORY_TABLE_HEADER = struct.Struct("<II")
#: ADD/REM_MEM_REG: padding u64 then one region.
SINGLE_REGION_PADDING = struct.Struct("<Q")
#: device config space: offset u32, size u32, flags u32, then ``size`` bytes.
CONFIG_HEADER = struct.Struct("<III")
#: inflight description: mmap size u64, mmap offset u64, num queues u16, queue size u16
#: (QEMU's struct is not packed, so 4 bytes of tail padding make it 24).
INFLIGHT = struct.Struct("<QQHH4x")
#: log description: mmap size u64, offset u64.
LOG = struct.Struct("<QQ")
#: SET_DEVICE_STATE_FD: transfer direction u32, migration phase u32.
DEVICE_STATE_TRANSFER = struct.Struct("<II")
#: Inflight split ring ``DescStateSplit``: inflight u8, padding[5], next u16, counter u64
#: (virtio_queue/layouts.pxd, which queue.pyx writes through).
INFLIGHT_DESC = layouts.INFLIGHT_DESC_SPLIT.struct
#: Inflight split ring ``QueueRegionSplit`` head: features u64, version u16,
#: desc_num u16, last_batch_head u16, used_idx u16 (virtio_queue/layouts.pxd).
INFLIGHT_QUEUE_HEADER = layouts.INFLIGHT_QUEUE_REGION_SPLIT.struct

_VERSION_FLAG = VHOST_USER_VERSION
_REPLY = int(VhostUserHeaderFlag.REPLY)
_NEED_REPLY = int(VhostUserHeaderFlag.NEED_REPLY)
_FRONTEND_CODES = frozenset(int(r) for r in FrontendReq)
_BACKEND_CODES = frozenset(int(r) for r in BackendReq)
_U64_MAX = (1 << 64) - 1


# -- records ------------------------------------------------------------------------
# Immutable records as NamedTuples rather than frozen dataclasses: importing
# dataclasses (and with it inspect and ast) lengthens every daemon's start-up.
class Header(NamedTuple):
    """A validated message header."""

    request: int
    flags: int
    size: int

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & _REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & _NEED_REPLY)


class VringState(NamedTuple):
    """SET_VRING_NUM/BASE/ENABLE payload and GET_VRING_BASE reply."""

    index: int  # type: ignore[assignment]  # shadows tuple.index: never used as a sequence
    num: int


class VringAddr(NamedTuple):
    """SET_VRING_ADDR payload: front-end user addresses of the three ring parts."""

    index: int  # type: ignore[assignment]  # shadows tuple.index: never used as a sequence
    flags: int
    descriptor: int
    used: int
    available: int
    log: int


class MemoryRegion(NamedTuple):
    """One memory region descriptor ("Memory regions description").

    ``xen_mmap_flags`` and ``domid`` are only present in the Xen variant
    (XEN_MMAP protocol feature); they are None otherwise.
    """

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int
    xen_mmap_flags: int | None = None
    domid: int | None = None

    def validate(self) -> None:
        """Reject empty regions and ranges that wrap around 2**64.

        Raises:
            InvalidMessage: size is 0, or an end address or offset overflows.
        """
        if self.size == 0:
            raise InvalidMessage(f"memory region at guest 0x{self.guest_addr:x} has size 0")
        for name, start in (
            ("guest address", self.guest_addr),
            ("user address", self.user_addr),
            ("mmap offset", self.mmap_offset),
        ):
            if start + self.size - 1 > _U64_MAX:
                raise InvalidMessage(
                    f"memory region {name} 0x{start:x} + size 0x{self.size:x} overflows 64 bits"
                )

    def pack(self) -> bytes:
        if self.xen_mmap_flags is None:
            return MEMORY_REGION.pack(self.guest_addr, self.size, self.user_addr, self.mmap_offset)
        return XEN_MEMORY_REGION.pack(
            self.guest_addr,
            self.size,
            self.user_addr,
            self.mmap_offset,
            self.xen_mmap_flags,
            self.domid or 0,
        )


class ConfigMsg(NamedTuple):
    """GET_CONFIG / SET_CONFIG payload."""

    offset: int
    size: int
    flags: int
    payload: bytes


class Inflight(NamedTuple):
    """GET/SET_INFLIGHT_FD payload ("Inflight description")."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int

    def pack(self) -> bytes:
        return INFLIGHT.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)


class Log(NamedTuple):
    """SET_LOG_BASE payload ("Log description")."""

    mmap_size: int
    mmap_offset: int


# -- header -------------------------------------------------------------------------
def parse_header(data: bytes | bytearray | memoryview, *, from_frontend: bool = True) -> Header:
    """Decode and validate a 12-byte header ("Header").

    The version bits must be 1, reserved flag bits 0, the request a known code of
    the sender's side, and ``size`` at most :data:`MAX_MSG_SIZE`.

    Raises:
        InvalidMessage: wrong length, version, reserved bits or unknown request.
        OversizedMessage: ``size`` exceeds :data:`MAX_MSG_SIZE`.
    """
    if len(data) != HEADER_SIZE:
        raise InvalidMessage(f"header is {len(data)} bytes, expected {HEADER_SIZE}")
    request, flags, size = HEADER.unpack(data)
    if flags & VHOST_USER_VERSION_MASK != VHOST_USER_VERSION:
        raise InvalidMessage(f"header version {flags & VHOST_USER_VERSION_MASK} is not 1 (flags 0x{flags:x})")
    if flags & VHOST_USER_HEADER_RESERVED:
        raise InvalidMessage(f"header flags 0x{flags:x} set reserved bits")
    codes = _FRONTEND_CODES if from_frontend else _BACKEND_CODES
    if request not in codes:
        raise InvalidMessage(f"unknown request code {request}")
    if size > MAX_MSG_SIZE:
        raise OversizedMessage(f"payload size {size} exceeds the maximum {MAX_MSG_SIZE} (request {request})")
    return Header(request, flags, size)


def pack_header(request: int, size: int, *, reply: bool = False, need_reply: bool = False) -> bytes:
    """Encode a header with version 1 and the given flags."""
    flags = _VERSION_FLAG | (_REPLY if reply else 0) | (_NEED_REPLY if need_reply else 0)
    return HEADER.pack(request, flags, size)


# -- payloads -----------------------------------------------------------------------
def _check_size(what: str, payload: bytes | memoryview, expected: int) -> None:
    if len(payload) != expected:
        raise InvalidMessage(f"{what} payload is {len(payload)} bytes, expected {expected}")


def unpack_u64(payload: bytes | memoryview, what: str = "u64") -> int:
    """A u64 payload (features, status, ...).

    Raises:
        InvalidMessage: the payload is not 8 bytes.
    """
    _check_size(what, payload, U64.size)
    value: int = U64.unpack(payload)[0]
    return value


def pack_u64(value: int) -> bytes:
    return U64.pack(value)


def unpack_vring_state(payload: bytes | memoryview, what: str = "vring state") -> VringState:
    """A ``vring state`` payload.

    Raises:
        InvalidMessage: the payload is not 8 bytes.
    """
    _check_size(what, payload, VRING_STATE.size)
    return VringState(*VRING_STATE.unpack(payload))


def unpack_vring_addr(payload: bytes | memoryview) -> VringAddr:
    """A ``vring address`` payload (SET_VRING_ADDR).

    Raises:
        InvalidMessage: the payload is not 40 bytes, or flags other than LOG are set.
    """
    _check_size("vring address", payload, VRING_ADDR.size)
    addr = VringAddr(*VRING_ADDR.unpack(payload))
    if addr.flags & ~0x1:
        raise InvalidMessage(f"vring {addr.index} address flags 0x{addr.flags:x} set unknown bits")
    return addr


def unpack_vring_fd_index(payload: bytes | memoryview, what: str) -> tuple[int, bool]:
    """SET_VRING_KICK/CALL/ERR payload: ``(index, has_fd)``.

    Bits 0-7 are the index; bit 8 set means no fd is attached (the ring is then
    polled, or notifications are off).  Other bits must be zero.

    Raises:
        InvalidMessage: wrong size or reserved bits set.
    """
    value = unpack_u64(payload, what)
    if value & ~(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK):
        raise InvalidMessage(f"{what} payload 0x{value:x} sets reserved bits")
    return value & VHOST_USER_VRING_IDX_MASK, not value & VHOST_USER_VRING_NOFD_MASK


def _region_struct(xen: bool) -> struct.Struct:
    return XEN_MEMORY_REGION if xen else MEMORY_REGION


def unpack_memory_table(
    payload: bytes | memoryview, *, xen: bool = False, max_regions: int = MAX_ATTACHED_FDS
) -> list[MemoryRegion]:
    """SET_MEM_TABLE payload: ``num_regions``, padding, then that many regions.

    Raises:
        InvalidMessage: zero or too many regions, a size that does not match the
            count, or a region that is empty or overflows.
    """
    if len(payload) < MEMORY_TABLE_HEADER.size:
        raise InvalidMessage(f"memory table payload is {len(payload)} bytes, too short")
    num, _padding = MEMORY_TABLE_HEADER.unpack_from(payload)
    if num == 0 or num > max_regions:
        raise InvalidMessage(f"memory table has {num} regions (1..{max_regions} allowed)")
    rs = _region_struct(xen)
    _check_size("memory table", payload, MEMORY_TABLE_HEADER.size + num * rs.size)
    regions = [
        MemoryRegion(*fields) for fields in rs.iter_unpack(memoryview(payload)[MEMORY_TABLE_HEADER.size :])
    ]
    for r in regions:
        r.validate()
    return regions


def pack_memory_table(regions: Sequence[MemoryRegion]) -> bytes:
    return MEMORY_TABLE_HEADER.pack(len(regions), 0) + b"".join(r.pack() for r in regions)


def unpack_single_region(payload: bytes | memoryview, *, xen: bool = False) -> MemoryRegion:
    """ADD_MEM_REG / REM_MEM_REG payload: padding u64 then one region.

    Raises:
        InvalidMessage: wrong size, or a region that is empty or overflows.
    """
    rs = _region_struct(xen)
    _check_size("single memory region", payload, SINGLE_REGION_PADDING.size + rs.size)
    region = MemoryRegion(*rs.unpack_from(payload, SINGLE_REGION_PADDING.size))
    region.validate()
    return region


def pack_single_region(region: MemoryRegion) -> bytes:
    return SINGLE_REGION_PADDING.pack(0) + region.pack()


def unpack_config(payload: bytes | memoryview) -> ConfigMsg:
    """GET_CONFIG / SET_CONFIG payload ("Device config space").

    Raises:
        InvalidMessage: size 0 or above 256, ``offset + size`` beyond the 4 KiB config
            space, unknown flags, or a payload that does not hold ``size`` bytes.
    """
    if len(payload) < CONFIG_HEADER.size:
        raise InvalidMessage(f"config payload is {len(payload)} bytes, too short")
    offset, size, flags = CONFIG_HEADER.unpack_from(payload)
    if size == 0 or size > VHOST_USER_MAX_CONFIG_SIZE:
        raise InvalidMessage(f"config size {size} out of range (1..{VHOST_USER_MAX_CONFIG_SIZE})")
    if offset + size > VHOST_USER_CONFIG_SPACE_SIZE:
        raise InvalidMessage(f"config range {offset}+{size} beyond the config space")
    if flags > 1:
        raise InvalidMessage(f"config flags 0x{flags:x} unknown")
    _check_size("config", payload, CONFIG_HEADER.size + size)
    return ConfigMsg(offset, size, flags, bytes(payload[CONFIG_HEADER.size :]))


def pack_config(offset: int, data: bytes, flags: int = 0) -> bytes:
    return CONFIG_HEADER.pack(offset, len(data), flags) + data


def unpack_inflight(payload: bytes | memoryview) -> Inflight:
    """GET/SET_INFLIGHT_FD payload.

    Raises:
        InvalidMessage: wrong size.
    """
    _check_size("inflight", payload, INFLIGHT.size)
    return Inflight(*INFLIGHT.unpack(payload))


def unpack_log(payload: bytes | memoryview) -> Log:
    """SET_LOG_BASE payload.

    Raises:
        InvalidMessage: wrong size.
    """
    _check_size("log", payload, LOG.size)
    return Log(*LOG.unpack(payload))


def inflight_queue_size(queue_size: int) -> int:
    """Bytes of one queue's split-ring inflight region, padded to 64 ("Inflight I/O
    tracking": a QueueRegionSplit head followed by ``queue_size`` DescStateSplit)."""
    raw = INFLIGHT_QUEUE_HEADER.size + INFLIGHT_DESC.size * queue_size
    return (raw + INFLIGHT_ALIGNMENT - 1) // INFLIGHT_ALIGNMENT * INFLIGHT_ALIGNMENT


# -- fds ----------------------------------------------------------------------------
# Requests that carry exactly one fd.  The spec marks each with "fd" in its
# description; the vring fd requests are handled by ``expected_fds`` (bit 8).
_ONE_FD = frozenset(
    {
        FrontendReq.SET_LOG_BASE,
        FrontendReq.SET_LOG_FD,
        FrontendReq.SET_BACKEND_REQ_FD,
        FrontendReq.SET_INFLIGHT_FD,
        FrontendReq.ADD_MEM_REG,
        FrontendReq.SET_DEVICE_STATE_FD,
        FrontendReq.GPU_SET_SOCKET,
    }
)
_VRING_FD = frozenset({FrontendReq.SET_VRING_KICK, FrontendReq.SET_VRING_CALL, FrontendReq.SET_VRING_ERR})


def expected_fds(request: int, payload: bytes | memoryview) -> tuple[int, int]:
    """``(min, max)`` number of fds a front-end request may carry.

    SET_MEM_TABLE carries one per region; REM_MEM_REG should carry none but the spec
    lets a back-end accept one ("for compatibility with existing incorrect
    implementations"), which must then be closed unused.
    """
    if request == FrontendReq.SET_MEM_TABLE:
        if len(payload) >= MEMORY_TABLE_HEADER.size:
            n: int = MEMORY_TABLE_HEADER.unpack_from(payload)[0]
            return n, n
        return 0, 0
    if request in _VRING_FD:
        if len(payload) == U64.size and U64.unpack(payload)[0] & VHOST_USER_VRING_NOFD_MASK:
            return 0, 0
        return 1, 1
    if request in _ONE_FD:
        return 1, 1
    if request == FrontendReq.REM_MEM_REG:
        return 0, 1
    return 0, 0


def check_fds(request: int, payload: bytes | memoryview, fds: Sequence[int]) -> None:
    """Raise :class:`IncorrectFds` unless ``fds`` has the count ``request`` takes."""
    lo, hi = expected_fds(request, payload)
    if not lo <= len(fds) <= hi:
        name = FrontendReq(request).name if request in _FRONTEND_CODES else str(request)
        want = str(lo) if lo == hi else f"{lo}..{hi}"
        raise IncorrectFds(f"{name} carries {len(fds)} fds, expected {want}")


def close_fds(fds: Sequence[int]) -> None:
    """Close every fd of ``fds``, ignoring ones already invalid (EBADF)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
