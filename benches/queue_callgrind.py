"""Instructions per chain of the queue's pop paths (workload A and the nogil pop).

    .venv/bin/python benches/queue_callgrind.py [--batches 100,300]

Counts with ``valgrind --tool=callgrind`` (deterministic, unlike a clock on a busy
2-core machine):

* ``A``: workload A of ``benches/vq_workloads.py`` through ``_bench.workload_a``
  (``pop_head``, the head descriptor, ``add_used_c``; one ``needs_notification_c``
  per batch of 256 chains), all instructions of the process;
* ``A pop_head``: of those, the ones ``Queue.pop_head`` runs itself (what is
  inlined into it included);
* ``nogil pop_head_nogil``: the instructions ``Queue.pop_head_nogil`` runs itself
  per pop, driven one pop at a time through ``virtio_queue._nogil_probe``.

Each figure is the difference between two runs of different sizes divided by the
difference in chains, so that start-up and shutdown cancel.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import vq_workloads as W  # noqa: E402

from virtio_queue import _nogil_probe as P  # noqa: E402
from virtio_queue.testing import workload_a  # noqa: E402


def child(what: str, batches: int) -> None:
    """The measured process: ``batches`` batches of 256 chains."""
    if what == "A":
        wl = W.make_a_cython()
        wl.run(batches)
        return
    mem, buf = W.guest_memory()
    mock = workload_a(mem)
    q = mock.create_queue()
    pop = P.pop_head_nogil
    for _ in range(batches):
        mock.publish_all()
        for _k in range(W.QSIZE):
            _rc, head = pop(q)
            P.add_used(q, head, 0)
    del buf


def _count(what: str, batches: int, tmp: str) -> tuple[int, dict[str, int]]:
    out = Path(tmp) / f"{what}-{batches}.out"
    base = os.path.realpath(sys.executable)
    env = dict(os.environ, PYTHONHASHSEED="0", PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]))
    subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--quiet",
            f"--callgrind-out-file={out}",
            base,
            __file__,
            "--child",
            what,
            str(batches),
        ],
        check=True,
        env=env,
    )
    ann = subprocess.run(
        ["callgrind_annotate", "--threshold=100", "--inclusive=no", "--auto=no", str(out)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    total = 0
    funcs: dict[str, int] = {}
    for line in ann.splitlines():
        m = re.match(r"\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(PROGRAM TOTALS|\S.*)$", line)
        if not m:
            continue
        n = int(m.group(1).replace(",", ""))
        if m.group(2) == "PROGRAM TOTALS":
            total = n
        else:
            funcs[m.group(2)] = funcs.get(m.group(2), 0) + n
    return total, funcs


def _self(funcs: dict[str, int], name: str) -> int:
    """Self instructions of the functions whose symbol ends in ``name``."""
    return sum(n for f, n in funcs.items() if re.search(r"_5Queue_" + name + r"\b", f))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="100,300", help="the two run sizes (batches of 256)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], int(a.child[1]))
        return
    lo, hi = (int(x) for x in a.batches.split(","))
    chains = (hi - lo) * W.QSIZE
    with tempfile.TemporaryDirectory() as tmp:
        t0, f0 = _count("A", lo, tmp)
        t1, f1 = _count("A", hi, tmp)
        print(f"A                    {(t1 - t0) / chains:8.1f} instructions/chain (process)")
        d = _self(f1, "pop_head") - _self(f0, "pop_head")
        print(f"A pop_head           {d / chains:8.1f} instructions/chain (self)")
        t0, f0 = _count("nogil", lo, tmp)
        t1, f1 = _count("nogil", hi, tmp)
        d = _self(f1, "pop_head_nogil") - _self(f0, "pop_head_nogil")
        print(f"nogil pop_head_nogil {d / chains:8.1f} instructions/chain (self)")


if __name__ == "__main__":
    main()
