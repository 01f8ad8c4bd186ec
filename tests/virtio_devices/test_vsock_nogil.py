"""The nogil paths of virtio-vsock's compiled kicks and host sockets
(``KickPump.pump_nogil``, ``InputPump.pump_nogil``): the steady state of a
host-to-guest stream served without the GIL, handed over to the pass with the GIL
for everything else, with the same packets, bytes and ring entries as the path with
the GIL.  The guest plays the vhost-user loop's nogil phase (``VsockGuest(nogil=
True)``: the nogil path first, the GIL released, ``pump_c`` when it asks)."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vsock_guest import RX, TX, Packet, VsockGuest, _desc, first_naps

from virtio_devices.hosts.vsock import UnixHost
from virtio_devices.vsock import (
    LOCAL_PORT_FIRST,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    VsockDevice,
)

PORT = 80  # the guest's port the host connects to


@pytest.fixture
def host(tmp_path: Path) -> Iterator[UnixHost]:
    h = UnixHost(str(tmp_path / "v.sock"))
    yield h
    h.close()


def _connect(host: UnixHost, nogil: bool, *, rx: int = 32) -> tuple[VsockGuest, socket.socket]:
    """A guest (nogil mode or not) with ``rx`` buffers posted and one host-initiated
    stream open, the host end non-blocking."""
    dev = VsockDevice(3, host, tx_buffer_size=65536)
    g = VsockGuest(dev, queue_size=64, nogil=nogil)
    g.buf_alloc = 256 * 1024
    g.post_rx(rx)
    c = socket.socket(socket.AF_UNIX)
    c.connect(host.path)
    c.sendall(b"CONNECT %d\n" % PORT)
    [req] = g.exchange()
    assert req.op == OP_REQUEST
    g.send(PORT, LOCAL_PORT_FIRST, OP_RESPONSE)
    assert c.recv(100) == b"OK %d\n" % LOCAL_PORT_FIRST
    c.setblocking(False)
    return g, c


def _data(n: int) -> bytes:
    return bytes((i * 7 + i // 251) & 0xFF for i in range(n))


def _stream(g: VsockGuest, c: socket.socket, total: int, credit_every: int = 64 * 1024) -> list[Packet]:
    """Host -> guest: ``total`` bytes, written in pieces of up to 48 KiB as the host
    socket takes them, the guest reposting its rx buffers and giving credit every
    ``credit_every`` bytes read (as the bench's guest does); every rx packet."""
    data = _data(total)
    sent = got = acked = 0
    packets: list[Packet] = []
    while got < total:
        if sent < total:
            with contextlib.suppress(BlockingIOError):
                sent += c.send(data[sent : sent + 48 * 1024])
        g.pump()
        for p in g.received():
            packets.append(p)
            got += len(p.data)
        if got - acked >= credit_every or (got == sent == total and got > acked):
            g.fwd_cnt[(PORT, LOCAL_PORT_FIRST)] = got
            g.send(PORT, LOCAL_PORT_FIRST, OP_CREDIT_UPDATE)
            acked = got
    return packets


def _summary(packets: list[Packet]) -> list[tuple[int, int]]:
    return [(p.op, len(p.data)) for p in packets]


def test_host_to_guest_stream_served_without_the_gil_as_with_it(host: UnixHost) -> None:
    """The same host traffic through the nogil paths and through the path with the
    GIL: the same packets (ops, lengths, order) and bytes; the nogil paths served
    most kicks and chains."""
    runs = {}
    for nogil in (False, True):
        g, c = _connect(host, nogil)
        try:
            packets = _stream(g, c, 1 << 20)
            assert b"".join(p.data for p in packets) == _data(1 << 20)
            runs[nogil] = (_summary(packets), g.device._fast.nogil_chains, g.nogil)
        finally:
            c.close()
            g.close()
    assert runs[True][0] == runs[False][0]
    assert runs[False][1] == 0
    kicks = runs[True][2]
    assert kicks is not None and kicks.served > kicks.handed, kicks
    assert runs[True][1] > len(runs[True][0]) // 2


@pytest.mark.parametrize(
    "op", [OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_REQUEST, "unknown connection"]
)
def test_every_other_tx_packet_is_handed_over_untouched(host: UnixHost, op: int | str) -> None:
    """A tx chain the nogil path does not serve (any op but CREDIT_UPDATE and RW, or
    a packet of a connection it does not know: this test's RW is one, its
    connection not yet in the table the nogil path looks up) is left in the ring: its kick is
    handed over with nothing used, and the pass with the GIL answers it as the
    path with the GIL alone does."""
    answers = {}
    for nogil in (False, True):
        g, c = _connect(host, nogil)
        try:
            kicks = g.nogil
            tx = g.rig.mocks[TX]
            before = tx.used_idx()
            handed = kicks.handed if kicks is not None else 0
            if op == "unknown connection":
                g.rig.add_request(TX, readable=[_hdr(g, PORT + 1, LOCAL_PORT_FIRST, OP_CREDIT_UPDATE)])
            else:
                data = b"x" * 10 if op == OP_RW else b""
                g.rig.add_request(
                    TX,
                    readable=[_hdr(g, PORT, LOCAL_PORT_FIRST, op, len(data), flags=3)]
                    + ([data] if data else []),
                )
            if kicks is not None:
                assert kicks.pumps[TX].serve_nogil()  # handed over...
                assert tx.used_idx() == before  # ... with the chain left in the ring
            g.rig.kick(TX)  # (routed through the nogil path first in nogil mode)
            if kicks is not None:
                # The routed kick ran the nogil path again (handed over) and pump_c.
                assert kicks.handed == handed + 1
            assert tx.used_idx() != before
            g.pump()
            answers[nogil] = _summary(g.received())
            if op == OP_RW:
                assert c.recv(100) == b"x" * 10
        finally:
            c.close()
            g.close()
    assert answers[True] == answers[False]


def _hdr(g: VsockGuest, src: int, dst: int, op: int, length: int = 0, *, flags: int = 0) -> bytes:
    from virtio_devices.vsock import HDR, HOST_CID, TYPE_STREAM  # noqa: PLC0415

    return HDR.pack(g.cid, HOST_CID, src, dst, length, TYPE_STREAM, op, flags, g.buf_alloc, 0)


def test_a_missed_invalidation_is_caught_by_the_order_check(host: UnixHost) -> None:
    """A planted fault: a packet added to the device's loose packets without
    ``State.touch`` (the invalidation every Python change of the ready queue or the
    loose packets makes) lets the nogil rx path serve the connection's data ahead
    of it, where the path with the GIL sends the loose packet first; the check the
    tests make (the packets' order against the path with the GIL) sees it.  With
    ``touch`` the order is the GIL path's."""
    from virtio_devices.vsock import HDR, HOST_CID, TYPE_STREAM  # noqa: PLC0415

    firsts = {}
    for variant in ("gil", "touched", "planted"):
        g, c = _connect(host, variant != "gil", rx=8)
        try:
            dev = g.device
            # More data than the 8 rx buffers take: the connection waits for buffers,
            # alone in the ready queue.
            c.send(_data(100000))
            g.pump()
            assert len(g.rig.used(RX)) == 8  # taken, not reposted
            assert list(dev._ready) == list(dev.conns.values()) and not dev._loose
            loose = HDR.pack(HOST_CID, g.cid, 9, 9, 0, TYPE_STREAM, OP_RST, 0, 0, 0)
            dev._loose.append((loose, b""))
            if variant == "touched":
                dev._fast.touch()
            for _ in range(4):  # posted, then kicked (post_rx would read the answers itself)
                gpa = g.rig.mocks[RX].alloc(g.rx_buf)
                g._rx[g.rig.add_chain(RX, [_desc(gpa, g.rx_buf, write=True)])] = gpa
            dev.process_queue(RX)
            firsts[variant] = next((p.op, p.hdr.src_port) for p in g.received())
        finally:
            c.close()
            g.close()
    assert firsts["touched"] == firsts["gil"] == (OP_RST, 9)
    assert firsts["planted"] == (OP_RW, LOCAL_PORT_FIRST)


# -- guest -> host RW packets without the GIL -----------------------------------------------
BIG = 40 * 1024  # at least half the credit the device gives (64 KiB): never a nap's packet


def _known(g: VsockGuest) -> None:
    """A CREDIT_UPDATE first: the nogil paths look a connection up in the table the
    last pass with the GIL took, which a lookup that missed has it take afresh."""
    g.send(PORT, LOCAL_PORT_FIRST, OP_CREDIT_UPDATE)
    g.pump()
    g.received()


def _rw(g: VsockGuest, data: bytes) -> None:
    """One guest -> host RW packet on the open stream: header and payload in two
    descriptors, as Linux's driver posts them; not kicked."""
    g.rig.add_request(TX, readable=[_hdr(g, PORT, LOCAL_PORT_FIRST, OP_RW, len(data)), data])


def _drain(g: VsockGuest, c: socket.socket, want: int) -> bytes:
    """Read the host end until ``want`` bytes came, the loop pumped between reads (a
    full socket's buffered rest goes out as it turns writable)."""
    got = b""
    for _ in range(1000):
        with contextlib.suppress(BlockingIOError):
            got += c.recv(1 << 20)
        if len(got) >= want:
            break
        g.pump()
    return got


def test_guest_to_host_rw_served_without_the_gil_as_with_it(host: UnixHost) -> None:
    """A big RW packet (header and payload in two buffers) on an open stream, served
    by the nogil tx path: the chain used, the payload on the host socket, the
    CREDIT_UPDATE owed (§5.10.6.3: our free space fell below half) on rx, the same
    packets and bytes as the path with the GIL; the nogil path served the kick
    (nothing handed over)."""
    answers = {}
    for nogil in (False, True):
        g, c = _connect(host, nogil)
        try:
            kicks = g.nogil
            _known(g)
            data = _data(BIG)
            _rw(g, data)
            before = g.rig.mocks[TX].used_idx()
            if kicks is not None:
                assert not kicks.pumps[TX].serve_nogil()  # served
            else:
                g.rig.kick(TX)
            assert g.rig.mocks[TX].used_idx() == before + 1
            assert _drain(g, c, BIG) == data
            answers[nogil] = [(p.op, p.hdr.fwd_cnt, len(p.data)) for p in g.received()]
            assert not g.device._fast.part
        finally:
            c.close()
            g.close()
    assert answers[True] == answers[False] == [(OP_CREDIT_UPDATE, BIG, 0)]


def _device_sock(g: VsockGuest) -> socket.socket:
    [conn] = g.device.conns.values()
    return conn.sock  # type: ignore[no-any-return]


def test_guest_to_host_rw_partly_taken_is_finished_with_the_gil(host: UnixHost) -> None:
    """A planted partial write: the host socket (its send buffer made small, the host
    not reading) takes only part of a big RW packet's payload without the GIL.  The
    chain is taken and the part recorded, the kick handed over; the pass with the
    GIL that follows keeps the rest in the connection's buffer and uses the chain.
    Every byte reaches the host once, in order (the bytes after the packet too),
    and the guest's credit counts them all (§5.10.6.3)."""
    g, c = _connect(host, True)
    try:
        kicks = g.nogil
        assert kicks is not None
        _known(g)
        _device_sock(g).setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        data = _data(BIG)
        _rw(g, data)
        tx = g.rig.mocks[TX]
        before = tx.used_idx()
        assert kicks.pumps[TX].serve_nogil()  # handed over...
        fast = g.device._fast
        assert fast.part  # ... with the packet written in part
        assert tx.used_idx() == before
        assert not kicks.pumps[TX].pump()  # pump_c finished it
        assert not fast.part and tx.used_idx() == before + 1
        [conn] = g.device.conns.values()
        assert 0 < len(conn.txbuf) < BIG
        tail = _data(100)[::-1]
        g.send(PORT, LOCAL_PORT_FIRST, OP_RW, tail)  # queued behind the buffered rest
        assert _drain(g, c, BIG + len(tail)) == data + tail
        g.pump()
        credit = [p.hdr.fwd_cnt for p in g.received() if p.op == OP_CREDIT_UPDATE]
        assert credit and credit[-1] == BIG + len(tail)
    finally:
        c.close()
        g.close()


def test_guest_to_host_rw_to_a_full_socket_is_handed_over_untouched(host: UnixHost) -> None:
    """The host socket full (EAGAIN): the nogil path writes nothing and leaves the chain
    in the ring; the pass with the GIL buffers the packet and every byte reaches the
    host once the socket drains."""
    g, c = _connect(host, True)
    try:
        kicks = g.nogil
        assert kicks is not None
        _known(g)
        sock = _device_sock(g)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        filler = b""
        with contextlib.suppress(BlockingIOError):
            while True:
                filler += b"f" * sock.send(b"f" * 1024)
        data = _data(BIG)
        _rw(g, data)
        tx = g.rig.mocks[TX]
        before = tx.used_idx()
        assert kicks.pumps[TX].serve_nogil()
        assert tx.used_idx() == before and not g.device._fast.part
        assert not kicks.pumps[TX].pump()
        assert tx.used_idx() == before + 1
        assert _drain(g, c, len(filler) + BIG) == filler + data
    finally:
        c.close()
        g.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    packets=st.lists(
        st.tuples(st.integers(1, 64 * 1024), st.integers(0, 2), st.booleans()), min_size=1, max_size=24
    ),
    sndbuf=st.sampled_from([0, 4096, 16384]),
    nogil=st.booleans(),
)
def test_guest_to_host_stream_any_shape_reaches_the_host_once(
    host: UnixHost, packets: list[tuple[int, int, bool]], sndbuf: int, nogil: bool
) -> None:
    """Property: a guest -> host stream of RW packets of any size (the payload in one
    buffer with the header, or split over up to three), within our credit
    (§5.10.6.3: the guest waits for our CREDIT_UPDATEs), into a host socket whose
    send buffer may be small (``sndbuf``: partial writes and EAGAIN, with the nogil
    path's part finished by the pass with the GIL), the host reading now and then:
    every byte reaches the host once, in order; every chain is used; our
    CREDIT_UPDATEs end at the stream's length.  With and without the nogil paths
    (the tx nap is off in this rig: every RW packet may take the nogil path)."""
    g, c = _connect(host, nogil)
    try:
        if nogil:
            _known(g)
        if sndbuf:
            _device_sock(g).setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        tx = g.rig.mocks[TX]
        used0 = tx.used_idx()
        expect = bytearray()
        got = bytearray()
        fwd = 0  # the device's forwarded count, as its CREDIT_UPDATEs say
        asked = 0  # our CREDIT_REQUESTs (tx chains too)

        def credit_seen() -> None:
            nonlocal fwd
            for p in g.received():
                if p.op == OP_CREDIT_UPDATE:
                    fwd = p.hdr.fwd_cnt
                else:
                    assert p.op != OP_RST, p

        def host_reads() -> None:
            with contextlib.suppress(BlockingIOError):
                got.extend(c.recv(1 << 20))

        for i, (size, split, read) in enumerate(packets):
            data = bytes((i * 31 + k) & 0xFF for k in range(size))
            for _ in range(1000):
                credit_seen()
                if len(expect) - fwd + size <= 64 * 1024:
                    break
                host_reads()
                g.pump()
                # Still short: ask, as a guest that wants to send does (§5.10.6.3).
                g.send(PORT, LOCAL_PORT_FIRST, OP_CREDIT_REQUEST)
                asked += 1
            else:
                raise AssertionError(f"no credit for packet {i}: sent {len(expect)}, forwarded {fwd}")
            hdr = _hdr(g, PORT, LOCAL_PORT_FIRST, OP_RW, size)
            if split == 0:
                bufs = [hdr + data]
            elif split == 1:
                bufs = [hdr, data]
            else:
                bufs = [hdr + data[: size // 3], data[size // 3 : size // 2], data[size // 2 :]]
            g.rig.add_request(TX, readable=bufs)
            g.rig.kick(TX)
            expect += data
            if read:
                host_reads()
            g.pump()
        for _ in range(1000):
            host_reads()
            g.pump()
            credit_seen()
            if len(got) >= len(expect):
                break
        assert bytes(got) == bytes(expect)
        # §5.10.6.3: a CREDIT_REQUEST is answered with our credit, all forwarded now.
        g.send(PORT, LOCAL_PORT_FIRST, OP_CREDIT_REQUEST)
        g.pump()
        credit_seen()
        assert fwd == len(expect)
        assert tx.used_idx() - used0 == len(packets) + asked + 1
        assert not g.device._fast.part
    finally:
        c.close()
        g.close()


def test_guest_to_host_stream_naps_without_the_gil(host: UnixHost) -> None:
    """The tx nap in the nogil drain, as in the drain with the GIL (``drain_tx``): a
    pass that took stream data naps (the loop's fd not ready), drains again and
    returns with notifications on (§2.7.10: ``avail_event`` is where the device
    stopped, or the driver's next packet would not kick); a first nap that found
    nothing makes the next drain skip it; a ready loop fd cuts a nap short; a pass
    of half our credit or more does not nap.  Every kick served without the GIL,
    every byte on the host socket once, in order."""
    g, c = _connect(host, True)
    wait = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        kicks = g.nogil
        assert kicks is not None
        _known(g)
        fast = g.device._fast
        fast.nap_ns = 1_000_000
        fast.wait_fd = wait  # the loop's fd (the fake loop has none): nothing ready
        tx = g.rig.mocks[TX]
        sent = bytearray()

        def rw(n: int, size: int = 1000) -> None:
            for _ in range(n):
                chunk = bytes([len(sent) & 0xFF]) * size
                _rw(g, chunk)
                sent.extend(chunk)

        def state() -> tuple[int, int, int, int]:
            assert tx.avail_event() == tx.avail_idx()  # notifications on at return
            return (fast.naps, fast.naps_cut, fast.nap_skip, fast.nap_backoff)

        handed = kicks.handed
        first_naps(lambda: g.rig.kick(TX), rw, state, wait)
        rw(1, 32768)  # half the credit: no nap
        assert len(g.rig.kick(TX)) == 1
        assert state() == (1, 1, 0, 1)
        assert kicks.handed == handed
        assert _drain(g, c, len(sent)) == sent
    finally:
        c.close()
        g.close()
        os.close(wait)
