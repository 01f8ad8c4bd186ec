"""vhost-device-input's command line: parser, Config, run() wiring, main() exit codes.

Mirrors upstream's ``verify_cmd_line_arguments`` (rust-vmm/vhost-device
``vhost-device-input/src/main.rs``) and adds our ``sim:`` entries and
``VHD_INPUT_GRAB``.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from vhost_backends.cli import input as cli
from vhost_backends.cli._common import ConfigError
from virtio_devices.hosts.input import SimInputHost
from virtio_devices.input import InputDevice


def config(*argv: str) -> cli.Config:
    return cli.Config.from_args(cli.build_parser().parse_args(list(argv)))


def usage_error(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv))
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_input_long_flags_as_upstream() -> None:
    c = config("--socket-path=/some/socket_path", "--event-list=/dev/input/event1,/dev/input/event2")
    assert c.socket_paths == ["/some/socket_path0", "/some/socket_path1"]
    assert c.sources == [cli.EventSource("/dev/input/event1"), cli.EventSource("/dev/input/event2")]
    assert not c.grab


def test_input_short_flags_and_repeated_event_list() -> None:
    c = config("-s=/some/socket_path", "-e", "/dev/input/event1", "-e", "/dev/input/event2,/dev/input/event3")
    assert [s.path for s in c.sources] == ["/dev/input/event1", "/dev/input/event2", "/dev/input/event3"]
    assert c.socket_paths[-1] == "/some/socket_path2"


def test_input_one_device_still_suffixed() -> None:
    assert config("-s", "/tmp/in.sock", "-e", "/dev/input/event0").socket_paths == ["/tmp/in.sock0"]


def test_input_sim_entries_and_default_control_paths() -> None:
    c = config("-s", "/tmp/in.sock", "-e", "/dev/input/event0,sim:keyboard,sim:tablet")
    assert c.sources == [
        cli.EventSource("/dev/input/event0"),
        cli.EventSource("sim:keyboard", "keyboard", "/tmp/in.sock1.ctl"),
        cli.EventSource("sim:tablet", "tablet", "/tmp/in.sock2.ctl"),
    ]


def test_input_sim_control_flag_appends_the_index() -> None:
    c = config("-s", "/tmp/in.sock", "-e", "sim:keyboard,sim:tablet", "--sim-control", "/run/in.ctl")
    assert [s.control for s in c.sources] == ["/run/in.ctl0", "/run/in.ctl1"]


def test_input_sim_control_without_file_name() -> None:
    with pytest.raises(ConfigError, match="has no file name"):
        config("-s", "/tmp/in.sock", "-e", "sim:keyboard", "--sim-control", "/run/..")


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ("sim:mouse", "unknown simulated device 'mouse'"),
        ("sim:keyboard=/tmp/x", "unknown simulated device 'keyboard=/tmp/x'"),
        ("/dev/input/event0,,x", "--event-list entry 1 is empty"),
    ],
)
def test_input_bad_entries(entry: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        config("-s", "/tmp/in.sock", "-e", entry)


def test_input_socket_path_without_file_name() -> None:
    with pytest.raises(ConfigError, match="has no file name"):
        config("-s", "/tmp/..", "-e", "sim:keyboard")


@pytest.mark.parametrize(("value", "grab"), [("1", True), ("0", False), ("", False)])
def test_input_grab_setting(monkeypatch: pytest.MonkeyPatch, value: str, grab: bool) -> None:
    monkeypatch.setenv("VHD_INPUT_GRAB", value)
    assert config("-s", "/tmp/x", "-e", "sim:keyboard").grab is grab


def test_input_grab_setting_bad(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VHD_INPUT_GRAB", "yes")
    with pytest.raises(ConfigError, match="VHD_INPUT_GRAB must be 0 or 1, not 'yes'"):
        config("-s", "/tmp/x", "-e", "sim:keyboard")


@pytest.mark.parametrize("argv", [[], ["-s", "/tmp/x"], ["-e", "sim:keyboard"]])
def test_input_required_flags(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert "required" in usage_error(argv, capsys)


def test_input_missing_node_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("evdev", reason="python-evdev (the hosts extra) is not installed")
    missing = tmp_path / "event9"
    assert cli.main(["-s", str(tmp_path / "s"), "-e", str(missing)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --event-list {missing}: cannot open: No such file or directory"]


def test_input_non_evdev_node_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("evdev", reason="python-evdev (the hosts extra) is not installed")
    assert cli.main(["-s", str(tmp_path / "s"), "-e", "/dev/null"]) == 1
    assert (
        capsys.readouterr().err.strip()
        == "error: --event-list /dev/null: not an evdev node (Inappropriate ioctl for device)"
    )


def test_input_control_socket_path_taken_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "s0.ctl").mkdir()
    assert cli.main(["-s", str(tmp_path / "s"), "-e", "sim:keyboard"]) == 1
    assert "control socket" in capsys.readouterr().err


def test_input_run_serves_one_device_per_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_serve(
        prog: str, paths: Sequence[str], factory: Callable[[int], InputDevice], *, default_poll_us: int
    ) -> int:
        seen["prog"], seen["paths"] = prog, list(paths)
        seen["poll"] = default_poll_us
        devs = [factory(0), factory(1), factory(1)]
        seen["hosts"] = [d.host for d in devs]
        seen["grab"] = devs[0].grab
        # The control sockets listen while serving.
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(tmp_path / "s0.ctl"))
            s.sendall(b"INFO\n")
            seen["info"] = s.recv(100)
        return 0

    monkeypatch.setattr(cli, "serve", fake_serve)
    monkeypatch.setenv("VHD_INPUT_GRAB", "1")
    assert cli.main(["-s", str(tmp_path / "s"), "-e", "sim:keyboard,sim:tablet"]) == 0
    assert seen["prog"] == "vhost-device-input"
    assert seen["paths"] == [str(tmp_path / "s0"), str(tmp_path / "s1")]
    kbd, tab, tab2 = seen["hosts"]
    assert isinstance(kbd, SimInputHost) and kbd.kind == "keyboard" and tab.kind == "tablet"
    assert tab is tab2  # one host per entry, shared by the connections of its socket
    assert seen["grab"] is True
    assert seen["poll"] == 0  # no ring polling unless VHD_POLL_US asks for it
    assert seen["info"] == b"ok vhost-device-input simulated keyboard\n"
    # Closed afterwards: control sockets removed, eventfds closed.
    assert not (tmp_path / "s0.ctl").exists()
    assert kbd.fileno() == -1
