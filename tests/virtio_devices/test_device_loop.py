"""DeviceLoop: the device's view of the loop, every callback under the error policy."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from virtio_devices.device_loop import DeviceLoop


class _Handle:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class RecordingLoop:
    """Keeps what is registered; the test plays the loop by calling it."""

    def __init__(self) -> None:
        self.readers: dict[int, Callable[[], None]] = {}
        self.timers: list[tuple[_Handle, Callable[[], None]]] = []
        self.soon: list[Callable[[], None]] = []

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self.readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        self.readers.pop(fd, None)

    def call_later(self, delay: float, callback: Callable[[], None]) -> _Handle:
        handle = _Handle()
        self.timers.append((handle, callback))
        return handle

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        self.soon.append(callback)


def _boom() -> None:
    raise KeyError("device bug")


@pytest.fixture
def parts() -> tuple[RecordingLoop, DeviceLoop, list[Exception]]:
    loop = RecordingLoop()
    errors: list[Exception] = []
    dl = DeviceLoop(loop, errors.append)
    dl.open()
    return loop, dl, errors


def test_device_loop_callback_exception_goes_to_on_error_not_the_loop(
    parts: tuple[RecordingLoop, DeviceLoop, list[Exception]],
) -> None:
    loop, dl, errors = parts
    dl.add_reader(7, _boom)
    dl.call_later(0, _boom)
    dl.call_soon_threadsafe(_boom)
    loop.readers[7]()
    loop.timers[0][1]()
    loop.soon[0]()
    assert [type(e) for e in errors] == [KeyError] * 3


def test_device_loop_base_exception_is_not_swallowed(
    parts: tuple[RecordingLoop, DeviceLoop, list[Exception]],
) -> None:
    loop, dl, errors = parts

    def interrupt() -> None:
        raise KeyboardInterrupt

    dl.call_soon_threadsafe(interrupt)
    with pytest.raises(KeyboardInterrupt):
        loop.soon[0]()
    assert errors == []


def test_device_loop_clear_drops_readers_timers_and_pending_posts(
    parts: tuple[RecordingLoop, DeviceLoop, list[Exception]],
) -> None:
    loop, dl, _errors = parts
    ran: list[str] = []
    dl.add_reader(7, lambda: ran.append("reader"))
    timer = dl.call_later(1, lambda: ran.append("timer"))
    dl.call_soon_threadsafe(lambda: ran.append("posted before"))
    dl.clear()
    assert 7 not in loop.readers
    assert loop.timers[0][0].cancelled
    dl.call_soon_threadsafe(lambda: ran.append("posted while reset"))
    for cb in loop.soon:
        cb()
    loop.timers[0][1]()  # a loop that ran the timer anyway
    assert ran == []
    timer.cancel()  # harmless after clear
    # Activated again: new registrations run.
    dl.open()
    dl.call_soon_threadsafe(lambda: ran.append("after open"))
    loop.soon[-1]()
    assert ran == ["after open"]


def test_device_loop_remove_reader_only_removes_its_own(
    parts: tuple[RecordingLoop, DeviceLoop, list[Exception]],
) -> None:
    loop, dl, _errors = parts
    loop.add_reader(3, lambda: None)  # the handler's own fd (a kick)
    dl.remove_reader(3)
    assert 3 in loop.readers
    dl.clear()
    assert 3 in loop.readers


def test_device_loop_fired_timer_is_forgotten(
    parts: tuple[RecordingLoop, DeviceLoop, list[Exception]],
) -> None:
    loop, dl, _errors = parts
    ran: list[int] = []
    dl.call_later(0, lambda: ran.append(1))
    loop.timers[0][1]()
    dl.clear()
    assert ran == [1] and not loop.timers[0][0].cancelled


def test_fileno_is_the_loops_or_minus_one() -> None:
    class WithFd(RecordingLoop):
        def fileno(self) -> int:
            return 42

    assert DeviceLoop(WithFd(), lambda e: None).fileno() == 42
    assert DeviceLoop(RecordingLoop(), lambda e: None).fileno() == -1
