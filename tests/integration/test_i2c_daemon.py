"""vhost-device-i2c as a process: sockets sharing one bus, held groups, reconnects, SIGTERM.

Transport-specific checks beside the shared behaviour suite (test_i2c_behaviour.py):
the daemon on ``-l sim:80 -c 2`` driven by our ``Frontend`` over real sockets.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_process import DaemonProcess
from device_drivers import console_script

from vhost_backends.frontend import Frontend, FrontendRing
from virtio_devices.i2c import VIRTIO_I2C_FLAGS_FAIL_NEXT, VIRTIO_I2C_FLAGS_M_RD, out_hdr

pytestmark = pytest.mark.slow

TIMEOUT = 10.0
FN, RD = VIRTIO_I2C_FLAGS_FAIL_NEXT, VIRTIO_I2C_FLAGS_M_RD
OK, ERR = b"\x00", b"\x01"


class Guest:
    """One front-end connection with its ring 0."""

    def __init__(self, path: str, queue_size: int = 64) -> None:
        self.fe = Frontend.connect(path, timeout=TIMEOUT)
        self.fe.negotiate()
        self.fe.add_memory(4 << 20)
        self.fe.set_mem_table()
        self.ring: FrontendRing = self.fe.setup_ring(0, queue_size)

    def request(self, readable: list[bytes], writable: list[int]) -> tuple[int, list[int]]:
        return self.fe.add_request(self.ring.index, readable, writable)

    def write(self, addr: int, data: bytes, flags: int = 0) -> tuple[int, int]:
        head, (status,) = self.request([out_hdr(addr, flags), *([data] if data else [])], [1])
        return head, status

    def read(self, addr: int, n: int, flags: int = 0) -> tuple[int, int, int]:
        head, (buf, status) = self.request([out_hdr(addr, flags | RD)], [n, 1])
        return head, buf, status

    def kick(self, count: int) -> list[tuple[int, int]]:
        self.fe.kick(0)
        return self.fe.wait_used(0, count, TIMEOUT)

    def mem(self, gpa: int, n: int) -> bytes:
        return self.fe.memory.read(gpa, n)

    def close(self) -> None:
        self.fe.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[DaemonProcess, str]]:
    sock = str(tmp_path / "i2c.sock")
    d = DaemonProcess(
        sock + "0",
        [
            *console_script("vhost-device-i2c", "vhost_backends.cli.i2c"),
            "-s",
            sock,
            "-c",
            "2",
            "-l",
            "sim:80",
        ],
    )
    try:
        d.wait_for("listening", TIMEOUT)
        d.wait_for("listening", TIMEOUT)
        yield d, sock
    finally:
        if d.alive():
            assert d.terminate() == 0, d.log[-5:]


def test_every_socket_sees_the_same_eeprom(daemon: tuple[DaemonProcess, str]) -> None:
    """Upstream shares one adapter map between its sockets: so do we, with the
    simulated EEPROM too (a write from guest 0 is read by guest 1)."""
    _, sock = daemon
    g0, g1 = Guest(sock + "0"), Guest(sock + "1")
    try:
        h, s = g0.write(80, b"\x40hello")
        assert g0.kick(1) == [(h, 1)] and g0.mem(s, 1) == OK
        h1, _ = g1.write(80, b"\x40", FN)
        h2, b2, s2 = g1.read(80, 5)
        assert g1.kick(2) == [(h1, 1), (h2, 6)]
        assert g1.mem(s2, 1) == OK
        assert g1.mem(b2, 5) == b"hello"
    finally:
        g0.close()
        g1.close()


def test_open_group_is_held_and_given_back_on_get_vring_base(daemon: tuple[DaemonProcess, str]) -> None:
    """A group without its final request is held (nothing used); GET_VRING_BASE
    returns its chains to the avail ring (the base counts them as not consumed),
    and a back-end that starts from that base serves the whole group."""
    d, sock = daemon
    g = Guest(sock + "0")
    try:
        g.write(80, b"\x00\x99", FN)
        g.fe.kick(0)
        # Whether or not the kick was served first, the chain is neither used nor
        # consumed when the ring stops.
        assert g.fe.get_vring_base(0) == 0
        assert g.ring.mock.used_idx() == 0
    finally:
        g.close()
    # The next connection sees the daemon as fresh and serves a whole group.
    g = Guest(sock + "0")
    try:
        a = g.write(80, b"\x00\x98", FN)
        b = g.write(80, b"\x00", FN)
        h, buf, s = g.read(80, 1)
        assert [u[0] for u in g.kick(3)] == [a[0], b[0], h]
        assert g.mem(buf, 1) == b"\x98" and g.mem(s, 1) == OK
    finally:
        g.close()
    assert d.alive()


def test_reconnect_and_sigterm(daemon: tuple[DaemonProcess, str]) -> None:
    d, sock = daemon
    for _ in range(2):
        g = Guest(sock + "0")
        h, s = g.write(81, b"")
        assert g.kick(1) == [(h, 1)]
        assert g.mem(s, 1) == ERR
        g.close()
    assert d.terminate() == 0
