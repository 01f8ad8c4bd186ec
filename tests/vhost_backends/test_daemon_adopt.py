"""VhostUserDaemon.adopt: serving an inherited listening socket (``--socket-fd``)."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from vhost_backends.daemon import ListenError, VhostUserDaemon
from vhost_backends.frontend import Frontend
from virtio_devices.template import TemplateDevice


def test_adopt_serves_the_inherited_socket_and_leaves_its_path(tmp_path: Path) -> None:
    path = tmp_path / "inherited.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    fd = listener.detach()
    d = VhostUserDaemon("test", "fd 3", TemplateDevice, max_connections=1)
    d.adopt(fd)
    assert d.ready.is_set()
    t = threading.Thread(target=d.serve, daemon=True)
    t.start()
    with Frontend.connect(str(path), timeout=5.0) as fe:
        assert fe.get_queue_num() == 1
    t.join(10)
    assert not t.is_alive()
    # The daemon closed the socket it adopted but did not unlink anything.
    assert path.exists()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_adopt_refuses_a_socket_that_does_not_listen() -> None:
    a, b = socket.socketpair()
    with a, b:
        d = VhostUserDaemon("test", "fd", TemplateDevice)
        with pytest.raises(ListenError, match="not a listening Unix stream socket"):
            d.adopt(a.fileno())
        os.fstat(a.fileno())  # still open: not the daemon's to close


def test_adopt_refuses_a_file_that_is_no_socket(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_CREAT | os.O_RDWR)
    try:
        d = VhostUserDaemon("test", "fd", TemplateDevice)
        with pytest.raises(ListenError, match="not a socket"):
            d.adopt(fd)
    finally:
        os.close(fd)
