"""virtio-rng through virtio-mmio in-process beside vhost-user (issue 15's speed figures).

* 1 request (4 KiB) per kick: the in-process mmio client of ``mmio_table.py``
  against our daemon driven by the benchmark front-end of ``daemon_table.py``;
  the summary prints mmio's rate as a ratio of vhost-user's from the same run;
* one QueueNotify write on an empty queue against ``process_queue`` called directly.

``pytest benches --benchmark-disable`` runs each once (CI's smoke run); the full
interleaved table is ``python benches/mmio_table.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import daemon_table as D
import mmio_table as M
import pytest

pytestmark = pytest.mark.slow

KICKS = 64  # 1-request kicks per timed call


@pytest.fixture(scope="module")
def summary(request: pytest.FixtureRequest) -> Iterator[dict[str, tuple[float, str, str | None]]]:
    rows: dict[str, tuple[float, str, str | None]] = {}
    yield rows
    D.write_summary(request.config, "rng 1-request kicks, mmio in-process vs vhost-user", rows)


def _record(
    benchmark: Any, rows: dict[str, tuple[float, str, str | None]], name: str, ref: str | None
) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is None or getattr(benchmark, "disabled", False):
        return
    if stats.stats.median:
        rows[name] = (KICKS / stats.stats.median, "req/s", ref)


def test_mmio_one_request_kicks(benchmark: Any, summary: Any) -> None:
    client = M.MmioRngClient()
    try:
        client.check()
        benchmark.group = "rng 1 request per kick"
        done = benchmark(client.run, 1, KICKS)
        assert done == KICKS * D.REQ_SIZE
        _record(benchmark, summary, "mmio", "vhost-user")
    finally:
        client.close()


def test_vhost_user_one_request_kicks(benchmark: Any, summary: Any, tmp_path: Path) -> None:
    with D.running("ours", tmp_path) as d, d.connect() as c:
        c.check()
        benchmark.group = "rng 1 request per kick"
        done = benchmark(c.run, 1, KICKS)
        assert done == KICKS * D.REQ_SIZE
        _record(benchmark, summary, "vhost-user", None)


@pytest.mark.parametrize("path", ["transport.write", "process_queue"])
def test_queue_notify_cost(benchmark: Any, path: str) -> None:
    client = M.MmioRngClient()
    try:
        write, process = client.transport.write, client.device.process_queue
        fn = (lambda: write(0x50, 4, 0)) if path == "transport.write" else (lambda: process(0))
        benchmark.group = "QueueNotify, empty queue"
        benchmark(fn)
        assert client.mock.used_idx() == client.last_used  # nothing was available
    finally:
        client.close()
