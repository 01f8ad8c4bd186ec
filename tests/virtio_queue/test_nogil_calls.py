"""The queue's calls without the GIL, alone: each against its twin with the GIL.

A nogil pump or ring worker serves a ring with ``Queue.*_nogil`` and runs the twin
with the GIL when one answers -1.  The contract held here: where a nogil call
serves, it gives the twin's answer and leaves the same ring memory behind; where
it declines (-1), it has done nothing (next_avail, next_used and the used ring
unchanged), and it declines only where the twin has work of its own to do: the
rings not translated against the current memory, heads waiting to be resubmitted,
a head out of range or an avail index more than a queue ahead (the twin raises).

Two identical set-ups run the same random program of driver and device steps: the
first serves each device step with the nogil call first (the twin after a -1), as a
nogil pump does; the second with the twin alone.  ``virtio_queue._nogil_probe``
runs the nogil calls with the GIL released.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from virtio_queue import GuestMemory, GuestRegion, Queue, QueueError
from virtio_queue import _nogil_probe as P
from virtio_queue.testing import VIRTQ_DESC_F_WRITE, MockSplitQueue, RawDesc

SIZE = 8
MEM = 1 << 16


@dataclass
class Setup:
    memory: GuestMemory
    mock: MockSplitQueue
    queue: Queue
    popped: list[int] = field(default_factory=list)
    resubmits: int = 0
    #: the memory changed since the rings were last translated (a call with the
    #: GIL translates them).
    stale: bool = False
    regions: int = 0

    @classmethod
    def make(cls, event_idx: bool) -> Setup:
        memory, fd = GuestMemory.memfd(MEM)
        os.close(fd)
        mock = MockSplitQueue(memory, SIZE)
        queue = mock.create_queue(event_idx=event_idx)
        P.ensure_ready(queue)  # as the first kick's call with the GIL does
        return cls(memory, mock, queue)

    def state(self) -> tuple[int, int, bytes]:
        """What a device step may change: the two indexes, the used ring and avail_event."""
        used = self.memory.read(self.mock.used_ring, 6 + 8 * SIZE)
        return self.queue.next_avail(), self.queue.next_used(), used


def _twin(call: Callable[[], Any]) -> Any:
    """The call with the GIL: its answer, or the class of what it raised."""
    try:
        return call()
    except QueueError as e:
        return type(e)


_step = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 3)),
    st.tuples(st.just("used_event"), st.integers(0, 0xFFFF)),
    st.tuples(st.just("avail_flags"), st.integers(0, 1)),
    st.tuples(st.just("avail_jump"), st.integers(SIZE + 1, 0xFFFF)),
    st.tuples(st.just("pop"), st.just(0)),
    st.tuples(st.just("pop_batch"), st.integers(0, SIZE)),
    st.tuples(st.just("use"), st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("use_out_of_range"), st.integers(SIZE, 0xFFFF)),
    st.tuples(st.sampled_from(["needs", "enable", "disable", "suppress"]), st.just(0)),
    st.tuples(st.just("unpop"), st.just(0)),
    st.tuples(st.just("remap"), st.just(0)),
)

_NOTIFY = {
    "needs": (P.needs_notification_nogil, P.needs_notification),
    "enable": (P.enable_notification_nogil, P.enable_notification),
    "disable": (P.disable_notification_nogil, P.disable_notification),
    "suppress": (P.suppress_notification_nogil, P.suppress_notification),
}


Call = Callable[[], Any]


def _nogil_then_twin(s: Setup, nogil: Call, twin: Call, *, may_decline: bool) -> Any:
    """A nogil pump's way: the nogil call, and the twin only after a -1, which must
    have done nothing and must have had a reason (``may_decline``)."""
    before = s.state()
    got = nogil()
    rc = got[0] if isinstance(got, tuple) else got
    if rc != -1:
        return got
    assert may_decline or s.stale, "the nogil call declined with the rings current and nothing pending"
    assert s.state() == before, "a nogil call that declined changed the ring"
    got = _twin(twin)
    # A twin that answered translated the rings (one that raised may not have).
    s.stale = s.stale and isinstance(got, type)
    return got


def _run(a: Setup, b: Setup, op: str, arg: int) -> None:
    """One step on both set-ups (``a`` nogil first, ``b`` the twins alone)."""
    if op == "add":
        for s in (a, b):
            for _ in range(arg):
                # The buffers are never read: one address does for all.
                s.mock.add_chain([RawDesc(0x8000, 16, VIRTQ_DESC_F_WRITE, 0)])
    elif op == "used_event":
        for s in (a, b):
            s.mock.set_used_event(arg)
    elif op == "avail_flags":
        for s in (a, b):
            s.mock.set_avail_flags(arg)
    elif op == "avail_jump":
        # A driver bug: avail->idx more than a queue ahead of what the device took.
        for s in (a, b):
            s.mock.set_avail_idx(s.queue.next_avail() + arg)
    elif op == "pop":
        # The twin raises for an index too far ahead; the nogil call declines for it.
        ahead = ((a.mock.avail_idx() - a.queue.next_avail()) & 0xFFFF) > SIZE
        declines = a.resubmits > 0 or ahead
        got_a = _nogil_then_twin(
            a, lambda: P.pop_head_nogil(a.queue), lambda: P.pop_head(a.queue), may_decline=declines
        )
        got_b = _twin(lambda: P.pop_head(b.queue))
        assert got_a == got_b
        for s, got in ((a, got_a), (b, got_b)):
            if isinstance(got, tuple) and got[0] == 1:
                s.popped.append(got[1])
                s.resubmits = max(s.resubmits - 1, 0)
    elif op == "pop_batch":
        ahead = ((a.mock.avail_idx() - a.queue.next_avail()) & 0xFFFF) > SIZE
        before = a.state()
        count = P.avail_count_nogil(a.queue)
        if count == -1:
            assert a.stale or a.resubmits > 0 or ahead, "avail_count_nogil declined for no reason"
            assert a.state() == before
            taken_a = [_twin(lambda: P.pop_head(a.queue)) for _ in range(arg)]
            a.stale = a.stale and all(isinstance(t, type) for t in taken_a)
            taken_b = [_twin(lambda: P.pop_head(b.queue)) for _ in range(arg)]
            assert taken_a == taken_b
            for s, taken in ((a, taken_a), (b, taken_b)):
                for got in taken:
                    if isinstance(got, tuple) and got[0] == 1:
                        s.popped.append(got[1])
                        s.resubmits = max(s.resubmits - 1, 0)
            return
        assert not ahead and a.resubmits == 0
        n = min(arg, count)
        heads = P.avail_heads_nogil(a.queue, n)
        assert a.state() == before, "looking at heads in place took them"
        P.pop_heads_nogil(a.queue, n)
        assert [P.pop_head(b.queue) for _ in range(n)] == [(1, h) for h in heads]
        a.popped += heads
        b.popped += heads
    elif op in ("use", "use_out_of_range"):
        head = (a.popped[0] if a.popped else 0) if op == "use" else arg
        length = arg if op == "use" else 0
        got_a = _nogil_then_twin(
            a,
            lambda: P.add_used_nogil(a.queue, head, length),
            lambda: P.add_used(a.queue, head, length),
            may_decline=head >= SIZE,
        )
        assert got_a == _twin(lambda: P.add_used(b.queue, head, length))
        if op == "use" and a.popped:
            a.popped.pop(0)
            b.popped.pop(0)
    elif op in _NOTIFY:
        nogil, twin = _NOTIFY[op]
        got_a = _nogil_then_twin(a, lambda: nogil(a.queue), lambda: twin(a.queue), may_decline=False)
        assert got_a == _twin(lambda: twin(b.queue)), op
    elif op == "unpop":
        if not a.popped:
            return
        head = a.popped.pop()
        b.popped.pop()
        # Queue.unpop's rule: next_avail steps back over the head when the avail
        # entry behind it holds the head and nothing waits in the resubmit list;
        # otherwise the head goes to the resubmit list (the nogil call declines).
        behind = a.memory.read_u16(a.mock.avail_ring + 4 + 2 * ((a.queue.next_avail() - 1) % SIZE))
        to_list = a.resubmits > 0 or behind != head
        got_a = _nogil_then_twin(
            a, lambda: P.unpop_nogil(a.queue, head), lambda: P.unpop(a.queue, head), may_decline=to_list
        )
        assert got_a == _twin(lambda: P.unpop(b.queue, head))
        if to_list:
            a.resubmits += 1
            b.resubmits += 1
    elif op == "remap":
        # A new memory table (SET_MEM_TABLE): the rings must be translated again.
        for s in (a, b):
            region, fd = GuestRegion.memfd(0x1000, 0x100000 * (s.regions + 1))
            os.close(fd)
            s.memory.add_region(region)
            s.regions += 1
            s.stale = True
    else:  # pragma: no cover - the strategy draws only the steps above
        raise AssertionError(op)


@given(event_idx=st.booleans(), program=st.lists(_step, max_size=40))
def test_nogil_calls_match_their_twins(event_idx: bool, program: list[tuple[str, int]]) -> None:
    a, b = Setup.make(event_idx), Setup.make(event_idx)
    for op, arg in program:
        _run(a, b, op, arg)
        assert a.state() == b.state(), f"after {op} {arg}"


def test_nogil_calls_decline_untranslated_rings_and_do_nothing() -> None:
    """Before the rings are first translated, and after a new memory table, every
    nogil call answers -1 and touches nothing; the twin translates the rings and
    the nogil calls serve."""
    memory, fd = GuestMemory.memfd(MEM)
    os.close(fd)
    mock = MockSplitQueue(memory, SIZE)
    s = Setup(memory, mock, mock.create_queue(event_idx=True))
    s.mock.add_chain([RawDesc(s.mock.alloc(16), 16, VIRTQ_DESC_F_WRITE, 0)])
    for change_memory in (False, True):
        if change_memory:
            region, fd = GuestRegion.memfd(0x1000, 0x100000)
            os.close(fd)
            s.memory.add_region(region)
        before = s.state()
        assert P.pop_head_nogil(s.queue)[0] == -1
        assert P.avail_count_nogil(s.queue) == -1
        assert P.add_used_nogil(s.queue, 0, 1) == -1
        for nogil, _ in _NOTIFY.values():
            assert nogil(s.queue) == -1
        assert s.state() == before
        P.ensure_ready(s.queue)
        assert P.avail_count_nogil(s.queue) == 1
    assert P.pop_head(s.queue) == (1, 0)
    assert P.add_used_nogil(s.queue, 0, 16) == 0
    assert s.mock.used_elems() == [(0, 16)]


def test_nogil_pop_declines_while_a_head_waits_for_resubmission() -> None:
    """A head waiting in the resubmit list (resubmitted after a reconnect, or given
    back with ``unpop`` after such a pop) is served by the twin, first, before the
    avail ring; the nogil unpop declines while the list is in use."""
    s = Setup.make(event_idx=False)
    for _ in range(3):
        s.mock.add_chain([RawDesc(s.mock.alloc(16), 16, VIRTQ_DESC_F_WRITE, 0)])
    s.queue.set_next_avail(1)  # head 0 was in flight with the previous back-end
    s.queue.resubmit([0])
    assert P.pop_head_nogil(s.queue)[0] == -1
    assert P.avail_count_nogil(s.queue) == -1
    assert P.pop_head(s.queue) == (1, 0)
    assert P.pop_head_nogil(s.queue) == (1, 1)
    assert P.unpop_nogil(s.queue, 1) == 0
    s.queue.resubmit([2])
    assert P.unpop_nogil(s.queue, 0) == -1  # the list is in use
    assert P.unpop(s.queue, 0) == 0
    assert P.pop_head_nogil(s.queue)[0] == -1
    assert P.pop_head(s.queue) == (1, 0)
    assert P.pop_head(s.queue) == (1, 2)
    assert P.pop_head_nogil(s.queue) == (1, 1)


def test_nogil_route_kept_after_an_avail_chain_is_given_back() -> None:
    """A chain popped from the avail ring and given back (``unpop``, with or without
    the GIL) steps next_avail back: the next pop, without the GIL, returns it."""
    s = Setup.make(event_idx=False)
    for _ in range(2):
        s.mock.add_chain([RawDesc(s.mock.alloc(16), 16, VIRTQ_DESC_F_WRITE, 0)])
    assert P.pop_head_nogil(s.queue) == (1, 0)
    assert P.pop_head_nogil(s.queue) == (1, 1)
    assert P.unpop_nogil(s.queue, 1) == 0
    s.queue.unpop(0)
    assert s.queue.next_avail() == 0
    assert P.avail_count_nogil(s.queue) == 2
    assert P.pop_head_nogil(s.queue) == (1, 0)
    assert P.pop_head_nogil(s.queue) == (1, 1)


def test_nogil_unpop_declines_a_head_out_of_range_or_not_behind_next_avail() -> None:
    s = Setup.make(event_idx=False)
    for _ in range(2):
        s.mock.add_chain([RawDesc(s.mock.alloc(16), 16, VIRTQ_DESC_F_WRITE, 0)])
    assert P.pop_head_nogil(s.queue) == (1, 0)
    before = s.state()
    assert P.unpop_nogil(s.queue, SIZE) == -1
    assert P.unpop_nogil(s.queue, 1) == -1
    assert s.state() == before
