"""vhost-device-sound: per-period counts of one daemon on the real-time row of
``sound_table.py`` (48 kHz stereo S16, 5 ms periods, a buffer each period on the
front-end's clock, 4 in flight, no event buffers), for runs by hand::

    python benches/sound_counts.py callgrind|strace|perf ours|rust [PERIODS]

The daemon is started by ``sound_table.Session`` (``rust``: from
``$VHOST_DEVICE_RUST_BIN``); after 50 periods of warm-up, ``PERIODS`` (400) more
are counted: ``callgrind`` runs the daemon under ``valgrind --tool=callgrind``,
zeroes its counts and dumps them with ``callgrind_control`` and prints the dump's
instructions per period; ``strace`` attaches ``strace -c -f``; ``perf`` attaches
``perf stat`` (task-clock, context switches, migrations, page faults).
Interleave runs of ``ours`` and ``rust`` for a ratio (``perf`` is a timing: run
it with nothing else busy on the machine).
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import sound_table as T  # noqa: E402

TOOLS = ("callgrind", "strace", "perf")


def count(tool: str, kind: str, periods: int = 400) -> str:
    """Run ``kind``'s daemon on the real-time row under ``tool``; its report."""
    if tool not in TOOLS:
        raise ValueError(f"tool must be one of {TOOLS}, not {tool!r}")
    out_dir = tempfile.mkdtemp()
    popen = subprocess.Popen
    first = [True]

    def wrapped(args: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        # The daemon (the first process the session starts) under callgrind.
        if first[0]:
            first[0] = False
            if tool == "callgrind":
                args = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_dir}/cg.%p", *args]
        return popen(args, **kw)

    T.subprocess.Popen = wrapped  # type: ignore[assignment,misc]
    old_deadline = T.DEADLINE
    T.DEADLINE = 120.0  # a daemon under valgrind starts slowly
    period = int(T.RATE * 5 / 1000) * T.FRAME
    report = os.path.join(out_dir, "report.txt")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            s = T.Session(kind, tmp)
            try:
                s.start(0, period, features=0)
                s.stream_realtime(T.TX, 0, period, 50, 4)
                pid = str(s.proc.pid)
                tracer = None
                if tool == "callgrind":
                    subprocess.run(["callgrind_control", "-z", pid], check=True, capture_output=True)
                elif tool == "perf":
                    events = "task-clock,context-switches,cpu-migrations,page-faults"
                    tracer = popen(["perf", "stat", "-e", events, "-p", pid, "-o", report])
                else:
                    tracer = popen(["strace", "-c", "-f", "-p", pid, "-o", report])
                if tracer is not None:
                    time.sleep(0.5)  # attached (a bench script, not a test)
                s.stream_realtime(T.TX, 0, period, periods, 4)
                if tool == "callgrind":
                    subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
                elif tracer is not None:
                    tracer.send_signal(2)
                    tracer.wait()
            finally:
                s.close()
    finally:
        T.subprocess.Popen = popen  # type: ignore[misc]
        T.DEADLINE = old_deadline
    if tool != "callgrind":
        return Path(report).read_text()
    lines = []
    for f in sorted(glob.glob(f"{out_dir}/cg.*")):
        for line in Path(f).read_text().splitlines():
            if line.startswith("summary:"):
                n = int(line.split()[1])
                lines.append(f"{os.path.basename(f)}: {n} instructions, {n / periods:.0f} per period")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3) or args[0] not in TOOLS or args[1] not in ("ours", "rust"):
        print(__doc__, file=sys.stderr)
        return 2
    print(count(args[0], args[1], int(args[2]) if len(args) == 3 else 400))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
