"""vhost-device-rng's command line: parser, Config, run() wiring, main() exit codes.

Mirrors upstream's ``verify_cmd_line_arguments`` and ``verify_start_backend``
(rust-vmm/vhost-device ``vhost-device-rng/src/main.rs``).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from vhost_backends.cli import rng as cli
from vhost_backends.cli._common import USIZE_MAX, ConfigError
from virtio_devices.hosts._getrandom import vdso_available
from virtio_devices.rng import RngDevice


def config(*argv: str) -> cli.Config:
    return cli.Config.from_args(cli.build_parser().parse_args(list(argv)))


def usage_error(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv))
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_rng_defaults_match_upstream() -> None:
    assert config("-s", "/some/socket_path") == cli.Config(
        period_ms=65536,
        max_bytes=USIZE_MAX,
        count=1,
        socket_path="/some/socket_path",
        rng_source="/dev/urandom",
    )


def test_rng_long_flags() -> None:
    c = config(
        "--socket-path=/tmp/r.sock",
        "--period",
        "1000",
        "--max-bytes",
        "4096",
        "--socket-count",
        "2",
        "--rng-source",
        "/tmp/src",
    )
    assert c == cli.Config(1000, 2048, 2, "/tmp/r.sock", "/tmp/src")


def test_rng_single_socket_still_suffixed() -> None:
    assert config("-s", "/some/socket_path").socket_paths() == ["/some/socket_path0"]


def test_rng_socket_count_three() -> None:
    assert config("-s", "/some/socket_path", "-c", "3").socket_paths() == [
        "/some/socket_path0",
        "/some/socket_path1",
        "/some/socket_path2",
    ]


@pytest.mark.parametrize(("max_bytes", "count", "share"), [(4096, 2, 2048), (1000, 3, 333), (1, 2, 0)])
def test_rng_max_bytes_divided_between_sockets(max_bytes: int, count: int, share: int) -> None:
    c = config("-s", "/x", "-m", str(max_bytes), "-c", str(count))
    assert c.max_bytes == share


@pytest.mark.parametrize("period", ["0", "65537", str(2**100)])
def test_rng_bad_period_is_config_error(period: str) -> None:
    # Upstream's rule (VHU_RNG_MAX_PERIOD_MS), named with the offending value.
    with pytest.raises(ConfigError, match=rf"^--period must be 1\.\.=65536 \(ms\), not {period}$"):
        config("-s", "/x", "-p", period)


@pytest.mark.parametrize("count", ["1", "3"])
def test_rng_default_max_bytes_means_no_limit_for_the_device(count: str) -> None:
    assert config("-s", "/x", "-c", count).device_max_bytes is None
    assert config("-s", "/x", "-c", count, "-m", str(USIZE_MAX - 3)).device_max_bytes is not None


def test_rng_period_bounds_accepted() -> None:
    assert config("-s", "/x", "-p", "1").period_ms == 1
    assert config("-s", "/x", "-p", "65536").period_ms == 65536


def test_rng_zero_socket_count_is_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^--socket-count must be at least 1, not 0$"):
        config("-s", "/x", "-c", "0")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-p", "0"], "--period must be 1..=65536 (ms), not 0"),
        (["-p", "65537"], "--period must be 1..=65536 (ms), not 65537"),
        (["-c", "0"], "--socket-count must be at least 1, not 0"),
    ],
)
def test_rng_main_bad_value_exits_1_with_one_error_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["-s", "/x", *argv]) == 1
    assert capsys.readouterr().err == f"error: {message}\n"


def test_rng_main_socket_in_missing_directory_exits_1_naming_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RUST_LOG", raising=False)
    missing = tmp_path / "missing"
    assert cli.main(["-s", str(missing / "rng.sock")]) == 1
    assert capsys.readouterr().err == (
        f"error: cannot listen on {missing}/rng.sock0: directory {missing} does not exist\n"
    )


@pytest.mark.parametrize(
    "argv",
    [
        [],  # -s is required
        ["-s", "/x", "-c", "-1"],
        ["-s", "/x", "-m", "lots"],
        ["-s", "/x", "-m", str(USIZE_MAX + 1)],
        ["-s", "/x", "-c", str(2**32)],
        ["-s", "/x", "--filename", "/dev/urandom"],  # upstream README's flag, not the binary's
    ],
)
def test_rng_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(argv, capsys)
    assert "error:" in err.splitlines()[-1]


def test_rng_missing_source_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    assert cli.main(["-s", str(tmp_path / "s.sock"), "-f", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: RNG source file {missing} doesn't exist or can't be accessed")
    assert err.count("\n") == 1


def test_rng_unopenable_source_exits_1_even_as_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A Unix socket file cannot be opened (ENXIO), whoever asks; the permission
    # case for root is in tests/virtio_devices/test_hosts_files.py.
    src = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(src))
        assert cli.main(["-s", str(tmp_path / "s.sock"), "-f", str(src)]) == 1
    assert capsys.readouterr().err == (
        f"error: RNG source file {src} doesn't exist or can't be accessed: No such device or address\n"
    )


def test_rng_directory_source_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["-s", str(tmp_path / "s.sock"), "-f", str(tmp_path)]) == 1
    assert "is a directory" in capsys.readouterr().err


def test_rng_help_starts_with_docstring(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "vhost-device-rng: a vhost-user virtio-rng (entropy) device backend." in out
    assert "--rng-source" in out


def test_rng_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("vhost-device-rng ")


class FakeServe:
    """Stands in for ``_common.serve`` (the one call of ``run``) and records its arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str], list[Any]]] = []

    def __call__(self, name: str, paths: Sequence[str], factory: Callable[[int], Any]) -> int:
        devices = [factory(i) for i in range(len(paths))]
        self.calls.append((name, list(paths), devices))
        return 0


@pytest.fixture
def fake_daemon(monkeypatch: pytest.MonkeyPatch) -> FakeServe:
    fake = FakeServe()
    monkeypatch.setattr(cli, "serve", fake)
    monkeypatch.delenv("VHD_RNG_VDSO", raising=False)
    return fake


def test_rng_run_builds_one_device_per_socket_on_a_shared_source(
    fake_daemon: FakeServe, tmp_path: Path
) -> None:
    src = tmp_path / "entropy"
    src.write_bytes(b"\x00" * 64)
    sock = tmp_path / "rng.sock"
    rc = cli.main(["-s", str(sock), "-c", "2", "-m", "1001", "-p", "500", "-f", str(src)])
    assert rc == 0
    ((name, paths, devices),) = fake_daemon.calls
    assert name == "vhost-device-rng"
    assert paths == [f"{sock}0", f"{sock}1"]
    assert all(isinstance(d, RngDevice) for d in devices)
    assert [(d.period_ms, d.max_bytes) for d in devices] == [(500, 500), (500, 500)]
    assert devices[0].source is devices[1].source
    # run() closed the source when the daemons returned.
    with pytest.raises(ValueError, match="closed"):
        devices[0].source.fileno()


@pytest.mark.parametrize(
    "case",
    [
        *(("VHD_RNG_VDSO", v, "VHD_RNG_VDSO must be 0 or 1") for v in ["2", "yes", "on", "true", "-1"]),
    ],
)
def test_rng_bad_environment_setting_is_refused(
    fake_daemon: FakeServe,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    case: tuple[str, str, str],
) -> None:
    """A bad VHD_* setting: one error line, exit 1, before anything is served."""
    name, value, message = case
    monkeypatch.setenv(name, value)
    assert cli.main(["-s", str(tmp_path / "rng.sock")]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert fake_daemon.calls == []


@pytest.mark.parametrize(("value", "vdso"), [(None, True), ("", True), ("1", True), (" 0 ", False)])
def test_rng_vdso_setting_comes_from_vhd_rng_vdso(
    fake_daemon: FakeServe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str | None, vdso: bool
) -> None:
    """/dev/urandom (the default source) is served through the vDSO's getrandom where
    the kernel has it, unless VHD_RNG_VDSO=0; a regular file never is."""
    if value is not None:
        monkeypatch.setenv("VHD_RNG_VDSO", value)
    sock = str(tmp_path / "rng.sock")
    assert cli.main(["-s", sock]) == 0
    src = tmp_path / "entropy"
    src.write_bytes(b"x")
    assert cli.main(["-s", sock, "-f", str(src)]) == 0
    (_, _, (urandom,)), (_, _, (regular,)) = fake_daemon.calls
    assert urandom.source.name == "/dev/urandom"
    assert urandom.source.uses_vdso == (vdso and vdso_available())
    assert not regular.source.uses_vdso


def test_rng_start_imports_no_optional_host_module(tmp_path: Path) -> None:
    """Starting vhost-device-rng needs none of the optional host dependencies (gpiod,
    smbus2, pyalsaaudio, pulsectl) nor any other host backend: hosts/__init__ is empty."""
    src = tmp_path / "entropy"
    src.write_bytes(b"x" * 16)
    code = f"""
import importlib.abc, sys
OPTIONAL = {{"gpiod", "smbus2", "alsaaudio", "pulsectl"}}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in OPTIONAL:
            raise ImportError(f"optional module {{name}} imported")
sys.meta_path.insert(0, Block())
import vhost_backends.cli.rng as cli
built = []
cli.serve = lambda prog, paths, factory: built.append(factory(0)) or 0
assert cli.main(["-s", {str(tmp_path / "rng.sock")!r}, "-f", {str(src)!r}]) == 0
assert type(built[0]).__name__ == "RngDevice"
hosts = sorted(m for m in sys.modules if m.startswith("virtio_devices.hosts."))
print(",".join(hosts))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.split() == ["virtio_devices.hosts._getrandom,virtio_devices.hosts.files"]
