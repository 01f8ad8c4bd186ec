"""VhostUserDaemon.bind: which socket paths a daemon takes, refuses or replaces."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vhost_backends.daemon import ListenError, VhostUserDaemon
from virtio_devices.template import TemplateDevice

Make = Callable[[str], VhostUserDaemon]


@pytest.fixture
def make_daemon() -> Iterator[Make]:
    made: list[VhostUserDaemon] = []

    def make(path: str) -> VhostUserDaemon:
        d = VhostUserDaemon("test", path, TemplateDevice)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def connects(path: Path | str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except ConnectionRefusedError:
            return False
    return True


def test_bind_path_leads_to_a_listener_and_no_temporary_is_left(tmp_path: Path, make_daemon: Make) -> None:
    path = tmp_path / "d.sock"
    make_daemon(str(path)).bind()
    assert connects(path)
    assert os.listdir(tmp_path) == ["d.sock"]


def test_bind_path_too_long_for_a_temporary_binds_directly(tmp_path: Path, make_daemon: Make) -> None:
    # 107 bytes: the longest path sun_path holds; no room for a suffix.
    path = tmp_path / ("x" * (107 - len(os.fsencode(tmp_path)) - 1))
    assert len(os.fsencode(path)) == 107
    make_daemon(str(path)).bind()
    assert connects(path)


def test_bind_live_socket_is_refused_and_left_to_its_owner(tmp_path: Path, make_daemon: Make) -> None:
    path = tmp_path / "live.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as owner:
        owner.bind(str(path))
        owner.listen(4)
        ino = path.stat().st_ino
        refusal = f"^cannot listen on {re.escape(str(path))}: another process is listening on it$"
        with pytest.raises(ListenError, match=refusal):
            make_daemon(str(path)).bind()
        assert path.stat().st_ino == ino
        owner.settimeout(5)
        probe, _ = owner.accept()  # the refusing daemon's probe
        probe.close()
        assert connects(path)


def test_bind_stale_socket_is_replaced(tmp_path: Path, make_daemon: Make) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone:
        gone.bind(str(path))
    assert not connects(path)
    make_daemon(str(path)).bind()
    assert connects(path)


def test_bind_not_a_socket_is_refused_and_kept(tmp_path: Path, make_daemon: Make) -> None:
    path = tmp_path / "file"
    path.write_text("keep")
    with pytest.raises(ListenError, match=r"the path exists and is not a socket$"):
        make_daemon(str(path)).bind()
    assert path.read_text() == "keep"


def test_bind_missing_directory_is_named(tmp_path: Path, make_daemon: Make) -> None:
    path = tmp_path / "no" / "d.sock"
    want = re.escape(f"cannot listen on {path}: directory {path.parent} does not exist")
    with pytest.raises(ListenError, match=want):
        make_daemon(str(path)).bind()


class ClosingDevice(TemplateDevice):
    """A device that records its close() and the reset before it."""

    def __init__(self, events: list[str]) -> None:
        super().__init__()
        self.events = events

    def reset(self) -> None:
        self.events.append("reset")
        super().reset()

    def close(self) -> None:
        self.events.append("close")


def test_session_end_closes_the_device_once(tmp_path: Path) -> None:
    """A device with host resources beyond a reset (gpio's lines) gets close() once
    its session is over, whatever ended it; a device without close() is fine too."""
    events: list[str] = []
    d = VhostUserDaemon("test", str(tmp_path / "d.sock"), lambda: ClosingDevice(events))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.close()  # the front-end leaves at once
    d.serve_connection(ours)
    assert events == ["close"]  # never activated: no reset needed, close all the same
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.close()
    plain = VhostUserDaemon("test", str(tmp_path / "e.sock"), TemplateDevice)
    plain.serve_connection(ours)
    plain.close()
    d.close()
