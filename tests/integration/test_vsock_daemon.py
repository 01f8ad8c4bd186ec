"""vhost-device-vsock as a process, driven by our front-end playing the guest's driver.

Host programs are real Unix sockets: a listener at ``<uds>_<port>`` for guest
connections, clients of ``<uds>`` (``CONNECT <port>``) for host connections.  Every
wait is on an fd with a timeout.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_process import DaemonProcess
from vsock_driver import (
    HDR,
    HOST_CID,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    TYPE_STREAM,
    Packet,
    VsockDriver,
)

pytestmark = pytest.mark.slow

TIMEOUT = 10.0


def command() -> list[str]:
    script = shutil.which("vhost-device-vsock")
    return [script] if script else [sys.executable, "-m", "vhost_backends.cli.vsock"]


class Vms:
    """A vhost-device-vsock process serving ``cids`` (one ``--vm`` each)."""

    def __init__(
        self,
        tmp: Path,
        cids: list[int],
        groups: list[str] | None = None,
        extra: list[str] | None = None,
        env: dict[str, str] | None = None,
    ):
        self.tmp = tmp
        args = []
        for i, cid in enumerate(cids):
            g = f",groups={groups[i]}" if groups else ""
            args += ["--vm", f"guest-cid={cid},socket={self.sock(cid)},uds-path={self.uds(cid)}{g}"]
        self.daemon = DaemonProcess(self.sock(cids[-1]), [*command(), *(extra or args)], env=env)
        for _ in cids:
            self.daemon.wait_for("listening", TIMEOUT)

    def sock(self, cid: int) -> str:
        return str(self.tmp / f"vhost{cid}.sock")

    def uds(self, cid: int) -> str:
        return str(self.tmp / f"vm{cid}.vsock")

    def guest(self, cid: int, **kw: object) -> VsockDriver:
        return VsockDriver(self.sock(cid), cid, **kw)  # type: ignore[arg-type]

    def stop(self) -> int:
        return self.daemon.terminate()


@pytest.fixture
def vms(tmp_path: Path) -> Iterator[Vms]:
    v = Vms(tmp_path, [3])
    yield v
    assert v.stop() == 0


_OPEN: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_sockets() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def track(s: socket.socket) -> socket.socket:
    _OPEN.append(s)
    return s


def accept(lst: socket.socket) -> socket.socket:
    s = track(lst.accept()[0])
    s.settimeout(TIMEOUT)
    return s


def listen(path: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
    s = track(socket.socket(socket.AF_UNIX, kind))
    s.bind(path)
    s.listen(256)
    s.settimeout(TIMEOUT)
    return s


def host_connect(uds: str, port: int) -> socket.socket:
    c = track(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    c.settimeout(TIMEOUT)
    c.connect(uds)
    c.sendall(b"CONNECT %d\n" % port)
    return c


def host_stream_to_guest(vms: Vms, g: VsockDriver, port: int) -> tuple[socket.socket, int]:
    """A host program connects to guest port ``port`` of CID 3 and the guest accepts
    with no bytes consumed yet (``fwd_cnt`` 0); returns the host's socket, past its
    ``OK`` line, and the connection's host-side port."""
    c = host_connect(vms.uds(3), port)
    host_port = g.expect(OP_REQUEST).src_port
    g.send(port, host_port, OP_RESPONSE, fwd_cnt=0)
    recv_exact(c, len(b"OK %d\n" % host_port))
    return c, host_port


def guest_stream_to_host(g: VsockDriver, lst: socket.socket) -> tuple[Packet, bytearray, threading.Thread]:
    """The guest connects from port 4000 to host port 9, where ``lst`` listens; a
    thread reads what the host side receives into a buffer until end of file.
    Returns the RESPONSE, that buffer and the (started) thread."""
    g.send(4000, 9, OP_REQUEST)
    rsp = g.expect(OP_RESPONSE)
    peer = accept(lst)
    got = bytearray()

    def sink() -> None:
        while chunk := peer.recv(1 << 20):
            got.extend(chunk)

    t = threading.Thread(target=sink)
    t.start()
    return rsp, got, t


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


def closed_by_peer(s: socket.socket) -> bool:
    """Whether the peer closed ``s`` (end of file, or a reset when our bytes were unread)."""
    try:
        return s.recv(10) == b""
    except ConnectionResetError:
        return True


def test_config_space_holds_guest_cid(vms: Vms) -> None:
    g = vms.guest(3)
    try:
        assert g.config_cid() == 3  # VIRTIO 1.2 §5.10.4
    finally:
        g.close()


def test_guest_connects_echoes_and_half_closes_both_ways(vms: Vms) -> None:
    lst = listen(vms.uds(3) + "_1234")
    g = vms.guest(3)
    try:
        g.send(5000, 1234, OP_REQUEST)
        rsp = g.expect(OP_RESPONSE)
        assert (rsp.src_cid, rsp.dst_cid, rsp.src_port, rsp.dst_port) == (HOST_CID, 3, 1234, 5000)
        host = accept(lst)
        g.send(5000, 1234, OP_RW, b"ping")
        assert recv_exact(host, 4) == b"ping"
        host.sendall(b"pong")
        assert g.read_stream(5000, 1234, 4) == b"pong"
        # Guest half-close: the host reads EOF and can still write.
        g.send(5000, 1234, OP_SHUTDOWN, flags=2)
        assert host.recv(10) == b""
        host.sendall(b"after")
        assert g.read_stream(5000, 1234, 5) == b"after"
        # Host half-close: the guest gets SHUTDOWN(SEND) only.
        host.shutdown(socket.SHUT_WR)
        sd = g.expect(OP_SHUTDOWN)
        assert sd.flags == 2
        # The guest closes its side too: the device answers RST (§5.10.6.5).
        g.send(5000, 1234, OP_SHUTDOWN, flags=3)
        g.expect(OP_RST)
        host.close()
    finally:
        g.close()
        lst.close()


def test_guest_connect_to_closed_port_gets_rst_at_once(vms: Vms) -> None:
    g = vms.guest(3)
    try:
        g.send(5001, 4321, OP_REQUEST)
        rst = g.expect(OP_RST, timeout=2.0)
        assert (rst.src_port, rst.dst_port) == (4321, 5001)
    finally:
        g.close()


def test_host_connects_through_uds_with_connect_ok(vms: Vms) -> None:
    g = vms.guest(3)
    try:
        c = host_connect(vms.uds(3), 80)
        req = g.expect(OP_REQUEST)
        assert req.dst_port == 80
        g.send(80, req.src_port, OP_RESPONSE)
        assert recv_exact(c, len(b"OK %d\n" % req.src_port)) == b"OK %d\n" % req.src_port
        c.sendall(b"x" * 10000)
        assert g.read_stream(80, req.src_port, 10000) == b"x" * 10000
        g.send(80, req.src_port, OP_RW, b"reply")
        assert recv_exact(c, 5) == b"reply"
        g.send(80, req.src_port, OP_RST)
        assert c.recv(10) == b""
        # Garbage instead of CONNECT is refused; the guest hears nothing of it.
        bad = track(socket.socket(socket.AF_UNIX))
        bad.settimeout(TIMEOUT)
        bad.connect(vms.uds(3))
        bad.sendall(b"HELLO\n")
        assert closed_by_peer(bad)
        assert g.recv(0) == []
    finally:
        g.close()


def test_credit_exhaustion_and_recovery(vms: Vms) -> None:
    g = vms.guest(3, buf_alloc=8192)
    try:
        c, port = host_stream_to_guest(vms, g, 81)
        c.sendall(bytes(range(256)) * 64)  # 16 KiB, twice the guest's buffer
        got = bytearray()
        asked = False
        while len(got) < 8192 or not asked:
            for p in g.recv(1):
                assert p.op in (OP_RW, OP_CREDIT_REQUEST), p
                asked = asked or p.op == OP_CREDIT_REQUEST
                got += p.data
        assert len(got) == 8192  # §5.10.6.3: never beyond the guest's credit
        g.send(81, port, OP_CREDIT_UPDATE, fwd_cnt=8192)
        while len(got) < 16384:
            for p in g.recv(1):
                assert p.op in (OP_RW, OP_CREDIT_REQUEST), p
                got += p.data
        assert bytes(got) == bytes(range(256)) * 64
    finally:
        g.close()


@pytest.mark.parametrize("nap_us", ["1000", "0"], ids=["longest-nap", "no-nap"])
def test_guest_stream_kicking_only_when_asked_reaches_the_host_whole(tmp_path: Path, nap_us: str) -> None:
    """A guest that kicks tx only when the device asks (Linux's
    ``virtqueue_kick_prepare``; VIRTIO 1.2 §2.7.10 with EVENT_IDX: a device MUST
    be notified past ``avail_event`` only) streams 4 KiB RW packets within its
    credit.  With the longest tx nap (the device drains again without a kick while
    the guest posts) and with none, every byte reaches the host in order: no packet
    is left on the ring with kicks off, or the guest would wait for credit forever."""
    vms = Vms(tmp_path, [3], env={"VHD_VSOCK_TX_NAP_US": nap_us})
    lst = listen(vms.uds(3) + "_9")
    g = vms.guest(3, kick_prepare=True)
    try:
        rsp, got, t = guest_stream_to_host(g, lst)
        buf_alloc, fwd, sent = rsp.buf_alloc, rsp.fwd_cnt, 0
        data = bytes(range(256)) * 16 * 400  # 400 packets of 4 KiB
        while sent < len(data):
            if buf_alloc - (sent - fwd) >= 4096:
                g.send(4000, 9, OP_RW, data[sent : sent + 4096])
                sent += 4096
                pkts = g.recv(0)
            else:
                pkts = g.recv(1)
            for p in pkts:
                assert p.op == OP_CREDIT_UPDATE, p
                buf_alloc, fwd = p.buf_alloc, max(fwd, p.fwd_cnt)
        g.send(4000, 9, OP_SHUTDOWN, flags=3)
        t.join(TIMEOUT)
        assert not t.is_alive()
        assert got == data
    finally:
        g.close()
        assert vms.stop() == 0


@pytest.mark.parametrize("nogil", ["1", "0"], ids=["nogil", "gil"])
def test_host_stream_through_many_credit_stalls_reaches_the_guest_whole(tmp_path: Path, nogil: str) -> None:
    """A host program streams 2 MiB to a guest whose credit (16 KiB) runs out again
    and again (§5.10.6.3: the device MUST NOT send beyond it, and asks for more
    once): the daemon's loop serves it without the GIL (its host socket muted at
    each stall, scheduled again by the guest's CREDIT_UPDATE) or, with
    ``VHD_VSOCK_NOGIL=0``, with it; either way every byte arrives in order, never
    beyond the credit, and no stall is left waiting."""
    vms = Vms(tmp_path, [3], env={"VHD_VSOCK_NOGIL": nogil})
    g = vms.guest(3, buf_alloc=16384)
    try:
        c, port = host_stream_to_guest(vms, g, 82)
        data = bytes((i * 13) & 0xFF for i in range(2 << 20))
        t = threading.Thread(target=c.sendall, args=(data,))
        t.start()
        got = bytearray()
        acked = 0
        while len(got) < len(data):
            for p in g.recv(1):
                assert p.op in (OP_RW, OP_CREDIT_REQUEST), p
                got += p.data
                assert len(got) - acked <= 16384  # never beyond the credit
            if len(got) - acked >= 8192 or len(got) - acked == 16384:
                acked = len(got)
                g.send(82, port, OP_CREDIT_UPDATE, fwd_cnt=acked)
        t.join(TIMEOUT)
        assert bytes(got) == data
    finally:
        g.close()
        assert vms.stop() == 0


@pytest.mark.parametrize(
    ("rw_descs", "copy_payload"),
    [(2, True), (1, True), (2, False)],
    ids=["header-and-payload", "one-descriptor", "payload-written-once"],
)
def test_batched_guest_stream_reaches_the_host_whole(
    tmp_path: Path, rw_descs: int, copy_payload: bool
) -> None:
    """The benches' tx path (``VsockDriver.send_rw``, Linux's tx worker: every packet
    the credit allows in one batch, then one ``virtqueue_kick`` if the device asks,
    VIRTIO 1.2 §2.7.10) with each packet's header and payload in two descriptors
    (Linux's two scatter-gather entries) or one: every byte reaches the host in
    order, never beyond the peer's credit (§5.10.6.3), at most one kick a batch,
    and the credit comes back through ``poll_rx``/``wait_rx``.  Without
    ``copy_payload`` a tx buffer gets a payload only when it holds another one: the
    batches change their payload once, and buffers RW packets of ``send`` used in
    between are written again."""
    vms = Vms(tmp_path, [3])
    lst = listen(vms.uds(3) + "_9")
    g = vms.guest(3, kick_prepare=True, rw_descs=rw_descs, copy_payload=copy_payload)
    payloads = [bytes([1]) * 4096, bytes([2]) * 4096]
    try:
        rsp, got, t = guest_stream_to_host(g, lst)
        buf_alloc, fwd, sent, batches, expected = rsp.buf_alloc, rsp.fwd_cnt, 0, 0, bytearray()
        while sent < 400 * 4096:
            n = min((buf_alloc - (sent - fwd)) // 4096, 400 - sent // 4096)
            if n > 2 and batches == 6:  # two packets of ``send``, in buffers batches used before
                for _ in range(2):
                    g.send(4000, 9, OP_RW, b"\x03" * 4096)
                expected += b"\x03" * 8192
                sent += 8192
                n -= 2
            if n > 0:
                payload = payloads[batches >= 14]
                queued = g.send_rw(4000, 9, payload, n)
                assert 0 < queued <= n
                expected += payload * queued
                sent += 4096 * queued
                batches += 1
                pkts = g.poll_rx()[1]
            else:
                pkts = g.wait_rx(TIMEOUT)[1]
            for p in pkts:
                assert p.op == OP_CREDIT_UPDATE, p
                buf_alloc, fwd = p.buf_alloc, max(fwd, p.fwd_cnt)
        g.send(4000, 9, OP_SHUTDOWN, flags=3)
        t.join(TIMEOUT)
        assert not t.is_alive()
        assert got == expected
        assert g.tx_packets == 400 + 2  # and the REQUEST and SHUTDOWN
        assert g.tx_kicks <= batches + 4  # and the four packets of ``send``
    finally:
        g.close()
        assert vms.stop() == 0


def test_batched_receive_takes_every_byte_and_counts_credit(tmp_path: Path) -> None:
    """The benches' rx path (``VsockDriver.recv_data``: every used buffer per wake-up,
    runs of RW packets of one connection read as one, buffers reposted when fewer
    than half are posted, as Linux's ``virtio_vsock_rx_fill``): a 2 MiB host stream
    arrives whole and in order, and the guest's ``fwd_cnt`` for the connection is
    every payload byte it took (§5.10.6.3), so its CREDIT_UPDATEs keep the stream
    going with 256 KiB of credit."""
    vms = Vms(tmp_path, [3])
    g = vms.guest(3, kick_prepare=True)
    try:
        c, port = host_stream_to_guest(vms, g, 83)
        data = bytes((i * 7) & 0xFF for i in range(2 << 20))
        t = threading.Thread(target=c.sendall, args=(data,))
        t.start()
        got = bytearray()
        acked = 0
        while len(got) < len(data):
            before = len(got)
            n, others = g.wait_rx(TIMEOUT, into=got)
            assert n == len(got) - before
            assert all(p.op == OP_CREDIT_REQUEST for p in others), others
            assert g.fwd_cnt[(83, port)] == len(got)
            if len(got) - acked >= 64 * 1024 or others:
                acked = len(got)
                g.send_batch(83, port, OP_CREDIT_UPDATE)
        t.join(TIMEOUT)
        assert bytes(got) == data
        assert g.rx_packets >= len(data) // 4096  # a packet holds what one read found
        assert g.rx_runs > 0  # runs were read as one, not only packet by packet
    finally:
        g.close()
        assert vms.stop() == 0


def _device_uses(g: VsockDriver, packets: list[tuple[int, int, int, int, int]]) -> None:
    """Play the device on ``g``'s rx ring (its rings stopped): each ``(head, src_port,
    dst_port, op, len)`` written into buffer ``head`` and used, in order."""
    mock, memory = g.rx.mock, g.fe.memory
    idx = mock.used_idx()
    for k, (head, src, dst, op, length) in enumerate(packets):
        hdr = HDR.pack(HOST_CID, 3, src, dst, length, TYPE_STREAM, op, 0, 65536, 0)
        memory.write(g.rx_area + head * g.rx_buf, hdr + bytes([head]) * length)
        memory.write_u32(mock.used_ring + 4 + 8 * ((idx + k) % mock.size), head)
        memory.write_u32(mock.used_ring + 8 + 8 * ((idx + k) % mock.size), len(hdr) + length)
    memory.write_u16(mock.used_ring + 2, (idx + len(packets)) & 0xFFFF)


def test_batched_receive_reads_runs_and_the_packets_between_them(vms: Vms) -> None:
    """``poll_rx`` over used buffers the test writes as the device would (the rings
    stopped): RW packets of one connection are read as runs up to the ring's end, a
    CREDIT_REQUEST or another connection's packet between them packet by packet,
    every payload byte counted to its connection's ``fwd_cnt`` (§5.10.6.3) and handed
    over in order; a header whose ``len`` exceeds what the device wrote is refused."""
    g = vms.guest(3)
    try:
        g.pause()
        ring = g.rx.mock.size
        used = [
            (ring - 4, 80, 1000, OP_RW, 4096),  # a run that reaches the ring's end...
            (ring - 3, 80, 1000, OP_RW, 1),
            (ring - 2, 80, 1000, OP_RW, 100),
            (ring - 1, 80, 1000, OP_RW, 7),
            (0, 80, 1000, OP_RW, 4096),  # ...and goes on from its start
            (1, 80, 1000, OP_RW, 3),
            (2, 80, 1000, OP_RW, 5),
            (3, 80, 1000, OP_CREDIT_REQUEST, 0),
            (4, 81, 1000, OP_RW, 10),  # another connection
            (5, 80, 1000, OP_RW, 20),
        ]
        _device_uses(g, used)
        g.rx.mock.last_used = g.rx.mock.used_idx() - len(used)
        got = bytearray()
        total, others = g.poll_rx(into=got)
        rw = [(head, src, n) for head, src, _dst, op, n in used if op == OP_RW]
        assert total == sum(n for _h, _s, n in rw)
        assert got == b"".join(bytes([head]) * n for head, _s, n in rw)
        assert [(p.op, p.src_port) for p in others] == [(OP_CREDIT_REQUEST, 80)]
        assert g.fwd_cnt[(1000, 80)] == sum(n for _h, src, n in rw if src == 80)
        assert g.fwd_cnt[(1000, 81)] == 10
        assert g.rx_packets == 9
        # Runs: to the ring's end; buffers 0-2; buffer 4 (what stopped a run is read
        # on its own: the CREDIT_REQUEST, then buffer 5)
        assert g.rx_runs == 3
        bad = [(6 + k, 80, 1000, OP_RW, 50) for k in range(8)]
        _device_uses(g, bad)
        g.fe.memory.write_u32(g.rx.mock.used_ring + 8 + 8 * ((g.rx.mock.used_idx() - 1) % ring), 44 + 49)
        with pytest.raises(ValueError, match="rx buffer 13: header len 50 > used length 93"):
            g.poll_rx()
    finally:
        g.close()


def test_guest_credit_violation_resets_the_connection(vms: Vms) -> None:
    lst = listen(vms.uds(3) + "_7")
    g = vms.guest(3)
    try:
        g.send(6000, 7, OP_REQUEST)
        g.expect(OP_RESPONSE)
        host = accept(lst)
        # The host reads nothing: once its socket is full, the device buffers up to
        # buf_alloc (65536) and a guest ignoring its credit goes past it.
        for _ in range(40):
            g.send(6000, 7, OP_RW, b"z" * 32768)
        ops = set()
        while OP_RST not in ops:
            ops |= {p.op for p in g.recv(1)}
        assert ops <= {OP_CREDIT_UPDATE, OP_RST}
        assert closed_by_peer_after_data(host)
    finally:
        g.close()


def closed_by_peer_after_data(s: socket.socket) -> bool:
    """Read what the device forwarded before the reset; True once the socket ends."""
    while True:
        try:
            if not s.recv(1 << 20):
                return True
        except ConnectionResetError:
            return True


def test_200_parallel_connections(vms: Vms) -> None:
    lst = listen(vms.uds(3) + "_2000")
    g = vms.guest(3)
    try:
        for i in range(200):
            g.send(10000 + i, 2000, OP_REQUEST)
        got = [p for p in g.recv(200) if p.op == OP_RESPONSE]
        assert sorted(p.dst_port for p in got) == list(range(10000, 10200))
        peers = [accept(lst) for _ in range(200)]
        for i in range(200):
            g.send(10000 + i, 2000, OP_RW, b"%05d" % i)
        assert sorted(recv_exact(p, 5) for p in peers) == [b"%05d" % i for i in range(200)]
        for p in peers:
            p.close()
    finally:
        g.close()
        lst.close()


def test_two_vms_in_one_process_and_reconnect(tmp_path: Path) -> None:
    v = Vms(tmp_path, [4, 5])
    lst5 = listen(v.uds(5) + "_99")
    try:
        a = v.guest(4)
        b = v.guest(5)
        assert (a.config_cid(), b.config_cid()) == (4, 5)
        b.send(700, 99, OP_REQUEST)
        b.expect(OP_RESPONSE)
        host5 = accept(lst5)
        # VM 4 goes away and comes back while VM 5 keeps transferring.
        a.close()
        b.send(700, 99, OP_RW, b"a" * 1000)
        assert recv_exact(host5, 1000) == b"a" * 1000
        v.daemon.wait_for("front-end session ended", TIMEOUT)
        a = v.guest(4)
        assert a.config_cid() == 4
        c = host_connect(v.uds(4), 1)
        req = a.expect(OP_REQUEST)
        a.send(1, req.src_port, OP_RESPONSE)
        assert recv_exact(c, 3) == b"OK "
        host5.sendall(b"still here")
        assert b.read_stream(700, 99, 10) == b"still here"
        a.close()
        b.close()
    finally:
        lst5.close()
        assert v.stop() == 0


def test_siblings_in_one_group_talk_others_do_not(tmp_path: Path) -> None:
    v = Vms(tmp_path, [6, 7, 8], groups=["g1", "g1+g2", "g3"])
    try:
        a, b, c = v.guest(6), v.guest(7), v.guest(8)
        a.send(1000, 2000, OP_REQUEST, dst_cid=7)
        req = b.expect(OP_REQUEST)
        assert (req.src_cid, req.dst_cid, req.src_port, req.dst_port) == (6, 7, 1000, 2000)
        b.send(2000, 1000, OP_RESPONSE, dst_cid=6)
        a.expect(OP_RESPONSE)
        a.send(1000, 2000, OP_RW, b"q" * 9000, dst_cid=7)  # split over 4 KiB rx buffers
        got = b"".join(p.data for p in b.recv(3))
        assert got == b"q" * 9000
        # cid 8 shares no group with 6: dropped.
        a.send(1001, 3000, OP_REQUEST, dst_cid=8)
        b.send(2001, 3001, OP_REQUEST, dst_cid=6)
        assert a.expect(OP_REQUEST).src_port == 2001  # proves the earlier packet had its turn
        assert c.recv(0) == []
        for g in (a, b, c):
            g.close()
    finally:
        assert v.stop() == 0


def test_config_yaml_with_three_vms(tmp_path: Path) -> None:
    cfg = tmp_path / "vms.yaml"
    lines = ["vms:"]
    for cid in (10, 11, 12):
        lines += [
            f"  - guest-cid: {cid}",  # upstream README's spelling, which its parser refuses
            f"    socket: {tmp_path}/vhost{cid}.sock",
            f"    uds_path: {tmp_path}/vm{cid}.vsock",
            "    groups: default",
        ]
    cfg.write_text("\n".join(lines) + "\n")
    v = Vms(tmp_path, [10, 11, 12], extra=["--config", str(cfg)])
    try:
        for cid in (10, 11, 12):
            g = v.guest(cid)
            assert g.config_cid() == cid
            g.close()
    finally:
        assert v.stop() == 0


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed + (i >> 8)) & 0xFF for i in range(n))


def test_vm_pause_keeps_host_connections_and_every_byte_in_order(vms: Vms) -> None:
    """QEMU's ``stop`` (GET_VRING_BASE on every ring) mid-stream, then ``cont``: the
    device is reset by the transport, the host connections stay open, and both
    streams go on where they stopped (as the Rust daemon does)."""
    lst = listen(vms.uds(3) + "_1234")
    g = vms.guest(3)
    try:
        g.send(5000, 1234, OP_REQUEST)
        g.expect(OP_RESPONSE)
        host = accept(lst)
        down = _pattern(512 * 1024, 1)  # host -> guest
        up = _pattern(32 * 4096, 2)  # guest -> host
        sender = threading.Thread(target=host.sendall, args=(down,))
        sender.start()
        got = bytearray(g.read_stream(5000, 1234, 64 * 1024))
        for i in range(8):
            g.send(5000, 1234, OP_RW, up[i * 4096 : (i + 1) * 4096])
        assert recv_exact(host, 4096) == up[:4096]

        bases = g.pause()
        # Queued while the rings are stopped: served after the resume, in order.
        for i in range(8, 12):
            g.send(5000, 1234, OP_RW, up[i * 4096 : (i + 1) * 4096], kick=False)
        g.resume(bases)

        for i in range(12, 32):
            g.send(5000, 1234, OP_RW, up[i * 4096 : (i + 1) * 4096])
        assert recv_exact(host, len(up) - 4096) == up[4096:]
        got += g.read_stream(5000, 1234, len(down) - len(got))
        sender.join(TIMEOUT)
        assert not sender.is_alive()
        assert bytes(got) == down
    finally:
        g.close()
        lst.close()


def test_driver_reset_during_a_pause_closes_the_host_end(vms: Vms) -> None:
    """vhost-user cannot tell a pause from a driver reset: after a resume the device
    asks each kept connection for credit; a guest that no longer knows it answers
    RST (VIRTIO 1.2 §5.10.6.5: a packet for no socket), and the host end closes."""
    lst = listen(vms.uds(3) + "_1234")
    g = vms.guest(3)
    try:
        g.send(5000, 1234, OP_REQUEST)
        g.expect(OP_RESPONSE)
        host = accept(lst)
        g.resume(g.pause())
        probe = g.expect(OP_CREDIT_REQUEST)
        assert (probe.src_port, probe.dst_port) == (1234, 5000)
        g.send(5000, 1234, OP_RST)  # what Linux answers once its driver was reset
        assert closed_by_peer(host)
    finally:
        g.close()
        lst.close()


def test_front_end_leaving_closes_the_host_connections(vms: Vms) -> None:
    """The session's end (QEMU gone) releases the VM's host connections."""
    lst = listen(vms.uds(3) + "_1234")
    g = vms.guest(3)
    try:
        g.send(5000, 1234, OP_REQUEST)
        g.expect(OP_RESPONSE)
        host = accept(lst)
    finally:
        g.close()
    assert closed_by_peer(host)
    lst.close()


def _stop_signal_params() -> list[object]:
    return [
        pytest.param(sig, streaming, id=f"{sig.name}-{'streaming' if streaming else 'idle'}")
        for sig in (signal.SIGTERM, signal.SIGINT)
        for streaming in (False, True)
    ]


@pytest.mark.parametrize(("sig", "streaming"), _stop_signal_params())
def test_signal_stops_a_daemon_serving_two_vms(tmp_path: Path, sig: signal.Signals, streaming: bool) -> None:
    """SIGTERM or SIGINT stop a daemon with two VMs' front-ends connected (one loop
    thread each), idle or while a host program streams to each guest without the
    GIL: the process logs the signal, ends both sessions, removes its sockets and
    exits 0 within the wait's limit."""
    v = Vms(tmp_path, [4, 5])
    guests = [v.guest(4, buf_alloc=65536), v.guest(5, buf_alloc=65536)]
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        assert [g.config_cid() for g in guests] == [4, 5]
        if streaming:
            flowing = [threading.Event() for _ in guests]
            for g, cid, seen in zip(guests, (4, 5), flowing, strict=True):
                c = host_connect(v.uds(cid), 60)
                port = g.expect(OP_REQUEST).src_port
                g.send(60, port, OP_RESPONSE)
                recv_exact(c, len(b"OK %d\n" % port))
                threads.append(threading.Thread(target=_push, args=(c,), daemon=True))
                threads.append(threading.Thread(target=_drink, args=(g, port, seen, stop), daemon=True))
            for t in threads:
                t.start()
            for seen in flowing:
                assert seen.wait(TIMEOUT), "a stream did not start"
        v.daemon.proc.send_signal(sig)
        assert v.daemon.proc.wait(TIMEOUT) == 0
        v.daemon.wait_for(f"signal {int(sig)}, shutting down", TIMEOUT)
        assert sum("front-end session ended: shutdown" in line for line in _rest_of_log(v)) == 2
        assert not Path(v.sock(4)).exists() and not Path(v.sock(5)).exists()
    finally:
        stop.set()
        for t in threads:
            t.join(TIMEOUT)
        for g in guests:
            g.close()
        v.daemon.terminate()


def _push(c: socket.socket) -> None:
    """A host program writing to its guest until the connection goes."""
    chunk = bytes(range(256)) * 256
    try:
        while True:
            c.sendall(chunk)
    except OSError:
        pass


def _drink(g: VsockDriver, port: int, seen: threading.Event, stop: threading.Event) -> None:
    """The guest reading its stream and giving credit back until the test ends (a
    wait on the rx call fd, its limit short so the end is seen soon once the daemon
    has gone)."""
    got = 0
    while not stop.is_set():
        try:
            n, _others = g.recv_data(timeout=0.2)
        except TimeoutError:
            continue
        got += n
        if got >= 1 << 20:
            seen.set()
        g.send(60, port, OP_CREDIT_UPDATE, fwd_cnt=g.fwd_cnt.get((60, port), 0))


def _rest_of_log(v: Vms) -> list[str]:
    """Every log line of the exited daemon (its stderr read to the end)."""
    with contextlib.suppress(AssertionError):
        v.daemon.wait_for("\0never\0", TIMEOUT)
    return v.daemon.log


_SYS_TGKILL = {"x86_64": 234, "aarch64": 131}.get(platform.machine())


@pytest.mark.skipif(_SYS_TGKILL is None, reason="tgkill's system call number is not known here")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_taken_by_a_loop_thread_stops_the_daemon(tmp_path: Path, sig: signal.Signals) -> None:
    """The kernel may hand a process's signal to any thread that does not block it
    (one of the loops, when the main thread cannot take it at once); here it is sent
    to a loop thread itself.  Python runs handlers in the main thread only, and a
    loop thread's bytecode can clear its cue: the daemon must still stop as for a
    signal the main thread took (log line, both sessions ended, sockets removed,
    exit code 0)."""
    v = Vms(tmp_path, [4, 5])
    guests = [v.guest(4), v.guest(5)]
    try:
        assert [g.config_cid() for g in guests] == [4, 5]
        pid = v.daemon.proc.pid
        loops = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
        assert loops, "no loop thread"
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.syscall(_SYS_TGKILL, pid, loops[-1], int(sig)) == 0, ctypes.get_errno()
        assert v.daemon.proc.wait(TIMEOUT) == 0
        v.daemon.wait_for(f"signal {int(sig)}, shutting down", TIMEOUT)
        log = _rest_of_log(v)
        assert sum("front-end session ended: shutdown" in line for line in log) == 2
        assert sum("shutting down" in line for line in log) == 1
        assert not Path(v.sock(4)).exists() and not Path(v.sock(5)).exists()
    finally:
        for g in guests:
            g.close()
        v.daemon.terminate()
