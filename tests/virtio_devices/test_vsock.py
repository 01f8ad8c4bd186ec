"""The virtio-vsock device (VIRTIO 1.2 §5.10) in-process, with real Unix sockets on the host side.

:class:`vsock_guest.VsockGuest` plays the guest's driver over a DeviceRig; the host
ends are real sockets in a temporary directory.  Property tests throw random headers
and random interleavings of both sides' operations at the device.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vsock_guest import RX, TX, VsockGuest, _desc, first_naps

from virtio_devices import _vsock_fast
from virtio_devices.base import VIRTIO_RING_F_INDIRECT_DESC
from virtio_devices.errors import MalformedRequest
from virtio_devices.hosts.vsock import UnixHost, VsockError, VsockForwardHost
from virtio_devices.testing import FakeInterrupt
from virtio_devices.vsock import (
    HDR,
    HDR_SIZE,
    LOCAL_PORT_FIRST,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    SEQ_EOM,
    TYPE_SEQPACKET,
    VIRTIO_ID_VSOCK,
    VIRTIO_VSOCK_F_SEQPACKET,
    Hdr,
    VsockDevice,
    VsockRegistry,
    parse_connect_line,
)
from virtio_queue import DescriptorChain


@pytest.fixture
def host(tmp_path: Path) -> Iterator[UnixHost]:
    h = UnixHost(str(tmp_path / "v.sock"))
    yield h
    h.close()


@pytest.fixture(params=[True, False], ids=["compiled", "python"])
def guest(host: UnixHost, request: pytest.FixtureRequest) -> Iterator[VsockGuest]:
    """A guest of a device that serves the common packets in compiled code, or one
    that serves every packet in Python: each behaviour test runs with both."""
    dev = VsockDevice(3, host, tx_buffer_size=65536)
    dev._compiled = request.param
    g = VsockGuest(dev)
    g.post_rx(64)
    yield g
    g.close()


_OPEN: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_sockets() -> Iterator[None]:
    """Host-side sockets of a test are closed even when it fails (no ResourceWarning
    blamed on the next test)."""
    yield
    while _OPEN:
        _OPEN.pop().close()


def track(s: socket.socket) -> socket.socket:
    _OPEN.append(s)
    return s


def listen(host: UnixHost, port: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    s = track(socket.socket(socket.AF_UNIX, kind))
    s.bind(host.port_path(port))
    s.listen(16)
    s.settimeout(5)
    return s


def connected(
    guest: VsockGuest, host: UnixHost, port: int = 1234, src: int = 5000
) -> tuple[socket.socket, socket.socket]:
    lst = listen(host, port)
    guest.send(src, port, OP_REQUEST)
    [rsp] = guest.exchange()
    assert rsp.op == OP_RESPONSE
    peer = track(lst.accept()[0])
    peer.settimeout(5)
    return lst, peer


# -- identity -----------------------------------------------------------------------------


def test_identity_features_and_config(host: UnixHost) -> None:
    dev = VsockDevice(7, host, queue_size=256)
    assert dev.device_id == VIRTIO_ID_VSOCK == 19
    assert dev.queue_sizes == (256, 256, 256)
    assert not dev.device_features() & VIRTIO_RING_F_INDIRECT_DESC  # as upstream
    assert dev.device_features() & VIRTIO_VSOCK_F_SEQPACKET
    assert dev.read_config(0, 8) == struct.pack("<Q", 7)  # §5.10.4 guest_cid le64


# -- header parser ------------------------------------------------------------------------------


def test_header_shorter_than_44_bytes_is_malformed() -> None:
    with pytest.raises(MalformedRequest, match="44 bytes"):
        Hdr.parse(b"\0" * 43)


@given(st.binary(min_size=HDR_SIZE, max_size=HDR_SIZE + 8))
def test_header_parse_roundtrips_any_bytes(raw: bytes) -> None:
    assert Hdr.parse(raw).pack() == raw[:HDR_SIZE]


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(
    fields=st.tuples(
        st.sampled_from([3, 4, 2**64 - 1]),  # src_cid
        st.sampled_from([2, 3, 9]),  # dst_cid
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),  # len
        st.integers(0, 4),  # type
        st.integers(0, 9),  # op
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
    ),
    payload=st.binary(max_size=64),
)
def test_random_guest_headers_never_break_the_device(
    guest: VsockGuest, fields: tuple[int, ...], payload: bytes
) -> None:
    """Any header from the guest is served or refused (RST, drop): the tx chain comes
    back, the device stays usable, and no host connection is made to nowhere."""
    raw = HDR.pack(*fields) + payload
    guest.rig.add_request(TX, readable=[raw])
    assert len(guest.rig.kick(TX)) == 1
    guest.exchange()
    assert guest.device.broken is None
    for conn in list(guest.device.conns.values()):
        guest.device._drop(conn)


def test_len_beyond_buffers_resets_connection(guest: VsockGuest, host: UnixHost) -> None:
    lst, peer = connected(guest, host)
    guest.send(5000, 1234, OP_RW, b"abc", length=100)
    [rst] = guest.exchange()
    assert rst.op == OP_RST
    assert peer.recv(10) == b""
    lst.close()
    peer.close()


# -- stream operations -----------------------------------------------------------------


def test_connect_data_both_ways_and_clean_close(guest: VsockGuest, host: UnixHost) -> None:
    lst, peer = connected(guest, host)
    guest.send(5000, 1234, OP_RW, b"hello")
    assert peer.recv(10) == b"hello"
    peer.sendall(b"world")
    [rw] = guest.exchange()
    assert (rw.op, rw.data, rw.hdr.src_port, rw.hdr.dst_port) == (OP_RW, b"world", 1234, 5000)
    assert rw.hdr.fwd_cnt == 5 and rw.hdr.buf_alloc == 65536  # §5.10.6.3 credit on every packet
    guest.send(5000, 1234, OP_SHUTDOWN, flags=3)
    [rst] = guest.exchange()
    assert rst.op == OP_RST  # §5.10.6.5: SHUTDOWN answered by RST
    assert peer.recv(10) == b""
    assert guest.device.conns == {}
    lst.close()
    peer.close()


def test_connect_to_closed_port_gets_rst_at_once(guest: VsockGuest) -> None:
    guest.send(5000, 4444, OP_REQUEST)
    [rst] = guest.exchange()
    assert (rst.op, rst.hdr.src_port, rst.hdr.dst_port) == (OP_RST, 4444, 5000)


def test_packet_for_unknown_connection_gets_rst_but_rst_gets_nothing(guest: VsockGuest) -> None:
    guest.send(1, 2, OP_RW, b"x")
    assert [p.op for p in guest.exchange()] == [OP_RST]
    guest.send(1, 2, OP_RST)
    assert guest.exchange() == []


def test_wrong_source_cid_is_dropped(guest: VsockGuest, host: UnixHost) -> None:
    lst = listen(host, 1234)
    guest.send(5000, 1234, OP_REQUEST, src_cid=9)
    assert guest.exchange() == []
    assert guest.device.conns == {}
    lst.close()


def test_unknown_op_resets_connection(guest: VsockGuest, host: UnixHost) -> None:
    lst, peer = connected(guest, host)
    guest.send(5000, 1234, 42)
    assert [p.op for p in guest.exchange()] == [OP_RST]
    lst.close()
    peer.close()


def test_credit_request_answered_with_update(guest: VsockGuest, host: UnixHost) -> None:
    lst, peer = connected(guest, host)
    guest.send(5000, 1234, OP_CREDIT_REQUEST)
    [upd] = guest.exchange()
    assert (upd.op, upd.hdr.buf_alloc) == (OP_CREDIT_UPDATE, 65536)
    lst.close()
    peer.close()


def test_64k_writes_get_credit_back_at_once(guest: VsockGuest, host: UnixHost) -> None:
    """A guest writing buf_alloc at a time is told of the freed space right away."""
    lst, peer = connected(guest, host)
    for i in range(4):
        guest.send(5000, 1234, OP_RW, bytes([i]) * 65536)
        [upd] = guest.exchange()
        assert upd.op == OP_CREDIT_UPDATE and upd.hdr.fwd_cnt == 65536 * (i + 1)
        got = b""
        while len(got) < 65536:
            got += peer.recv(65536)
        assert got == bytes([i]) * 65536
    lst.close()
    peer.close()


def test_full_host_socket_buffers_then_flushes(guest: VsockGuest, host: UnixHost) -> None:
    lst, peer = connected(guest, host)
    sent = bytearray()
    conn = guest.device.conns[(1234, 5000)]
    i = 0
    while not conn.txbuf:  # until the host socket is full
        chunk = bytes([i & 0xFF]) * 32768
        guest.send(5000, 1234, OP_RW, chunk, fwd_cnt=0)
        sent += chunk
        guest.exchange()
        i += 1
    got = bytearray()
    while len(got) < len(sent):
        got += peer.recv(1 << 20)
        guest.pump()
    assert got == sent  # nothing lost or reordered
    assert not conn.txbuf
    lst.close()
    peer.close()


def test_rw_packets_of_one_kick_reach_the_host_in_order_when_it_fills(
    guest: VsockGuest, host: UnixHost
) -> None:
    """Many RW packets made available before one kick (the compiled path writes a
    connection's run of packets with one writev): a host socket that fills midway
    takes a prefix, the rest is buffered in order, every chain is completed, and the
    guest hears of every forwarded byte."""
    lst, peer = connected(guest, host)
    conn = guest.device.conns[(1234, 5000)]
    # A small send buffer: the socket fills in the middle of a run of packets.
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    sent = bytearray()
    while not conn.txbuf:  # rounds of 12 packets of 3000 bytes in one kick, until it is full
        for i in range(12):
            chunk = bytes([(len(sent) // 3000 + i) & 0xFF]) * 3000
            raw = HDR.pack(3, 2, 5000, 1234, len(chunk), 1, OP_RW, 0, guest.buf_alloc, 0)
            guest.rig.add_request(TX, readable=[raw, chunk])
            sent += chunk
        used = guest.rig.kick(TX)
        assert len(used) == 12  # every chain completed at once, written or buffered
        guest.exchange()
        assert len(sent) - conn.fwd_cnt <= 65536  # within the credit we gave
    if guest.device._compiled:
        # One writev for the run: the socket took part of a packet (the Python path
        # writes packet by packet, each taken whole or not at all here).
        assert len(conn.txbuf) % 3000
    got = bytearray()
    while len(got) < len(sent):
        got += peer.recv(1 << 20)
        guest.pump()
    assert got == sent
    assert conn.fwd_cnt == len(sent) and not conn.txbuf
    lst.close()
    peer.close()


def test_tx_nap_drains_again_without_a_kick_and_returns_with_notifications_on(host: UnixHost) -> None:
    """The tx nap (``_vsock_fast.drain_tx``): after a pass that took stream data the
    device waits (its loop's fd not ready), drains again, and returns only with
    notifications on: VIRTIO 1.2 §2.7.10, with EVENT_IDX the driver MUST kick once
    ``avail->idx`` passes ``avail_event``, so ``avail_event`` must be the avail index
    the device stopped at, or the driver's next packet would not kick.  A first nap
    that finds one packet or none makes the next drain skip it (then 2, 4...), one
    that finds two or more ends that; a ready loop fd cuts a nap short; a pass without stream data
    (the REQUEST) or with half our credit or more (the guest may wait for it) does
    not nap."""
    dev = VsockDevice(3, host, tx_buffer_size=65536, tx_nap_us=1000)
    g = VsockGuest(dev)
    g.post_rx(64)
    fast = dev._fast
    wait = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        fast.wait_fd = wait  # the loop's fd (the fake loop has none): nothing ready
        _lst, peer = connected(g, host)
        assert (fast.naps, fast.naps_cut) == (0, 0)  # the REQUEST's pass took no data
        tx = g.rig.mocks[TX]
        sent = bytearray()

        def rw(n: int, size: int = 1000) -> None:
            for _ in range(n):
                chunk = bytes([len(sent) & 0xFF]) * size
                raw = HDR.pack(3, 2, 5000, 1234, len(chunk), 1, OP_RW, 0, g.buf_alloc, 0)
                g.rig.add_request(TX, readable=[raw, chunk])
                sent.extend(chunk)

        def state() -> tuple[int, int, int, int]:
            assert tx.avail_event() == tx.avail_idx()  # notifications on at return
            return (fast.naps, fast.naps_cut, fast.nap_skip, fast.nap_backoff)

        first_naps(lambda: g.rig.kick(TX), rw, state, wait)
        # The driver posts 2 more packets as the device tells it of the used ones,
        # before the nap: the nap's pass finds them, the next one nothing.
        signal_used = g.rig.interrupt.signal_used
        to_post: list[int] = []

        def post_on_tx_signal(index: int) -> None:
            signal_used(index)
            if index == TX and to_post:
                rw(to_post.pop())

        g.rig.interrupt.signal_used = post_on_tx_signal  # type: ignore[method-assign]
        to_post.append(2)
        tx.set_used_event(tx.used_idx())
        rw(4)
        assert len(g.rig.kick(TX)) == 6
        assert not to_post
        assert state() == (3, 1, 0, 0)  # the first nap found 2 packets: it paid
        # A first nap that finds one packet traded a kick for a timer: back off.
        to_post.append(1)
        tx.set_used_event(tx.used_idx())
        rw(4)
        assert len(g.rig.kick(TX)) == 5
        assert not to_post
        assert state() == (4, 1, 0, 1)  # (the pass with that packet skipped its nap)
        rw(1, 32768)  # half the credit: no nap
        assert len(g.rig.kick(TX)) == 1
        assert state() == (4, 1, 0, 1)
        got = bytearray()
        while len(got) < len(sent):
            got += peer.recv(1 << 20)
        assert got == sent
    finally:
        g.close()
        os.close(wait)


def test_tx_nap_setting_is_checked(host: UnixHost) -> None:
    with pytest.raises(ValueError, match="tx_nap_us must be from 0 to 1000, not 1001"):
        VsockDevice(3, host, tx_nap_us=1001)
    with pytest.raises(ValueError, match="tx_nap_us must be from 0 to 1000, not -1"):
        VsockDevice(3, host, tx_nap_us=-1)


def test_credit_violation_resets(guest: VsockGuest, host: UnixHost) -> None:
    lst, peer = connected(guest, host)
    conn = guest.device.conns[(1234, 5000)]
    while not conn.txbuf:
        guest.send(5000, 1234, OP_RW, b"v" * 32768)
    ops = set()
    for _ in range(4):
        guest.send(5000, 1234, OP_RW, b"v" * 32768)
        ops |= {p.op for p in guest.exchange()}
    assert OP_RST in ops  # §5.10.6.3: beyond the advertised buf_alloc
    assert (1234, 5000) not in guest.device.conns
    lst.close()
    peer.close()


def test_reset_keeps_connections_and_close_releases_them(guest: VsockGuest, host: UnixHost) -> None:
    """A transport reset (vhost-user: every ring stopped, a VM pause) keeps the host
    end and the stream; activation asks the guest for its credit (a driver that was
    reset answers RST, §5.10.6.5); close() closes the host end."""
    lst, peer = connected(guest, host)
    dev, rig = guest.device, guest.rig
    memory = dev.memory
    dev.reset()
    assert not rig.loop.readers  # nothing of the device is watched while it is paused
    assert not dev._fast.live  # the nogil paths wait for a pass with the GIL
    peer.sendall(b"while paused")
    assert memory is not None
    features = dev.device_features()
    dev.ack_features(features)
    dev.activate(memory, rig.queues, rig.interrupt, rig.loop)
    assert not dev._fast.live
    assert rig.loop.run_due() == 1  # what waited through the pause goes out at once
    got = guest.exchange()
    assert [p.op for p in got] == [OP_CREDIT_REQUEST, OP_RW]
    assert got[1].data == b"while paused"
    guest.send(5000, 1234, OP_RW, b"after")
    assert peer.recv(10) == b"after"
    dev.close()
    assert peer.recv(10) == b""
    assert not dev.conns
    lst.close()


def test_host_half_close_reaches_guest_as_shutdown_send(guest: VsockGuest, host: UnixHost) -> None:
    lst, peer = connected(guest, host)
    peer.shutdown(socket.SHUT_WR)
    [sd] = guest.exchange()
    assert (sd.op, sd.hdr.flags) == (OP_SHUTDOWN, 2)
    guest.send(5000, 1234, OP_RW, b"still")  # the other direction stays open
    assert peer.recv(10) == b"still"
    peer.close()
    lst.close()


def test_host_close_reaches_guest_as_shutdown_both(guest: VsockGuest, host: UnixHost) -> None:
    lst, peer = connected(guest, host)
    peer.close()
    [sd] = guest.exchange()
    assert (sd.op, sd.hdr.flags) == (OP_SHUTDOWN, 3)
    lst.close()


def test_guest_half_close_reaches_host_as_shut_wr(guest: VsockGuest, host: UnixHost) -> None:
    lst, peer = connected(guest, host)
    guest.send(5000, 1234, OP_SHUTDOWN, flags=2)
    assert peer.recv(10) == b""
    peer.sendall(b"back")
    assert [p.data for p in guest.exchange()] == [b"back"]
    peer.close()
    lst.close()


def test_host_reset_mid_stream_resets_guest(guest: VsockGuest, host: UnixHost) -> None:
    lst, peer = connected(guest, host)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    guest.exchange()
    guest.send(5000, 1234, OP_RW, b"x")
    ops = [p.op for p in guest.exchange()]
    assert OP_RST in ops or (1234, 5000) not in guest.device.conns
    lst.close()


# -- host-initiated (hybrid) ------------------------------------------------------------


def test_parse_connect_line() -> None:
    assert parse_connect_line(b"CONNECT 1234") == 1234
    assert parse_connect_line(b"connect  52 \r") == 52
    for bad in (b"CONNECT", b"CONNECT x", b"CONNECT 1 2", b"OPEN 1", b"CONNECT 4294967296", b"\xff"):
        with pytest.raises(ValueError):
            parse_connect_line(bad)


@given(st.binary(max_size=80))
def test_parse_connect_line_returns_u32_or_value_error(line: bytes) -> None:
    try:
        port = parse_connect_line(line)
    except ValueError:
        return
    assert 0 <= port <= 0xFFFFFFFF


def host_client(host: UnixHost, line: bytes) -> socket.socket:
    c = track(socket.socket(socket.AF_UNIX))
    c.settimeout(5)
    c.connect(host.path)
    c.sendall(line)
    return c


def test_host_connect_ok_reply_is_the_host_port(guest: VsockGuest, host: UnixHost) -> None:
    c = host_client(host, b"CONNECT 80\nearly")
    [req] = guest.exchange()
    assert (req.op, req.hdr.dst_port, req.hdr.src_port) == (OP_REQUEST, 80, LOCAL_PORT_FIRST)
    guest.send(80, LOCAL_PORT_FIRST, OP_RESPONSE)
    assert c.recv(100) == b"OK %d\n" % LOCAL_PORT_FIRST  # Firecracker's reply
    assert [p.data for p in guest.exchange()] == [b"early"]  # bytes after the line kept
    c.close()


def test_host_ports_never_reused_while_in_use(guest: VsockGuest, host: UnixHost) -> None:
    clients = [host_client(host, b"CONNECT 80\n") for _ in range(3)]
    ports = [p.hdr.src_port for p in guest.exchange()]
    assert len(set(ports)) == 3
    guest.device._next_port = ports[0]  # wrap around onto a port in use
    clients.append(host_client(host, b"CONNECT 80\n"))
    [p] = guest.exchange()
    assert p.hdr.src_port not in ports
    for c in clients:
        c.close()


@pytest.mark.parametrize(
    "line",
    [b"HELLO\n", b"CONNECT abc\n", b"X" * 100, b"CONNECT 99999999999\n"],
    ids=["word", "nan", "endless", "big"],
)
def test_bad_connect_lines_are_refused(guest: VsockGuest, host: UnixHost, line: bytes) -> None:
    c = host_client(host, line)
    assert guest.exchange() == []
    with contextlib.suppress(ConnectionResetError):
        assert c.recv(10) == b""
    c.close()


def test_connect_line_timeout(guest: VsockGuest, host: UnixHost) -> None:
    c = host_client(host, b"CONN")
    guest.pump()
    guest.rig.clock.advance(11)
    guest.rig.loop.run_due()
    with contextlib.suppress(ConnectionResetError):  # closed with our bytes unread
        assert c.recv(10) == b""
    c.close()


def test_guest_rst_to_request_closes_host_client(guest: VsockGuest, host: UnixHost) -> None:
    c = host_client(host, b"CONNECT 80\n")
    [req] = guest.exchange()
    guest.send(80, req.hdr.src_port, OP_RST)
    assert c.recv(10) == b""
    assert guest.device.conns == {}
    c.close()


# -- seqpacket ----------------------------------------------------------------------------


def test_seqpacket_keeps_message_boundaries(guest: VsockGuest, host: UnixHost) -> None:
    lst = listen(host, 77, socket.SOCK_SEQPACKET)
    guest.send(5000, 77, OP_REQUEST, type_=TYPE_SEQPACKET)
    [rsp] = guest.exchange()
    assert (rsp.op, rsp.hdr.type) == (OP_RESPONSE, TYPE_SEQPACKET)
    peer = track(lst.accept()[0])
    guest.send(5000, 77, OP_RW, b"one-", type_=TYPE_SEQPACKET)
    guest.send(5000, 77, OP_RW, b"message", type_=TYPE_SEQPACKET, flags=SEQ_EOM)
    guest.send(5000, 77, OP_RW, b"two", type_=TYPE_SEQPACKET, flags=SEQ_EOM)
    assert peer.recv(100) == b"one-message"
    assert peer.recv(100) == b"two"
    peer.send(b"r" * 5000)  # split over two 4 KiB rx buffers, EOM on the last
    peer.send(b"s")
    pkts = guest.exchange()
    assert [(len(p.data), p.hdr.flags & SEQ_EOM) for p in pkts] == [(4096, 0), (904, SEQ_EOM), (1, SEQ_EOM)]
    peer.close()
    lst.close()


# -- siblings ----------------------------------------------------------------------------------


def test_sibling_packets_cross_loops_only_within_a_group(tmp_path: Path) -> None:
    reg = VsockRegistry()
    hosts = [UnixHost(str(tmp_path / f"{i}.sock")) for i in range(3)]
    a = VsockGuest(VsockDevice(3, hosts[0], groups=["g"], registry=reg))
    b = VsockGuest(VsockDevice(4, hosts[1], groups=["g", "h"], registry=reg))
    c = VsockGuest(VsockDevice(5, hosts[2], groups=["x"], registry=reg))
    for g in (a, b, c):
        g.post_rx(8)
    a.send(10, 20, OP_REQUEST, dst_cid=4)
    a.send(10, 20, OP_REQUEST, dst_cid=5)
    assert b.rig.loop.run_soon() == 1 and c.rig.loop.run_soon() == 0
    [req] = b.received()
    assert (req.hdr.src_cid, req.hdr.dst_cid, req.op) == (3, 4, OP_REQUEST)
    for g in (a, b, c):
        g.close()
    for h in hosts:
        h.close()


def test_sibling_packets_wait_through_a_pause(tmp_path: Path) -> None:
    """A sibling's packets for a VM whose rings are stopped wait for the resume."""
    reg = VsockRegistry()
    hosts = [UnixHost(str(tmp_path / f"{i}.sock")) for i in range(2)]
    a = VsockGuest(VsockDevice(3, hosts[0], registry=reg))
    b = VsockGuest(VsockDevice(4, hosts[1], registry=reg))
    for g in (a, b):
        g.post_rx(8)
    dev, rig = b.device, b.rig
    memory = dev.memory
    assert memory is not None
    dev.reset()
    a.send(10, 20, OP_REQUEST, dst_cid=4)
    a.send(10, 20, OP_RW, b"kept", dst_cid=4)
    assert rig.loop.run_soon() == 0  # nothing runs on a paused VM's loop
    dev.ack_features(dev.device_features())
    dev.activate(memory, rig.queues, rig.interrupt, rig.loop)
    assert rig.loop.run_due() == 1
    got = b.received()
    assert [(p.op, p.data) for p in got] == [(OP_REQUEST, b""), (OP_RW, b"kept")]
    for g in (a, b):
        g.close()
    for h in hosts:
        h.close()


# -- lifecycle --------------------------------------------------------------------------------


def test_session_end_closes_connections_and_keeps_listener(host: UnixHost) -> None:
    g = VsockGuest(VsockDevice(3, host))
    g.post_rx(8)
    lst, peer = connected(g, host)
    g.close()
    assert peer.recv(10) == b""
    assert host.listeners()  # the next front-end's device uses it
    lst.close()
    peer.close()


def test_rx_not_touched_after_quiesce(guest: VsockGuest, host: UnixHost) -> None:
    lst = listen(host, 1234)
    guest.device.quiesce(RX)
    guest.send(5000, 1234, OP_REQUEST)
    assert guest.rig.used(RX) == []
    guest.device.process_queue(RX)  # the driver's next kick gives rx back
    assert [p.op for p in guest.received()] == [OP_RESPONSE]
    lst.close()


def test_uds_path_in_use_is_refused(tmp_path: Path) -> None:
    h = UnixHost(str(tmp_path / "x.sock"))
    with pytest.raises(VsockError, match="another program listens"):
        UnixHost(str(tmp_path / "x.sock"))
    h.close()
    (tmp_path / "file").write_text("")
    with pytest.raises(VsockError, match="not a socket"):
        UnixHost(str(tmp_path / "file"))


# -- credit property ------------------------------------------------------------------------


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("guest_write"), st.integers(1, 20000)),
            st.tuples(st.just("host_write"), st.integers(1, 20000)),
            st.tuples(st.just("host_read"), st.integers(1, 70000)),
            st.tuples(st.just("guest_ack"), st.integers(0, 1)),
        ),
        max_size=30,
    )
)
def test_random_interleavings_keep_credit_and_bytes(
    tmp_path_factory: pytest.TempPathFactory, steps: list
) -> None:  # type: ignore[type-arg]
    """Both sides write and read in any order; the device never sends the guest more than
    its credit, never takes more from the guest than it advertised, and every byte
    arrives once, in order.  The compiled and the Python paths send the guest the
    same packets."""
    traces = [_interleave(tmp_path_factory, steps, compiled) for compiled in (True, False)]
    assert traces[0] == traces[1]


def _interleave(
    tmp_path_factory: pytest.TempPathFactory, steps: list, compiled: bool
) -> list[tuple[int, int, int, int, bytes]]:  # type: ignore[type-arg]
    """One run of the interleaving test; the packets the guest got (op, flags,
    buf_alloc, fwd_cnt, payload)."""
    trace: list[tuple[int, int, int, int, bytes]] = []
    tmp = tmp_path_factory.mktemp("credit")
    host = UnixHost(str(tmp / "v.sock"))
    dev = VsockDevice(3, host, tx_buffer_size=32768)
    dev._compiled = compiled
    g = VsockGuest(dev)
    g.post_rx(128)
    guest_buf = g.buf_alloc = 16384
    try:
        lst, peer = connected(g, host)
        peer.setblocking(False)
        g_sent = bytearray()
        h_got = bytearray()
        h_sent = bytearray()
        g_got = bytearray()
        g_fwd = 0  # what the guest acknowledged to the device
        dev_fwd = 0  # last fwd_cnt the device told us
        counter = 0
        for kind, n in steps:
            if kind == "guest_write":
                # The guest obeys the credit it was told of.
                free = 32768 - (len(g_sent) - dev_fwd)
                m = min(n, free)
                if m > 0:
                    data = bytes((counter + i) & 0xFF for i in range(m))
                    counter += m
                    g.send(5000, 1234, OP_RW, data, buf_alloc=guest_buf, fwd_cnt=g_fwd)
                    g_sent += data
            elif kind == "host_write":
                try:
                    data = bytes((len(h_sent) + i) * 7 & 0xFF for i in range(n))
                    h_sent += data[: peer.send(data)]
                except BlockingIOError:
                    pass
            elif kind == "host_read":
                with contextlib.suppress(BlockingIOError):
                    h_got += peer.recv(n)
            else:
                g_fwd = len(g_got)
                g.send(5000, 1234, OP_CREDIT_UPDATE, buf_alloc=guest_buf, fwd_cnt=g_fwd)
            for p in g.exchange():
                assert p.op in (OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST), p
                trace.append((p.op, p.hdr.flags, p.hdr.buf_alloc, p.hdr.fwd_cnt, p.data))
                dev_fwd = p.hdr.fwd_cnt
                g_got += p.data
                # §5.10.6.3: never beyond the guest's buffer.
                assert len(g_got) - g_fwd <= guest_buf
        # Drain: the host reads everything, the guest acknowledges everything.
        for _ in range(200):
            with contextlib.suppress(BlockingIOError):
                h_got += peer.recv(1 << 20)
            g_fwd = len(g_got)
            g.send(5000, 1234, OP_CREDIT_UPDATE, buf_alloc=guest_buf, fwd_cnt=g_fwd)
            for p in g.exchange():
                g_got += p.data
                dev_fwd = p.hdr.fwd_cnt
            if len(h_got) == len(g_sent) and len(g_got) == len(h_sent):
                break
        assert h_got == g_sent
        assert g_got == h_sent
        assert len(g.device.conns) == 1
        lst.close()
        peer.close()
    finally:
        g.close()
        host.close()
    assert g.device.conns == {}  # the session's end leaks no connection
    return trace


# -- AF_VSOCK backend ----------------------------------------------------------------------


def _vsock_host(cid: int, ports: list[int]) -> VsockForwardHost:
    try:
        return VsockForwardHost(cid, ports)
    except VsockError as e:
        pytest.skip(f"no AF_VSOCK transport on this machine: {e}")


def _loopback_works() -> bool:
    """Whether this host's vsock reaches itself (the vsock_loopback transport)."""
    lst = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        lst.bind((socket.VMADDR_CID_ANY, socket.VMADDR_PORT_ANY))
        lst.listen(1)
        c = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        c.settimeout(1.0)
        try:
            c.connect((1, lst.getsockname()[1]))
            return True
        except OSError:
            return False
        finally:
            c.close()
    except OSError:
        return False
    finally:
        lst.close()


@pytest.mark.slow
def test_forward_connect_that_fails_gets_rst_without_blocking_the_loop() -> None:
    """A guest connect the host's vsock cannot complete is answered RST once the
    kernel gives up; the device's loop never waits for it."""
    host = _vsock_host(1, [])
    g = VsockGuest(VsockDevice(3, host))
    g.post_rx(8)
    try:
        if _loopback_works():
            pytest.skip("this host's vsock reaches itself: the connect would succeed")
        g.send(5000, 45678, OP_REQUEST)
        assert g.received() == []  # in progress: nothing yet, and send returned at once
        ops: list[int] = []
        while not ops:
            g.pump(wait=10.0)  # the socket turns writable when connect ends
            ops = [p.op for p in g.received()]
        assert ops == [OP_RST]
    finally:
        g.close()
        host.close()


def test_forward_backend_both_ways() -> None:
    if not _loopback_works():
        pytest.skip("no vsock loopback transport (vsock_loopback) on this machine")
    lst = track(socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM))
    lst.bind((socket.VMADDR_CID_ANY, socket.VMADDR_PORT_ANY))
    lst.listen(1)
    port = lst.getsockname()[1]
    host = _vsock_host(1, [port + 1])
    g = VsockGuest(VsockDevice(3, host))
    g.post_rx(8)
    try:
        g.send(5000, port, OP_REQUEST)
        ops: list[int] = []
        while not ops:
            g.pump(wait=5.0)
            ops = [p.op for p in g.received()]
        assert ops == [OP_RESPONSE]
        peer = track(lst.accept()[0])
        g.send(5000, port, OP_RW, b"via vsock")
        assert peer.recv(20) == b"via vsock"
        peer.close()
    finally:
        g.close()
        host.close()
        lst.close()


def test_credit_update_when_a_full_host_socket_drains(guest: VsockGuest, host: UnixHost) -> None:
    """A guest waiting for room for one whole 64 KiB packet hears of it as soon as the
    host took the buffered bytes, even when more than half was forwarded at once."""
    lst, peer = connected(guest, host)
    conn = guest.device.conns[(1234, 5000)]
    peer.setblocking(False)
    while not conn.txbuf:  # until the host socket is full
        guest.send(5000, 1234, OP_RW, b"f" * 65536, fwd_cnt=0)
        guest.exchange()
    while conn.txbuf:
        with contextlib.suppress(BlockingIOError):
            while peer.recv(1 << 20):
                pass
        guest.pump(wait=5.0)
    updates = [p for p in guest.received() if p.op == OP_CREDIT_UPDATE]
    assert updates and updates[-1].hdr.fwd_cnt == conn.fwd_cnt == conn.rx_cnt
    lst.close()
    peer.close()


def test_host_data_spread_over_rx_buffers_within_credit(guest: VsockGuest, host: UnixHost) -> None:
    """Host data fills consecutive rx buffers (one packet each, header first) up to
    the guest's credit and no further (§5.10.6.3: the device MUST NOT send more than
    buf_alloc - (tx_cnt - fwd_cnt)), then asks for credit; more credit lets the rest
    through, every byte in order."""
    lst, peer = connected(guest, host)
    guest.send(5000, 1234, OP_CREDIT_UPDATE, buf_alloc=10240, fwd_cnt=0)
    data = bytes(range(256)) * 56  # 14336 bytes: three and a half rx buffers
    peer.sendall(data)
    pkts = guest.exchange()
    assert [(p.op, len(p.data)) for p in pkts] == [
        (OP_RW, 4096), (OP_RW, 4096), (OP_RW, 2048), (OP_CREDIT_REQUEST, 0),
    ]  # fmt: skip
    assert all((p.hdr.src_port, p.hdr.dst_port, p.hdr.buf_alloc) == (1234, 5000, 65536) for p in pkts)
    guest.send(5000, 1234, OP_CREDIT_UPDATE, buf_alloc=10240, fwd_cnt=10240)
    rest = guest.exchange()
    assert [(p.op, len(p.data)) for p in rest] == [(OP_RW, 4096)]
    assert b"".join(p.data for p in pkts + rest) == data
    lst.close()
    peer.close()


def test_kick_pump_serves_rx_and_tx_kicks_as_process_queue(host: UnixHost) -> None:
    """The vhost-user loop runs ``kick_pump(i).pump_c`` on a kick of rx or tx instead
    of calling ``process_queue``: it serves the ring the same way (the guest's
    REQUEST answered with RESPONSE) and hands over (1) when the compiled path is
    off; the event queue has none (nothing to serve)."""
    dev = VsockDevice(3, host, tx_buffer_size=65536)
    g = VsockGuest(dev)
    try:
        assert dev.kick_pump(2) is None
        tx, rx = dev.kick_pump(TX), dev.kick_pump(RX)
        assert tx is not None and rx is not None
        lst = listen(host, 1234)
        hdr = HDR.pack(3, 2, 5000, 1234, 0, 1, OP_REQUEST, 0, 65536, 0)
        g.rig.add_request(TX, readable=[hdr])
        assert tx.pump() is False  # served, no Python path needed
        assert g.received() == []  # no rx buffer yet: the RESPONSE waits
        for _ in range(4):
            gpa = g.rig.mocks[RX].alloc(g.rx_buf)
            g._rx[g.rig.add_chain(RX, [_desc(gpa, g.rx_buf, write=True)])] = gpa
        assert rx.pump() is False
        assert [p.op for p in g.received()] == [OP_RESPONSE]
        track(lst.accept()[0])
        dev._compiled = False
        assert tx.pump() is True and rx.pump() is True
    finally:
        g.close()


def test_compiled_path_connects_and_drops_without_the_python_path(host: UnixHost) -> None:
    """With a Unix host, a guest's stream REQUEST (§5.10.6.5) is connected by the
    compiled path (no ``handle_chain``): RESPONSE, the host end accepted and watched,
    the guest's data through; its RST closes the host end and forgets the
    connection.  The guest's RESPONSE to a host client's connection is served
    there too: the client's ``OK <port>`` line, the socket watched.  A REQUEST
    whose connect fails (nothing listens) goes to the Python path, which answers
    RST; and a prefix that is not a filesystem path is refused."""
    dev = VsockDevice(3, host, tx_buffer_size=65536)
    g = VsockGuest(dev)
    g.post_rx(16)
    python_calls: list[DescriptorChain] = []
    handle = dev.handle_chain

    def counted(index: int, chain: DescriptorChain) -> object:
        python_calls.append(chain)
        return handle(index, chain)

    dev.handle_chain = counted  # type: ignore[method-assign]
    try:
        lst = listen(host, 1234)
        g.send(5000, 1234, OP_REQUEST, buf_alloc=65536)
        assert [p.op for p in g.exchange()] == [OP_RESPONSE]
        peer = track(lst.accept()[0])
        conn = dev.conns[(1234, 5000)]
        assert conn.est and conn.armed and conn.peer_buf_alloc == 65536
        assert dev._by_fd[conn.fd] is conn and conn.fd in g.rig.loop.pumps
        g.send(5000, 1234, OP_RW, b"hello")
        g.exchange()
        assert peer.recv(16) == b"hello"
        peer.sendall(b"back")
        g.rig.loop.fire_pump(conn.fd)
        assert [p.data for p in g.received()] == [b"back"]
        assert python_calls == []
        g.send(5000, 1234, OP_RST)
        assert g.exchange() == []
        assert (1234, 5000) not in dev.conns and conn.fd not in dev._by_fd and conn.dead
        assert peer.recv(16) == b""  # the host end was closed
        c = host_client(host, b"CONNECT 80\n")  # host-initiated: the guest's RESPONSE
        [req] = g.exchange()
        assert req.op == OP_REQUEST
        g.send(80, req.hdr.src_port, OP_RESPONSE)
        g.exchange()
        assert c.recv(100) == b"OK %d\n" % req.hdr.src_port
        host_conn = dev.conns[(req.hdr.src_port, 80)]
        assert host_conn.est and host_conn.armed and not host_conn.ok_reply
        assert python_calls == []
        g.send(80, req.hdr.src_port, OP_RST)
        g.exchange()
        assert c.recv(16) == b"" and not dev.conns
        g.send(5001, 4321, OP_REQUEST)  # nothing listens at port 4321
        assert [p.op for p in g.exchange()] == [OP_RST]
        assert len(python_calls) == 1 and not dev.conns
        with pytest.raises(ValueError, match="filesystem path"):
            dev._fast.set_connect_prefix(b"\0abstract_")
    finally:
        dev.handle_chain = handle  # type: ignore[method-assign]
        g.close()


def test_host_input_pump_serves_data_and_keeps_the_socket_watched(guest: VsockGuest, host: UnixHost) -> None:
    """A readable host socket run as a pump-serving loop (the vhost-user one) runs
    it: the compiled path serves the data in its pump and the socket stays watched
    by the same pump; with no credit for the rest (§5.10.6.3) it is no longer
    watched, and the guest's next credit brings the rest, every byte in order."""
    lst, peer = connected(guest, host)
    conn = guest.device.conns[(1234, 5000)]
    loop = guest.rig.loop
    compiled = guest.device._compiled
    pump = loop.pumps[conn.fd]
    peer.sendall(b"a" * 5000)
    assert loop.fire_pump(conn.fd) is not compiled  # the Python path needs the callback
    assert b"".join(p.data for p in guest.received()) == b"a" * 5000
    if compiled:
        assert conn.armed and loop.pumps[conn.fd] is pump
    guest.send(5000, 1234, OP_CREDIT_UPDATE, buf_alloc=4096, fwd_cnt=5000)  # room for 4096 more
    guest.exchange()
    data = bytes(range(250)) * 40
    peer.sendall(data)
    loop.fire_pump(conn.fd)
    first = [p for p in guest.received() if p.op == OP_RW]
    assert b"".join(p.data for p in first) == data[:4096]
    assert conn.fd not in loop.readers and not conn.armed
    guest.send(5000, 1234, OP_CREDIT_UPDATE, buf_alloc=1 << 20, fwd_cnt=5000 + 4096)  # took it all
    rest = [p for p in guest.exchange() if p.op == OP_RW]
    assert b"".join(p.data for p in rest) == data[4096:]
    lst.close()
    peer.close()


def test_compiled_path_signals_through_the_transports_signaller(host: UnixHost) -> None:
    """An interrupt that hands out a queue's signaller (vhost-user's compiled
    ``KickRing.signal_used``) is signalled through it, not through ``signal_used``;
    a new interrupt (the next activation) gets its own signallers."""

    class Signalling(FakeInterrupt):
        def signaller(self, index: int) -> Callable[[], None]:
            return lambda: self.used.append(100 + index)

    dev = VsockDevice(3, host, tx_buffer_size=65536)
    g = VsockGuest(dev)
    try:
        g.post_rx(8)
        lst = listen(host, 1234)
        for src, irq in ((5000, Signalling()), (5001, Signalling())):
            dev.interrupt = irq  # what a re-activation hands the device
            rx = g.rig.mocks[RX]
            rx.set_used_event(rx.used_idx())  # the driver wants the next used buffer signalled
            g.send(src, 1234, OP_REQUEST)
            assert [p.op for p in g.exchange()] == [OP_RESPONSE]
            assert irq.used and set(irq.used) <= {100 + RX, 100 + TX}, irq.used
            track(lst.accept()[0])
    finally:
        g.close()


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_host_data_over_rx_buffers_of_mixed_shapes_keeps_order(host: UnixHost, compiled: bool) -> None:
    """A two-descriptor rx buffer among one-descriptor ones (both are valid, §2.7.4)
    gets its packet in ring order: the bytes reach the guest in the host's order."""
    dev = VsockDevice(3, host, tx_buffer_size=65536)
    dev._compiled = compiled
    g = VsockGuest(dev)
    try:
        g.post_rx(1)
        lst, peer = connected(g, host)
        g.post_rx(2)
        gpa = g.rig.mocks[RX].alloc(g.rx_buf)
        head = g.rig.add_chain(
            RX, [_desc(gpa, HDR_SIZE, write=True), _desc(gpa + HDR_SIZE, g.rx_buf - HDR_SIZE, write=True)]
        )
        g._rx[head] = gpa
        g.post_rx(2)
        data = bytes(range(251)) * 80  # 20080 bytes: four buffers and most of a fifth
        peer.sendall(data)
        pkts = g.exchange()
        assert [p.op for p in pkts] == [OP_RW] * 5
        assert b"".join(p.data for p in pkts) == data
        lst.close()
        peer.close()
    finally:
        g.close()


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_resubmitted_rx_head_left_unused_is_served_again_not_an_avail_entry(
    host: UnixHost, compiled: bool
) -> None:
    """After a reconnect the rx heads a previous back-end left in flight are served
    first (vhost-user "Inflight I/O tracking"); one popped and left unused goes back
    to the front of that list, so every head is used once (§2.7.13), none twice."""
    dev = VsockDevice(3, host, tx_buffer_size=65536)
    dev._compiled = compiled
    g = VsockGuest(dev)
    a, b = socket.socketpair()
    try:
        g.post_rx(3)  # heads 0, 1, 2 at avail positions 0, 1, 2
        q = dev.queues[RX]
        q.set_next_avail(2)  # 0 and 1 in flight from the previous back-end
        q.resubmit([0, 1])
        gone = _vsock_fast.Conn((1, 2), a, False)
        gone.dead, gone.in_ready = True, True
        dev._ready.append(gone)  # pops head 0, produces nothing: 0 goes back
        dev.process_queue(RX)
        assert g.rig.used(RX) == []
        rst = HDR.pack(2, 3, 1, 2, 0, 1, OP_RST, 0, 0, 0)
        dev._loose.extend([(rst, b"")] * 3)
        dev.process_queue(RX)
        assert [head for head, _n in g.rig.used(RX)] == [0, 1, 2]
    finally:
        a.close()
        b.close()
        g.close()


@pytest.mark.timeout(60)  # the bug this guards against was an endless loop
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_rx_buffer_with_room_for_a_header_only_carries_credit(host: UnixHost, compiled: bool) -> None:
    """An rx buffer of exactly a header (§5.10.6: valid, if useless for data) while
    host data waits gets a CREDIT_UPDATE (§5.10.6.3: the header carries our credit)
    and the data the next buffer: the device neither loops on it nor drops bytes."""
    dev = VsockDevice(3, host, tx_buffer_size=65536)
    dev._compiled = compiled
    g = VsockGuest(dev)
    try:
        g.post_rx(1)
        lst = listen(host, 1234)
        g.send(5000, 1234, OP_REQUEST)
        assert [(head, n) for head, n in g.rig.used(RX)] == [(0, HDR_SIZE)]  # RESPONSE, not reposted
        peer = track(lst.accept()[0])
        g._rx.clear()
        gpa = g.rig.mocks[RX].alloc(HDR_SIZE)
        g._rx[g.rig.add_chain(RX, [_desc(gpa, HDR_SIZE, write=True)])] = gpa
        g.post_rx(1)
        peer.sendall(b"x" * 100)
        pkts = g.exchange()
        assert [(p.op, p.data) for p in pkts] == [(OP_CREDIT_UPDATE, b""), (OP_RW, b"x" * 100)]
        lst.close()
        peer.close()
    finally:
        g.close()


@pytest.mark.parametrize("type_", [0, 3, 0xFFFF])
def test_unknown_socket_type_gets_rst(guest: VsockGuest, host: UnixHost, type_: int) -> None:
    """§5.10.6: a packet of a type the device does not support is answered with RST."""
    lst = listen(host, 1234)
    guest.send(5000, 1234, OP_REQUEST, type_=type_)
    [rst] = guest.exchange()
    assert (rst.op, rst.hdr.type) == (OP_RST, type_)
    assert guest.device.conns == {}
    lst.close()


def test_seqpacket_refused_unless_negotiated(host: UnixHost) -> None:
    dev = VsockDevice(3, host)
    g = VsockGuest(dev)
    dev.ack_features(dev.acked_features & ~VIRTIO_VSOCK_F_SEQPACKET)
    g.post_rx(4)
    lst = listen(host, 77, socket.SOCK_SEQPACKET)
    try:
        g.send(5000, 77, OP_REQUEST, type_=TYPE_SEQPACKET)
        assert [p.op for p in g.exchange()] == [OP_RST]
    finally:
        lst.close()
        g.close()
