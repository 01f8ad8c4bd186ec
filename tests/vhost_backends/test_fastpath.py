"""The compiled epoll set and the rings whose kicks it serves (vhost_backends._fastpath)."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vhost_backends._fastpath import Epoll, KickRing
from virtio_queue import ByteSource, GuestMemory, InvalidAvailRingIndex
from virtio_queue.testing import (
    VIRTQ_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    MockSplitQueue,
    RawDesc,
    vring_need_event,
)

IN = select.EPOLLIN
SOURCE = bytes((i * 7 + 1) & 0xFF for i in range(4096))


@pytest.fixture
def epoll() -> Iterator[Epoll]:
    ep = Epoll()
    yield ep
    ep.close()


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def test_poll_returns_ready_fds_and_times_out(epoll: Epoll) -> None:
    a, b = _eventfd(), _eventfd()
    try:
        epoll.register(a, IN)
        epoll.register(b, IN)
        t0 = time.monotonic()
        assert epoll.poll(0.05) == []
        assert time.monotonic() - t0 >= 0.04
        os.eventfd_write(b, 1)
        assert epoll.poll(1.0) == [b]
        assert epoll.poll(0) == [b]  # level-triggered: still readable
        epoll.unregister(b)
        assert epoll.poll(0) == []
    finally:
        os.close(a)
        os.close(b)


def test_register_errors_and_closed_set(epoll: Epoll) -> None:
    a = _eventfd()
    try:
        epoll.register(a, IN)
        with pytest.raises(FileExistsError):
            epoll.register(a, IN)
        with pytest.raises(ValueError):
            epoll.register(-1, IN)
        epoll.unregister(a)
        with pytest.raises(FileNotFoundError):
            epoll.unregister(a)
        epoll.close()
        epoll.close()
        with pytest.raises(ValueError):
            epoll.poll(0)
        with pytest.raises(ValueError):
            epoll.register(a, IN)
    finally:
        os.close(a)


class Rig:
    """A queue with a kick and a call eventfd and a file as the source."""

    def __init__(self, tmp: Path) -> None:
        self.mem = GuestMemory.from_buffer(bytearray(1 << 20))
        self.mock = MockSplitQueue(self.mem, 16)
        self.queue = self.mock.create_queue()
        self.kick = _eventfd()
        self.call = _eventfd()
        path = tmp / "source"
        path.write_bytes(SOURCE)
        self.src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.asked: list[int] = []
        self.source: ByteSource | None = ByteSource(self.src)
        self.served: list[int] = []   # serve(index) calls: the ring handed to Python

    def serve(self, index: int) -> None:
        self.served.append(index)

    def ring(self, index: int = 0, *, fill: bool = True, call: bool = True) -> KickRing:
        """A KickRing on this rig's queue; it owns a duplicate of the call eventfd."""
        return KickRing(
            self.queue,
            index,
            self.serve,
            fill_source=self.fill_source if fill else None,
            kick_fd=self.kick,
            call_fd=os.dup(self.call) if call else -1,
        )

    def fill_source(self, index: int) -> ByteSource | None:
        self.asked.append(index)
        return self.source

    def calls(self) -> int:
        try:
            return os.eventfd_read(self.call)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        for fd in (self.kick, self.call, self.src):
            os.close(fd)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def _attach(ep: Epoll, ring: KickRing) -> KickRing:
    ep.register(ring.kick_fd, IN)
    ep.set_ring(ring.kick_fd, IN, ring)
    return ring


def test_fill_ring_serves_a_kick_without_python(rig: Rig, epoll: Epoll) -> None:
    """VIRTIO 1.2 §5.4: each request is one device-writable buffer; the kick is
    read, the buffers filled in ring order, the driver called once."""
    ring = _attach(epoll, rig.ring(3))
    heads = [rig.mock.add_chain([RawDesc(0x8000 + 0x100 * i, 16, VIRTQ_DESC_F_WRITE, 0)]) for i in range(3)]
    os.eventfd_write(rig.kick, 1)
    assert epoll.poll(0.05) == []  # handled inside the poll
    assert rig.asked == [3] and rig.served == []
    assert rig.mock.used_elems() == [(h, 16) for h in heads]
    assert b"".join(rig.mem.read(0x8000 + 0x100 * i, 16) for i in range(3)) == SOURCE[:48]
    assert rig.calls() == 1
    assert (ring.kicks, ring.chains, ring.bytes, ring.python_calls) == (1, 3, 48, 0)
    with pytest.raises(BlockingIOError):
        os.eventfd_read(rig.kick)  # the kick was consumed


def test_fill_ring_leaves_other_requests_to_serve(rig: Rig, epoll: Epoll) -> None:
    ring = _attach(epoll, rig.ring())
    ok = rig.mock.add_chain([RawDesc(0x8000, 8, VIRTQ_DESC_F_WRITE, 0)])
    rig.mock.add_chain([RawDesc(0x9000, 8, 0, 0)])  # device-readable: not for this path
    os.eventfd_write(rig.kick, 1)
    assert epoll.poll(0.05) == []
    assert rig.mock.used_elems() == [(ok, 8)]
    assert rig.queue.pending() == 1  # left in the ring for process_queue ...
    assert rig.served == [0] and ring.python_calls == 1  # ... which was called once
    assert rig.calls() == 1


def test_fill_ring_serves_in_python_when_the_device_says_so(rig: Rig, epoll: Epoll) -> None:
    _attach(epoll, rig.ring())
    rig.mock.add_chain([RawDesc(0x8000, 8, VIRTQ_DESC_F_WRITE, 0)])
    rig.source = None  # e.g. a request is parked waiting for the source
    os.eventfd_write(rig.kick, 1)
    assert epoll.poll(0.05) == []
    assert rig.served == [0]
    with pytest.raises(BlockingIOError):
        os.eventfd_read(rig.kick)  # the ring read the kick before handing it over
    assert rig.queue.pending() == 1 and rig.calls() == 0


def test_fill_ring_end_of_source_goes_to_serve(tmp_path: Path, rig: Rig, epoll: Epoll) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    fd = os.open(empty, os.O_RDONLY)
    try:
        rig.source = ByteSource(fd)
        _attach(epoll, rig.ring())
        rig.mock.add_chain([RawDesc(0x8000, 8, VIRTQ_DESC_F_WRITE, 0)])
        os.eventfd_write(rig.kick, 1)
        assert epoll.poll(0.05) == []
        assert rig.served == [0] and rig.queue.pending() == 1
    finally:
        os.close(fd)


def test_fill_ring_error_goes_to_serve_not_up(rig: Rig, epoll: Epoll) -> None:
    """A ring that cannot be used (here: not ready) is the Python path's to report."""
    _attach(epoll, rig.ring())
    rig.queue.ready = False
    os.eventfd_write(rig.kick, 1)
    assert epoll.poll(0.05) == []
    assert rig.served == [0]


def test_kick_ring_without_call_fd_and_detached(rig: Rig, epoll: Epoll) -> None:
    ring = _attach(epoll, rig.ring(call=False))
    rig.mock.add_chain([RawDesc(0x8000, 8, VIRTQ_DESC_F_WRITE, 0)])
    os.eventfd_write(rig.kick, 1)
    assert epoll.poll(0.05) == []
    assert rig.calls() == 0 and ring.chains == 1 and ring.attached
    epoll.set_ring(rig.kick, IN, None)
    assert not ring.attached
    os.eventfd_write(rig.kick, 1)
    assert epoll.poll(0.05) == [rig.kick]  # a plain fd again
    with pytest.raises(ValueError, match="is not fd"):
        epoll.set_ring(rig.call, IN, ring)  # not the ring's kick fd
    epoll.set_ring(rig.kick, IN, ring)
    assert ring.attached
    with pytest.raises(ValueError, match="kick fd changed"):
        ring.kick_fd = rig.call
    epoll.unregister(rig.kick)
    assert not ring.attached


class EchoServe:
    """A device's process_queue for a non-fill ring: drains it the way
    VirtioDevice.process_chains does (VIRTIO 1.2 §2.7.10: notifications off while
    draining, on again, drain again if more came), returns each chain with used
    length 1, and signals through the ring's KickRing."""

    def __init__(self, rig: Rig, *, take: int | None = None) -> None:
        self.rig = rig
        self.ring: KickRing | None = None
        self.calls = 0
        self.take = take   # at most this many chains per call, then stop (as admit() False)

    def __call__(self, index: int) -> None:
        self.calls += 1
        q = self.rig.queue
        done = 0
        while True:
            q.disable_notification()
            while self.take is None or done < self.take:
                chain = q.pop_chain()
                if chain is None:
                    break
                q.add_used(chain.head_index, 1)
                done += 1
            if self.take is not None and done >= self.take:
                break
            if not q.enable_notification():
                break
        if done and q.needs_notification():
            assert self.ring is not None
            self.ring.signal_used()


def _echo_ring(rig: Rig, ep: Epoll, window_ns: int = 0, **kw: int | None) -> tuple[KickRing, EchoServe]:
    serve = EchoServe(rig, **kw)
    ring = KickRing(rig.queue, 0, serve, kick_fd=rig.kick, call_fd=os.dup(rig.call))
    serve.ring = ring
    ring.poll_ns = window_ns
    _attach(ep, ring)
    return ring, serve


def test_non_fill_ring_is_served_by_one_call_per_kick(rig: Rig, epoll: Epoll) -> None:
    """A ring without a fill source: the kick is read in compiled code and the ring
    handed to serve(index) once; serve signals through the ring's call fd."""
    ring, serve = _echo_ring(rig, epoll)
    heads = [rig.mock.add_chain([RawDesc(0x8000, 8, 0, 0)]) for _ in range(2)]
    os.eventfd_write(rig.kick, 1)
    assert epoll.poll(0.05) == []
    assert serve.calls == 1 and (ring.kicks, ring.python_calls, ring.chains) == (1, 1, 0)
    assert rig.mock.used_elems() == [(h, 1) for h in heads]
    assert rig.calls() == 1
    with pytest.raises(BlockingIOError):
        os.eventfd_read(rig.kick)


def test_poll_returns_after_serve_ran(rig: Rig, epoll: Epoll) -> None:
    """Python code that serve ran may have added a timer the caller must run (a rate
    limit, a retry): the poll returns to its caller after it instead of waiting on
    for its whole timeout.  (A pipe written 5 s later is what it would return.)"""
    ring = _attach(epoll, rig.ring(fill=False))
    r, w = os.pipe()
    epoll.register(r, IN)
    done = threading.Event()

    def watchdog() -> None:
        if not done.wait(5.0):
            os.write(w, b"x")

    t = threading.Thread(target=watchdog)
    t.start()
    try:
        os.eventfd_write(rig.kick, 1)
        assert epoll.poll(-1) == []
        assert rig.served == [0] and ring.python_calls == 1
    finally:
        done.set()
        t.join()
        os.close(r)
        os.close(w)


def test_serve_errors_go_to_fail_or_up(rig: Rig, epoll: Epoll) -> None:
    """What serve raises reaches the ring's fail(exc), the transport's policy; with
    no fail it propagates out of the poll (a bug must be loud)."""
    boom = RuntimeError("device bug")

    def serve(index: int) -> None:
        raise boom

    failed: list[Exception] = []
    ring = KickRing(rig.queue, 0, serve, fail=failed.append, kick_fd=rig.kick)
    _attach(epoll, ring)
    os.eventfd_write(rig.kick, 1)
    assert epoll.poll(0.05) == []
    assert failed == [boom]
    ring.fail = None
    os.eventfd_write(rig.kick, 1)
    with pytest.raises(RuntimeError, match="device bug"):
        epoll.poll(0.05)
    with pytest.raises(TypeError, match="callable"):
        KickRing(rig.queue, 0, None)  # type: ignore[arg-type]


def test_kick_ring_owns_its_call_fd(rig: Rig) -> None:
    """set_call_fd closes the fd it replaces; close() closes the last one; the
    interrupt path (signal_used) writes whichever fd is current."""
    first, second = os.dup(rig.call), _eventfd()
    ring = KickRing(rig.queue, 0, rig.serve, call_fd=first)
    ring.signal_used()
    assert rig.calls() == 1
    ring.set_call_fd(second)
    with pytest.raises(OSError):
        os.fstat(first)  # closed by its owner
    ring.signal_used()
    assert rig.calls() == 0 and os.eventfd_read(second) == 1
    ring.close()
    ring.close()
    assert ring.call_fd == -1
    ring.signal_used()  # no fd: nothing to do
    with pytest.raises(OSError):
        os.fstat(second)
    with pytest.raises(ValueError, match="bad file descriptor"):
        ring.set_call_fd(-2)


# -- adaptive polling -------------------------------------------------------------------


def _polling(rig: Rig, max_us: int, window_ns: int = 0) -> tuple[Epoll, KickRing]:
    ep = Epoll(max_us, give_way=False)
    ring = rig.ring()
    ring.poll_ns = window_ns
    _attach(ep, ring)
    return ep, ring


def _kick_wanted(rig: Rig, event_idx: bool) -> bool:
    """What a driver checks before kicking (VIRTIO 1.2 §2.7.10)."""
    if event_idx:
        idx = rig.mock.avail_idx()
        return vring_need_event(rig.mock.avail_event(), idx + 1, idx)
    return not rig.mock.used_flags() & VRING_USED_F_NO_NOTIFY


def _when_polled(rig: Rig, fn: Callable[[], object], *, event_idx: bool = False) -> threading.Thread:
    """Run ``fn`` (the driver's next step) on a thread once the ring is polled: after
    the call for the request the kick brought (the kick's service is over) and then
    the driver's kicks suppressed (by the spin).  A step taken earlier meets the
    kick's service instead, which serves what it finds (no poll hit) or, with
    notifications on, asks for a kick.  No wait ends without its event but at the
    5 s limit: the step then runs anyway and the test's assertions fail."""

    def run() -> None:
        select.select([rig.call], [], [], 5.0)
        end = time.monotonic() + 5
        while _kick_wanted(rig, event_idx) and time.monotonic() < end:
            pass
        fn()

    t = threading.Thread(target=run)
    t.start()
    return t


def test_poll_window_bounds() -> None:
    assert Epoll().poll_max_ns == 0
    assert Epoll(32).poll_max_ns == 32000
    for bad in (-1, 1_000_001):
        with pytest.raises(ValueError, match="poll_max_us"):
            Epoll(bad)


def test_poll_window_grows_while_kicks_come_soon_and_drops_when_late(rig: Rig) -> None:
    """Like QEMU's aio polling: a kick within the maximum after a service, later
    than the window, doubles the window (from 4 µs); one beyond the maximum ends
    polling."""
    ep, ring = _polling(rig, 1_000_000)
    try:
        windows = []
        for i in range(4):
            rig.mock.add_chain([RawDesc(0x8000 + 0x100 * i, 8, VIRTQ_DESC_F_WRITE, 0)])
            os.eventfd_write(rig.kick, 1)
            assert ep.poll(0) == []
            windows.append(ring.poll_ns)
            # The gap between kicks is the input under test, not a wait for an event:
            # later than the window, well within the maximum.
            time.sleep(0.002)
        assert windows == [0, 4000, 8000, 16000]
    finally:
        ep.close()
    ep, ring = _polling(rig, 1000, 16000)   # a window above a (new) maximum of 1 ms
    try:
        for i in range(2):
            rig.mock.add_chain([RawDesc(0x9000 + 0x100 * i, 8, VIRTQ_DESC_F_WRITE, 0)])
            os.eventfd_write(rig.kick, 1)
            assert ep.poll(0) == []
            time.sleep(0.005)   # (the gap under test) beyond the 1 ms maximum
        assert ring.poll_ns == 0
        assert ring.chains == 2 and ring.poll_hits == 0
    finally:
        ep.close()


def test_poll_window_of_a_non_fill_ring_backs_off_when_kicks_come_late(rig: Rig) -> None:
    """The same adaptation for a ring served by process_queue."""
    ep = Epoll(1000, give_way=False)
    ring, serve = _echo_ring(rig, ep, 4000)
    try:
        for i in range(2):
            rig.mock.add_chain([RawDesc(0x8000 + 0x100 * i, 8, 0, 0)])
            os.eventfd_write(rig.kick, 1)
            assert ep.poll(0) == []
            time.sleep(0.005)   # (the gap under test) beyond the 1 ms maximum
        assert ring.poll_ns == 0 and serve.calls == 2 and rig.mock.used_idx() == 2
    finally:
        ep.close()


WINDOW_NS = 1_000_000_000


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("fill", [True, False])
def test_polling_serves_a_request_without_a_kick(tmp_path: Path, event_idx: bool, fill: bool) -> None:
    """VIRTIO 1.2 §2.7.10: while the device polls it tells the driver not to kick
    (VRING_USED_F_NO_NOTIFY, or an avail_event it has passed); a request made then
    is served by the poll (filled, or handed to serve), and notifications are on
    again once polling ends."""
    # The request comes once the spin polls, in a window long enough for a thread
    # of this process to be scheduled on a loaded machine.
    rig = Rig(tmp_path)
    if event_idx:
        rig.queue = rig.mock.create_queue(event_idx=True)
    ep = Epoll(1_000_000, give_way=False)
    if fill:
        ring = _attach(ep, rig.ring())
        ring.poll_ns = WINDOW_NS
        serve = None
    else:
        ring, serve = _echo_ring(rig, ep, WINDOW_NS)
    seen: list[bool] = []
    try:
        first = rig.mock.add_chain([RawDesc(0x8000, 16, VIRTQ_DESC_F_WRITE if fill else 0, 0)])
        os.eventfd_write(rig.kick, 1)

        def request() -> None:
            seen.append(_kick_wanted(rig, event_idx))
            rig.mock.add_chain([RawDesc(0x9000, 16, VIRTQ_DESC_F_WRITE if fill else 0, 0)])

        t = _when_polled(rig, request, event_idx=event_idx)
        assert ep.poll(WINDOW_NS / 1e9 + 0.3) == []
        t.join()
        assert seen == [False]   # no kick wanted while polling
        assert [h for h, _ in rig.mock.used_elems()] == [first, first + 1]
        assert ring.poll_hits == 1 and ring.kicks == 1
        if fill:
            assert ring.chains == 2 and rig.mem.read(0x9000, 16) == SOURCE[16:32]
        else:
            assert serve is not None and serve.calls == 2 and ring.python_calls == 2
        # Polling ended (the deadline): the driver is asked to kick again.
        if event_idx:
            assert rig.mock.avail_event() == rig.mock.avail_idx()
        else:
            assert not rig.mock.used_flags() & VRING_USED_F_NO_NOTIFY
    finally:
        ep.close()
        rig.close()


def test_polling_keeps_a_ring_whose_device_took_requests_while_more_came(rig: Rig) -> None:
    """VIRTIO 1.2 §2.7.10: while the spin polls a fill ring the driver's kicks are
    suppressed, so a request made while the device serves the one before (a guest
    reading /dev/hwrng posts the next buffer as soon as it gets the previous one)
    is the spin's to find.  A ring is only left to its device when the device took
    nothing; here it took a request and a new one is pending: the spin serves it.
    (The request the fill path cannot take goes to ``serve``, which plays the
    device and, meanwhile, the driver.)"""
    rig.queue = rig.mock.create_queue(event_idx=True)
    ep = Epoll(1_000_000, give_way=False)
    kicks_wanted: list[bool] = []

    def request(desc: RawDesc) -> None:
        idx = rig.mock.avail_idx()
        kicks_wanted.append(vring_need_event(rig.mock.avail_event(), idx + 1, idx))
        rig.mock.add_chain([desc])

    def serve(index: int) -> None:
        chain = rig.queue.pop_chain()
        assert chain is not None
        rig.queue.add_used(chain.head_index, 0)
        request(RawDesc(0xA000, 16, VIRTQ_DESC_F_WRITE, 0))  # the driver, meanwhile

    ring = _attach(
        ep,
        KickRing(
            rig.queue, 0, serve, fill_source=rig.fill_source, kick_fd=rig.kick, call_fd=os.dup(rig.call)
        ),
    )
    ring.poll_ns = 300_000_000  # a 300 ms window: the spin outlives the test's steps
    try:
        rig.mock.add_chain([RawDesc(0x8000, 16, VIRTQ_DESC_F_WRITE, 0)])
        os.eventfd_write(rig.kick, 1)
        # Not for the fill path; made while the spin polls.
        t = _when_polled(rig, lambda: request(RawDesc(0x9000, 8, 0, 0)), event_idx=True)
        assert ep.poll(0.5) == []
        t.join()
        assert kicks_wanted == [False, False]  # both made while the device polled
        assert rig.mock.used_idx() == 3, f"used {rig.mock.used_elems()}: the last request was never served"
        assert rig.mem.read(0xA000, 16) == SOURCE[16:32]
    finally:
        ep.close()


def test_polling_leaves_a_ring_the_device_stopped_draining(rig: Rig) -> None:
    """A device that leaves chains in the ring (admit() said no, or it parked one)
    keeps the ring: the spin does not call it again and again, and leaves its
    notification state as the device left it."""
    ep = Epoll(1_000_000, give_way=False)
    ring, serve = _echo_ring(rig, ep, 1_000_000_000, take=1)
    try:
        for i in range(3):
            rig.mock.add_chain([RawDesc(0x8000 + 0x100 * i, 8, 0, 0)])
        os.eventfd_write(rig.kick, 1)
        assert ep.poll(0.05) == []
        assert serve.calls == 1 and rig.mock.used_idx() == 1 and ring.poll_hits == 0
    finally:
        ep.close()


def test_polling_gives_way_to_other_fds_and_hands_other_requests_to_serve(rig: Rig) -> None:
    """The spin returns to epoll as soon as another fd is ready, and hands a request
    it cannot fill to the ring's serve (once: the device then holds it)."""
    ep, ring = _polling(rig, 1_000_000, 1_000_000_000)   # a 1 s window
    r, w = os.pipe()
    try:
        ep.register(r, IN)
        rig.mock.add_chain([RawDesc(0x8000, 8, VIRTQ_DESC_F_WRITE, 0)])
        os.eventfd_write(rig.kick, 1)
        t = _when_polled(rig, lambda: os.write(w, b"x"))   # written while the spin runs
        t0 = time.monotonic()
        assert ep.poll(5.0) == [r]
        # What is under test: the spin ended on the fd, long before its window.
        assert time.monotonic() - t0 < 0.9
        t.join()
        assert not rig.mock.used_flags() & VRING_USED_F_NO_NOTIFY
        os.read(r, 1)
        rig.calls()   # (the next wait is for the next request's call)

        rig.mock.add_chain([RawDesc(0x8100, 8, VIRTQ_DESC_F_WRITE, 0)])
        os.eventfd_write(rig.kick, 1)
        t = _when_polled(rig, lambda: rig.mock.add_chain([RawDesc(0x9000, 8, 0, 0)]))  # device-readable
        assert ep.poll(5.0) == []   # returns once serve ran (else at the window's end)
        t.join()
        assert rig.served == [0] and ring.poll_hits == 1   # found by the spin, given to serve
        assert rig.queue.pending() == 1   # left for process_queue (this serve takes nothing)
    finally:
        ep.close()
        os.close(r)
        os.close(w)


def test_polling_keeps_a_ring_whose_device_took_a_resubmitted_request(rig: Rig) -> None:
    """The spin leaves a ring to its device only when the device took nothing; a pop
    counts whether its head came from the avail ring or the resubmit list
    (``Queue.pop_index``: a pop from the list leaves ``next_avail`` alone).  Here a
    head is put in the resubmit list while the ring is polled; the spin finds it
    and hands it to the device, which serves it while the driver makes a request
    the fill path cannot take: the spin keeps the ring and hands that one over too."""
    ep, ring = _polling(rig, 1_000_000, WINDOW_NS)
    r, w = os.pipe()
    ep.register(r, IN)
    calls: list[int] = []

    def serve(index: int) -> None:
        calls.append(index)
        chain = rig.queue.pop_chain()
        assert chain is not None
        rig.queue.add_used(chain.head_index, 0)
        if len(calls) == 1:
            rig.mock.add_chain([RawDesc(0x9000, 8, 0, 0)])   # the driver, meanwhile
        else:
            os.write(w, b"x")     # another fd ready: the spin ends at once

    ring.serve = serve
    try:
        first = rig.mock.add_chain([RawDesc(0x8000, 8, VIRTQ_DESC_F_WRITE, 0)])
        os.eventfd_write(rig.kick, 1)
        t = _when_polled(rig, lambda: rig.queue.resubmit([first]))
        assert ep.poll(5.0) == []   # serve ran: the caller looks at its timers
        t.join()
        assert calls == [0, 0] and ring.poll_hits == 2
        assert rig.queue.pending() == 0 and rig.mock.used_idx() == 3
    finally:
        ep.close()
        os.close(r)
        os.close(w)


def test_polling_stops_at_the_poll_deadline(rig: Rig) -> None:
    ep, ring = _polling(rig, 1_000_000, 1_000_000_000)
    try:
        rig.mock.add_chain([RawDesc(0x8000, 8, VIRTQ_DESC_F_WRITE, 0)])
        os.eventfd_write(rig.kick, 1)
        t0 = time.monotonic()
        assert ep.poll(0.05) == []
        assert time.monotonic() - t0 < 0.9
        assert ring.chains == 1
    finally:
        ep.close()


def test_polling_a_ring_that_never_runs_dry_still_sees_other_fds(tmp_path: Path) -> None:
    """A driver that keeps requests coming must not starve the socket or the stop fd:
    here two polled rings refill each other whenever one is served, so work is
    pending at every turn of the spin, and a pipe written meanwhile still ends it."""
    a, b = Rig(tmp_path), Rig(tmp_path)
    ep = Epoll(1_000_000, give_way=False)
    r, w = os.pipe()
    zero = os.open("/dev/zero", os.O_RDONLY | os.O_CLOEXEC)  # a source without an end
    served = 0

    zero_source = ByteSource(zero)

    def refill(other: Rig) -> Callable[[int], ByteSource]:
        def fill_source(index: int) -> ByteSource:
            nonlocal served
            served += 1
            if served < 1_000_000:  # ends the flood if the spin never looked up
                other.mock.add_chain([RawDesc(0x8000, 8, VIRTQ_DESC_F_WRITE, 0)])
            return zero_source

        return fill_source

    try:
        rings = [
            KickRing(x.queue, 0, x.serve, fill_source=refill(y), kick_fd=x.kick) for x, y in ((a, b), (b, a))
        ]
        for ring, rig in zip(rings, (a, b), strict=True):
            ring.poll_ns = 1_000_000_000
            _attach(ep, ring)
            rig.mock.add_chain([RawDesc(0x8000, 8, VIRTQ_DESC_F_WRITE, 0)])
            os.eventfd_write(rig.kick, 1)
        ep.register(r, IN)

        def write_once_polled() -> None:
            # Written while the spin runs (a request found by it), not before.
            end = time.monotonic() + 5
            while not sum(ring.poll_hits for ring in rings) and time.monotonic() < end:
                pass
            os.write(w, b"x")

        t = threading.Thread(target=write_once_polled)
        t.start()
        assert ep.poll(5.0) == [r]
        t.join()
        assert 0 < served < 1_000_000
        assert sum(ring.poll_hits for ring in rings) > 0
    finally:
        ep.close()
        for fd in (r, w, zero):
            os.close(fd)
        a.close()
        b.close()


def test_polling_hands_a_broken_avail_index_to_serve(rig: Rig) -> None:
    """VIRTIO 1.2 §2.7.13.3: an avail index more than a queue ahead, written while
    the device polls, is not filled: the ring goes to serve (process_queue, which
    stops it and reports the error), and polling leaves it."""
    ep, ring = _polling(rig, 1_000_000, 1_000_000_000)
    try:
        rig.mock.add_chain([RawDesc(0x8000, 8, VIRTQ_DESC_F_WRITE, 0)])
        os.eventfd_write(rig.kick, 1)
        t = _when_polled(rig, lambda: rig.mock.set_avail_idx(rig.mock.avail_idx() + 1000))
        assert ep.poll(5.0) == []   # returns once serve ran (else at the window's end)
        t.join()
        assert rig.served == [0] and ring.chains == 1 and rig.mock.used_idx() == 1
        assert ring.poll_hits == 1   # once: the ring is left to the device's path
        with pytest.raises(InvalidAvailRingIndex):
            rig.queue.pop_chain()
    finally:
        ep.close()


def test_polling_follows_a_replaced_or_closed_call_fd(rig: Rig) -> None:
    """SET_VRING_CALL while a ring is polled: the ring's one call fd is replaced (the
    old one closed by its owner), and the next request found by polling signals
    the new one; after a close, none."""
    ep, ring = _polling(rig, 1_000_000, 1_000_000_000)
    new_call = _eventfd()
    r, w = os.pipe()
    ep.register(r, IN)
    result: list[list[int]] = []
    try:
        rig.mock.add_chain([RawDesc(0x8000, 8, VIRTQ_DESC_F_WRITE, 0)])
        os.eventfd_write(rig.kick, 1)
        t = threading.Thread(target=lambda: result.append(ep.poll(5.0)))
        t.start()
        # The first request is served and signalled, then the spin suppresses kicks.
        assert select.select([rig.call], [], [], 5.0)[0] == [rig.call]
        assert rig.calls() == 1
        end = time.monotonic() + 5
        while not rig.mock.used_flags() & VRING_USED_F_NO_NOTIFY:
            assert time.monotonic() < end, "the ring was never polled"
        ring.set_call_fd(os.dup(new_call))
        rig.mock.add_chain([RawDesc(0x9000, 8, VIRTQ_DESC_F_WRITE, 0)])
        assert select.select([new_call], [], [], 5.0)[0] == [new_call]
        assert os.eventfd_read(new_call) == 1 and rig.calls() == 0
        ring.set_call_fd(-1)
        rig.mock.add_chain([RawDesc(0xA000, 8, VIRTQ_DESC_F_WRITE, 0)])
        end = time.monotonic() + 5
        while rig.mock.used_idx() != 3:
            assert time.monotonic() < end, "the third request was not served"
        os.write(w, b"x")   # another fd ready: the spin gives way, the poll returns it
        t.join(10)
        assert not t.is_alive() and result == [[r]]
        assert ring.poll_hits == 2 and rig.calls() == 0
        with pytest.raises(BlockingIOError):
            os.eventfd_read(new_call)
    finally:
        ep.close()
        for fd in (new_call, r, w):
            os.close(fd)


def test_polling_gives_the_cpu_to_a_task_that_wants_it(rig: Rig) -> None:
    """The same-CPU rule: a spin must never keep the CPU from another task (the
    driver, when it shares the CPU, cannot make the request the spin waits for).
    With a busy process pinned to the poller's CPU, the spin yields to it, stops
    polling at once instead of at the end of its window, turns the driver's
    notifications back on, and polling pauses for a while."""
    cpus = os.sched_getaffinity(0)
    cpu = min(cpus)
    busy = subprocess.Popen(
        [sys.executable, "-c", "while True: pass"],
        preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),  # noqa: PLW1509 - no threads started yet
    )
    ep = Epoll(1_000_000)   # give_way on, as in the daemons
    ring = _attach(ep, rig.ring())
    ring.poll_ns = 1_000_000_000
    try:
        os.sched_setaffinity(0, {cpu})
        rig.mock.add_chain([RawDesc(0x8000, 8, VIRTQ_DESC_F_WRITE, 0)])
        os.eventfd_write(rig.kick, 1)
        assert ep.poll(0.1) == []
        assert ep.gave_way == 1 and ring.poll_hits == 0 and ring.chains == 1
        assert not rig.mock.used_flags() & VRING_USED_F_NO_NOTIFY
    finally:
        os.sched_setaffinity(0, cpus)
        busy.kill()
        busy.wait()
        ep.close()


def test_vhost_user_interrupt_signaller_follows_the_rings_call_fd(rig: Rig) -> None:
    """The interrupt's per-queue signaller (what a compiled device path calls) is the
    ring's own signal_used: it writes the call fd current when it is called, so a
    SET_VRING_CALL after it was handed out still reaches the driver."""
    from vhost_backends.vrings import VhostUserInterrupt, Vring  # noqa: PLC0415

    vring = Vring(0, rig.queue, rig.serve)
    interrupt = VhostUserInterrupt(None, [vring])  # type: ignore[arg-type]
    signal = interrupt.signaller(0)
    vring.set_call_fd(os.dup(rig.call))
    signal()
    assert rig.calls() == 1
    interrupt.signal_used(0)
    assert rig.calls() == 1
    vring.set_call_fd(-1)
    signal()  # no fd: nothing to do
    assert rig.calls() == 0
