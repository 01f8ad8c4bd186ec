"""The test helpers themselves: guard bytes catch stray writes, the mock lays rings out
as VIRTIO 1.2 §2.7 says, RefQueue runs on the pure-Python memory stand-in."""

from __future__ import annotations

import pytest

from virtio_queue import GuestMemoryError
from virtio_queue.testing import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    GuardedMemory,
    MockSplitQueue,
    PyGuestMemory,
    RawDesc,
    vring_need_event,
)


@pytest.mark.parametrize("backend", ["core", "python"])
def test_guarded_memory_detects_write_outside_allowed(backend: str) -> None:
    gm = GuardedMemory([(0x1000, 0x100), (0x4000, 0x100)], guard=32, backend=backend)
    before = gm.snapshot()
    gm.memory.write(0x1010, b"ok")
    gm.assert_unchanged_except(before, [(0x1010, 2)])
    gm.memory.write(0x4000, b"!")
    with pytest.raises(AssertionError, match="0x4000"):
        gm.assert_unchanged_except(before, [(0x1010, 2)])


def test_guarded_memory_detects_guard_overwrite() -> None:
    gm = GuardedMemory([(0x1000, 0x100)], guard=32)
    gm.check_guards()
    gm.buffer[gm.host_offset(0x10FF) + 1] ^= 0xFF  # the first byte after the region
    with pytest.raises(AssertionError, match="guard"):
        gm.check_guards()


def test_guarded_memory_regions_are_bounded() -> None:
    gm = GuardedMemory([(0x1000, 0x100)], guard=32)
    with pytest.raises(GuestMemoryError):
        gm.memory.write(0x10FF, b"ab")
    gm.check_guards()


def test_mock_default_layout_is_aligned_and_disjoint() -> None:
    mem = PyGuestMemory.from_buffer(bytearray(0x10000))
    mock = MockSplitQueue(mem, 256, base=0x100)
    assert mock.desc_table % 16 == 0 and mock.avail_ring % 2 == 0 and mock.used_ring % 4 == 0
    assert mock.avail_ring >= mock.desc_table + 16 * 256
    assert mock.used_ring >= mock.avail_ring + 6 + 2 * 256
    assert mock.data_addr >= mock.used_ring + 6 + 8 * 256 and mock.data_addr % 4096 == 0


def test_mock_indirect_chain_writes_table_and_pointer() -> None:
    mem = PyGuestMemory.from_buffer(bytearray(0x10000))
    mock = MockSplitQueue(mem, 4)
    head = mock.add_indirect_chain([(0x100, 1), (0x200, 2, VIRTQ_DESC_F_WRITE)])
    ptr = mock.read_desc(head)
    assert ptr.flags == VIRTQ_DESC_F_INDIRECT and ptr.len == 32
    assert [mock.read_desc(i, table=ptr.addr) for i in range(2)] == [
        RawDesc(0x100, 1, VIRTQ_DESC_F_NEXT, 1),
        RawDesc(0x200, 2, VIRTQ_DESC_F_WRITE, 0),
    ]
    assert mock.avail_idx() == 1


def test_ref_queue_runs_on_python_memory() -> None:
    mem = PyGuestMemory.from_buffer(bytearray(0x10000))
    mock = MockSplitQueue(mem, 4)
    mem.write(0x8000, b"abcd")
    mock.add_chain([(0x8000, 4), (0x9000, 8, VIRTQ_DESC_F_WRITE)])
    q = mock.create_ref_queue()
    chain = q.pop_chain()
    assert chain is not None
    assert chain.read_all() == b"abcd"
    assert chain.writable_buffers() == [(0x9000, 8)]
    q.add_used(chain.head_index, 8)
    assert mock.used_elems() == [(0, 8)]
    assert mock.used_elems() == []


@pytest.mark.parametrize(
    ("event", "new", "old", "expected"),
    [(0, 1, 0, True), (1, 1, 0, False), (5, 10, 5, True), (10, 10, 5, False), (0xFFFF, 0, 0xFFFF, True)],
)
def test_vring_need_event_matches_linux(event: int, new: int, old: int, expected: bool) -> None:
    assert vring_need_event(event, new, old) is expected
