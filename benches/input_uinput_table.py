"""vhost-device-input against the Rust daemon on the same uinput devices, in a guest.

    VHOST_DEVICE_RUST_BIN=DIR .venv/bin/python benches/input_uinput_table.py [--reps 5] [--pings 100]
        [--kicks always|event-idx]

This host has no ``/dev/uinput``; so both daemons run inside a guest that plays the
host (the e2e harness, ``tests/e2e/harness.py``: the host's root over 9p, the
project's venv), on the same two uinput devices made there with python-evdev: a
keyboard (two keys, two LEDs) and an absolute tablet (ABS_X/ABS_Y 0..32767,
BTN_TOUCH, INPUT_PROP_DIRECT).  Each repetition starts one daemon on both
``/dev/input/eventN`` nodes, measures it, and stops it (so that the other
daemon never reads the events meant for this one); the order of the two daemons
alternates round by round.  Both are driven by our front-end
(``tests/integration/input_frontend.py``, :class:`InputGuest`) with a 1024-entry
eventq whose buffers are posted before any event is written.

What is measured, per device:

* **latency**: one group (keyboard: EV_KEY + SYN_REPORT; tablet: ABS_X, ABS_Y,
  BTN_TOUCH + SYN_REPORT) written to the uinput device in one ``write(2)``, until
  the front-end sees the whole group in its used ring; median over ``--pings``;
* **events/s**: 1024 events as bursts of 16 events (one ``write(2)`` each, two
  bursts in flight, so that the kernel's evdev buffer of 64 events never
  overflows), until the last is used;
* **CPU µs/event**: the daemon's user+system time (``/proc/PID/stat``) over all of
  the above, divided by the events it delivered.

Every run checks the events received are the ones written (a lost group fails it).

Upstream's quirks, and what both daemons therefore get: it reads and discards
every event unless VIRTIO_RING_F_EVENT_IDX was negotiated, so the front-end
negotiates everything both offer (EVENT_IDX included); it ignores eventq kicks and
delivers only when the evdev node is readable, so buffers are always posted
before the events are written; it drops what it holds when the ring runs out of
buffers, so the ring never runs out.

Eventq kicks (``--kicks``): "always", the front-end kicks after every repost of
buffers, so each repost wakes the daemon; "event-idx", it kicks only when the
daemon's ``avail_event`` asks for it (VIRTIO 1.2 §2.7.10), as Linux's virtio
driver does in a real guest.

The guest runs under TCG with one vCPU here: the absolute figures are the
emulator's, the ratios are what compare.  Without ``VHOST_DEVICE_RUST_BIN`` (a
directory holding ``vhost-device-input``) the Rust column says n/a.
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

GUEST_SCRIPT = """\
modprobe evdev
modprobe uinput && waitfor /dev/uinput 30 || { echo "uinput failed"; exit 10; }
inhost python benches/input_uinput_table.py --inner @ARGS@
"""

RING = 1024
BURST = 16  # events per write(2): two in flight fill half of evdev's smallest client buffer (64)
TIMEOUT = 120.0
#: struct input_event on 64-bit Linux: struct timeval, type u16, code u16, value s32.
INPUT_EVENT = struct.Struct("=qqHHi")
EV = struct.Struct("<HHi")
EV_SYN, EV_KEY, EV_ABS = 0x00, 0x01, 0x03
KEY_A, BTN_TOUCH, ABS_X, ABS_Y = 30, 0x14A, 0x00, 0x01


def keyboard_group(i: int) -> list[tuple[int, int, int]]:
    return [(EV_KEY, KEY_A, (i + 1) & 1), (EV_SYN, 0, 0)]


def tablet_group(i: int) -> list[tuple[int, int, int]]:
    # Every axis changes each time: the input core drops repeated values.
    v = 1 + i % 30000
    return [(EV_ABS, ABS_X, v), (EV_ABS, ABS_Y, v + 1), (EV_KEY, BTN_TOUCH, (i + 1) & 1), (EV_SYN, 0, 0)]


def to_uinput(events: Sequence[tuple[int, int, int]]) -> bytes:
    return b"".join(INPUT_EVENT.pack(0, 0, t, c, v) for t, c, v in events)


def cpu_seconds(pid: int) -> float:
    """User + system time of process ``pid`` and all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Ring:
    """The eventq of one connection: descriptor ``i`` is buffer ``i`` for good.

    ``kicks`` "always": every repost kicks (the daemon is woken by each);
    "event-idx": a repost kicks only when the daemon's ``avail_event`` asks for
    it (VIRTIO 1.2 §2.7.10), as Linux's virtio driver does
    (``virtqueue_kick_prepare``)."""

    def __init__(self, guest: Any, kicks: str = "always") -> None:
        from virtio_queue.testing import VIRTQ_DESC_F_WRITE, RawDesc  # noqa: PLC0415

        self.g = guest
        self.kicks = kicks
        self.mock = guest.rings[0].mock
        self.gpa = []
        for i in range(RING):
            gpa = self.mock.alloc(8)
            self.mock.build_desc_chain([RawDesc(gpa, 8, VIRTQ_DESC_F_WRITE, 0)], start=i)
            self.gpa.append(gpa)
        self.mock.publish(list(range(RING)))
        guest.fe.kick(0)
        self.avail = RING
        self.wrong = 0

    def wait(self, count: int) -> list[tuple[int, int]]:
        """Wait for ``count`` used entries (the front-end may see more at once)."""
        return self.g.fe.wait_used(0, count, TIMEOUT)

    def repost(self, used: list[tuple[int, int]], want: list[tuple[int, int, int]]) -> None:
        """Check the events of ``used`` against ``want``, then post those buffers again."""
        mem = self.g.fe.memory
        got = [EV.unpack(mem.read(self.gpa[head], 8)) for head, _ in used]
        if got != want:
            raise AssertionError(f"events {got[:8]}..., want {want[:8]}...")
        from virtio_queue.testing import vring_need_event  # noqa: PLC0415

        old = self.avail
        self.avail = (old + len(used)) & 0xFFFF
        self.mock.publish([head for head, _ in used])
        if self.kicks == "always" or vring_need_event(self.mock.avail_event(), self.avail, old):
            self.g.fe.kick(0)


class Side:
    """One daemon on both uinput nodes, for one repetition."""

    def __init__(self, argv: list[str], sock: str, nodes: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [*argv, "-s", sock, "-e", nodes],
            stdin=subprocess.DEVNULL,
            env={**os.environ, "RUST_LOG": "error", **env},
        )
        self.sock = sock
        self.cpu0 = 0.0

    def connect(self, index: int) -> Any:
        from input_frontend import InputGuest  # noqa: PLC0415 - inside the guest only

        path = f"{self.sock}{index}"
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                return InputGuest(path, timeout=TIMEOUT, ring=RING)
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.05)  # start-up only, never in a timed loop

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


class Source:
    """A uinput device and its groups, numbered across the whole run: the input core
    drops an event that repeats the device's state (a key pressed twice, an axis
    at the same value), so group ``i`` always differs from group ``i - 1``."""

    def __init__(self, name: str, dev: Any, group: Any) -> None:
        self.name, self.fd, self.group = name, dev.fd, group
        self.per = len(group(0))
        self.n = 0

    def take(self, groups: int) -> list[tuple[int, int, int]]:
        out = [ev for i in range(self.n, self.n + groups) for ev in self.group(i)]
        self.n += groups
        return out


def latency(ring: Ring, src: Source, pings: int) -> float:
    """Median µs from the write of one group to the uinput device to its last event used."""
    samples = []
    for _ in range(pings):
        events = src.take(1)
        data = to_uinput(events)
        t0 = time.perf_counter()
        os.write(src.fd, data)
        used = ring.wait(len(events))
        samples.append(time.perf_counter() - t0)
        ring.repost(used, events)
    return statistics.median(samples) * 1e6


def rate(ring: Ring, src: Source) -> tuple[float, int]:
    """Events per second, and events: RING events as bursts of BURST, two in flight."""
    groups_per_burst = BURST // src.per
    size = groups_per_burst * src.per
    bursts = RING // size
    want: list[tuple[int, int, int]] = []
    data = []
    for _ in range(bursts):
        evs = src.take(groups_per_burst)
        want += evs
        data.append(to_uinput(evs))
    total = bursts * size
    used: list[tuple[int, int]] = []
    t0 = time.perf_counter()
    os.write(src.fd, data[0])
    os.write(src.fd, data[1])
    for b in range(bursts):
        if len(used) < (b + 1) * size:
            used += ring.wait((b + 1) * size - len(used))
        if b + 2 < bursts:
            os.write(src.fd, data[b + 2])
    dt = time.perf_counter() - t0
    ring.repost(used, want)
    return total / dt, total


def measure(side: Side, sources: list[Source], pings: int, kicks: str) -> dict[str, float]:
    out: dict[str, float] = {}
    events = 0
    cpu = 0.0
    for index, src in enumerate(sources):
        g = side.connect(index)
        try:
            ring = Ring(g, kicks)
            latency(ring, src, 5)  # warm up, and the first check of the events
            c0 = cpu_seconds(side.proc.pid)
            out[f"{src.name} latency µs"] = latency(ring, src, pings)
            out[f"{src.name} events/s"], n = rate(ring, src)
            cpu += cpu_seconds(side.proc.pid) - c0
            events += pings * src.per + n
        finally:
            g.close()
    out["CPU µs/event"] = cpu / events * 1e6
    return out


def inner(reps: int, pings: int, rust_dir: str | None, poll_us: str | None, kicks: str) -> int:
    from device_drivers import console_script  # noqa: PLC0415 - inside the guest only
    from evdev import AbsInfo, UInput  # noqa: PLC0415
    from evdev import ecodes as e  # noqa: PLC0415

    kbd = UInput({e.EV_KEY: [e.KEY_A, e.KEY_B], e.EV_LED: [e.LED_NUML, e.LED_CAPSL]}, name="vdev-bench-kbd")
    axis = AbsInfo(value=0, min=0, max=32767, fuzz=0, flat=0, resolution=100)
    tab = UInput(
        {e.EV_KEY: [e.BTN_TOUCH], e.EV_ABS: [(e.ABS_X, axis), (e.ABS_Y, axis)]},
        name="vdev-bench-tablet",
        input_props=[e.INPUT_PROP_DIRECT],
    )
    nodes = f"{kbd.device.path},{tab.device.path}"
    sources = [Source("keyboard", kbd, keyboard_group), Source("tablet", tab, tablet_group)]
    argvs = {"ours": console_script("vhost-device-input", "vhost_backends.cli.input")}
    rust = os.path.join(rust_dir, "vhost-device-input") if rust_dir else None
    why = "n/a: no VHOST_DEVICE_RUST_BIN/vhost-device-input"
    if rust and os.access(rust, os.X_OK):
        argvs["rust"] = [rust]
    results: dict[str, list[dict[str, float]]] = {k: [] for k in argvs}
    try:
        for rep in range(reps):
            order = list(argvs) if rep % 2 == 0 else list(reversed(argvs))
            for k in order:
                env = {"VHD_POLL_US": poll_us} if k == "ours" and poll_us is not None else {}
                side = Side(argvs[k], f"/tmp/{k}.sock", nodes, env)
                try:
                    results[k].append(measure(side, sources, pings, kicks))
                except (AssertionError, TimeoutError) as err:
                    raise SystemExit(f"{k}: {err}") from err
                finally:
                    side.stop()
    finally:
        kbd.close()
        tab.close()
    head = f"uinput devices in a TCG guest, 1 vCPU, {reps} alternating rounds, medians (min..max)"
    if poll_us is not None:
        head += f", ours with VHD_POLL_US={poll_us}"
    head += f", eventq kicks: {kicks}"
    print(f"| {head} | ours | Rust | ratio |")
    print("|---|---|---|---|")
    for key in results["ours"][0]:
        ours = [r[key] for r in results["ours"]]
        cell = f"{statistics.median(ours):.1f} ({min(ours):.1f}..{max(ours):.1f})"
        if "rust" in results:
            theirs = [r[key] for r in results["rust"]]
            # ratio >= 1 means ours is better: speed ours/Rust, time Rust/ours.
            if key.endswith("events/s"):
                ratios = [o / r for o, r in zip(ours, theirs, strict=True)]
                label = "ours/Rust"
            else:
                ratios = [r / o for o, r in zip(ours, theirs, strict=True)]
                label = "Rust/ours"
            rc = f"{statistics.median(theirs):.1f} ({min(theirs):.1f}..{max(theirs):.1f})"
            ratio = f"{statistics.median(ratios):.2f}x {label} ({min(ratios):.2f}..{max(ratios):.2f})"
        else:
            rc, ratio = why, "n/a"
        print(f"| {key} | {cell} | {rc} | {ratio} |")
    print("RESULT done")
    return 0


def outer(reps: int, pings: int, poll_us: str | None, kicks: str) -> int:
    sys.path.insert(0, str(ROOT / "tests" / "e2e"))
    import harness  # noqa: PLC0415

    rust_dir = os.environ.get("VHOST_DEVICE_RUST_BIN", "")
    args = f"--reps {reps} --pings {pings}" + (f" --rust-dir {rust_dir}" if rust_dir else "")
    if poll_us is not None:
        args += f" --poll-us {int(poll_us)}"
    args += f" --kicks {kicks}"
    res = harness.run_as_host(GUEST_SCRIPT.replace("@ARGS@", args), timeout=3600)
    for line in res.output.splitlines():
        if line.startswith(("RESULT", "|")):
            print(line)
    if res.exit_status != 0:
        print(res.output[-4000:])
    return 0 if res.exit_status == 0 else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--pings", type=int, default=100)
    p.add_argument("--poll-us", help="VHD_POLL_US for our daemon (default: its own)")
    p.add_argument(
        "--kicks",
        choices=("always", "event-idx"),
        default="always",
        help="the front-end kicks on every repost, or when avail_event asks (as Linux's driver)",
    )
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rust-dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.inner:
        return inner(a.reps, a.pings, a.rust_dir, a.poll_us, a.kicks)
    return outer(a.reps, a.pings, a.poll_us, a.kicks)


if __name__ == "__main__":
    raise SystemExit(main())
