"""Worker threads for host I/O that may block, with completions applied on the loop.

A device whose host I/O may block the event loop (a disk image read, an ALSA
period, an I2C transfer) hands it to :meth:`VirtioDevice.run_in_worker
<virtio_devices.base.VirtioDevice.run_in_worker>` from ``handle_chain`` and returns
None.  DESIGN.md, "Concurrency and I/O": a small bounded pool of threads, never a
thread per request; the copies between host fds and guest buffers release the GIL
(``Writer.read_from_fd``, ``Reader.write_to_fd``), so workers overlap with the loop.

Ordering rules (also in :mod:`virtio_devices.base`):

* a job runs on a worker thread and may touch only the buffers of its chain (the
  chain holds a snapshot of guest memory; unmaps wait until it is gone).  It never
  touches a ``Queue``;
* its outcome (the used length, or the exception) is appended to the device's
  completion list and, if the list was empty, one ``loop.call_soon_threadsafe``
  wakes the loop;
* on the loop thread :meth:`DeviceJobs.flush` applies every outcome posted so far
  in the order they finished (``add_used``, or the device's fault hooks), then
  checks for a notification once per queue: one interrupt per batch;
* :meth:`DeviceJobs.quiesce` (from ``VirtioDevice.quiesce``) cancels the queue's jobs
  not yet started whose chains were the last popped (they go back to the avail
  ring), waits for every other job, applies their outcomes, and bumps the
  queue's generation: any outcome still on its way afterwards is dropped, so a ring
  the front-end took back (GET_VRING_BASE, reset) is never written.  A job must
  therefore be bounded in time (host I/O with a timeout): the loop waits for it.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from virtio_queue import DescriptorChain
from virtio_queue.errors import GuestMemoryError, QueueError

if TYPE_CHECKING:
    from .base import VirtioDevice

__all__ = ["DeviceJobs", "Job", "WorkerPool", "default_pool"]

log = logging.getLogger(__name__)

_PENDING, _RUNNING, _DONE, _CANCELLED = range(4)


class Job:
    """One function submitted to a :class:`WorkerPool`."""

    __slots__ = ("_finished", "fn", "state")

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self.state = _PENDING
        self._finished = threading.Event()

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`WorkerPool.cancel` removed the job before it started."""
        return self.state == _CANCELLED

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the job ran (or was cancelled); False if ``timeout`` passed first."""
        return self._finished.wait(timeout)


class WorkerPool:
    """A bounded set of threads running :class:`Job` functions in submission order.

    Threads start as jobs need them, at most ``max_workers``, and then stay for the
    pool's life (daemon threads: they never hold the process up at exit).  A job
    function must not raise (:class:`DeviceJobs` wraps device jobs so they don't).

    Raises:
        ValueError: ``max_workers`` is below 1.
    """

    def __init__(self, max_workers: int = 4, *, name: str = "vhd-worker") -> None:
        if max_workers < 1:
            raise ValueError(f"worker pool: max_workers {max_workers} is below 1")
        self.max_workers = max_workers
        self.name = name
        self._cv = threading.Condition(threading.Lock())
        self._jobs: collections.deque[Job] = collections.deque()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._closed = False

    @property
    def threads(self) -> int:
        """How many worker threads exist now."""
        return len(self._threads)

    def submit(self, fn: Callable[[], None]) -> Job:
        """Queue ``fn`` to run on a worker thread; thread-safe.

        Raises:
            RuntimeError: the pool is closed.
        """
        job = Job(fn)
        with self._cv:
            if self._closed:
                raise RuntimeError(f"worker pool {self.name} is closed")
            self._jobs.append(job)
            if len(self._jobs) > self._idle and len(self._threads) < self.max_workers:
                t = threading.Thread(
                    target=self._work, name=f"{self.name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(t)
                t.start()
            else:
                self._cv.notify()
        return job

    def cancel(self, job: Job) -> bool:
        """Remove ``job`` if it has not started; return whether it was removed."""
        with self._cv:
            if job.state != _PENDING:
                return False
            self._jobs.remove(job)
            job.state = _CANCELLED
        job._finished.set()
        return True

    def _work(self) -> None:
        cv = self._cv
        while True:
            with cv:
                while not self._jobs and not self._closed:
                    self._idle += 1
                    cv.wait()
                    self._idle -= 1
                if not self._jobs:
                    return  # closed and nothing left
                job = self._jobs.popleft()
                # Under the lock: cancel() sees either PENDING (still queued) or this.
                job.state = _RUNNING
            try:
                job.fn()
            except Exception:  # a bug in a job wrapper: keep the thread alive
                log.exception("worker pool %s: job raised", self.name)
            job.state = _DONE
            job._finished.set()

    def close(self) -> None:
        """Run the jobs already queued, then stop and join the threads; idempotent."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            threads = list(self._threads)
        for t in threads:
            if t is not threading.current_thread():
                t.join()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_default_pool: WorkerPool | None = None
_default_lock = threading.Lock()


def default_pool() -> WorkerPool:
    """The process-wide pool devices use unless given one: ``2 × CPUs`` threads, at most 8."""
    global _default_pool
    with _default_lock:
        if _default_pool is None:
            _default_pool = WorkerPool(min(8, 2 * (os.cpu_count() or 1)))
        return _default_pool


class _Entry:
    """A chain handed to a worker: where it came from and which generation."""

    __slots__ = ("chain", "distance_base", "gen", "index", "job")

    def __init__(self, index: int, chain: DescriptorChain, distance_base: int, gen: int) -> None:
        self.index = index
        self.chain = chain
        # Queue.pop_index() just after the chain was popped (it was the last chain
        # popped then): it counts pops from the resubmit list too, which next_avail
        # does not.
        self.distance_base = distance_base
        self.gen = gen
        self.job: Job | None = None


class DeviceJobs:
    """The worker jobs of one device, per queue (see the module docstring).

    Made by :meth:`VirtioDevice.run_in_worker`; everything but the job bodies runs
    on the device's loop thread.
    """

    def __init__(self, device: VirtioDevice, pool: WorkerPool) -> None:
        self._device = device
        self._pool = pool
        self._lock = threading.Lock()
        self._done: list[tuple[_Entry, int, Exception | None]] = []
        self._wake_posted = False
        # Per queue, in submission order (a dict used as an ordered set).
        self._inflight: dict[int, dict[_Entry, None]] = collections.defaultdict(dict)
        self._gen: dict[int, int] = collections.defaultdict(int)

    def in_flight(self, index: int) -> int:
        """Jobs of queue ``index`` submitted and not yet applied."""
        return len(self._inflight[index])

    def jobs(self, index: int) -> list[Job]:
        """The pool jobs of queue ``index`` not yet applied, in submission order."""
        return [e.job for e in self._inflight[index] if e.job is not None]

    def submit(self, index: int, chain: DescriptorChain, fn: Callable[[], int]) -> None:
        """Run ``fn`` for ``chain`` (the chain being handled) of queue ``index``."""
        device = self._device
        loop = device.loop
        if loop is None:
            raise RuntimeError(f"{device.name}: run_in_worker on an inactive device")
        entry = _Entry(index, chain, device.queues[index].pop_index(), self._gen[index])

        def run() -> None:
            err: Exception | None = None
            used = 0
            try:
                used = fn()
            except Exception as e:  # applied on the loop under the device's error policy
                err = e
            with self._lock:
                self._done.append((entry, used, err))
                wake = not self._wake_posted
                self._wake_posted = True
            if wake:
                try:
                    loop.call_soon_threadsafe(self.flush)
                except (OSError, RuntimeError) as e:  # the loop is gone: so is the device
                    log.debug("%s q%d: completion not posted: %s", device.name, index, e)

        self._inflight[index][entry] = None
        entry.job = self._pool.submit(run)

    def flush(self) -> None:
        """Apply every outcome posted so far, one notification check per queue.

        Raises:
            DeviceNeedsReset: a job raised a bug (after the other outcomes were applied).
        """
        with self._lock:
            done, self._done = self._done, []
            self._wake_posted = False
        if not done:
            return
        device = self._device
        touched: set[int] = set()
        bug: Exception | None = None
        for entry, result, err in done:
            index = entry.index
            used = result
            if entry.gen != self._gen[index] or not device.active:
                continue  # the queue was given back meanwhile: never write its ring
            self._inflight[index].pop(entry, None)
            try:
                if err is not None:
                    answer = device._call(_reraise(err), index, entry.chain)
                    used = answer if isinstance(answer, int) else 0
                device.queues[index].add_used(entry.chain.head_index, used)
            except (QueueError, GuestMemoryError) as e:
                # The ring broke under us (the transport will hear of it on the
                # next kick); nothing more to write for this chain.
                log.warning("%s q%d: completion dropped: %s", device.name, index, e)
                continue
            except Exception as e:
                bug = bug or e
                continue
            device.chains_served += 1
            device.bytes_served += used
            touched.add(index)
        for index in sorted(touched):
            device.notify(index)
        if bug is not None:
            raise bug

    def quiesce(self, index: int) -> None:
        """Give back, wait for and apply queue ``index``'s jobs; drop later outcomes.

        A job not started whose chain is among the last ones popped is cancelled and
        its chain given back (:meth:`Queue.unpop`, the newest first): one from the
        avail ring goes back to it (GET_VRING_BASE then reports it as not consumed,
        and the next back-end serves it), one resubmitted after a reconnect goes
        back to the resubmit list.  Every other job runs to its end
        and is completed: a request is never returned to the driver without being
        done, since a used length of 0 could read as success to a driver that does
        not check it (a SCSI write whose zeroed response says GOOD).
        """
        entries = self._inflight.get(index)
        if not entries:
            self._gen[index] += 1
            return
        queue = self._device.queues[index]
        nxt = queue.pop_index()
        # Newest first: the run of chains popped last whose jobs have not started.
        back: list[int] = []
        for entry in sorted(entries, key=lambda e: (nxt - e.distance_base) & 0xFFFF):
            assert entry.job is not None
            if (nxt - entry.distance_base) & 0xFFFF != len(back) or not self._pool.cancel(entry.job):
                break
            back.append(entry.chain.head_index)
            entries.pop(entry, None)
        for entry in list(entries):
            assert entry.job is not None
            entry.job.wait()
        self.flush()
        for head in back:
            queue.unpop(head)
        entries.clear()
        self._gen[index] += 1


def _reraise(err: Exception) -> Callable[[int, DescriptorChain], int]:
    """A handler that raises ``err``: routes a job's exception through ``_call``."""

    def fail(index: int, chain: DescriptorChain) -> int:
        raise err

    return fail
