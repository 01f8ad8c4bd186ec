"""The driver side of a split virtqueue, for tests, tools and our vhost-user front-end.

:class:`MockSplitQueue` is the *driver* side of a split virtqueue (VIRTIO 1.2 §2.7),
modelled on rust-vmm's ``virtio-queue/src/mock.rs``: it lays the descriptor table and
the two rings out in guest memory, builds direct and indirect chains, publishes heads
on the available ring and reads the used ring back.  :class:`vhost_backends.frontend.Frontend`
drives its rings with it, so this module is the only one of the test helpers that
production code imports; the reference model is in :mod:`virtio_queue.reference` and the
test helpers in :mod:`virtio_queue.testing`.

Nothing here is on a hot path except :meth:`MockSplitQueue.publish`, which a
benchmark uses to count the driver's time per chain: it writes a batch of heads with
at most two slice assignments into a view of guest memory.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from typing_extensions import Buffer

from .queue import Queue

if TYPE_CHECKING:
    from .reference import RefQueue

__all__ = [
    "DESC_SIZE",
    "MAX_CHAIN_BYTES",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "VRING_AVAIL_F_NO_INTERRUPT",
    "VRING_USED_F_NO_NOTIFY",
    "DescLike",
    "MemoryLike",
    "MockSplitQueue",
    "RawDesc",
    "desc_tuple",
    "vring_need_event",
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

    def _check_publish(self, n: int) -> None:
        """The ring invariant of :meth:`publish` for ``n`` more heads (see there)."""
        avail = self.avail_idx()
        used = self.used_idx()
        if (used - avail) & 0xFFFF and (used - avail) & 0xFFFF < 0x8000:
            raise ValueError(
                f"used idx {used} is {(used - avail) & 0xFFFF} ahead of avail idx {avail} "
                f"(queue size {self.size}): the device used buffers it was not given"
            )
        outstanding = (avail + n - used) & 0xFFFF
        if n > self.size or outstanding > self.size:
            raise ValueError(
                f"cannot publish {n} heads on a ring of {self.size}: avail idx {avail}, "
                f"used idx {used}, driver's last used {self.last_used}, "
                f"{outstanding} would be outstanding"
            )

    def publish(self, heads: Sequence[int] | array[int], *, checked: bool = True) -> None:
        """Make a batch of heads available: ring slots first, then ``avail->idx`` once.

        VIRTIO 1.2 §2.7.13: the driver writes the ring entries, then (after a barrier)
        the new ``idx``.  The entries are written with at most two slice assignments
        into a view of guest memory (two when the batch wraps round the ring), so a
        benchmark can publish 256 chains in a few microseconds.

        The ring invariant is checked first (§2.7.6, §2.7.8): a device can only use a
        buffer that was made available, so ``used->idx`` never passes ``avail->idx``,
        and a driver never has more than the queue size of them outstanding
        (``avail->idx - used->idx``, the device's unreturned buffers included).
        ``checked=False`` skips it, for a benchmark of the driver side alone (no
        device takes the buffers).

        Raises:
            ValueError: more heads than the ring has entries; checked: the
                device's ``used->idx`` is ahead of ``avail->idx`` (it used more
                buffers than it was given), or publishing ``heads`` would leave more
                than the queue size outstanding.
        """
        n = len(heads)
        if n == 0:
            return
        if checked:
            self._check_publish(n)
        elif n > self.size:
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

    def publish_all(self, *, checked: bool = True) -> None:
        """Publish heads ``0 .. size-1`` (workload A's batch); ``checked`` as for
        :meth:`publish`."""
        self.publish(self._all_heads, checked=checked)

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
        """A :class:`~virtio_queue.reference.RefQueue` on the same memory, configured and ready."""
        from .reference import RefQueue  # noqa: PLC0415 - tests only: the front-end never loads the model

        q = RefQueue(self.size if max_size is None else max_size, self.memory)
        self._configure(q, event_idx)
        return q
