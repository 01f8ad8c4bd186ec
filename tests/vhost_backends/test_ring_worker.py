"""Ring workers (``virtio_devices._pump.RingWorker``): a ring served on a thread of
its own, and the vhost-user transport's handshake with it (start when the ring
starts, stop before the queue is taken back, wake where it would serve without a
kick).  The probe is ``EventfdRingWorker``; the transport tests drive an echo
device whose ring worker serves its ring, through our Frontend."""

from __future__ import annotations

import os
import select
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from virtio_devices._pump import EventfdRingWorker, RingWorker
from virtio_queue.testing import RawDesc

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from echo_device import EchoDevice
from test_handler import WRITE, Session, ready

T = 10.0  # seconds: only a hung thread reaches it


def _efd(flags: int = 0) -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC | flags)


def _wait(fd: int) -> int:
    """Wait for an eventfd to be readable (a thread's signal) and read it."""
    ready, _, _ = select.select([fd], [], [], T)
    assert ready, f"eventfd {fd} not written within {T} s"
    return os.eventfd_read(fd)


@pytest.fixture
def fds() -> Iterator[Callable[..., int]]:
    made: list[int] = []

    def make(flags: int = 0) -> int:
        made.append(_efd(flags))
        return made[-1]

    yield make
    for fd in made:
        os.close(fd)


def test_worker_serves_each_kick_and_wake_on_its_thread(fds: Callable[..., int]) -> None:
    kick, done = fds(), fds()
    threads: list[str] = []
    w = EventfdRingWorker(serve=lambda: threads.append(threading.current_thread().name))
    w.notify_fd = done
    w.start(kick)
    try:
        assert w.running
        os.eventfd_write(kick, 3)  # one kick's count, however many writes made it
        _wait(done)
        assert (w.kicks, w.services, w.served) == (1, 1, 1)
        w.wake()  # a service without a kick
        _wait(done)
        assert (w.kicks, w.services) == (1, 2)
    finally:
        w.stop()
    assert not w.running
    assert threads == [f"ring-worker-fd{kick}"] * 2
    with pytest.raises(BlockingIOError):
        os.eventfd_read(kick)  # the kick's count was taken by the worker


def test_worker_stop_waits_for_the_service_under_way(fds: Callable[..., int]) -> None:
    """stop() returns only after the service in progress ended (what it popped is
    answered before the transport takes the queue back), with the GIL released
    meanwhile (the service may need it)."""
    kick, gate, entered = fds(), fds(os.EFD_SEMAPHORE), fds()
    w = EventfdRingWorker(gate_fd=gate, entered_fd=entered)
    w.start(kick)
    os.eventfd_write(kick, 1)
    _wait(entered)
    assert w.services == 0  # blocked in the service
    opener = threading.Thread(target=os.eventfd_write, args=(gate, 100))
    opener.start()
    w.stop()
    opener.join()
    assert w.services == 1 and not w.running


def test_worker_restarts_after_stop_and_serves_a_kick_left_meanwhile(fds: Callable[..., int]) -> None:
    kick, done = fds(), fds()
    w = EventfdRingWorker()
    w.notify_fd = done
    w.start(kick)
    w.stop()
    os.eventfd_write(kick, 1)  # while stopped: left on the fd
    w.start(kick)
    try:
        _wait(done)
        assert w.kicks == 1
    finally:
        w.stop()


def test_worker_refuses_a_second_start_and_a_bad_fd(fds: Callable[..., int]) -> None:
    w = EventfdRingWorker()
    with pytest.raises(ValueError, match="kick fd -1"):
        w.start(-1)
    w.start(fds())
    try:
        with pytest.raises(RuntimeError, match="started twice"):
            w.start(fds())
    finally:
        w.stop()
    w.stop()  # idempotent
    assert RingWorker().services == 0  # the base serves nothing


def test_worker_error_ends_the_thread_and_is_posted_once(fds: Callable[..., int]) -> None:
    """What serve_c raises stops serving and goes to fail() through post(), the
    loop's call_soon_threadsafe, once: a report run again does nothing."""
    kick = fds()
    posted: list[Callable[[], None]] = []
    got = threading.Event()
    failed: list[BaseException] = []

    def post(cb: Callable[[], None]) -> None:
        posted.append(cb)
        got.set()

    w = EventfdRingWorker(raise_at=1)
    w.start(kick, failed.append, post)
    os.eventfd_write(kick, 1)
    assert got.wait(T)
    w.stop()  # joins the ended thread
    assert isinstance(w.error, RuntimeError) and "raise_at" in str(w.error)
    posted[0]()
    assert failed == [w.error]
    posted[0]()
    assert failed == [w.error]
    assert w.take_failure() is None  # reported already


def test_worker_failure_survives_a_restart_unless_taken(fds: Callable[..., int]) -> None:
    """A failure whose report has not run yet is not dropped by a restart (the
    report then fails the new run); take_failure() takes it from the report."""
    kick = fds()
    posted: list[Callable[[], None]] = []
    got = threading.Event()
    failed: list[BaseException] = []

    def post(cb: Callable[[], None]) -> None:
        posted.append(cb)
        got.set()

    w = EventfdRingWorker(raise_at=1)
    w.start(kick, failed.append, post)
    os.eventfd_write(kick, 1)
    assert got.wait(T)
    w.stop()
    err = w.error
    w.start(kick, failed.append, post)  # before the report ran
    try:
        assert w.error is None
        posted[0]()
        assert failed == [err]
    finally:
        w.stop()
    failed.clear()
    got.clear()
    w.raise_at = w.served + 1  # the next service fails again
    w.start(kick, failed.append, post)
    os.eventfd_write(kick, 1)
    assert got.wait(T)
    w.stop()
    assert w.take_failure() is w.error is not None
    assert w.take_failure() is None
    posted[1]()
    assert failed == []  # taken: the report does nothing


def test_worker_error_without_post_calls_fail_on_its_thread(fds: Callable[..., int]) -> None:
    kick = fds()
    where: list[str] = []
    got = threading.Event()

    def fail(e: BaseException) -> None:
        where.append(threading.current_thread().name)
        got.set()

    w = EventfdRingWorker(raise_at=1)
    w.start(kick, fail)
    os.eventfd_write(kick, 1)
    assert got.wait(T)
    w.stop()
    assert where == [f"ring-worker-fd{kick}"]


# -- serve_nogil: kicks served with the GIL released ------------------------------------


def test_worker_serves_kicks_nogil_and_wakes_with_python(fds: Callable[..., int]) -> None:
    """A worker whose serve_nogil serves its kicks never runs serve_c for them; a
    wake() always goes to serve_c (the Python path)."""
    kick, done = fds(), fds()
    w = EventfdRingWorker(nogil=True)
    w.notify_fd = done
    w.start(kick)
    try:
        for n in (1, 2):
            os.eventfd_write(kick, 1)
            _wait(done)
            assert (w.kicks, w.services, w.nogil_services, w.nogil_calls, w.served) == (n, n, n, n, 0)
        w.wake()
        _wait(done)
        assert (w.kicks, w.services, w.nogil_services, w.served) == (2, 3, 2, 1)
    finally:
        w.stop()
    assert RingWorker().nogil_services == 0


def test_worker_hands_a_kick_to_serve_c_when_serve_nogil_asks(fds: Callable[..., int]) -> None:
    """serve_nogil answering 1 (an odd request, an error to raise) makes the worker
    take the GIL and run serve_c for that kick; the next kick is nogil again."""
    kick, done = fds(), fds()
    threads: list[str] = []
    w = EventfdRingWorker(
        serve=lambda: threads.append(threading.current_thread().name), nogil=True, hand_over_at=2
    )
    w.notify_fd = done
    w.start(kick)
    try:
        for _ in range(3):
            os.eventfd_write(kick, 1)
            _wait(done)
    finally:
        w.stop()
    assert (w.kicks, w.services, w.nogil_services, w.nogil_calls, w.served) == (3, 3, 2, 3, 1)
    assert threads == [f"ring-worker-fd{kick}"]


def test_worker_failure_after_a_hand_over_is_reported(fds: Callable[..., int]) -> None:
    """What serve_c raises for a kick serve_nogil handed over ends the thread and
    reaches fail(), as any failure of serve_c."""
    kick = fds()
    got = threading.Event()
    failed: list[BaseException] = []

    def fail(e: BaseException) -> None:
        failed.append(e)
        got.set()

    w = EventfdRingWorker(raise_at=1, nogil=True, hand_over_at=1)
    w.start(kick, fail)
    os.eventfd_write(kick, 1)
    assert got.wait(T)
    w.stop()
    assert failed == [w.error] and isinstance(w.error, RuntimeError)
    assert (w.nogil_calls, w.nogil_services, w.services) == (1, 0, 0)


def test_worker_stop_waits_for_a_nogil_service_and_restarts(fds: Callable[..., int]) -> None:
    """stop() returns only after the serve_nogil under way ended; a kick left on
    the fd while stopped is served nogil after the restart."""
    kick, gate, entered, done = fds(), fds(os.EFD_SEMAPHORE), fds(), fds()
    w = EventfdRingWorker(gate_fd=gate, entered_fd=entered, nogil=True)
    w.notify_fd = done
    w.start(kick)
    os.eventfd_write(kick, 1)
    _wait(entered)
    assert w.services == 0  # blocked in serve_nogil
    opener = threading.Thread(target=os.eventfd_write, args=(gate, 100))
    opener.start()
    w.stop()
    opener.join()
    assert (w.services, w.nogil_services, w.served) == (1, 1, 0) and not w.running
    _wait(done)
    os.eventfd_write(kick, 1)  # while stopped: left on the fd
    w.start(kick)
    try:
        _wait(done)
        assert (w.kicks, w.nogil_services, w.served) == (2, 2, 0)
    finally:
        w.stop()


# -- the vhost-user transport ------------------------------------------------------------


class WorkerEchoDevice(EchoDevice):
    """The echo device with its ring 0 served by a ring worker (the probe, whose
    ``serve`` drains the ring), gated when the test asks."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = -1
        self.entered = -1
        self.raise_at = 0
        self.raise_in_serve = False  # raise after the gate: a failure mid-service
        self.threads: set[str] = set()
        self.worker: EventfdRingWorker | None = None
        self.quiesced_while_running: list[bool] = []

    def quiesce(self, index: int) -> None:
        # The transport takes the queue back only from a stopped worker.
        self.quiesced_while_running.append(self.worker is not None and self.worker.running)
        super().quiesce(index)

    def _serve(self) -> None:
        self.threads.add(threading.current_thread().name)
        if self.raise_in_serve:
            raise RuntimeError("the device failed mid-service")
        self.process_chains(0)

    def ring_worker(self, index: int) -> RingWorker | None:
        if index != 0:
            return None
        if self.worker is None:
            self.worker = EventfdRingWorker(self.gate, self.raise_at, self.entered, self._serve)
        return self.worker


@pytest.fixture
def ws() -> Iterator[Session]:
    sess = Session()
    sess.device = sess.handler.device = WorkerEchoDevice()
    sess.handler.rings[0].kick.serve = sess.device.process_queue
    yield sess
    if sess.thread.is_alive() or not sess.handler.closed:
        sess.finish()


def _echo_add(s: Session, payload: bytes) -> tuple[int, int]:
    mock = s.fe.rings[0].mock
    src, dst = mock.alloc(len(payload)), mock.alloc(len(payload))
    s.fe.memory.write(src, payload)
    return mock.add_chain([RawDesc(src, len(payload), 0, 0), RawDesc(dst, len(payload), WRITE, 0)]), dst


def test_transport_serves_the_ring_on_the_worker_not_the_loop(ws: Session) -> None:
    ready(ws)
    head, dst = _echo_add(ws, b"on the worker")
    ws.fe.kick(0)
    assert ws.fe.wait_used(0) == [(head, 13)]
    assert ws.fe.memory.read(dst, 13) == b"on the worker"
    ring = ws.handler.rings[0]
    dev = ws.device
    assert isinstance(dev, WorkerEchoDevice) and dev.worker is not None
    assert ring.worker is dev.worker and dev.worker.running
    assert not ring.kick.attached and ring.kick.python_calls == 0  # the loop never saw the kick
    assert dev.threads == {f"ring-worker-fd{ring.kick_fd}"}
    assert ws.fe.get_vring_base(0) == 1
    assert not dev.worker.running and ring.worker is None
    assert dev.resets == 1


def test_transport_get_vring_base_waits_for_the_service_in_flight(
    ws: Session, fds: Callable[..., int]
) -> None:
    """GET_VRING_BASE with a service blocked (a bus transfer): the reply comes after
    the service answered what it popped, and the base counts exactly that."""
    dev = ws.device
    assert isinstance(dev, WorkerEchoDevice)
    dev.gate, dev.entered = fds(os.EFD_SEMAPHORE), fds()
    ready(ws)
    heads = [_echo_add(ws, b"%d" % i)[0] for i in range(3)]
    ws.fe.kick(0)
    _wait(dev.entered)
    opener = threading.Thread(target=os.eventfd_write, args=(dev.gate, 100))
    opener.start()
    base = ws.fe.get_vring_base(0)  # the worker's stop waits for the service
    opener.join()
    assert base == 3
    assert ws.fe.rings[0].mock.used_idx() == 3  # answered before the reply
    assert [h for h, _ in ws.fe.rings[0].mock.used_elems()] == heads


def test_transport_set_vring_call_stops_a_running_worker_for_the_change(
    ws: Session, fds: Callable[..., int]
) -> None:
    """SET_VRING_CALL under a running worker: the worker, which may write the call
    fd with the GIL released, is stopped before the old fd goes (the reply comes
    after the service under way ended) and serves on the new fd afterwards."""
    dev = ws.device
    assert isinstance(dev, WorkerEchoDevice)
    dev.gate, dev.entered = fds(os.EFD_SEMAPHORE), fds()
    ready(ws)
    first, _ = _echo_add(ws, b"a")
    ws.fe.kick(0)
    _wait(dev.entered)
    ring = ws.fe.rings[0]
    old, ring.call_fd = ring.call_fd, _efd()
    opener = threading.Thread(target=os.eventfd_write, args=(dev.gate, 100))
    opener.start()
    ws.fe.set_vring_call(0, ring.call_fd)  # the worker's stop waits for the service
    opener.join()
    assert ring.mock.used_idx() == 1  # answered before the reply
    assert _count(old) == 1  # signalled on the fd of its time
    assert ws.fe.wait_used(0) == [(first, 1)]
    os.close(old)
    assert dev.worker is not None and dev.worker.running
    head, _ = _echo_add(ws, b"b")
    ws.fe.kick(0)
    assert ws.fe.wait_used(0) == [(head, 1)]


def test_transport_restarts_the_worker_after_a_stop_and_a_reconnect(ws: Session) -> None:
    """GET_VRING_BASE then a new start (as QEMU after vhost_dev_stop) starts the
    worker again; RESET_DEVICE stops it; a new session gets a new one."""
    ready(ws)
    head, _ = _echo_add(ws, b"a")
    ws.fe.kick(0)
    assert ws.fe.wait_used(0) == [(head, 1)]
    base = ws.fe.get_vring_base(0)
    ring = ws.fe.rings[0]
    for fd in (ring.kick_fd, ring.call_fd):
        os.close(fd)
    ring.kick_fd, ring.call_fd = _efd(), _efd()
    mock = ring.mock
    ws.fe.set_vring_num(0, 256)
    ws.fe.set_vring_base(0, base)
    ws.fe.set_vring_addr(
        0, ws.fe.user_addr(mock.desc_table), ws.fe.user_addr(mock.avail_ring), ws.fe.user_addr(mock.used_ring)
    )
    ws.fe.set_vring_call(0, ring.call_fd)
    ws.fe.set_vring_kick(0, ring.kick_fd)
    ws.fe.set_vring_enable(0, True)
    head, _ = _echo_add(ws, b"b")
    ws.fe.kick(0)
    assert ws.fe.wait_used(0) == [(head, 1)]
    dev = ws.device
    assert isinstance(dev, WorkerEchoDevice) and dev.worker is not None
    assert dev.activations == 2 and dev.worker.running
    ws.fe.reset_device()
    ws.fe.get_features()  # a round trip: RESET_DEVICE was handled
    assert not dev.worker.running
    assert ws.finish() is not None
    assert not dev.worker.running


def test_transport_memory_change_stops_and_wakes_the_worker(ws: Session) -> None:
    """ADD_MEM_REG / REM_MEM_REG under a running ring: the worker is stopped for the
    change (the device's quiesce after it) and started and woken afterwards."""
    ready(ws)
    dev = ws.device
    assert isinstance(dev, WorkerEchoDevice)
    head, _ = _echo_add(ws, b"x")
    ws.fe.kick(0)
    assert ws.fe.wait_used(0) == [(head, 1)]
    assert dev.worker is not None
    served = dev.worker.services
    desc = ws.fe.add_memory(1 << 16, guest_addr=1 << 24)
    ws.fe.add_mem_reg(desc)
    ws.fe.rem_mem_reg(desc)  # quiesces the running rings, then serves them again
    assert dev.quiesced_while_running == [False]
    assert dev.worker.running
    head, _ = _echo_add(ws, b"y")
    ws.fe.kick(0)
    assert ws.fe.wait_used(0) == [(head, 1)]
    assert dev.worker.services > served


def test_transport_worker_error_fails_the_device_on_the_loop(ws: Session) -> None:
    """What the worker's service raises is handled as process_queue's: a device
    failure stops the rings, writes the err fd, resets the device; the session
    goes on."""
    dev = ws.device
    assert isinstance(dev, WorkerEchoDevice)
    dev.raise_at = 1
    ready(ws)
    err = _efd()
    try:
        ws.fe.set_vring_err(0, err)
        _echo_add(ws, b"z")
        ws.fe.kick(0)
        assert _wait(err) == 1
        ws.fe.get_features()
        assert ws.handler.device_failures == 1
        assert dev.resets == 1 and dev.worker is not None and not dev.worker.running
        assert isinstance(dev.worker.error, RuntimeError)
    finally:
        os.close(err)


def _count(fd: int) -> int:
    """An eventfd's count now (0: not written), without waiting."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def _drain_loop(ws: Session) -> None:
    """Wait until the loop ran every callback posted so far (a worker's failure
    report included: the loop runs them in the order they were posted)."""
    done = threading.Event()
    ws.loop.call_soon_threadsafe(done.set)
    assert done.wait(T), f"the loop ran no callback within {T} s"


def _rem_mem_reg(ws: Session, extra: object) -> None:
    ws.fe.rem_mem_reg(extra)  # type: ignore[arg-type]


def _set_vring_kick(ws: Session, extra: object) -> None:
    ring = ws.fe.rings[0]
    os.close(ring.kick_fd)
    ring.kick_fd = _efd()
    ws.fe.set_vring_kick(0, ring.kick_fd)


def _session_end(ws: Session, extra: object) -> None:
    ws.finish()


# Each takes the ring back from the worker (stops it) while its failure is on the way.
_TAKE_BACK: dict[str, Callable[[Session, object], object]] = {
    "REM_MEM_REG": _rem_mem_reg,
    "SET_MEM_TABLE": lambda ws, extra: ws.fe.set_mem_table(),
    "GET_VRING_BASE": lambda ws, extra: ws.fe.get_vring_base(0),
    "SET_VRING_KICK": _set_vring_kick,
    "SET_VRING_ENABLE 0": lambda ws, extra: ws.fe.set_vring_enable(0, False),
    "RESET_DEVICE": lambda ws, extra: ws.fe.reset_device(),
    "session end": _session_end,
}


@pytest.mark.parametrize("take_back", list(_TAKE_BACK))
def test_transport_worker_failure_before_a_take_back_is_handled_once(
    ws: Session, fds: Callable[..., int], take_back: str
) -> None:
    """The worker fails while the loop is taking its ring back (the failure's report
    is posted, the loop is busy with the message): the device-failure policy (the
    rings stopped, the err fd written, the device reset) still applies, exactly once;
    no restart drops it and none serves the ring after it."""
    dev = ws.device
    assert isinstance(dev, WorkerEchoDevice)
    dev.gate, dev.entered = fds(os.EFD_SEMAPHORE), fds()
    ready(ws)
    extra = ws.fe.add_memory(1 << 16, guest_addr=1 << 24)
    ws.fe.add_mem_reg(extra)
    err = fds()
    ws.fe.set_vring_err(0, err)
    _echo_add(ws, b"f")
    dev.raise_in_serve = True
    ws.fe.kick(0)
    _wait(dev.entered)  # the service is under way, blocked at the gate
    h = ws.handler
    opened = []

    def open_gate_then(orig: Callable[[object], None]) -> Callable[[object], None]:
        # On the loop thread, as the handler starts to take the ring back: the
        # service goes on and fails, and its report waits behind this message.
        def wrapped(ring: object) -> None:
            if not opened:
                opened.append(True)
                os.eventfd_write(dev.gate, 1)
            orig(ring)

        return wrapped

    h._unwatch_kick = open_gate_then(h._unwatch_kick)  # type: ignore[method-assign]
    h._quiesce = open_gate_then(h._quiesce)  # type: ignore[method-assign]
    try:
        _TAKE_BACK[take_back](ws, extra)
        if ws.thread.is_alive():
            _drain_loop(ws)  # the report ran (or found the failure handled)
        assert opened and dev.worker is not None and dev.worker.served == 1
        assert h.device_failures == 1
        assert _count(err) == 1
        assert dev.resets == 1
        assert not dev.worker.running
    finally:
        os.eventfd_write(dev.gate, 1 << 20)  # a worker left serving must not block the teardown
