"""vhost-device-vsock throughput and connection rate: ours against the Rust daemon, one run.

Our front-end plays the guest's driver (tests/integration/vsock_driver.py), batched
as Linux's virtio-vsock driver is (``VsockDriver.send_rw``, ``recv_data``) so that
the rows measure the daemons; the host side is Unix sockets served by host
programs in processes of their own.  For each daemon present (ours
always; the Rust one from ``VHOST_DEVICE_RUST_BIN``, else "n/a"), in interleaved
repetitions:

* guest -> host MiB/s with 64 KiB and 4 KiB RW packets (the guest obeys the credit
  the device gives; a daemon that gives none for ``--stall`` seconds is cut off and
  its rate so far reported);
* host -> guest MiB/s (4 KiB rx buffers, as Linux posts);
* connections per second (guest REQUEST -> RESPONSE -> host accept -> guest RST).

Prints the medians and ours/Rust ratios, and each row's CPU per packet of the
driver, the host program and the daemon.  ``--old-driver`` also runs every daemon
with the previous driver (packet by packet), ``--guest-copy`` makes the driver copy
every payload as a guest's socket layer does.  Run by hand::

    VHOST_DEVICE_RUST_BIN=~/.cache/vsock-sid/root/usr/bin .venv/bin/python benches/vsock_table.py
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "integration")]

from vsock_driver import (  # noqa: E402
    HDR,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    RX,
    VsockDriver,
)


def daemons(gil_only: bool = False) -> dict[str, list[str] | None]:
    """The daemons to compare: ours, the Rust one (None: not here), and with
    ``gil_only`` ours again with every kick served with the GIL
    (``VHD_VSOCK_NOGIL=0``), the A/B of its nogil paths."""
    ours = shutil.which("vhost-device-vsock") or str(Path(sys.executable).parent / "vhost-device-vsock")
    rust_dir = os.environ.get("VHOST_DEVICE_RUST_BIN")
    rust = Path(rust_dir) / "vhost-device-vsock" if rust_dir else None
    found: dict[str, list[str] | None] = {"ours": [ours]}
    if gil_only:
        found["ours-gil"] = ["env", "VHD_VSOCK_NOGIL=0", ours]
    found["rust"] = [str(rust)] if rust is not None and rust.exists() else None
    return found


class Daemon:
    def __init__(self, cmd: list[str], tmp: Path, name: str = "") -> None:
        self.name = name
        tmp.mkdir(exist_ok=True)
        self.sock = str(tmp / "vhost.sock")
        self.uds = str(tmp / "vm.vsock")
        self.proc = subprocess.Popen(
            [*cmd, "--guest-cid", "3", "--socket", self.sock, "--uds-path", self.uds],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + (300 if cmd[0] == "valgrind" else 10)
        # Wait for the socket file without connecting: a probe connection would be a
        # front-end session, and the Rust daemon re-creates its socket after each.
        while not (os.path.exists(self.sock) and os.path.exists(self.uds)):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} did not start")
            time.sleep(0.01)

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, repeated every 10 s until ``timeout``: under valgrind a signal can
        land while the main thread's futex wait is restarted, and CPython's handler
        then only runs at the next one."""
        deadline = time.monotonic() + timeout
        while True:
            self.proc.terminate()
            try:
                self.proc.wait(min(10.0, max(0.1, deadline - time.monotonic())))
                return
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    raise


#: Whether the guest's driver copies each payload (``--guest-copy``; see main()).
GUEST_COPY = False
#: Descriptors per RW packet of the batched driver (``--one-descriptor``: 1).
RW_DESCS = 2


def driver(d: Daemon, **kw: int) -> VsockDriver:
    """Connect as the guest, retrying while the daemon is between bind and listen."""
    deadline = time.monotonic() + 10
    while True:
        try:
            kw.setdefault("cid", 3)
            kw.setdefault("timeout", 60)
            # A Linux driver kicks tx only when the device asks (§2.7.10).
            kw.setdefault("kick_prepare", True)
            kw.setdefault("copy_payload", GUEST_COPY)
            kw.setdefault("rw_descs", RW_DESCS)
            return VsockDriver(d.sock, **kw)  # type: ignore[arg-type]
        except (ConnectionRefusedError, FileNotFoundError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


#: The host programs, each a process of its own as a real one is (in a thread of
#: this process they would share the driver's GIL and CPU clock): ``sink`` reads a
#: connection accepted on the listening socket ``fd`` until end of file into one
#: buffer, counting bytes and reads in the shared counters ``shm``; ``accept N``
#: accepts and closes N connections; ``write PATH NBYTES SIZE`` connects to the
#: hybrid socket (``CONNECT 80``), and once told ``go`` on stdin writes NBYTES in
#: SIZE-byte writes.  Each says ``ready`` on stdout before its measured part.
_HOST_PROGRAM = r"""
import mmap, socket, struct, sys
role, fd, shm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
counters = mmap.mmap(shm, 16)
if role == "write":
    path, nbytes, size = sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
    c = socket.socket(socket.AF_UNIX)
    c.connect(path)
    c.sendall(b"CONNECT 80\n")
    line = b""
    while not line.endswith(b"\n"):
        line += c.recv(1)
    print("ready", flush=True)
    sys.stdin.readline()
    data = b"\xcd" * size
    for _ in range(nbytes // size):
        c.sendall(data)
    sys.stdin.readline()
    c.close()
    sys.exit(0)
lst = socket.socket(fileno=fd)
print("ready", flush=True)
if role == "accept":
    for _ in range(int(sys.argv[4])):
        lst.accept()[0].close()
    sys.exit(0)
c, _ = lst.accept()
buf = bytearray(1 << 20)
total = reads = 0
while True:
    n = c.recv_into(buf)
    if not n:
        break
    total += n
    reads += 1
    struct.pack_into("<QQ", counters, 0, total, reads)
"""


class HostProgram:
    """One host program (see ``_HOST_PROGRAM``) as a process; ``cpu()`` its CPU
    seconds so far (the scheduler's run time, ``/proc/<pid>/schedstat``)."""

    def __init__(self, role: str, *args: object, fd: int = -1) -> None:
        self._shm = os.memfd_create("vsock-host-counters")
        os.ftruncate(self._shm, 16)
        self.counters = mmap.mmap(self._shm, 16)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOST_PROGRAM, role, str(fd), str(self._shm), *map(str, args)],
            pass_fds=[self._shm] + ([fd] if fd >= 0 else []),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout

    def wait_ready(self) -> None:
        line = self.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"host program said {line!r}, not ready")

    def tell(self) -> None:
        self.stdin.write("go\n")
        self.stdin.flush()

    def read_counts(self) -> tuple[int, int]:
        """Bytes and reads of a sink so far."""
        total, reads = struct.unpack_from("<QQ", self.counters)
        return total, reads

    def cpu(self) -> float:
        try:
            with open(f"/proc/{self.proc.pid}/schedstat") as f:
                return int(f.read().split()[0]) / 1e9
        except (FileNotFoundError, ProcessLookupError):
            return 0.0

    def close(self, timeout: float = 5) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stdout.close()
        self.counters.close()
        os.close(self._shm)


#: Per (row, daemon), summed over repetitions, what the rows count in the front-end:
#: packets (RW packets sent or received; connections), tx kicks, rx kicks (after
#: reposting rx buffers), CREDIT_UPDATEs received, the host program's reads (its
#: wake-ups), the driver's CPU seconds (``cpu``: the thread that plays the guest,
#: ``time.thread_time``) and the host program's (``host cpu``, its own process).
COUNTS: dict[tuple[str, str], dict[str, float]] = {}
#: Per (row, daemon), each repetition: its figure and the front-end's CPU µs per
#: packet (None where the row counts no packets).
RUNS: dict[tuple[str, str], list[tuple[float, float | None]]] = {}
#: A daemon name with this suffix runs the rows with the driver's per-packet calls
#: (``VsockDriver.send``/``recv``, the front-end before the batched paths).
OLD = "+old driver"


def _add(counts: dict[str, float] | None, **values: float) -> None:
    if counts is not None:
        for k, v in values.items():
            counts[k] = counts.get(k, 0.0) + v


class ThreadWriter:
    """``HostProgram("write", ...)`` as a thread of this process (the many-VM figure:
    each VM's driver is a process of its own already, and a host program's start-up
    would run while the other VMs transfer); ``cpu()`` is 0 (its time is the
    process's)."""

    def __init__(self, path: str, nbytes: int, size: int) -> None:
        self._go = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(path, nbytes, size), daemon=True)
        self._thread.start()

    def _run(self, path: str, nbytes: int, size: int) -> None:
        try:
            with socket.socket(socket.AF_UNIX) as c:
                c.connect(path)
                c.sendall(b"CONNECT 80\n")
                line = b""
                while not line.endswith(b"\n"):
                    line += c.recv(1)
                self._ready.set()
                self._go.wait()
                data = b"\xcd" * size
                for _ in range(nbytes // size):
                    c.sendall(data)
        except BaseException as e:  # reported by wait_ready / close
            self._error = e
            self._ready.set()

    def wait_ready(self) -> None:
        self._ready.wait(60)
        if self._error is not None:
            raise RuntimeError(f"host writer failed: {self._error!r}")

    def tell(self) -> None:
        self._go.set()

    def cpu(self) -> float:
        return 0.0

    def close(self, timeout: float = 5) -> None:
        self._go.set()
        self._thread.join(timeout)


def guest_to_host(
    d: Daemon, size: int, nbytes: int, stall: float, counts: dict[str, float] | None = None
) -> float:
    """guest -> host MiB/s with ``size``-byte RW packets; ``counts``, when given,
    gets the front-end's counts added (see ``COUNTS``).  The guest sends what the
    peer's credit allows in batches (``VsockDriver.send_rw``: Linux's tx worker),
    or packet by packet for a daemon named with ``OLD``."""
    port = 5000 + size % 1000
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(f"{d.uds}_{port}")
    lst.listen(1)
    host = HostProgram("sink", fd=lst.fileno())
    g = None
    try:
        host.wait_ready()
        g = driver(d)
        g.send(7000, port, OP_REQUEST)
        rsp = g.expect(OP_RESPONSE)
        buf_alloc, fwd = rsp.buf_alloc, rsp.fwd_cnt
        payload = b"\xab" * size
        sent = 0
        credits = 0
        kicks0, packets0, rx_kicks0 = g.tx_kicks, g.tx_packets, g.rx_kicks
        host0 = host.cpu()
        cpu0 = time.thread_time()
        start = time.perf_counter()
        if d.name.endswith(OLD):
            while sent < nbytes:
                if buf_alloc - (sent - fwd) >= size:
                    g.send(7000, port, OP_RW, payload)
                    sent += size
                    for p in g.recv(0):
                        buf_alloc, fwd = p.buf_alloc, max(fwd, p.fwd_cnt)
                        credits += 1
                    continue
                try:
                    pkts = g.recv(1, timeout=stall)
                except TimeoutError:
                    g.send(7000, port, OP_CREDIT_REQUEST)
                    try:
                        pkts = g.recv(1, timeout=stall)
                    except TimeoutError:
                        break  # no credit comes back: report what went through
                for p in pkts:
                    buf_alloc, fwd = p.buf_alloc, max(fwd, p.fwd_cnt)
                    credits += 1
        else:
            while sent < nbytes:
                n = min((buf_alloc - (sent - fwd)) // size, (nbytes - sent) // size)
                if n > 0:
                    sent += size * g.send_rw(7000, port, payload, n)
                    pkts = g.poll_rx()[1]
                else:
                    try:
                        pkts = g.wait_rx(stall)[1]
                    except TimeoutError:
                        g.send(7000, port, OP_CREDIT_REQUEST)
                        try:
                            pkts = g.wait_rx(stall)[1]
                        except TimeoutError:
                            break  # no credit comes back: report what went through
                for p in pkts:
                    buf_alloc, fwd = p.buf_alloc, max(fwd, p.fwd_cnt)
                    credits += 1
        cpu = time.thread_time() - cpu0
        while host.read_counts()[0] < min(sent, fwd) and time.perf_counter() - start < 60:
            time.sleep(0.001)
        elapsed = time.perf_counter() - start
        got, reads = host.read_counts()
        _add(
            counts,
            packets=g.tx_packets - packets0,
            kicks=g.tx_kicks - kicks0,
            **{"rx kicks": g.rx_kicks - rx_kicks0, "credits": credits, "host reads": reads},
            cpu=cpu,
            **{"host cpu": host.cpu() - host0},
        )
        g.send(7000, port, OP_RST)
        return got / elapsed / 2**20
    finally:
        if g is not None:
            g.close()
        lst.close()
        host.close()


def host_to_guest(
    d: Daemon,
    nbytes: int,
    cid: int = 3,
    write: int = 1 << 20,
    *,
    span: list[float] | None = None,
    counts: dict[str, float] | None = None,
    host_thread: bool = False,
) -> float:
    """host -> guest MiB/s, the host program writing ``write`` bytes at a time; ``span``,
    when given, receives when the transfer started and ended (``time.perf_counter``,
    the same clock in every process); ``counts`` as for :func:`guest_to_host`;
    ``host_thread``: the host program is a thread of this process.  The
    guest takes every used rx buffer per wake-up (``VsockDriver.recv_data``), or
    packet by packet for a daemon named with ``OLD``."""
    g = driver(d, cid=cid, buf_alloc=256 * 1024)
    host: HostProgram | ThreadWriter = (
        ThreadWriter(d.uds, nbytes, write) if host_thread else HostProgram("write", d.uds, nbytes, write)
    )
    try:
        req = g.expect(OP_REQUEST)
        g.send(80, req.src_port, OP_RESPONSE)
        host.wait_ready()
        old = d.name.endswith(OLD)
        packets0, rx_kicks0, waits0 = g.rx_packets, g.rx_kicks, g.rx_waits
        host0 = host.cpu()
        cpu0 = time.thread_time()
        start = time.perf_counter()
        host.tell()
        got = 0
        acked = 0
        packets = 0
        while got < nbytes:
            if old:
                n, k = _old_recv_data(g)
                got += n
                packets += k
                if got - acked >= 64 * 1024:
                    g.send(80, req.src_port, OP_CREDIT_UPDATE)
                    acked = got
            else:
                got += g.recv_data()[0]
                # Linux's virtio_transport_stream_do_dequeue: a CREDIT_UPDATE once
                # the space not yet announced falls below VIRTIO_VSOCK_MAX_PKT_BUF_SIZE.
                if g.buf_alloc - (got - acked) < 64 * 1024:
                    g.send_batch(80, req.src_port, OP_CREDIT_UPDATE)
                    acked = got
        end = time.perf_counter()
        cpu = time.thread_time() - cpu0
        _add(
            counts,
            packets=packets + g.rx_packets - packets0,
            **{"rx kicks": g.rx_kicks - rx_kicks0, "host cpu": host.cpu() - host0},
            cpu=cpu,
            waits=g.rx_waits - waits0,
        )
        if span is not None:
            span += [start, end]
        g.send(80, req.src_port, OP_RST)
        return got / (end - start) / 2**20
    finally:
        host.close(10)
        g.close()


def _old_recv_data(g: VsockDriver) -> tuple[int, int]:
    """The previous front-end's receive loop (``VsockDriver.recv_data`` before the
    batched paths), for the A/B: every used rx buffer read with a copy, reposted at
    once; the RW payload bytes and packets."""
    used = g.fe.wait_used(RX, 1, g.timeout)
    used += g.rx.mock.used_elems()
    memory, area, size = g.fe.memory, g.rx_area, g.rx_buf
    total = packets = 0
    for head, length in used:
        raw = memory.read(area + head * size, length)
        f = HDR.unpack_from(raw)
        if f[6] == OP_RW:
            key = (f[3], f[2])
            g.fwd_cnt[key] = (g.fwd_cnt.get(key, 0) + f[4]) & 0xFFFFFFFF
            total += f[4]
            packets += 1
    old = g.rx.mock.avail_idx()
    g.rx.mock.publish([head for head, _length in used])
    g._kick(RX, old)
    return total, packets


def connection_rate(d: Daemon, count: int, counts: dict[str, float] | None = None) -> float:
    """Connections per second: the guest's REQUEST, the daemon's RESPONSE (the host
    program accepted), the guest's RST; ``counts`` as for :func:`guest_to_host`."""
    port = 6000
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(f"{d.uds}_{port}")
    lst.listen(128)
    host = HostProgram("accept", count, fd=lst.fileno())
    g = None
    try:
        host.wait_ready()
        g = driver(d)
        old = d.name.endswith(OLD)
        host0 = host.cpu()
        cpu0 = time.thread_time()
        start = time.perf_counter()
        refused = 0
        for i in range(count):
            if old:
                g.send(20000 + i, port, OP_REQUEST)
            else:
                g.send_batch(20000 + i, port, OP_REQUEST)
            answer = None
            while answer is None:
                for p in g.recv(1) if old else g.wait_rx()[1]:
                    if p.dst_port == 20000 + i and p.op in (OP_RESPONSE, OP_RST):
                        answer = p.op
            if answer == OP_RST:
                refused += 1  # the host's backlog was full: counted, not waited for
            elif old:
                g.send(20000 + i, port, OP_RST)
            else:
                g.send_batch(20000 + i, port, OP_RST)
        elapsed = time.perf_counter() - start
        _add(counts, packets=count, cpu=time.thread_time() - cpu0, **{"host cpu": host.cpu() - host0})
        if refused:
            print(f"connections: {refused} of {count} refused", file=sys.stderr)
        return (count - refused) / elapsed
    finally:
        if g is not None:
            g.close()
        lst.close()
        host.close()


def _vm_h2g(args: tuple[str, str, int, int]) -> list[float]:
    """One VM's host -> guest transfer: when it started and ended."""
    sock, uds, cid, nbytes = args
    d = Daemon.__new__(Daemon)
    d.sock, d.uds, d.name = sock, uds, ""
    span: list[float] = []
    host_to_guest(d, nbytes, cid, span=span, host_thread=True)
    return span


class CpuMeter:
    """CPU seconds a process's threads use while the meter runs, those that end
    meanwhile included.

    The Rust daemon serves each front-end session on threads that end with the
    session, and an ended thread's run time leaves ``/proc/<pid>/task``; its share
    in ``/proc/<pid>/stat`` is counted in clock ticks.  So a thread of this
    process reads every thread's scheduler run time
    (``/proc/<pid>/task/*/schedstat``, in ns) every ``interval`` seconds and keeps
    the last value seen of each; at most one interval of a thread's run before it
    ended is missed."""

    def __init__(self, pids: list[int], interval: float = 0.005) -> None:
        self.pids = pids
        self.interval = interval
        self._seen: dict[tuple[int, str], int] = {}
        # Voluntary context switches of each thread, as last seen.
        self._vcs: dict[tuple[int, str], int] = {}
        self._base = 0
        self._vcs_base = 0
        self._stop = threading.Event()
        self._sample()
        self._base = sum(self._seen.values())
        self._vcs_base = sum(self._vcs.values())
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        for pid in self.pids:
            try:
                tasks = os.listdir(f"/proc/{pid}/task")
            except FileNotFoundError:
                continue
            for task in tasks:
                try:
                    with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                        self._seen[(pid, task)] = int(f.read().split()[0])
                    with open(f"/proc/{pid}/task/{task}/status") as f:
                        for line in f:
                            if line.startswith("voluntary_ctxt_switches:"):
                                self._vcs[(pid, task)] = int(line.split()[1])
                except (FileNotFoundError, ProcessLookupError):
                    continue

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def stop(self) -> float:
        """Stop; the CPU seconds used since the meter started."""
        self._stop.set()
        self._thread.join()
        self._sample()
        return (sum(self._seen.values()) - self._base) / 1e9

    @property
    def voluntary_switches(self) -> int:
        """Voluntary context switches (waits) of the threads since the meter started."""
        return sum(self._vcs.values()) - self._vcs_base


def aggregate(
    cmd: list[str], vms: int, nbytes: int, cpu: dict[str, float] | None = None, procs: int = 1
) -> float:
    """host -> guest MiB/s summed over ``vms`` VMs of one daemon process, each driven
    by its own process (our driver is Python: one process would measure its GIL).
    ``procs``: the VMs spread over that many daemon processes instead (the control:
    no state, no GIL shared between VMs of different processes).  ``cpu``, when
    given, receives the CPU seconds of the daemons (``daemon``) and of the guest
    drivers with their host programs (``drivers``) and of the whole machine, every
    process's (``machine``), the daemons' voluntary context switches
    (``switches``), and the wall time they were measured over (``wall``: the VMs'
    set-up included, unlike the throughput)."""
    import multiprocessing  # noqa: PLC0415
    import resource  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        daemons = []
        for p in range(procs):
            args = []
            for i in range(p, vms, procs):
                cid = 3 + i
                args += ["--vm", f"guest-cid={cid},socket={tmp}/v{cid}.sock,uds-path={tmp}/u{cid}.vsock"]
            quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
            daemons.append(subprocess.Popen([*cmd, *args], **quiet))  # type: ignore[call-overload]
        try:
            deadline = time.monotonic() + 10
            while not all(os.path.exists(f"{tmp}/u{3 + i}.vsock") for i in range(vms)):
                if time.monotonic() > deadline:
                    raise RuntimeError("daemon did not start")
                time.sleep(0.01)
            jobs = [(f"{tmp}/v{3 + i}.sock", f"{tmp}/u{3 + i}.vsock", 3 + i, nbytes) for i in range(vms)]
            ctx = multiprocessing.get_context("fork")
            pool = ctx.Pool(vms)
            pool.map(abs, range(vms))  # the workers are up before the clock starts
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            meter = CpuMeter([d.pid for d in daemons])
            machine0 = _machine_cpu()
            outer = time.perf_counter()
            try:
                spans = pool.map(_vm_h2g, jobs)
            except Exception as e:
                raise RuntimeError(f"{cmd[0]}, {vms} VMs in {procs} process(es): {e!r}") from e
            outer = time.perf_counter() - outer
            # From the first transfer's start to the last one's end: the VMs' set-up
            # (vhost-user session, connection) is not part of the throughput.
            wall = max(end for _start, end in spans) - min(start for start, _end in spans)
            machine = _machine_cpu() - machine0
            daemon = meter.stop()
            switches = meter.voluntary_switches
            pool.close()
            pool.join()  # the workers' CPU time is the children's once they are reaped
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if cpu is not None:
                cpu["daemon"] = cpu.get("daemon", 0.0) + daemon
                cpu["switches"] = cpu.get("switches", 0.0) + switches
                cpu["drivers"] = cpu.get("drivers", 0.0) + (
                    after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
                )
                cpu["wall"] = cpu.get("wall", 0.0) + outer
                cpu["machine"] = cpu.get("machine", 0.0) + machine
            return vms * nbytes / wall / 2**20
        finally:
            for d in daemons:
                d.terminate()
            for d in daemons:
                d.wait(10)


def _machine_cpu() -> float:
    """CPU seconds the whole machine has run (every CPU, every process: the other
    work sharing the machine included), from ``/proc/stat``."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _instructions(out: Path) -> int:
    """Total instructions (Ir) of a callgrind output file."""
    for line in out.read_text().splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {out}")


def callgrind(
    cmd: list[str], rows: dict[str, Callable[[Daemon], float]], units: dict[str, float]
) -> dict[str, float]:
    """Instructions the daemon runs per unit of each row (per MiB, per connection):
    each row under ``valgrind --tool=callgrind``, less a run that only connects a
    guest (start-up, imports, vhost-user set-up)."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:

        def run(fn: Callable[[Daemon], object], name: str) -> int:
            f = Path(tmp) / f"cg.{name}"
            vg = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={f}", *cmd]
            d = Daemon(vg, Path(tmp) / name)
            try:
                fn(d)
            finally:
                d.stop(600)
            return _instructions(f)

        base = run(lambda d: driver(d).close(), "base")
        for row, fn in rows.items():
            out[row] = (run(fn, f"row{len(out)}") - base) / units[row]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--mib", type=int, default=32)
    ap.add_argument("--conns", type=int, default=300)
    ap.add_argument("--stall", type=float, default=1.0)
    ap.add_argument("--callgrind", action="store_true", help="instructions per MiB / connection instead")
    ap.add_argument("--vms", type=int, default=4, help="VMs of the aggregate figure (1: skip it)")
    ap.add_argument(
        "--gil-ab",
        action="store_true",
        help="also ours with every kick served with the GIL (VHD_VSOCK_NOGIL=0), interleaved",
    )
    ap.add_argument(
        "--runs",
        action="store_true",
        help="print every repetition of each row (ours/rust, and the front-end CPU per packet)",
    )
    ap.add_argument(
        "--rows",
        default="",
        help="comma-separated words: only the rows whose name contains one (e.g. '4 KiB,connections')",
    )
    ap.add_argument(
        "--old-driver",
        action="store_true",
        help="also every daemon with the previous driver (packet by packet), interleaved",
    )
    ap.add_argument(
        "--guest-copy",
        action="store_true",
        help="the guest's driver copies every payload in and out, as a guest's socket layer does "
        "(default: headers only, so that the rows measure the daemons)",
    )
    ap.add_argument(
        "--one-descriptor",
        action="store_true",
        help="the batched driver puts an RW packet's header and payload in one descriptor "
        "(default: two, as Linux's driver)",
    )
    a = ap.parse_args(argv)
    global GUEST_COPY, RW_DESCS
    GUEST_COPY = a.guest_copy
    RW_DESCS = 1 if a.one_descriptor else 2
    rows = {
        "guest->host 64 KiB (MiB/s)": lambda d: guest_to_host(
            d, 65536, a.mib << 20, a.stall, COUNTS.setdefault(("guest->host 64 KiB", d.name), {})
        ),
        "guest->host 4 KiB (MiB/s)": lambda d: guest_to_host(
            d, 4096, a.mib << 20, a.stall, COUNTS.setdefault(("guest->host 4 KiB", d.name), {})
        ),
        "host->guest 64 KiB (MiB/s)": lambda d: host_to_guest(
            d, a.mib << 20, write=65536, counts=COUNTS.setdefault(("host->guest 64 KiB", d.name), {})
        ),
        "host->guest 4 KiB (MiB/s)": lambda d: host_to_guest(
            d, a.mib << 20, write=4096, counts=COUNTS.setdefault(("host->guest 4 KiB", d.name), {})
        ),
        "connections/s": lambda d: connection_rate(
            d, a.conns, COUNTS.setdefault(("connections", d.name), {})
        ),
    }
    if a.rows:
        words = [w.strip() for w in a.rows.split(",") if w.strip()]
        rows = {r: fn for r, fn in rows.items() if any(w in r for w in words)}
    found = daemons(a.gil_ab)
    if a.old_driver:
        # Each daemon again with the previous front-end's per-packet calls, interleaved.
        found.update({name + OLD: cmd for name, cmd in list(found.items())})
    if a.callgrind:
        units = {r: (a.conns if r.startswith("connections") else a.mib) for r in rows}
        counts = {n: callgrind(c, rows, units) for n, c in found.items() if c is not None}
        print(f"{'instructions per MiB / connection':36} {'ours':>14} {'rust':>14} {'rust/ours':>10}")
        for row in rows:
            o, r = counts["ours"][row], counts.get("rust", {}).get(row)
            rust_text = "n/a" if r is None else f"{r:.0f}"
            share = "n/a" if r is None else f"{r / o:.2f}x"
            print(f"{row.split(' (')[0]:36} {o:14.0f} {rust_text:>14} {share:>10}")
        return 0
    results: dict[tuple[str, str], list[float]] = {}
    cpu_s: dict[tuple[str, str], float] = {}
    for _ in range(a.reps):
        # Interleaved row by row (ours, rust, then the next row): each daemon's row
        # follows the same rows of both, so what a row leaves behind in this process
        # (its heap, its threads' sockets) weighs on both alike.
        for row, fn in rows.items():
            for name, cmd in found.items():
                if cmd is None:
                    continue
                with tempfile.TemporaryDirectory() as tmp:
                    d = Daemon(cmd, Path(tmp), name)
                    try:
                        meter = CpuMeter([d.proc.pid])
                        c = COUNTS.get((row.split(" (")[0], name), {})
                        cpu0, packets0 = c.get("cpu", 0.0), c.get("packets", 0.0)
                        value = fn(d)
                        c = COUNTS.get((row.split(" (")[0], name), {})
                        packets = c.get("packets", 0.0) - packets0
                        per = (c.get("cpu", 0.0) - cpu0) / packets * 1e6 if packets else None
                        RUNS.setdefault((row, name), []).append((value, per))
                        results.setdefault((row, name), []).append(value)
                        cpu_s[(row, name)] = cpu_s.get((row, name), 0.0) + meter.stop()
                    finally:
                        d.stop()
    print(
        f"{'figure (median)':32} {'ours':>10} {'rust':>10} {'ours/rust':>10} {'daemon CPU s ours/rust':>24}"
    )
    for row in rows:
        ours = statistics.median(results[(row, "ours")])
        rust_runs = results.get((row, "rust"))
        rust = statistics.median(rust_runs) if rust_runs else None
        ratio = f"{ours / rust:.2f}x" if rust else "n/a"
        rust_text = f"{rust:10.1f}" if rust is not None else f"{'n/a':>10}"
        cpu = f"{cpu_s[(row, 'ours')]:.2f}/" + (f"{cpu_s[(row, 'rust')]:.2f}" if rust else "n/a")
        print(f"{row:32} {ours:10.1f} {rust_text} {ratio:>10} {cpu:>24}")
        gil_runs = results.get((row, "ours-gil"))
        if gil_runs:
            gil = statistics.median(gil_runs)
            print(f"  ours with every kick under the GIL: {gil:.1f} (ours/that {ours / gil:.2f}x)")
        old_ours, old_rust = results.get((row, "ours" + OLD)), results.get((row, "rust" + OLD))
        if old_ours:
            o = statistics.median(old_ours)
            r = statistics.median(old_rust) if old_rust else None
            text = f"{r:.1f}, ours/rust {o / r:.2f}x" if r else "n/a"
            print(f"  with the previous driver: ours {o:.1f}, rust {text}")
    if a.runs:
        for row in rows:
            ours_runs, rust_runs = RUNS.get((row, "ours"), []), RUNS.get((row, "rust"), [])
            print(f"{row}, each repetition (ours/rust, front-end CPU µs per packet ours/rust):")
            for i, (o, op) in enumerate(ours_runs):
                r, rp = rust_runs[i] if i < len(rust_runs) else (None, None)
                ratio = f"{o / r:.2f}x" if r else "n/a"
                cpu = (
                    "" if op is None else f" ({op:.1f}/{rp:.1f} µs)" if rp is not None else f" ({op:.1f} µs)"
                )
                print(f"  {i + 1:2d}: {ratio}{cpu}")
    for (row, name), c in COUNTS.items():
        if c.get("packets"):
            n = c["packets"]
            unit = "connection" if row.startswith("connections") else "packet"
            daemon = cpu_s.get((next(r for r in rows if r.startswith(row)), name))
            counted = ", ".join(
                f"{label} {c[k] / n:.3f}"
                for k, label in (
                    ("kicks", "tx kicks"),
                    ("rx kicks", "rx kicks"),
                    ("credits", "CREDIT_UPDATEs"),
                    ("host reads", "host program reads"),
                    ("waits", "driver waits"),
                )
                if k in c
            )
            print(
                f"  {row}, {name}, per {unit}: CPU µs driver {c['cpu'] / n * 1e6:.1f}, host program "
                f"{c['host cpu'] / n * 1e6:.1f}, daemon "
                + (f"{daemon / n * 1e6:.1f}" if daemon is not None else "n/a")
                + (f"; {counted}" if counted else "")
            )
    if a.vms > 1:
        # (VMs, daemon processes): 1 VM; N VMs in one process; the control, N VMs in
        # N processes.  Interleaved: each repetition runs every set-up of every daemon.
        setups = [(1, 1), (a.vms, 1), (a.vms, a.vms)]
        present = {name: cmd for name, cmd in found.items() if cmd is not None}
        for name, cmd in found.items():
            if cmd is None:
                print(f"{name}: {a.vms} VMs n/a")
        use: dict[tuple[str, tuple[int, int]], dict[str, float]] = {
            (n, k): {} for n in present for k in setups
        }
        rates: dict[tuple[str, tuple[int, int]], list[float]] = {(n, k): [] for n in present for k in setups}
        for _ in range(a.reps):
            for name, cmd in present.items():
                for vms, procs in setups:
                    k = (name, (vms, procs))
                    rates[k].append(aggregate(cmd, vms, a.mib << 20, use[k], procs))
        ncpu = os.cpu_count() or 1
        for name in present:
            o = statistics.median(rates[(name, (1, 1))])
            m = statistics.median(rates[(name, (a.vms, 1))])
            c = statistics.median(rates[(name, (a.vms, a.vms))])
            print(
                f"{name}: host->guest 1 VM {o:.1f} MiB/s, {a.vms} VMs {m:.1f} MiB/s ({m / o:.2f}x); "
                f"control, {a.vms} VMs in {a.vms} processes {c:.1f} MiB/s ({c / o:.2f}x); "
                f"runs {', '.join(f'{r:.0f}' for r in rates[(name, (a.vms, 1))])} / "
                f"{', '.join(f'{r:.0f}' for r in rates[(name, (a.vms, a.vms))])}"
            )
            for vms, procs in setups:
                u = use[(name, (vms, procs))]
                gib = vms * a.reps * a.mib / 1024
                print(
                    f"  {vms} VM(s) in {procs} process(es): CPU s per GiB daemon {u['daemon'] / gib:.2f}, "
                    f"drivers and host programs {u['drivers'] / gib:.2f}; daemon voluntary switches "
                    f"per MiB {u['switches'] / (gib * 1024):.1f}; cores busy "
                    f"{(u['daemon'] + u['drivers']) / u['wall']:.2f}, "
                    f"the machine's {u['machine'] / u['wall']:.2f} of {ncpu}"
                )

    return 0


if __name__ == "__main__":
    sys.exit(main())
