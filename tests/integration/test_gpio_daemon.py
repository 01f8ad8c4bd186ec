"""vhost-device-gpio as a process, driven by our front-end and its ``--sim-control``.

The daemon serves simulated chips (``-l s8``); the test plays both the guest (our
:class:`~vhost_backends.frontend.Frontend`, with QEMU's set-up order) and the host
(the control socket): line names, directions, values set by the guest and seen by
the host, inputs set by the host and read by the guest, an edge injected by the
host completing the guest's eventq buffer, never twice.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_process import DaemonProcess
from device_drivers import console_script

from vhost_backends.frontend import Frontend, FrontendRing
from virtio_devices.gpio import (
    IRQ_STATUS_INVALID,
    IRQ_STATUS_VALID,
    IRQ_TYPE_EDGE_BOTH,
    IRQ_TYPE_EDGE_RISING,
    IRQ_TYPE_NONE,
    MSG_GET_DIRECTION,
    MSG_GET_LINE_NAMES,
    MSG_GET_VALUE,
    MSG_IRQ_TYPE,
    MSG_SET_DIRECTION,
    MSG_SET_VALUE,
    VIRTIO_GPIO_F_IRQ,
)
from virtio_queue.testing import VIRTQ_DESC_F_WRITE, RawDesc

pytestmark = pytest.mark.slow

TIMEOUT = 10.0
NGPIO = 8
NAMES = b"".join(b"dummy%d\0" % i for i in range(NGPIO))
OUT, IN = 1, 2
# The simulated chip logs every value it drives at info (as upstream's mock does):
# keep those out of the pipe nobody reads once the daemon listens.
QUIET = {"RUST_LOG": "info,virtio_devices.hosts.gpio=warn"}


class Control:
    """A client of ``--sim-control``."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self.file = self.sock.makefile("rw")

    def ask(self, line: str) -> str:
        self.file.write(line + "\n")
        self.file.flush()
        return str(self.file.readline().rstrip("\n"))

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class Guest:
    """Our front-end set up as QEMU sets up vhost-user-gpio-pci: both rings."""

    def __init__(self, path: str, ring_size: int = 256) -> None:
        self.fe = Frontend.connect(path, timeout=TIMEOUT)
        self.features, _ = self.fe.negotiate()
        self.fe.add_memory(4 << 20)
        self.fe.set_mem_table()
        self.rings: list[FrontendRing] = [self.fe.setup_ring(i, ring_size) for i in range(2)]

    def chain(self, index: int, readable: bytes, size: int) -> tuple[int, int]:
        mock = self.rings[index].mock
        gpa = mock.alloc(len(readable))
        self.fe.memory.write(gpa, readable)
        out = mock.alloc(size)
        self.fe.memory.write(out, b"\xee" * size)
        head = mock.add_chain([RawDesc(gpa, len(readable), 0, 0), RawDesc(out, size, VIRTQ_DESC_F_WRITE, 0)])
        return head, out

    def request(self, rtype: int, gpio: int = 0, value: int = 0, size: int = 2) -> bytes:
        head, out = self.chain(0, struct.pack("<HHI", rtype, gpio, value), size)
        self.fe.kick(0)
        assert self.fe.wait_used(0, 1, TIMEOUT) == [(head, size)]
        return self.fe.memory.read(out, size)

    def unmask(self, line: int) -> tuple[int, int]:
        """Queue an eventq buffer for ``line`` and kick; returns head and status gpa."""
        head, out = self.chain(1, struct.pack("<H", line), 1)
        self.fe.kick(1)
        return head, out

    def events(self, count: int = 1) -> list[tuple[int, int]]:
        return self.fe.wait_used(1, count, TIMEOUT)

    def status(self, gpa: int) -> int:
        return self.fe.memory.read(gpa, 1)[0]

    def close(self) -> None:
        self.fe.close()


class GpioDaemon:
    def __init__(self, tmp: Path, device_list: str = f"s{NGPIO}", count: int = 1) -> None:
        self.sock = str(tmp / "gpio.sock")
        self.ctl = str(tmp / "gpio.ctl")
        command = [
            *console_script("vhost-device-gpio", "vhost_backends.cli.gpio"),
            *("-s", self.sock, "-c", str(count), "-l", device_list, "--sim-control", self.ctl),
        ]
        self.proc = DaemonProcess(self.sock + "0", command, env=QUIET)
        for _ in range(count):
            self.proc.wait_for("listening", TIMEOUT)

    def guest(self, index: int = 0, ring_size: int = 256) -> Guest:
        return Guest(f"{self.sock}{index}", ring_size)

    def stop(self) -> int:
        return self.proc.terminate()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[GpioDaemon]:
    d = GpioDaemon(tmp_path)
    try:
        yield d
    finally:
        if d.proc.alive():
            assert d.stop() == 0, d.proc.log[-5:]


@pytest.fixture
def guest(daemon: GpioDaemon) -> Iterator[Guest]:
    g = daemon.guest()
    try:
        yield g
    finally:
        g.close()


@pytest.fixture
def host(daemon: GpioDaemon) -> Iterator[Control]:
    c = Control(daemon.ctl)
    try:
        yield c
    finally:
        c.close()


def test_gpio_daemon_config_and_names(guest: Guest) -> None:
    assert guest.features & VIRTIO_GPIO_F_IRQ
    assert guest.fe.get_config(0, 8) == struct.pack("<HHI", NGPIO, 0, len(NAMES))
    assert guest.request(MSG_GET_LINE_NAMES, size=1 + len(NAMES)) == b"\x00" + NAMES


def test_gpio_daemon_output_seen_by_host(guest: Guest, host: Control) -> None:
    assert host.ask("get 0 3") == "ok none 0"
    assert guest.request(MSG_SET_VALUE, 3, 1) == b"\x00\x00"
    assert guest.request(MSG_SET_DIRECTION, 3, OUT) == b"\x00\x00"
    assert guest.request(MSG_GET_DIRECTION, 3) == b"\x00\x01"
    assert host.ask("get 0 3") == "ok out 1"
    assert guest.request(MSG_SET_VALUE, 3, 0) == b"\x00\x00"
    assert host.ask("get 0 3") == "ok out 0"


def test_gpio_daemon_input_set_by_host(guest: Guest, host: Control) -> None:
    assert guest.request(MSG_SET_DIRECTION, 5, IN) == b"\x00\x00"
    assert guest.request(MSG_GET_VALUE, 5) == b"\x00\x00"
    assert host.ask("set 0 5 1") == "ok"
    assert host.ask("get 0 5") == "ok in 1"
    assert guest.request(MSG_GET_VALUE, 5) == b"\x00\x01"


def test_gpio_daemon_injected_edge_completes_waiter_once(guest: Guest, host: Control) -> None:
    """An edge injected through the control socket completes the waiting eventq
    buffer VALID; further edges while it is out are latched for the next buffer,
    and no buffer is ever completed twice."""
    assert guest.request(MSG_SET_DIRECTION, 2, IN) == b"\x00\x00"
    assert guest.request(MSG_IRQ_TYPE, 2, IRQ_TYPE_EDGE_RISING) == b"\x00\x00"
    head, status = guest.unmask(2)
    assert host.ask("set 0 2 1") == "ok"
    assert guest.events() == [(head, 1)]
    assert guest.status(status) == IRQ_STATUS_VALID
    # Edges while masked: latched (one interrupt for many), completed on unmask.
    for level in (0, 1, 0, 1):
        assert host.ask(f"set 0 2 {level}") == "ok"
    # A request round trip orders the daemon after the edges it was sent.
    assert guest.request(MSG_GET_VALUE, 2) == b"\x00\x01"
    head2, status2 = guest.unmask(2)
    assert guest.events() == [(head2, 1)]
    assert guest.status(status2) == IRQ_STATUS_VALID
    # Disable with a buffer out: it comes back INVALID, exactly once.
    head3, status3 = guest.unmask(2)
    assert guest.request(MSG_GET_DIRECTION, 2) == b"\x00\x02"  # the buffer is held now
    assert guest.request(MSG_IRQ_TYPE, 2, IRQ_TYPE_NONE) == b"\x00\x00"
    assert guest.events() == [(head3, 1)]
    assert guest.status(status3) == IRQ_STATUS_INVALID
    for level in (0, 1):
        assert host.ask(f"set 0 2 {level}") == "ok"
    assert guest.request(MSG_GET_VALUE, 2) == b"\x00\x01"
    mock = guest.rings[1].mock
    assert mock.used_idx() == 3  # three buffers, three completions, none twice


def test_gpio_daemon_many_waiters_many_edges(guest: Guest, host: Control) -> None:
    """Every line waits; edges on every line in any order: one completion each."""
    for line in range(NGPIO):
        assert guest.request(MSG_SET_DIRECTION, line, IN) == b"\x00\x00"
        assert guest.request(MSG_IRQ_TYPE, line, IRQ_TYPE_EDGE_BOTH) == b"\x00\x00"
    heads = {line: guest.unmask(line)[0] for line in range(NGPIO)}
    for line in reversed(range(NGPIO)):
        assert host.ask(f"set 0 {line} 1") == "ok"
        assert host.ask(f"set 0 {line} 0") == "ok"
    used = guest.events(NGPIO)
    assert sorted(used) == sorted((h, 1) for h in heads.values())
    assert guest.request(MSG_GET_DIRECTION, 0) == b"\x00\x02"
    assert guest.rings[1].mock.used_idx() == NGPIO


def test_gpio_daemon_accepts_qemu10_ring_size(daemon: GpioDaemon) -> None:
    """QEMU 10's vhost-user-gpio asks for 1024-entry rings (upstream allows 256 and
    QEMU aborts)."""
    g = daemon.guest(ring_size=1024)
    try:
        assert g.request(MSG_GET_DIRECTION, 0) == b"\x00\x02"  # unconfigured: the chip's input
    finally:
        g.close()


def test_gpio_daemon_bad_requests_answered_and_daemon_goes_on(guest: Guest) -> None:
    assert guest.request(0x77) == b"\x01\x00"
    assert guest.request(MSG_GET_VALUE, NGPIO) == b"\x01\x00"
    assert guest.request(MSG_SET_VALUE, 0, 2) == b"\x01\x00"
    # A response buffer of the wrong size: status ERR, value 0, nothing done.
    head, out = guest.chain(0, struct.pack("<HHI", MSG_SET_DIRECTION, 0, IN), 3)
    guest.fe.kick(0)
    assert guest.fe.wait_used(0, 1, TIMEOUT) == [(head, 2)]
    assert guest.fe.memory.read(out, 3) == b"\x01\x00\xee"
    assert guest.request(MSG_GET_DIRECTION, 0) == b"\x00\x02"


def test_gpio_daemon_reconnect_releases_lines(daemon: GpioDaemon, host: Control) -> None:
    g = daemon.guest()
    assert g.request(MSG_SET_VALUE, 1, 1) == b"\x00\x00"
    assert g.request(MSG_SET_DIRECTION, 1, OUT) == b"\x00\x00"
    assert host.ask("get 0 1") == "ok out 1"
    g.close()
    # The next front-end finds the line released (the device was reset).
    g2 = daemon.guest()
    try:
        assert g2.request(MSG_GET_DIRECTION, 1) == b"\x00\x02"  # back to the chip's input
        assert host.ask("get 0 1") == "ok none 0"
    finally:
        g2.close()


def test_gpio_daemon_two_sockets_two_chips(tmp_path: Path) -> None:
    d = GpioDaemon(tmp_path, "s2:s4", count=2)
    try:
        guests: list[Any] = [d.guest(0), d.guest(1)]
        try:
            assert guests[0].fe.get_config(0, 2) == struct.pack("<H", 2)
            assert guests[1].fe.get_config(0, 2) == struct.pack("<H", 4)
            ctl = Control(d.ctl)
            try:
                assert ctl.ask("set 1 3 1") == "ok"
                assert guests[1].request(MSG_SET_DIRECTION, 3, IN) == b"\x00\x00"
                assert guests[1].request(MSG_GET_VALUE, 3) == b"\x00\x01"
                assert ctl.ask("get 0 1") == "ok none 0"
            finally:
                ctl.close()
        finally:
            for g in guests:
                g.close()
    finally:
        assert d.stop() == 0
