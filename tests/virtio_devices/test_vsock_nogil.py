"""The nogil paths of virtio-vsock's compiled kicks (``KickPump.pump_nogil``): the
steady state of a host-to-guest stream served without the GIL, handed over to
the pass with the GIL at everything else, and the same bytes, packets and ring
entries as the path with the GIL."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from vsock_guest import RX, TX, VsockGuest

from virtio_devices import _vsock_fast
from virtio_devices._pump import Signaller
from virtio_devices.hosts.vsock import UnixHost
from virtio_devices.testing import FakeInterrupt
from virtio_devices.vsock import (
    LOCAL_PORT_FIRST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RW,
    VsockDevice,
)


@dataclass
class SignallingInterrupt(FakeInterrupt):
    """An interrupt with compiled signallers (as vhost-user's), each on an eventfd."""

    sigs: dict[int, Signaller] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i in (RX, TX):
            s = Signaller()
            s.set_fd(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
            self.sigs[i] = s

    def signaller(self, index: int) -> Signaller:
        return self.sigs[index]

    def signalled(self, index: int) -> int:
        try:
            return os.eventfd_read(self.sigs[index].call_fd)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        for s in self.sigs.values():
            s.set_fd(-1)


@dataclass
class Kicks:
    """The guest's kicks routed as the vhost-user loop serves them: the kick pump's
    nogil path first (the GIL released), ``pump_c`` when it asks, ``process_queue``
    when that asks."""

    dev: VsockDevice
    nogil: int = 0
    handed: int = 0
    pumps: dict[int, _vsock_fast.KickPump] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i in (RX, TX):
            pump = self.dev.kick_pump(i)
            assert pump is not None and pump.offers_nogil
            self.pumps[i] = pump
        self.dev.process_queue = self.kick  # type: ignore[method-assign]

    def kick(self, index: int) -> None:
        pump = self.pumps.get(index)
        if pump is None:
            _vsock_fast.process_queue(self.dev, index)
        elif pump.serve_nogil():
            self.handed += 1
            if pump.pump():
                _vsock_fast.process_queue(self.dev, index)
        else:
            self.nogil += 1


@pytest.fixture
def host(tmp_path: Path) -> Iterator[UnixHost]:
    h = UnixHost(str(tmp_path / "v.sock"))
    yield h
    h.close()


def _stream(host: UnixHost, nogil: bool, total: int, credit_every: int = 64 * 1024) -> tuple[bytes, Kicks, VsockGuest]:
    """Host -> guest: ``total`` bytes through one connection, the guest reposting its
    rx buffers and giving credit as it reads, as the bench's guest does."""
    dev = VsockDevice(3, host, tx_buffer_size=65536)
    irq = SignallingInterrupt()
    g = VsockGuest(dev, queue_size=64)
    dev.interrupt = irq
    dev._fast.nogil = nogil
    kicks = Kicks(dev)
    g.buf_alloc = 256 * 1024
    g.post_rx(32)
    c = socket.socket(socket.AF_UNIX)
    c.connect(host.path)
    c.sendall(b"CONNECT 80\n")
    [req] = g.exchange()
    assert req.op == OP_REQUEST
    g.send(80, LOCAL_PORT_FIRST, OP_RESPONSE)
    assert c.recv(100) == b"OK %d\n" % LOCAL_PORT_FIRST
    data = bytes((i * 7) & 0xFF for i in range(total))
    c.setblocking(False)
    sent = got_n = acked = 0
    got = bytearray()
    while got_n < total:
        if sent < total:
            try:
                sent += c.send(data[sent : sent + 65536])
            except BlockingIOError:
                pass
        g.pump()
        for p in g.received():
            assert p.op in (OP_RW, OP_CREDIT_UPDATE), p
            got += p.data
            got_n += len(p.data)
        if got_n - acked >= credit_every:
            g.fwd_cnt[(80, LOCAL_PORT_FIRST)] = got_n
            g.send(80, LOCAL_PORT_FIRST, OP_CREDIT_UPDATE)
            acked = got_n
    c.close()
    irq.close()
    return bytes(got), kicks, g


def test_host_to_guest_stream_served_without_the_gil(host: UnixHost) -> None:
    got, kicks, g = _stream(host, True, 2 << 20)
    try:
        assert got == bytes((i * 7) & 0xFF for i in range(2 << 20))
        st = g.device._fast
        assert kicks.nogil > 0 and st.nogil_chains > 0, (kicks, st.nogil_passes, st.nogil_handed)
    finally:
        g.close()
