"""vhost-device-scsi's command line (upstream's ``ScsiArgs``), validation and run()."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from vhost_backends.cli import scsi as cli
from vhost_backends.cli._common import ConfigError
from virtio_devices.scsi.device import ScsiDevice


def parse(*argv: str) -> cli.Config:
    return cli.Config.from_args(cli.build_parser().parse_args(list(argv)))


def test_defaults_and_flags() -> None:
    assert parse("-s", "scsi.sock") == cli.Config("scsi.sock", (), read_only=False, solid_state=False)
    cfg = parse("--socket-path=/tmp/x.sock", "-r", "--solid-state", "a.img", "b.img")
    assert cfg == cli.Config("/tmp/x.sock", ("a.img", "b.img"), read_only=True, solid_state=True)


def test_missing_socket_path_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["a.img"])
    assert exc.value.code == 2
    assert "--socket-path" in capsys.readouterr().err


def test_more_than_256_images_is_config_error() -> None:
    """Upstream: "More than 256 LUNs aren't currently supported"."""
    with pytest.raises(ConfigError, match="256"):
        parse("-s", "x.sock", *[f"{i}.img" for i in range(257)])
    assert len(parse("-s", "x.sock", *[f"{i}.img" for i in range(256)]).images) == 256


def test_missing_image_is_one_line_and_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.img"
    assert cli.main(["-s", str(tmp_path / "s.sock"), str(missing)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot open image") and "nope.img" in err[0]


def test_read_only_image_needs_r(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "ro.img"
    img.write_bytes(bytes(4096))
    img.chmod(0o444)
    if img.stat().st_mode & 0o200 or os.geteuid() == 0:
        pytest.skip("running as root: a 0444 file is still writable")
    assert cli.main(["-s", str(tmp_path / "s.sock"), str(img)]) == 1
    assert "read-write" in capsys.readouterr().err


def test_run_serves_one_socket_with_every_image(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[tuple[str, list[str], Any]] = []

    def serve(name: str, paths: Sequence[str], factory: Callable[[int], Any]) -> int:
        calls.append((name, list(paths), factory(0)))
        return 0

    monkeypatch.setattr(cli, "serve", serve)
    imgs = []
    for i in range(2):
        p = tmp_path / f"{i}.img"
        p.write_bytes(bytes(512 * (i + 1)))
        imgs.append(str(p))
    sock = str(tmp_path / "scsi.sock")
    assert cli.main(["-s", sock, "-r", *imgs]) == 0
    ((name, paths, dev),) = calls
    assert (name, paths) == ("vhost-device-scsi", [sock])
    assert isinstance(dev, ScsiDevice)
    assert [u.blocks for u in dev.target.units] == [1, 2]
    assert all(u.read_only for u in dev.target.units)


def test_direct_opens_a_second_fd_with_o_direct(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``--direct`` (not in upstream) gives every image an O_DIRECT fd for the engine."""
    assert parse("-s", "s.sock", "--direct", "a.img").direct
    assert not parse("-s", "s.sock", "a.img").direct
    devices: list[ScsiDevice] = []

    def serve(name: str, paths: Sequence[str], factory: Callable[[int], Any]) -> int:
        dev = factory(0)
        devices.append(dev)
        for img in dev.images:
            assert img.direct_fd >= 0 and img.direct_fd != img.fd
            assert fcntl.fcntl(img.direct_fd, fcntl.F_GETFL) & os.O_DIRECT
        return 0

    monkeypatch.setattr(cli, "serve", serve)
    p = tmp_path / "d.img"
    p.write_bytes(bytes(8192))
    rc = cli.main(["-s", str(tmp_path / "s.sock"), "--direct", str(p)])
    if rc == 1:
        pytest.skip("this file system refuses O_DIRECT")
    assert rc == 0 and len(devices) == 1


def test_fixed_buffers_bounds_the_guest_ram_the_engine_registers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--fixed-buffers MIB`` (not in upstream; 16384 by default, 0: never) reaches the
    engine as ``fixed_max`` in bytes; a negative size is refused on stderr."""
    assert parse("-s", "s.sock", "a.img").fixed_buffers_mib == 16384
    assert parse("-s", "s.sock", "--fixed-buffers", "0", "a.img").fixed_buffers_mib == 0
    with pytest.raises(ConfigError, match=r"--fixed-buffers: .* not -1"):
        parse("-s", "s.sock", "--fixed-buffers", "-1", "a.img")
    assert cli.main(["-s", str(tmp_path / "s.sock"), "--fixed-buffers", "-1"]) != 0
    assert "--fixed-buffers" in capsys.readouterr().err
    devices: list[ScsiDevice] = []

    def serve(name: str, paths: Sequence[str], factory: Callable[[int], Any]) -> int:
        devices.append(factory(0))
        return 0

    monkeypatch.setattr(cli, "serve", serve)
    p = tmp_path / "d.img"
    p.write_bytes(bytes(8192))
    assert cli.main(["-s", str(tmp_path / "s.sock"), "--fixed-buffers", "512", str(p)]) == 0
    assert devices[0]._fixed_max == 512 << 20
