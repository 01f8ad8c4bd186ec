"""vhost-device-scsi against qemu-storage-daemon's vhost-user-blk and the Rust daemon,
same image, same run.

Every daemon is driven by our front-end (``vhost_backends.frontend.Frontend``), no
guest: virtio-scsi READ(10)/WRITE(10) on request queue 0 (ring 2) for ours and the
Rust ``vhost-device-scsi``, virtio-blk IN/OUT on ring 0 for qemu-storage-daemon
(raw file, page cache, twice: its default ``aio=threads`` and ``aio=io_uring``).
The image (64 MiB) is in the page cache; with ``--direct`` every daemon but the
Rust one (which has no such mode) reads and writes it with O_DIRECT instead, and it
is not cached.  ``--image`` names what a write row's blocks are before each run
(``IMAGE_KINDS``: cached, written, sparse as ``qemu-img create`` makes it,
fallocated), a row each; the row's name says which.
Workloads: 4 KiB random reads and writes at queue depth 1 and 32, 1 MiB
sequential reads and writes at depth 4.
Each daemon runs each workload ``--reps`` times, interleaved in a shuffled order,
each run after ``sync`` (no write-back of an earlier run during a timed one); the
table gives median throughput ratios: ours against each reference, and the I/O
engine's A/B: ours against the same daemon without the compiled engine (every
request on the Python path: cached reads with RWF_NOWAIT on the loop thread, the
rest on the worker pool).  A second table gives each daemon's CPU time per
request (every thread of the process, from ``/proc/<pid>/task/*/schedstat``),
which the other work on a loaded machine disturbs far less than throughput.
The MiB/s and CPU µs of every run go to stderr.  The Rust daemon
runs when ``$VHOST_DEVICE_RUST_BIN/vhost-device-scsi`` exists (n/a otherwise; it
serves one front-end, which is all the bench needs).

    .venv/bin/python benches/scsi_table.py [--reps 5] [--direct] [--placements]

``--placements`` adds the 4 KiB workloads with the front-end and the daemon
pinned to one CPU and to two (their throughput depends on it as much as on the
daemon); ``--alt``/``--alt-env`` add ours with other engine settings as an A/B;
``--only`` and ``--skip`` narrow the run.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import mmap
import os
import random
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from vhost_backends.frontend import Frontend
from virtio_devices.scsi import testing as st
from virtio_queue.testing import VIRTQ_DESC_F_WRITE, RawDesc

# The engine A/B: the same daemon without the io_uring engine (every request on
# the Python path: cached reads with RWF_NOWAIT on the loop, the rest on workers).
PYTHON_PATH = """
import sys
from virtio_devices.scsi import device
from vhost_backends.cli.scsi import main

_init = device.ScsiDevice.__init__

def init(self, *args, **kwargs):
    kwargs["use_engine"] = False
    _init(self, *args, **kwargs)

device.ScsiDevice.__init__ = init
sys.exit(main(sys.argv[1:]))
"""
# ``--alt``: ours with engine attributes set (an A/B of the engine's choices in one run).
ALT_PATH = """
import sys
from virtio_devices.scsi import device
from vhost_backends.cli.scsi import main

ATTRS = {attrs!r}
# The engine's constructor arguments among them (the ring's kind), the rest set
# on the engine once it is made.
CTOR = {{k: ATTRS.pop(k) for k in ("defer_taskrun",) if k in ATTRS}}
_Engine = device.Engine
device.Engine = lambda *args, **kwargs: _Engine(*args, **{{**kwargs, **CTOR}})
_activate = device.ScsiDevice.activate

def activate(self, *args, **kwargs):
    _activate(self, *args, **kwargs)
    for name, value in ATTRS.items():
        setattr(self._engine, name, value)

device.ScsiDevice.activate = activate
sys.exit(main(sys.argv[1:]))
"""
IMAGE_SIZE = 64 << 20
# What the image's blocks are before each timed write run (``--image``; reads always
# see written blocks, a read of a hole being no read of the disk):
# - cached: written, every block in the host page cache (the page-cache rows);
# - written: written, none cached (an image the guest rewrites; an O_DIRECT
#   daemon's usual case);
# - sparse: every block a hole (``qemu-img create -f raw``, ``truncate``: a new
#   image): each write allocates;
# - falloc: every block allocated and unwritten (``qemu-img create -o
#   preallocation=falloc``, ``fallocate``).
# With O_DIRECT they differ for io_uring: the kernel submits a write inline with
# NOWAIT, and an O_DIRECT write over cached pages (which it must invalidate) or into a
# hole (which it must allocate) cannot: it goes to io_uring's worker threads.
IMAGE_KINDS = ("cached", "written", "sparse", "falloc")
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
QSIZE = 128
MEM = 96 << 20
# Each front-end's rings are in guest RAM of its own below BUF_BASE; the requests'
# headers and buffers, from BUF_BASE to MEM, are in one memfd that every front-end
# maps: every daemon moves its data into and out of the same pages.  How fast a
# 1 MiB O_DIRECT read lands depends on which pages it lands in (the same process
# reading into one of four fresh memfds: 0.55-1.0x the fastest, the order kept
# over reps), which with a memfd per front-end was counted for or against a daemon.
BUF_BASE = 4 << 20


class Target:
    """One daemon behind a front-end, able to run block requests at a queue depth."""

    ring = 0

    def __init__(self, sock: str, rings: int, buffers_fd: int) -> None:
        self.fe = Frontend.connect(sock, timeout=30)
        self.fe.negotiate()
        self.fe.add_memory(BUF_BASE)
        self.fe.add_memory(MEM - BUF_BASE, BUF_BASE, fd=buffers_fd)
        self.fe.set_mem_table()
        for i in range(rings):
            ring = self.fe.setup_ring(i, QSIZE)
            assert ring.mock.data_addr + 0x10000 <= BUF_BASE, "the rings' RAM is too small"
        self.mock = self.fe.rings[self.ring].mock

    def header(self, write: bool, lba: int, blocks: int) -> bytes:
        """The request header of one transfer (its protocol's encoding)."""
        raise NotImplementedError

    def descs(self, slot: int, write: bool, blocks: int) -> list[RawDesc]:
        """The chain of ``slot``: its header, response and data buffers."""
        raise NotImplementedError

    def run(self, ops: list[tuple[int, int]], write: bool, depth: int) -> float:
        """Run ``ops`` ((lba, blocks) each) ``depth`` at a time; returns seconds.

        The headers are encoded before the clock starts, and a slot's descriptors
        are written once per shape: the timed loop makes the same few steps per
        request whatever the protocol (writing a 51-byte virtio-scsi header in
        Python costs the front-end more than a 16-byte virtio-blk one, which on
        the rows where the front-end is the bound was counted against the
        daemon), and a light front-end lets the daemon's own cost show.
        """
        fe, mock, ring = self.fe, self.mock, self.ring
        mem_write = fe.memory.write
        headers = [self.header(write, lba, blocks) for lba, blocks in ops]
        shape: dict[int, int] = {}  # slot -> blocks its descriptors are written for
        head_of = [slot * 3 for slot in range(depth)]
        hdr_of = [_slot_bufs(slot)[0] for slot in range(depth)]
        free = list(range(depth))
        slot_of: dict[int, int] = {}
        nxt = 0
        inflight = 0
        t0 = time.perf_counter()
        while nxt < len(ops) or inflight:
            while free and nxt < len(ops):
                slot = free.pop()
                blocks = ops[nxt][1]
                mem_write(hdr_of[slot], headers[nxt])
                nxt += 1
                if shape.get(slot) != blocks:
                    mock.build_desc_chain(self.descs(slot, write, blocks), start=head_of[slot])
                    shape[slot] = blocks
                head = head_of[slot]
                slot_of[head] = slot
                mock.add_avail(head)
                inflight += 1
            fe.kick(ring)
            for head, _ in fe.wait_used(ring, 1, 30):
                free.append(slot_of.pop(head))
                inflight -= 1
        return time.perf_counter() - t0

    def close(self) -> None:
        self.fe.close()


def _slot_bufs(slot: int) -> tuple[int, int, int]:
    base = BUF_BASE + slot * ((1 << 20) + 4096)
    return base, base + 256, base + 4096  # header, status/response, data


class Ours(Target):
    ring = 2

    def header(self, write: bool, lba: int, blocks: int) -> bytes:
        return st.cmd_req(st.write10(lba, blocks) if write else st.read10(lba, blocks))

    def descs(self, slot: int, write: bool, blocks: int) -> list[RawDesc]:
        hdr, resp, data = _slot_bufs(slot)
        n = blocks * 512
        if write:
            return [RawDesc(hdr, 51, 0, 0), RawDesc(data, n, 0, 0), RawDesc(resp, 108, VIRTQ_DESC_F_WRITE, 0)]
        return [
            RawDesc(hdr, 51, 0, 0),
            RawDesc(resp, 108, VIRTQ_DESC_F_WRITE, 0),
            RawDesc(data, n, VIRTQ_DESC_F_WRITE, 0),
        ]


class Qsd(Target):
    ring = 0

    def header(self, write: bool, lba: int, blocks: int) -> bytes:
        return struct.pack("<IIQ", 1 if write else 0, 0, lba)

    def descs(self, slot: int, write: bool, blocks: int) -> list[RawDesc]:
        hdr, status, data = _slot_bufs(slot)
        n = blocks * 512
        return [
            RawDesc(hdr, 16, 0, 0),
            RawDesc(data, n, 0 if write else VIRTQ_DESC_F_WRITE, 0),
            RawDesc(status, 1, VIRTQ_DESC_F_WRITE, 0),
        ]


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid`` so far (``schedstat``: nanoseconds, not
    ticks), io_uring's and QEMU's worker threads included."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that just exited
    return total / 1e9


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` (the threads it makes later inherit it) on ``cpus``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):  # a thread that just exited
            os.sched_setaffinity(int(tid), cpus)


def _fallocate(fd: int, mode: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.fallocate(fd, mode, ctypes.c_long(0), ctypes.c_long(IMAGE_SIZE)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(mode={mode:#x}) of the image failed")


def prepare_image(img: Path, kind: str, data: bytes) -> None:
    """Put the image's blocks in the state ``kind`` names (``IMAGE_KINDS``), through
    the daemons' open fds' file: written back, holes punched or unwritten extents made,
    and the page cache filled or emptied."""
    fd = os.open(img, os.O_RDWR)
    try:
        if kind in ("cached", "written") and os.lseek(fd, 0, os.SEEK_HOLE) < IMAGE_SIZE:
            os.pwrite(fd, data, 0)  # a hole left by a sparse or falloc run before
        elif kind == "sparse":
            _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE)
        elif kind == "falloc":
            _fallocate(fd, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE)
        os.fsync(fd)
        if kind == "cached":
            os.pread(fd, IMAGE_SIZE, 0)
        else:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def workloads(seed: int = 1) -> dict[str, tuple[list[tuple[int, int]], bool, int]]:
    rnd = random.Random(seed)
    nblocks = IMAGE_SIZE // 512
    rand4k = [(rnd.randrange(nblocks // 8) * 8, 8) for _ in range(4000)]
    seq1m = [(i * 2048 % nblocks, 2048) for i in range(192)]
    return {
        "4 KiB random read, QD1": (rand4k[:1500], False, 1),
        "4 KiB random read, QD32": (rand4k, False, 32),
        "4 KiB random write, QD1": (rand4k[:1500], True, 1),
        "4 KiB random write, QD32": (rand4k, True, 32),
        "1 MiB sequential read, QD4": (seq1m, False, 4),
        "1 MiB sequential write, QD4": (seq1m, True, 4),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--direct",
        action="store_true",
        help="O_DIRECT: ours and the Python path with --direct, qemu-storage-daemon with "
        "cache.direct=on; the Rust daemon has no such mode (n/a)",
    )
    ap.add_argument(
        "--alt",
        default="",
        help="also run ours with these engine attributes (name=int,...; defer_taskrun is the "
        "engine's constructor argument), as 'alt' in the tables",
    )
    ap.add_argument(
        "--alt-env",
        default="",
        help="also run ours with these environment variables (NAME=value,...), as 'alt' (with --alt: both)",
    )
    ap.add_argument(
        "--placements",
        action="store_true",
        help="also run the 4 KiB workloads with the front-end and the daemon pinned to one CPU, "
        "and to two different CPUs (rows 'one CPU', 'two CPUs')",
    )
    ap.add_argument(
        "--image",
        default="",
        help="what the image's blocks are before each write run, comma-separated for a row each: "
        f"{', '.join(IMAGE_KINDS)} (default: cached, and written with --direct; reads always see "
        "written blocks, cached or not as the mode)",
    )
    ap.add_argument("--only", default="", help="run the workloads whose name contains this")
    ap.add_argument(
        "--skip",
        default="",
        help="daemons left out (comma-separated: ours, qsd, qsd-uring, python, rust, alt)",
    )
    args = ap.parse_args()
    read_kind = "written" if args.direct else "cached"
    write_kinds = [k for k in args.image.split(",") if k] or [read_kind]
    for kind in write_kinds:
        if kind not in IMAGE_KINDS:
            ap.error(f"--image: {kind!r} is not one of {', '.join(IMAGE_KINDS)}")
    skip = set(filter(None, args.skip.split(",")))
    alt_attrs = {k: int(v) for k, v in (kv.split("=") for kv in args.alt.split(",") if kv)}
    alt_env = dict(kv.split("=", 1) for kv in args.alt_env.split(",") if kv)
    alt_label = ", ".join(filter(None, [args.alt, args.alt_env]))
    direct = ["--direct"] if args.direct else []
    qsd_cache = ",cache.direct=on" if args.direct else ""
    qsd_bin = shutil.which("qemu-storage-daemon")
    if qsd_bin is None:
        print("qemu-storage-daemon not installed: no reference", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="scsi-bench-"))
    img = tmp / "disk.img"
    data = os.urandom(IMAGE_SIZE)
    img.write_bytes(data)
    prepare_image(img, read_kind, data)
    ours_sock, qsd_sock, pidfile = str(tmp / "scsi.sock"), str(tmp / "blk.sock"), tmp / "qsd.pid"
    ours_proc = subprocess.Popen(
        [sys.executable, "-m", "vhost_backends.cli.scsi", "-s", ours_sock, *direct, str(img)],
        stderr=subprocess.DEVNULL,
    )
    py_sock = str(tmp / "python.sock")
    py_proc = subprocess.Popen(
        [sys.executable, "-c", PYTHON_PATH, "-s", py_sock, *direct, str(img)], stderr=subprocess.DEVNULL
    )
    alt_sock = str(tmp / "alt.sock")
    alt_proc = (
        subprocess.Popen(
            [sys.executable, "-c", ALT_PATH.format(attrs=alt_attrs), "-s", alt_sock, *direct, str(img)],
            stderr=subprocess.DEVNULL,
            env={**os.environ, **alt_env},
        )
        if alt_attrs or alt_env
        else None
    )
    rust_bin = Path(os.environ.get("VHOST_DEVICE_RUST_BIN", "/nonexistent")) / "vhost-device-scsi"
    rust_sock = str(tmp / "rust.sock")
    rust_proc = (
        subprocess.Popen([str(rust_bin), "-s", rust_sock, str(img)], stderr=subprocess.DEVNULL)
        if rust_bin.is_file() and not args.direct
        else None
    )
    subprocess.run(
        [
            qsd_bin,
            "--daemonize",
            "--pidfile",
            str(pidfile),
            "--blockdev",
            f"driver=file,node-name=file0,filename={img}{qsd_cache}",
            "--blockdev",
            "driver=raw,node-name=disk0,file=file0",
            "--export",
            f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={qsd_sock},writable=on",
        ],
        check=True,
        timeout=30,
    )
    qsd_pid = int(pidfile.read_text())
    uring_pid: int | None = None
    try:
        uring_sock, uring_pidfile = str(tmp / "blk-uring.sock"), tmp / "qsd-uring.pid"
        subprocess.run(
            [
                qsd_bin,
                "--daemonize",
                "--pidfile",
                str(uring_pidfile),
                "--blockdev",
                f"driver=file,node-name=file0,filename={img},aio=io_uring{qsd_cache}",
                "--blockdev",
                "driver=raw,node-name=disk0,file=file0",
                "--export",
                f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={uring_sock},writable=on",
            ],
            check=True,
            timeout=30,
        )
        uring_pid = int(uring_pidfile.read_text())
        deadline = time.monotonic() + 30
        socks = [ours_sock, py_sock] + ([rust_sock] if rust_proc else []) + ([alt_sock] if alt_proc else [])
        while not all(os.path.exists(p) for p in socks):
            if time.monotonic() > deadline:
                raise SystemExit("vhost-device-scsi did not listen")
            time.sleep(0.05)
        bufs = os.memfd_create("scsi-bench-buffers", os.MFD_CLOEXEC)
        os.ftruncate(bufs, MEM - BUF_BASE)
        # Allocated, as a running guest's RAM is (or QEMU's prealloc=on): a daemon
        # registers guest RAM for O_DIRECT only once it is (``--fixed-buffers``).
        with mmap.mmap(bufs, MEM - BUF_BASE) as ram:
            zeros = bytes(16 << 20)
            for at in range(0, len(ram), len(zeros)):
                ram[at : at + len(zeros)] = zeros[: len(ram) - at]
        ours = Ours(ours_sock, 3, bufs)
        py = Ours(py_sock, 3, bufs)
        qsd = Qsd(qsd_sock, 1, bufs)
        qsd_uring = Qsd(uring_sock, 1, bufs)
        rust = Ours(rust_sock, 3, bufs) if rust_proc else None
        alt = Ours(alt_sock, 3, bufs) if alt_proc else None
        os.close(bufs)  # each front-end keeps its own duplicate
        results: dict[str, dict[str, list[float]]] = {}
        cpu_us: dict[str, dict[str, list[float]]] = {}
        pids = {"ours": ours_proc.pid, "qsd": qsd_pid, "qsd-uring": uring_pid, "python": py_proc.pid}
        if rust_proc is not None:
            pids["rust"] = rust_proc.pid
        if alt_proc is not None:
            pids["alt"] = alt_proc.pid
        jobs: list[tuple[str, list[tuple[int, int]], bool, int, tuple[int, int] | None, str]] = []
        for base, (ops, write, depth) in workloads().items():
            for kind in write_kinds if write else [read_kind]:
                name = f"{base}, {kind}" if write else base
                jobs.append((name, ops, write, depth, None, kind))
                if args.placements and name.startswith("4 KiB") and (os.cpu_count() or 1) >= 2:
                    # Where the scheduler puts the front-end and the daemon decides a
                    # 4 KiB run: on one CPU every request (depth 1) or batch (depth 32)
                    # is two context switches, on two a wake-up of the other CPU each
                    # way, against two CPUs' work at once (docs/performance.md).
                    jobs.append((f"{name}, one CPU", ops, write, depth, (0, 0), kind))
                    jobs.append((f"{name}, two CPUs", ops, write, depth, (0, 1), kind))
        everywhere = os.sched_getaffinity(0)
        for name, ops, write, depth, cpus, kind in jobs:
            if args.only not in name:
                continue
            nbytes = sum(b for _, b in ops) * 512
            res = results.setdefault(
                name, {"ours": [], "qsd": [], "qsd-uring": [], "python": [], "rust": [], "alt": []}
            )
            cpu = cpu_us.setdefault(name, {k: [] for k in res})
            runner: dict[str, Callable[[], float]] = {
                "ours": lambda ops=ops, w=write, d=depth: ours.run(ops, w, d),
                "qsd": lambda ops=ops, w=write, d=depth: qsd.run(ops, w, d),
                "qsd-uring": lambda ops=ops, w=write, d=depth: qsd_uring.run(ops, w, d),
            }
            if not args.direct:
                # The Python path has no O_DIRECT: its page-cache writes would also
                # make the others' O_DIRECT writes wait for the cache.
                runner["python"] = lambda ops=ops, w=write, d=depth: py.run(ops, w, d)
            if rust is not None:
                runner["rust"] = lambda ops=ops, w=write, d=depth: rust.run(ops, w, d)
            if alt is not None:
                runner["alt"] = lambda ops=ops, w=write, d=depth: alt.run(ops, w, d)
            for who in skip & set(runner) - {"ours"}:
                del runner[who]
            order = list(runner)
            for rep in range(args.reps):
                # Shuffled (seeded), so that no daemon always follows the same one:
                # where the one before left the front-end and its own threads
                # decides a depth-1 run (docs/performance.md); and the dirty pages
                # of the last run written back and the image's blocks put back in
                # the row's state (``--image``) before each timed run.
                for who in random.Random(rep).sample(order, len(order)):
                    os.sync()
                    prepare_image(img, kind, data)
                    if cpus is not None:
                        os.sched_setaffinity(0, {cpus[0]})
                        pin(pids[who], {cpus[1]})
                    c0 = cpu_seconds(pids[who])
                    res[who].append(nbytes / runner[who]() / (1 << 20))
                    cpu[who].append((cpu_seconds(pids[who]) - c0) / len(ops) * 1e6)
                    if cpus is not None:
                        os.sched_setaffinity(0, everywhere)
                        pin(pids[who], everywhere)
        ours.close()
        qsd.close()
        qsd_uring.close()
        py.close()
        for other in (rust, alt):
            if other is not None:
                other.close()
        day = time.strftime("%Y-%m-%d")
        mode = "O_DIRECT" if args.direct else "page cache"
        alt_head = f" | ours / alt ({alt_label})" if alt is not None else ""
        alt_rule = " --- |" if alt is not None else ""
        print(
            f"| vhost-device-scsi, {mode} ({day}) | ours / Rust | ours / qsd aio=threads "
            f"| ours / qsd aio=io_uring | ours / Python path{alt_head} |"
        )
        print("| --- | --- | --- | --- | --- |" + alt_rule)

        def ratio(vals: dict[str, list[float]], who: str, inverse: bool = False) -> str:
            if not vals[who]:
                return "n/a"
            o, other = statistics.median(vals["ours"]), statistics.median(vals[who])
            return f"{other / o if inverse else o / other:.2f}x"

        for name, res in results.items():
            cols = " | ".join(ratio(res, k) for k in ("rust", "qsd", "qsd-uring", "python"))
            a = f" | {ratio(res, 'alt')}" if alt is not None else ""
            print(f"| {name} | {cols}{a} |")
        print()
        print(
            f"| daemon CPU per request, {mode} ({day}) | ours (µs) | Rust / ours | qsd aio=threads / ours "
            f"| qsd aio=io_uring / ours | Python path / ours{' | alt / ours' if alt is not None else ''} |"
        )
        print("| --- | --- | --- | --- | --- | --- |" + alt_rule)
        for name, cpu in cpu_us.items():
            cols = " | ".join(ratio(cpu, k, inverse=True) for k in ("rust", "qsd", "qsd-uring", "python"))
            a = f" | {ratio(cpu, 'alt', inverse=True)}" if alt is not None else ""
            print(f"| {name} | {statistics.median(cpu['ours']):.1f} | {cols}{a} |")
        for name, res in results.items():
            print(name, {k: [round(v, 1) for v in vals] for k, vals in res.items()}, file=sys.stderr)
            per_run = {k: [round(v, 1) for v in vals] for k, vals in cpu_us[name].items()}
            print(name, "CPU µs/request", per_run, file=sys.stderr)
    finally:
        for proc in (ours_proc, py_proc, rust_proc, alt_proc):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(10)
        os.kill(qsd_pid, signal.SIGTERM)
        if uring_pid is not None:
            os.kill(uring_pid, signal.SIGTERM)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
