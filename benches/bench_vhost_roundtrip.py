"""vhost-user daemon round trips and lifecycle: ``vhost-device-rng`` (STYLE.md §8).

Figures, each beside a reference measured in the same run:

* kick -> used notification of a 1-byte request through our front-end, for our
  daemon and the Rust one (``$VHOST_DEVICE_RUST_BIN``; skipped when absent),
  against an eventfd ping-pong between two processes (same wait on our side);
* start-up: before ``Popen`` to a ``connect`` that succeeds (median of several
  starts), ours beside the Rust daemon's;
* memory: VmRSS and VmHWM of the daemon after serving (not timed; printed).

``pytest benches --benchmark-disable`` runs each once (CI smoke run);
``python benches/daemon_table.py`` prints every figure in one table.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import daemon_table as D
import pytest

pytestmark = pytest.mark.slow

ROUND_TRIPS = 200  # per timed call


@pytest.fixture(scope="module")
def summary(request: pytest.FixtureRequest) -> Iterator[dict[str, tuple[float, str, str | None]]]:
    """name -> (value, unit, reference name); printed with ratios after the module."""
    rows: dict[str, tuple[float, str, str | None]] = {}
    yield rows
    D.write_summary(request.config, "rng daemon round trip / lifecycle", rows)


@pytest.mark.parametrize("kind", D.KINDS)
def test_rng_roundtrip(benchmark: Any, summary: Any, tmp_path: Path, kind: str) -> None:
    """Kick -> used notification of one 1-byte request (batch of 1), then the daemon's
    memory after serving."""
    with D.running(kind, tmp_path) as d, d.connect(req_size=1) as c:
        c.check()
        benchmark.group = "rng 1-byte round trip"
        done = benchmark(c.run, 1, ROUND_TRIPS)
        assert done == ROUND_TRIPS
        mem = d.memory_kib()
        benchmark.extra_info.update({"round_trips_per_call": ROUND_TRIPS, **mem})
        stats = getattr(benchmark, "stats", None)
        if stats is not None and not getattr(benchmark, "disabled", False):
            summary[f"{kind} round trip"] = (
                stats.stats.median / ROUND_TRIPS * 1e6,
                "us",
                "ref eventfd ping-pong",
            )
        summary[f"{kind} VmRSS after"] = (mem["VmRSS"] / 1024, "MiB", None)
        summary[f"{kind} VmHWM after"] = (mem["VmHWM"] / 1024, "MiB", None)


def test_eventfd_pingpong_reference(benchmark: Any, summary: Any) -> None:
    pp = D.EventfdPingPong()
    try:
        benchmark.group = "rng 1-byte round trip"
        assert benchmark(pp.run, ROUND_TRIPS) == ROUND_TRIPS
        stats = getattr(benchmark, "stats", None)
        if stats is not None and not getattr(benchmark, "disabled", False):
            summary["ref eventfd ping-pong"] = (stats.stats.median / ROUND_TRIPS * 1e6, "us", None)
    finally:
        pp.close()


@pytest.mark.parametrize("kind", D.KINDS)
def test_rng_startup(benchmark: Any, summary: Any, tmp_path: Path, kind: str) -> None:
    """Before ``Popen`` -> a ``connect`` succeeds; the timer also covers the stop, so
    the figure is the median of the start-up times the daemon objects recorded."""
    D.skip_absent(kind)
    times: list[float] = []

    def start_stop() -> None:
        d = D.RngDaemon(kind, str(tmp_path))
        try:
            d.wait_listening()
            assert d.t_connect is not None
            times.append(d.t_connect)
        finally:
            rc = d.stop()
        if kind == "ours":
            assert rc == 0, d.stderr()

    rounds = 1 if getattr(benchmark, "disabled", False) else 7
    benchmark.group = "rng daemon start-up"
    benchmark.pedantic(start_stop, rounds=rounds)
    assert len(times) == rounds
    benchmark.extra_info["startup_ms"] = [t * 1e3 for t in times]
    if rounds > 1:
        summary[f"{kind} start-up"] = (statistics.median(times) * 1e3, "ms", None)
