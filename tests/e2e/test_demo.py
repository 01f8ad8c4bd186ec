"""The README's main job: ``scripts/demo-rng`` (what ``./run-demo`` ends with)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("vhost-device-rng") is None, reason="vhost-device-rng is not installed")
def test_demo_rng_guest_reads_hwrng_and_cleans_up(guest: object) -> None:
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo-rng"), "--bytes", "65536"],
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "guest hwrng: virtio_rng" in res.stdout
    assert "read 65536 bytes" in res.stdout
    assert "00000000 " in res.stdout  # the hexdump of the first bytes
    # Nothing left behind: no daemon of the demo still running.
    ps = subprocess.run(["pgrep", "-f", "demo-rng-"], capture_output=True, text=True, check=False)
    assert ps.stdout.strip() == ""
