"""The compiled epoll set and the fill rings it serves (vhost_backends._fastpath)."""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vhost_backends._fastpath import Epoll, FillRing
from virtio_queue import ByteSource, GuestMemory, InvalidAvailRingIndex, QueueNotReady
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


def test_fill_ring_serves_a_kick_without_python(rig: Rig, epoll: Epoll) -> None:
    """VIRTIO 1.2 §5.4: each request is one device-writable buffer; the kick is
    read, the buffers filled in ring order, the driver called once."""
    ring = FillRing(rig.queue, rig.kick, rig.fill_source, 3, rig.call)
    epoll.register(rig.kick, IN)
    epoll.set_fill_ring(rig.kick, IN, ring)
    heads = [rig.mock.add_chain([RawDesc(0x8000 + 0x100 * i, 16, VIRTQ_DESC_F_WRITE, 0)]) for i in range(3)]
    os.eventfd_write(rig.kick, 1)
    assert epoll.poll(0.05) == []  # handled inside the poll
    assert rig.asked == [3]
    assert rig.mock.used_elems() == [(h, 16) for h in heads]
    assert b"".join(rig.mem.read(0x8000 + 0x100 * i, 16) for i in range(3)) == SOURCE[:48]
    assert rig.calls() == 1
    assert (ring.chains, ring.bytes) == (3, 48)
    with pytest.raises(BlockingIOError):
        os.eventfd_read(rig.kick)  # the kick was consumed


def test_fill_ring_leaves_other_requests_to_python(rig: Rig, epoll: Epoll) -> None:
    ring = FillRing(rig.queue, rig.kick, rig.fill_source, 0, rig.call)
    epoll.register(rig.kick, IN)
    epoll.set_fill_ring(rig.kick, IN, ring)
    ok = rig.mock.add_chain([RawDesc(0x8000, 8, VIRTQ_DESC_F_WRITE, 0)])
    rig.mock.add_chain([RawDesc(0x9000, 8, 0, 0)])  # device-readable: not for this path
    os.eventfd_write(rig.kick, 1)
    assert epoll.poll(0.05) == [rig.kick]
    assert rig.mock.used_elems() == [(ok, 8)]
    assert rig.queue.pending() == 1  # left in the ring for process_queue
    assert rig.calls() == 1


def test_fill_ring_defers_to_python_when_the_device_says_so(rig: Rig, epoll: Epoll) -> None:
    ring = FillRing(rig.queue, rig.kick, rig.fill_source, 0, rig.call)
    epoll.register(rig.kick, IN)
    epoll.set_fill_ring(rig.kick, IN, ring)
    rig.mock.add_chain([RawDesc(0x8000, 8, VIRTQ_DESC_F_WRITE, 0)])
    rig.source = None  # e.g. a request is parked waiting for the source
    os.eventfd_write(rig.kick, 1)
    assert epoll.poll(0.05) == [rig.kick]
    assert os.eventfd_read(rig.kick) == 1  # not consumed: the Python callback reads it
    assert rig.queue.pending() == 1 and rig.calls() == 0


def test_fill_ring_end_of_source_goes_to_python(tmp_path: Path, rig: Rig, epoll: Epoll) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    fd = os.open(empty, os.O_RDONLY)
    try:
        rig.source = ByteSource(fd)
        ring = FillRing(rig.queue, rig.kick, rig.fill_source, 0, rig.call)
        epoll.register(rig.kick, IN)
        epoll.set_fill_ring(rig.kick, IN, ring)
        rig.mock.add_chain([RawDesc(0x8000, 8, VIRTQ_DESC_F_WRITE, 0)])
        os.eventfd_write(rig.kick, 1)
        assert epoll.poll(0.05) == [rig.kick]
        assert rig.queue.pending() == 1
    finally:
        os.close(fd)


def test_fill_ring_error_goes_to_python_not_up(rig: Rig, epoll: Epoll) -> None:
    """A ring that cannot be used (here: not ready) is the Python path's to report."""
    ring = FillRing(rig.queue, rig.kick, rig.fill_source, 0, rig.call)
    epoll.register(rig.kick, IN)
    epoll.set_fill_ring(rig.kick, IN, ring)
    rig.queue.ready = False
    os.eventfd_write(rig.kick, 1)
    assert epoll.poll(0.05) == [rig.kick]
    with pytest.raises(QueueNotReady):
        ring.serve_kick()  # what the poll kept from its caller


def test_fill_ring_without_call_fd_and_detached(rig: Rig, epoll: Epoll) -> None:
    ring = FillRing(rig.queue, rig.kick, rig.fill_source, 0)
    epoll.register(rig.kick, IN)
    epoll.set_fill_ring(rig.kick, IN, ring)
    rig.mock.add_chain([RawDesc(0x8000, 8, VIRTQ_DESC_F_WRITE, 0)])
    os.eventfd_write(rig.kick, 1)
    assert epoll.poll(0.05) == []
    assert rig.calls() == 0 and ring.chains == 1
    epoll.set_fill_ring(rig.kick, IN, None)
    os.eventfd_write(rig.kick, 1)
    assert epoll.poll(0.05) == [rig.kick]
    with pytest.raises(ValueError):
        epoll.set_fill_ring(rig.call, IN, ring)  # not the ring's kick fd


# -- adaptive polling -------------------------------------------------------------------


def _polling(rig: Rig, max_us: int, window_ns: int = 0) -> tuple[Epoll, FillRing]:
    ep = Epoll(max_us)
    ring = FillRing(rig.queue, rig.kick, rig.fill_source, 0, rig.call)
    ring.poll_ns = window_ns
    ep.register(rig.kick, IN)
    ep.set_fill_ring(rig.kick, IN, ring)
    return ep, ring


def _later(delay: float, fn: Callable[[], object]) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
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
            time.sleep(0.002)   # later than the window, well within the maximum
        assert windows == [0, 4000, 8000, 16000]
    finally:
        ep.close()
    ep, ring = _polling(rig, 1000, 16000)   # a window above a (new) maximum of 1 ms
    try:
        for i in range(2):
            rig.mock.add_chain([RawDesc(0x9000 + 0x100 * i, 8, VIRTQ_DESC_F_WRITE, 0)])
            os.eventfd_write(rig.kick, 1)
            assert ep.poll(0) == []
            time.sleep(0.005)
        assert ring.poll_ns == 0
        assert ring.chains == 2 and ring.poll_hits == 0
    finally:
        ep.close()


@pytest.mark.parametrize("event_idx", [False, True])
def test_polling_serves_a_request_without_a_kick(tmp_path: Path, event_idx: bool) -> None:
    """VIRTIO 1.2 §2.7.10: while the device polls it tells the driver not to kick
    (VRING_USED_F_NO_NOTIFY, or an avail_event it has passed); a request made then
    is served by the poll, and notifications are on again once polling ends."""
    rig = Rig(tmp_path)
    if event_idx:
        rig.queue = rig.mock.create_queue(event_idx=True)
    ep, ring = _polling(rig, 1_000_000, 200_000_000)   # 200 ms window
    seen: list[bool] = []
    try:
        first = rig.mock.add_chain([RawDesc(0x8000, 16, VIRTQ_DESC_F_WRITE, 0)])
        os.eventfd_write(rig.kick, 1)

        def request() -> None:
            # What a driver checks before kicking.
            if event_idx:
                idx = rig.mock.avail_idx()
                seen.append(vring_need_event(rig.mock.avail_event(), idx + 1, idx))
            else:
                seen.append(not rig.mock.used_flags() & VRING_USED_F_NO_NOTIFY)
            rig.mock.add_chain([RawDesc(0x9000, 16, VIRTQ_DESC_F_WRITE, 0)])

        t = _later(0.02, request)
        assert ep.poll(0.5) == []
        t.join()
        assert seen == [False]   # no kick wanted while polling
        assert [h for h, _ in rig.mock.used_elems()] == [first, first + 1]
        assert ring.poll_hits == 1 and ring.chains == 2
        assert rig.mem.read(0x9000, 16) == SOURCE[16:32]
        # Polling ended (the deadline): the driver is asked to kick again.
        if event_idx:
            assert rig.mock.avail_event() == rig.mock.avail_idx()
        else:
            assert not rig.mock.used_flags() & VRING_USED_F_NO_NOTIFY
    finally:
        ep.close()
        rig.close()


def test_polling_gives_way_to_other_fds_and_to_python(rig: Rig) -> None:
    """The spin returns to epoll as soon as another fd is ready, and hands a request
    it cannot serve to the ring's Python callback (the kick fd is returned)."""
    ep, _ring = _polling(rig, 1_000_000, 1_000_000_000)   # a 1 s window
    r, w = os.pipe()
    try:
        ep.register(r, IN)
        rig.mock.add_chain([RawDesc(0x8000, 8, VIRTQ_DESC_F_WRITE, 0)])
        os.eventfd_write(rig.kick, 1)
        t = _later(0.02, lambda: os.write(w, b"x"))
        t0 = time.monotonic()
        assert ep.poll(5.0) == [r]
        assert time.monotonic() - t0 < 0.9    # long before the window ends
        t.join()
        assert not rig.mock.used_flags() & VRING_USED_F_NO_NOTIFY
        os.read(r, 1)

        os.eventfd_write(rig.kick, 1)
        t = _later(0.02, lambda: rig.mock.add_chain([RawDesc(0x9000, 8, 0, 0)]))  # device-readable
        t0 = time.monotonic()
        assert ep.poll(5.0) == [rig.kick]
        assert time.monotonic() - t0 < 0.9
        t.join()
        assert rig.queue.pending() == 1   # left for process_queue
        assert not rig.mock.used_flags() & VRING_USED_F_NO_NOTIFY
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
    ep = Epoll(1_000_000)
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
        rings = [FillRing(x.queue, x.kick, refill(y), 0) for x, y in ((a, b), (b, a))]
        for ring, rig in zip(rings, (a, b), strict=True):
            ring.poll_ns = 1_000_000_000
            ep.register(rig.kick, IN)
            ep.set_fill_ring(rig.kick, IN, ring)
            rig.mock.add_chain([RawDesc(0x8000, 8, VIRTQ_DESC_F_WRITE, 0)])
            os.eventfd_write(rig.kick, 1)
        ep.register(r, IN)
        t = _later(0.05, lambda: os.write(w, b"x"))
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


def test_polling_hands_a_broken_avail_index_to_python(rig: Rig) -> None:
    """VIRTIO 1.2 §2.7.13.3: an avail index more than a queue ahead, written while
    the device polls, is not served: the ring goes to its Python path (which stops
    it and reports the error) and the poll returns."""
    ep, ring = _polling(rig, 1_000_000, 1_000_000_000)
    try:
        rig.mock.add_chain([RawDesc(0x8000, 8, VIRTQ_DESC_F_WRITE, 0)])
        os.eventfd_write(rig.kick, 1)
        t = _later(0.02, lambda: rig.mock.set_avail_idx(rig.mock.avail_idx() + 1000))
        t0 = time.monotonic()
        assert ep.poll(5.0) == [rig.kick]
        assert time.monotonic() - t0 < 0.9
        t.join()
        assert ring.chains == 1 and rig.mock.used_idx() == 1
        assert not rig.mock.used_flags() & VRING_USED_F_NO_NOTIFY
        with pytest.raises(InvalidAvailRingIndex):
            rig.queue.pop_chain()
    finally:
        ep.close()
