"""Test helpers for every layer: a mock driver, a reference device model, guard bytes.

This module gathers, for tests and benchmarks, what lives by role in three modules:

* :mod:`virtio_queue.mock`: :class:`MockSplitQueue`, the *driver* side of a split
  virtqueue (rust-vmm's ``mock.rs``), and the ring constants and records it uses;
* :mod:`virtio_queue.reference`: :class:`RefQueue`, the plain-Python model of the
  device side used as an oracle, and :class:`PyGuestMemory`;
* here: :class:`GuardedMemory`, which surrounds each guest region with guard bytes
  inside one host buffer and checks that nothing outside the allowed (write-only)
  ranges changed, and :func:`workload_a`, the benchmarks' standard ring.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from .errors import GuestMemoryError
from .memory import GuestMemory, GuestRegion
from .mock import (
    DESC_SIZE,
    MAX_CHAIN_BYTES,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_USED_F_NO_NOTIFY,
    DescLike,
    MemoryLike,
    MockSplitQueue,
    RawDesc,
    desc_tuple,
    vring_need_event,
)
from .reference import PyGuestMemory, RefChain, RefQueue

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
# Workload A
# ---------------------------------------------------------------------------------------


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
