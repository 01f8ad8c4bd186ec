"""vhost-device-vsock's command line: upstream's three forms, precedence, conflicts, validation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from vhost_backends.cli import vsock as cli
from vhost_backends.cli._common import ConfigError
from virtio_devices.vsock import VsockDevice


def config(*argv: str) -> cli.Config:
    return cli.Config.from_args(cli.build_parser().parse_args(list(argv)))


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv))
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_plain_flags_with_defaults() -> None:
    (vm,) = config("--socket", "/tmp/v.sock", "--uds-path", "/tmp/vm.vsock").vms
    assert vm == cli.VmConfig(3, "/tmp/v.sock", "/tmp/vm.vsock", None, (), 65536, 1024, ("default",))


def test_plain_forward_backend() -> None:
    (vm,) = config(
        "--socket", "s", "--forward-cid", "1", "--forward-listen", "9001+9002", "--groups", "a+b"
    ).vms
    assert (vm.forward_cid, vm.forward_listen, vm.uds_path, vm.groups) == (1, (9001, 9002), None, ("a", "b"))


def test_vm_keys_either_spelling() -> None:
    vms = config(
        "--vm", "guest_cid=4,socket=/tmp/a,uds_path=/tmp/ua,tx_buffer_size=4096,queue_size=256,groups=g1+g2",
        "--vm", "guest-cid=5,socket=/tmp/b,uds-path=/tmp/ub",
    ).vms  # fmt: skip
    assert [(v.guest_cid, v.socket, v.tx_buffer_size, v.queue_size, v.groups) for v in vms] == [
        (4, "/tmp/a", 4096, 256, ("g1", "g2")),
        (5, "/tmp/b", 65536, 1024, ("default",)),
    ]


@pytest.mark.parametrize(
    ("vm", "message"),
    [
        ("guest-cid=4,uds-path=/u", "required key 'socket'"),
        ("guest-cid=4,socket=/s", "exactly one of uds_path or forward_cid"),
        ("socket=/s,uds-path=/u,forward-cid=1", "exactly one of uds_path or forward_cid"),
        ("socket=/s,uds-path=/u,group=x", "invalid key 'group'"),  # upstream's help says 'group'
        ("socket=/s,uds-path=/u,guest-cid=x", "guest_cid must be an unsigned integer"),
        ("socket=/s,uds-path=/u,guest-cid=2", "guest_cid must be 3.."),
        ("socket=/s,uds-path=/u,queue-size=1000", "power of two"),
        ("socket=/s,uds-path=/u,tx-buffer-size=0", "tx_buffer_size must be at least 1"),
        ("socket=/s,forward-cid=1,forward-listen=1+x", "forward_listen must be an unsigned integer"),
    ],
)
def test_vm_errors_exit_1_on_stderr(capsys: pytest.CaptureFixture[str], vm: str, message: str) -> None:
    assert cli.main(["--vm", vm]) == 1
    out = capsys.readouterr()
    assert out.out == ""  # upstream prints to stdout and exits 0
    assert out.err.startswith("error: ") and message in out.err


def test_vm_pair_without_equals_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert "expected key=value" in usage_error(capsys, "--vm", "socket")


def test_duplicate_cids_and_sockets_refused() -> None:
    with pytest.raises(ConfigError, match="guest_cid 4 already used"):
        config("--vm", "guest-cid=4,socket=/a,uds-path=/ua", "--vm", "guest-cid=4,socket=/b,uds-path=/ub")
    with pytest.raises(ConfigError, match="already used"):
        config("--vm", "guest-cid=4,socket=/a,uds-path=/ua", "--vm", "guest-cid=5,socket=/a,uds-path=/ub")
    with pytest.raises(ConfigError, match="already used"):
        config("--vm", "guest-cid=4,socket=/a,uds-path=/u", "--vm", "guest-cid=5,socket=/b,uds-path=/u")


@pytest.mark.parametrize(
    "argv",
    [
        ["--guest-cid", "4", "--vm", "socket=/s,uds-path=/u"],
        ["--socket", "/s", "--config", "x.yaml"],
        ["--vm", "socket=/s,uds-path=/u", "--config", "x.yaml"],
        ["--socket", "/s", "--uds-path", "/u", "--forward-cid", "1"],
        ["--socket", "/s", "--uds-path", "/u", "--forward-listen", "1"],
    ],
)
def test_conflicts_are_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert "cannot be used with" in usage_error(capsys, *argv)


def test_socket_required_in_plain_mode(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--socket" in usage_error(capsys, "--uds-path", "/u")


def test_plain_without_backend_is_error() -> None:
    with pytest.raises(ConfigError, match="exactly one of uds_path or forward_cid"):
        config("--socket", "/s")


def test_config_yaml_with_both_spellings(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(
        "vms:\n"
        "  - guest_cid: 4\n    socket: /tmp/a\n    uds_path: /tmp/ua\n    groups: g1+g2\n"
        "  - guest-cid: 5\n    socket: /tmp/b\n    forward-cid: 1\n    forward-listen: 9001+9002\n"
        "    tx-buffer-size: 8192\n    queue-size: 512\n"
    )
    a, b = config("--config", str(f)).vms
    assert (a.guest_cid, a.groups, a.uds_path) == (4, ("g1", "g2"), "/tmp/ua")
    assert (b.forward_cid, b.forward_listen, b.tx_buffer_size, b.queue_size) == (1, (9001, 9002), 8192, 512)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("vms: []\n", "at least one VM"),
        ("other: 1\n", "'vms:' list"),
        ("vms: [1]\n", "must be a map"),
        ("vms:\n  - socket: /s\n    uds_path: /u\n    colour: red\n", "invalid key 'colour'"),
        ("vms: [\n", "not YAML"),
    ],
)
def test_config_yaml_errors(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message):
        config("--config", str(f))


def test_config_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        config("--config", str(tmp_path / "none.yaml"))


def test_run_serves_every_vm_with_its_own_device(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[tuple[str, list[str], list[Any]]] = []

    def serve(name: str, paths: Sequence[str], factory: Callable[[int], Any]) -> int:
        calls.append((name, list(paths), [factory(i) for i in range(len(paths))]))
        return 0

    monkeypatch.setattr(cli, "serve", serve)
    a, b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    argv = ["--vm", f"guest-cid=4,socket={a},uds-path={tmp_path}/ua,groups=x"]
    argv += ["--vm", f"guest-cid=5,socket={b},uds-path={tmp_path}/ub,queue-size=128"]
    assert cli.main(argv) == 0
    ((name, paths, devs),) = calls
    assert (name, paths) == ("vhost-device-vsock", [a, b])
    assert all(isinstance(d, VsockDevice) for d in devs)
    assert [(d.guest_cid, d.queue_sizes[0], sorted(d.groups)) for d in devs] == [
        (4, 1024, ["x"]),
        (5, 128, ["default"]),
    ]
    assert devs[0].registry is devs[1].registry
    assert not (tmp_path / "ua").exists()  # listeners closed when run returns


def test_tx_nap_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from virtio_devices import vsock as dev_mod  # noqa: PLC0415

    # The CLI's defaults are the device's (the device layer is not imported to parse).
    assert (cli.DEFAULT_TX_NAP_US, cli.MAX_TX_NAP_US) == (dev_mod.TX_NAP_US, dev_mod.TX_NAP_US_MAX)
    assert cli.env_tx_nap_us({}) == cli.DEFAULT_TX_NAP_US
    assert cli.env_tx_nap_us({"VHD_VSOCK_TX_NAP_US": " 0 "}) == 0
    assert cli.env_tx_nap_us({"VHD_VSOCK_TX_NAP_US": "1000"}) == 1000
    for bad in ("1001", "-1", "5us", "٣"):
        with pytest.raises(ConfigError, match=f"VHD_VSOCK_TX_NAP_US must be .* from 0 to 1000, not '{bad}'"):
            cli.env_tx_nap_us({"VHD_VSOCK_TX_NAP_US": bad})
    devs: list[Any] = []

    def serve(name: str, paths: Sequence[str], factory: Callable[[int], Any]) -> int:
        devs.append(factory(0))
        return 0

    monkeypatch.setattr(cli, "serve", serve)
    monkeypatch.setenv("VHD_VSOCK_TX_NAP_US", "40")
    assert cli.main(["--socket", str(tmp_path / "a.sock"), "--uds-path", str(tmp_path / "u")]) == 0
    assert devs[0]._fast.nap_ns == 40_000


def test_nogil_switch_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cli.env_nogil({}) is True
    assert cli.env_nogil({"VHD_VSOCK_NOGIL": " 1"}) is True
    assert cli.env_nogil({"VHD_VSOCK_NOGIL": "0"}) is False
    for bad in ("2", "yes", "off"):
        with pytest.raises(ConfigError, match=f"VHD_VSOCK_NOGIL must be 0 or 1, not '{bad}'"):
            cli.env_nogil({"VHD_VSOCK_NOGIL": bad})
    devs: list[Any] = []

    def serve(name: str, paths: Sequence[str], factory: Callable[[int], Any]) -> int:
        devs.append(factory(0))
        return 0

    monkeypatch.setattr(cli, "serve", serve)
    for value, want in (("0", False), ("", True)):
        monkeypatch.setenv("VHD_VSOCK_NOGIL", value)
        assert (
            cli.main(["--socket", str(tmp_path / "a.sock"), "--uds-path", str(tmp_path / f"u{value}")]) == 0
        )
        assert devs[-1]._fast.nogil is want


def test_run_uds_path_in_use_is_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "plain").write_text("")
    assert cli.main(["--socket", str(tmp_path / "s"), "--uds-path", str(tmp_path / "plain")]) == 1
    assert "not a socket" in capsys.readouterr().err
