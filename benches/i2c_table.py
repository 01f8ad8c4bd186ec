"""vhost-device-i2c request round trips on the simulated adapter, as ratios.

    .venv/bin/python benches/i2c_table.py [--reps 7] [--count 2000]

Each row is the time from a kick to the used notification, through our Python
front-end (``vhost_backends.frontend.Frontend``) over a real socket, for:

* ``quick``: one zero-length write to the EEPROM at 0x50 (what ``i2cdetect`` sends
  per address), one chain per kick;
* ``w1+r8``: a FAIL_NEXT group, a 1-byte write of the address pointer then an
  8-byte read (``i2ctransfer w1@0x50 0x10 r8``), two chains per kick;
* ``nak``: a quick write to an address with no device (the scan's usual answer).

The reference, measured in the same run with the same chains and the same front-end,
is ``vhost-device-template`` (it echoes the readable bytes into the writable ones:
the cheapest device there is), so the ratio (template time / i2c time) is what the
I2C request handling costs on top of the transport.  Samples of the two daemons
alternate (A/B, round by round) and the median of the rounds is reported, since
other work shares the machine's two CPUs.

The Rust ``vhost-device-i2c`` has no simulated adapter (its only backend is
``/dev/i2c-N``), so it cannot be compared here: its column says n/a.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from vhost_backends.frontend import Frontend  # noqa: E402
from virtio_devices.i2c import VIRTIO_I2C_FLAGS_FAIL_NEXT, VIRTIO_I2C_FLAGS_M_RD, out_hdr  # noqa: E402
from virtio_queue.testing import VIRTQ_DESC_F_WRITE, RawDesc  # noqa: E402

SHAPES = ("quick", "w1+r8", "nak")


def _command(name: str, module: str) -> list[str]:
    script = shutil.which(name) or str(ROOT / ".venv" / "bin" / name)
    return [script] if os.path.exists(script) else [sys.executable, "-m", module]


class Daemon:
    def __init__(self, kind: str, tmp: str) -> None:
        self.sock = os.path.join(tmp, f"{kind}.sock")
        if kind == "i2c":
            argv = [*_command("vhost-device-i2c", "vhost_backends.cli.i2c"), "-s", self.sock, "-l", "sim:80"]
            self.path = self.sock + "0"
        else:
            argv = [*_command("vhost-device-template", "vhost_backends.cli.template"), "-s", self.sock]
            self.path = self.sock
        env = dict(os.environ, PYTHONPATH=str(ROOT), RUST_LOG="error")
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.fe = Frontend.connect(self.path, timeout=10)
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.02)  # start-up only, never inside a timed loop

    def stop(self) -> None:
        self.fe.close()
        self.proc.terminate()
        self.proc.wait(10)


class Client:
    """A front-end with a ring and the chains of one shape laid out once."""

    def __init__(self, daemon: Daemon, shape: str) -> None:
        fe = self.fe = daemon.fe
        if not fe.rings:
            fe.negotiate()
            fe.add_memory(4 << 20)
            fe.set_mem_table()
            fe.setup_ring(0, 256)
        self.mock = fe.rings[0].mock
        alloc, write = self.mock.alloc, fe.memory.write

        def buf(data: bytes) -> RawDesc:
            gpa = alloc(len(data))
            write(gpa, data)
            return RawDesc(gpa, len(data), 0, 0)

        def out(n: int) -> RawDesc:
            return RawDesc(alloc(n), n, VIRTQ_DESC_F_WRITE, 0)

        if shape == "quick":
            self.chains = [[buf(out_hdr(80)), out(1)]]
        elif shape == "nak":
            self.chains = [[buf(out_hdr(0x33)), out(1)]]
        else:
            fn, rd = VIRTIO_I2C_FLAGS_FAIL_NEXT, VIRTIO_I2C_FLAGS_M_RD
            self.chains = [
                [buf(out_hdr(80, fn)), buf(b"\x10"), out(1)],
                [buf(out_hdr(80, rd)), out(8), out(1)],
            ]
        self.shape = shape

    def run(self, count: int) -> None:
        add, kick, wait = self.mock.add_chain, self.fe.kick, self.fe.wait_used
        n = len(self.chains)
        for _ in range(count):
            for c in self.chains:
                add(c)
            kick(0)
            wait(0, n, 10)

    def check_i2c(self) -> None:
        """Once, untimed: the i2c answers are right (status OK/ERR, data read)."""
        status = self.chains[-1][-1].addr
        self.run(1)
        want = b"\x01" if self.shape == "nak" else b"\x00"
        got = self.fe.memory.read(status, 1)
        assert got == want, f"{self.shape}: status {got!r}, wanted {want!r}"


def measure(reps: int, count: int, shapes: Sequence[str]) -> dict[str, tuple[list[float], list[float]]]:
    out: dict[str, tuple[list[float], list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="i2c-bench-") as tmp:
        i2c, tpl = Daemon("i2c", tmp), Daemon("template", tmp)
        try:
            for shape in shapes:
                ci, ct = Client(i2c, shape), Client(tpl, shape)
                ci.check_i2c()
                ci.run(count // 10)  # warm both (polling windows learnt, caches)
                ct.run(count // 10)
                ti: list[float] = []
                tt: list[float] = []
                for rep in range(reps):
                    order = [(ci, ti), (ct, tt)] if rep % 2 == 0 else [(ct, tt), (ci, ti)]
                    for client, sink in order:
                        t0 = time.perf_counter()
                        client.run(count)
                        sink.append((time.perf_counter() - t0) / count * 1e6)
                out[shape] = (ti, tt)
        finally:
            i2c.stop()
            tpl.stop()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--count", type=int, default=2000, help="round trips per sample")
    p.add_argument("--shapes", default=",".join(SHAPES))
    args = p.parse_args(argv)
    res = measure(args.reps, args.count, args.shapes.split(","))
    print(f"vhost-device-i2c, sim adapter, {args.reps} alternating rounds of {args.count} round trips")
    print(f"load average: {os.getloadavg()[0]:.2f}")
    print("| request (per kick) | i2c µs | template µs | i2c / template speed | ours / Rust |")
    print("| --- | --- | --- | --- | --- |")
    for shape, (ti, tt) in res.items():
        ratios = [t / i for i, t in zip(ti, tt, strict=True)]
        print(
            f"| {shape} | {statistics.median(ti):.1f} | {statistics.median(tt):.1f} | "
            f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | n/a (no sim adapter) |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
