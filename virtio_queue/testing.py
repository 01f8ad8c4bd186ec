"""Test helpers for every layer: a mock driver, a reference device model, guard bytes.

* :class:`MockSplitQueue` is the *driver* side of a split virtqueue (VIRTIO 1.2 §2.7),
  modelled on rust-vmm's ``virtio-queue/src/mock.rs``: it lays the descriptor table and
  the two rings out in guest memory, builds direct and indirect chains, publishes heads
  on the available ring and reads the used ring back.
* :class:`RefQueue` is a plain-Python model of the *device* side with the public
  methods of :class:`virtio_queue.Queue`.  It reads guest memory only through the
  ``GuestMemory.read*`` helpers, walks chains with the same rules and raises the same
  error classes, so hypothesis can use it as an oracle for the compiled queue.
* :class:`GuardedMemory` surrounds each guest region with guard bytes inside one host
  buffer and checks that nothing outside the allowed (write-only) ranges changed.
* :class:`PyGuestMemory` is a small bytearray-backed stand-in for ``GuestMemory``
  with the same read/write API; it lets this module check itself without the
  compiled core and serves as a second opinion on address translation.

Nothing here is on a hot path except :meth:`MockSplitQueue.publish`, which a
benchmark uses to count the driver's time per chain: it writes a batch of heads with
at most two slice assignments into a view of guest memory.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol

from typing_extensions import Buffer

from .errors import (
    DescriptorChainOverflow,
    GuestMemoryError,
    InvalidAvailRingIndex,
    InvalidChain,
    InvalidDescriptorIndex,
    InvalidIndirectDescriptor,
    InvalidQueueConfig,
    QueueNotReady,
)
from .memory import GuestMemory, GuestRegion
from .queue import Queue

__all__ = [
    "DESC_SIZE",
    "MAX_CHAIN_BYTES",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "VRING_AVAIL_F_NO_INTERRUPT",
    "VRING_USED_F_NO_NOTIFY",
    "WORKLOAD_A_AVAIL",
    "WORKLOAD_A_BUF_LEN",
    "WORKLOAD_A_DATA",
    "WORKLOAD_A_DESC",
    "WORKLOAD_A_MEM_SIZE",
    "WORKLOAD_A_SIZE",
    "WORKLOAD_A_USED",
    "DescLike",
    "GuardedMemory",
    "MemoryLike",
    "MockSplitQueue",
    "PyGuestMemory",
    "RawDesc",
    "RefChain",
    "RefQueue",
    "desc_tuple",
    "vring_need_event",
    "workload_a",
]

# linux/virtio_ring.h (the same values as virtio_queue.chain's constants).
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VRING_USED_F_NO_NOTIFY = 1
VRING_AVAIL_F_NO_INTERRUPT = 1

#: Size of one ``struct virtq_desc`` (VIRTIO 1.2 §2.7.5): le64 addr, le32 len, le16 flags, le16 next.
DESC_SIZE = 16
#: VIRTIO 1.2 §2.7.5.2: a chain holds at most 2^32 bytes in total.
MAX_CHAIN_BYTES = 1 << 32

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
# A memoryview cast to 'H'/'I' uses native byte order; the ring is little-endian.
_NATIVE_LE = sys.byteorder == "little"


class RawDesc(NamedTuple):
    """One ``struct virtq_desc`` as plain Python values (the reference model's Descriptor)."""

    addr: int
    len: int
    flags: int = 0
    next: int = 0


class _HasDescFields(Protocol):
    @property
    def addr(self) -> int: ...
    @property
    def len(self) -> int: ...
    @property
    def flags(self) -> int: ...
    @property
    def next(self) -> int: ...


#: Anything with addr/len/flags/next: a :class:`RawDesc`, a compiled ``Descriptor``,
#: or a plain tuple ``(addr, len[, flags[, next]])``.
DescLike = _HasDescFields | Sequence[int]


def desc_tuple(d: DescLike) -> RawDesc:
    """Normalise a descriptor-like value to a :class:`RawDesc`."""
    if isinstance(d, RawDesc):
        return d
    if isinstance(d, (tuple, list)):
        return RawDesc(*d)
    return RawDesc(d.addr, d.len, d.flags, d.next)  # type: ignore[union-attr]


class MemoryLike(Protocol):
    """The subset of :class:`virtio_queue.GuestMemory` the helpers here rely on."""

    @property
    def generation(self) -> int: ...
    def check_range(self, gpa: int, length: int) -> bool: ...
    def read(self, gpa: int, length: int) -> bytes: ...
    def write(self, gpa: int, data: Buffer) -> None: ...
    def read_u16(self, gpa: int) -> int: ...
    def read_u32(self, gpa: int) -> int: ...
    def write_u16(self, gpa: int, value: int) -> None: ...
    def write_u32(self, gpa: int, value: int) -> None: ...
    def read_obj(self, gpa: int, fmt: str) -> tuple[Any, ...]: ...
    def write_obj(self, gpa: int, fmt: str, *values: Any) -> None: ...
    def get_slice(self, gpa: int, length: int) -> memoryview: ...


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """Linux ``vring_need_event`` (include/uapi/linux/virtio_ring.h), VIRTIO 1.2 §2.7.10.

    True when ``event_idx`` lies in the u16 window ``[old_idx, new_idx)``, i.e. the used
    index crossed the driver's ``used_event`` since the last notification check.
    """
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


# ---------------------------------------------------------------------------------------
# A pure-Python stand-in for GuestMemory
# ---------------------------------------------------------------------------------------


class PyGuestMemory:
    """Bytearray-backed guest memory with the ``GuestMemory`` read/write API.

    Regions are ``(guest_addr, buffer)`` pairs; ranges must lie inside one region, exactly
    as the compiled translation demands, else :class:`GuestMemoryError`.  It exists so
    that the reference model can be checked without the compiled core, and as a second
    implementation of the address checks.
    """

    def __init__(self, regions: Iterable[tuple[int, Buffer]] = ()) -> None:
        self._regions: list[tuple[int, memoryview]] = []
        self._generation = 0
        for gpa, buf in regions:
            self.add_region(gpa, buf)

    @classmethod
    def from_buffer(cls, buffer: Buffer, guest_addr: int = 0) -> PyGuestMemory:
        """One region at ``guest_addr`` backed by ``buffer``."""
        return cls([(guest_addr, buffer)])

    @property
    def generation(self) -> int:
        """Bumped on every region change."""
        return self._generation

    def add_region(self, gpa: int, buffer: Buffer) -> None:
        """Add a region.  Raises GuestMemoryError if it is empty, overflows or overlaps."""
        view = memoryview(buffer).cast("B")
        size = len(view)
        if size == 0 or gpa < 0 or gpa + size > 1 << 64:
            raise GuestMemoryError(f"bad region [{gpa:#x}, +{size:#x})")
        for other, oview in self._regions:
            if gpa < other + len(oview) and other < gpa + size:
                raise GuestMemoryError(f"region at {gpa:#x} overlaps region at {other:#x}")
        self._regions.append((gpa, view))
        self._regions.sort(key=lambda r: r[0])
        self._generation += 1

    def remove_region(self, gpa: int) -> None:
        """Remove the region starting at ``gpa``.  Raises GuestMemoryError if none."""
        for i, (start, _) in enumerate(self._regions):
            if start == gpa:
                del self._regions[i]
                self._generation += 1
                return
        raise GuestMemoryError(f"no region at {gpa:#x}")

    def _locate(self, gpa: int, length: int) -> tuple[memoryview, int]:
        if gpa < 0 or length < 0 or gpa + length > 1 << 64:
            raise GuestMemoryError(f"guest range [{gpa:#x}, +{length:#x}) overflows")
        for start, view in self._regions:
            # A zero-length range is valid at any mapped address (as in the core).
            if start <= gpa and gpa + max(length, 1) <= start + len(view):
                return view, gpa - start
        raise GuestMemoryError(f"guest range [{gpa:#x}, +{length:#x}) is not mapped")

    def check_range(self, gpa: int, length: int) -> bool:
        """True when ``[gpa, gpa+length)`` lies inside one region."""
        try:
            self._locate(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def get_slice(self, gpa: int, length: int) -> memoryview:
        """A writable view of ``[gpa, gpa+length)``."""
        view, off = self._locate(gpa, length)
        return view[off : off + length]

    def read(self, gpa: int, length: int) -> bytes:
        """Copy ``length`` bytes out of guest memory."""
        return bytes(self.get_slice(gpa, length))

    def write(self, gpa: int, data: Buffer) -> None:
        """Copy ``data`` into guest memory."""
        src = memoryview(data).cast("B")
        self.get_slice(gpa, len(src))[:] = src

    def read_u16(self, gpa: int) -> int:
        """Little-endian u16."""
        return int.from_bytes(self.read(gpa, 2), "little")

    def read_u32(self, gpa: int) -> int:
        """Little-endian u32."""
        return int.from_bytes(self.read(gpa, 4), "little")

    def read_u64(self, gpa: int) -> int:
        """Little-endian u64."""
        return int.from_bytes(self.read(gpa, 8), "little")

    def write_u16(self, gpa: int, value: int) -> None:
        """Little-endian u16."""
        self.write(gpa, value.to_bytes(2, "little"))

    def write_u32(self, gpa: int, value: int) -> None:
        """Little-endian u32."""
        self.write(gpa, value.to_bytes(4, "little"))

    def write_u64(self, gpa: int, value: int) -> None:
        """Little-endian u64."""
        self.write(gpa, value.to_bytes(8, "little"))

    def read_obj(self, gpa: int, fmt: str) -> tuple[Any, ...]:
        """Unpack a little-endian struct ``fmt`` at ``gpa``."""
        s = struct.Struct("<" + fmt.lstrip("<>=!@"))
        return s.unpack(self.read(gpa, s.size))

    def write_obj(self, gpa: int, fmt: str, *values: Any) -> None:
        """Pack ``values`` as a little-endian struct ``fmt`` at ``gpa``."""
        self.write(gpa, struct.pack("<" + fmt.lstrip("<>=!@"), *values))


# ---------------------------------------------------------------------------------------
# Guard bytes
# ---------------------------------------------------------------------------------------


class GuardedMemory:
    """Guest regions cut out of one host buffer, each surrounded by guard bytes.

    ``layout`` lists ``(guest_addr, size)`` per region.  The host buffer is
    ``guard | region0 | guard | region1 | ... | guard``, every byte initialised to
    ``fill`` (regions) or ``guard_byte`` (guards).  :meth:`check_guards` proves that no
    write escaped a region; :meth:`snapshot` + :meth:`assert_unchanged_except` prove that
    inside the regions only the allowed ranges (write-only buffers, the used ring)
    changed — the "never write outside a write-only descriptor" rule of DESIGN.md.

    ``backend`` is ``"core"`` (compiled :class:`virtio_queue.GuestMemory`, the default)
    or ``"python"`` (:class:`PyGuestMemory`).
    """

    def __init__(
        self,
        layout: Sequence[tuple[int, int]],
        *,
        guard: int = 256,
        guard_byte: int = 0xA5,
        fill: int = 0,
        backend: str = "core",
    ) -> None:
        self.layout = [(int(g), int(s)) for g, s in layout]
        self.guard = guard
        self.guard_byte = guard_byte
        total = guard + sum(size + guard for _, size in self.layout)
        self.buffer = bytearray([guard_byte]) * total
        self._offsets: list[int] = []
        off = guard
        for _, size in self.layout:
            self._offsets.append(off)
            self.buffer[off : off + size] = bytes([fill]) * size
            off += size + guard
        view = memoryview(self.buffer)
        slices = [
            (gpa, view[o : o + size]) for (gpa, size), o in zip(self.layout, self._offsets, strict=True)
        ]
        self.memory: Any
        if backend == "python":
            self.memory = PyGuestMemory(slices)
        elif backend == "core":
            self.memory = GuestMemory([GuestRegion.from_buffer(s, gpa) for gpa, s in slices])
        else:
            raise ValueError(f"unknown backend {backend!r}")

    def guard_ranges(self) -> list[tuple[int, int]]:
        """Host-buffer ``(offset, length)`` of every guard zone."""
        out = []
        prev_end = 0
        for (_, size), off in zip(self.layout, self._offsets, strict=True):
            out.append((prev_end, off - prev_end))
            prev_end = off + size
        out.append((prev_end, len(self.buffer) - prev_end))
        return out

    def check_guards(self) -> None:
        """Raise AssertionError naming the first guard byte that changed."""
        for off, length in self.guard_ranges():
            zone = self.buffer[off : off + length]
            if zone.count(self.guard_byte) != length:
                bad = next(i for i, b in enumerate(zone) if b != self.guard_byte)
                raise AssertionError(f"guard byte at host offset {off + bad:#x} was overwritten")

    def snapshot(self) -> bytes:
        """A copy of the whole host buffer (regions and guards)."""
        return bytes(self.buffer)

    def host_offset(self, gpa: int) -> int:
        """Host-buffer offset of guest address ``gpa``."""
        for (start, size), off in zip(self.layout, self._offsets, strict=True):
            if start <= gpa < start + size:
                return off + gpa - start
        raise GuestMemoryError(f"{gpa:#x} is not in any guarded region")

    def changed_ranges(self, before: bytes) -> list[tuple[int, int]]:
        """Guest ``(gpa, length)`` runs that differ from ``before``; guard hits as gpa -1."""
        out: list[tuple[int, int]] = []
        buf = self.buffer
        if bytes(buf) == before:
            return out
        n = len(buf)
        i = 0
        while i < n:
            if buf[i] != before[i]:
                j = i
                while j < n and buf[j] != before[j]:
                    j += 1
                out.append((self._host_to_gpa(i), j - i))
                i = j
            else:
                i += 1
        return out

    def _host_to_gpa(self, host: int) -> int:
        for (start, size), off in zip(self.layout, self._offsets, strict=True):
            if off <= host < off + size:
                return start + host - off
        return -1

    def assert_unchanged_except(self, before: bytes, allowed: Iterable[tuple[int, int]] = ()) -> None:
        """Assert that only bytes inside the guest ranges ``allowed`` changed since ``before``.

        Raises AssertionError naming the first changed byte outside them (a guard byte
        reports guest address -1).
        """
        self.check_guards()
        ranges = [(g, n) for g, n in allowed if n > 0]
        for gpa, length in self.changed_ranges(before):
            if gpa < 0:
                raise AssertionError("a guard byte changed")
            for k in range(length):
                a = gpa + k
                if not any(g <= a < g + n for g, n in ranges):
                    raise AssertionError(f"guest byte {a:#x} changed outside the allowed ranges")


# ---------------------------------------------------------------------------------------
# The driver side
# ---------------------------------------------------------------------------------------


class MockSplitQueue:
    """The driver side of a split virtqueue in guest memory (VIRTIO 1.2 §2.7).

    Layout defaults, from ``base``: the descriptor table at ``base`` (16-byte aligned),
    the available ring right after it (2-byte aligned), the used ring after that
    (4-byte aligned), then a data area (4 KiB aligned) from which :meth:`alloc` hands
    out buffers and indirect tables.  Any of the three ring addresses can be given
    explicitly.  The constructor zeroes the rings' flags, idx and event fields.

    Descriptors for :meth:`build_desc_chain` are taken round-robin from the table, like
    rust-vmm's mock; tests that need exact indexes use :meth:`write_desc` and
    :meth:`add_avail`/:meth:`publish` directly.
    """

    def __init__(
        self,
        memory: MemoryLike,
        size: int,
        *,
        base: int = 0,
        desc_table: int | None = None,
        avail_ring: int | None = None,
        used_ring: int | None = None,
        data_addr: int | None = None,
    ) -> None:
        if not 1 <= size <= 32768:
            raise ValueError(f"mock queue size {size} out of range")
        self.memory = memory
        self.size = size
        self.desc_table = base if desc_table is None else desc_table
        self.avail_ring = (
            _align_up(self.desc_table + DESC_SIZE * size, 2) if avail_ring is None else avail_ring
        )
        self.used_ring = _align_up(self.avail_ring + 6 + 2 * size, 4) if used_ring is None else used_ring
        end = max(
            self.desc_table + DESC_SIZE * size,
            self.avail_ring + 6 + 2 * size,
            self.used_ring + 6 + 8 * size,
        )
        self.data_addr = _align_up(end, 4096) if data_addr is None else data_addr
        self._next_data = self.data_addr
        self._next_free = 0
        #: The driver's cursor in the used ring (what :meth:`used_elems` saw last).
        self.last_used = 0
        self._all_heads = array("H", range(size))
        self._views_gen = -1
        self._ring_view: memoryview | None = None
        self._idx_view: memoryview | None = None
        for addr in (self.avail_ring, self.used_ring):
            memory.write_u16(addr, 0)  # flags
            memory.write_u16(addr + 2, 0)  # idx
        memory.write_u16(self.avail_ring + 4 + 2 * size, 0)  # used_event
        memory.write_u16(self.used_ring + 4 + 8 * size, 0)  # avail_event

    # -- descriptors ------------------------------------------------------------------

    def desc_addr(self, index: int) -> int:
        """Guest address of descriptor ``index`` in the table."""
        return self.desc_table + DESC_SIZE * index

    def write_desc(self, index: int, desc: DescLike, *, table: int | None = None) -> None:
        """Store one descriptor at ``index`` of the queue's table (or of ``table``)."""
        d = desc_tuple(desc)
        base = self.desc_table if table is None else table
        self.memory.write(base + DESC_SIZE * index, _DESC.pack(d.addr, d.len, d.flags, d.next))

    def write_descs(self, start: int, descs: Sequence[DescLike], *, table: int | None = None) -> None:
        """Store descriptors at ``start, start+1, ...`` in one memory write, fields as given."""
        base = self.desc_table if table is None else table
        blob = b"".join(_DESC.pack(*desc_tuple(d)) for d in descs)
        if blob:
            self.memory.write(base + DESC_SIZE * start, blob)

    def read_desc(self, index: int, *, table: int | None = None) -> RawDesc:
        """Load descriptor ``index`` of the queue's table (or of ``table``)."""
        base = self.desc_table if table is None else table
        return RawDesc(*_DESC.unpack(self.memory.read(base + DESC_SIZE * index, DESC_SIZE)))

    def alloc(self, length: int, align: int = 16) -> int:
        """Reserve ``length`` bytes of the data area and return their guest address."""
        addr = _align_up(self._next_data, align)
        self._next_data = addr + max(length, 0)
        return addr

    def _take_indices(self, n: int) -> list[int]:
        if not 1 <= n <= self.size:
            raise ValueError(f"a chain of {n} descriptors does not fit a queue of {self.size}")
        out = [(self._next_free + i) % self.size for i in range(n)]
        self._next_free = (self._next_free + n) % self.size
        return out

    @staticmethod
    def _linked(descs: Sequence[DescLike], indices: Sequence[int]) -> list[RawDesc]:
        # Like mock.rs build_desc_chain: keep addr/len/other flags, force NEXT and the
        # link on all but the last descriptor, clear NEXT on the last.
        out = []
        last = len(descs) - 1
        for pos, d in enumerate(descs):
            r = desc_tuple(d)
            if pos < last:
                out.append(RawDesc(r.addr, r.len, r.flags | VIRTQ_DESC_F_NEXT, indices[pos + 1]))
            else:
                out.append(RawDesc(r.addr, r.len, r.flags & ~VIRTQ_DESC_F_NEXT, 0))
        return out

    def build_desc_chain(self, descs: Sequence[DescLike], *, start: int | None = None) -> int:
        """Write ``descs`` as one linked chain and return its head index (not published).

        Indices are consecutive from ``start`` (or from the mock's round-robin cursor),
        wrapping at the queue size.
        """
        if start is not None:
            self._next_free = start % self.size
        indices = self._take_indices(len(descs))
        for i, d in zip(indices, self._linked(descs, indices), strict=True):
            self.write_desc(i, d)
        return indices[0]

    def build_indirect_table(self, descs: Sequence[DescLike]) -> tuple[int, int]:
        """Write ``descs`` as a linked indirect table; return ``(gpa, byte_length)``.

        Entry ``i`` links to ``i+1`` (``next`` is relative to the table, VIRTIO 1.2
        §2.7.5.3.2), the first entry is the chain's first descriptor.
        """
        n = len(descs)
        table = self.alloc(DESC_SIZE * n, 16)
        self.write_descs(0, self._linked(descs, list(range(n))), table=table)
        return table, DESC_SIZE * n

    def add_chain(self, descs: Sequence[DescLike]) -> int:
        """Build a direct chain, make it available and return its head."""
        head = self.build_desc_chain(descs)
        self.add_avail(head)
        return head

    def add_indirect_chain(self, descs: Sequence[DescLike], *, flags: int = 0) -> int:
        """Build an indirect table from ``descs``, point one direct descriptor at it
        (``INDIRECT | flags``), make that available and return the head."""
        table, length = self.build_indirect_table(descs)
        (head,) = self._take_indices(1)
        self.write_desc(head, RawDesc(table, length, VIRTQ_DESC_F_INDIRECT | flags, 0))
        self.add_avail(head)
        return head

    # -- available ring -----------------------------------------------------------------

    def avail_idx(self) -> int:
        """``avail->idx``."""
        return self.memory.read_u16(self.avail_ring + 2)

    def set_avail_idx(self, value: int) -> None:
        """Store ``avail->idx`` (the driver's release point)."""
        self.memory.write_u16(self.avail_ring + 2, value & 0xFFFF)

    def avail_flags(self) -> int:
        """``avail->flags``."""
        return self.memory.read_u16(self.avail_ring)

    def set_avail_flags(self, flags: int) -> None:
        """Store ``avail->flags`` (VRING_AVAIL_F_NO_INTERRUPT, VIRTIO 1.2 §2.7.7)."""
        self.memory.write_u16(self.avail_ring, flags)

    def set_used_event(self, value: int) -> None:
        """Store ``used_event`` (trailing u16 of the available ring, EVENT_IDX)."""
        self.memory.write_u16(self.avail_ring + 4 + 2 * self.size, value & 0xFFFF)

    def used_event(self) -> int:
        """``used_event``."""
        return self.memory.read_u16(self.avail_ring + 4 + 2 * self.size)

    def set_avail_entry(self, slot: int, head: int) -> None:
        """Store ``avail->ring[slot]`` without touching ``avail->idx``."""
        self.memory.write_u16(self.avail_ring + 4 + 2 * (slot % self.size), head & 0xFFFF)

    def add_avail(self, head: int) -> None:
        """Put ``head`` in the next available slot and bump ``avail->idx`` by one."""
        idx = self.avail_idx()
        self.set_avail_entry(idx, head)
        self.set_avail_idx(idx + 1)

    def _views(self) -> tuple[memoryview, memoryview]:
        gen = self.memory.generation
        if self._ring_view is None or self._idx_view is None or gen != self._views_gen:
            ring = self.memory.get_slice(self.avail_ring + 4, 2 * self.size)
            idx = self.memory.get_slice(self.avail_ring + 2, 2)
            self._ring_view = ring.cast("B").cast("H")
            self._idx_view = idx.cast("B").cast("H")
            self._views_gen = gen
        return self._ring_view, self._idx_view

    def publish(self, heads: Sequence[int] | array[int]) -> None:
        """Make a batch of heads available: ring slots first, then ``avail->idx`` once.

        VIRTIO 1.2 §2.7.13: the driver writes the ring entries, then (after a barrier)
        the new ``idx``.  The entries are written with at most two slice assignments
        into a view of guest memory (two when the batch wraps round the ring), so a
        benchmark can publish 256 chains in a few microseconds.
        """
        n = len(heads)
        if n == 0:
            return
        if n > self.size:
            raise ValueError(f"cannot publish {n} heads on a ring of {self.size}")
        if not _NATIVE_LE:  # pragma: no cover - big-endian hosts
            for h in heads:
                self.add_avail(h)
            return
        ring, idx_view = self._views()
        src = heads if isinstance(heads, array) and heads.typecode == "H" else array("H", heads)
        mv = memoryview(src)
        idx = idx_view[0]
        start = idx % self.size
        first = self.size - start
        if n <= first:
            ring[start : start + n] = mv
        else:
            ring[start:] = mv[:first]
            ring[: n - first] = mv[first:]
        idx_view[0] = (idx + n) & 0xFFFF

    def publish_all(self) -> None:
        """Publish heads ``0 .. size-1`` (workload A's batch)."""
        self.publish(self._all_heads)

    # -- used ring --------------------------------------------------------------------

    def used_idx(self) -> int:
        """``used->idx`` as the device last published it."""
        return self.memory.read_u16(self.used_ring + 2)

    def used_flags(self) -> int:
        """``used->flags`` (VRING_USED_F_NO_NOTIFY)."""
        return self.memory.read_u16(self.used_ring)

    def avail_event(self) -> int:
        """``avail_event`` (trailing u16 of the used ring, EVENT_IDX)."""
        return self.memory.read_u16(self.used_ring + 4 + 8 * self.size)

    def used_elem(self, slot: int) -> tuple[int, int]:
        """``used->ring[slot % size]`` as ``(id, len)``."""
        a = self.used_ring + 4 + 8 * (slot % self.size)
        ident, length = _USED_ELEM.unpack(self.memory.read(a, 8))
        return ident, length

    def read_used(self, since: int, until: int | None = None) -> list[tuple[int, int]]:
        """``(id, len)`` of used entries ``since .. until-1`` (u16 indexes; default until
        ``used->idx``).  Does not move the driver's cursor."""
        end = self.used_idx() if until is None else until
        count = (end - since) & 0xFFFF
        if count > self.size:
            raise ValueError(f"used range {since}..{end} is longer than the ring")
        if count == 0:
            return []
        raw = self.memory.read(self.used_ring + 4, 8 * self.size)
        out = []
        for k in range(count):
            o = 8 * ((since + k) % self.size)
            ident, length = _USED_ELEM.unpack_from(raw, o)
            out.append((ident, length))
        return out

    def used_elems(self) -> list[tuple[int, int]]:
        """The used entries the driver has not seen yet; advances the driver's cursor."""
        end = self.used_idx()
        out = self.read_used(self.last_used, end)
        self.last_used = end
        return out

    # -- device objects ---------------------------------------------------------------

    def _configure(self, q: Any, event_idx: bool) -> None:
        q.size = self.size
        q.desc_table = self.desc_table
        q.avail_ring = self.avail_ring
        q.used_ring = self.used_ring
        q.event_idx = event_idx
        q.ready = True

    def create_queue(self, *, event_idx: bool = False, max_size: int | None = None) -> Queue:
        """A compiled :class:`virtio_queue.Queue` on the same memory, configured and ready."""
        q = Queue(self.size if max_size is None else max_size, self.memory)  # type: ignore[arg-type]
        self._configure(q, event_idx)
        return q

    def create_ref_queue(self, *, event_idx: bool = False, max_size: int | None = None) -> RefQueue:
        """A :class:`RefQueue` on the same memory, configured and ready."""
        q = RefQueue(self.size if max_size is None else max_size, self.memory)
        self._configure(q, event_idx)
        return q


# Workload A of the benchmarks: 256 one-descriptor chains of 64 bytes each.
WORKLOAD_A_SIZE = 256
WORKLOAD_A_DESC = 0x0
WORKLOAD_A_AVAIL = 0x1000
WORKLOAD_A_USED = 0x2000
WORKLOAD_A_DATA = 0x4000
WORKLOAD_A_BUF_LEN = 64
WORKLOAD_A_MEM_SIZE = 1 << 20


def workload_a(memory: MemoryLike | None = None) -> MockSplitQueue:
    """The benchmark's workload A, laid out and ready to publish.

    Queue size 256, descriptor table at 0x0, available ring at 0x1000, used ring at
    0x2000, in 1 MiB of guest memory (a fresh bytearray-backed ``GuestMemory`` unless
    ``memory`` is given).  Descriptor ``i`` is the whole chain ``i``:
    ``{addr 0x4000 + 64*i, len 64, flags 0}``.  Publish a batch with
    :meth:`MockSplitQueue.publish_all` (heads 0..255).
    """
    if memory is None:
        memory = GuestMemory.from_buffer(bytearray(WORKLOAD_A_MEM_SIZE))
    assert memory is not None
    mock = MockSplitQueue(
        memory,
        WORKLOAD_A_SIZE,
        desc_table=WORKLOAD_A_DESC,
        avail_ring=WORKLOAD_A_AVAIL,
        used_ring=WORKLOAD_A_USED,
        data_addr=WORKLOAD_A_DATA + WORKLOAD_A_SIZE * WORKLOAD_A_BUF_LEN,
    )
    mock.write_descs(
        0,
        [
            RawDesc(WORKLOAD_A_DATA + WORKLOAD_A_BUF_LEN * i, WORKLOAD_A_BUF_LEN, 0, 0)
            for i in range(WORKLOAD_A_SIZE)
        ],
    )
    return mock


# ---------------------------------------------------------------------------------------
# The reference device model
# ---------------------------------------------------------------------------------------


class RefChain:
    """A chain popped from a :class:`RefQueue`; the walk happens on iteration.

    Walking rules (VIRTIO 1.2 §2.7.5, rust-vmm ``chain.rs``):

    * Each step first checks the index against the table's entry count
      (:class:`InvalidDescriptorIndex`), then the step budget: the queue size for the
      direct table, the entry count for an indirect table (:class:`InvalidChain`, a
      cycle).  Then it reads the descriptor.
    * An INDIRECT descriptor is replaced by its table (§2.7.5.3): nested tables,
      INDIRECT together with NEXT, and table lengths that are zero, not a multiple
      of 16 or above 2^16 entries raise :class:`InvalidIndirectDescriptor` (checked
      in that order); a table outside guest memory
      raises :class:`GuestMemoryError`.  Entries link with ``next`` relative to the
      table, and the walk ends with the table (the table replaces the rest).
    * The running total of buffer lengths must stay ≤ 2^32 (§2.7.5.2), else
      :class:`DescriptorChainOverflow`.
    """

    def __init__(self, memory: MemoryLike, desc_table: int, queue_size: int, head_index: int) -> None:
        self.memory = memory
        self.desc_table = desc_table
        self.queue_size = queue_size
        self.head_index = head_index

    def __iter__(self) -> Iterator[RawDesc]:
        mem = self.memory
        table = self.desc_table
        limit = self.queue_size
        ttl = self.queue_size
        indirect = False
        index = self.head_index
        total = 0
        while True:
            if index >= limit:
                where = "indirect table entries" if indirect else "queue size"
                raise InvalidDescriptorIndex(f"descriptor index {index} out of range ({where} {limit})")
            if ttl == 0:
                raise InvalidChain(f"descriptor chain longer than {limit} (a cycle)")
            ttl -= 1
            addr, length, flags, nxt = mem.read_obj(table + DESC_SIZE * index, "QIHH")
            if flags & VIRTQ_DESC_F_INDIRECT:
                if indirect:
                    raise InvalidIndirectDescriptor("nested indirect descriptor table")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise InvalidIndirectDescriptor("INDIRECT together with NEXT")
                # A table of more than 2^16 entries cannot be addressed by a u16 `next`.
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > 65536:
                    raise InvalidIndirectDescriptor(f"indirect table length {length}")
                if not mem.check_range(addr, length):
                    raise GuestMemoryError(f"indirect table [{addr:#x}, +{length:#x}) not mapped")
                table = addr
                limit = ttl = length // DESC_SIZE
                indirect = True
                index = 0
                continue
            total += length
            if total > MAX_CHAIN_BYTES:
                raise DescriptorChainOverflow(f"descriptor chain longer than 2^32 bytes ({total})")
            yield RawDesc(addr, length, flags, nxt)
            if not flags & VIRTQ_DESC_F_NEXT:
                return
            index = nxt

    def descriptors(self) -> list[RawDesc]:
        """The whole walk as a list (raises like iteration)."""
        return list(self)

    def _buffers(self, want_write: bool) -> list[tuple[int, int]]:
        # Buffers are checked as the walk meets them (as the compiled Reader/Writer
        # do), so a bad buffer before a malformed link reports GuestMemoryError.
        out = []
        for d in self:
            if bool(d.flags & VIRTQ_DESC_F_WRITE) != want_write:
                continue
            if d.len == 0:
                continue
            if not self.memory.check_range(d.addr, d.len):
                raise GuestMemoryError(f"buffer [{d.addr:#x}, +{d.len:#x}) not mapped")
            out.append((d.addr, d.len))
        return out

    def readable_buffers(self) -> list[tuple[int, int]]:
        """``(gpa, len)`` of the device-readable buffers, as ``chain.reader()`` sees them."""
        return self._buffers(False)

    def writable_buffers(self) -> list[tuple[int, int]]:
        """``(gpa, len)`` of the device-writable buffers, as ``chain.writer()`` sees them."""
        return self._buffers(True)

    def read_all(self) -> bytes:
        """The device-readable byte stream of the chain."""
        return b"".join(self.memory.read(a, n) for a, n in self.readable_buffers())


class RefQueue:
    """Plain-Python model of the device side of a split virtqueue (VIRTIO 1.2 §2.7).

    Same public surface as :class:`virtio_queue.Queue`.  It keeps no state that the
    compiled queue would not keep, reads guest memory only through ``read*`` helpers,
    and raises the same error classes.  EVENT_IDX follows Linux vhost's
    ``vhost_notify``: ``vring_need_event(used_event, new, old)`` with ``old`` = the used
    index at the previous :meth:`needs_notification` call; the first call after
    configuration, :meth:`reset`, :meth:`set_next_used` or a change of
    :attr:`event_idx` has no ``old`` and answers True.
    """

    def __init__(self, max_size: int, memory: MemoryLike | None = None) -> None:
        # rust-vmm Queue::new: the maximum is itself a power of two in 1..32768.
        if not 1 <= max_size <= 32768 or max_size & (max_size - 1):
            raise InvalidQueueConfig(f"maximum queue size {max_size} is not a power of two in 1..32768")
        self._max_size = max_size
        self.memory = memory
        self._size = max_size
        self.ready = False
        self.desc_table = 0
        self.avail_ring = 0
        self.used_ring = 0
        self._event_idx = False
        self._next_avail = 0
        self._avail_seen = 0
        self._next_used = 0
        self._signalled_used = 0
        self._signalled_valid = False

    @property
    def event_idx(self) -> bool:
        """VIRTIO_RING_F_EVENT_IDX negotiated (used_event / avail_event in use)."""
        return self._event_idx

    @event_idx.setter
    def event_idx(self, value: bool) -> None:
        self._event_idx = bool(value)
        self._signalled_valid = False

    @property
    def max_size(self) -> int:
        """The largest size the device offers."""
        return self._max_size

    @property
    def size(self) -> int:
        """The queue size the driver chose: a power of two ≤ ``max_size`` (§2.7)."""
        return self._size

    @size.setter
    def size(self, value: int) -> None:
        if value <= 0 or value > self._max_size or value & (value - 1):
            raise InvalidQueueConfig(f"queue size {value} (maximum {self._max_size})")
        self._size = value

    def is_valid(self) -> bool:
        """True when ready, with memory, and every ring aligned and inside guest memory."""
        try:
            self.validate()
        except (InvalidQueueConfig, QueueNotReady):
            return False
        return True

    def validate(self) -> None:
        """Check alignment (16/2/4) and that the rings lie in guest memory (§2.7)."""
        if self.memory is None:
            raise QueueNotReady("queue has no guest memory")
        n = self._size
        for name, addr, align, length in (
            ("descriptor table", self.desc_table, 16, DESC_SIZE * n),
            ("available ring", self.avail_ring, 2, 6 + 2 * n),
            ("used ring", self.used_ring, 4, 6 + 8 * n),
        ):
            if addr % align:
                raise InvalidQueueConfig(f"{name} at {addr:#x} is not {align}-byte aligned")
            if not self.memory.check_range(addr, length):
                raise InvalidQueueConfig(f"{name} [{addr:#x}, +{length:#x}) not in guest memory")

    def reset(self) -> None:
        """Back to the state after construction (memory kept)."""
        self._size = self._max_size
        self.ready = False
        self.desc_table = self.avail_ring = self.used_ring = 0
        self._event_idx = False
        self._next_avail = self._avail_seen = self._next_used = self._signalled_used = 0
        self._signalled_valid = False

    def next_avail(self) -> int:
        """Index of the next available entry the device will read."""
        return self._next_avail

    def set_next_avail(self, value: int) -> None:
        """vhost-user SET_VRING_BASE."""
        self._next_avail = self._avail_seen = value & 0xFFFF

    def next_used(self) -> int:
        """Index of the next used entry the device will write."""
        return self._next_used

    def set_next_used(self, value: int) -> None:
        """Move the used index (vhost-user SET_VRING_BASE / inflight resume)."""
        self._next_used = value & 0xFFFF
        self._signalled_valid = False

    def _mem(self) -> MemoryLike:
        if not self.ready or self.memory is None:
            raise QueueNotReady("queue is not ready")
        return self.memory

    def avail_idx(self) -> int:
        """``avail->idx`` read from guest memory."""
        return self._mem().read_u16(self.avail_ring + 2)

    def used_idx(self) -> int:
        """``used->idx`` read from guest memory."""
        return self._mem().read_u16(self.used_ring + 2)

    def pending(self) -> int:
        """Chains the driver made available that the device has not popped."""
        return (self.avail_idx() - self._next_avail) & 0xFFFF

    def pop_chain(self) -> RefChain | None:
        """Pop the next available chain, or None when the ring is empty.

        Raises:
            QueueNotReady: not ready or no memory.
            InvalidAvailRingIndex: ``avail->idx`` more than ``size`` ahead.
            InvalidDescriptorIndex: the head is ≥ size (the entry is consumed anyway).
        """
        mem = self._mem()
        # Like Linux vhost (and the compiled queue), avail->idx is re-read only once
        # the entries known from the previous read are used up: a driver that moves
        # it backwards meanwhile is not noticed until then.
        if self._next_avail == self._avail_seen:
            idx = mem.read_u16(self.avail_ring + 2)
            pending = (idx - self._next_avail) & 0xFFFF
            if pending > self._size:
                raise InvalidAvailRingIndex(
                    f"avail->idx {idx} is {pending} ahead of next_avail {self._next_avail} "
                    f"(queue size {self._size})"
                )
            if pending == 0:
                return None
            self._avail_seen = idx
        slot = self._next_avail % self._size
        head = mem.read_u16(self.avail_ring + 4 + 2 * slot)
        self._next_avail = (self._next_avail + 1) & 0xFFFF
        if head >= self._size:
            raise InvalidDescriptorIndex(f"descriptor index {head} out of range (queue size {self._size})")
        return RefChain(mem, self.desc_table, self._size, head)

    def __iter__(self) -> Iterator[RefChain]:
        while True:
            chain = self.pop_chain()
            if chain is None:
                return
            yield chain

    def add_used(self, head_index: int, length: int) -> None:
        """Write ``(head_index, length)`` to the used ring and publish ``used->idx``."""
        mem = self._mem()
        if head_index >= self._size:
            raise InvalidDescriptorIndex(
                f"descriptor index {head_index} out of range (queue size {self._size})"
            )
        slot = self._next_used % self._size
        mem.write_obj(self.used_ring + 4 + 8 * slot, "II", head_index, length)
        self._next_used = (self._next_used + 1) & 0xFFFF
        mem.write_u16(self.used_ring + 2, self._next_used)

    def enable_notification(self) -> bool:
        """Ask the driver to notify again; True if chains are already waiting (§2.7.10)."""
        mem = self._mem()
        if self.event_idx:
            mem.write_u16(self.used_ring + 4 + 8 * self._size, self._next_avail)
        else:
            flags = mem.read_u16(self.used_ring)
            mem.write_u16(self.used_ring, flags & ~VRING_USED_F_NO_NOTIFY)
        return mem.read_u16(self.avail_ring + 2) != self._next_avail

    def disable_notification(self) -> None:
        """Set VRING_USED_F_NO_NOTIFY (no-op with EVENT_IDX)."""
        mem = self._mem()
        if not self.event_idx:
            flags = mem.read_u16(self.used_ring)
            mem.write_u16(self.used_ring, flags | VRING_USED_F_NO_NOTIFY)

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for the used entries added so far."""
        mem = self._mem()
        if self.event_idx:
            used_event = mem.read_u16(self.avail_ring + 4 + 2 * self._size)
            new = self._next_used
            old = self._signalled_used
            self._signalled_used = new
            if not self._signalled_valid:
                self._signalled_valid = True
                return True
            return vring_need_event(used_event, new, old)
        return not mem.read_u16(self.avail_ring) & VRING_AVAIL_F_NO_INTERRUPT
