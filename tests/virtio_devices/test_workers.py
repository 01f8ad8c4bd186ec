"""Worker completion: jobs off the loop, completions batched on it, quiesce with work in flight.

The jobs block on events the test sets, so the order in which they finish is the
test's; nothing sleeps (waits are on events and on the fake loop's posted callbacks).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator

import pytest

from virtio_devices.base import COMMON_FEATURES, VirtioDevice
from virtio_devices.errors import DeviceNeedsReset, HostFault
from virtio_devices.testing import DeviceRig
from virtio_devices.workers import DeviceJobs, WorkerPool
from virtio_queue import DescriptorChain

WAIT = 10.0


class WorkerDevice(VirtioDevice):
    """b"w": the chain goes to a worker that waits for ``gates[head]``; else inline (3)."""

    name = "worker"
    queue_sizes = (64,)
    features = COMMON_FEATURES

    def __init__(self, pool: WorkerPool) -> None:
        super().__init__()
        self.worker_pool = pool
        self.gates: dict[int, threading.Event] = {}
        self.started: dict[int, threading.Event] = {}
        self.fail: dict[int, Exception] = {}

    def handle_chain(self, index: int, chain: DescriptorChain) -> int | None:
        if chain.reader().read(1) != b"w":
            return 3
        head = chain.head_index
        gate = self.gates.setdefault(head, threading.Event())
        started = self.started.setdefault(head, threading.Event())
        err = self.fail.get(head)

        def job() -> int:
            started.set()
            assert gate.wait(WAIT), "test never opened the gate"
            if err is not None:
                raise err
            return chain.writer().write(b"done")  # guest buffers are fine on a worker

        self.run_in_worker(index, chain, job)
        return None


@pytest.fixture
def pool() -> Iterator[WorkerPool]:
    with WorkerPool(2, name="test-worker") as p:
        yield p


@pytest.fixture
def rig(pool: WorkerPool) -> Iterator[DeviceRig]:
    with DeviceRig(WorkerDevice(pool), event_idx=False) as r:
        yield r


def dev_of(rig: DeviceRig) -> WorkerDevice:
    assert isinstance(rig.device, WorkerDevice)
    return rig.device


def work(rig: DeviceRig) -> tuple[int, int]:
    head, (out,) = rig.add_request(0, readable=[b"w"], writable=[4])
    return head, out


def open_gate(rig: DeviceRig, head: int) -> None:
    dev_of(rig).gates.setdefault(head, threading.Event()).set()


def test_worker_completes_out_of_order_on_the_loop_thread(rig: DeviceRig) -> None:
    (a, out_a), (b, out_b) = work(rig), work(rig)
    assert rig.kick(0) == []
    open_gate(rig, b)
    rig.complete_workers()
    assert rig.used(0) == [(b, 4)]  # b finished first: the used ring follows completion order
    assert rig.interrupt.used == [0]
    open_gate(rig, a)
    rig.complete_workers()
    assert rig.used(0) == [(a, 4)]
    assert rig.read(out_a, 4) == rig.read(out_b, 4) == b"done"
    assert rig.interrupt.used == [0, 0]
    assert rig.device.chains_served == 2


def test_completions_finished_together_are_one_batch_one_interrupt(rig: DeviceRig, pool: WorkerPool) -> None:
    heads = [work(rig)[0] for _ in range(2)]
    rig.kick(0)
    jobs = rig.device._jobs
    assert jobs is not None
    for h in heads:
        open_gate(rig, h)
    for job in jobs.jobs(0):
        assert job.wait(WAIT)
    assert rig.loop.run_soon() == 1  # the second completion found a wake-up already posted
    assert sorted(rig.used(0)) == sorted((h, 4) for h in heads)
    assert rig.interrupt.used == [0]


def test_worker_host_fault_goes_through_host_fault(rig: DeviceRig) -> None:
    h, _ = work(rig)
    dev_of(rig).fail[h] = HostFault("EIO")
    rig.kick(0)
    open_gate(rig, h)
    rig.complete_workers()
    assert rig.used(0) == [(h, 0)]
    assert rig.device.broken is None


def test_worker_bug_breaks_the_device(rig: DeviceRig) -> None:
    h, _ = work(rig)
    dev_of(rig).fail[h] = ZeroDivisionError("bug")
    rig.kick(0)
    open_gate(rig, h)
    with pytest.raises(DeviceNeedsReset, match="ZeroDivisionError"):
        rig.complete_workers()
    assert rig.device.broken is not None


def quiesce_while_the_first_job_runs(rig: DeviceRig, a: int) -> DeviceJobs:
    """Quiesce queue 0 while job ``a`` runs on the one worker and the others wait for
    it: ``a`` is let finish only once quiesce has cancelled the waiting ones (they
    are never started).  Returns the device's jobs."""
    dev = dev_of(rig)
    jobs = dev._jobs
    assert jobs is not None
    queued = jobs.jobs(0)[1:]

    def open_a_once_the_rest_are_cancelled() -> None:
        for j in queued:
            j.wait(WAIT)
        open_gate(rig, a)

    helper = threading.Thread(target=open_a_once_the_rest_are_cancelled)
    helper.start()
    dev.quiesce(0)
    helper.join(WAIT)
    return jobs


def test_quiesce_waits_for_running_jobs_and_returns_cancelled_chains(pool: WorkerPool) -> None:
    """GET_VRING_BASE with work in flight: the running job completes, the queued ones'
    chains go back to the avail ring (they were the last popped)."""
    with WorkerPool(1, name="one-worker") as one, DeviceRig(WorkerDevice(one)) as rig:
        dev = dev_of(rig)
        (a, _), (b, _), (c, _) = work(rig), work(rig), work(rig)
        rig.kick(0)
        assert dev.started[a].wait(WAIT)  # a runs; b and c wait for the one worker
        assert rig.queues[0].next_avail() == 3
        jobs = quiesce_while_the_first_job_runs(rig, a)
        assert rig.used(0) == [(a, 4)]
        assert rig.interrupt.used == [0]
        assert rig.queues[0].next_avail() == 1  # b and c are the driver's again
        assert jobs.in_flight(0) == 0
        assert not dev.started[b].is_set() and not dev.started[c].is_set()
        # What the worker posted meanwhile was already applied: nothing more is written.
        rig.loop.run_soon()
        assert rig.used(0) == []


def test_quiesce_gives_back_cancelled_resubmitted_chains_in_order() -> None:
    """After a reconnect the chains in flight are resubmitted, which does not advance
    next_avail: the queued jobs' chains go back to the resubmit list, served next in
    their order, and the avail entries behind next_avail (chains the previous
    back-end already used) are not served again (VIRTIO 1.2 §2.7.13)."""
    with WorkerPool(1, name="one-worker") as one, DeviceRig(WorkerDevice(one)) as rig:
        dev = dev_of(rig)
        (a, _), (b, _), (c, _), (x, _) = work(rig), work(rig), work(rig), work(rig)
        # x was used before the reconnect: its avail entry is the one behind next_avail.
        rig.reconnect(0, in_flight=[a, b, c])
        rig.kick(0)
        assert dev.started[a].wait(WAIT)  # a runs; b and c wait for the one worker
        quiesce_while_the_first_job_runs(rig, a)
        assert rig.used(0) == [(a, 4)]
        assert rig.queues[0].next_avail() == 4  # the avail entries stay consumed
        assert not dev.started[b].is_set() and not dev.started[c].is_set()
        open_gate(rig, b)
        open_gate(rig, c)
        rig.kick(0)
        rig.complete_workers(2)
        assert sorted(rig.used(0)) == sorted([(b, 4), (c, 4)])
        assert x not in dev.started


def test_quiesce_runs_a_queued_job_whose_chain_cannot_go_back() -> None:
    """A job not started whose chain was popped before a chain already used cannot go
    back to the avail ring: it runs and completes with its real length, never with an
    empty completion the driver could take for success."""
    with WorkerPool(1, name="one-worker") as one, DeviceRig(WorkerDevice(one)) as rig:
        dev = dev_of(rig)
        (a, _), (b, _) = work(rig), work(rig)
        inline, _ = rig.add_request(0, readable=[b"i"], writable=[4])
        assert rig.kick(0) == [(inline, 3)]
        assert dev.started[a].wait(WAIT)
        open_gate(rig, a)
        open_gate(rig, b)
        dev.quiesce(0)
        assert dev.started[b].is_set()
        assert sorted(rig.used(0)) == sorted([(a, 4), (b, 4)])
        assert rig.queues[0].next_avail() == 3


def test_reset_never_writes_the_used_ring_after_quiesce(rig: DeviceRig) -> None:
    h, _ = work(rig)
    rig.kick(0)
    open_gate(rig, h)
    dev = rig.device
    jobs = dev._jobs
    assert jobs is not None
    (job,) = jobs.jobs(0)
    assert job.wait(WAIT)
    assert rig.loop.wait_soon(1, WAIT)  # the completion is posted, not yet run
    used_idx = rig.mock.used_idx()
    queues = rig.queues
    dev.reset()  # quiesce applies it (the ring is still the device's)
    assert rig.mock.used_idx() == used_idx + 1
    rig.loop.run_soon()  # the posted flush finds nothing: no second write
    assert rig.mock.used_idx() == used_idx + 1
    assert not queues[0].ready or rig.used(0) == [(h, 4)]


def test_late_completion_of_an_older_generation_is_dropped(rig: DeviceRig) -> None:
    """A completion that reaches the loop after its queue was quiesced never writes."""
    h, _ = work(rig)
    rig.kick(0)
    dev = rig.device
    jobs = dev._jobs
    assert jobs is not None
    (job,) = jobs.jobs(0)
    open_gate(rig, h)
    assert job.wait(WAIT) and rig.loop.wait_soon(1, WAIT)
    # Pretend the queue was taken back after the job posted (bump the generation).
    jobs._gen[0] += 1
    before = rig.mock.used_idx()
    rig.loop.run_soon()
    assert rig.mock.used_idx() == before


def test_pool_is_bounded_and_cancel_only_removes_queued_jobs() -> None:
    with WorkerPool(2, name="bounded") as p:
        gate = threading.Event()
        running = [threading.Event() for _ in range(2)]

        def blocker(ev: threading.Event) -> None:
            ev.set()
            gate.wait(WAIT)

        jobs = [p.submit(functools.partial(blocker, ev)) for ev in running]
        for ev in running:
            assert ev.wait(WAIT)
        queued = p.submit(lambda: None)
        assert p.threads == 2
        assert not p.cancel(jobs[0])  # running
        assert p.cancel(queued)
        assert queued.cancelled
        gate.set()
        for j in jobs:
            assert j.wait(WAIT)


def test_pool_rejects_bad_size_and_closed_submit() -> None:
    with pytest.raises(ValueError, match="max_workers 0"):
        WorkerPool(0)
    p = WorkerPool(1)
    p.close()
    with pytest.raises(RuntimeError, match="closed"):
        p.submit(lambda: None)
