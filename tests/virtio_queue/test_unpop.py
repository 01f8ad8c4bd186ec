"""Queue.unpop / unpop_many / pop_index: giving back chains popped and left unused.

A chain comes from the avail ring or, after a vhost-user reconnect with inflight
tracking, from the resubmit list (whose pops leave ``next_avail`` alone).  Given
back, it is popped next, whichever way it came; no avail entry is served twice and
none is skipped (VIRTIO 1.2 §2.7.13: each buffer is used once).  The property test
holds the queue to a plain model of what the driver sees.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_queue import GuestMemory, GuestRegion, InvalidDescriptorIndex, Queue, QueueNotReady
from virtio_queue.testing import VIRTQ_DESC_F_WRITE, MockSplitQueue, RawDesc

SIZE = 8


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    memory, fd = GuestMemory.memfd(1 << 16)
    try:
        yield memory
    finally:
        os.close(fd)


def _submit(mock: MockSplitQueue, head: int) -> None:
    """The driver makes the one-buffer chain ``head`` available."""
    mock.write_desc(head, RawDesc(0x8000 + 0x100 * head, 16, VIRTQ_DESC_F_WRITE, 0))
    mock.add_avail(head)


def _heads(q: Queue) -> list[int]:
    return [ch.head_index for ch in q]


def _heads_once(q: Queue) -> int | None:
    chain = q.pop_chain()
    return None if chain is None else chain.head_index


def _reconnect(q: Queue, in_flight: list[int]) -> None:
    """What the handler does after a reconnect with an inflight area."""
    q.set_next_avail((q.used_idx() + len(in_flight)) & 0xFFFF)
    q.resubmit(in_flight)


def test_unpop_of_an_avail_chain_steps_next_avail_back(mem: GuestMemory) -> None:
    """GET_VRING_BASE after the give-back reports the chain as not consumed."""
    mock = MockSplitQueue(mem, SIZE)
    q = mock.create_queue()
    for h in (3, 5):
        _submit(mock, h)
    assert _heads(q) == [3, 5]
    q.unpop(5)
    q.unpop(3)
    assert (q.next_avail(), q.pop_index()) == (0, 0)
    assert _heads(q) == [3, 5]


def test_unpop_of_a_resubmitted_chain_keeps_the_avail_entry_consumed(mem: GuestMemory) -> None:
    """Head 1 was in flight, head 2 (the avail entry behind next_avail) was used
    before the reconnect: giving 1 back must not serve 2 again, and 1 comes next."""
    mock = MockSplitQueue(mem, SIZE)
    q = mock.create_queue()
    for h in (1, 2):
        _submit(mock, h)
    assert _heads(q) == [1, 2]
    q.add_used(2, 0)
    _reconnect(q, [1])
    _submit(mock, 4)
    assert _heads_once(q) == 1
    q.unpop(1)
    assert q.next_avail() == 2
    assert _heads(q) == [1, 4]
    assert [h for h, _ in mock.used_elems()] == [2]


def test_unpop_many_returns_the_chains_in_their_order(mem: GuestMemory) -> None:
    """A resubmitted chain and avail chains popped after it, given back together."""
    mock = MockSplitQueue(mem, SIZE)
    q = mock.create_queue()
    for h in (0, 1):
        _submit(mock, h)
    assert _heads(q) == [0, 1]
    q.add_used(1, 0)
    _reconnect(q, [0])
    for h in (6, 7):
        _submit(mock, h)
    popped = _heads(q)
    assert popped == [0, 6, 7]
    assert q.pop_index() == 4
    q.unpop_many(popped)
    assert q.pop_index() == 1
    assert q.next_avail() == 2  # 6 and 7 back in the ring, 0 in the resubmit list
    assert _heads(q) == [0, 6, 7]


def test_unpop_many_checks_every_head_first(mem: GuestMemory) -> None:
    mock = MockSplitQueue(mem, SIZE)
    q = mock.create_queue()
    _submit(mock, 2)
    assert _heads(q) == [2]
    for bad in (SIZE, 1 << 16, -1):
        with pytest.raises(InvalidDescriptorIndex, match=f"unpopped head index {bad} out of range"):
            q.unpop_many([2, bad])
    assert (q.next_avail(), q.pop_index()) == (1, 1)
    assert _heads(q) == []


def test_unpop_on_a_stopped_queue_reads_its_ring(mem: GuestMemory) -> None:
    """GET_VRING_BASE stops the ring, then the device gives its chains back: the
    ring base then reports them as not consumed."""
    mock = MockSplitQueue(mem, SIZE)
    q = mock.create_queue()
    _submit(mock, 3)
    assert _heads(q) == [3]
    q.ready = False
    q.unpop(3)
    assert q.next_avail() == 0


@pytest.mark.parametrize("tracked", [False, True], ids=["untracked", "inflight"])
def test_unpop_with_the_ring_unreadable(mem: GuestMemory, tracked: bool) -> None:
    """Given back while the queue is stopped and its memory table changed: an
    untracked queue steps next_avail back so the ring base reports the chain as
    not consumed; a tracked one keeps it in the resubmit list (its inflight entry
    stays set for the next back-end)."""
    mock = MockSplitQueue(mem, SIZE)
    q = mock.create_queue()
    area = bytearray(4096)
    if tracked:
        q.set_inflight(area)
    _submit(mock, 3)
    assert _heads(q) == [3]
    q.ready = False
    region, fd = GuestRegion.memfd(0x1000, 0x100000)
    os.close(fd)
    mem.add_region(region)
    q.unpop(3)
    assert q.next_avail() == (1 if tracked else 0)
    assert q.pop_index() == 0
    with pytest.raises(QueueNotReady):
        q.pop_chain()
    q.ready = True
    assert _heads(q) == [3]
    q.set_inflight(None)


# -- the property: a plain model of what the driver sees ------------------------------------------


@dataclass
class Model:
    """Per head: ``pending`` (made available, not popped since), ``held`` (popped,
    not used), ``back`` (popped, then given back or resubmitted), or free.  The
    next pops must come in ``upcoming``'s order."""

    state: dict[int, str] = field(default_factory=dict)
    sub_pos: dict[int, int] = field(default_factory=dict)  # avail position of its submission
    upcoming: deque[int] = field(default_factory=deque)
    held: list[int] = field(default_factory=list)  # in pop order
    last_pop: dict[int, int] = field(default_factory=dict)
    clock: int = 0
    pop_index: int = 0


_steps = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.integers(1, 3)),
        st.tuples(st.just("pop"), st.integers(1, 3)),
        st.tuples(st.just("use"), st.integers(0, SIZE - 1)),
        st.tuples(st.just("unpop"), st.integers(0, SIZE - 1)),
        st.tuples(st.just("unpop_last"), st.integers(1, 4)),
        st.tuples(st.just("reconnect"), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=300)  # small examples; the bugs it guards need a few steps in order
@given(program=_steps)
def test_pop_unpop_use_against_a_model(program: list[tuple[str, int]]) -> None:
    """Random pops, give-backs (single, several, any held chain), completions and
    reconnects: every pop returns the head the model expects (given back first,
    latest given back first; after a reconnect the in-flight ones in pop order),
    never a head that is held or free, each submission is used once, and the avail
    entries from next_avail on are always submissions not yet served."""
    memory, fd = GuestMemory.memfd(1 << 16)
    os.close(fd)
    mock = MockSplitQueue(memory, SIZE)
    q = mock.create_queue()
    m = Model()
    used: list[int] = []

    def pop_one() -> None:
        chain = q.pop_chain()
        want = m.upcoming.popleft() if m.upcoming else None
        assert (None if chain is None else chain.head_index) == want
        if want is None:
            return
        assert m.state.get(want) in ("pending", "back"), f"head {want} served while {m.state.get(want)}"
        m.state[want] = "held"
        m.held.append(want)
        m.clock += 1
        m.last_pop[want] = m.clock
        m.pop_index += 1

    def give_back(head: int) -> None:
        m.held.remove(head)
        m.state[head] = "back"
        m.upcoming.appendleft(head)
        m.pop_index -= 1

    for op, arg in program:
        if op == "submit":
            # The driver reuses a head only once it was used (the lowest free ones).
            for head in [h for h in range(SIZE) if h not in m.state][:arg]:
                m.state[head] = "pending"
                m.sub_pos[head] = mock.avail_idx()
                m.upcoming.append(head)
                _submit(mock, head)
        elif op == "pop":
            for _ in range(arg):
                pop_one()
        elif op == "use":
            if not m.held:
                continue
            head = m.held.pop(arg % len(m.held))
            q.add_used(head, 0)
            used.append(head)
            del m.state[head]
        elif op == "unpop":
            if not m.held:
                continue
            head = m.held[arg % len(m.held)]
            q.unpop(head)
            give_back(head)
        elif op == "unpop_last":
            heads = m.held[-arg:]
            q.unpop_many(heads)
            for head in reversed(heads):
                give_back(head)
        elif op == "reconnect":
            # The inflight area holds every head popped and not used, in pop order.
            in_flight = [h for h, s in m.state.items() if s in ("held", "back")]
            in_flight.sort(key=m.last_pop.__getitem__)
            _reconnect(q, in_flight)
            for h in in_flight:
                m.state[h] = "back"
            pending = sorted((h for h, s in m.state.items() if s == "pending"), key=m.sub_pos.__getitem__)
            m.upcoming = deque(in_flight + pending)
            m.held = []
            m.pop_index = q.pop_index()
        assert q.pop_index() == m.pop_index & 0xFFFF
        # next_avail never moves back over a served entry nor skips a pending one.
        na, idx = q.next_avail(), mock.avail_idx()
        assert (idx - na) & 0xFFFF <= SIZE
        ring = mock.avail_ring + 4
        ahead = [memory.read_u16(ring + 2 * (p % SIZE)) for p in range(na, na + ((idx - na) & 0xFFFF))]
        for k, h in enumerate(ahead):
            assert m.sub_pos.get(h) == (na + k) & 0xFFFF and m.state.get(h) in ("pending", "back"), (
                f"avail entry {na + k} (head {h}) is ahead of next_avail {na} but already served"
            )
        assert sorted(h for h, s in m.state.items() if s == "pending") == sorted(
            h for h in ahead if m.state[h] == "pending"
        ), "a pending entry was skipped"
        assert [h for h, _ in mock.used_elems()] == used
        used.clear()
    # Drained, every head not held comes out once, in the model's order.
    while m.upcoming:
        pop_one()
    assert q.pop_chain() is None
