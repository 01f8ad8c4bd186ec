"""A guest's virtio-vsock driver played by our vhost-user front-end (tests and benches).

:class:`VsockDriver` connects to a ``vhost-device-vsock`` socket (ours or the Rust
one), sets up rx/tx/event rings in memfd memory, keeps every rx descriptor posted
with one buffer each (as Linux does), and sends one-descriptor tx packets from a
fixed pool of buffers.  No sleeps: every wait is on a call eventfd with a timeout.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from vhost_backends.frontend import Frontend
from vhost_backends.protocol.codes import VHOST_USER_F_PROTOCOL_FEATURES
from virtio_queue.mock import VRING_USED_F_NO_NOTIFY
from virtio_queue.testing import VIRTQ_DESC_F_WRITE, RawDesc

HDR = struct.Struct("<QQIIIHHIII")
HDR_SIZE = HDR.size
HOST_CID = 2
TYPE_STREAM, TYPE_SEQPACKET = 1, 2
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = 1, 2, 3, 4, 5, 6, 7
RX, TX, EVENT = 0, 1, 2
VIRTIO_VSOCK_F_SEQPACKET = 1 << 1
VIRTIO_RING_F_EVENT_IDX = 1 << 29


@dataclass
class Packet:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int
    data: bytes


class VsockDriver:
    """The guest side of one VM (see the module docstring)."""

    def __init__(
        self,
        path: str,
        cid: int,
        *,
        rx_size: int = 256,
        tx_size: int = 128,
        rx_buf: int = 4096 + HDR_SIZE,
        tx_buf: int = 65536 + HDR_SIZE,
        buf_alloc: int = 256 * 1024,
        timeout: float = 10.0,
        features: int | None = None,
        kick_prepare: bool = False,
    ) -> None:
        self.cid = cid
        # Kick tx, and rx after buffers are reposted, only when the device asks
        # (Linux's virtqueue_kick_prepare, which its virtio-vsock driver calls for
        # both: virtqueue_kick), else always.
        self.kick_prepare = kick_prepare
        self.buf_alloc = buf_alloc
        self.timeout = timeout
        self.fe = Frontend.connect(path, timeout=timeout)
        try:
            feats, _ = self.fe.negotiate(features)
            self.event_idx = bool(feats & VIRTIO_RING_F_EVENT_IDX)
            self.fe.add_memory(rx_size * rx_buf + tx_size * tx_buf + (4 << 20))
            self.fe.set_mem_table()
            self.rx = self.fe.setup_ring(RX, rx_size)
            self.rx_area = self.rx.mock.alloc(rx_size * rx_buf, 4096)
            self.tx = self.fe.setup_ring(TX, tx_size, gpa=_next_ring(self.rx_area + rx_size * rx_buf))
            self.tx_area = self.tx.mock.alloc(tx_size * tx_buf, 4096)
            self.fe.setup_ring(EVENT, 16, gpa=_next_ring(self.tx_area + tx_size * tx_buf))
        except BaseException:
            self.fe.close()
            raise
        self.rx_size, self.tx_size, self.rx_buf, self.tx_buf = rx_size, tx_size, rx_buf, tx_buf
        self.tx_outstanding = 0
        # Counted for the benches: packets put on tx, how many of them kicked, and
        # the rx kicks after reposting buffers.
        self.tx_packets = 0
        self.tx_kicks = 0
        self.rx_kicks = 0
        # Guest-side credit: bytes of each connection's payload taken from rx.
        self.fwd_cnt: dict[tuple[int, int], int] = {}
        self.pending: list[Packet] = []
        for i in range(rx_size):
            self._post_rx(i)
        self.rx.mock.set_used_event(self.rx.mock.used_idx())
        self.fe.kick(RX)

    def _post_rx(self, index: int) -> None:
        mock = self.rx.mock
        mock.write_desc(
            index, RawDesc(self.rx_area + index * self.rx_buf, self.rx_buf, VIRTQ_DESC_F_WRITE, 0)
        )
        mock.add_avail(index)

    # -- tx -------------------------------------------------------------------------------
    def send(
        self, src_port: int, dst_port: int, op: int, data: bytes = b"", *, flags: int = 0,
        type_: int = TYPE_STREAM, dst_cid: int = HOST_CID, buf_alloc: int | None = None,
        fwd_cnt: int | None = None, length: int | None = None, kick: bool = True,
    ) -> None:  # fmt: skip
        """Put one packet on tx (reclaiming used tx buffers first) and kick."""
        mock = self.tx.mock
        self._reclaim_tx(block=self.tx_outstanding >= self.tx_size)
        index = mock._next_free  # one-descriptor chains: the slot is the head
        gpa = self.tx_area + index * self.tx_buf
        hdr = HDR.pack(
            self.cid, dst_cid, src_port, dst_port, len(data) if length is None else length, type_, op, flags,
            self.buf_alloc if buf_alloc is None else buf_alloc,
            self.fwd_cnt.get((src_port, dst_port), 0) if fwd_cnt is None else fwd_cnt,
        )  # fmt: skip
        self.fe.memory.write(gpa, hdr + data)
        old = mock.avail_idx()
        mock.add_chain([RawDesc(gpa, HDR_SIZE + len(data), 0, 0)])
        self.tx_outstanding += 1
        self.tx_packets += 1
        if kick:
            self._kick(TX, old)

    def _kick(self, index: int, old: int) -> None:
        """Kick ring ``index``, whose ``avail->idx`` was ``old`` before the buffers just
        added; with ``kick_prepare`` only when the device asks for it (VIRTIO 1.2
        §2.7.10: ``avail_event`` with EVENT_IDX, else the used ring's NO_NOTIFY flag)."""
        if self.kick_prepare:
            mock = self.fe.rings[index].mock
            if self.event_idx:
                new = mock.avail_idx()
                if (new - mock.avail_event() - 1) & 0xFFFF >= (new - old) & 0xFFFF:
                    return
            elif mock.used_flags() & VRING_USED_F_NO_NOTIFY:
                return
        if index == TX:
            self.tx_kicks += 1
        else:
            self.rx_kicks += 1
        self.fe.kick(index)

    def _reclaim_tx(self, block: bool) -> None:
        mock = self.tx.mock
        if block:
            self.tx_outstanding -= len(self.fe.wait_used(TX, 1, self.timeout))
        else:
            self.tx_outstanding -= len(mock.used_elems())

    # -- rx -------------------------------------------------------------------------------
    def recv(self, count: int = 1, timeout: float | None = None) -> list[Packet]:
        """Wait for at least ``count`` packets (or what is there when ``count`` is 0)."""
        out, self.pending = self.pending, []
        while len(out) < count:
            used = self.fe.wait_used(RX, 1, self.timeout if timeout is None else timeout)
            out += self._take(used)
        if count == 0:
            out += self._take(self.rx.mock.used_elems())
        return out

    def _take(self, used: list[tuple[int, int]]) -> list[Packet]:
        out = []
        old = self.rx.mock.avail_idx()
        for head, length in used:
            raw = self.fe.memory.read(self.rx_area + head * self.rx_buf, length)
            f = HDR.unpack_from(raw)
            pkt = Packet(*f[:4], f[5], f[6], f[7], f[8], f[9], raw[HDR_SIZE : HDR_SIZE + f[4]])
            if pkt.op == OP_RW:
                key = (pkt.dst_port, pkt.src_port)
                self.fwd_cnt[key] = (self.fwd_cnt.get(key, 0) + len(pkt.data)) & 0xFFFFFFFF
            out.append(pkt)
            self._post_rx(head)
        if used:
            self._kick(RX, old)
        return out

    def recv_data(self, timeout: float | None = None) -> tuple[int, list[Packet]]:
        """Wait for at least one packet; return the RW payload bytes that came (read
        from guest memory as a guest's reader would, credit counted) and the other
        packets.  The benches' receive loop: no object per RW packet, and the rx
        buffers are reposted in one batch (their descriptors never change)."""
        if self.pending:
            out, self.pending = self.pending, []
            return 0, out
        used = self.fe.wait_used(RX, 1, self.timeout if timeout is None else timeout)
        used += self.rx.mock.used_elems()
        memory, area, size = self.fe.memory, self.rx_area, self.rx_buf
        total = 0
        others = []
        fwd = self.fwd_cnt
        for head, length in used:
            raw = memory.read(area + head * size, length)
            f = HDR.unpack_from(raw)
            if f[6] == OP_RW:
                key = (f[3], f[2])
                fwd[key] = (fwd.get(key, 0) + f[4]) & 0xFFFFFFFF
                total += f[4]
            else:
                others.append(Packet(*f[:4], f[5], f[6], f[7], f[8], f[9], raw[HDR_SIZE : HDR_SIZE + f[4]]))
        old = self.rx.mock.avail_idx()
        self.rx.mock.publish([head for head, _length in used])
        self._kick(RX, old)
        return total, others

    def expect(self, op: int, timeout: float | None = None) -> Packet:
        """The next packet, which must have ``op`` (others before it fail the test)."""
        pkt = self.recv(1, timeout)
        first, rest = pkt[0], pkt[1:]
        self.pending = rest + self.pending
        assert first.op == op, f"expected op {op}, got {first}"
        return first

    def read_stream(self, port: int, peer: int, nbytes: int) -> bytes:
        """RW payload of one connection until ``nbytes``, answering credit as Linux does."""
        got = bytearray()
        while len(got) < nbytes:
            for pkt in self.recv(1):
                if pkt.op == OP_RW and (pkt.dst_port, pkt.src_port) == (port, peer):
                    got += pkt.data
                elif pkt.op == OP_CREDIT_REQUEST:
                    self.send(port, peer, OP_CREDIT_UPDATE)
            if len(got) and self.fwd_cnt.get((port, peer), 0) % (self.buf_alloc // 2) < 4096:
                self.send(port, peer, OP_CREDIT_UPDATE)
        return bytes(got)

    # -- a VM pause ----------------------------------------------------------------------
    def pause(self) -> dict[int, int]:
        """Stop every ring as QEMU's ``stop`` does (GET_VRING_BASE on each); the next
        avail index of each ring."""
        return {index: self.fe.get_vring_base(index) for index in sorted(self.fe.rings)}

    def resume(self, bases: dict[int, int]) -> None:
        """Start the rings again where :meth:`pause` left them, with fresh eventfds
        (QEMU's vhost_virtqueue_start), and kick each, as QEMU does when it hands the
        queues back to the back-end (the guest may have queued buffers meanwhile)."""
        fe = self.fe
        for index, base in bases.items():
            ring = fe.rings[index]
            mock = ring.mock
            for fd in (ring.kick_fd, ring.call_fd):
                os.close(fd)
            ring.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            ring.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            fe.set_vring_num(index, mock.size)
            fe.set_vring_base(index, base)
            fe.set_vring_addr(
                index,
                fe.user_addr(mock.desc_table),
                fe.user_addr(mock.avail_ring),
                fe.user_addr(mock.used_ring),
            )
            fe.set_vring_call(index, ring.call_fd)
            fe.set_vring_kick(index, ring.kick_fd)
            if fe.features & VHOST_USER_F_PROTOCOL_FEATURES:
                fe.set_vring_enable(index, True)
        for index in bases:
            fe.kick(index)

    def config_cid(self) -> int:
        return int(struct.unpack("<Q", self.fe.get_config(0, 8))[0])

    def close(self) -> None:
        self.fe.close()


def _next_ring(addr: int) -> int:
    return (addr + 0xFFFF) & ~0xFFFF
