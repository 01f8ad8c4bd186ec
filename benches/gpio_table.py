"""Daemon-level figures of ``vhost-device-gpio`` (simulated chip), in one table.

Run by hand (not by CI)::

    python benches/gpio_table.py [--reps 5] [--secs 0.5] [--edges 200]

Every figure is a median (min..max) over ``--reps`` repetitions, the daemons'
repetitions interleaved so that machine noise hits them alike, and each is
reported beside a reference measured in the same run:

* **request round trip** of GET_VALUE and SET_VALUE (one chain per kick, the
  front-end waiting for its used entry: a guest driver's synchronous request)
  through our Python front-end against ``vhost-device-gpio -l s8``, as a rate and as
  a ratio to the **rng round trip** (a 1-byte request to ``vhost-device-rng``, the
  framework's floor: no parsing, no device logic) measured by the same front-end;
* **edge-to-completion latency**: an eventq buffer waits on a line with
  IRQ_TYPE_EDGE_BOTH; the clock starts before the front-end writes ``set`` to the
  ``--sim-control`` socket and stops when the eventq's call eventfd fires (the
  control thread's socket read, the eventfd to the device loop, the device's
  completion and the notification).  Median and 99th percentile over ``--edges``
  edges per repetition, and the median's ratio to the GET_VALUE round trip.

* **device cost per request, in-process** (``--callgrind``): instructions per
  GET_VALUE / SET_VALUE chain through ``GpioDevice.process_queue`` on the kit's
  ``DeviceRig`` (publish, pop, parse, answer, add_used), against a 1-byte
  virtio-rng request through ``RngDevice.process_queue`` the same way, counted by
  ``valgrind --tool=callgrind`` as the difference between two runs of different
  lengths (start-up cancels out): deterministic, whatever the machine's load.

The Rust daemon: n/a.  Upstream's gpio crate needs the ``libgpiod`` crates, which
Debian's packaged crate set lacks (``../shared/tools/README.md``), so it cannot be
built offline here.  Upstream's edge delivery is a thread per waiting line polling
libgpiod with a 1 s timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(REPO), str(REPO / "benches")) if p not in sys.path]

from daemon_table import RngDaemon, Stat, timed  # noqa: E402

from vhost_backends.frontend import Frontend  # noqa: E402
from virtio_queue.testing import VIRTQ_DESC_F_WRITE, RawDesc  # noqa: E402

DEADLINE = 10.0
RING = 64
NGPIO = 8
GET_VALUE, SET_DIRECTION, SET_VALUE, IRQ_TYPE = 4, 3, 5, 6


class GpioDaemon:
    """``vhost-device-gpio -l s8 --sim-control`` with errors-only logging."""

    def __init__(self, tmp: str) -> None:
        self.sock = os.path.join(tmp, "gpio.sock")
        self.ctl = os.path.join(tmp, "gpio.ctl")
        script = shutil.which("vhost-device-gpio")
        cmd = [script] if script else [sys.executable, "-m", "vhost_backends.cli.gpio"]
        env = dict(os.environ, PYTHONPATH=str(REPO), RUST_LOG="error")
        self.log = os.path.join(tmp, "gpio.log")
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [*cmd, "-s", self.sock, "-l", f"s{NGPIO}", "--sim-control", self.ctl],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
            )
        end = time.monotonic() + DEADLINE
        while not os.path.exists(self.sock + "0"):
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"gpio daemon did not start: {Path(self.log).read_text()[-2000:]}")
            time.sleep(0.001)

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(DEADLINE)


class GpioClient:
    """Our front-end on the gpio socket with prebuilt chains, one request per kick.

    Slot ``i`` of the requestq is a two-descriptor chain (8-byte request, 2-byte
    response), rewritten only when the request changes; a round trip publishes its
    head, sets ``used_event`` so that its used entry interrupts (EVENT_IDX), kicks,
    and waits on the call eventfd until ``used->idx`` moved.
    """

    def __init__(self, path: str) -> None:
        fe = Frontend.connect(path, timeout=DEADLINE)
        fe.negotiate()
        fe.add_memory(4 << 20)
        fe.set_mem_table()
        self.fe = fe
        self.rings = [fe.setup_ring(i, RING) for i in range(2)]
        self.polls = []
        for ring in self.rings:
            p = select.poll()
            p.register(ring.call_fd, select.POLLIN)
            self.polls.append(p)
        mock = self.rings[0].mock
        self.req = mock.alloc(8 * RING)
        self.resp = mock.alloc(2 * RING)
        # Descriptors 2i, 2i+1 form the chain of head 2i.
        mock.write_descs(
            0,
            [
                d
                for i in range(RING // 2)
                for d in (
                    RawDesc(self.req + 8 * i, 8, 1, 2 * i + 1),  # VIRTQ_DESC_F_NEXT
                    RawDesc(self.resp + 2 * i, 2, VIRTQ_DESC_F_WRITE, 0),
                )
            ],
        )
        self.next = [0, 0]
        self.ev_req = self.rings[1].mock.alloc(2 * RING)
        self.ev_resp = self.rings[1].mock.alloc(RING)
        self.rings[1].mock.write_descs(
            0,
            [
                d
                for i in range(RING // 2)
                for d in (
                    RawDesc(self.ev_req + 2 * i, 2, 1, 2 * i + 1),
                    RawDesc(self.ev_resp + i, 1, VIRTQ_DESC_F_WRITE, 0),
                )
            ],
        )

    def _submit(self, index: int, head: int) -> int:
        mock = self.rings[index].mock
        before = mock.used_idx()
        mock.set_used_event(before)
        mock.publish(array("H", [head]))
        self.fe.kick(index)
        return before

    def _wait(self, index: int, before: int) -> None:
        mock = self.rings[index].mock
        while mock.used_idx() == before:
            if not self.polls[index].poll(int(DEADLINE * 1000)):
                raise TimeoutError(f"ring {index}: no used entry")
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.rings[index].call_fd)
        mock.last_used = mock.used_idx()

    def request(self, rtype: int, line: int, value: int = 0) -> bytes:
        slot = self.next[0] % (RING // 2)
        self.next[0] += 1
        self.fe.memory.write(self.req + 8 * slot, struct.pack("<HHI", rtype, line, value))
        self._wait(0, self._submit(0, 2 * slot))
        return self.fe.memory.read(self.resp + 2 * slot, 2)

    def round_trips(self, rtype: int, value: int, n: int) -> int:
        """``n`` round trips of one message on line 0 (request bytes written once)."""
        slot = 0
        self.fe.memory.write(self.req, struct.pack("<HHI", rtype, 0, value))
        for _ in range(n):
            self._wait(0, self._submit(0, 2 * slot))
        if self.fe.memory.read(self.resp, 1) != b"\x00":
            raise RuntimeError(f"request type {rtype} answered ERR")
        return n

    def unmask(self, line: int) -> tuple[int, int]:
        slot = self.next[1] % (RING // 2)
        self.next[1] += 1
        self.fe.memory.write(self.ev_req + 2 * slot, struct.pack("<H", line))
        return self._submit(1, 2 * slot), slot

    def close(self) -> None:
        self.fe.close()


class RngRoundTrip:
    """1-byte requests to vhost-device-rng, one per kick (the framework's floor)."""

    def __init__(self, path: str) -> None:
        from daemon_table import RngClient  # noqa: PLC0415 - the helper library

        self.client = RngClient(path, req_size=1, ring_size=RING)

    def round_trips(self, n: int) -> int:
        for _ in range(n):
            self.client.batch(1)
        return n

    def close(self) -> None:
        self.client.close()


def edge_latencies(client: GpioClient, ctl: socket.socket, count: int) -> list[float]:
    """Seconds from writing ``set`` to the control socket to the eventq's call."""
    reader = ctl.makefile("r")
    out = []
    level = 1
    try:
        for _ in range(count):
            before, _slot = client.unmask(1)
            # The buffer must be held before the edge: a GET_VALUE round trip orders it.
            client.request(GET_VALUE, 1)
            t0 = time.perf_counter()
            ctl.sendall(f"set 0 1 {level}\n".encode())
            client._wait(1, before)
            out.append(time.perf_counter() - t0)
            if reader.readline() != "ok\n":
                raise RuntimeError("control socket refused set")
            level ^= 1
    finally:
        reader.close()
    return out


def inprocess_run(kind: str, n: int) -> None:
    """``n`` requests of ``kind`` (get, set, rng) through ``process_queue`` in-process."""
    from virtio_devices.gpio import GpioDevice  # noqa: PLC0415
    from virtio_devices.hosts.files import FileEntropySource  # noqa: PLC0415
    from virtio_devices.hosts.gpio import SimGpioChip  # noqa: PLC0415
    from virtio_devices.rng import RngDevice  # noqa: PLC0415
    from virtio_devices.testing import DeviceRig  # noqa: PLC0415

    if kind == "rng":
        rig = DeviceRig(RngDevice(FileEntropySource("/dev/urandom")), queue_size=RING, event_idx=True)
        buf = rig.alloc(0, 1)
        head = rig.add_chain(0, [RawDesc(buf, 1, VIRTQ_DESC_F_WRITE, 0)])
    else:
        rig = DeviceRig(GpioDevice(SimGpioChip(NGPIO)), queue_size=RING, event_idx=True)
        req = rig.alloc(0, 8)
        resp = rig.alloc(0, 2)
        head = rig.add_chain(0, [RawDesc(req, 8, 0, 0), RawDesc(resp, 2, VIRTQ_DESC_F_WRITE, 0)])
        for rtype, value in ((SET_VALUE, 1), (SET_DIRECTION, 1)):
            rig.memory.write(req, struct.pack("<HHI", rtype, 0, value))
            rig.kick(0)
            rig.mock.publish(array("H", [head]))
        rig.memory.write(req, struct.pack("<HHI", GET_VALUE if kind == "get" else SET_VALUE, 0, 1))
    rig.kick(0)
    heads = array("H", [head])
    mock, process = rig.mock, rig.device.process_queue
    for _ in range(n):
        mock.publish(heads)
        process(0)
    if kind != "rng" and rig.read(resp, 1) != b"\x00":
        raise RuntimeError(f"{kind}: the request was answered ERR")
    rig.close()


def callgrind_per_request(kind: str, n1: int = 1000, n2: int = 4000) -> float:
    """Instructions per request of ``kind``: callgrind totals of two runs, differenced."""
    totals = []
    with tempfile.TemporaryDirectory(prefix="gpio-cg-") as tmp:
        for n in (n1, n2):
            out = os.path.join(tmp, f"cg.{n}")
            env = dict(os.environ, PYTHONPATH=str(REPO), RUST_LOG="error")
            cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__]
            subprocess.run(
                [*cmd, "--inprocess", kind, str(n)],
                check=True,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            with open(out) as f:
                total = next(int(line.split()[1]) for line in f if line.startswith("totals:"))
            totals.append(total)
    return (totals[1] - totals[0]) / (n2 - n1)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--secs", type=float, default=0.5)
    ap.add_argument("--edges", type=int, default=200)
    ap.add_argument("--callgrind", action="store_true", help="also count instructions per request in-process")
    ap.add_argument("--inprocess", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.inprocess:
        inprocess_run(args.inprocess[0], int(args.inprocess[1]))
        return 0
    if args.callgrind:
        counts = {kind: callgrind_per_request(kind) for kind in ("rng", "get", "set")}
        print("| in-process, instructions per request (callgrind) | count | ratio to rng |")
        print("|---|---|---|")
        for kind, name in (("rng", "rng 1-byte request"), ("get", "GET_VALUE"), ("set", "SET_VALUE")):
            print(f"| {name} | {counts[kind]:.0f} | {counts[kind] / counts['rng']:.2f} |")
        print()
    with tempfile.TemporaryDirectory(prefix="gpio-bench-") as tmp:
        gd = GpioDaemon(tmp)
        rd = RngDaemon("ours", tmp, env={"RUST_LOG": "error"})
        rd.wait_listening(probe=False)
        g = GpioClient(gd.sock + "0")
        r = RngRoundTrip(rd.path(0))
        ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ctl.connect(gd.ctl)
        try:
            assert g.request(SET_VALUE, 0, 1) == b"\x00\x00"
            assert g.request(SET_DIRECTION, 0, 1) == b"\x00\x00"
            assert g.request(SET_DIRECTION, 1, 2) == b"\x00\x00"
            assert g.request(IRQ_TYPE, 1, 3) == b"\x00\x00"
            rates: dict[str, list[float]] = {"rng": [], "get": [], "set": []}
            lat_med: list[float] = []
            lat_p99: list[float] = []
            for _ in range(args.reps):
                n, s = timed(r.round_trips, 50, args.secs)
                rates["rng"].append(n / s)
                n, s = timed(lambda k: g.round_trips(GET_VALUE, 0, k), 50, args.secs)
                rates["get"].append(n / s)
                n, s = timed(lambda k: g.round_trips(SET_VALUE, 1, k), 50, args.secs)
                rates["set"].append(n / s)
                lats = sorted(edge_latencies(g, ctl, args.edges))
                lat_med.append(statistics.median(lats) * 1e6)
                lat_p99.append(lats[min(len(lats) - 1, int(len(lats) * 0.99))] * 1e6)
        finally:
            ctl.close()
            g.close()
            r.close()
            rc = gd.stop()
            rd.stop()
    rng, get, set_ = (Stat(rates[k]) for k in ("rng", "get", "set"))
    get_us = [1e6 / x for x in rates["get"]]
    print(f"vhost-device-gpio, simulated chip: {args.reps} reps, {args.secs} s each, {args.edges} edges/rep")
    print(f"load average: {os.getloadavg()[0]:.2f}")
    print()
    print("| figure | ours | reference (same run) | ratio |")
    print("|---|---|---|---|")
    print(f"| rng 1-byte round trip (floor) | {rng.fmt()} /s | - | 1.00 |")
    for name, st, raw in (("GET_VALUE", get, rates["get"]), ("SET_VALUE", set_, rates["set"])):
        ratio = Stat([a / b for a, b in zip(raw, rates["rng"], strict=True)])
        print(f"| {name} round trip | {st.fmt()} /s | rng {rng.fmt()} /s | {ratio.fmt('.2f')} |")
    ratio = Stat([a / b for a, b in zip(lat_med, get_us, strict=True)])
    print(
        f"| edge -> eventq completion, median | {Stat(lat_med).fmt('.0f')} µs | "
        f"GET_VALUE round trip {Stat(get_us).fmt('.0f')} µs | {ratio.fmt('.2f')} |"
    )
    print(f"| edge -> eventq completion, p99 | {Stat(lat_p99).fmt('.0f')} µs | - | - |")
    print("| Rust daemon | n/a (libgpiod crates missing from Debian's crate set) | | |")
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
