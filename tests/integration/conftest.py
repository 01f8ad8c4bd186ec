"""Fixtures for integration tests: an echo daemon in a subprocess, driven by our Frontend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_process import DaemonProcess

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


@pytest.fixture
def echo_daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(str(tmp_path / "echo.sock"))
    try:
        d.wait_for("listening")
        yield d
    finally:
        if d.alive():
            d.proc.kill()
        d.terminate()
