"""The device fault policy over a real vhost-user session (issue 12, item 3).

A guest fault and a host fault return the chain (used length 0) and the session goes
on; a device bug resets the device, writes the ring's err fd (vhost-user's
NEEDS_RESET) and leaves the connection up, so the front-end can start the ring again.
"""

from __future__ import annotations

import os
import select
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_process import DaemonProcess

from vhost_backends.frontend import Frontend, FrontendRing
from virtio_queue.testing import VIRTQ_DESC_F_WRITE, RawDesc


@pytest.fixture
def fault_daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    sock = str(tmp_path / "fault.sock")
    d = DaemonProcess(sock, [sys.executable, str(Path(__file__).parent / "fault_device.py"), sock])
    try:
        d.wait_for("listening")
        yield d
    finally:
        if d.alive():
            d.proc.kill()
        d.terminate()


def request(fe: Frontend, ring: FrontendRing, payload: bytes) -> tuple[int, int]:
    src, dst = ring.mock.alloc(len(payload)), ring.mock.alloc(16)
    fe.memory.write(src, payload)
    head = ring.mock.add_chain([RawDesc(src, len(payload), 0, 0), RawDesc(dst, 16, VIRTQ_DESC_F_WRITE, 0)])
    return head, dst


def session(path: str) -> Frontend:
    fe = Frontend.connect(path, timeout=10)
    fe.negotiate()
    fe.add_memory(1 << 20)
    fe.set_mem_table()
    return fe


def test_guest_and_host_faults_return_the_chain_and_the_queue_goes_on(fault_daemon: DaemonProcess) -> None:
    with session(fault_daemon.socket_path) as fe:
        ring = fe.setup_ring(0, 64)
        guest, _ = request(fe, ring, b"guest")
        host, _ = request(fe, ring, b"host")
        ok, dst = request(fe, ring, b"fine")
        fe.kick(0)
        got: list[tuple[int, int]] = []
        while len(got) < 3:
            got += fe.wait_used(0, timeout=10)
        assert got == [(guest, 0), (host, 0), (ok, 4)]
        assert fe.memory.read(dst, 4) == b"fine"
    fault_daemon.wait_for("session ended")
    assert fault_daemon.alive()
    assert any("on purpose" in line for line in fault_daemon.log)  # both were logged


def test_device_bug_resets_the_device_and_the_session_stays_up(fault_daemon: DaemonProcess) -> None:
    with session(fault_daemon.socket_path) as fe:
        err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            ring = fe.setup_ring(0, 64)
            fe.set_vring_err(0, err)
            request(fe, ring, b"bug")
            fe.kick(0)
            # The err fd, or the daemon closing the connection (which must not happen).
            p = select.poll()
            p.register(err, select.POLLIN)
            p.register(fe.conn.fileno(), select.POLLIN)
            ready = dict(p.poll(10_000))
            assert fe.conn.fileno() not in ready, "the daemon ended the session"
            assert err in ready, "the err fd was not written"
            # The connection is up: the front-end starts the ring again and is served.
            ring = fe.setup_ring(0, 64)
            ok, dst = request(fe, ring, b"again")
            fe.kick(0)
            assert fe.wait_used(0, timeout=10) == [(ok, 5)]
            assert fe.memory.read(dst, 5) == b"again"
        finally:
            os.close(err)
    fault_daemon.wait_for("session ended")
    assert fault_daemon.alive()
    assert any("device failed" in line and "a bug on purpose" in line for line in fault_daemon.log)
    assert fault_daemon.terminate() == 0
