"""virtio-rng through virtio-mmio in-process against the same workload through vhost-user.

Run by hand (not by CI)::

    python benches/mmio_table.py [--reps 7] [--secs 0.3] [--sizes 1,4096]

Issue 15's speed figures, each a median (min..max) over ``--reps`` repetitions, the
two transports interleaved within each repetition (A B B A halves) so that machine
noise hits them alike:

* **1-request kicks**: rng requests served per second when the driver makes one
  request available, notifies, waits for the used entry and handles the interrupt,
  again and again.  mmio: :class:`virtio_devices.mmio.MmioTransport` over
  :class:`~virtio_devices.rng.RngDevice` in this process, the driver side writing
  QueueNotify, reading InterruptStatus and writing InterruptACK as Linux's
  virtio_mmio does (no socket, no eventfd).  vhost-user: our ``vhost-device-rng``
  daemon process, driven by the benchmark front-end of ``daemon_table.py`` (kick
  eventfd, call eventfd).  Both read the same source (``/dev/urandom``, through the
  vDSO's getrandom where the kernel has it) into buffers of each of ``--sizes``
  bytes (1: the request of daemon_table.py's round trip; 4096: its throughput rows).
  Reported: both rates and mmio/vhost-user.
* **QueueNotify cost**: one ``transport.write(QueueNotify)`` of a queue with
  nothing available (the transport's dispatch plus the device's empty drain),
  against ``device.process_queue`` called directly on the same queue (the device's
  share alone): the transport's overhead per notify.

The vhost-user figure depends on how the scheduler places the two processes on
this 2-CPU machine; see docs/performance.md for the round trip by placement.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import daemon_table as D  # noqa: E402

from virtio_devices.hosts.files import FileEntropySource  # noqa: E402
from virtio_devices.mmio import Reg  # noqa: E402
from virtio_devices.rng import RngDevice  # noqa: E402
from virtio_devices.testing import MmioDeviceDriver  # noqa: E402
from virtio_queue.testing import VIRTQ_DESC_F_WRITE, RawDesc  # noqa: E402

RING_SIZE = 256


class MmioRngClient:
    """The in-process twin of ``daemon_table.RngClient``: the same ring layout (one
    write-only buffer per descriptor), the same ``batch(n)`` and ``run``; the kick is
    a QueueNotify write and the wait is the interrupt line, handled like Linux's
    ``vm_interrupt`` (read InterruptStatus, write it to InterruptACK)."""

    def __init__(self, source: str = D.SOURCE, *, req_size: int = D.REQ_SIZE) -> None:
        self.req_size = req_size
        self.source = FileEntropySource(source)
        self.device = RngDevice(self.source)
        self.drv = MmioDeviceDriver(
            self.device, queue_size=RING_SIZE, on_close=self.source.close, memory_size=8 << 20
        )
        self.transport = self.drv.transport
        mock = self.drv.driver.mocks[0]
        self.mock = mock
        self.gpas = [self.drv.driver.alloc(0, req_size) for _ in range(RING_SIZE)]
        mock.write_descs(0, [RawDesc(g, req_size, VIRTQ_DESC_F_WRITE, 0) for g in self.gpas])
        self.heads = array("H", list(range(RING_SIZE)) * 2)
        used = self.drv.memory.get_slice(mock.used_ring, 4 + 8 * RING_SIZE).cast("B")
        self._used_idx = used[2:4].cast("H")
        self._used_elems = used[4:].cast("I")
        self.next_avail = 0
        self.last_used = 0

    def batch(self, n: int) -> int:
        """``n`` requests, one notify; returns the bytes used."""
        mock, t, irq = self.mock, self.transport, self.drv.irq
        slot = self.next_avail % RING_SIZE
        target = (self.last_used + n) & 0xFFFF
        mock.set_used_event((target - 1) & 0xFFFF)
        mock.publish(self.heads[slot : slot + n])
        self.next_avail = (self.next_avail + n) & 0xFFFF
        t.write(Reg.QUEUE_NOTIFY, 4, 0)
        if irq.level:
            t.write(Reg.INTERRUPT_ACK, 4, t.read(Reg.INTERRUPT_STATUS, 4))
        if self._used_idx[0] != target:
            raise RuntimeError(f"mmio: used->idx {self._used_idx[0]} != {target} after the notify")
        self.last_used = target
        elems = self._used_elems
        return sum(elems[2 * ((target - n + k) % RING_SIZE) + 1] for k in range(n))

    def run(self, n: int, batches: int) -> int:
        b = self.batch
        return sum(b(n) for _ in range(batches))

    def check(self) -> None:
        """Once: a batch of 4 fills 4 buffers whole, with bytes that are not constant."""
        got = self.batch(4)
        assert got == 4 * self.req_size, got
        slot = (self.next_avail - 4) % RING_SIZE
        bufs = [self.drv.memory.read(self.gpas[(slot + k) % RING_SIZE], self.req_size) for k in range(4)]
        if self.req_size >= 16:
            assert all(len(set(b)) > 1 for b in bufs) and len(set(bufs)) == 4

    def close(self) -> None:
        self._used_idx.release()
        self._used_elems.release()
        self.drv.close()


def notify_cost(reps: int, count: int) -> tuple[list[float], list[float]]:
    """ns per QueueNotify write on an empty queue, and per direct process_queue."""
    client = MmioRngClient()
    try:
        t, dev = client.transport, client.device
        write, process = t.write, dev.process_queue

        def via_mmio() -> None:
            for _ in range(count):
                write(0x50, 4, 0)

        def direct() -> None:
            for _ in range(count):
                process(0)

        mmio_ns: list[float] = []
        direct_ns: list[float] = []
        for _ in range(reps):
            for fn, acc in (
                (via_mmio, mmio_ns),
                (direct, direct_ns),
                (direct, direct_ns),
                (via_mmio, mmio_ns),
            ):
                t0 = time.perf_counter_ns()
                fn()
                acc.append((time.perf_counter_ns() - t0) / count)
        return mmio_ns, direct_ns
    finally:
        client.close()


def one_request_kicks(
    reps: int, secs: float, req_size: int
) -> tuple[list[float], list[float], list[float], list[float]]:
    """1 request per kick, mmio in-process and the vhost-user daemon: requests per
    second, and CPU microseconds per request (every thread of this process, plus the
    daemon's for vhost-user)."""
    mmio_rates: list[float] = []
    vu_rates: list[float] = []
    mmio_cpu: list[float] = []
    vu_cpu: list[float] = []
    me = os.getpid()
    with tempfile.TemporaryDirectory() as tmp:
        daemon = D.RngDaemon("ours", tmp)
        try:
            daemon.wait_listening(probe=False)
            with daemon.connect(req_size=req_size) as vu:
                mm = MmioRngClient(req_size=req_size)
                try:
                    vu.check()
                    mm.check()
                    pid = daemon.proc.pid
                    Client = tuple[Callable[[int, int], int], list[float], list[float], list[int]]
                    clients: dict[str, Client] = {
                        "mmio": (mm.run, mmio_rates, mmio_cpu, [me]),
                        "vhost-user": (vu.run, vu_rates, vu_cpu, [me, pid]),
                    }
                    for _ in range(reps):
                        got = {k: [0.0, 0.0, 0.0] for k in clients}
                        for k in ["mmio", "vhost-user", "vhost-user", "mmio"]:
                            run, pids = clients[k][0], clients[k][3]
                            c0 = sum(D.task_cpu_us(p) for p in pids)
                            b, t = D.timed(lambda n, run=run: run(1, n), 64, secs / 2)
                            got[k][2] += sum(D.task_cpu_us(p) for p in pids) - c0
                            got[k][0] += b / req_size
                            got[k][1] += t
                        for k, (n, t, cpu) in got.items():
                            clients[k][1].append(n / t)
                            clients[k][2].append(cpu / n)
                finally:
                    mm.close()
        finally:
            rc = daemon.stop()
    if rc != 0:
        raise RuntimeError(f"daemon exited {rc}: {daemon.stderr()}")
    return mmio_rates, vu_rates, mmio_cpu, vu_cpu


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--secs", type=float, default=0.3, help="seconds per repetition of a rate")
    ap.add_argument(
        "--sizes", default="1,4096", help="bytes per request, comma-separated [1 (the round trip's), 4096]"
    )
    ap.add_argument("--notifies", type=int, default=20000, help="notifies per repetition")
    a = ap.parse_args(argv)
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"== virtio-mmio in-process vs vhost-user, {when} on {os.uname().nodename}")
    print(f"cpu : {os.cpu_count()} CPUs; load {D.loadavg()} at start; {a.reps} reps, median (min..max)")
    for size in (int(x) for x in a.sizes.split(",")):
        mm, vu, mm_cpu, vu_cpu = one_request_kicks(a.reps, a.secs, size)
        print(f"-- rng, 1 request of {size} B per kick, requests/s")
        print(f"   mmio in-process  {D.Stat(mm).fmt()}")
        print(f"   vhost-user       {D.Stat(vu).fmt()}")
        print(f"   mmio/vhost-user  {D.Stat([x / y for x, y in zip(mm, vu, strict=True)]).fmt('.2f')}")
        print("-- the same, CPU us per request (vhost-user: front-end + daemon)")
        print(f"   mmio in-process  {D.Stat(mm_cpu).fmt('.2f')}")
        print(f"   vhost-user       {D.Stat(vu_cpu).fmt('.2f')}")
        cpu_ratios = [y / x for x, y in zip(mm_cpu, vu_cpu, strict=True)]
        print(f"   vhost-user/mmio  {D.Stat(cpu_ratios).fmt('.2f')}")
    via, direct = notify_cost(a.reps, a.notifies)
    print("-- one QueueNotify write, empty queue, ns")
    print(f"   transport.write  {D.Stat(via).fmt()}")
    print(f"   process_queue    {D.Stat(direct).fmt()}")
    ratios = [x / y for x, y in zip(via[::2], direct[::2], strict=False)]
    print(f"   write/direct     {D.Stat(ratios).fmt('.2f')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
