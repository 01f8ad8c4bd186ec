"""vhost-device-sound's command line (upstream's ``SoundArgs``/``SoundConfig``)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from vhost_backends.cli import sound as cli
from vhost_backends.cli._common import ConfigError
from virtio_devices.hosts.audio import AudioError, NullAudio
from virtio_devices.sound import SoundDevice


def parse(*argv: str, env: dict[str, str] | None = None) -> cli.Config:
    return cli.Config.from_args(cli.build_parser().parse_args(list(argv)), env or {})


def test_socket_path_used_verbatim_and_backend() -> None:
    c = parse("--socket", "/tmp/snd.sock", "--backend", "null")
    assert c == cli.Config("/tmp/snd.sock", None, "null", "default")
    assert c.label == "/tmp/snd.sock"


@pytest.mark.parametrize(
    "argv",
    [
        ["--backend", "null"],  # neither socket flag (clap's required group)
        ["--socket", "a", "--socket-fd", "3", "--backend", "null"],  # both
        ["--socket", "a"],  # --backend is required
        ["--socket", "a", "--backend", "gstreamer"],  # not offered (README)
        ["--socket", "a", "--backend", "oss"],
        ["--socket-fd", "-1", "--backend", "null"],
        ["--socket-fd", "x", "--backend", "null"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert capsys.readouterr().err


def test_every_backend_name_parses() -> None:
    for name in ("null", "alsa", "pulseaudio", "pipewire"):
        assert parse("--socket", "s", "--backend", name).backend == name


def test_socket_fd_must_be_open(capsys: pytest.CaptureFixture[str]) -> None:
    fd = os.open("/dev/null", os.O_RDONLY)
    os.close(fd)
    assert cli.main(["--socket-fd", str(fd), "--backend", "null"]) == 1
    assert f"--socket-fd {fd} is not an open file descriptor" in capsys.readouterr().err


def test_alsa_device_from_environment() -> None:
    assert parse(
        "--socket", "s", "--backend", "alsa", env={"VHD_SOUND_ALSA_DEVICE": "hw:1,0"}
    ).alsa_device == ("hw:1,0")
    with pytest.raises(ConfigError, match="VHD_SOUND_ALSA_DEVICE"):
        parse("--socket", "s", "--backend", "alsa", env={"VHD_SOUND_ALSA_DEVICE": " "})


def test_rt_priority_from_environment() -> None:
    """VHD_SOUND_RT_PRIORITY (our addition): a SCHED_FIFO priority, 1-99; unset: 0."""
    assert parse("--socket", "s", "--backend", "null").rt_priority == 0
    c = parse("--socket", "s", "--backend", "null", env={"VHD_SOUND_RT_PRIORITY": "10"})
    assert c.rt_priority == 10
    for bad in ("0", "100", "-1", "high"):
        with pytest.raises(ConfigError, match=f"VHD_SOUND_RT_PRIORITY must be .* not '{bad}'"):
            parse("--socket", "s", "--backend", "null", env={"VHD_SOUND_RT_PRIORITY": bad})


def test_rt_priority_out_of_range_is_refused_by_the_device() -> None:
    with pytest.raises(ValueError, match=r"rt_priority must be from 0 to 99 .* not 100"):
        SoundDevice(NullAudio(), rt_priority=100)


def test_path_without_file_name_is_config_error() -> None:
    with pytest.raises(ConfigError):
        parse("--socket", "/", "--backend", "null")


def test_run_serves_a_fresh_device_per_connection_on_one_backend(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[tuple[str, list[str], Any, Any, int | None]] = []

    def serve(
        name: str, paths: Sequence[str], factory: Callable[[int], Any], *, listen_fd: int | None
    ) -> int:
        calls.append((name, list(paths), factory(0), factory(0), listen_fd))
        return 0

    monkeypatch.setattr(cli, "serve", serve)
    sock = str(tmp_path / "snd.sock")
    assert cli.main(["--socket", sock, "--backend", "null"]) == 0
    ((name, paths, a, b, fd),) = calls
    assert (name, paths, fd) == ("vhost-device-sound", [sock], None)
    assert isinstance(a, SoundDevice) and isinstance(b, SoundDevice) and a is not b
    assert a.backend is b.backend and isinstance(a.backend, NullAudio)


def test_run_with_socket_fd_serves_that_fd(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[list[str], int | None]] = []

    def serve(
        name: str, paths: Sequence[str], factory: Callable[[int], Any], *, listen_fd: int | None
    ) -> int:
        seen.append((list(paths), listen_fd))
        return 0

    monkeypatch.setattr(cli, "serve", serve)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        assert cli.main(["--socket-fd", str(s.fileno()), "--backend", "null"]) == 0
        assert seen == [([f"fd {s.fileno()}"], s.fileno())]


def test_missing_pulse_library_is_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from virtio_devices.hosts import pulse  # noqa: PLC0415 - needs libpulse only here

    def broken() -> None:
        raise AudioError("libpulse-simple is not installed")

    monkeypatch.setattr(pulse, "_load", broken)
    with pytest.raises(ConfigError, match="--backend pipewire: libpulse-simple"):
        cli.open_backend(parse("--socket", "s", "--backend", "pipewire"))
