"""Instructions per request of vhost-device-i2c, ours against the Rust daemon.

    VHOST_DEVICE_RUST_BIN=DIR .venv/bin/python benches/i2c_callgrind.py [--requests 200,1200]

Counts with ``valgrind --tool=callgrind`` (deterministic, unlike a clock on a busy
2-core machine) the instructions each daemon runs, all its threads together, to
serve the request of ``benches/i2c_stub_table.py`` (an SMBus byte-data read as
Linux's virtio_i2c sends it: a 1-byte write with FAIL_NEXT and a 1-byte read, one
kick) on the fake ``/dev/i2c-99`` of ``benches/i2c_fake_adapter.c`` (preloaded:
the ioctls answer at once, so the kernel's i2c work is left out of both), driven by
our front-end outside valgrind.  Each figure is the difference between two runs of
different sizes divided by the difference in requests, so that start-up and
shutdown cancel.  Under valgrind the daemons run slower than the front-end, so
every request comes with its own kick and wake-up in both.

The kernel's share (system calls, scheduling) is not counted: ``strace -c -f`` of
the same runs gives the system calls per request (``--strace``).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benches"))

from i2c_stub_table import Side  # noqa: E402


def _ours() -> list[str]:
    """Our daemon, run by the base interpreter (valgrind follows no venv shim)."""
    base = os.path.realpath(sys.executable)
    return [base, "-m", "vhost_backends.cli.i2c", "-l", "99:80"]


def _run(tool: list[str], daemon: list[str], requests: int, tmp: str, tag: str) -> Path:
    out = Path(tmp) / f"{tag}.out"
    if tool[0] == "valgrind":
        argv = [*tool, f"--callgrind-out-file={out}", *daemon]
    else:
        argv = [*tool, "-o", str(out), *daemon]
    side = Side(argv, os.path.join(tmp, f"{tag}.sock"))
    try:
        side.check()
        side.run(requests - 1)
    finally:
        side.fe.close()
        pid = side.proc.pid
        if tool[0] == "strace":
            # strace does not pass SIGTERM on: end the daemon it runs, then it ends.
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                pid = int(f.read().split()[0])
        # Under valgrind a signal may reach a thread other than the main one, which
        # runs Python's handlers only when it wakes: send it again until it exits.
        for _ in range(60):
            os.kill(pid, signal.SIGTERM)
            try:
                side.proc.wait(2)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            side.proc.kill()
            raise RuntimeError(f"{tag}: the daemon did not exit on SIGTERM")
    return out


def _instructions(path: Path) -> int:
    m = re.search(r"^(?:summary|totals): (\d+)", path.read_text(), re.M)
    assert m, f"no instruction total in {path}"
    return int(m.group(1))


def _syscalls(path: Path) -> dict[str, int]:
    calls: dict[str, int] = {}
    for line in path.read_text().splitlines():
        f = line.split()
        if len(f) >= 5 and f[0][0].isdigit() and f[3].isdigit():
            calls[f[-1]] = int(f[3])
    return calls


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", default="200,1200", help="the two run sizes")
    p.add_argument("--strace", action="store_true", help="system calls per request instead (strace -c -f)")
    a = p.parse_args()
    n1, n2 = (int(x) for x in a.requests.split(","))
    rust_dir = os.environ.get("VHOST_DEVICE_RUST_BIN")
    daemons = {"ours": _ours()}
    if rust_dir:
        daemons["rust"] = [os.path.join(rust_dir, "vhost-device-i2c"), "-l", "99:80"]
    tool = ["strace", "-f", "-c"] if a.strace else ["valgrind", "--tool=callgrind", "--trace-children=no"]
    with tempfile.TemporaryDirectory() as tmp:
        lib = os.path.join(tmp, "i2c_fake_adapter.so")
        cc = os.environ.get("CC", "cc")
        subprocess.run(
            [cc, "-O2", "-shared", "-fPIC", "-o", lib, str(ROOT / "benches" / "i2c_fake_adapter.c"), "-ldl"],
            check=True,
        )
        os.environ["LD_PRELOAD"] = lib
        os.environ["RUST_LOG"] = "error"
        site = sysconfig.get_paths()["purelib"]
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), site])
        per: dict[str, float] = {}
        for name, daemon in daemons.items():
            outs = [_run(tool, daemon, n, tmp, f"{name}{n}") for n in (n1, n2)]
            if a.strace:
                c1, c2 = (_syscalls(o) for o in outs)
                line = ", ".join(
                    f"{k} {(c2.get(k, 0) - c1.get(k, 0)) / (n2 - n1):.2f}"
                    for k in sorted(c2, key=lambda k: -(c2[k] - c1.get(k, 0)))
                    if c2.get(k, 0) - c1.get(k, 0) > (n2 - n1) // 50
                )
                print(f"RESULT {name} syscalls per request: {line}")
            else:
                i1, i2 = (_instructions(o) for o in outs)
                per[name] = (i2 - i1) / (n2 - n1)
                print(f"RESULT {name} instructions_per_request={per[name]:.0f}")
        if "rust" in per:
            print(f"RESULT rust/ours instructions {per['rust'] / per['ours']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
