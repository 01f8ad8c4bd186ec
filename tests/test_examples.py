"""The worked examples run as a user would run them (README "Embedding a device in your VMM")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_embed_rng_prints_the_guest_bytes(tmp_path: Path) -> None:
    """examples/embed_rng.py: the guest's request is filled from the source through
    virtio-mmio under asyncio, and the script prints exactly those bytes."""
    source = tmp_path / "entropy.bin"
    data = bytes((i * 37 + 11) & 0xFF for i in range(100))
    source.write_bytes(data)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "embed_rng.py"), "-n", "32", "-f", str(source)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=True,
    )
    assert out.stdout.strip() == data[:32].hex()
    assert "virtio_mmio.device=0x200@0xd0000000:5" in out.stderr
