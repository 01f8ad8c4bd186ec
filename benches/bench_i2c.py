"""vhost-device-i2c round trips on the simulated adapter (``i2c_table.py``), as a smoke run.

``pytest benches --benchmark-disable`` (the CI smoke run) runs each shape a few times
against both daemons and checks the answers once; the figures with their reference
(``vhost-device-template`` with the same chains, alternating samples) come from
``python benches/i2c_table.py``.
"""

from __future__ import annotations

from typing import Any

import i2c_table as T
import pytest

pytestmark = pytest.mark.slow


def test_i2c_round_trip_shapes(benchmark: Any) -> None:
    res = benchmark.pedantic(T.measure, args=(1, 10, T.SHAPES), rounds=1, iterations=1)
    assert set(res) == set(T.SHAPES)
    for ti, tt in res.values():
        assert len(ti) == len(tt) == 1
