"""vhost-device-i2c against the Rust daemon on the same real adapter: i2c-stub in a guest.

    VHOST_DEVICE_RUST_BIN=DIR .venv/bin/python benches/i2c_stub_table.py [--reps 5] [--count 300]

The Rust ``vhost-device-i2c`` has no simulated adapter, and this host has no
``/dev/i2c-N``; so both daemons run inside a guest that plays the host (the e2e
harness, ``tests/e2e/harness.py``: the host's root over 9p, the project's venv),
each on the same ``i2c-stub`` adapter (``modprobe i2c-stub chip_addr=0x50``, SMBus
only), one after the other, driven by the same front-end (ours) with the same
requests: an SMBus byte-data read as Linux's virtio_i2c sends it (a 1-byte write of
the register with FAIL_NEXT, then a 1-byte read; upstream makes one I2C_SMBUS ioctl
of the kick's two chains, ours of the group).  Samples alternate between the
daemons, round by round; the table gives the median time per request and the ratio.

The guest runs under TCG here: the absolute times are the emulator's, the ratio is
what compares.  Without ``VHOST_DEVICE_RUST_BIN`` (a directory holding
``vhost-device-i2c``) the Rust column says n/a.

``--host-fake`` runs the same comparison on this host instead, both daemons on a
fake ``/dev/i2c-99`` (``benches/i2c_fake_adapter.c``, built with ``cc`` and
preloaded: the i2c-dev ioctls answer at once), and also gives each daemon's CPU
time per request (user and system, all its threads, from ``/proc``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

GUEST_SCRIPT = """\
modprobe i2c-stub chip_addr=0x50 && modprobe i2c-dev || { echo "i2c-stub failed"; exit 10; }
n=
for d in /sys/bus/i2c/devices/i2c-*; do
    [ "$(cat $d/name)" = "SMBus stub driver" ] && n=${d##*/i2c-}
done
waitfor /dev/i2c-$n 30
i2cset -y $n 0x50 0x10 0x5a
inhost python benches/i2c_stub_table.py --inner $n @ARGS@
"""


def _connect(path: str, proc: subprocess.Popen[bytes], deadline: float) -> Any:
    from vhost_backends.frontend import Frontend  # noqa: PLC0415 - inside the guest only

    while True:
        try:
            return Frontend.connect(path, timeout=30)
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.05)  # start-up only, never in a timed loop


class Side:
    """One daemon on /dev/i2c-N and a front-end with byte-data reads laid out."""

    def __init__(self, argv: list[str], sock: str) -> None:
        from virtio_devices.i2c import VIRTIO_I2C_FLAGS_FAIL_NEXT, VIRTIO_I2C_FLAGS_M_RD, out_hdr  # noqa: PLC0415
        from virtio_queue.testing import VIRTQ_DESC_F_WRITE, RawDesc  # noqa: PLC0415

        self.proc = subprocess.Popen([*argv, "-s", sock], stdin=subprocess.DEVNULL)
        fe = _connect(sock + "0", self.proc, time.monotonic() + 120)
        self.fe = fe
        fe.negotiate()
        fe.add_memory(4 << 20)
        fe.set_mem_table()
        ring = fe.setup_ring(0, 256)
        self.mock = ring.mock
        mem = fe.memory

        def buf(data: bytes) -> RawDesc:
            gpa = self.mock.alloc(len(data))
            mem.write(gpa, data)
            return RawDesc(gpa, len(data), 0, 0)

        self.data = self.mock.alloc(1)
        self.status = self.mock.alloc(1)
        self.chains = [
            [
                buf(out_hdr(0x50, VIRTIO_I2C_FLAGS_FAIL_NEXT)),
                buf(b"\x10"),
                RawDesc(self.mock.alloc(1), 1, VIRTQ_DESC_F_WRITE, 0),
            ],
            [
                buf(out_hdr(0x50, VIRTIO_I2C_FLAGS_M_RD)),
                RawDesc(self.data, 1, VIRTQ_DESC_F_WRITE, 0),
                RawDesc(self.status, 1, VIRTQ_DESC_F_WRITE, 0),
            ],
        ]

    def run(self, count: int) -> None:
        add, kick, wait = self.mock.add_chain, self.fe.kick, self.fe.wait_used
        for _ in range(count):
            for c in self.chains:
                add(c)
            kick(0)
            wait(0, 2, 30)

    def check(self) -> None:
        self.run(1)
        mem = self.fe.memory
        got = (mem.read(self.status, 1), mem.read(self.data, 1))
        assert got == (b"\x00", b"\x5a"), f"byte-data read gave status/data {got}"

    def stop(self) -> None:
        self.fe.close()
        self.proc.terminate()
        self.proc.wait(30)


def _cpu_s(pid: int) -> float:
    """CPU seconds of process ``pid`` (all its threads): the scheduler's run time in
    nanoseconds (``/proc/PID/task/*/schedstat``), else user + system in clock ticks
    (too coarse for a round of a few hundred requests)."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        if total:  # (0: the kernel keeps no run time there)
            return total / 1e9
    except (FileNotFoundError, IndexError, ValueError):
        pass
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _switches(pid: int) -> int:
    """Context switches (voluntary and not) of every thread of process ``pid``."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                        total += int(line.split()[1])
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
    return total


def inner(
    number: int, reps: int, count: int, rust_dir: str | None, where: str = "i2c-stub (TCG guest)"
) -> int:
    sides = {"ours": Side(["vhost-device-i2c", "-l", f"{number}:80"], "/tmp/ours.sock")}
    rust = os.path.join(rust_dir, "vhost-device-i2c") if rust_dir else None
    if rust and os.access(rust, os.X_OK):
        sides["rust"] = Side([rust, "-l", f"{number}:80"], "/tmp/rust.sock")
    try:
        for s in sides.values():
            s.check()
            s.run(max(1, count // 10))
        times: dict[str, list[float]] = {k: [] for k in sides}
        cpu: dict[str, list[float]] = {k: [] for k in sides}
        switches: dict[str, list[float]] = {k: [] for k in sides}
        for rep in range(reps):
            order = list(sides) if rep % 2 == 0 else list(reversed(sides))
            for k in order:
                pid = sides[k].proc.pid
                c0, s0 = _cpu_s(pid), _switches(pid)
                t0 = time.perf_counter()
                sides[k].run(count)
                times[k].append((time.perf_counter() - t0) / count * 1e6)
                cpu[k].append((_cpu_s(pid) - c0) / count * 1e6)
                switches[k].append((_switches(pid) - s0) / count)
    finally:
        for s in sides.values():
            s.stop()
    print(f"| byte-data read on {where}, {reps} alternating rounds of {count} | µs per request |")
    for k, v in times.items():
        print(
            f"RESULT {k} median_us={statistics.median(v):.1f} all={','.join(f'{x:.1f}' for x in v)} "
            f"cpu_us={statistics.median(cpu[k]):.1f} switches={statistics.median(switches[k]):.2f}"
        )
    if "rust" in times:
        ratios = [r / o for o, r in zip(times["ours"], times["rust"], strict=True)]
        cpu_ratios = [r / o for o, r in zip(cpu["ours"], cpu["rust"], strict=True) if o > 0]
        print(
            f"RESULT ours/rust speed median={statistics.median(ratios):.2f}x "
            f"range={min(ratios):.2f}-{max(ratios):.2f}"
            + (f" cpu={statistics.median(cpu_ratios):.2f}x" if cpu_ratios else "")
        )
    else:
        print("RESULT ours/rust n/a (no VHOST_DEVICE_RUST_BIN/vhost-device-i2c)")
    return 0


def outer(reps: int, count: int) -> int:
    sys.path.insert(0, str(ROOT / "tests" / "e2e"))
    import harness  # noqa: PLC0415

    rust_dir = os.environ.get("VHOST_DEVICE_RUST_BIN", "")
    args = f"--reps {reps} --count {count}" + (f" --rust-dir {rust_dir}" if rust_dir else "")
    res = harness.run_as_host(GUEST_SCRIPT.replace("@ARGS@", args), timeout=1800)
    for line in res.output.splitlines():
        if line.startswith(("RESULT", "|")):
            print(line)
    return 0 if res.exit_status == 0 else 1


def host_fake(reps: int, count: int) -> int:
    """Both daemons on this host, on the preloaded fake adapter (see the docstring)."""
    rust_dir = os.environ.get("VHOST_DEVICE_RUST_BIN") or None
    with tempfile.TemporaryDirectory() as tmp:
        lib = os.path.join(tmp, "i2c_fake_adapter.so")
        cc = os.environ.get("CC", "cc")
        subprocess.run(
            [cc, "-O2", "-shared", "-fPIC", "-o", lib, str(ROOT / "benches" / "i2c_fake_adapter.c"), "-ldl"],
            check=True,
        )
        os.environ["LD_PRELOAD"] = lib
        os.environ.setdefault("RUST_LOG", "error")
        os.environ["PATH"] = f"{ROOT / '.venv' / 'bin'}:{os.environ.get('PATH', '')}"
        return inner(99, reps, count, rust_dir, "a fake adapter on this host")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--count", type=int, default=300)
    p.add_argument("--host-fake", action="store_true", help="on this host, with a preloaded fake /dev/i2c-99")
    p.add_argument("--inner", type=int, help=argparse.SUPPRESS)
    p.add_argument("--rust-dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.inner is not None:
        return inner(a.inner, a.reps, a.count, a.rust_dir)
    if a.host_fake:
        return host_fake(a.reps, a.count)
    return outer(a.reps, a.count)


if __name__ == "__main__":
    raise SystemExit(main())
