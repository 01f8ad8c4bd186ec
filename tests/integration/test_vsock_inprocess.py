"""vhost-device-vsock served in this process (``VhostUserDaemon`` on a thread), driven by
our front-end playing the guest's driver: what the daemon's threads do, seen from
inside, where a daemon process shows only its packets.

The loop's state is read on the loop's own thread (``call_soon_threadsafe``, then an
event waited for with a timeout), as the nogil paths' rule asks of every other thread.
"""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from vsock_driver import OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, VsockDriver

from vhost_backends.daemon import VhostUserDaemon
from virtio_devices.hosts.vsock import UnixHost
from virtio_devices.vsock import VsockDevice

TIMEOUT = 10.0
PORT = 80


class InProcess:
    """One VM's vsock daemon on a thread of this process (the nogil paths on)."""

    def __init__(self, tmp: Path) -> None:
        self.uds = str(tmp / "vm.vsock")
        self.sock = str(tmp / "vhost.sock")
        self.devices: list[VsockDevice] = []
        self.host = UnixHost(self.uds)

        def factory() -> VsockDevice:
            dev = VsockDevice(3, self.host, tx_buffer_size=65536, nogil=True)
            self.devices.append(dev)
            return dev

        self.daemon = VhostUserDaemon("vsock", self.sock, factory, max_connections=1)
        self.thread = threading.Thread(target=self.daemon.serve, daemon=True)
        self.thread.start()
        assert self.daemon.ready.wait(TIMEOUT)

    def on_loop(self, fn: Callable[[VsockDevice], Any]) -> Any:
        """``fn(device)``'s result, run on the device's loop thread."""
        dev = self.devices[-1]
        assert dev.loop is not None
        done = threading.Event()
        out: list[Any] = []

        def run() -> None:
            try:
                out.append(fn(dev))
            except BaseException as e:  # raised again on the test's thread
                out.append(e)
            done.set()

        dev.loop.call_soon_threadsafe(run)
        assert done.wait(TIMEOUT), "the loop did not run the callback"
        if isinstance(out[0], BaseException):
            raise out[0]
        return out[0]

    def close(self) -> None:
        if self.thread.is_alive():  # (after its one session it has returned already)
            self.daemon.stop()
        self.thread.join(TIMEOUT)
        self.host.close()


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[InProcess]:
    v = InProcess(tmp_path)
    yield v
    v.close()


def _watched_events(epfd: int, fd: int) -> int:
    """The events ``fd`` is watched for in the epoll set ``epfd`` (``/proc`` fdinfo;
    -1: not in the set)."""
    with open(f"/proc/self/fdinfo/{epfd}") as f:
        for line in f:
            if line.startswith("tfd:"):
                fields = line.split()
                if int(fields[1]) == fd:
                    return int(fields[3], 16)
    return -1


def test_credit_exhausted_socket_is_muted_without_the_gil_and_unmuted_by_credit(vm: InProcess) -> None:
    """A host program writes more than the guest's credit (§5.10.6.3): the daemon sends
    the credit's worth and one CREDIT_REQUEST, and the nogil input path mutes the
    host socket in the loop's epoll set (watched for no input: no wake-up while
    the guest has no room) instead of taking the GIL to stop watching it.  Each
    CREDIT_UPDATE of the guest lets the next credit's worth through; every byte
    arrives once, in order; once the guest can take more than the host has, the
    socket is watched for input again and a later write reaches the guest."""
    g = VsockDriver(vm.sock, cid=3, buf_alloc=64 * 1024, timeout=TIMEOUT)
    c = socket.socket(socket.AF_UNIX)
    try:
        c.connect(vm.uds)
        c.sendall(b"CONNECT %d\n" % PORT)
        req = g.expect(OP_REQUEST)
        key = (PORT, req.src_port)
        g.send(PORT, req.src_port, OP_RESPONSE)
        line = b""
        while not line.endswith(b"\n"):
            line += c.recv(1)
        data = bytes(range(251)) * 800  # about three times the guest's credit
        writer = threading.Thread(target=c.sendall, args=(data,), daemon=True)
        writer.start()
        received = bytearray()
        asked = 0

        def take(until: int, ask: bool) -> None:
            """Packets until ``until`` bytes came (and, ``ask``, a CREDIT_REQUEST)."""
            nonlocal asked
            while len(received) < until or (ask and not asked):
                for p in g.recv(1):
                    if p.op == OP_CREDIT_REQUEST:
                        asked += 1
                    else:
                        received.extend(p.data)

        take(64 * 1024, True)
        assert len(received) == 64 * 1024 and asked == 1

        def state(dev: VsockDevice) -> tuple[bool, bool, int, int]:
            [conn] = dev.conns.values()
            assert dev.loop is not None
            events = _watched_events(dev.loop.fileno(), conn.fd)
            return conn.muted, conn.armed, events, dev._fast.nogil_passes

        muted, armed, events, passes = vm.on_loop(state)
        # (The path with the GIL stops watching it instead: not in the set, -1.)
        assert (muted, armed, events >= 0) == (True, False, True) and passes > 0
        assert not events & select.EPOLLIN, hex(events)
        while len(received) < len(data):
            asked = 0
            g.send(PORT, req.src_port, OP_CREDIT_UPDATE)  # (fwd_cnt: what the driver took)
            until = len(received) + 64 * 1024
            take(min(len(data), until), until <= len(data))
        assert bytes(received) == data
        writer.join(TIMEOUT)
        g.send(PORT, req.src_port, OP_CREDIT_UPDATE)  # room for 64 KiB, the host has none
        assert g.fwd_cnt[key] == len(data)
        c.sendall(b"tail")
        while len(received) < len(data) + 4:
            received.extend(b"".join(p.data for p in g.recv(1)))
        assert bytes(received[len(data) :]) == b"tail"
        muted, armed, events, _passes = vm.on_loop(state)
        assert not muted and armed and events & select.EPOLLIN, (muted, armed, hex(events))
    finally:
        c.close()
        g.close()
