"""pytest configuration of the benchmarks (STYLE.md §8).

``pytest benches`` collects ``bench_*.py`` (the files are named after what they
measure, not ``test_*``).  CI runs ``pytest benches --benchmark-disable``: each
benchmark then runs its workload once, as a smoke test; every benchmark also checks
its result once, untimed (used ring contents, copied bytes).  No test asserts on
timing.

With timing on, each figure is measured beside a reference taken in the same run
(page-aligned memcpy, the Python model, a bare ``os.preadv``); the ratios are printed
at the end of the session.  ``benches/queue_table.py`` prints the full comparison table
(and the Rust anchor's figures); it is for runs by hand.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import vq_workloads as W  # noqa: E402


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    # Files named on the command line are collected by pytest itself already.
    if parent.session.isinitpath(file_path):
        return None
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


# name -> (units per call, unit, reference name or None, benchmark fixture)
_FIGURES: dict[str, tuple[int, str, str | None, Any]] = {}


def run_figure(
    benchmark: Any, wl: W.Workload, n: int, ref: str | None = None, group: str | None = None
) -> None:
    """Check ``wl`` once, then benchmark ``wl.run(n)`` and register the figure for the
    ratio summary.  With --benchmark-disable, ``run(n)`` runs once."""
    try:
        wl.check()
        benchmark.group = group
        benchmark.name = wl.name
        benchmark.extra_info.update({"what": wl.what, "unit": wl.unit, "units_per_call": n, "ref": ref})
        done = benchmark(wl.run, n)
        assert done > 0
        _FIGURES[wl.name] = (done, wl.unit, ref, benchmark)
    finally:
        if wl.close:
            wl.close()


@pytest.fixture
def figure(benchmark: Any) -> Iterator[Any]:
    """``figure(workload, n, ref=None, group=None)``: see :func:`run_figure`."""
    yield lambda wl, n, ref=None, group=None: run_figure(benchmark, wl, n, ref, group)


def _rate(entry: tuple[int, str, str | None, Any]) -> float | None:
    done, _unit, _ref, bm = entry
    stats = getattr(bm, "stats", None)
    if stats is None or getattr(bm, "disabled", False):
        return None
    med = stats.stats.median
    return done / med if med else None


def pytest_terminal_summary(terminalreporter: Any) -> None:
    rows = []
    for name, entry in _FIGURES.items():
        rate = _rate(entry)
        if rate is None:
            continue
        unit = entry[1]
        ref = entry[2]
        ratio = ""
        if ref and ref in _FIGURES:
            ref_rate = _rate(_FIGURES[ref])
            if ref_rate:
                ratio = f"{rate / ref_rate:.3f}x {ref}"
        scale, u = (1e6, "Mchains/s") if unit == "chains" else (1e9, "GB/s")
        rows.append(f"{name:<16} {rate / scale:10.3f} {u:<10} {ratio}")
    if rows:
        terminalreporter.section("figures (median) and ratios to the same-run reference")
        for r in rows:
            terminalreporter.write_line(r)
