"""vhost-device-input event figures, run once each by CI as a smoke test.

The timed comparison (each figure beside its reference, interleaved repetitions)
is ``benches/input_table.py``, run by hand; here each workload runs once and its
result is checked, so that the script cannot rot.
"""

from __future__ import annotations

from typing import Any

import input_table as T
import pytest

pytestmark = pytest.mark.slow


def test_input_event_latency_and_rate_through_the_daemon(benchmark: Any) -> None:
    with T.bench() as b:
        assert T.lat_event(b, 5) > 0
        assert T.lat_info(b, 5) > 0
        benchmark.pedantic(T.rate_daemon, args=(b, 50), rounds=1, iterations=1)


def test_input_event_rate_in_process(benchmark: Any) -> None:
    benchmark.pedantic(T.rate_inprocess, args=(50,), rounds=1, iterations=1)
