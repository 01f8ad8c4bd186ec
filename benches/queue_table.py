#!/usr/bin/env python3
"""Print the queue benchmark's table: every figure of the speed goals, with the ratio to
a reference measured in the same run, and (with ``--anchor`` or ``QUEUE_ANCHOR=1``) the
figures of an *anchor*, rust-vmm virtio-queue 0.18 running the same workloads, in the
same session.

    .venv/bin/python benches/queue_table.py [--reps 5] [--secs 0.3] [--only REGEX] [--json out.json]
        [--anchor --anchor-path PROGRAM]

The anchor is a program kept outside this repository (it needs cargo and the Rust
crates): ``--anchor-path`` or the environment variable ``QUEUE_ANCHOR_RUN`` names it.
It is run as ``PROGRAM -- --reps N --secs S`` and prints one line per figure,
``name what median min max unit ns ratio`` (unit ``Mchains/s`` or ``GB/s``).  Without
one, the anchor's columns say n/a.

Run by hand on a quiet machine; never from CI (it takes minutes and times things).
Figures are measured round-robin (each rep visits every figure once), after a short
warm-up; median/min/max over the reps.  A ratio compares a figure with its reference
measured just before and just after it in the same rep (their mean), so that the
machine's drift within a rep does not enter it.  The workloads are the anchor's (see
``benches/vq_workloads.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import vq_workloads as W  # noqa: E402


@dataclass
class Row:
    section: str
    make: Callable[[], W.Workload]
    ref: str | None = None  # ratio = median over rounds of sample / ref's sample
    goal: tuple[str, float] | None = None  # ("ref", 0.8) ratio goal, ("abs", 2e6), ("anchor", 1.0)
    anchor: str | None = None  # name of the anchor's row shown beside this one
    info: bool = False
    wl: W.Workload | None = None
    n: int = 1
    samples: list[float] = field(default_factory=list)
    # The reference measured around each sample: the mean of its figures just
    # before and just after this row's measurement in the same round.
    ref_samples: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        assert self.wl is not None
        return self.wl.name


def rows() -> list[Row]:
    out: list[Row] = [
        Row("A", lambda: W.make_a_cython(False), goal=("anchor", 1.0), anchor="A"),
        Row("A", lambda: W.make_a_cython(True), anchor="B", info=True),
        Row("A", lambda: W.make_a_python(False), ref="A-ref", goal=("abs", 2e6), anchor="A"),
        Row("A", W.make_a2_python, ref="A-ref", anchor="A2", info=True),
        Row("A", lambda: W.make_a_python(True)),
        Row("A", W.make_a0_python, anchor="A0", info=True),
        Row("C", lambda: W.make_memcpy("pg", True, "libc"), anchor="memcpy"),
    ]
    for dw in (True, False):
        for nd in W.NDESCS:
            for pl in W.ALIGNMENTS:
                out.append(
                    Row(
                        "C",
                        (lambda nd=nd, dw=dw, pl=pl: W.make_c_cython(nd, dw, pl)),
                        ref="memcpy",
                        goal=("ref", 0.8),
                        anchor=f"C-{'W' if dw else 'R'}{nd}" if pl == "pg" else None,
                    )
                )
    for dw in (True, False):
        # One 64 KiB buffer over two adjacent regions (issue 13: >= 0.8x memcpy).
        out.append(Row("Cx", (lambda dw=dw: W.make_c_cross(dw)), ref="memcpy", goal=("ref", 0.8)))
    for dw in (True, False):
        for pl in W.ALIGNMENTS:
            out.append(
                Row(
                    "Cs",
                    (lambda dw=dw, pl=pl: W.make_c_cython(16, dw, pl, spread=True)),
                    ref="memcpy",
                    info=True,
                )
            )
    out.append(Row("copy", lambda: W.make_memcpy("pg", True, "vq"), ref="memcpy", info=True))
    for pl in ("+1", "+16", "ba"):
        for to_host in (True, False):
            for mode in ("libc", "vq"):
                out.append(
                    Row(
                        "copy",
                        (lambda pl=pl, th=to_host, m=mode: W.make_memcpy(pl, th, m)),
                        ref="memcpy",
                        info=True,
                        anchor="memcpy16" if (pl, to_host, mode) == ("+16", True, "libc") else None,
                    )
                )
    for dw in (True, False):
        for nd in W.NDESCS:
            out.append(
                Row("Cpy", (lambda nd=nd, dw=dw: W.make_c_python(nd, dw, "pg")), ref="memcpy", info=True)
            )
    out.append(Row("fd", W.make_fd_preadv))
    out.append(Row("fd", lambda: W.make_fd_writer(16), ref="preadv", goal=("ref", 0.9)))
    out.append(Row("fd", lambda: W.make_fd_writer(16, spread=True), ref="preadv", info=True))
    out.append(Row("fd", lambda: W.make_fd_preadv_c(1), ref="preadv", info=True))
    out.append(Row("fd", lambda: W.make_fd_preadv_c(16), ref="preadv-c1", info=True))
    out.append(Row("fd", lambda: W.make_fd_writer_cython(16), ref="preadv-c1", info=True))
    out.append(Row("fd", lambda: W.make_fd_writer_cython(16, 2), ref="preadv-c1", info=True))
    return out


SECTION_TITLES = {
    "A": "Workload A/B: pop + add_used of 1-descriptor chains (queue 256, batches of 256), Mchains/s",
    "C": "Workload C: 64 KiB through Writer/Reader, Cython level, GB/s (ratio vs page-aligned memcpy)",
    "Cx": "Workload C with its one buffer over two adjacent regions (two segments), GB/s",
    "Cs": "Workload C with the 16 buffers spread (a page unused after each: nothing to join), information",
    "copy": "Copy routines, 64 KiB, GB/s (G = page-aligned guest side, H = host buffer)",
    "Cpy": "Workload C through the Python API (information)",
    "fd": "fd I/O: 64 KiB file in the page cache -> 16-descriptor chain, GB/s",
}


# ------------------------------------------------------------------ measuring


def measure(wl: W.Workload, n: int, secs: float) -> float:
    t0 = time.perf_counter()
    units = 0
    while True:
        units += wl.run(n)
        dt = time.perf_counter() - t0
        if dt >= secs:
            return units / dt


def calibrate(wl: W.Workload, target: float) -> int:
    n = 1
    while True:
        t0 = time.perf_counter()
        wl.run(n)
        dt = time.perf_counter() - t0
        if dt >= target or n >= 1 << 24:
            return n
        n *= 2 if dt * 8 >= target else 8


def cpu_times() -> tuple[float, float, float]:
    """(busy, idle, steal) jiffies over all CPUs from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            parts = [float(x) for x in f.readline().split()[1:]]
    except OSError:
        return (0.0, 0.0, 0.0)
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    steal = parts[7] if len(parts) > 7 else 0.0
    return (sum(parts[:8]) - idle - steal, idle, steal)


def cpu_report(t0: tuple[float, float, float], t1: tuple[float, float, float]) -> str:
    busy, idle, steal = (b - a for a, b in zip(t0, t1, strict=True))
    total = busy + idle + steal
    if total <= 0:
        return "n/a"
    ncpu = os.cpu_count() or 1
    return (
        f"{ncpu} CPUs {100 * busy / total:.0f}% busy on average "
        f"(this benchmark keeps one busy: {100 / ncpu:.0f}%), {100 * steal / total:.1f}% stolen"
    )


# ------------------------------------------------------------------ anchor


ANCHOR_LINE = re.compile(
    r"^(?P<name>\S+)\s+(?P<what>.+?)\s+(?P<med>[\d.]+)\s+(?P<min>[\d.]+)\s+(?P<max>[\d.]+)\s+"
    r"(?P<unit>Mchains/s|GB/s)\s+(?P<ns>[\d.]+)\s+(?P<ratio>\S+)\s*$"
)


def parse_anchor(text: str) -> dict[str, dict[str, float | str]]:
    out: dict[str, dict[str, float | str]] = {}
    for line in text.splitlines():
        m = ANCHOR_LINE.match(line)
        if m:
            scale = 1e6 if m["unit"] == "Mchains/s" else 1e9
            out[m["name"]] = {
                "median": float(m["med"]) * scale,
                "min": float(m["min"]) * scale,
                "max": float(m["max"]) * scale,
                "unit": m["unit"],
                "ratio": m["ratio"],
            }
    return out


def run_anchor(
    path: Path | None, reps: int, secs: float
) -> tuple[dict[str, dict[str, float | str]], str]:
    """Run the anchor once; returns (figures by name, status text).  Never raises."""
    if path is None:
        return {}, "n/a (no anchor program: give --anchor-path PROGRAM or QUEUE_ANCHOR_RUN)"
    if not path.exists():
        return {}, f"n/a ({path} not found)"
    if shutil.which("cargo") is None and not (Path.home() / ".cargo/bin/cargo").exists():
        return {}, "n/a (cargo not found)"
    cmd = [str(path), "--", "--reps", str(reps), "--secs", str(secs)]
    print(f"running the anchor: {' '.join(cmd)}", file=sys.stderr, flush=True)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return {}, f"n/a ({e})"
    figs = parse_anchor(p.stdout)
    if p.returncode != 0 or not figs:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {}, f"n/a (exit {p.returncode}: {' | '.join(tail)})"
    extra = [ln for ln in p.stdout.splitlines() if ln.startswith("cpu ")]
    return figs, "; ".join(" ".join(ln.split()) for ln in extra) or "ok"


class Anchor:
    """The anchor run interleaved with our reps: one anchor repetition (a separate
    run of the program) before each of our rounds, so that load drifts hit both
    sides alike.  Figures: median/min/max over those runs."""

    def __init__(self, path: Path | None, secs: float) -> None:
        self.path = path
        self.secs = secs
        self.samples: dict[str, list[float]] = {}
        self.units: dict[str, str] = {}
        self.status: list[str] = []
        self.failed: str | None = None

    def rep(self) -> None:
        if self.failed:
            return
        figs, status = run_anchor(self.path, 1, self.secs)
        if not figs:
            self.failed = status
            return
        self.status.append(status)
        for name, f in figs.items():
            self.samples.setdefault(name, []).append(float(f["median"]))
            self.units[name] = str(f["unit"])

    def figures(self) -> dict[str, dict[str, float | str]]:
        out: dict[str, dict[str, float | str]] = {}
        mc = statistics.median(self.samples["memcpy"]) if "memcpy" in self.samples else None
        for name, v in self.samples.items():
            med = statistics.median(v)
            ratio = f"{med / mc:.3f}" if mc and self.units[name] == "GB/s" else "-"
            out[name] = {
                "median": med,
                "min": min(v),
                "max": max(v),
                "unit": self.units[name],
                "ratio": ratio,
            }
        return out

    def summary(self) -> str:
        if self.failed and not self.samples:
            return self.failed
        n = len(next(iter(self.samples.values()), []))
        text = f"rust-vmm virtio-queue 0.18, {n} runs x 1 rep x >= {self.secs} s, interleaved with ours"
        if self.status:
            text += f"; last run: {self.status[-1]}"
        if self.failed:
            text += f"; a later run failed: {self.failed}"
        return text


# ------------------------------------------------------------------ table


def fmt(v: float, unit: str) -> str:
    return f"{v / (1e6 if unit == 'chains' else 1e9):.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="repetitions per figure (round-robin)")
    ap.add_argument("--secs", type=float, default=0.3, help="minimum seconds per measurement")
    ap.add_argument(
        "--anchor",
        action="store_true",
        default=os.environ.get("QUEUE_ANCHOR") == "1",
        help="run the Rust anchor in the same session (or QUEUE_ANCHOR=1)",
    )
    anchor_env = os.environ.get("QUEUE_ANCHOR_RUN", "").strip()
    ap.add_argument(
        "--anchor-path",
        type=Path,
        default=Path(anchor_env) if anchor_env else None,
        metavar="PROGRAM",
        help="the anchor program (or QUEUE_ANCHOR_RUN); without one the anchor columns say n/a",
    )
    ap.add_argument("--anchor-secs", type=float, default=1.0)
    ap.add_argument("--only", default=None, help="regex on row names (references are kept)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = ap.parse_args(argv)

    load0 = os.getloadavg()
    anchor_run = Anchor(args.anchor_path, args.anchor_secs) if args.anchor else None

    table = rows()
    for r in table:
        r.wl = r.make()
    names = {r.name: r for r in table}
    if args.only:
        pat = re.compile(args.only)
        keep = {r.name for r in table if pat.search(r.name)}
        keep |= {r.ref for r in table if r.name in keep and r.ref}
        for r in table:
            if r.name not in keep and r.wl and r.wl.close:
                r.wl.close()
        table = [r for r in table if r.name in keep]

    by_name = {r.name: r for r in table}
    print(f"checking and calibrating {len(table)} figures ...", file=sys.stderr, flush=True)
    for r in table:
        assert r.wl is not None
        r.wl.check()
        r.n = calibrate(r.wl, min(0.02, args.secs / 10))
        measure(r.wl, r.n, min(0.1, args.secs / 3))  # warm-up
    cpu0 = cpu_times()
    t0 = time.time()
    for rep in range(args.reps):
        print(f"rep {rep + 1}/{args.reps}", file=sys.stderr, flush=True)
        if anchor_run:
            anchor_run.rep()
        # Each row with a reference is bracketed by measurements of it, so that its
        # ratio compares figures taken seconds apart, not a round apart (this
        # machine's speed drifts by 10-30% within a round).
        last: dict[str, float] = {}
        for r in table:
            assert r.wl is not None
            ref_row = by_name.get(r.ref) if r.ref else None
            if ref_row is not None and ref_row.wl is not None:
                before = last.get(ref_row.name)
                if before is None:
                    before = measure(ref_row.wl, ref_row.n, args.secs)
            r.samples.append(measure(r.wl, r.n, args.secs))
            last = {r.name: r.samples[-1]}
            if ref_row is not None and ref_row.wl is not None:
                after = measure(ref_row.wl, ref_row.n, args.secs)
                r.ref_samples.append((before + after) / 2)
                last[ref_row.name] = after
    elapsed = time.time() - t0
    cpu1 = cpu_times()
    load1 = os.getloadavg()
    for r in table:
        if r.wl and r.wl.close:
            r.wl.close()

    anchor = anchor_run.figures() if anchor_run else {}
    anchor_status = anchor_run.summary() if anchor_run else "not run (use --anchor or QUEUE_ANCHOR=1)"
    med = {r.name: statistics.median(r.samples) for r in table}
    ba = names.get("C-W1@ba")
    ba_align = ""
    if ba and ba.wl:
        host = ba.wl.keep[-1]
        ba_align = f"; the bytearray host buffers sit at address % 64 = {host.address % 64}"  # type: ignore[attr-defined]

    hdr = (
        f"{'name':<14} {'what':<56} {'median':>8} {'min':>8} {'max':>8}  {'ratio':>7} {'vs':<7}"
        f" {'best':>6} {'goal':<22} {'anchor':>8} {'anc.ratio':>9} {'ours/anc':>8}"
    )
    print()
    print(
        "virtio_queue benchmark (the anchor's workloads); 'ratio' = median over the "
        "rounds of figure / the reference named in 'vs' measured just before and after it (mean); "
        "'best' = max / max of those references"
    )
    print(
        f"python {sys.version.split()[0]}, {args.reps} reps x >= {args.secs} s, round-robin, "
        f"{elapsed:.0f} s{ba_align}"
    )
    verdicts = []
    section = None
    out_json = []
    for r in table:
        assert r.wl is not None
        if r.section != section:
            section = r.section
            print()
            print(SECTION_TITLES[section])
            print(hdr)
        unit = r.wl.unit
        m = med[r.name]
        # ratio: median over the rounds of this round's figure / this round's reference
        # (both measured within one round, so slow load drifts cancel); best: max / max.
        ratio = best = None
        if r.ref and r.ref in by_name:
            ratio = statistics.median(a / b for a, b in zip(r.samples, r.ref_samples, strict=True))
            best = max(r.samples) / max(r.ref_samples)
        a = anchor.get(r.anchor or "")
        a_med = float(a["median"]) if a else None
        goal_txt = ""
        ok = None
        if r.goal:
            kind, val = r.goal
            if kind == "ref":
                goal_txt = f">={val}x {r.ref}"
                ok = ratio is not None and ratio >= val
            elif kind == "abs":
                goal_txt = f">={val / 1e6:g} M/s"
                ok = m >= val
            else:
                goal_txt = f">={val}x anchor"
                ok = None if a_med is None else m / a_med >= val
            goal_txt += ": " + ("n/a" if ok is None else "MET" if ok else "MISS")
            verdicts.append((r.name, goal_txt, ok))
        a_ratio = str(a["ratio"]) if a else ("n/a" if r.anchor else "")
        print(
            f"{r.name:<14} {r.wl.what[:56]:<56} {fmt(m, unit):>8} {fmt(min(r.samples), unit):>8} "
            f"{fmt(max(r.samples), unit):>8}  {f'{ratio:.3f}' if ratio is not None else '':>7} "
            f"{r.ref or '':<7} {f'{best:.3f}' if best is not None else '':>6} {goal_txt:<22} "
            f"{fmt(a_med, unit) if a_med else ('n/a' if r.anchor else ''):>8} {a_ratio:>9} "
            f"{f'{m / a_med:.2f}' if a_med else ('n/a' if r.anchor else ''):>8}"
        )
        out_json.append(
            {
                "name": r.name,
                "what": r.wl.what,
                "unit": unit,
                "samples": r.samples,
                "median": m,
                "ref": r.ref,
                "ratio": ratio,
                "best_ratio": best,
                "goal": goal_txt or None,
                "anchor": r.anchor,
                "anchor_median": a_med,
            }
        )
    # the A-py goal also has a same-run ratio to the Python model: shown in the A-py row.
    print()
    print(
        "units: A rows Mchains/s, the other rows GB/s (1e9 B/s); 'anchor' = the Rust figure, "
        "'anc.ratio' = its own ratio to its memcpy"
    )
    print(f"anchor  : {anchor_status}")
    print(
        f"load    : {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} at start, "
        f"{load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} at end (1/5/15 min)"
    )
    print(f"cpu     : during our measurements {cpu_report(cpu0, cpu1)}")
    if verdicts:
        parts = []
        for label, want in (("MISS", False), ("n/a", None), ("met", True)):
            names_ = [n for n, _, ok in verdicts if ok is want]
            if names_:
                parts.append(f"{label}: {', '.join(names_)}")
        print("goals   : " + "; ".join(parts))
    if args.json:
        args.json.write_text(
            json.dumps(
                {"rows": out_json, "anchor": anchor, "anchor_status": anchor_status, "load": [load0, load1]},
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
