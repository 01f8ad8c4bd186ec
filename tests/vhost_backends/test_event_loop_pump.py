"""Host fds served in compiled code: the vhost-user loop runs an FdPump in the poll
and calls the Python callback only when the pump asks or raises; other loops (the
DeviceLoop over a loop without pumps) call the callback, which runs the pump."""

from __future__ import annotations

import errno
import os
import select
import struct
import threading
from collections.abc import Callable, Iterator

import pytest

from vhost_backends.event_loop import EventLoop, KickRing
from virtio_devices._pump import EventfdPump, FdPump, Signaller
from virtio_devices.device_loop import DeviceLoop
from virtio_devices.hosts.input import EV_KEY, EV_SYN, KEY_A, SYN_REPORT, PipeInputHost
from virtio_devices.input import EVENTQ, InputDevice
from virtio_devices.testing import DeviceRig, FakeInterrupt
from virtio_queue import GuestMemory
from virtio_queue.testing import MockSplitQueue


@pytest.fixture
def efd() -> Iterator[int]:
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    yield fd
    os.close(fd)


def _callback(pump: FdPump, calls: list[str], loop: EventLoop) -> Callable[[], None]:
    def on_readable() -> None:
        calls.append("callback")
        if pump.pump():
            calls.append("python path")
            if isinstance(pump, EventfdPump):
                pump.pending = 0
        loop.stop()

    return on_readable


def test_pump_served_in_poll_without_callback(efd: int) -> None:
    pump = EventfdPump(efd)
    calls: list[str] = []
    with EventLoop() as loop:
        loop.add_reader(efd, _callback(pump, calls, loop), pump=pump)
        os.eventfd_write(efd, 3)
        loop.call_later(0.05, loop.stop)  # the callback, which would stop it, never runs
        loop.run(timeout=5)
    assert pump.total == 3
    assert pump.pumped == 1
    assert calls == []


def test_pump_asks_for_python_then_callback_runs_the_python_path(efd: int) -> None:
    pump = EventfdPump(efd, hand_over_at=10)
    calls: list[str] = []
    with EventLoop() as loop:
        loop.add_reader(efd, _callback(pump, calls, loop), pump=pump)
        os.eventfd_write(efd, 10)
        loop.run(timeout=5)
    assert pump.total == 10
    assert calls == ["callback", "python path"]
    assert pump.handed_over == 1


def test_pump_exception_reaches_the_callback_and_the_device_guard(efd: int) -> None:
    pump = EventfdPump(efd, raise_at=5)
    errors: list[Exception] = []
    with EventLoop() as loop:
        dl = DeviceLoop(loop, lambda e: (errors.append(e), loop.stop()))
        dl.open()
        dl.add_reader(efd, lambda: (pump.pump(), None)[1], pump=pump)
        os.eventfd_write(efd, 7)
        loop.run(timeout=5)
        dl.clear()
        assert not loop.has_reader(efd)
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    assert "raise_at" in str(errors[0])
    assert pump.error is None  # raised once, by pump()


def test_pump_replaced_and_removed_with_the_reader(efd: int) -> None:
    pump = EventfdPump(efd)
    calls: list[str] = []
    with EventLoop() as loop:
        loop.add_reader(efd, _callback(pump, calls, loop), pump=pump)
        # Registered again without a pump: plain reader, the callback runs.
        loop.add_reader(efd, _callback(pump, calls, loop))
        os.eventfd_write(efd, 2)
        loop.run(timeout=5)
        assert calls == ["callback"]
        assert pump.total == 2 and pump.pumped == 1  # the callback's own pump()
        loop.remove_reader(efd)
        assert not loop.has_reader(efd)


class _PlainLoop:
    """A loop that knows no pumps (as asyncio's or an embedding VMM's)."""

    def __init__(self) -> None:
        self.readers: dict[int, Callable[[], None]] = {}

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self.readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        self.readers.pop(fd, None)

    def call_later(self, delay: float, callback: Callable[[], None]) -> object:
        raise AssertionError("not used")

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        raise AssertionError("not used")


def test_device_loop_without_pump_support_gives_the_callback_alone(efd: int) -> None:
    plain = _PlainLoop()
    dl = DeviceLoop(plain, lambda e: None)  # type: ignore[arg-type]
    dl.open()
    pump = EventfdPump(efd)
    served: list[bool] = []
    dl.add_reader(efd, lambda: served.append(pump.pump()), pump=pump)
    os.eventfd_write(efd, 4)
    plain.readers[efd]()
    assert served == [False]
    assert pump.total == 4


def test_base_pump_always_hands_over() -> None:
    pump = FdPump()
    assert pump.pump() is True
    assert pump.handed_over == 1 and pump.pumped == 0


def test_reader_on_a_ring_kick_fd_is_refused(efd: int) -> None:
    mem = GuestMemory.from_buffer(bytearray(1 << 16))
    queue = MockSplitQueue(mem, 8).create_queue()
    with EventLoop() as loop:
        loop.add_ring(KickRing(queue, 0, lambda i: None, kick_fd=efd))
        with pytest.raises(ValueError, match=f"fd {efd} is a ring's kick fd"):
            loop.add_reader(efd, lambda: None, pump=EventfdPump(efd))


def test_input_device_host_fd_served_in_the_poll() -> None:
    """virtio-input on an evdev-like host under the vhost-user loop: a whole group
    reaches the eventq and the driver is notified with no Python callback."""
    host = PipeInputHost("keyboard")
    calls: list[str] = []
    with EventLoop() as loop:

        class StopOnSignal(FakeInterrupt):
            def signal_used(self, queue_index: int) -> None:
                super().signal_used(queue_index)
                loop.stop()

        dl = DeviceLoop(loop, lambda e: (calls.append(f"error {e}"), loop.stop()))
        dl.open()
        dl.clock = None  # type: ignore[attr-defined]  # the rig reads a FakeLoop's clock
        device = InputDevice(host)
        with DeviceRig(device, event_idx=True, loop=dl, interrupt=StopOnSignal()) as rig:  # type: ignore[arg-type]
            gpas = {}
            for _ in range(4):
                head, (gpa,) = rig.add_request(EVENTQ, writable=[8])
                gpas[head] = gpa
            rig.kick(EVENTQ)
            # The callback is wrapped: count its runs.
            pump = device._pump
            assert pump is not None
            dl.add_reader(
                host.fileno(), lambda: (calls.append("callback"), device._on_host_readable()), pump=pump
            )
            host.inject([(EV_KEY, KEY_A, 1), (EV_SYN, SYN_REPORT, 0)])
            loop.run(timeout=30)
            used = rig.used(EVENTQ)
            got = [struct.unpack("<HHi", rig.read(gpas[h], 8)) for h, _ in used]
            assert got == [(EV_KEY, KEY_A, 1), (EV_SYN, SYN_REPORT, 0)]
            assert rig.interrupt.used == [EVENTQ]
            assert calls == []
            assert pump.pumped == 1 and device.events_compiled == 2
            dl.clear()
    host.close()


@pytest.mark.parametrize("compiled", [True, False])
def test_input_eventq_kick_served_by_the_device_kick_pump(efd: int, compiled: bool) -> None:
    """A ring with the device's kick pump (VirtioDevice.kick_pump): the eventq kick
    keeps the new buffers, hands held groups to process_queue, and otherwise
    serves the kick with no call of process_queue; with compiled=False there is no
    pump and process_queue serves."""
    host = PipeInputHost("keyboard")
    device = InputDevice(host, compiled=compiled)
    served: list[int] = []
    with DeviceRig(device, event_idx=True) as rig:
        ring = KickRing(
            rig.queues[EVENTQ], EVENTQ, lambda i: (served.append(i), device.process_queue(i)), kick_fd=efd
        )
        ring.pump = device.kick_pump(EVENTQ)
        assert (ring.pump is not None) == compiled
        host.inject([(EV_KEY, KEY_A, 1), (EV_SYN, SYN_REPORT, 0)])
        # The group is held: no buffers yet (the fd callback ran, as the loop would).
        rig.loop.fire_pump(host.fileno())
        gpas = {}
        for _ in range(4):
            head, (gpa,) = rig.add_request(EVENTQ, writable=[8])
            gpas[head] = gpa
        os.eventfd_write(efd, 1)
        ring.serve_kick()
        used = rig.used(EVENTQ)
        got = [struct.unpack("<HHi", rig.read(gpas[h], 8)) for h, _ in used]
        assert got == [(EV_KEY, KEY_A, 1), (EV_SYN, SYN_REPORT, 0)]
        assert rig.interrupt.used == [EVENTQ]
        if compiled:
            # Held groups are the Python path's: the pump kept the buffers, then asked.
            assert served == [EVENTQ]
            assert device._st.good == 2
            # Now nothing is held: a kick is served without process_queue and reads
            # no host fd (the fd's own readiness delivers the new group).
            host.inject([(EV_KEY, KEY_A, 0), (EV_SYN, SYN_REPORT, 0)])
            os.eventfd_write(efd, 1)
            ring.serve_kick()
            assert served == [EVENTQ]
            assert ring.pump is not None and ring.pump.pumped == 1
            assert rig.used(EVENTQ) == []
            rig.loop.fire_pump(host.fileno())
            assert len(rig.used(EVENTQ)) == 2
            assert device._st.good == 0
        else:
            assert served == [EVENTQ]
        ring.close()
    host.close()


# -- pumps without the GIL ---------------------------------------------------------


def _wait_fd(fd: int) -> int:
    """Wait (5 s at most) for eventfd ``fd`` and read its count."""
    ready, _, _ = select.select([fd], [], [], 5)
    assert ready, f"eventfd {fd} not written within 5 s"
    return os.eventfd_read(fd)


def test_nogil_pump_keeps_the_loop_asleep_without_the_gil(efd: int) -> None:
    """A loop with no Python work: every readiness is served by the nogil path and
    the poll goes back to epoll_wait without taking the GIL (only the stop does)."""
    notify = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        pump = EventfdPump(efd, nogil=True, notify_fd=notify)
        assert pump.offers_nogil
        calls: list[str] = []
        with EventLoop() as loop:
            loop.add_reader(efd, _callback(pump, calls, loop), pump=pump)
            epoll = loop._epoll
            thread = threading.Thread(target=loop.run, kwargs={"timeout": 30})
            thread.start()
            for n in range(1, 6):
                os.eventfd_write(efd, n)
                _wait_fd(notify)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            assert not thread.is_alive()
            # run() had no timer: one wait, left only for the stop.
            assert epoll.gil_wakeups == 1
            assert epoll.nogil_wakeups == 5
        assert pump.total == 15
        assert pump.pumped == pump.pumped_nogil == 5
        assert calls == []
    finally:
        os.close(notify)


def test_nogil_pump_fallback_runs_pump_c_then_the_callback(efd: int) -> None:
    """The nogil path asks for the GIL for a count it cannot serve: pump_c takes
    over (the count read once, not again) and the Python path runs."""
    pump = EventfdPump(efd, hand_over_at=10, nogil=True)
    calls: list[str] = []
    with EventLoop() as loop:
        loop.add_reader(efd, _callback(pump, calls, loop), pump=pump)
        os.eventfd_write(efd, 12)
        loop.run(timeout=5)
        assert loop._epoll.nogil_wakeups == 0
    assert pump.total == 12
    assert calls == ["callback", "python path"]
    assert pump.handed_over == 1 and pump.pumped_nogil == 0


def test_nogil_pump_error_reaches_the_callback_and_the_device_guard(efd: int) -> None:
    pump = EventfdPump(efd, raise_at=5, nogil=True)
    errors: list[Exception] = []
    with EventLoop() as loop:
        dl = DeviceLoop(loop, lambda e: (errors.append(e), loop.stop()))
        dl.open()
        dl.add_reader(efd, lambda: (pump.pump(), None)[1], pump=pump)
        os.eventfd_write(efd, 7)
        loop.run(timeout=5)
        dl.clear()
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    assert "raise_at 5" in str(errors[0])
    assert pump.total == 7 and pump.error is None


def test_nogil_pump_read_error_is_raised_by_pump_c() -> None:
    """A read that fails in the nogil path (here: EBADF, a pipe's write end) is
    kept as its errno and raised by pump_c, with the GIL, through the callback."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        pump = EventfdPump(w, nogil=True)  # the write end: read() fails with EBADF
        errors: list[BaseException] = []

        def cb() -> None:
            try:
                pump.pump()
            except OSError as e:
                errors.append(e)
            loop.stop()

        with EventLoop() as loop:
            # Registered on the readable end, the pump reads the other one.
            os.write(w, b"x")
            loop.add_reader(r, cb, pump=pump)
            loop.run(timeout=5)
        assert len(errors) == 1 and "reading eventfd" in str(errors[0])
        assert errors[0].errno == errno.EBADF
    finally:
        os.close(r)
        os.close(w)


def test_nogil_pump_removed_is_not_run_and_cannot_serve_two_fds(efd: int) -> None:
    pump = EventfdPump(efd, nogil=True)
    other = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        with EventLoop() as loop:
            loop.add_reader(efd, lambda: None, pump=pump)
            with pytest.raises(ValueError, match=f"pump serves fd {efd} already, not fd {other}"):
                loop.add_reader(other, lambda: None, pump=pump)
            loop.remove_reader(efd)
            os.eventfd_write(efd, 1)
            loop.add_reader(other, loop.stop)
            os.eventfd_write(other, 1)
            loop.run(timeout=5)
        assert pump.total == 0 and pump.pumped == 0
    finally:
        os.close(other)


def test_nogil_and_gil_pumps_in_one_batch(efd: int) -> None:
    """A nogil pump that serves its fd and a plain pump that hands over, ready at
    once: the plain one's callback runs, the nogil one is served without it."""
    other = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        fast = EventfdPump(efd, nogil=True)
        slow = EventfdPump(other, hand_over_at=1)
        calls: list[str] = []
        with EventLoop() as loop:
            loop.add_reader(efd, _callback(fast, calls, loop), pump=fast)
            loop.add_reader(other, _callback(slow, calls, loop), pump=slow)
            os.eventfd_write(efd, 2)
            os.eventfd_write(other, 3)
            loop.run(timeout=5)
        assert fast.total == 2 and fast.pumped_nogil == 1
        assert slow.total == 3 and calls == ["callback", "python path"]
    finally:
        os.close(other)


def _nogil_ring(kick: int, pump: FdPump, served: list[int], loop: EventLoop) -> KickRing:
    mem = GuestMemory.from_buffer(bytearray(1 << 16))
    ring = KickRing(
        MockSplitQueue(mem, 8).create_queue(),
        0,
        lambda i: (served.append(i), loop.stop()),
        kick_fd=kick,
    )
    ring.pump = pump
    return ring


def test_nogil_kick_pump_serves_kicks_without_the_gil(efd: int) -> None:
    """A ring whose pump offers a nogil path: each kick is read and served in the
    poll's nogil phase (the pump reads its own eventfd here), the GIL not taken
    and ``serve`` not called."""
    work = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    notify = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        pump = EventfdPump(work, nogil=True, notify_fd=notify)
        served: list[int] = []
        with EventLoop() as loop:
            ring = _nogil_ring(efd, pump, served, loop)
            loop.add_ring(ring)
            epoll = loop._epoll
            thread = threading.Thread(target=loop.run, kwargs={"timeout": 30})
            thread.start()
            for n in range(1, 4):
                os.eventfd_write(work, n)
                os.eventfd_write(efd, 1)
                _wait_fd(notify)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            assert not thread.is_alive()
            assert epoll.gil_wakeups == 1 and epoll.nogil_wakeups == 3
        assert ring.kicks == ring.nogil_kicks == 3 and ring.python_calls == 0
        assert pump.total == 6 and pump.pumped_nogil == 3
        assert served == []
        assert not select.select([efd], [], [], 0)[0]  # every kick was read
    finally:
        os.close(work)
        os.close(notify)


def test_nogil_kick_pump_hands_over_to_pump_c_then_serve(efd: int) -> None:
    """The nogil path asks for the GIL: the kick (read once, in the nogil phase) goes
    on through the ring's service, pump_c with the GIL and then ``serve``."""
    work = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        pump = EventfdPump(work, hand_over_at=10, nogil=True)
        served: list[int] = []
        with EventLoop() as loop:
            ring = _nogil_ring(efd, pump, served, loop)
            loop.add_ring(ring)
            os.eventfd_write(work, 12)
            os.eventfd_write(efd, 1)
            loop.run(timeout=5)
            assert loop._epoll.nogil_wakeups == 0
        assert served == [0]
        assert ring.kicks == 1 and ring.nogil_kicks == 0 and ring.python_calls == 1
        assert pump.total == 12 and pump.pending == 12 and pump.handed_over == 1
        assert not select.select([efd], [], [], 0)[0]  # the kick was read once
    finally:
        os.close(work)


def test_ring_with_a_fill_source_or_a_plain_pump_keeps_the_gil_path(efd: int) -> None:
    """Only a ring with a nogil pump and no fill source is served in the nogil
    phase; a removed one is not run (its kicks are not read)."""
    work = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        served: list[int] = []
        with EventLoop() as loop:
            ring = _nogil_ring(efd, EventfdPump(work, hand_over_at=1), served, loop)
            loop.add_ring(ring)
            os.eventfd_write(work, 1)
            os.eventfd_write(efd, 1)
            loop.run(timeout=5)
            assert served == [0] and ring.nogil_kicks == 0
            loop.remove_reader(efd)
            pump = EventfdPump(work, nogil=True)
            ring2 = _nogil_ring(efd, pump, served, loop)
            asked: list[int] = []

            def no_source(i: int) -> None:
                asked.append(i)
                loop.stop()

            ring2.fill_source = no_source
            loop.add_ring(ring2)
            os.eventfd_write(efd, 1)
            loop.run(timeout=5)
            # The fill source, then pump_c with the GIL (nothing to read: served).
            assert asked == [0] and ring2.nogil_kicks == 0
            assert pump.pumped == 1 and pump.pumped_nogil == 0 and served == [0]
            loop.remove_reader(efd)
            os.eventfd_write(efd, 1)
            loop.call_later(0.01, loop.stop)
            loop.run(timeout=5)
            assert ring2.kicks == 1
    finally:
        os.close(work)


def test_muted_pump_gets_no_wake_ups_until_its_fd_is_watched_again(efd: int) -> None:
    """FdPump.mute: the loop's epoll set stops reporting the fd (readable still), its
    tables unchanged; mute(False) or add_reader of the fd watches it again,
    remove_reader forgets it; a pump that serves no loop's fd cannot be muted."""
    pump = EventfdPump(efd, nogil=True)
    assert not pump.mute()
    with EventLoop() as loop:
        loop.add_reader(efd, lambda: None, pump=pump)
        assert pump.mute()
        os.eventfd_write(efd, 2)
        loop.call_later(0.02, loop.stop)
        loop.run(timeout=5)
        assert pump.total == 0 and pump.pumped == 0
        assert pump.mute(False)  # watched again, without the loop's tables
        loop.call_later(0.02, loop.stop)
        loop.run(timeout=5)
        assert pump.total == 2 and pump.pumped_nogil == 1
        assert pump.mute()
        os.eventfd_write(efd, 3)
        again = EventfdPump(efd, nogil=True)
        loop.add_reader(efd, lambda: None, pump=again)
        loop.call_later(0.02, loop.stop)
        loop.run(timeout=5)
        assert again.total == 3 and again.pumped_nogil == 1 and pump.total == 2
        loop.remove_reader(efd)
        assert not again.mute() and not pump.mute(False)


def test_base_pump_offers_no_nogil_path() -> None:
    assert not FdPump().offers_nogil
    assert not EventfdPump(-1).offers_nogil


def test_signaller_owns_its_call_fd_and_the_ring_gives_it_out() -> None:
    """A Signaller writes the call eventfd it owns (none: nothing); a new fd
    replaces and closes the old one in place, so holders signal the current one."""
    a = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    b = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    mem = GuestMemory.from_buffer(bytearray(1 << 16))
    ring = KickRing(MockSplitQueue(mem, 8).create_queue(), 0, lambda i: None, call_fd=a)
    sig = ring.signaller
    assert isinstance(sig, Signaller) and sig.call_fd == a == ring.call_fd
    sig()
    assert os.eventfd_read(a) == 1
    ring.set_call_fd(b)  # SET_VRING_CALL: the holder now signals b
    with pytest.raises(OSError):
        os.fstat(a)  # closed
    sig()
    assert os.eventfd_read(b) == 1
    with pytest.raises(ValueError, match="bad file descriptor -2"):
        sig.set_fd(-2)
    ring.close()
    assert sig.call_fd == -1
    sig()  # no fd: nothing
    with pytest.raises(OSError):
        os.fstat(b)
