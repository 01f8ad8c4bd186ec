"""Queue: configuration, pop/add_used, u16 wrap-around, notification suppression, reset.

Each scenario drives the compiled Queue with the MockSplitQueue driver; several are
also run against the RefQueue model (``both`` fixture) so the oracle is held to the
same expectations as the core.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from virtio_queue import (
    GuestMemory,
    GuestRegion,
    InvalidAvailRingIndex,
    InvalidDescriptorIndex,
    InvalidQueueConfig,
    Queue,
    QueueError,
    QueueNotReady,
)
from virtio_queue.testing import (
    VIRTQ_DESC_F_WRITE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_USED_F_NO_NOTIFY,
    MockSplitQueue,
    RawDesc,
    RefQueue,
    vring_need_event,
    workload_a,
)

QueueFactory = Callable[..., Any]


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m, fd = GuestMemory.memfd(1 << 20)
    os.close(fd)
    yield m


@pytest.fixture(params=["core", "ref"])
def make_queue(request: pytest.FixtureRequest) -> QueueFactory:
    """Build the device side from a mock: the compiled Queue or the RefQueue model."""

    def make(mock: MockSplitQueue, **kw: Any) -> Any:
        if request.param == "core":
            return mock.create_queue(**kw)
        return mock.create_ref_queue(**kw)

    return make


# -- configuration ------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Queue, RefQueue])
@pytest.mark.parametrize("max_size", [0, 3, 100, 32769, 65536])
def test_queue_max_size_out_of_range_raises(cls: type, max_size: int) -> None:
    """VIRTIO 1.2 §2.7: Queue Size is a power of 2 and at most 32768 (rust-vmm also
    requires the device's maximum to be one)."""
    with pytest.raises(InvalidQueueConfig):
        cls(max_size)


@pytest.mark.parametrize("cls", [Queue, RefQueue])
def test_queue_new_has_max_size_and_is_not_ready(cls: type) -> None:
    q = cls(256)
    assert q.max_size == 256
    assert q.size == 256
    assert not q.ready
    assert q.next_avail() == 0 and q.next_used() == 0


@pytest.mark.parametrize("cls", [Queue, RefQueue])
@pytest.mark.parametrize("size", [0, 3, 6, 100, 255, 512])
def test_queue_size_not_power_of_two_or_above_max_raises(cls: type, size: int) -> None:
    """VIRTIO 1.2 §2.7: the queue size is a power of 2, at most the device's maximum."""
    q = cls(256)
    with pytest.raises(InvalidQueueConfig):
        q.size = size
    assert q.size == 256


@pytest.mark.parametrize("cls", [Queue, RefQueue])
@pytest.mark.parametrize("size", [1, 2, 64, 256])
def test_queue_size_power_of_two_is_accepted(cls: type, size: int) -> None:
    q = cls(256)
    q.size = size
    assert q.size == size


@pytest.mark.parametrize("cls", [Queue, RefQueue])
@pytest.mark.parametrize(
    ("field", "addr"),
    [("desc_table", 0x1008), ("avail_ring", 0x3001), ("used_ring", 0x4002)],
)
def test_queue_misaligned_ring_is_invalid(cls: type, field: str, addr: int, mem: GuestMemory) -> None:
    """VIRTIO 1.2 §2.7 table "Virtqueue Part Alignment": descriptor table 16, available
    ring 2, used ring 4 bytes."""
    mock = MockSplitQueue(mem, 16, desc_table=0x1000, avail_ring=0x3000, used_ring=0x4000)
    q = mock.create_ref_queue() if cls is RefQueue else mock.create_queue()
    assert q.is_valid()
    with pytest.raises(InvalidQueueConfig):
        setattr(q, field, addr)  # the setter may refuse it right away...
        q.validate()  # ...or validate() must
    assert not q.is_valid() or getattr(q, field) != addr


@pytest.mark.parametrize("cls", [Queue, RefQueue])
@pytest.mark.parametrize(
    ("field", "addr"),
    [
        ("desc_table", (1 << 20) - 0x80),  # 16*16 bytes do not fit
        ("avail_ring", (1 << 20) - 36),  # 6 + 2*16 = 38 bytes do not fit
        ("used_ring", (1 << 20) - 132),  # 6 + 8*16 = 134 bytes do not fit
        ("used_ring", 1 << 32),
    ],
)
def test_queue_ring_outside_memory_is_invalid(cls: type, field: str, addr: int, mem: GuestMemory) -> None:
    """VIRTIO 1.2 §2.7: the rings (with their event fields) must lie in guest memory."""
    mock = MockSplitQueue(mem, 16)
    q = mock.create_ref_queue() if cls is RefQueue else mock.create_queue()
    setattr(q, field, addr)
    assert not q.is_valid()
    with pytest.raises(InvalidQueueConfig):
        q.validate()


def test_queue_without_memory_pop_raises_not_ready() -> None:
    q = Queue(16)
    with pytest.raises(QueueNotReady):
        q.ready = True  # may already refuse...
        q.pop_chain()  # ...else popping must


def test_queue_not_ready_pop_raises(make_queue: QueueFactory, mem: GuestMemory) -> None:
    mock = MockSplitQueue(mem, 16)
    mock.add_chain([(0x8000, 16)])
    q = make_queue(mock)
    q.ready = False
    with pytest.raises(QueueNotReady):
        q.pop_chain()


# -- pop / add_used -----------------------------------------------------------------


def test_queue_pop_returns_chains_in_avail_order(make_queue: QueueFactory, mem: GuestMemory) -> None:
    mock = MockSplitQueue(mem, 16)
    heads = [mock.add_chain([(0x8000 + 0x100 * i, 0x10)]) for i in range(5)]
    q = make_queue(mock)
    assert q.avail_idx() == 5 and q.pending() == 5
    got = [c.head_index for c in q]
    assert got == heads
    assert q.pop_chain() is None
    assert q.next_avail() == 5 and q.pending() == 0


def test_queue_add_used_writes_elem_and_idx(make_queue: QueueFactory, mem: GuestMemory) -> None:
    mock = MockSplitQueue(mem, 16)
    mock.add_chain([(0x8000, 0x10), (0x9000, 0x20, VIRTQ_DESC_F_WRITE)])
    mock.add_chain([(0xA000, 0x10)])
    q = make_queue(mock)
    for chain in q:
        q.add_used(chain.head_index, 0x20 + chain.head_index)
    assert mock.used_idx() == 2 and q.used_idx() == 2 and q.next_used() == 2
    assert mock.used_elems() == [(0, 0x20), (2, 0x22)]


def test_queue_add_used_head_out_of_range_raises(make_queue: QueueFactory, mem: GuestMemory) -> None:
    """VIRTIO 1.2 §2.7.8: used->ring[].id is a descriptor chain head, below the queue size."""
    mock = MockSplitQueue(mem, 16)
    q = make_queue(mock)
    with pytest.raises(InvalidDescriptorIndex):
        q.add_used(16, 0)
    assert mock.used_idx() == 0
    assert mock.read_used(0, 1) == [(0, 0)]


def test_queue_head_out_of_range_raises_and_consumes_entry(
    make_queue: QueueFactory, mem: GuestMemory
) -> None:
    """VIRTIO 1.2 §2.7.6: avail->ring[] holds heads of descriptor chains (< queue size).
    The bad entry is consumed so the next pop goes on."""
    mock = MockSplitQueue(mem, 16)
    mock.add_avail(16)
    good = mock.add_chain([(0x8000, 4)])
    q = make_queue(mock)
    with pytest.raises(InvalidDescriptorIndex):
        q.pop_chain()
    assert q.next_avail() == 1
    chain = q.pop_chain()
    assert chain is not None and chain.head_index == good


def test_queue_avail_idx_too_far_ahead_raises(make_queue: QueueFactory, mem: GuestMemory) -> None:
    """rust-vmm InvalidAvailRingIndex: avail->idx − next_avail can never exceed the queue
    size (VIRTIO 1.2 §2.7.13: the driver only adds as many heads as the ring holds)."""
    mock = MockSplitQueue(mem, 16)
    mock.build_desc_chain([(0x8000, 4)], start=0)
    mock.set_avail_idx(17)
    q = make_queue(mock)
    with pytest.raises(InvalidAvailRingIndex):
        q.pop_chain()
    assert q.next_avail() == 0
    mock.set_avail_idx(16)  # exactly a full ring is fine
    assert q.pop_chain() is not None


def test_queue_avail_idx_behind_next_avail_raises(make_queue: QueueFactory, mem: GuestMemory) -> None:
    """avail->idx moving backwards looks like 65535 pending entries."""
    mock = MockSplitQueue(mem, 16)
    mock.add_chain([(0x8000, 4)])
    q = make_queue(mock)
    assert q.pop_chain() is not None
    mock.set_avail_idx(0)
    with pytest.raises(InvalidAvailRingIndex):
        q.pop_chain()


def test_queue_same_head_twice_pops_twice(make_queue: QueueFactory, mem: GuestMemory) -> None:
    mock = MockSplitQueue(mem, 16)
    head = mock.add_chain([(0x8000, 4)])
    mock.add_avail(head)
    q = make_queue(mock)
    assert [c.head_index for c in q] == [head, head]


# -- u16 wrap-around ---------------------------------------------------------------


@pytest.mark.parametrize("start", [65530, 65535, 65520])
def test_queue_indexes_wrap_at_u16(make_queue: QueueFactory, mem: GuestMemory, start: int) -> None:
    """VIRTIO 1.2 §2.7.6/§2.7.8: idx fields wrap naturally at 65536; ring slot is idx % size."""
    mock = MockSplitQueue(mem, 8)
    mock.set_avail_idx(start)
    q = make_queue(mock)
    q.set_next_avail(start)
    q.set_next_used(start)
    mem.write_u16(mock.used_ring + 2, start)
    mock.last_used = start
    heads = [mock.add_chain([(0x8000 + 0x10 * i, 0x10)]) for i in range(8)]
    assert mock.avail_idx() == (start + 8) & 0xFFFF
    assert q.pending() == 8
    got = []
    for chain in q:
        got.append(chain.head_index)
        q.add_used(chain.head_index, 1)
    assert got == heads
    assert q.next_avail() == (start + 8) & 0xFFFF
    assert q.next_used() == (start + 8) & 0xFFFF
    assert mock.used_idx() == (start + 8) & 0xFFFF
    assert mock.used_elems() == [(h, 1) for h in heads]


def test_queue_set_next_avail_resumes_from_that_slot(make_queue: QueueFactory, mem: GuestMemory) -> None:
    """vhost-user SET_VRING_BASE: the device resumes at the given avail index."""
    mock = MockSplitQueue(mem, 8)
    heads = [mock.add_chain([(0x8000 + 0x10 * i, 0x10)]) for i in range(4)]
    q = make_queue(mock)
    q.set_next_avail(2)
    assert q.pending() == 2
    assert [c.head_index for c in q] == heads[2:]


# -- notifications ------------------------------------------------------------------


def test_queue_needs_notification_honours_no_interrupt(make_queue: QueueFactory, mem: GuestMemory) -> None:
    """VIRTIO 1.2 §2.7.7.2: without EVENT_IDX the device SHOULD NOT notify if the driver
    set VRING_AVAIL_F_NO_INTERRUPT."""
    mock = MockSplitQueue(mem, 8)
    q = make_queue(mock)
    assert q.needs_notification()
    mock.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
    assert not q.needs_notification()


def test_queue_disable_enable_notification_toggles_no_notify(
    make_queue: QueueFactory, mem: GuestMemory
) -> None:
    """VIRTIO 1.2 §2.7.10: without EVENT_IDX the device suppresses kicks with
    VRING_USED_F_NO_NOTIFY in used->flags."""
    mock = MockSplitQueue(mem, 8)
    q = make_queue(mock)
    q.disable_notification()
    assert mock.used_flags() & VRING_USED_F_NO_NOTIFY
    assert q.enable_notification() is False
    assert not mock.used_flags() & VRING_USED_F_NO_NOTIFY


def test_queue_enable_notification_reports_pending(make_queue: QueueFactory, mem: GuestMemory) -> None:
    """rust-vmm enable_notification: True when chains arrived before notifications were
    re-enabled, so the device polls again instead of missing them."""
    mock = MockSplitQueue(mem, 8)
    q = make_queue(mock)
    q.disable_notification()
    mock.add_chain([(0x8000, 4)])
    assert q.enable_notification() is True
    assert q.pop_chain() is not None
    assert q.enable_notification() is False


def test_queue_event_idx_enable_writes_avail_event(make_queue: QueueFactory, mem: GuestMemory) -> None:
    """VIRTIO 1.2 §2.7.10: with EVENT_IDX the device writes avail_event (the used
    ring's trailing u16) = the next avail index it wants a kick for."""
    mock = MockSplitQueue(mem, 8)
    for i in range(3):
        mock.add_chain([(0x8000 + 0x10 * i, 4)])
    q = make_queue(mock, event_idx=True)
    assert q.pop_chain() is not None and q.pop_chain() is not None
    assert q.enable_notification() is True
    assert mock.avail_event() == 2
    assert mock.used_flags() == 0


def test_queue_event_idx_disable_is_noop(make_queue: QueueFactory, mem: GuestMemory) -> None:
    mock = MockSplitQueue(mem, 8)
    q = make_queue(mock, event_idx=True)
    before = mem.read(mock.used_ring, 6 + 8 * 8)
    q.disable_notification()
    assert mem.read(mock.used_ring, 6 + 8 * 8) == before


@pytest.mark.parametrize(
    ("used_event", "n_used", "expected"),
    [
        (0, 1, True),  # used_event == old: the first new entry crosses it
        (0, 3, True),
        (2, 3, True),  # used_event = new - 1
        (3, 3, False),  # not reached yet
        (5, 3, False),
        (0xFFFF, 3, False),  # "behind": already signalled
    ],
)
def test_queue_event_idx_needs_notification_follows_vring_need_event(
    make_queue: QueueFactory, mem: GuestMemory, used_event: int, n_used: int, expected: bool
) -> None:
    """VIRTIO 1.2 §2.7.10 / Linux vring_need_event(used_event, new, old)."""
    mock = MockSplitQueue(mem, 8)
    for i in range(n_used):
        mock.add_chain([(0x8000 + 0x10 * i, 4)])
    mock.set_used_event(used_event)
    q = make_queue(mock, event_idx=True)
    q.needs_notification()  # the first check has no "old" index and answers True
    for chain in q:
        q.add_used(chain.head_index, 0)
    assert vring_need_event(used_event, n_used, 0) == expected
    assert q.needs_notification() == expected


def test_queue_event_idx_counts_from_the_previous_check(make_queue: QueueFactory, mem: GuestMemory) -> None:
    """The window is [used idx at the previous needs_notification, new used idx)."""
    mock = MockSplitQueue(mem, 8)
    for i in range(4):
        mock.add_chain([(0x8000 + 0x10 * i, 4)])
    q = make_queue(mock, event_idx=True)
    mock.set_used_event(1)
    assert q.needs_notification() is True  # no previous check: notify to be safe
    chains = list(q)
    q.add_used(chains[0].head_index, 0)
    q.add_used(chains[1].head_index, 0)
    assert q.needs_notification() is True  # 1 in [0, 2)
    assert q.needs_notification() is False  # nothing new
    q.add_used(chains[2].head_index, 0)
    assert q.needs_notification() is False  # 1 not in [2, 3)
    mock.set_used_event(3)
    q.add_used(chains[3].head_index, 0)
    assert q.needs_notification() is True  # 3 in [3, 4)


def test_queue_event_idx_first_check_notifies(make_queue: QueueFactory, mem: GuestMemory) -> None:
    """Linux vhost_notify: with no previous check (signalled_used_valid false) the
    device notifies, whatever used_event says; set_next_used starts over."""
    mock = MockSplitQueue(mem, 8)
    mock.set_used_event(100)
    q = make_queue(mock, event_idx=True)
    assert q.needs_notification() is True
    assert q.needs_notification() is False
    q.set_next_used(0)
    assert q.needs_notification() is True


def test_queue_event_idx_ignores_no_interrupt_flag(make_queue: QueueFactory, mem: GuestMemory) -> None:
    """VIRTIO 1.2 §2.7.7: with EVENT_IDX the device ignores avail->flags and uses
    used_event instead."""
    mock = MockSplitQueue(mem, 8)
    mock.add_chain([(0x8000, 4)])
    mock.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
    mock.set_used_event(0)
    q = make_queue(mock, event_idx=True)
    chain = q.pop_chain()
    assert chain is not None
    q.add_used(chain.head_index, 0)
    assert q.needs_notification() is True


# -- reset ---------------------------------------------------------------------------


def test_queue_reset_returns_to_initial_state(make_queue: QueueFactory, mem: GuestMemory) -> None:
    mock = MockSplitQueue(mem, 8)
    mock.add_chain([(0x8000, 4)])
    q = make_queue(mock, event_idx=True)
    chain = q.pop_chain()
    assert chain is not None
    q.add_used(chain.head_index, 0)
    q.reset()
    assert not q.ready
    assert q.size == q.max_size
    assert q.next_avail() == 0 and q.next_used() == 0
    assert not q.event_idx
    with pytest.raises(QueueNotReady):
        q.pop_chain()


def test_queue_reset_then_reconfigure_works_again(mem: GuestMemory) -> None:
    mock = MockSplitQueue(mem, 8)
    mock.add_chain([(0x8000, 4)])
    q = mock.create_queue()
    q.reset()
    q.size = 8
    q.desc_table, q.avail_ring, q.used_ring = mock.desc_table, mock.avail_ring, mock.used_ring
    q.ready = True
    chain = q.pop_chain()
    assert chain is not None and chain.head_index == 0


# -- the mock / workload A ------------------------------------------------------------


def test_mock_publish_batch_wraps_round_the_ring(mem: GuestMemory) -> None:
    mock = MockSplitQueue(mem, 8)
    mock.set_avail_idx(5)
    mem.write_u16(mock.used_ring + 2, 5)  # the device gave the first five back
    mock.publish([1, 2, 3, 4, 5])
    assert mock.avail_idx() == 10
    ring = [mem.read_u16(mock.avail_ring + 4 + 2 * i) for i in range(8)]
    assert ring[5:8] == [1, 2, 3] and ring[0:2] == [4, 5]


@pytest.mark.parametrize("base", [0, 0xFFFD])
def test_mock_publish_refuses_more_than_the_ring_outstanding(mem: GuestMemory, base: int) -> None:
    """VIRTIO 1.2 §2.7.6: a driver MUST NOT make more than the queue size of buffers
    available at once (avail idx - used idx), across the u16 wrap too."""
    mock = MockSplitQueue(mem, 8)
    mock.set_avail_idx(base)
    mem.write_u16(mock.used_ring + 2, base)
    mock.publish([0, 1, 2, 3, 4, 5])
    message = r"cannot publish 3 heads on a ring of 8: avail idx \d+, used idx \d+.*9 would be outstanding"
    with pytest.raises(ValueError, match=message):
        mock.publish([6, 7, 0])
    mem.write_u16(mock.used_ring + 2, (base + 1) & 0xFFFF)  # one came back
    mock.publish([6, 7, 0])
    assert (mock.avail_idx() - mem.read_u16(mock.used_ring + 2)) & 0xFFFF == 8


@pytest.mark.parametrize("base", [0, 0xFFFD])
def test_mock_publish_refuses_a_used_idx_past_avail_idx(mem: GuestMemory, base: int) -> None:
    """VIRTIO 1.2 §2.7.8: the device uses only buffers it was given, so used idx
    never passes avail idx; a driver that meets it reports the device's fault."""
    mock = MockSplitQueue(mem, 8)
    mock.set_avail_idx(base)
    mem.write_u16(mock.used_ring + 2, (base + 2) & 0xFFFF)
    with pytest.raises(ValueError, match=r"used idx \d+ is 2 ahead of avail idx \d+ \(queue size 8\)"):
        mock.publish([0])


def test_mock_publish_unchecked_is_the_driver_side_alone(mem: GuestMemory) -> None:
    """``checked=False`` (a benchmark of the driver side with no device taking the
    buffers) publishes past the invariant, but never more than the ring holds."""
    mock = MockSplitQueue(mem, 8)
    mock.publish(list(range(8)))
    mock.publish(list(range(8)), checked=False)
    assert mock.avail_idx() == 16
    with pytest.raises(ValueError, match="cannot publish 9 heads on a ring of 8"):
        mock.publish(list(range(9)), checked=False)


def test_mock_workload_a_layout_and_queue_round_trip() -> None:
    mock = workload_a()
    assert (mock.desc_table, mock.avail_ring, mock.used_ring) == (0x0, 0x1000, 0x2000)
    mock.publish_all()
    q = mock.create_queue()
    n = 0
    for chain in q:
        (d,) = chain.descriptors()
        assert (d.addr, d.len, d.flags) == (0x4000 + 64 * chain.head_index, 64, 0)
        q.add_used(chain.head_index, 64)
        n += 1
    assert n == 256
    assert mock.used_elems() == [(i, 64) for i in range(256)]
    mock.publish_all()  # the next batch reuses the same descriptors
    assert q.pending() == 256


# -- the queue follows guest memory ------------------------------------------------------


def test_queue_ring_region_removed_pop_raises_then_recovers(mem: GuestMemory) -> None:
    """The rings must lie in guest memory (VIRTIO 1.2 §2.7); when the front-end removes
    their region the queue refuses to run instead of touching a stale mapping."""
    mock = MockSplitQueue(mem, 8)
    mock.add_chain([(0x8000, 4)])
    q = mock.create_queue()
    region = mem.remove_region(0)
    with pytest.raises(QueueError):
        q.pop_chain()
    assert not q.is_valid()
    mem.add_region(region)
    chain = q.pop_chain()
    assert chain is not None and chain.head_index == 0


def test_queue_moving_desc_table_while_ready_uses_new_table(mem: GuestMemory) -> None:
    mock = MockSplitQueue(mem, 8)
    mock.add_chain([(0x8000, 4)])
    mock.add_chain([(0x8000, 4)])
    q = mock.create_queue()
    assert q.pop_chain() is not None
    mock.write_descs(0, [(0x9000, 7)] * 8, table=0x10000)
    q.desc_table = 0x10000
    chain = q.pop_chain()
    assert chain is not None
    assert [(d.addr, d.len) for d in chain.descriptors()] == [(0x9000, 7)]


def test_queue_used_ring_in_readonly_region_is_invalid() -> None:
    """The device writes the used ring (VIRTIO 1.2 §2.7.8): it must be writable."""
    region, fd = GuestRegion.memfd(0x10000, 0)
    try:
        ro = GuestRegion.from_fd(fd, 0x10000, 0x100000, writable=False)
    finally:
        os.close(fd)
    mem = GuestMemory([region, ro])
    mock = MockSplitQueue(mem, 8)
    mock.add_chain([(0x8000, 4)])
    q = mock.create_queue()
    q.used_ring = 0x100000 + mock.used_ring  # the same bytes, mapped read-only
    assert not q.is_valid()
    with pytest.raises(InvalidQueueConfig):
        q.validate()
    with pytest.raises(QueueError):
        q.add_used(0, 1)


def test_queue_resubmit_serves_heads_before_avail_ring(mem: GuestMemory) -> None:
    """vhost-user "Inflight I/O tracking": in-flight heads are served again first."""
    mock = MockSplitQueue(mem, 16)
    q = mock.create_queue()
    a = mock.add_chain([RawDesc(0x8000, 16, VIRTQ_DESC_F_WRITE, 0)])
    b = mock.add_chain([RawDesc(0x9000, 16, VIRTQ_DESC_F_WRITE, 0)])
    fresh = mock.add_chain([RawDesc(0xA000, 16, VIRTQ_DESC_F_WRITE, 0)])
    q.set_next_avail(2)  # a and b were popped by the previous back-end
    q.resubmit([b, a])
    assert [c.head_index for c in q] == [b, a, fresh]
    assert q.pop_chain() is None


def test_queue_resubmit_head_out_of_range_refused(mem: GuestMemory) -> None:
    q = MockSplitQueue(mem, 16).create_queue()
    with pytest.raises(InvalidDescriptorIndex):
        q.resubmit([16])


def test_queue_chain_at_walks_any_head_without_popping(mem: GuestMemory) -> None:
    mock = MockSplitQueue(mem, 16)
    q = mock.create_queue()
    head = mock.build_desc_chain([RawDesc(0x8000, 8, 0, 0), RawDesc(0x9000, 4, VIRTQ_DESC_F_WRITE, 0)])
    chain = q.chain_at(head)
    assert [(d.addr, d.len) for d in chain] == [(0x8000, 8), (0x9000, 4)]
    assert q.pop_chain() is None  # nothing was made available
    with pytest.raises(InvalidDescriptorIndex):
        q.chain_at(16)


def _source(tmp_path: Any, data: bytes) -> int:
    path = tmp_path / "src"
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


def test_queue_fill_from_fd_serves_single_writable_buffers(mem: GuestMemory, tmp_path: Any) -> None:
    """VIRTIO 1.2 §5.4: each request is one device-writable buffer, filled in order."""
    mock = MockSplitQueue(mem, 16)
    q = mock.create_queue()
    heads = [mock.add_chain([RawDesc(0x8000 + 0x100 * i, 16, VIRTQ_DESC_F_WRITE, 0)]) for i in range(3)]
    fd = _source(tmp_path, bytes(range(48)))
    try:
        assert q.fill_from_fd(fd) == (3, 48, None)
    finally:
        os.close(fd)
    assert mock.used_elems() == [(h, 16) for h in heads]
    got = [mem.read(0x8000 + 0x100 * i, 16) for i in range(3)]
    assert got == [bytes(range(16 * i, 16 * i + 16)) for i in range(3)]


def test_queue_fill_from_fd_returns_other_shapes_to_the_caller(mem: GuestMemory, tmp_path: Any) -> None:
    mock = MockSplitQueue(mem, 16)
    q = mock.create_queue()
    ok = mock.add_chain([RawDesc(0x8000, 8, VIRTQ_DESC_F_WRITE, 0)])
    two = mock.add_chain(
        [RawDesc(0x9000, 8, VIRTQ_DESC_F_WRITE, 0), RawDesc(0x9100, 8, VIRTQ_DESC_F_WRITE, 0)]
    )
    readable = mock.add_chain([RawDesc(0xA000, 8, 0, 0)])
    fd = _source(tmp_path, bytes(64))
    try:
        served, nbytes, chain = q.fill_from_fd(fd)
        assert (served, nbytes, chain.head_index if chain else None) == (1, 8, two)
        served, nbytes, chain = q.fill_from_fd(fd)
        assert (served, nbytes, chain.head_index if chain else None) == (0, 0, readable)
        guard = mem.read(0xA000, 8)
        assert q.fill_from_fd(fd) == (0, 0, None)
        assert mem.read(0xA000, 8) == guard  # never wrote the device-readable buffer
    finally:
        os.close(fd)
    assert mock.used_elems() == [(ok, 8)]


def test_queue_fill_from_fd_end_of_file_and_limits(mem: GuestMemory, tmp_path: Any) -> None:
    mock = MockSplitQueue(mem, 16)
    q = mock.create_queue()
    first = mock.add_chain([RawDesc(0x8000, 8, VIRTQ_DESC_F_WRITE, 0)])
    second = mock.add_chain([RawDesc(0x9000, 8, VIRTQ_DESC_F_WRITE, 0)])
    fd = _source(tmp_path, b"12345")
    try:
        assert q.fill_from_fd(fd, max_chains=1) == (1, 5, None)  # short read served
        served, nbytes, chain = q.fill_from_fd(fd)  # end of file: the caller decides
        assert (served, nbytes, chain.head_index if chain else None) == (0, 0, second)
    finally:
        os.close(fd)
    assert mock.used_elems() == [(first, 5)]


def test_queue_fill_from_fd_leaves_bad_head_for_pop_chain(mem: GuestMemory, tmp_path: Any) -> None:
    """VIRTIO 1.2 §2.7.6: a head index must be below the queue size."""
    mock = MockSplitQueue(mem, 16)
    q = mock.create_queue()
    mock.add_avail(99)
    fd = _source(tmp_path, bytes(8))
    try:
        assert q.fill_from_fd(fd) == (0, 0, None)
    finally:
        os.close(fd)
    with pytest.raises(InvalidDescriptorIndex):
        q.pop_chain()


def test_queue_inflight_area_tracks_pop_and_used(mem: GuestMemory) -> None:
    """vhost-user "Inflight I/O tracking", split rings: a popped head is in flight
    with a rising counter; a used one is linked into the last batch, then cleared
    once used->idx is published, and the area's used_idx follows."""
    import struct  # noqa: PLC0415

    mock = MockSplitQueue(mem, 16)
    q = mock.create_queue()
    area = bytearray(16 + 16 * 16)
    struct.pack_into("<QHHHH", area, 0, 0, 1, 16, 0, 0)  # features, version, desc_num
    q.set_inflight(area, counter=41)
    a = mock.add_chain([RawDesc(0x8000, 8, VIRTQ_DESC_F_WRITE, 0)])
    b = mock.add_chain([RawDesc(0x9000, 8, VIRTQ_DESC_F_WRITE, 0)])
    ca, cb = q.pop_chain(), q.pop_chain()
    assert ca is not None and cb is not None

    def desc(head: int) -> tuple[int, int, int]:
        inflight, nxt, counter = struct.unpack_from("<B5xHQ", area, 16 + 16 * head)
        return inflight, nxt, counter

    assert desc(a)[::2] == (1, 42) and desc(b)[::2] == (1, 43)
    assert q.inflight_counter == 43
    q.add_used(b, 8)
    assert desc(b)[0] == 0 and desc(a)[0] == 1
    _f, _v, _n, last_batch_head, used_idx = struct.unpack_from("<QHHHH", area, 0)
    assert (last_batch_head, used_idx) == (b, 1)
    q.add_used(a, 8)
    assert desc(a)[:2] == (0, b)  # linked to the previous batch head
    assert struct.unpack_from("<QHHHH", area, 0)[3:] == (a, 2)
    q.set_inflight(None)
    mock.add_chain([RawDesc(0xA000, 8, VIRTQ_DESC_F_WRITE, 0)])
    assert q.pop_chain() is not None and q.inflight_counter == 43  # no longer tracked


def test_queue_inflight_area_too_small_refused() -> None:
    q = Queue(16)
    area = bytearray(16 + 16 * 4)
    area[10] = 16  # desc_num 16 needs 16 + 256 bytes
    with pytest.raises(InvalidQueueConfig):
        q.set_inflight(area)


@pytest.mark.parametrize("event_idx", [False, True])
def test_queue_fill_from_fd_suppress_reenables_notifications(
    mem: GuestMemory, tmp_path: Any, event_idx: bool
) -> None:
    """VIRTIO 1.2 §2.7.10: after draining, the device asks for kicks again."""
    mock = MockSplitQueue(mem, 16)
    q = mock.create_queue()
    q.event_idx = event_idx
    for i in range(3):
        mock.add_chain([RawDesc(0x8000 + 0x100 * i, 8, VIRTQ_DESC_F_WRITE, 0)])
    fd = _source(tmp_path, bytes(64))
    try:
        assert q.fill_from_fd(fd, suppress=True) == (3, 24, None)
    finally:
        os.close(fd)
    used_flags = mem.read_u16(q.used_ring)
    assert used_flags & VRING_USED_F_NO_NOTIFY == 0
    if event_idx:
        assert mem.read_u16(q.used_ring + 4 + 8 * q.size) == q.next_avail() == 3


def _pipe_with(data: bytes) -> tuple[int, int]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.write(w, data)
    return r, w


def test_queue_fill_from_fd_short_read_serves_the_chains_it_reached(mem: GuestMemory) -> None:
    """One read fills a run of requests in ring order; a short read serves the
    chains it reached (the last one partly, VIRTIO 1.2 §5.4 lets the device return
    fewer bytes) and leaves the rest available."""
    mock = MockSplitQueue(mem, 16)
    q = mock.create_queue()
    heads = [mock.add_chain([RawDesc(0x8000 + 0x100 * i, 16, VIRTQ_DESC_F_WRITE, 0)]) for i in range(3)]
    r, w = _pipe_with(bytes(range(20)))
    try:
        served, nbytes, chain = q.fill_from_fd(r)
        # The third request got nothing: the empty pipe (EAGAIN) is the caller's.
        assert (served, nbytes) == (2, 20)
        assert chain is not None and chain.head_index == heads[2]
        assert mock.used_elems() == [(heads[0], 16), (heads[1], 4)]
        assert mem.read(0x8000, 16) == bytes(range(16))
        assert mem.read(0x8100, 4) == bytes(range(16, 20))
        assert q.pending() == 0
    finally:
        os.close(r)
        os.close(w)


def test_queue_fill_from_fd_more_chains_than_one_read_and_limits(mem: GuestMemory, tmp_path: Any) -> None:
    mock = MockSplitQueue(mem, 256)
    q = mock.create_queue()
    heads = [mock.add_chain([RawDesc(0x10000 + 0x40 * i, 8, VIRTQ_DESC_F_WRITE, 0)]) for i in range(150)]
    data = bytes(i & 0xFF for i in range(8 * 150))
    fd = _source(tmp_path, data)
    try:
        assert q.fill_from_fd(fd, max_chains=70) == (70, 560, None)
        assert q.pending() == 80
        assert q.fill_from_fd(fd) == (80, 640, None)
    finally:
        os.close(fd)
    assert mock.used_elems() == [(h, 8) for h in heads]
    assert b"".join(mem.read(0x10000 + 0x40 * i, 8) for i in range(150)) == data


def test_queue_fill_from_fd_zero_length_buffers_are_used_empty(mem: GuestMemory, tmp_path: Any) -> None:
    mock = MockSplitQueue(mem, 16)
    q = mock.create_queue()
    a = mock.add_chain([RawDesc(0x8000, 0, VIRTQ_DESC_F_WRITE, 0)])
    b = mock.add_chain([RawDesc(0x9000, 4, VIRTQ_DESC_F_WRITE, 0)])
    c = mock.add_chain([RawDesc(0xA000, 0, VIRTQ_DESC_F_WRITE, 0)])
    fd = _source(tmp_path, b"abcd")
    try:
        assert q.fill_from_fd(fd) == (3, 4, None)
    finally:
        os.close(fd)
    assert mock.used_elems() == [(a, 0), (b, 4), (c, 0)]
    assert mem.read(0x9000, 4) == b"abcd"


def test_queue_fill_from_fd_keeps_the_inflight_area_current(mem: GuestMemory, tmp_path: Any) -> None:
    import struct  # noqa: PLC0415

    mock = MockSplitQueue(mem, 16)
    q = mock.create_queue()
    area = bytearray(16 + 16 * 16)
    struct.pack_into("<QHHHH", area, 0, 0, 1, 16, 0, 0)
    q.set_inflight(area, counter=7)
    heads = [mock.add_chain([RawDesc(0x8000 + 0x100 * i, 8, VIRTQ_DESC_F_WRITE, 0)]) for i in range(3)]
    fd = _source(tmp_path, bytes(24))
    try:
        assert q.fill_from_fd(fd) == (3, 24, None)
    finally:
        os.close(fd)
    assert q.inflight_counter == 10
    assert all(area[16 + 16 * h] == 0 for h in heads)  # none left in flight
    assert struct.unpack_from("<H", area, 14)[0] == 3  # the area's used_idx


def test_queue_fill_from_fd_hands_resubmitted_chains_to_the_caller(mem: GuestMemory, tmp_path: Any) -> None:
    """Requests resubmitted after a reconnect (inflight tracking) come first, through
    the caller's general path; the ring's own requests follow on the fast path."""
    mock = MockSplitQueue(mem, 16)
    q = mock.create_queue()
    old = mock.add_chain([RawDesc(0x8000, 8, VIRTQ_DESC_F_WRITE, 0)])
    assert q.pop_chain() is not None
    new = mock.add_chain([RawDesc(0x9000, 8, VIRTQ_DESC_F_WRITE, 0)])
    q.resubmit([old])
    fd = _source(tmp_path, bytes(16))
    try:
        served, nbytes, chain = q.fill_from_fd(fd)
        assert (served, nbytes) == (0, 0) and chain is not None and chain.head_index == old
        q.add_used(old, 0)
        assert q.fill_from_fd(fd) == (1, 8, None)
    finally:
        os.close(fd)
    assert mock.used_elems() == [(old, 0), (new, 8)]


def test_queue_unpop_serves_the_head_again_whichever_way_it_came(mem: GuestMemory) -> None:
    """A chain popped and left unused is given back with ``unpop``: from the avail
    ring or from the resubmit list, the next pop returns it, and every head is
    popped once more only (§2.7.13: no avail entry served twice)."""
    mock = MockSplitQueue(mem, 16)
    q = mock.create_queue()
    a = mock.add_chain([RawDesc(0x8000, 16, VIRTQ_DESC_F_WRITE, 0)])
    b = mock.add_chain([RawDesc(0x9000, 16, VIRTQ_DESC_F_WRITE, 0)])
    c = mock.add_chain([RawDesc(0xA000, 16, VIRTQ_DESC_F_WRITE, 0)])
    q.set_next_avail(1)  # a was in flight with the previous back-end
    q.resubmit([a])
    first = q.pop_chain()
    assert first.head_index == a
    q.unpop(a)  # from the resubmit list
    assert q.pop_chain().head_index == a
    second = q.pop_chain()
    assert second.head_index == b
    q.unpop(b)  # from the avail ring
    assert [ch.head_index for ch in q] == [b, c]
    assert q.pop_chain() is None


def test_queue_unpop_head_out_of_range_refused(mem: GuestMemory) -> None:
    q = MockSplitQueue(mem, 16).create_queue()
    with pytest.raises(InvalidDescriptorIndex, match="unpopped head index 16"):
        q.unpop(16)
