"""Device daemons through our front-end: ``vhost-device-rng`` throughput (STYLE.md §8).

Figures, each beside a reference measured in the same run:

* 4 KiB requests, batches of 1, 16 and 64 chains per kick: our daemon, the Rust
  ``vhost-device-rng`` (from ``$VHOST_DEVICE_RUST_BIN``; skipped when absent), and
  a plain ``readv`` of the same source (``/dev/urandom``) in 4 KiB pieces;
* ``-c N`` (N = 1, 2, 4): aggregate throughput of N front-end processes against one
  daemon serving N sockets.

The daemons run as subprocesses (``python -m vhost_backends.cli.rng`` for ours) and
are stopped at teardown.  Every front-end checks the device once, untimed: the
buffers are filled whole, with bytes that are not constant and not repeated.
``pytest benches --benchmark-disable`` runs each workload once (the CI smoke run);
``python benches/daemon_table.py`` prints every figure in one table.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import daemon_table as D
import pytest

pytestmark = pytest.mark.slow

CHAINS_PER_CALL = 64  # requests per timed call, whatever the batch size


@pytest.fixture(scope="module")
def summary(request: pytest.FixtureRequest) -> Iterator[dict[str, tuple[float, str, str | None]]]:
    """name -> (rate, unit, reference name); printed with ratios after the module."""
    rows: dict[str, tuple[float, str, str | None]] = {}
    yield rows
    D.write_summary(request.config, "rng daemon throughput", rows)


def _record(
    benchmark: Any,
    summary: dict[str, tuple[float, str, str | None]],
    name: str,
    units: float,
    ref: str | None,
) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is None or getattr(benchmark, "disabled", False):
        return
    med = stats.stats.median
    if med:
        summary[name] = (units / med / 1e6, "MB/s", ref)


@pytest.fixture(scope="module")
def tmpdir_mod(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rng-daemons")


@pytest.fixture(scope="module", params=D.KINDS)
def rng_client(request: pytest.FixtureRequest, tmpdir_mod: Path) -> Iterator[tuple[str, D.RngClient]]:
    """One daemon of each kind with one connected, checked front-end (4 KiB buffers)."""
    kind: str = request.param
    with D.running(kind, tmpdir_mod) as d, d.connect() as c:
        c.check()
        yield kind, c


@pytest.mark.parametrize("batch", D.BATCHES)
def test_rng_throughput(
    benchmark: Any, summary: Any, rng_client: tuple[str, D.RngClient], batch: int
) -> None:
    kind, client = rng_client
    batches = max(1, CHAINS_PER_CALL // batch)
    benchmark.group = f"rng 4KiB batch {batch}"
    benchmark.extra_info.update({"unit": "bytes", "units_per_call": batches * batch * D.REQ_SIZE})
    done = benchmark(client.run, batch, batches)
    assert done == batches * batch * D.REQ_SIZE
    _record(benchmark, summary, f"{kind} batch {batch}", done, f"ref readv batch {batch}")


@pytest.mark.parametrize("batch", D.BATCHES)
def test_rng_source_reference(benchmark: Any, summary: Any, batch: int) -> None:
    """The reference: 4 KiB ``readv`` calls from the same source, as many per call as
    a daemon call serves (timed beside each batch size, so that each ratio has its
    own same-run reference)."""
    ref = D.SourceReader()
    try:
        data = os.read(ref.fd, 64)
        assert len(set(data)) > 1
        benchmark.group = f"rng 4KiB batch {batch}"
        done = benchmark(ref.run, CHAINS_PER_CALL)
        assert done == CHAINS_PER_CALL * D.REQ_SIZE
        _record(benchmark, summary, f"ref readv batch {batch}", done, None)
    finally:
        ref.close()


@pytest.mark.parametrize("kind", D.KINDS)
@pytest.mark.parametrize("n", [1, 2, 4])
def test_rng_sockets_parallel(benchmark: Any, summary: Any, tmpdir_mod: Path, kind: str, n: int) -> None:
    """``-c N``: N front-end processes (batch 64) on one daemon; aggregate bytes/s."""
    secs = 0.05 if getattr(benchmark, "disabled", False) else 0.5
    sub = tmpdir_mod / f"par-{kind}-{n}"
    sub.mkdir()
    with D.running(kind, sub, count=n) as d:
        rates: list[float] = []
        benchmark.group = "rng -c N aggregate"
        benchmark.pedantic(
            lambda: rates.append(D.parallel_rate(d, n, 64, secs)), rounds=1 if secs < 0.1 else 3
        )
        assert rates and all(r > 0 for r in rates)
        med = sorted(rates)[len(rates) // 2]
        benchmark.extra_info.update({"aggregate_MBps": med / 1e6, "rates_MBps": [r / 1e6 for r in rates]})
        if not getattr(benchmark, "disabled", False):
            summary[f"{kind} -c {n}"] = (med / 1e6, "MB/s", f"{kind} -c 1" if n > 1 else None)
