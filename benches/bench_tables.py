"""The table scripts run end to end (a smoke test: one tiny repetition each).

``queue_table.py``, ``daemon_table.py``, ``gpio_table.py`` and ``vsock_table.py`` print
the README's speed tables by hand; this only proves they still run through every
figure and print them (the Rust anchor and daemons are left out: CI never builds or
runs them).
"""

from __future__ import annotations

import daemon_table
import gpio_table
import pytest
import queue_table
import vsock_table


def test_queue_table_prints_every_section(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("QUEUE_ANCHOR", raising=False)
    assert queue_table.main(["--reps", "1", "--secs", "0.002"]) == 0
    out = capsys.readouterr().out
    for row in ("A-py ", "C-R16@ba ", "C-W16s@+1 ", "vq-G->H@+16 ", "fd-W16 ", "fdc-W16x "):
        assert row in out, row
    assert "goals   :" in out


def test_daemon_table_prints_every_section(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(daemon_table.RUST_ENV, raising=False)
    argv = ["--reps", "1", "--secs", "0.02", "--rt-count", "20", "--startups", "1"]
    assert daemon_table.main([*argv, "--par-secs", "0.05", "--par-reps", "1"]) == 0
    out = capsys.readouterr().out
    for section in ("rng throughput", "round trip", "daemon memory", "start-up", "-c N"):
        assert section in out, section
    for row in ("     1 ", "    64 ", "   s16 ", "   s64 "):
        assert row in out, row


def test_gpio_table_prints_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpio_table.main(["--reps", "1", "--secs", "0.02", "--edges", "5"]) == 0
    out = capsys.readouterr().out
    for row in (
        "rng 1-byte round trip",
        "GET_VALUE round trip",
        "SET_VALUE round trip",
        "edge -> eventq",
        "Rust",
    ):
        assert row in out, row
    # The in-process runs that --callgrind counts (valgrind itself is left out).
    for kind in ("rng", "get", "set"):
        gpio_table.inprocess_run(kind, 5)


def test_vsock_table_prints_every_row(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every row with the batched driver and the previous one (``--old-driver``),
    each with its per-packet CPU line."""
    monkeypatch.delenv("VHOST_DEVICE_RUST_BIN", raising=False)
    argv = ["--reps", "1", "--mib", "1", "--conns", "5", "--vms", "1", "--old-driver"]
    assert vsock_table.main(argv) == 0
    out = capsys.readouterr().out
    for row in ("guest->host 64 KiB", "guest->host 4 KiB", "host->guest 64 KiB", "host->guest 4 KiB"):
        assert f"{row} (MiB/s)" in out, row
        for name in ("ours", "ours" + vsock_table.OLD):
            assert f"  {row}, {name}, per packet: CPU µs driver" in out, (row, name)
    assert "connections/s" in out
    assert "with the previous driver: ours" in out
