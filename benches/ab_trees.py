"""Fine-grained A/B of row A (or B) between built source trees, for a speed regression
that is smaller than the machine's drift.

    .venv/bin/python benches/ab_trees.py [--rounds 1500] [--batches 1000] [--cpu 1] [--row A]
        TREE_REF TREE...

Each TREE is a checkout with its extensions built in place (``setup.py build_ext
--inplace``; ``_bench`` is built on first use).  One long-lived process per tree,
all pinned to the same CPU, is asked in turn (the order alternating each round) for
one sample of ``--batches`` batches of the row's loop; each sample is compared with
the reference tree's sample of the same round, taken a few milliseconds before or
after it.  Printed per tree: the median, 90th percentile and best sample (Mchains/s)
and the median and quartiles of the per-round ratios to the first tree.  Separate
processes started one after the other (queue_table.py run per tree) see the machine
change speed state between them; samples taken back to back in the same rounds do
not, which narrows the ratio's spread several times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

CHILD = """
import sys, time
sys.path.insert(0, "benches"); sys.path.insert(0, ".")
import vq_workloads as W
w = W.make_a_cython(event_idx=sys.argv[2] == "B"); w.check(); w.run(100)
n = int(sys.argv[1])
for _line in sys.stdin:
    t = time.perf_counter(); w.run(n); dt = time.perf_counter() - t
    sys.stdout.write(f"{n * 256 / dt / 1e6}\\n"); sys.stdout.flush()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trees", nargs="+", help="built source trees; the first is the reference")
    ap.add_argument("--rounds", type=int, default=1500)
    ap.add_argument("--batches", type=int, default=1000, help="batches of 256 chains per sample")
    ap.add_argument("--cpu", default="1", help="the CPU every tree's process is pinned to")
    ap.add_argument("--row", choices=["A", "B"], default="A")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": "."}
    procs = [
        subprocess.Popen(
            ["taskset", "-c", args.cpu, sys.executable, "-c", CHILD, str(args.batches), args.row],
            cwd=tree,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for tree in args.trees
    ]
    samples: list[list[float]] = [[] for _ in procs]
    for i in range(args.rounds):
        order = list(range(len(procs)))
        if i % 2:
            order.reverse()
        for k in order:
            stdin, stdout = procs[k].stdin, procs[k].stdout
            assert stdin is not None and stdout is not None
            stdin.write("\n")
            stdin.flush()
            samples[k].append(float(stdout.readline()))
    for p in procs:
        assert p.stdin is not None
        p.stdin.close()
        p.wait()
    print(f"row {args.row}, {args.rounds} rounds of {args.batches} batches, CPU {args.cpu}; Mchains/s")
    for tree, s in zip(args.trees, samples, strict=True):
        ratios = [x / y for x, y in zip(s, samples[0], strict=True)]
        q = statistics.quantiles(ratios, n=4)
        print(
            f"{tree}: median {statistics.median(s):6.1f}  p90 {sorted(s)[int(0.9 * len(s))]:6.1f}  "
            f"best {max(s):6.1f}  ratio median {statistics.median(ratios):.3f} IQR [{q[0]:.3f}, {q[2]:.3f}]"
        )


if __name__ == "__main__":
    main()
