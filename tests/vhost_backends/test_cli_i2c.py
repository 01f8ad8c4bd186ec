"""vhost-device-i2c's command line: parser, device list, Config, opening the bus, run().

Mirrors upstream's tests in ``vhost-device-i2c/src/main.rs`` (``test_parse_failure``,
``test_parse_successful``, the duplicate adapter/address cases), with messages that
name the rule and the value.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from vhost_backends.cli import i2c as cli
from vhost_backends.cli._common import ConfigError
from virtio_devices.hosts.i2c import SimAdapter
from virtio_devices.i2c import I2cDevice

Spec = cli.AdapterSpec


def config(*argv: str) -> cli.Config:
    return cli.Config.from_args(cli.build_parser().parse_args(list(argv)))


def test_device_list_numbers_names_and_addresses() -> None:
    assert cli.parse_device_list(" 1:4,2:32:21,5:5:23 ") == [
        Spec(1, None, (4,)),
        Spec(2, None, (32, 21)),
        Spec(5, None, (5, 23)),
    ]
    # A bus that does not parse as u32 is a name, trimmed (upstream's test).
    assert cli.parse_device_list("123asd:4,11:32:21,i915 gmbus dpd:5") == [
        Spec(None, "123asd", (4,)),
        Spec(11, None, (32, 21)),
        Spec(None, "i915 gmbus dpd", (5,)),
    ]
    assert cli.parse_device_list("+3:+7") == [Spec(3, None, (7,))]
    assert cli.parse_device_list("sim:80")[0].is_sim


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1:4d", "Failed while parsing to integer: client address '4d' is not a decimal number"),
        ("7:", "Failed while parsing to integer: client address ''"),
        ("1: 4", "client address ' 4'"),
        ("1:70000", "client address '70000': number too large"),
        ("1:128", "Invalid client address: 128 (7-bit addresses are 0..=127)"),
        ("1:4,2:32:21,5:4:23", "Duplicate client address detected: 4"),
        ("1:4:4", "Duplicate client address detected: 4"),
        ("1:4,5:10:23,1:32:21", "Duplicate adapter detected: adapter_no:: 1"),
        ("bus1:4,bus5:10,bus5:32", "Duplicate adapter detected: adapter_name: bus5"),
        # Upstream checks the adapter before its addresses.
        ("1:4,1:4", "Duplicate adapter detected: adapter_no:: 1"),
        ("99999999999:4", "adapter number '99999999999': number too large"),
    ],
)
def test_device_list_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        cli.parse_device_list(text)
    assert message in str(exc.value)


def test_address_127_is_the_last_valid_one() -> None:
    assert cli.parse_device_list("sim:0:127") == [Spec(None, "sim", (0, 127))]


def test_config_and_socket_paths(tmp_path: Path) -> None:
    c = config("-s", str(tmp_path / "vi2c.sock"), "-c", "3", "-l", "sim:80")
    assert c.socket_paths() == [str(tmp_path / f"vi2c.sock{i}") for i in range(3)]
    assert c.devices == (Spec(None, "sim", (80,)),)


def test_config_rejects_zero_sockets_and_bad_parent(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Invalid socket count: 0"):
        config("-s", str(tmp_path / "s"), "-c", "0", "-l", "sim:80")
    with pytest.raises(ConfigError, match=r"Parent directory `.*/nope` does not exist\."):
        config("-s", str(tmp_path / "nope" / "s"), "-l", "sim:80")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        config("-s", str(tmp_path / "file" / "s"), "-l", "sim:80")


def test_relative_socket_path_checked_against_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert config("-s", "vi2c.sock", "-l", "sim:80").socket_paths() == ["vi2c.sock0"]
    with pytest.raises(ConfigError, match=r"Invalid path ` ./vi2c.sock` given: Parent directory"):
        config("-s", " ./vi2c.sock", "-l", "sim:80")


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["-l", "sim:80"], ["-s", "/tmp/x"], ["-s", "/tmp/x", "-l", "sim:1", "-c", "x"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
    capsys.readouterr()


def test_config_error_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["-s", str(tmp_path / "s"), "-l", "sim:200"]) == 1
    assert "error: --device-list: Invalid client address: 200" in capsys.readouterr().err


# -- opening the bus ---------------------------------------------------------------------------


def test_open_bus_sim_adapter() -> None:
    bus = cli.open_bus([Spec(None, "sim", (80, 81))])
    adapter = bus.adapter_for(80)
    assert isinstance(adapter, SimAdapter) and adapter is bus.adapter_for(81)
    assert bus.adapter_for(82) is None
    assert bus.addresses() == [80, 81]
    bus.close()


def test_open_bus_name_lookup_in_sysfs(tmp_path: Path) -> None:
    (tmp_path / "i2c-4").mkdir()
    (tmp_path / "i2c-4" / "name").write_text("sim\n")  # a real adapter named sim
    with pytest.raises(ConfigError, match="Adapter not found: no I2C adapter named 'nope'"):
        cli.open_bus([Spec(None, "nope", (1,))], sysfs=str(tmp_path))
    # 'sim' is the simulated bus even when an adapter has that name; by number it
    # is that adapter (which does not exist here: the error names its node).
    assert isinstance(cli.open_bus([Spec(None, "sim", (1,))], sysfs=str(tmp_path)).adapter_for(1), SimAdapter)
    with pytest.raises(ConfigError, match="/dev/i2c-4"):
        cli.open_bus([Spec(4, None, (1,))], sysfs=str(tmp_path))


def test_open_bus_same_adapter_by_name_and_number(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "i2c-4").mkdir()
    (tmp_path / "i2c-4" / "name").write_text("bus four\n")
    opened: list[int] = []

    class FakeHost:
        blocking = True

        def __init__(self, number: int) -> None:
            opened.append(number)
            self.name = f"/dev/i2c-{number}"

        def check_address(self, addr: int) -> None:
            pass

        def transfer(self, msgs: Sequence[Any]) -> int:
            return 0

        def close(self) -> None:
            opened.remove(int(self.name.rsplit("-", 1)[1]))

    monkeypatch.setattr(cli, "HostAdapter", FakeHost)
    with pytest.raises(ConfigError, match="Duplicate adapter detected: adapter_no:: 4"):
        cli.open_bus([Spec(4, None, (1,)), Spec(None, "bus four", (2,))], sysfs=str(tmp_path))
    assert opened == []  # what was opened is closed again
    bus = cli.open_bus([Spec(None, "bus four", (2,)), Spec(None, "sim", (3,))], sysfs=str(tmp_path))
    assert opened == [4]
    bus.close()


def test_run_serves_one_shared_bus_on_every_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_serve(prog: str, paths: Sequence[str], factory: Callable[[int], Any]) -> int:
        seen["prog"], seen["paths"] = prog, list(paths)
        seen["devices"] = [factory(i) for i in range(len(paths))]
        return 0

    monkeypatch.setattr(cli, "serve", fake_serve)
    assert cli.main(["-s", os.fspath(tmp_path / "i2c.sock"), "-c", "2", "-l", "sim:80:81"]) == 0
    devs = seen["devices"]
    assert seen["prog"] == "vhost-device-i2c"
    assert seen["paths"] == [str(tmp_path / "i2c.sock0"), str(tmp_path / "i2c.sock1")]
    assert all(isinstance(d, I2cDevice) for d in devs)
    assert devs[0] is not devs[1] and devs[0].bus is devs[1].bus
