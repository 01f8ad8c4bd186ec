"""vhost-device-gpio's command line: parser, Config, run() wiring, exit codes, and the
``--sim-control`` socket.

Mirrors upstream's ``backend.rs`` tests (``verify_cmd_line_arguments``,
``verify_start_backend``): the socket count, the device list and its errors.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhost_backends.cli import gpio as cli
from vhost_backends.cli._common import ConfigError
from virtio_devices.gpio import GpioDevice
from virtio_devices.hosts.gpio import DIRECTION_IN, DIRECTION_OUT, SimControlServer, SimGpioChip

E = cli.DeviceEntry


def config(*argv: str) -> cli.Config:
    return cli.Config.from_args(cli.build_parser().parse_args(list(argv)))


def test_gpio_config_defaults() -> None:
    assert config("-s", "/tmp/g.sock", "-l", "1") == cli.Config("/tmp/g.sock", 1, (E(False, 1),), None)


def test_gpio_config_long_flags_and_sockets() -> None:
    c = config("--socket-path=/tmp/g.sock", "--socket-count", "4", "--device-list", "3:s4:6:s1")
    assert c.devices == (E(False, 3), E(True, 4), E(False, 6), E(True, 1))
    assert c.socket_paths() == [f"/tmp/g.sock{i}" for i in range(4)]


def test_gpio_single_socket_still_suffixed() -> None:
    assert config("-s", "/tmp/g.sock", "-l", "s2").socket_paths() == ["/tmp/g.sock0"]


def test_gpio_duplicate_simulated_chips_allowed() -> None:
    assert config("-s", "x", "-c", "2", "-l", "s4:s4").devices == (E(True, 4), E(True, 4))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-c", "0", "-l", "1"], "Invalid socket count: 0"),
        (["-c", "3", "-l", "1:4"], "Socket count (3) doesn't match device count 2"),
        (["-c", "1", "-l", "1:4"], "Socket count (1) doesn't match device count 2"),
        (["-c", "3", "-l", "1:4:1"], "Duplicate device detected: 1"),
        (["-l", "x"], "Failed while parsing to integer: 'x': invalid digit found in string"),
        (["-l", ""], "Failed while parsing to integer: '': cannot parse integer from empty string"),
        (
            ["-c", "2", "-l", "1:"],
            "Failed while parsing to integer: '': cannot parse integer from empty string",
        ),
        (["-l", "s"], "Failed while parsing to integer: '': cannot parse integer from empty string"),
        (["-l", "s-1"], "Failed while parsing to integer: '-1': invalid digit found in string"),
        (["-l", "4294967296"], "number too large to fit in target type"),
        (["-l", "s65536"], "simulated chip s65536: at most 65535 lines"),
    ],
)
def test_gpio_bad_values_exit_1_with_one_error_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError):
        config("-s", str(tmp_path / "g.sock"), *argv)
    assert cli.main(["-s", str(tmp_path / "g.sock"), *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1


def test_gpio_plus_sign_parses_as_rust_does() -> None:
    assert config("-s", "x", "-l", "+3").devices == (E(False, 3),)


@pytest.mark.parametrize(
    "argv",
    [[], ["-s", "x"], ["-l", "1"], ["-s", "x", "-l", "1", "-c", "-1"], ["-s", "x", "-l", "1", "--bogus"]],
)
def test_gpio_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2


def test_gpio_missing_host_chip_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # No test machine here has /dev/gpiochip4000.
    assert cli.main(["-s", str(tmp_path / "g.sock"), "-l", "4000"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Could not open gpio device: ") and "/dev/gpiochip4000" in err


def test_gpio_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "vhost-user virtio-gpio" in out and "--sim-control" in out and "3:s4:6:s1" in out
    with pytest.raises(SystemExit):
        cli.main(["-V"])
    assert capsys.readouterr().out.startswith("vhost-device-gpio ")


class FakeServe:
    """Stands in for ``_common.serve``: builds each socket's device, records them."""

    def __init__(self, during: Callable[[], None] = lambda: None) -> None:
        self.calls: list[tuple[str, list[str], list[Any]]] = []
        self.during = during

    def __call__(self, name: str, paths: Sequence[str], factory: Callable[[int], Any]) -> int:
        devices = [factory(i) for i in range(len(paths))]
        self.calls.append((name, list(paths), devices))
        self.during()
        return 0


def test_gpio_run_builds_one_device_per_socket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = FakeServe()
    monkeypatch.setattr(cli, "serve", fake)
    sock = tmp_path / "g.sock"
    assert cli.main(["-s", str(sock), "-c", "2", "-l", "s3:s5"]) == 0
    ((name, paths, devices),) = fake.calls
    assert name == "vhost-device-gpio"
    assert paths == [f"{sock}0", f"{sock}1"]
    assert all(isinstance(d, GpioDevice) for d in devices)
    assert [d.ngpio for d in devices] == [3, 5]
    assert devices[0].chip is not devices[1].chip


def test_gpio_run_serves_sim_control_while_serving(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ctl = tmp_path / "gpio.ctl"
    replies: list[str] = []

    def during() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(ctl))
            with s.makefile("rw") as f:
                for cmd in ("set 1 2 1", "get 1 2", "get 0 0", "get 2 0"):
                    replies.append(_ask(f, cmd))

    monkeypatch.setattr(cli, "serve", FakeServe(during))
    assert (
        cli.main(["-s", str(tmp_path / "g.sock"), "-c", "2", "-l", "s1:s4", "--sim-control", str(ctl)]) == 0
    )
    assert replies[:3] == ["ok", "ok none 1", "ok none 0"]
    assert replies[3].startswith("err dev 2 out of range")
    assert not ctl.exists()  # removed at exit


def test_gpio_sim_control_path_in_use_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ctl = tmp_path / "gpio.ctl"
    ctl.write_text("not a socket")
    assert cli.main(["-s", str(tmp_path / "g.sock"), "-l", "s1", "--sim-control", str(ctl)]) == 1
    assert "the path exists and is not a socket" in capsys.readouterr().err


def test_gpio_start_imports_no_optional_host_module(tmp_path: Path) -> None:
    """Simulated chips need none of the optional host dependencies (gpiod...)."""
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {{"gpiod", "smbus2", "alsaaudio", "pulsectl"}}:
            raise ImportError(f"optional module {{name}} imported")
sys.meta_path.insert(0, Block())
import vhost_backends.cli.gpio as cli
built = []
cli.serve = lambda prog, paths, factory: built.append(factory(0)) or 0
assert cli.main(["-s", {str(tmp_path / "g.sock")!r}, "-l", "s2"]) == 0
assert type(built[0]).__name__ == "GpioDevice"
"""
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the control socket --------------------------------------------------------------------------


@pytest.fixture
def control(tmp_path: Path) -> Iterator[tuple[SimControlServer, list[SimGpioChip]]]:
    chips = [SimGpioChip(4), SimGpioChip(2)]
    server = SimControlServer(str(tmp_path / "ctl"), [chips[0], None, chips[1]])
    server.start()
    try:
        yield server, chips
    finally:
        server.close()
        for c in chips:
            c.close()


def _client(path: str) -> Any:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def _ask(f: Any, line: str) -> str:
    f.write(line + "\n")
    f.flush()
    return str(f.readline().rstrip("\n"))


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        ("", "err empty command"),
        ("frob 0 0", "err unknown command 'frob'"),
        ("set 0 0", "err set takes <dev> <line> <0|1>, got 2 arguments"),
        ("set 0 0 2", "err level must be 0 or 1, not 2"),
        ("set 0 4 1", "err sim4: line 4 out of range (chip has 4 lines)"),
        ("set 1 0 1", "err dev 1 is a host chip, not a simulated one"),
        ("set 3 0 1", "err dev 3 out of range (3 devices in -l)"),
        ("get x 0", "err dev must be a decimal number, not 'x'"),
        ("get 0 -1", "err line must be a decimal number, not '-1'"),
        ("get 0", "err get takes <dev> <line>, got 1 arguments"),
    ],
)
def test_sim_control_errors(
    control: tuple[SimControlServer, list[SimGpioChip]], command: str, reply: str
) -> None:
    server, _ = control
    assert server.handle(command).startswith(reply)


def test_sim_control_many_clients_set_and_get(control: tuple[SimControlServer, list[SimGpioChip]]) -> None:
    server, (chip0, chip2) = control
    a, b = _client(server.path), _client(server.path)
    fa, fb = a.makefile("rw"), b.makefile("rw")
    try:
        assert _ask(fa, "set 0 3 1") == "ok"
        assert _ask(fb, "get 0 3") == "ok none 1"
        chip0.configure(3, DIRECTION_IN)
        assert _ask(fb, "get 0 3") == "ok in 1"
        chip2.configure(1, DIRECTION_OUT, 1)
        assert _ask(fa, "get 2 1") == "ok out 1"
        # An output shows what it drives, whatever the input level says.
        assert _ask(fa, "set 2 1 0") == "ok"
        assert _ask(fa, "get 2 1") == "ok out 1"
        # Several commands in one write, CRLF, then a bad byte: one reply each.
        a.sendall(b"get 0 0\r\nget 0 1\n\xff\n")
        assert [fa.readline() for _ in range(3)] == [
            "ok none 0\n",
            "ok none 0\n",
            "err command is not ASCII\n",
        ]
    finally:
        fa.close()
        fb.close()
        a.close()
        b.close()


def test_sim_control_overlong_command_drops_client(
    control: tuple[SimControlServer, list[SimGpioChip]],
) -> None:
    server, _ = control
    with _client(server.path) as s, s.makefile("r") as f:
        s.sendall(b"g" * 300)
        assert f.readline().startswith("err command longer than")
        assert f.readline() == ""  # closed
    with _client(server.path) as s, s.makefile("rw") as f:  # the server goes on
        assert _ask(f, "get 0 0") == "ok none 0"


def test_sim_control_replaces_stale_socket_refuses_live_one(tmp_path: Path) -> None:
    path = str(tmp_path / "ctl")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    server = SimControlServer(path, [])
    try:
        with pytest.raises(Exception, match="another process is listening"):
            SimControlServer(path, [])
    finally:
        server.close()
    assert not os.path.exists(path)


_WORDS = st.sampled_from(["set", "get", "0", "1", "2", "3", "4", "99", "-1", "x", "+1", "", "\t"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(max_size=40), st.lists(_WORDS, max_size=5).map(" ".join)))
def test_sim_control_any_command_gets_one_reply_line(
    control: tuple[SimControlServer, list[SimGpioChip]], text: str
) -> None:
    """Whatever a client sends as a command: one reply line, ``ok...`` or ``err ...``,
    and a ``set`` that was answered ok really set a simulated input."""
    server, (chip0, chip2) = control
    reply = server.handle(text)
    assert "\n" not in reply
    assert reply == "ok" or reply.startswith(("ok ", "err "))
    words = text.split()
    if reply == "ok":
        assert words[0] == "set"
        chip = chip0 if int(words[1]) == 0 else chip2
        assert chip.state(int(words[2]))[1] == int(words[3])
