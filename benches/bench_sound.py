"""vhost-device-sound through our front-end (issue 21's speed figures).

``pytest benches --benchmark-disable`` runs one short session once (CI's smoke
run) and checks its result untimed: every buffer completed, the daemon's CPU time
counted.  The figures themselves (CPU per stream second, arrival -> completion
against the period, xruns; upstream's beside ours when ``$VHOST_DEVICE_RUST_BIN``
has it) come from ``python benches/sound_table.py``, run by hand.
"""

from __future__ import annotations

from typing import Any

import pytest
import sound_table as T

pytestmark = pytest.mark.slow


def test_sound_null_playback_and_capture(benchmark: Any) -> None:
    result = benchmark.pedantic(T.run_once, args=("ours", 0.1, 5.0), rounds=1, iterations=1)
    keys = {"cpu_tx_flat", "cpu_tx_rt", "cpu_tx_ev", "cpu_rx_ev", "latency", "tx4_min", "xruns"}
    assert keys <= set(result)
    assert result["latency"] > 0 and result["cpu_tx_ev"] >= 0 and result["cpu_rx_ev"] >= 0


def test_wake_floor_both_modes(tmp_path: Any) -> None:
    """The C floor beside the daemons' rows: builds, runs both modes, counts CPU."""
    exe = T.build_floor(str(tmp_path))
    if exe is None:
        pytest.skip("no C compiler ($CC or cc) to build benches/wake_floor.c")
    out = T.floor_once(exe, 1.0, 20)
    # The on-CPU keys come too where perf events are allowed.
    assert {"device_dev", "device_drv", "driver_dev", "driver_drv"} <= set(out)
    assert all(v > 0 for v in out.values())
