"""vhost-device-input as a process on sim:keyboard and sim:tablet, driven by our front-end.

Events are injected through the simulated devices' control sockets and arrive in
eventq buffers through the daemon's event loop (no kick needed once buffers are
posted), with and without EVENT_IDX; a guest that posts no buffers costs bounded
memory and gets SYN_DROPPED; LEDs come back to the simulated device; a reconnecting
front-end gets a working device again; SIGTERM ends the daemon with status 0.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_process import DaemonProcess
from device_drivers import console_script
from input_frontend import InputGuest

pytestmark = pytest.mark.slow

TIMEOUT = 10.0
SYN = (0, 0, 0)


class Control:
    """A connection to a simulated device's control socket."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(str(path))
        self.buf = b""

    def send(self, *lines: str) -> list[str]:
        self.sock.sendall("".join(f"{line}\n" for line in lines).encode())
        while self.buf.count(b"\n") < len(lines):
            chunk = self.sock.recv(65536)
            assert chunk, self.buf
            self.buf += chunk
        *replies, self.buf = self.buf.split(b"\n", len(lines))
        return [r.decode() for r in replies]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    sock = str(tmp_path / "in.sock")
    cmd = [*console_script("vhost-device-input", "vhost_backends.cli.input"), "-s", sock]
    d = DaemonProcess(sock + "0", [*cmd, "-e", "sim:keyboard,sim:tablet"])
    try:
        d.wait_for(f"{sock}0: listening", TIMEOUT)
        d.wait_for(f"{sock}1: listening", TIMEOUT)
        yield d
    finally:
        assert d.terminate() == 0, d.log[-5:]


@pytest.mark.parametrize("event_idx", [True, False])
def test_injected_keys_arrive_without_a_kick(daemon: DaemonProcess, tmp_path: Path, event_idx: bool) -> None:
    """Upstream discards every event unless EVENT_IDX was negotiated; we deliver both ways."""
    guest = InputGuest(str(tmp_path / "in.sock0"), timeout=TIMEOUT, event_idx=event_idx)
    ctl = Control(tmp_path / "in.sock0.ctl")
    try:
        guest.post(16)
        assert ctl.send("KEY KEY_A 1", "KEY KEY_A 0") == ["ok", "ok"]
        assert guest.events(4) == [(1, 30, 1), SYN, (1, 30, 0), SYN]
    finally:
        ctl.close()
        guest.close()


def test_tablet_events_and_config_on_second_socket(daemon: DaemonProcess, tmp_path: Path) -> None:
    guest = InputGuest(str(tmp_path / "in.sock1"), timeout=TIMEOUT)
    ctl = Control(tmp_path / "in.sock1.ctl")
    try:
        guest.fe.set_config(0, bytes([0x12, 0x01]))  # ABS_INFO, ABS_Y
        cfg = guest.fe.get_config(0, 136)
        assert cfg[2] == 20 and struct.unpack("<iiiii", cfg[8:28]) == (0, 32767, 0, 0, 100)
        guest.post(8)
        ctl.send("EV EV_ABS ABS_X 100", "EV EV_ABS ABS_Y 200", "EV EV_KEY BTN_TOUCH 1", "SYN")
        assert guest.events(4) == [(3, 0, 100), (3, 1, 200), (1, 0x14A, 1), SYN]
    finally:
        ctl.close()
        guest.close()


def test_guest_without_buffers_gets_syn_dropped(daemon: DaemonProcess, tmp_path: Path) -> None:
    """A guest that never posts buffers: the daemon holds at most a ring's worth of
    events, then reports the lost groups with SYN_DROPPED; later groups are whole."""
    guest = InputGuest(str(tmp_path / "in.sock0"), timeout=TIMEOUT)
    ctl = Control(tmp_path / "in.sock0.ctl")
    try:
        assert set(ctl.send(*[f"KEY {30 + i % 20} {i & 1}" for i in range(1500)])) == {"ok"}
        # Every event is in the simulated device now, but the daemon reads them on its
        # loop. The loop pass that answers a statusq kick also sees the device
        # readable, but it may answer before it reads: buffers posted on that answer
        # can be taken by the read, before the overflow. A second round trip is
        # answered in a later pass, so by then every injected event was read and held.
        guest.status((0x11, 1, 0))  # LED_CAPSL off
        guest.status((0x11, 1, 0))
        guest.post(64)
        # The marker and 31 whole KEY+SYN groups; the next group waits for 2 buffers.
        got = guest.events(63)
        assert got[0] == (0, 3, 0)  # EV_SYN SYN_DROPPED
        assert all(got[i][0] == 1 and got[i + 1] == SYN for i in range(1, 63, 2))
        guest.post(1)
        assert [ev[0] for ev in guest.events(2)] == [1, 0]
        daemon.wait_for("SYN_DROPPED queued", TIMEOUT)
    finally:
        ctl.close()
        guest.close()


def test_leds_reach_the_simulated_keyboard(daemon: DaemonProcess, tmp_path: Path) -> None:
    guest = InputGuest(str(tmp_path / "in.sock0"), timeout=TIMEOUT)
    ctl = Control(tmp_path / "in.sock0.ctl")
    try:
        guest.status((0x11, 1, 1), (0x11, 0, 1), (0x11, 0, 0))  # CAPSL on, NUML on, NUML off
        assert ctl.send("WAIT EV_LED LED_CAPSL 1 5", "GET EV_LED LED_NUML") == ["ok", "ok 0"]
    finally:
        ctl.close()
        guest.close()


def test_reconnected_front_end_gets_a_fresh_device(daemon: DaemonProcess, tmp_path: Path) -> None:
    path = str(tmp_path / "in.sock0")
    first = InputGuest(path, timeout=TIMEOUT)
    ctl = Control(tmp_path / "in.sock0.ctl")
    try:
        first.post(4)
        first.close()
        daemon.wait_for("front-end session ended", TIMEOUT)
        # Events typed while no guest is connected are stale by the time one is.
        ctl.send("KEY KEY_Q 1")
        second = InputGuest(path, timeout=TIMEOUT)
        try:
            second.post(4)
            ctl.send("KEY KEY_W 1")
            assert second.events(2) == [(1, 17, 1), SYN]
        finally:
            second.close()
    finally:
        ctl.close()
