"""The per-connection epoll loop: readers, timers, stop."""

from __future__ import annotations

import os
import threading

import pytest

from vhost_backends.event_loop import EventLoop, KickRing
from virtio_queue import GuestMemory
from virtio_queue.testing import MockSplitQueue


def test_reader_called_until_removed() -> None:
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    calls: list[int] = []
    with EventLoop() as loop:

        def on_read() -> None:
            calls.append(os.eventfd_read(efd))
            if len(calls) == 2:
                loop.remove_reader(efd)
                loop.stop()
            else:
                os.eventfd_write(efd, 5)

        loop.add_reader(efd, on_read)
        os.eventfd_write(efd, 1)
        loop.run(timeout=5)
        assert calls == [1, 5]
        assert not loop.has_reader(efd)
        loop.remove_reader(efd)  # unknown fds are ignored
    os.close(efd)


def test_fileno_is_readable_while_a_watched_fd_is_ready_and_consumes_nothing() -> None:
    import select  # noqa: PLC0415

    efd = os.eventfd(0, os.EFD_NONBLOCK)
    calls: list[int] = []
    with EventLoop() as loop:

        def on_read() -> None:
            calls.append(os.eventfd_read(efd))
            loop.stop()

        loop.add_reader(efd, on_read)
        p = select.poll()
        p.register(loop.fileno(), select.POLLIN)
        assert p.poll(0) == []
        os.eventfd_write(efd, 3)
        assert p.poll(0) == [(loop.fileno(), select.POLLIN)]
        loop.run(timeout=5)  # the reader still sees it: the poll took nothing
        assert calls == [3]
    os.close(efd)


def test_timers_run_in_order_and_cancel() -> None:
    order: list[str] = []
    with EventLoop() as loop:
        loop.call_later(0.02, lambda: order.append("b"))
        loop.call_later(0.0, lambda: order.append("a"))
        h = loop.call_later(0.01, lambda: order.append("cancelled"))
        h.cancel()
        h.cancel()
        loop.call_later(0.03, loop.stop)
        loop.run(timeout=5)
    assert order == ["a", "b"]


def test_run_returns_at_timeout() -> None:
    with EventLoop() as loop:
        loop.run(timeout=0.01)


def test_stop_from_another_thread() -> None:
    with EventLoop() as loop:
        started = threading.Event()
        loop.call_later(0, started.set)
        t = threading.Thread(target=lambda: (started.wait(5), loop.stop()))
        t.start()
        loop.run(timeout=5)
        t.join()


def test_shared_stop_fd_stops_every_loop() -> None:
    stop = os.eventfd(0, os.EFD_NONBLOCK)
    loops = [EventLoop(), EventLoop()]
    try:
        for lp in loops:
            lp.add_stop_fd(stop)
        os.eventfd_write(stop, 1)
        for lp in loops:
            lp.run(timeout=5)  # returns at once: the fd stays readable for all
    finally:
        for lp in loops:
            lp.close()
        os.close(stop)


def test_call_soon_threadsafe_runs_on_the_loop_thread_in_order() -> None:
    """Worker threads hand results back with call_soon_threadsafe (virtio_devices.workers)."""
    ran: list[tuple[int, str]] = []
    with EventLoop() as loop:
        loop_thread = threading.current_thread().name

        def post() -> None:
            for i in range(50):
                loop.call_soon_threadsafe(lambda i=i: ran.append((i, threading.current_thread().name)))
            loop.call_soon_threadsafe(loop.stop)

        t = threading.Thread(target=post, name="worker")
        t.start()
        loop.run(timeout=10)
        t.join()
    assert [i for i, _ in ran] == list(range(50))
    assert {name for _, name in ran} == {loop_thread}


def test_call_soon_threadsafe_posted_from_a_callback_runs_in_a_later_pass() -> None:
    order: list[str] = []
    with EventLoop() as loop:

        def first() -> None:
            order.append("first")
            loop.call_soon_threadsafe(second)

        def second() -> None:
            order.append("second")
            loop.stop()

        loop.call_soon_threadsafe(first)
        loop.run(timeout=10)
    assert order == ["first", "second"]


def test_call_soon_threadsafe_after_close_is_dropped() -> None:
    loop = EventLoop()
    loop.close()
    loop.call_soon_threadsafe(lambda: None)  # no error, nothing written to a closed fd


def test_ring_kicks_served_by_its_kick_ring_until_removed() -> None:
    """add_ring: the ring's kicks never reach a Python reader callback; the compiled
    KickRing reads each and calls its serve(index) once."""
    mem = GuestMemory.from_buffer(bytearray(1 << 16))
    queue = MockSplitQueue(mem, 8).create_queue()
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    served: list[int] = []
    with EventLoop() as loop:

        def serve(index: int) -> None:
            served.append(index)
            loop.stop()

        ring = KickRing(queue, 2, serve, kick_fd=kick)
        loop.add_ring(ring)
        assert loop.has_reader(kick) and ring.attached
        with pytest.raises(ValueError, match="watched by this loop already"):
            loop.add_ring(ring)
        os.eventfd_write(kick, 1)
        loop.run(timeout=5)
        assert served == [2] and ring.kicks == 1
        loop.remove_reader(kick)
        assert not loop.has_reader(kick) and not ring.attached
        with pytest.raises(ValueError, match="no kick fd"):
            loop.add_ring(KickRing(queue, 0, serve))
    os.close(kick)
