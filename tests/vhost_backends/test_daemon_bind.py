"""VhostUserDaemon.bind: the socket path appears only once it accepts connections."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from typing import ClassVar

import pytest

import vhost_backends.daemon as daemon_mod
from vhost_backends.daemon import VhostUserDaemon
from virtio_devices.template import TemplateDevice


class _CheckingSocket(socket.socket):
    """Records whether the final path existed when listen() was called."""

    final_path = ""
    path_existed_at_listen: ClassVar[list[bool]] = []

    def listen(self, backlog: int = 1) -> None:
        type(self).path_existed_at_listen.append(os.path.exists(self.final_path))
        super().listen(backlog)


def test_daemon_bind_path_appears_after_listen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "dev.sock")
    _CheckingSocket.final_path = path
    _CheckingSocket.path_existed_at_listen = []
    monkeypatch.setattr(daemon_mod.socket, "socket", _CheckingSocket)
    d = VhostUserDaemon("t", path, TemplateDevice)
    try:
        d.bind()
        assert _CheckingSocket.path_existed_at_listen == [False]
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert sorted(os.listdir(tmp_path)) == ["dev.sock"]  # no temporary name left
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(path)
        probe.close()
    finally:
        d.close()
    assert not os.path.exists(path)


def test_daemon_bind_stale_socket_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "dev.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # a leftover file nobody listens on
    d = VhostUserDaemon("t", path, TemplateDevice)
    try:
        d.bind()
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(path)
        probe.close()
    finally:
        d.close()
