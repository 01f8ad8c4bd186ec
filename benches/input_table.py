"""Event figures of ``vhost-device-input`` on ``sim:keyboard``, each beside a reference.

Run by hand (CI runs :mod:`bench_input` once, as a smoke test)::

    python benches/input_table.py [--reps 5] [--groups 500] [--pings 200]

Every figure is a median (min..max) over ``--reps`` repetitions, the repetitions of
a figure and of its reference interleaved so that machine noise hits them alike:

* **latency**, host -> eventq used ring: one key press (``KEY`` on the control
  socket: EV_KEY and SYN_REPORT) until our front-end
  (:class:`vhost_backends.frontend.Frontend`) sees both events in its used ring,
  buffers always posted.  Reference: the round trip of an ``INFO`` line on the same
  control socket (the injection path alone, without the device);
* **events per second**: ``--groups`` key groups (two events each) sent in one write
  with a buffer posted for every event, until the last is used.  Reference: the same
  device in-process (:class:`virtio_devices.testing.DeviceRig`, no transport, no
  control socket), the same groups injected and delivered.

Upstream's daemon reads a real evdev node (no simulated device), so it has no
column here: ``benches/input_uinput_table.py`` compares the two daemons on the same
uinput devices inside a guest that plays the host.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from daemon_process import DaemonProcess  # noqa: E402

from vhost_backends.frontend import Frontend  # noqa: E402
from virtio_devices.hosts.input import EV_KEY, EV_SYN, SYN_REPORT, SimInputHost  # noqa: E402
from virtio_devices.input import InputDevice  # noqa: E402
from virtio_devices.testing import DeviceRig  # noqa: E402
from virtio_queue.testing import VIRTQ_DESC_F_WRITE, RawDesc  # noqa: E402

RING = 1024
TIMEOUT = 30.0


def rust_status() -> str:
    """Why upstream's daemon is not in the table (it needs a real evdev node)."""
    return "n/a: no simulated device upstream (benches/input_uinput_table.py compares on uinput)"


class Bench:
    """Our daemon on sim:keyboard, a front-end with a 1024-entry eventq, the control socket."""

    def __init__(self, tmp: str) -> None:
        sock = f"{tmp}/in.sock"
        script = shutil.which("vhost-device-input")
        cmd = [script] if script else [sys.executable, "-m", "vhost_backends.cli.input"]
        argv = [*cmd, "-s", sock, "-e", "sim:keyboard"]
        self.daemon = DaemonProcess(f"{sock}0", argv, env={"RUST_LOG": os.environ.get("RUST_LOG", "error")})
        deadline = time.monotonic() + TIMEOUT
        while not os.path.exists(f"{sock}0.ctl") or not os.path.exists(f"{sock}0"):
            if time.monotonic() > deadline or not self.daemon.alive():
                raise RuntimeError("daemon did not start")
            select.select([], [], [], 0.01)
        self.fe = Frontend.connect(f"{sock}0", timeout=TIMEOUT)
        self.fe.negotiate()
        self.fe.add_memory(8 << 20)
        self.fe.set_mem_table()
        self.rings = [self.fe.setup_ring(i, RING) for i in range(2)]
        self.ctl = socket.socket(socket.AF_UNIX)
        self.ctl.connect(f"{sock}0.ctl")
        self.buf = b""
        self.mock = self.rings[0].mock
        self.gpa = [self.mock.alloc(8) for _ in range(RING)]
        self.next = 0

    def post(self, n: int) -> None:
        for _ in range(n):
            gpa = self.gpa[self.next % RING]
            self.next += 1
            self.mock.add_chain([RawDesc(gpa, 8, VIRTQ_DESC_F_WRITE, 0)])
        self.fe.kick(0)

    def ask(self, payload: bytes, lines: int) -> None:
        self.ctl.sendall(payload)
        while self.buf.count(b"\n") < lines:
            self.buf += self.ctl.recv(1 << 16)
        self.buf = self.buf.split(b"\n", lines)[-1]

    def close(self) -> None:
        self.ctl.close()
        self.fe.close()
        self.daemon.terminate()


def lat_event(b: Bench, pings: int) -> float:
    """µs per key press, control line sent -> both events used."""
    b.post(2 * pings)
    t0 = time.perf_counter()
    for i in range(pings):
        b.ctl.sendall(b"KEY 30 %d\n" % (i & 1))
        b.fe.wait_used(0, 2, TIMEOUT)
    dt = time.perf_counter() - t0
    b.ask(b"", pings)  # the replies, read off the socket outside the timing
    return dt / pings * 1e6


def lat_info(b: Bench, pings: int) -> float:
    """µs per INFO round trip on the control socket."""
    t0 = time.perf_counter()
    for _ in range(pings):
        b.ask(b"INFO\n", 1)
    return (time.perf_counter() - t0) / pings * 1e6


def rate_daemon(b: Bench, groups: int) -> float:
    """Events per second through the daemon."""
    b.post(2 * groups)
    payload = b"".join(b"KEY 30 %d\n" % (i & 1) for i in range(groups))
    t0 = time.perf_counter()
    b.ctl.sendall(payload)
    b.fe.wait_used(0, 2 * groups, TIMEOUT)
    dt = time.perf_counter() - t0
    b.ask(b"", groups)
    return 2 * groups / dt


def rate_inprocess(groups: int) -> float:
    """Events per second of the same device in-process (no transport)."""
    host = SimInputHost("keyboard")
    events = [ev for i in range(groups) for ev in ((EV_KEY, 30, i & 1), (EV_SYN, SYN_REPORT, 0))]
    try:
        with DeviceRig(InputDevice(host), queue_size=RING, event_idx=True, memory_size=8 << 20) as rig:
            for _ in range(2 * groups):
                rig.add_request(0, writable=[8])
            rig.kick(0)
            t0 = time.perf_counter()
            host.inject(events)
            rig.loop.fire_reader(host.fileno())
            n = len(rig.used(0))
            dt = time.perf_counter() - t0
            if n != 2 * groups:
                raise AssertionError(f"in-process: {n} events used, want {2 * groups}")
    finally:
        host.close()
    return 2 * groups / dt


@contextmanager
def bench() -> Iterator[Bench]:
    with tempfile.TemporaryDirectory(prefix="vdev-input-bench-", dir="/tmp") as tmp:
        b = Bench(tmp)
        try:
            yield b
        finally:
            b.close()


def stat(values: Sequence[float]) -> str:
    return f"{statistics.median(values):10.1f} ({min(values):.1f}..{max(values):.1f})"


def interleave(reps: int, *fns: Callable[[], float]) -> list[list[float]]:
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            out[i].append(fn())
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--groups", type=int, default=500)
    ap.add_argument("--pings", type=int, default=200)
    args = ap.parse_args(argv)
    if 2 * args.groups > RING or 2 * args.pings > RING:
        ap.error(f"--groups and --pings at most {RING // 2}")
    with bench() as b:
        lat_event(b, 20)  # warm up
        ev, info = interleave(args.reps, lambda: lat_event(b, args.pings), lambda: lat_info(b, args.pings))
        daemon, inproc = interleave(
            args.reps, lambda: rate_daemon(b, args.groups), lambda: rate_inprocess(args.groups)
        )
    ratio_lat = [e / i for e, i in zip(ev, info, strict=True)]
    ratio_rate = [d / p for d, p in zip(daemon, inproc, strict=True)]
    rust = rust_status()
    print(f"vhost-device-input on sim:keyboard, {args.reps} interleaved reps, median (min..max)")
    print(f"  latency, key press -> used ring  µs : {stat(ev)}   Rust: {rust}")
    print(f"  reference: control INFO round trip µs: {stat(info)}")
    print(f"  ratio latency / reference            : {stat(ratio_lat)}")
    print(f"  events/s through the daemon          : {stat(daemon)}   Rust: {rust}")
    print(f"  reference: in-process device events/s: {stat(inproc)}")
    print(f"  ratio daemon / in-process            : {statistics.median(ratio_rate):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
