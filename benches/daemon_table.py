"""Daemon-level figures of ``vhost-device-rng``, ours beside upstream's, in one table.

Run by hand (not by CI)::

    VHOST_DEVICE_RUST_BIN=/dir/with/rust/daemons python benches/daemon_table.py [--reps 5] [--secs 0.3]

Every figure is a median (min..max) over ``--reps`` repetitions, measured beside its
reference in the same run, the repetitions of the compared daemons interleaved so
that machine noise hits them alike:

* **rng throughput**, 4 KiB requests through our Python front-end
  (:class:`vhost_backends.frontend.Frontend`), batches of 1, 16 and 64 chains per
  kick (the front-end waits for each batch), and streams keeping 16 or 64 requests
  in flight (the front-end refills as buffers come back, kicking only when the
  device asks): ours, the Rust daemon's, and a plain ``readv`` of the same source
  in 4 KiB pieces (the reference);
* **kick -> used round trip** of a 1-byte request, with the front-end and the
  daemon on one shared CPU, on two CPUs (each pinned to its own) and unpinned, ours
  with adaptive polling (the default) and without (``VHD_POLL_US=0``), against an
  eventfd ping-pong between two processes placed like them (the same wait on our
  side; the other side an epoll loop);
* **daemon RSS** (VmRSS and VmHWM after serving) and **start-up time** (before
  ``Popen`` to the socket file appearing, and to ``connect`` succeeding);
* **-c N** (1, 2, 4): aggregate throughput of N front-end processes against one
  daemon serving N sockets.

The Rust daemon is looked for in ``$VHOST_DEVICE_RUST_BIN``, a directory holding
upstream's ``vhost-device-rng`` binary (built from rust-vmm/vhost-device); without
it its columns read "n/a".  ``--before DIR`` adds "before": our daemon from another
built tree (a copy of main, say), measured beside this one in the same run, for
before/after figures of a change.

This module is also the helper library of ``bench_devices.py`` and
``bench_vhost_roundtrip.py`` (daemon processes, the benchmark front-end, the
references), and with ``--worker`` one front-end process of the ``-c N`` figure.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import mmap
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vhost_backends.frontend import Frontend, FrontendRing  # noqa: E402
from virtio_devices.hosts._getrandom import vdso_available  # noqa: E402
from virtio_queue.testing import VIRTQ_DESC_F_WRITE, RawDesc  # noqa: E402

RUST_ENV = "VHOST_DEVICE_RUST_BIN"
RNG = "vhost-device-rng"
DEADLINE = 10.0
REQ_SIZE = 4096
RING_SIZE = 256
BATCHES = (1, 16, 64)
# Streaming: requests kept in flight by a front-end that refills as buffers come back.
DEPTHS = (16, 64)
SOURCE = "/dev/urandom"
#: The daemons of the pytest benchmarks; the table also has "before" (``--before``).
KINDS = ("ours", "rust")
TABLE_KINDS = ("ours", "before", "rust")
#: A built source tree of ours to measure as the "before" kind.
BEFORE_TREE: str | None = None


# -- the daemons ------------------------------------------------------------------------


def rust_daemon(name: str = RNG) -> str | None:
    """The upstream daemon ``name`` in ``$VHOST_DEVICE_RUST_BIN``, or None."""
    d = os.environ.get(RUST_ENV)
    if not d:
        return None
    p = Path(d) / name
    return str(p) if p.is_file() and os.access(p, os.X_OK) else None


def daemon_command(kind: str) -> list[str]:
    if kind in ("ours", "before"):
        return [sys.executable, "-m", "vhost_backends.cli.rng"]
    path = rust_daemon()
    if path is None:
        raise FileNotFoundError(f"{RNG} not found in ${RUST_ENV}")
    return [path]


def skip_absent(kind: str) -> None:
    """In a pytest benchmark: skip when ``kind`` is "rust" and no Rust daemon is there."""
    if kind == "rust" and rust_daemon() is None:
        import pytest  # noqa: PLC0415 - only the pytest benchmarks call this

        pytest.skip(f"Rust {RNG}: n/a (${RUST_ENV} unset or without it)")


@contextlib.contextmanager
def running(kind: str, tmp: str | Path, count: int = 1) -> Iterator[RngDaemon]:
    """In a pytest benchmark: a listening daemon of ``kind`` for the ``with`` block
    (skipped if absent); ours must then exit 0 on SIGTERM."""
    skip_absent(kind)
    d = RngDaemon(kind, str(tmp), count=count)
    try:
        d.wait_listening(probe=False)
        yield d
    finally:
        rc = d.stop()
    if kind == "ours":
        assert rc == 0, d.stderr()


class RngDaemon:
    """One ``vhost-device-rng`` process (``kind`` "ours" or "rust") serving ``count``
    sockets ``<base>0 ..``; stderr goes to a file next to the sockets."""

    def __init__(
        self,
        kind: str,
        tmpdir: str,
        *,
        count: int = 1,
        source: str = SOURCE,
        env: dict[str, str | None] | None = None,
        cpus: set[int] | None = None,
    ) -> None:
        """``env``: variables to set (None: unset) for this daemon only; ``cpus``:
        the CPUs it may run on (None: any)."""
        self.kind = kind
        # Several daemons of one kind may share tmpdir (a tag from env tells them apart).
        tag = kind + "".join(f"-{k}={v}" for k, v in sorted((env or {}).items()) if k.startswith("VHD_"))
        self.base = os.path.join(tmpdir, f"{tag}-rng.sock")
        self.count = count
        self.log = os.path.join(tmpdir, f"{tag}-rng.log")
        tree = BEFORE_TREE if kind == "before" else str(REPO)
        if tree is None:
            raise FileNotFoundError("the before kind needs --before DIR")
        path = os.pathsep.join(filter(None, [tree, os.environ.get("PYTHONPATH")]))
        full_env = dict(os.environ, PYTHONPATH=path)
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        cmd = [*daemon_command(kind), "-s", self.base, "-c", str(count), "-f", source]
        for i in range(count):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(i))
        with open(self.log, "wb") as err:
            self.t0 = time.perf_counter()
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=full_env,
                cwd=tmpdir,
                preexec_fn=None if cpus is None else functools.partial(os.sched_setaffinity, 0, cpus),  # noqa: PLW1509
            )
        self.t_file: float | None = None
        self.t_connect: float | None = None

    def path(self, index: int = 0) -> str:
        return f"{self.base}{index}"

    def stderr(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()[-2000:]
        except FileNotFoundError:
            return ""

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.kind} daemon exited {self.proc.returncode}: {self.stderr()}")

    def wait_file(self, index: int = 0, deadline: float = DEADLINE) -> None:
        """Poll (0.2 ms steps, bounded by ``deadline``) until the socket file exists."""
        end = time.monotonic() + deadline
        path = self.path(index)
        while not os.path.exists(path):
            self._check_alive()
            if time.monotonic() > end:
                raise TimeoutError(f"{self.kind}: no {path} after {deadline} s: {self.stderr()}")
            time.sleep(0.0002)

    def wait_connectable(self, index: int = 0, deadline: float = DEADLINE) -> None:
        """Wait until a ``connect`` succeeds (the probe connection is closed at once)."""
        end = time.monotonic() + deadline
        while True:
            self.wait_file(index, max(0.0, end - time.monotonic()))
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.connect(self.path(index))
                return
            except (ConnectionRefusedError, FileNotFoundError):
                self._check_alive()
                if time.monotonic() > end:
                    raise TimeoutError(f"{self.kind}: {self.path(index)} refuses connections") from None
                time.sleep(0.0002)
            finally:
                s.close()

    def wait_listening(self, *, probe: bool = True) -> None:
        """Wait for every socket; record the start-up times of socket 0 (seconds from
        before ``Popen``): ``t_file`` when the file appears, ``t_connect`` when a probe
        ``connect`` succeeds (``probe=False``: skip it)."""
        self.wait_file(0)
        self.t_file = time.perf_counter() - self.t0
        if probe:
            self.wait_connectable(0)
            self.t_connect = time.perf_counter() - self.t0
        for i in range(1, self.count):
            self.wait_file(i)

    def connect(self, index: int = 0, **kw: Any) -> RngClient:
        """A front-end on socket ``index``; retries while a previous session of the
        same socket is still being torn down (upstream re-binds between sessions)."""
        end = time.monotonic() + DEADLINE
        while True:
            self.wait_file(index, max(0.0, end - time.monotonic()))
            try:
                return RngClient(self.path(index), **kw)
            except (ConnectionRefusedError, FileNotFoundError):
                self._check_alive()
                if time.monotonic() > end:
                    raise
                time.sleep(0.001)

    def memory_kib(self) -> dict[str, int]:
        """VmRSS and VmHWM of the daemon process, in KiB."""
        out = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(val.split()[0])
        return out

    def stop(self) -> int:
        """SIGTERM (ours shuts down cleanly; upstream's dies of it), SIGKILL after a deadline."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        for i in range(self.count):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(i))
        return rc


# -- the benchmark front-end ----------------------------------------------------------------


class RngClient:
    """Our front-end on one rng socket, set up for cheap, repeated batches.

    Descriptor ``i`` of a ``ring_size`` ring is one write-only buffer of ``req_size``
    bytes, written once; a batch of ``n`` publishes heads ``slot .. slot+n-1`` in one
    store, sets ``used_event`` so that only the batch's last used entry interrupts
    (EVENT_IDX, as a Linux guest waiting for the whole batch would), kicks once and
    waits on the call eventfd until ``used->idx`` moved by ``n`` (``n <= ring_size``).
    """

    def __init__(self, path: str, *, req_size: int = REQ_SIZE, ring_size: int = RING_SIZE) -> None:
        self.req_size = req_size
        self.ring_size = ring_size
        fe = Frontend.connect(path, timeout=DEADLINE)
        try:
            fe.negotiate()
            data = ring_size * ((req_size + 4095) & ~4095)
            fe.add_memory(0x10000 + 0x4000 + data + (1 << 20))
            fe.set_mem_table()
            ring = fe.setup_ring(0, ring_size)
        except BaseException:
            fe.close()
            raise
        self.fe: Frontend = fe
        self.ring: FrontendRing = ring
        mock = ring.mock
        self.gpas = [mock.alloc(req_size, 4096) for _ in range(ring_size)]
        mock.write_descs(0, [RawDesc(g, req_size, VIRTQ_DESC_F_WRITE, 0) for g in self.gpas])
        # Twice round, so that heads[slot : slot + n] wraps like the ring.
        self.heads = array("H", list(range(ring_size)) * 2)
        mem = fe.memory
        used = mem.get_slice(mock.used_ring, 4 + 8 * ring_size + 2).cast("B")
        self._used_idx = used[2:4].cast("H")
        self._used_elems = used[4 : 4 + 8 * ring_size].cast("I")  # [2k] = id, [2k+1] = len
        self._avail_event = used[4 + 8 * ring_size :].cast("H")
        self._poll = select.poll()
        self._poll.register(ring.call_fd, select.POLLIN)
        self.next_avail = 0
        self.last_used = 0

    def close(self) -> None:
        self._used_idx.release()
        self._used_elems.release()
        self._avail_event.release()
        self.fe.close()

    def __enter__(self) -> RngClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def batch(self, n: int) -> int:
        """One batch of ``n`` requests; returns the bytes the device reported used."""
        mock = self.ring.mock
        slot = self.next_avail % self.ring_size
        target = (self.last_used + n) & 0xFFFF
        mock.set_used_event((target - 1) & 0xFFFF)
        mock.publish(self.heads[slot : slot + n])
        self.next_avail = (self.next_avail + n) & 0xFFFF
        os.eventfd_write(self.ring.kick_fd, 1)
        used_idx = self._used_idx
        call_fd = self.ring.call_fd
        ms = int(DEADLINE * 1000)
        while used_idx[0] != target:
            if not self._poll.poll(ms):
                raise TimeoutError(f"no used buffers within {DEADLINE} s ({used_idx[0]} != {target})")
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(call_fd)
        self.last_used = target
        return self._used_bytes(target - n, n)

    def _used_bytes(self, start: int, n: int) -> int:
        """Sum of the used lengths of ``n`` used entries from used index ``start``."""
        elems = self._used_elems
        slot = start % self.ring_size
        end = slot + n
        if end <= self.ring_size:
            return sum(elems[2 * slot + 1 : 2 * end : 2])
        return sum(elems[2 * slot + 1 :: 2]) + sum(elems[1 : 2 * (end - self.ring_size) : 2])

    def stream(self, depth: int, count: int) -> int:
        """Complete ``count`` requests keeping up to ``depth`` in flight, as a driver
        that refills its ring as buffers come back; returns the bytes used.

        Each wake-up takes every used entry there is and makes as many buffers
        available again in one publish; the driver kicks only when the device asks
        (EVENT_IDX ``avail_event``, VIRTIO 1.2 §2.7.10: a device still draining
        does not need one) and asks for an interrupt once half of what is in
        flight is done (like Linux's ``virtqueue_enable_cb_delayed``).  It returns
        with nothing in flight."""
        mock = self.ring.mock
        used_idx, avail_event = self._used_idx, self._avail_event
        heads, size = self.heads, self.ring_size
        kick_fd, call_fd, poll = self.ring.kick_fd, self.ring.call_fd, self._poll.poll
        ms = int(DEADLINE * 1000)
        last = self.last_used
        avail = self.next_avail
        inflight = issued = total = 0
        while True:
            add = min(depth - inflight, count - issued)
            if add > 0:
                old = avail
                slot = avail % size
                mock.publish(heads[slot : slot + add])
                avail = (avail + add) & 0xFFFF
                issued += add
                inflight += add
                # vring_need_event(avail_event, new, old)
                if (avail - avail_event[0] - 1) & 0xFFFF < (avail - old) & 0xFFFF:
                    os.eventfd_write(kick_fd, 1)
            if inflight == 0:
                break
            mock.set_used_event((last + max(1, inflight // 2) - 1) & 0xFFFF)
            while used_idx[0] == last:
                if not poll(ms):
                    raise TimeoutError(f"no used buffers within {DEADLINE} s")
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(call_fd)
            now = used_idx[0]
            n = (now - last) & 0xFFFF
            total += self._used_bytes(last, n)
            last = now
            inflight -= n
        self.last_used = last
        self.next_avail = avail
        return total

    def run(self, n: int, batches: int) -> int:
        """``batches`` batches of ``n``; returns the bytes used."""
        b = self.batch
        return sum(b(n) for _ in range(batches))

    def check(self) -> None:
        """Correctness, once: a batch of 4 fills 4 buffers completely with bytes that
        are not constant and differ between buffers."""
        slot = self.next_avail % self.ring_size
        n = min(4, self.ring_size)
        for k in range(n):
            self.fe.memory.write(self.gpas[(slot + k) % self.ring_size], bytes(self.req_size))
        got = self.batch(n)
        assert got == n * self.req_size, (got, n * self.req_size)
        bufs = [self.fe.memory.read(self.gpas[(slot + k) % self.ring_size], self.req_size) for k in range(n)]
        if self.req_size >= 16:
            assert all(len(set(b)) > 1 for b in bufs), "constant bytes from the rng"
            assert len(set(bufs)) == n, "the same bytes twice"


# -- references -------------------------------------------------------------------------------


class SourceReader:
    """The throughput reference: ``readv`` of ``req_size`` bytes from the source into a
    page-aligned buffer, in a Python loop.

    ``buffers`` > 1 (information): read into that many page-aligned buffers of a
    shared memfd mapping in turn, as the daemons fill a ring's worth of guest
    buffers: the cost of the destination alone (a working set larger than the
    caches, shared-memory pages), without any virtqueue."""

    def __init__(self, source: str = SOURCE, req_size: int = REQ_SIZE, buffers: int = 1) -> None:
        self.fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        self.req_size = req_size
        stride = (max(4096, req_size) + 4095) & ~4095
        if buffers > 1:
            mfd = os.memfd_create("ref-guest", os.MFD_CLOEXEC)
            try:
                os.ftruncate(mfd, stride * buffers)
                self.buf = mmap.mmap(mfd, stride * buffers, mmap.MAP_SHARED)
            finally:
                os.close(mfd)
        else:
            self.buf = mmap.mmap(-1, stride)
        whole = memoryview(self.buf)
        self.mvs = [[whole[i * stride : i * stride + req_size]] for i in range(buffers)]
        whole.release()
        self.next = 0

    def run(self, count: int) -> int:
        readv, fd, bufs = os.readv, self.fd, self.mvs
        if len(bufs) == 1:
            one = bufs[0]
            return sum(readv(fd, one) for _ in range(count))
        n, k, total = len(bufs), self.next, 0
        for _ in range(count):
            total += readv(fd, bufs[k])
            k = (k + 1) % n
        self.next = k
        return total

    def close(self) -> None:
        for views in self.mvs:
            views[0].release()
        self.buf.close()
        os.close(self.fd)


_PONG = """
import os, select, sys
a, b = int(sys.argv[1]), int(sys.argv[2])
ep = select.epoll()
ep.register(a, select.EPOLLIN)
while True:
    ep.poll()
    v = os.eventfd_read(a)
    if v > 1:
        break
    os.eventfd_write(b, 1)
"""


class EventfdPingPong:
    """The round-trip reference: an eventfd ping-pong with another process, which
    waits in ``epoll`` and answers on a second eventfd; our side waits exactly as
    :meth:`RngClient.batch` does (``poll`` then ``eventfd_read``)."""

    def __init__(self, cpus: set[int] | None = None) -> None:
        """``cpus``: the CPUs the answering process may run on (None: any)."""
        self.ping = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.pong = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _PONG, str(self.ping), str(self.pong)],
            pass_fds=(self.ping, self.pong),
            preexec_fn=None if cpus is None else functools.partial(os.sched_setaffinity, 0, cpus),  # noqa: PLW1509
        )
        self._poll = select.poll()
        self._poll.register(self.pong, select.POLLIN)
        self.run(1)

    def run(self, count: int) -> int:
        ping, pong, poll = self.ping, self.pong, self._poll.poll
        ms = int(DEADLINE * 1000)
        for _ in range(count):
            os.eventfd_write(ping, 1)
            while True:
                if not poll(ms):
                    raise TimeoutError("eventfd ping-pong peer does not answer")
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(pong)
                    break
        return count

    def close(self) -> None:
        os.eventfd_write(self.ping, 2)
        try:
            self.proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.ping)
        os.close(self.pong)


# -- measuring -------------------------------------------------------------------------------


def timed(fn: Callable[[int], int], unit_calls: int, secs: float) -> tuple[int, float]:
    """Call ``fn(unit_calls)`` until ``secs`` elapsed; returns (units done, seconds)."""
    done = 0
    t0 = time.perf_counter()
    end = t0 + secs
    while True:
        done += fn(unit_calls)
        t = time.perf_counter()
        if t >= end:
            return done, t - t0


class Stat:
    def __init__(self, values: Sequence[float]) -> None:
        self.values = list(values)
        self.med = statistics.median(self.values) if self.values else float("nan")

    def fmt(self, spec: str = ".0f") -> str:
        if not self.values:
            return "n/a"
        return f"{self.med:{spec}} ({min(self.values):{spec}}..{max(self.values):{spec}})"


def cpustat() -> tuple[int, int, int]:
    """(busy, idle, steal) jiffies of all CPUs."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[0] + v[1] + v[2] + v[5] + v[6], v[3] + v[4], v[7]


def task_cpu_us(pid: int) -> float:
    """CPU time of every thread of ``pid`` so far, in microseconds (schedstat, ns
    resolution: robust to machine load, unlike wall time)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{task}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e3


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# -- -c N: front-end worker processes ----------------------------------------------------------


def worker_main(path: str, batch: int, secs: float) -> None:
    """One front-end process of the -c N figure: connect and check, print "ready",
    read the common start time (CLOCK_MONOTONIC, shared by all processes) from
    stdin, run batches for ``secs`` from then, print JSON."""
    with RngClient(path) as c:
        c.check()
        print("ready", flush=True)
        start_at = float(sys.stdin.readline())
        while time.monotonic() < start_at:
            time.sleep(max(0.0, start_at - time.monotonic()))
        nbytes, dt = timed(functools.partial(c.run, batch), 4, secs)
    print(json.dumps({"bytes": nbytes, "secs": dt}), flush=True)


def parallel_rate(d: RngDaemon, n: int, batch: int, secs: float) -> float:
    """Aggregate bytes/s of ``n`` front-end processes on sockets 0..n-1 of ``d``, all
    started at the same moment once every one of them is connected."""
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", d.path(i), str(batch), str(secs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"worker on {d.kind} failed to start ({p.wait()})")
        start_at = time.monotonic() + 0.005
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(f"{start_at!r}\n")
            p.stdin.close()
        total, longest = 0, 0.0
        for p in procs:
            assert p.stdout is not None
            out = p.stdout.read()
            p.stdout.close()
            if p.wait(DEADLINE + secs) != 0:
                raise RuntimeError(f"worker failed ({p.returncode}) on {d.kind}")
            r = json.loads(out.strip().splitlines()[-1])
            total += r["bytes"]
            longest = max(longest, r["secs"])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            for f in (p.stdin, p.stdout):
                if f is not None and not f.closed:
                    f.close()
    return total / longest


# -- the table -------------------------------------------------------------------------------


class Table:
    """Lines of the report, printed as they come."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, s: str = "") -> None:
        print(s, flush=True)
        self.lines.append(s)


def _ratios(num: Sequence[float], den: Sequence[float]) -> Stat:
    return Stat([a / b for a, b in zip(num, den, strict=False)])


def section_throughput(
    out: Table, clients: dict[str, RngClient], pids: dict[str, int], reps: int, secs: float
) -> None:
    out(f"-- rng throughput, {REQ_SIZE} B requests, MB/s (1 MB = 1e6 B); ref = readv of {SOURCE}")
    kinds = [k for k in TABLE_KINDS if k in clients or k in ("ours", "rust")]
    pairs = [("ours", "ref"), ("ours", "before"), ("ours", "rust"), ("rust", "ref"), ("ours", "ring")]
    pairs = [(x, y) for x, y in pairs if y in ("ref", "ring") or y in kinds]
    head = ("batch", "ref readv", "ref ring", *kinds, *(f"{x}/{y}" for x, y in pairs))
    fmt_row = "{:>6} " + "{:>18} " * (2 + len(kinds)) + "{:>11} " * len(pairs)
    out(fmt_row.format(*head))
    refs = {"ref": SourceReader(), "ring": SourceReader(buffers=RING_SIZE)}
    cpu_rows = []
    try:
        for label in [*BATCHES, *(f"s{d}" for d in DEPTHS)]:
            rates: dict[str, list[float]] = {k: [] for k in ("ref", "ring", *kinds)}
            cpu: dict[str, list[float]] = {k: [] for k in ("ref", "ring", *kinds)}
            for _ in range(reps):
                for k, r in refs.items():
                    c0 = time.thread_time()
                    b, t = timed(r.run, 64, secs)
                    cpu[k].append((time.thread_time() - c0) * 1e6 / (b / REQ_SIZE))
                    rates[k].append(b / t / 1e6)
                # Each daemon in two halves, A B B A: a drift of the machine's speed
                # within the rep weighs on both alike.
                got = {k: [0, 0.0, 0.0] for k in clients}  # bytes, seconds, cpu us
                order = list(clients)
                for k in order + order[::-1]:
                    c = clients[k]
                    if isinstance(label, int):
                        fn, per = functools.partial(c.run, label), max(1, 64 // label)
                    else:
                        depth = int(label[1:])
                        fn, per = functools.partial(c.stream, depth), 4 * depth
                    c0 = task_cpu_us(pids[k])
                    b, t = timed(fn, per, secs / 2)
                    acc = got[k]
                    acc[0] += b
                    acc[1] += t
                    acc[2] += task_cpu_us(pids[k]) - c0
                for k, (b, t, us) in got.items():
                    cpu[k].append(us / (b / REQ_SIZE))
                    rates[k].append(b / t / 1e6)
            st = {k: Stat(v) for k, v in rates.items()}
            row = (
                label,
                *(st[k].fmt() for k in ("ref", "ring", *kinds)),
                *(_ratios(rates[x], rates[y]).fmt(".2f") for x, y in pairs),
            )
            out(fmt_row.format(*row))
            cpu_rows.append((label, *(Stat(cpu[k]).fmt(".1f") for k in ("ref", "ring", *kinds))))
    finally:
        for r in refs.values():
            r.close()
    out(
        "   batch n: n requests per kick, the front-end waiting for all of them; sN: a stream"
        " keeping N in flight (RngClient.stream)"
    )
    out(
        f"   ref ring (information): the same readv into {RING_SIZE} page-aligned buffers of a shared"
        " memfd in turn, the destination the daemons fill (one per ring entry)"
    )
    out("   goals: ours/ref >= 0.7, ours/rust >= 1.0 (ratios: median of the per-rep ratios; within a rep")
    out("   the daemons run in two halves each, A B B A, so that drift weighs on all alike)")
    out("   CPU us per request (refs: the reading thread; ours/rust: all daemon threads, schedstat):")
    cpu_fmt = "{:>6} " + "{:>18} " * (2 + len(kinds))
    out(cpu_fmt.format("", "ref readv", "ref ring", *kinds))
    for cells in cpu_rows:
        out(cpu_fmt.format(*cells))
    out()


#: Where the round trip runs: (label, front-end CPUs, daemon and ping-pong peer CPUs)
#: as indexes into the CPUs this process may use; None: unpinned.
PLACEMENTS: tuple[tuple[str, int | None, int | None], ...] = (
    ("same CPU", 0, 0),
    ("two CPUs", 0, 1),
    ("unpinned", None, None),
)


def section_roundtrip(out: Table, tmp: str, kinds: Sequence[str], reps: int, count: int) -> None:
    """The 1-request round trip, for each placement: each daemon variant (ours and
    "before" with polling, the default, and with ``VHD_POLL_US=0``; rust) against an
    eventfd ping-pong whose answering process is pinned as the daemons are; the
    repetitions interleaved.  Polling must never cost the driver: "poll/off" is
    each variant with polling against itself without, per repetition."""
    cpus = sorted(os.sched_getaffinity(0))
    variants: dict[str, tuple[str, dict[str, str | None]]] = {}
    for k in kinds:
        variants[k] = (k, {"VHD_POLL_US": None})
        if k != "rust":
            variants[f"{k} poll=0"] = (k, {"VHD_POLL_US": "0"})
    out(
        f"-- kick -> used round trip of a 1-byte request, us; ref = eventfd ping-pong between 2 processes"
        f" placed like the front-end and the daemon; {reps} reps x {count} round trips, interleaved"
    )
    fmt_row = "{:>9} {:>13} {:>22} {:>10} {:>10} {:>22}"
    out(fmt_row.format("placement", "", "us", "/ref", "poll/off", "daemon CPU us / rt"))
    for label, fe_i, d_i in PLACEMENTS:
        if (fe_i is not None and fe_i >= len(cpus)) or (d_i is not None and d_i >= len(cpus)):
            out(f"{label:>9} n/a (needs {max(fe_i or 0, d_i or 0) + 1} CPUs)")
            continue
        fe_cpus = None if fe_i is None else {cpus[fe_i]}
        d_cpus = None if d_i is None else {cpus[d_i]}
        us: dict[str, list[float]] = {v: [] for v in ("ref", *variants)}
        cpu: dict[str, list[float]] = {v: [] for v in ("ref", *variants)}
        daemons = {v: RngDaemon(k, tmp, env=env, cpus=d_cpus) for v, (k, env) in variants.items()}
        clients: dict[str, RngClient] = {}
        pp = None
        try:
            for d in daemons.values():
                d.wait_listening(probe=False)
            if fe_cpus is not None:
                os.sched_setaffinity(0, fe_cpus)
            pp = EventfdPingPong(d_cpus)
            for v, d in daemons.items():
                clients[v] = d.connect(req_size=1)
                clients[v].check()
                clients[v].run(1, max(1, count // 10))   # warm: the polling windows learn
            runs: list[tuple[str, int, Callable[[int], object]]] = [("ref", pp.proc.pid, pp.run)]
            runs += [(v, daemons[v].proc.pid, functools.partial(clients[v].run, 1)) for v in variants]
            for rep in range(reps):
                # A B C ... then ... C B A: drift weighs on all alike.
                for v, pid, fn in runs if rep % 2 == 0 else runs[::-1]:
                    c0 = task_cpu_us(pid)
                    t0 = time.perf_counter()
                    fn(count)
                    us[v].append((time.perf_counter() - t0) / count * 1e6)
                    cpu[v].append((task_cpu_us(pid) - c0) / count)
        finally:
            for c in clients.values():
                c.close()
            if pp is not None:
                pp.close()
            for d in daemons.values():
                d.stop()
            os.sched_setaffinity(0, cpus)
        for v in ("ref", *variants):
            off = f"{v} poll=0"
            cells = (
                label,
                "ping-pong" if v == "ref" else v,
                Stat(us[v]).fmt(".1f"),
                "" if v == "ref" else _ratios(us[v], us["ref"]).fmt(".2f"),
                _ratios(us[v], us[off]).fmt(".2f") if off in us else "",
                Stat(cpu[v]).fmt(".1f"),
            )
            out(fmt_row.format(*cells))
    out("   /ref: the time against the ping-pong's (median of per-rep ratios); poll/off: with adaptive")
    out("   polling (VHD_POLL_US unset: 32) against without (goal <= 1.0 in every placement)")
    out()


def section_memory(out: Table, daemons: dict[str, RngDaemon]) -> None:
    out("-- daemon memory after serving (the runs above), MiB; goal <= 25")
    for k in TABLE_KINDS:
        if k in daemons:
            mk = daemons[k].memory_kib()
            out(f"{k:>6} VmRSS {mk['VmRSS'] / 1024:6.1f}   VmHWM {mk['VmHWM'] / 1024:6.1f}")
        else:
            out(f"{k:>6} n/a")
    out()


def section_startup(out: Table, tmp: str, kinds: Sequence[str], starts: int) -> None:
    """Start-up of each daemon, plus ours with bytecode cached (as ``pip install``
    leaves it: a PYTHONPYCACHEPREFIX of our own, warmed by one uncounted start) and
    the bare interpreter as references."""
    pyc = {"PYTHONDONTWRITEBYTECODE": None, "PYTHONPYCACHEPREFIX": os.path.join(tmp, "pycache")}
    variants: dict[str, tuple[str, dict[str, str | None] | None]] = {k: (k, None) for k in kinds}
    variants["ours .pyc"] = ("ours", pyc)
    t_file: dict[str, list[float]] = {v: [] for v in variants}
    t_conn: dict[str, list[float]] = {v: [] for v in variants}
    rss: dict[str, list[float]] = {v: [] for v in variants}
    refs: dict[str, list[float]] = {"python -c pass": [], "python -S -c pass": []}
    warm = RngDaemon("ours", tmp, env=pyc)
    try:
        warm.wait_listening()
    finally:
        warm.stop()
    for _ in range(starts):
        for v, (k, env) in variants.items():
            d = RngDaemon(k, tmp, env=env)
            try:
                d.wait_listening()
                assert d.t_file is not None and d.t_connect is not None
                t_file[v].append(d.t_file * 1e3)
                t_conn[v].append(d.t_connect * 1e3)
                rss[v].append(d.memory_kib()["VmRSS"] / 1024)
            finally:
                d.stop()
        for name, times in refs.items():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, *name.split()[1:]], check=True)
            times.append((time.perf_counter() - t0) * 1e3)
    out(f"-- start-up, ms from before Popen to the socket file / a connect OK; {starts} starts; goal <= 150")
    out("{:>9} {:>22} {:>22} {:>22}".format("", "file", "connect", "idle VmRSS MiB"))
    for v in (*KINDS, "ours .pyc"):
        if v not in variants:
            out(f"{v:>9} n/a")
            continue
        cells = (v, Stat(t_file[v]).fmt(".1f"), Stat(t_conn[v]).fmt(".1f"), Stat(rss[v]).fmt(".1f"))
        out("{:>9} {:>22} {:>22} {:>22}".format(*cells))
    for name, times in refs.items():
        out(f"   ref: {name} (Popen to exit) {Stat(times).fmt('.1f')}")
    flags = f"PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r}"
    out(f"   (this environment: {flags}; site-packages .pth files run at every start, see -S)")
    out()


def section_parallel(out: Table, tmp: str, kinds: Sequence[str], reps: int, secs: float) -> None:
    out(
        f"-- -c N: N front-end processes (batch 64 x {REQ_SIZE} B) on one daemon serving N sockets,"
        f" aggregate MB/s; {reps} reps x {secs} s"
    )
    head = ("N", "ours", "rust", "ours/rust", "ours/N=1", "rust/N=1")
    out("{:>6} {:>22} {:>22} {:>10} {:>9} {:>9}".format(*head))
    base: dict[str, float] = {}
    for n in (1, 2, 4):
        rates: dict[str, list[float]] = {"ours": [], "rust": []}
        ds = {k: RngDaemon(k, tmp, count=n) for k in kinds}
        try:
            for d in ds.values():
                d.wait_listening(probe=False)
            for _ in range(reps):
                for k, d in ds.items():
                    rates[k].append(parallel_rate(d, n, 64, secs) / 1e6)
        finally:
            for d in ds.values():
                d.stop()
        st = {k: Stat(v) for k, v in rates.items()}
        scale = {}
        for k in kinds:
            if rates[k]:
                base.setdefault(k, st[k].med)
                scale[k] = f"{st[k].med / base[k]:.2f}"
        row = (
            n,
            st["ours"].fmt(),
            st["rust"].fmt(),
            _ratios(rates["ours"], rates["rust"]).fmt(".2f"),
            scale.get("ours", "n/a"),
            scale.get("rust", "n/a"),
        )
        out("{:>6} {:>22} {:>22} {:>10} {:>9} {:>9}".format(*row))
    out()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--secs", type=float, default=0.3, help="seconds per repetition of a throughput figure")
    ap.add_argument("--rt-count", type=int, default=2000, help="round trips per repetition")
    ap.add_argument("--startups", type=int, default=9, help="daemon starts for the start-up figure")
    ap.add_argument("--par-secs", type=float, default=1.0, help="seconds per -c N repetition")
    ap.add_argument("--par-reps", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: tput,rt,mem,start,par")
    ap.add_argument(
        "--pin",
        action="store_true",
        help="throughput: front-end on the first CPU, daemons on the second (the same for all"
        " daemons; less scheduler noise); the round trip has its own placements",
    )
    ap.add_argument(
        "--before",
        metavar="DIR",
        help="also measure our daemon from this built source tree (a copy of main) as 'before'",
    )
    ap.add_argument("--worker", nargs=3, metavar=("PATH", "BATCH", "SECS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker_main(a.worker[0], int(a.worker[1]), float(a.worker[2]))
        return 0
    skip = set(filter(None, a.skip.split(",")))
    global BEFORE_TREE
    if a.before:
        BEFORE_TREE = str(Path(a.before).resolve())
    present = {"ours": True, "before": bool(BEFORE_TREE), "rust": rust_daemon() is not None}
    kinds = [k for k in TABLE_KINDS if present[k]]
    out = Table()
    cpu0 = cpustat()
    load0 = loadavg()
    out(f"== vhost-device-rng daemon figures, {time.strftime('%Y-%m-%d %H:%M:%S')} on {os.uname().nodename}")
    out(f"cpu    : {os.cpu_count()} CPUs; load {load0} (1/5/15 min) at start")
    poll = os.environ.get("VHD_POLL_US", "").strip() or "unset: the default, 32"
    out(f"ours   : {sys.executable} -m vhost_backends.cli.rng (Python {sys.version.split()[0]}); "
        f"VHD_POLL_US {poll} (adaptive ring polling, µs; run with VHD_POLL_US=0 for none)")
    vdso = os.environ.get("VHD_RNG_VDSO", "").strip() or "unset: the default, 1"
    out(f"         VHD_RNG_VDSO {vdso} (1: {SOURCE} through the vDSO's getrandom where the kernel has it, "
        f"{'as here' if vdso_available() else 'not here'}; 0: read the file, as rust does)")
    out(f"rust   : {rust_daemon() or 'n/a (set $' + RUST_ENV + ')'}")
    if BEFORE_TREE:
        out(f"before : {sys.executable} -m vhost_backends.cli.rng from {BEFORE_TREE}, same settings")
    out(f"reps   : {a.reps} x {a.secs} s per throughput figure, interleaved; median (min..max)")
    cpus = sorted(os.sched_getaffinity(0))
    pin = a.pin and len(cpus) >= 2
    if pin:
        out(f"pinned : throughput: front-end on CPU {cpus[0]}, daemons on CPU {cpus[1]}")
    out()
    with tempfile.TemporaryDirectory(prefix="vdev-bench-") as tmp:
        if not {"tput", "mem"} <= skip:
            if pin:
                os.sched_setaffinity(0, {cpus[0]})
            daemons = {k: RngDaemon(k, tmp, cpus={cpus[1]} if pin else None) for k in kinds}
            try:
                for d in daemons.values():
                    d.wait_listening(probe=False)
                pids = {k: d.proc.pid for k, d in daemons.items()}
                if "tput" not in skip:
                    clients = {k: d.connect() for k, d in daemons.items()}
                    try:
                        for c in clients.values():
                            c.check()
                        section_throughput(out, clients, pids, a.reps, a.secs)
                    finally:
                        for c in clients.values():
                            c.close()
                if "mem" not in skip:
                    section_memory(out, daemons)
            finally:
                for d in daemons.values():
                    d.stop()
                if pin:
                    os.sched_setaffinity(0, cpus)
        if "rt" not in skip:
            section_roundtrip(out, tmp, kinds, a.reps, a.rt_count)
        # Start-up and -c N: ours against rust only.
        if "start" not in skip:
            section_startup(out, tmp, [k for k in kinds if k != "before"], a.startups)
        if "par" not in skip:
            section_parallel(out, tmp, [k for k in kinds if k != "before"], a.par_reps, a.par_secs)
    b1, i1, s1 = cpustat()
    b0, i0, s0 = cpu0
    tot = (b1 - b0) + (i1 - i0) + (s1 - s0)
    if tot > 0:
        out(
            f"machine: CPUs {100 * (b1 - b0) / tot:.0f}% busy during the run (this benchmark alone keeps"
            f" about one busy), {100 * (s1 - s0) / tot:.1f}% stolen; load {loadavg()} at end (was {load0})"
        )
    return 0


# -- pytest helpers of bench_devices.py / bench_vhost_roundtrip.py ------------------------------


def write_summary(config: Any, title: str, rows: dict[str, tuple[float, str, str | None]]) -> None:
    """Print ``name -> (value, unit, reference)`` rows with their ratios to the
    reference and to the Rust figure of the same name, outside pytest's capture."""
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is None or not rows:
        return
    capman = config.pluginmanager.get_plugin("capturemanager")
    ctx = capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext()
    with ctx:
        tr.write_line("")
        tr.write_line(f"{title} (median), ratios to same-run references:")
        for name, (value, unit, ref) in rows.items():
            extra = ""
            for r in (ref, name.replace("ours", "rust") if "ours" in name else None):
                if r and r in rows and r != name:
                    extra += f"  {value / rows[r][0]:.2f}x {r}"
            tr.write_line(f"  {name:<22} {value:10.1f} {unit}{extra}")


if __name__ == "__main__":
    raise SystemExit(main())
