"""The harness itself: a guest without devices boots and runs a script."""

from __future__ import annotations

import harness
import pytest

pytestmark = pytest.mark.qemu


def test_boot_script_output_and_status_propagate(guest: harness.Guest) -> None:
    res = harness.run_guest("uname -r\necho no newline at the end >&2\nprintf tail\nexit 3\n", timeout=90)
    assert res.exit_status == 3, res
    lines = res.output.splitlines()
    assert lines[0] == guest.manifest["kernel_version"], res
    # stderr reaches the console too, and a last line without a newline survives.
    assert lines[1] == "no newline at the end", res
    assert lines[2] == "tail", res
    assert res.uptime_at_start is not None and res.uptime_at_start > 0
    assert res.qemu_returncode == 0  # poweroff -f, not a kill or a panic
    print(f"boot: script started at guest uptime {res.uptime_at_start}s, wall {res.wall_time:.1f}s")


def test_console_without_end_marker_has_no_status() -> None:
    text = f"noise\r\n{harness.BEGIN_MARK} uptime=2.50===\r\nline 1\r\npartial"
    assert harness._parse_console(text) == (None, "line 1\npartial", 2.5)
    text += f"{harness.END_MARK} status=7 uptime=3.00===\r\n"
    assert harness._parse_console(text) == (7, "line 1\npartial", 2.5)
    assert harness._parse_console("kernel panic") == (None, "", None)
