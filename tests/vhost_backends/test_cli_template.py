"""vhost-device-template's command line (upstream's ``FooArgs``/``FooConfiguration``)."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from vhost_backends.cli import template as cli
from vhost_backends.cli._common import ConfigError
from vhost_backends.daemon import ListenError
from virtio_devices.template import TemplateDevice


def test_template_socket_path_used_verbatim() -> None:
    ns = cli.build_parser().parse_args(["-s", "vfoo.sock"])
    assert cli.Config.from_args(ns) == cli.Config(socket_path="vfoo.sock")
    ns = cli.build_parser().parse_args(["--socket-path=/tmp/foo.sock"])
    assert cli.Config.from_args(ns).socket_path == "/tmp/foo.sock"


def test_template_missing_socket_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    assert "--socket-path" in capsys.readouterr().err


def test_template_path_without_file_name_is_config_error() -> None:
    with pytest.raises(ConfigError):
        cli.Config.from_args(cli.build_parser().parse_args(["-s", "/"]))


def test_template_run_serves_one_socket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[tuple[str, list[str], Any, int | None]] = []

    def run_daemons(
        name: str, paths: Sequence[str], factory: Callable[[int], Any], *, poll_max_us: int | None = None
    ) -> int:
        calls.append((name, list(paths), factory(0), poll_max_us))
        return 0

    mod = types.ModuleType("vhost_backends.daemon")
    mod.run_daemons = run_daemons  # type: ignore[attr-defined]
    mod.ListenError = ListenError  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vhost_backends.daemon", mod)
    monkeypatch.setenv("VHD_POLL_US", "7")
    sock = str(tmp_path / "foo.sock")
    assert cli.main(["-s", sock]) == 0
    ((name, paths, dev, poll_max_us),) = calls
    assert (name, paths, poll_max_us) == ("vhost-device-template", [sock], 7)
    assert isinstance(dev, TemplateDevice)
