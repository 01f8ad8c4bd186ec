"""The harness itself: a guest without devices boots and runs a script."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import harness
import pytest

if TYPE_CHECKING:
    from conftest import Daemons

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


@pytest.mark.parametrize("min_version", [(10,), (11,)], ids=["qemu10", "qemu11"])
def test_newer_qemu_runs_the_guest_against_our_rng(
    min_version: tuple[int, ...],
    qemu_at_least: Callable[[tuple[int, ...]], str],
    daemon: Daemons,
    sockdir: Path,
) -> None:
    """The QEMU builds beside the system one boot the guest with a vhost-user device of ours."""
    qemu = qemu_at_least(min_version)
    version = harness.qemu_version(qemu)
    assert version is not None and version >= min_version
    sock = sockdir / "rng.sock"
    daemon("rng", "-s", str(sock), socket=f"{sock}0")
    script = "cat /sys/class/misc/hw_random/rng_current\nhead -c 4096 /dev/hwrng | wc -c\n"
    res = harness.run_guest(script, [(f"{sock}0", "vhost-user-rng-pci")], qemu=qemu, timeout=150)
    print(f"QEMU {version}: script started at uptime {res.uptime_at_start}s, wall {res.wall_time:.1f}s")
    assert res.exit_status == 0, res
    assert res.output.split() == ["virtio_rng.0", "4096"], res
