"""Plain-Python reference models, the oracles of the property tests.

* :class:`RefQueue` is a plain-Python model of the *device* side with the public
  methods of :class:`virtio_queue.Queue`.  It reads guest memory only through the
  ``GuestMemory.read*`` helpers, walks chains with the same rules and raises the same
  error classes, so hypothesis can use it as an oracle for the compiled queue.
* :class:`PyGuestMemory` is a small bytearray-backed stand-in for ``GuestMemory``
  with the same read/write API; it lets the model run without the compiled core and
  serves as a second opinion on address translation.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from typing import Any

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
from .mock import (
    DESC_SIZE,
    MAX_CHAIN_BYTES,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_USED_F_NO_NOTIFY,
    MemoryLike,
    RawDesc,
    vring_need_event,
)

__all__ = ["PyGuestMemory", "RefChain", "RefQueue"]


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

    def check_order(self) -> None:
        """Raise :class:`InvalidChain` if a device-readable descriptor follows a
        device-writable one (VIRTIO 1.2 §2.7.4.2), else any error of the walk."""
        seen_write = False
        for pos, d in enumerate(self):
            if d.flags & VIRTQ_DESC_F_WRITE:
                seen_write = True
            elif seen_write:
                raise InvalidChain(f"descriptor {pos} is device-readable after a device-writable one")

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
