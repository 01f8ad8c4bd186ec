"""The transport side of issue 12's device policy: quiesce before a queue is taken
back, and a failing device never ends the session.

The handler runs on its own loop thread (as in the daemon) and the test drives it
with our Frontend over a socketpair.  Every wait is on an fd, an event or a reply,
with a timeout.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from vhost_backends.connection import Connection
from vhost_backends.event_loop import EventLoop
from vhost_backends.frontend import BackendError, Frontend
from vhost_backends.handler import VhostUserHandler
from virtio_devices.errors import DeviceNeedsReset, HostFault
from virtio_queue import DescriptorChain, GuestMemory, Queue
from virtio_queue.errors import InvalidAvailRingIndex
from virtio_queue.testing import RawDesc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from echo_device import EchoDevice

WRITE = 2
TIMEOUT = 5.0


def _echo_chain(chain: DescriptorChain) -> int:
    data = chain.reader().read()
    w = chain.writer()
    n = min(len(data), w.available_bytes())
    w.write(data[:n])
    return n


class Session:
    """A handler for ``device`` on a loop thread, and the Frontend talking to it."""

    def __init__(self, device: EchoDevice) -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.device = device
        self.loop = EventLoop()
        self.handler = VhostUserHandler(device, Connection(a), self.loop, name="test")
        self.handler.attach()
        self.thread = threading.Thread(target=self.loop.run)
        self.thread.start()
        self.fe = Frontend(b, timeout=TIMEOUT)
        self.err_fds: list[int] = []

    def ready(self) -> None:
        """Negotiate, map 1 MiB, start ring 0, and give rings 0 and 1 an err fd."""
        self.fe.negotiate()
        self.fe.add_memory(1 << 20)
        self.fe.set_mem_table()
        for index in (0, 1):
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self.err_fds.append(fd)
            self.fe.set_vring_err(index, fd)
        self.fe.setup_ring(0, 64)

    def add_echo(self, payload: bytes = b"ping") -> tuple[int, int]:
        """Make one echo chain available on ring 0; return ``(head, dst)``."""
        mock = self.fe.rings[0].mock
        src, dst = mock.alloc(len(payload)), mock.alloc(len(payload))
        self.fe.memory.write(src, payload)
        head = mock.add_chain([RawDesc(src, len(payload), 0, 0), RawDesc(dst, len(payload), WRITE, 0)])
        return head, dst

    def err_signalled(self, index: int, timeout: float = TIMEOUT) -> bool:
        p = select.poll()
        p.register(self.err_fds[index], select.POLLIN)
        if not p.poll(int(timeout * 1000)):
            return False
        os.eventfd_read(self.err_fds[index])
        return True

    def sync(self) -> None:
        """Two request round trips: everything the loop had to do before is done."""
        for _ in range(2):
            assert self.fe.get_queue_num() == 2

    def restart_ring0(self) -> None:
        """Start ring 0 again the way QEMU does after vhost_dev_stop."""
        ring = self.fe.rings[0]
        base = self.fe.get_vring_base(0)
        for fd in (ring.kick_fd, ring.call_fd):
            os.close(fd)
        ring.kick_fd = os.eventfd(0, os.EFD_NONBLOCK)
        ring.call_fd = os.eventfd(0, os.EFD_NONBLOCK)
        mock = ring.mock
        self.fe.set_vring_num(0, mock.size)
        self.fe.set_vring_base(0, base)
        fe = self.fe
        fe.set_vring_addr(
            0, fe.user_addr(mock.desc_table), fe.user_addr(mock.avail_ring), fe.user_addr(mock.used_ring)
        )
        fe.set_vring_call(0, ring.call_fd)
        fe.set_vring_kick(0, ring.kick_fd)
        fe.set_vring_enable(0, True)

    def finish(self) -> None:
        self.fe.close()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()
        self.handler.close()
        self.loop.close()
        for fd in self.err_fds:
            os.close(fd)


@pytest.fixture
def session_of() -> Iterator[Callable[[EchoDevice], Session]]:
    made: list[Session] = []

    def make(device: EchoDevice) -> Session:
        s = Session(device)
        made.append(s)
        return s

    yield make
    for s in made:
        s.finish()


# -- a device that fails ------------------------------------------------------------------
FAULTS: list[Callable[[], Exception]] = [
    lambda: DeviceNeedsReset("echo q0: device bug: KeyError: 'x'"),
    lambda: RuntimeError("a bug in the device"),
    # A device that overrides process_queue and lets a host fault out: the drain
    # loop's policy did not run, so the transport cannot know what the guest got.
    lambda: HostFault("disk image gone"),
    lambda: OSError(5, "Input/output error"),
]
FAULT_IDS = ["DeviceNeedsReset", "RuntimeError", "HostFault", "OSError"]


class FailingDevice(EchoDevice):
    """Echo device that raises ``fault`` from where ``where`` says, while ``fault`` is set.

    ``where``: "kick" (process_queue), "reader" (an fd reader it registered),
    "timer" (a call_later callback) or "soon" (a call_soon_threadsafe callback
    posted from a worker thread).  The callbacks are armed by a kick.
    """

    def __init__(self, where: str, fault: Exception | None) -> None:
        super().__init__()
        self.where = where
        self.fault = fault
        self.trigger = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.callbacks_run = 0

    def activate(self, memory: GuestMemory, queues: Sequence[Queue], interrupt: Any, loop: Any) -> None:
        super().activate(memory, queues, interrupt, loop)
        if self.where == "reader":
            # Deliberately never removed: the transport drops it at reset.
            loop.add_reader(self.trigger, self._on_callback)

    def _on_callback(self) -> None:
        self.callbacks_run += 1
        if self.fault is not None:
            raise self.fault

    def process_queue(self, index: int) -> None:
        loop = self.loop
        assert loop is not None
        if self.fault is not None:
            if self.where == "kick":
                raise self.fault
            if self.where == "reader":
                os.eventfd_write(self.trigger, 1)
            elif self.where == "timer":
                loop.call_later(0, self._on_callback)
            elif self.where == "soon":
                worker = threading.Thread(target=loop.call_soon_threadsafe, args=(self._on_callback,))
                worker.start()
                worker.join(TIMEOUT)
            return
        super().process_queue(index)

    def close(self) -> None:
        os.close(self.trigger)


@pytest.mark.parametrize("where", ["kick", "reader", "timer", "soon"])
@pytest.mark.parametrize("make_fault", FAULTS, ids=FAULT_IDS)
def test_device_failure_stops_rings_signals_err_resets_and_session_lives(
    session_of: Callable[[EchoDevice], Session], where: str, make_fault: Callable[[], Exception]
) -> None:
    dev = FailingDevice(where, make_fault())
    s = session_of(dev)
    try:
        s.ready()
        first, _dst = s.add_echo()
        s.fe.kick(0)
        # vhost-user's NEEDS_RESET: every err fd of the device is written.
        assert s.err_signalled(0) and s.err_signalled(1)
        s.sync()  # the connection is alive, and the loop finished the teardown
        assert s.handler.device_failures == 1
        assert s.handler.close_reason is None and s.thread.is_alive()
        assert dev.resets == 1 and not dev.active
        assert not s.handler.rings[0].polled
        assert s.fe.rings[0].mock.used_idx() == 0
        # The front-end restarts the ring: the device is activated afresh and serves
        # the chain it failed on (never consumed) and a new one.
        dev.fault = None
        s.restart_ring0()
        head, dst = s.add_echo(b"again")
        s.fe.kick(0)
        assert s.fe.wait_used(0, count=2) == [(first, 4), (head, 5)]
        assert s.fe.memory.read(dst, 5) == b"again"
        assert dev.activations == 2 and s.handler.device_failures == 1
    finally:
        dev.close()


def test_device_reader_left_at_reset_is_dropped_by_the_transport(
    session_of: Callable[[EchoDevice], Session],
) -> None:
    dev = FailingDevice("reader", None)
    s = session_of(dev)
    try:
        s.ready()
        s.fe.get_vring_base(0)  # the last ring stops: the device is reset
        s.sync()
        assert dev.resets == 1
        os.eventfd_write(dev.trigger, 1)  # the stale reader must not run any more
        s.sync()
        assert dev.callbacks_run == 0
        assert not s.handler.loop.has_reader(dev.trigger)
    finally:
        dev.close()


class QueueBreakingDevice(EchoDevice):
    """A reader callback finds ring 0's avail index broken (as resume() would)."""

    def __init__(self) -> None:
        super().__init__()
        self.trigger = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def activate(self, memory: GuestMemory, queues: Sequence[Queue], interrupt: Any, loop: Any) -> None:
        super().activate(memory, queues, interrupt, loop)
        loop.add_reader(self.trigger, self._on_trigger)

    def _on_trigger(self) -> None:
        os.eventfd_read(self.trigger)
        self.queues[0].ready = False  # what the drain loop does before raising it
        raise InvalidAvailRingIndex("avail index 300 is more than a queue (64) ahead of 0")

    def reset(self) -> None:
        if self.loop is not None:
            self.loop.remove_reader(self.trigger)
        super().reset()


def test_device_callback_queue_error_stops_only_that_ring(
    session_of: Callable[[EchoDevice], Session],
) -> None:
    """VIRTIO 1.2 §2.7.5.2-style ring errors stop the ring (its err fd), not the device."""
    dev = QueueBreakingDevice()
    s = session_of(dev)
    try:
        s.ready()
        s.fe.setup_ring(1, 64)
        os.eventfd_write(dev.trigger, 1)
        assert s.err_signalled(0)
        s.sync()
        assert not s.err_signalled(1, timeout=0)
        assert s.handler.device_failures == 0
        assert not s.handler.rings[0].polled and s.handler.rings[1].polled
        assert dev.active
    finally:
        os.close(dev.trigger)


# -- quiesce: a parked chain goes back before the ring is taken back ------------------------
class ParkingDevice(EchoDevice):
    """Parks the first chain it pops (as a device waiting for host data would) and
    returns it to the avail ring in quiesce(), as VirtioDevice.quiesce does; later
    chains (and the returned one, served again) are echoed."""

    def __init__(self) -> None:
        super().__init__()
        self.parked: DescriptorChain | None = None
        self.parked_once = threading.Event()
        #: (queue index, next_avail after it, guest regions mapped) per quiesce that
        #: returned a chain.
        self.returned: list[tuple[int, int, int]] = []

    def process_queue(self, index: int) -> None:
        q = self.queues[index]
        if self.parked is not None:
            return
        if not self.parked_once.is_set():
            self.parked = q.pop_chain()
            if self.parked is not None:
                self.parked_once.set()
            return
        served = 0
        while (chain := q.pop_chain()) is not None:
            q.add_used(chain.head_index, _echo_chain(chain))
            served += 1
        if served and q.needs_notification() and self.interrupt is not None:
            self.interrupt.signal_used(index)

    def quiesce(self, index: int) -> None:
        super().quiesce(index)
        if index == 0 and self.parked is not None:
            q = self.queues[0]
            q.set_next_avail((q.next_avail() - 1) & 0xFFFF)
            self.parked = None
            assert self.memory is not None
            self.returned.append((index, q.next_avail(), len(self.memory.regions)))


def test_get_vring_base_with_parked_chain_reports_it_not_consumed(
    session_of: Callable[[EchoDevice], Session],
) -> None:
    dev = ParkingDevice()
    s = session_of(dev)
    s.ready()
    s.add_echo()
    s.fe.kick(0)
    assert dev.parked_once.wait(TIMEOUT)
    # GET_VRING_BASE: the device returned the chain before next_avail was read.
    assert s.fe.get_vring_base(0) == 0
    assert dev.returned == [(0, 0, 1)]
    assert s.fe.rings[0].mock.used_idx() == 0


def test_reset_device_with_parked_chain_quiesces_first(session_of: Callable[[EchoDevice], Session]) -> None:
    dev = ParkingDevice()
    s = session_of(dev)
    s.ready()
    s.add_echo()
    s.fe.kick(0)
    assert dev.parked_once.wait(TIMEOUT)
    s.fe.reset_device()
    assert dev.returned == [(0, 0, 1)]
    assert dev.resets == 1 and not dev.active
    assert s.fe.rings[0].mock.used_idx() == 0


@pytest.mark.parametrize("change", ["REM_MEM_REG", "SET_MEM_TABLE"])
def test_memory_change_with_parked_chain_quiesces_then_serves_it(
    session_of: Callable[[EchoDevice], Session], change: str
) -> None:
    dev = ParkingDevice()
    s = session_of(dev)
    s.fe.negotiate()
    low = s.fe.add_memory(1 << 20)
    high = s.fe.add_memory(1 << 16, guest_addr=1 << 30)
    s.fe.add_mem_reg(low)
    s.fe.add_mem_reg(high)
    s.fe.setup_ring(0, 64, gpa=0)
    head, dst = s.add_echo(b"moved")
    s.fe.kick(0)
    assert dev.parked_once.wait(TIMEOUT)
    if change == "REM_MEM_REG":
        s.fe.rem_mem_reg(high)
    else:
        s.fe.set_mem_table()
    # Quiesced while the old table was still mapped (2 regions), then served again
    # without a new kick: the driver kicked for it already.
    assert dev.returned == [(0, 0, 2)]
    assert s.fe.wait_used(0) == [(head, 5)]
    assert s.fe.memory.read(dst, 5) == b"moved"


# -- quiesce: worker jobs in flight ------------------------------------------------------------
class WorkerDevice(EchoDevice):
    """Hands each chain to a worker thread that waits for ``release``; completions
    come back with call_soon_threadsafe.  ``wait_in_quiesce``: quiesce releases the
    workers, waits for them and completes their chains (the contract); otherwise it
    does nothing (a device that breaks the contract) and only the transport stands
    between a late completion and a ring that was taken back."""

    def __init__(self, wait_in_quiesce: bool) -> None:
        super().__init__()
        self.wait_in_quiesce = wait_in_quiesce
        self.release = threading.Event()
        self.popped = threading.Event()
        self.workers: list[threading.Thread] = []
        self.done: list[tuple[int, int]] = []  # (head, used length), appended by workers
        self.applied_after_quiesce = 0

    def process_queue(self, index: int) -> None:
        q = self.queues[index]
        loop = self.loop
        assert loop is not None
        while (chain := q.pop_chain()) is not None:
            t = threading.Thread(target=self._work, args=(chain, loop))
            t.start()
            self.workers.append(t)
        self.popped.set()

    def _work(self, chain: DescriptorChain, loop: Any) -> None:
        self.release.wait(TIMEOUT)
        self.done.append((chain.head_index, _echo_chain(chain)))
        loop.call_soon_threadsafe(self._apply)

    def _apply(self) -> None:
        if not self.queues:
            self.applied_after_quiesce += 1  # reset already: would write a taken ring
            return
        q = self.queues[0]
        done, self.done = self.done, []
        for head, n in done:
            q.add_used(head, n)
        if done and self.interrupt is not None:
            self.interrupt.signal_used(0)

    def quiesce(self, index: int) -> None:
        super().quiesce(index)
        if self.wait_in_quiesce and index == 0:
            self.release.set()
            for t in self.workers:
                t.join(TIMEOUT)
            self._apply()


@pytest.mark.parametrize("request_", ["GET_VRING_BASE", "RESET_DEVICE"])
def test_work_in_flight_is_completed_before_the_reply(
    session_of: Callable[[EchoDevice], Session], request_: str
) -> None:
    dev = WorkerDevice(wait_in_quiesce=True)
    s = session_of(dev)
    s.ready()
    head, dst = s.add_echo(b"late")
    s.fe.kick(0)
    assert dev.popped.wait(TIMEOUT)
    mock = s.fe.rings[0].mock
    assert mock.used_idx() == 0
    if request_ == "GET_VRING_BASE":
        assert s.fe.get_vring_base(0) == 1
    else:
        s.fe.reset_device()
    # Written before the reply: the front-end sees it as soon as it has the reply.
    assert mock.used_idx() == 1 and mock.used_elem(0) == (head, 4)
    assert s.fe.memory.read(dst, 4) == b"late"
    s.sync()
    assert mock.used_idx() == 1


def test_late_completion_after_get_vring_base_never_writes_the_ring(
    session_of: Callable[[EchoDevice], Session],
) -> None:
    dev = WorkerDevice(wait_in_quiesce=False)
    s = session_of(dev)
    s.ready()
    s.add_echo()
    s.fe.kick(0)
    assert dev.popped.wait(TIMEOUT)
    assert s.fe.get_vring_base(0) == 1  # the chain was popped and never returned
    dev.release.set()
    for t in dev.workers:
        t.join(TIMEOUT)
    s.sync()  # the completion was posted before: the loop had its chance to run it
    assert s.fe.rings[0].mock.used_idx() == 0
    assert dev.applied_after_quiesce == 0  # dropped by the transport, not by the device


class QuiesceFailingDevice(ParkingDevice):
    """quiesce() itself raises ``fault``, once (its reset, which quiesces too, works)."""

    def __init__(self, fault: Exception) -> None:
        super().__init__()
        self.fault: Exception | None = fault

    def quiesce(self, index: int) -> None:
        super().quiesce(index)
        fault, self.fault = self.fault, None
        if fault is not None:
            raise fault


@pytest.mark.parametrize(
    ("fault", "device_failed"),
    [(RuntimeError("bug in quiesce"), True), (InvalidAvailRingIndex("used ring outside memory"), False)],
    ids=["bug", "queue-error"],
)
def test_quiesce_failure_still_answers_get_vring_base(
    session_of: Callable[[EchoDevice], Session], fault: Exception, device_failed: bool
) -> None:
    dev = QuiesceFailingDevice(fault)
    s = session_of(dev)
    s.ready()
    s.add_echo()
    s.fe.kick(0)
    assert dev.parked_once.wait(TIMEOUT)
    assert s.fe.get_vring_base(0) == 0  # answered: the session goes on
    assert s.handler.device_failures == int(device_failed)
    assert dev.resets == 1 and not dev.active
    assert s.err_signalled(1, timeout=0 if not device_failed else TIMEOUT) is device_failed


# -- a device that fails a request's call ---------------------------------------------------
class RequestFailingDevice(EchoDevice):
    """Echo device whose ``read_config``, ``write_config`` or ``ack_features`` (``where``)
    raises ``fault`` while it is set."""

    def __init__(self, where: str, fault: Exception | None) -> None:
        super().__init__()
        self.where = where
        self.fault = fault
        self.acks: list[int] = []

    def _maybe_fail(self, where: str) -> None:
        if self.where == where and self.fault is not None:
            raise self.fault

    def read_config(self, offset: int, size: int) -> bytes:
        self._maybe_fail("read_config")
        return super().read_config(offset, size)

    def write_config(self, offset: int, data: bytes) -> None:
        self._maybe_fail("write_config")
        super().write_config(offset, data)

    def ack_features(self, features: int) -> None:
        self._maybe_fail("ack_features")
        self.acks.append(features)
        super().ack_features(features)


@pytest.mark.parametrize("make_fault", FAULTS, ids=FAULT_IDS)
def test_read_config_failure_is_a_zero_length_reply_and_the_session_lives(
    session_of: Callable[[EchoDevice], Session], make_fault: Callable[[], Exception]
) -> None:
    """vhost-user "GET_CONFIG": a back-end reports a failed read with a zero-length
    payload; the rings and the session go on."""
    dev = RequestFailingDevice("read_config", make_fault())
    s = session_of(dev)
    s.ready()
    with pytest.raises(BackendError, match="GET_CONFIG offset 0 size 8 failed: zero-length reply"):
        s.fe.get_config(0, 8)
    assert s.handler.request_failures == 1 and s.handler.device_failures == 0
    head, _dst = s.add_echo()
    s.fe.kick(0)
    assert s.fe.wait_used(0) == [(head, 4)]
    dev.fault = None
    assert s.fe.get_config(0, 4) == b"ECHO"
    assert s.handler.close_reason is None


@pytest.mark.parametrize("make_fault", FAULTS, ids=FAULT_IDS)
def test_write_config_failure_is_acked_as_failed_and_the_session_lives(
    session_of: Callable[[EchoDevice], Session], make_fault: Callable[[], Exception]
) -> None:
    dev = RequestFailingDevice("write_config", make_fault())
    s = session_of(dev)
    s.ready()
    with pytest.raises(BackendError, match="SET_CONFIG failed: back-end replied 1"):
        s.fe.set_config(4, b"\1\0\0\0")
    assert s.handler.request_failures == 1 and dev.generation == 0
    dev.fault = None
    s.fe.set_config(4, b"\2\0\0\0")
    assert s.fe.get_config(4, 4) == b"\2\0\0\0"
    assert s.handler.close_reason is None


def test_ack_features_failure_fails_set_features_then_activation_retries_it(
    session_of: Callable[[EchoDevice], Session],
) -> None:
    """SET_FEATURES is refused (REPLY_ACK 1) but the session lives; the device gets the
    features again when its first ring starts, and a device that still fails then is
    a device failure: the ring does not start and the err fd is signalled."""
    dev = RequestFailingDevice("ack_features", RuntimeError("a bug in ack_features"))
    s = session_of(dev)
    with pytest.raises(BackendError, match="SET_FEATURES failed: back-end replied 1"):
        s.fe.negotiate()
    assert s.handler.request_failures == 1 and s.handler.close_reason is None
    # The front-end goes on as QEMU would with the features it asked for.
    s.fe.features = s.handler.acked_features
    s.fe.add_memory(1 << 20)
    s.fe.set_mem_table()
    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    s.err_fds.append(fd)
    s.fe.set_vring_err(0, fd)
    s.fe.setup_ring(0, 64)
    assert s.err_signalled(0)
    s.sync()
    assert s.handler.device_failures == 1 and not dev.active and dev.activations == 0
    # Fixed, the ring starts again: the device is activated with the acked features.
    dev.fault = None
    s.restart_ring0()
    head, _dst = s.add_echo()
    s.fe.kick(0)
    assert s.fe.wait_used(0) == [(head, 4)]
    assert dev.activations == 1 and dev.acks == [s.fe.features & ~(1 << 30)]
