"""A guest's virtio-vsock driver played by our vhost-user front-end (tests and benches).

:class:`VsockDriver` connects to a ``vhost-device-vsock`` socket (ours or the Rust
one), sets up rx/tx/event rings in memfd memory, keeps every rx descriptor posted
with one buffer each (as Linux does), and sends one-descriptor tx packets from a
fixed pool of buffers.  No sleeps: every wait is on a call eventfd with a timeout.

The benches' data paths (:meth:`VsockDriver.send_rw`, :meth:`VsockDriver.poll_rx`,
:meth:`VsockDriver.wait_rx`) work in batches as Linux's ``net/vmw_vsock/virtio_transport.c``
does, so that a bench measures the devices rather than this driver:

* tx: ``virtio_transport_send_pkt_work`` adds every queued packet with
  ``virtqueue_add_sgs`` (the header and the payload one scatter-gather entry each,
  ``virtio_transport_send_skb``: two descriptors without INDIRECT_DESC, which neither
  daemon offers), then calls ``virtqueue_kick`` once;
* tx completions: ``virtio_transport_tx_work`` frees every used buffer, then turns
  callbacks back on (``virtqueue_enable_cb``);
* rx: ``virtio_transport_rx_work`` takes every used buffer with callbacks off, turns
  them back on and looks again, and refills (``virtio_vsock_rx_fill``, one
  ``virtqueue_kick``) only when fewer than half the buffers are posted.

What a batch writes is written with as few Python operations as possible: the header
is packed once per batch, the descriptors of a batch come from a table packed once
per payload size, the available-ring entries go in with one slice assignment, and
rx headers are read in place from a view of guest memory.
"""

from __future__ import annotations

import operator
import os
import select
import struct
import sys
from array import array
from collections import deque
from dataclasses import dataclass

from vhost_backends.frontend import Frontend
from vhost_backends.protocol.codes import VHOST_USER_F_PROTOCOL_FEATURES
from virtio_queue.mock import VIRTQ_DESC_F_NEXT, VRING_USED_F_NO_NOTIFY
from virtio_queue.testing import VIRTQ_DESC_F_WRITE, RawDesc

HDR = struct.Struct("<QQIIIHHIII")
HDR_SIZE = HDR.size
#: The fields of a header the rx fast path needs: src_port, dst_port, len, op.
_HDR_ROUTE = struct.Struct("<16xIII2xH")
_DESC = struct.Struct("<QIHH")
#: The header's 32-bit word 7 (type, op) of a stream RW packet, little-endian.
_RW_STREAM = 1 | 5 << 16
_NATIVE_LE = sys.byteorder == "little"
#: Used rx buffers taken at once from which poll_rx looks for runs (fewer are read
#: one by one, which costs less than the look).
_RUN_MIN = 8
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
        rw_descs: int = 2,
        copy_payload: bool = True,
    ) -> None:
        if rw_descs not in (1, 2):
            raise ValueError(f"rw_descs {rw_descs}: a packet is one descriptor or two (header, payload)")
        if rw_descs == 2 and tx_size % 2:
            raise ValueError(f"tx_size {tx_size} is odd: two-descriptor packets need an even ring")
        self.cid = cid
        # send_rw's packets: the header and the payload in a descriptor each
        # (virtio_transport_send_skb's two scatter-gather entries), or both in one.
        self.rw_descs = rw_descs
        # Whether the fast paths copy each packet's payload as a guest's socket layer
        # does (into the tx buffer, out of the rx buffer); else only the headers are
        # written and read (a tx buffer gets a payload once), so that a bench
        # measures the device, not this process's copies.
        self.copy_payload = copy_payload
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
        # tx chains in the order they were made available: (head, chains, descriptors
        # per chain, checked).  Descriptors are taken round-robin and freed in that
        # order: both daemons use tx buffers in order (a device that does not is
        # caught for send_rw's batches, see _free_tx).
        self._tx_chains: deque[tuple[int, int, int, bool]] = deque()
        self._tx_descs = 0
        # rx heads taken by poll_rx and not yet reposted (virtio_vsock_rx_fill's
        # batch), views of guest memory for the fast paths, the reader's buffer.
        self._rx_unposted: list[int] = []
        # copy_payload off: the payload object each tx buffer (by offset) holds.
        self._tx_filled: dict[int, bytes] = {}
        self._views_gen = -1
        self._desc_tables: dict[tuple[int, int, int], bytes] = {}
        self._head_lists: dict[tuple[int, int], array[int]] = {}
        self._reader = memoryview(bytearray(rx_buf))
        self._run_reader = memoryview(bytearray(rx_size * rx_buf))
        # wait_rx's wait: edge-triggered, so that each call of the device wakes it
        # once without a read of the eventfd (one system call less a wake-up).
        self._rx_call = select.epoll()
        self._rx_call.register(self.rx.call_fd, select.EPOLLIN | select.EPOLLET)
        # Touch the buffers once, as a running guest's memory is: the first write or
        # read of each page of a fresh memfd mapping is a page fault of this process.
        self._fast_views()
        self._tx_area_v[:] = bytes(len(self._tx_area_v))
        self._rx_area_v[:] = bytes(len(self._rx_area_v))
        # Counted for the benches: packets put on tx, how many of them kicked, and
        # the rx kicks after reposting buffers.
        self.tx_packets = 0
        self.tx_kicks = 0
        self.rx_kicks = 0
        # RW packets poll_rx took (rx_runs: runs of them read as one), and the
        # times wait_rx waited for the device.
        self.rx_packets = 0
        self.rx_runs = 0
        self.rx_waits = 0
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
        self._reclaim_tx(block=self._tx_descs >= self.tx_size)
        index = mock._next_free  # one-descriptor chains: the slot is the head
        gpa = self.tx_area + index * self.tx_buf
        hdr = HDR.pack(
            self.cid, dst_cid, src_port, dst_port, len(data) if length is None else length, type_, op, flags,
            self.buf_alloc if buf_alloc is None else buf_alloc,
            self.fwd_cnt.get((src_port, dst_port), 0) if fwd_cnt is None else fwd_cnt,
        )  # fmt: skip
        self.fe.memory.write(gpa, hdr + data)
        self._tx_filled.pop(gpa - self.tx_area, None)
        old = mock.avail_idx()
        mock.add_chain([RawDesc(gpa, HDR_SIZE + len(data), 0, 0)])
        self._tx_chains.append((index, 1, 1, False))
        self._tx_descs += 1
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

    def _reclaim_tx(self, block: bool, need: int = 1) -> None:
        """Free the tx chains the device used (``virtio_transport_tx_work``: every
        used buffer, then callbacks back on, ``virtqueue_enable_cb``: ``used_event``
        with EVENT_IDX); with ``block``, wait until ``need`` descriptors are free."""
        mock = self.tx.mock
        while True:
            end = mock.used_idx()
            count = (end - mock.last_used) & 0xFFFF
            if count:
                self._free_tx(mock.last_used, count)
                mock.last_used = end
                mock.set_used_event(end)
            if not block or self.tx_size - self._tx_descs >= need:
                return
            used = self.fe.wait_used(TX, 1, self.timeout)
            self._free_tx((mock.last_used - len(used)) & 0xFFFF, len(used))

    def _free_tx(self, first: int, count: int) -> None:
        """Free ``count`` tx chains the device used from used-ring slot ``first``, in
        the order they were made available.

        Raises:
            RuntimeError: the device used a ``send_rw`` batch's buffers out of order
                (VIRTIO 1.2 §2.7.8 allows it; this driver's round-robin pool does not
                handle it), naming the used id and the head expected.
        """
        chains, size = self._tx_chains, self.tx_size
        mock = self.tx.mock
        while count:
            head, n, per, checked = chains[0]
            take = min(n, count)
            if checked:
                got = mock.used_elem(first)[0]
                if got != head:
                    raise RuntimeError(
                        f"tx used ring slot {first}: id {got}, expected head {head} (out of order)"
                    )
            if take == n:
                chains.popleft()
            else:
                chains[0] = ((head + per * take) % size, n - take, per, checked)
            self._tx_descs -= take * per
            self.tx_outstanding -= take
            first = (first + take) & 0xFFFF
            count -= take

    def _fast_views(self) -> None:
        """Views of guest memory for the fast paths (again after a memory change)."""
        memory = self.fe.memory
        if memory.generation == self._views_gen:
            return
        rx, tx = self.rx.mock, self.tx.mock
        self._tx_area_v = memory.get_slice(self.tx_area, self.tx_size * self.tx_buf).cast("B")
        self._tx_desc_v = memory.get_slice(tx.desc_table, 16 * self.tx_size).cast("B")
        self._rx_area_v = memory.get_slice(self.rx_area, self.rx_size * self.rx_buf).cast("B")
        self._rx_used_v = memory.get_slice(rx.used_ring + 4, 8 * self.rx_size).cast("B").cast("I")
        self._rx_idx_v = memory.get_slice(rx.used_ring + 2, 2).cast("B").cast("H")
        # Header fields as 32-bit words when every rx buffer starts on a word.
        self._rx_words = self.rx_buf % 4 == 0 and self.rx_area % 4 == 0 and _NATIVE_LE
        self._rx_area32 = self._rx_area_v.cast("I") if self._rx_words else self._rx_area_v
        self._views_gen = memory.generation

    def _desc_table(self, length: int, per: int, parity: int) -> bytes:
        """The whole tx descriptor table as ``send_rw`` writes it for ``length``-byte
        payloads, ``per`` descriptors a packet, heads of ``parity``: packed once, a
        batch copies its slice (the descriptors it would write one by one)."""
        key = (length, per, parity)
        table = self._desc_tables.get(key)
        if table is None:
            size, area, stride = self.tx_size, self.tx_area, self.tx_buf
            parts = []
            for i in range(size):
                if per == 1:
                    parts.append(_DESC.pack(area + i * stride, HDR_SIZE + length, 0, 0))
                elif (i - parity) % 2 == 0:
                    parts.append(_DESC.pack(area + i * stride, HDR_SIZE, VIRTQ_DESC_F_NEXT, (i + 1) % size))
                else:
                    parts.append(_DESC.pack(area + (i - 1) % size * stride + HDR_SIZE, length, 0, 0))
            table = self._desc_tables[key] = b"".join(parts)
        return table

    def _heads(self, per: int, parity: int) -> array[int]:
        """Every head ``send_rw`` can use, in ring order, twice (a batch is a slice)."""
        key = (per, parity)
        heads = self._head_lists.get(key)
        if heads is None:
            heads = self._head_lists[key] = array("H", list(range(parity, self.tx_size, per)) * 2)
        return heads

    def send_rw(
        self, src_port: int, dst_port: int, data: bytes, count: int, *, dst_cid: int = HOST_CID
    ) -> int:
        """:meth:`send_batch` of ``count`` RW packets each carrying ``data``."""
        return self.send_batch(src_port, dst_port, OP_RW, data, count, dst_cid=dst_cid)

    def send_batch(
        self, src_port: int, dst_port: int, op: int, data: bytes = b"", count: int = 1, *,
        dst_cid: int = HOST_CID,
    ) -> int:  # fmt: skip
        """Put up to ``count`` packets of a stream connection with ``op``, each
        carrying ``data``, on tx in one batch and kick once if the device asks.

        Linux's ``virtio_transport_send_pkt_work`` adds every queued packet
        (``virtqueue_add_sgs``: header and payload as two descriptors, or one with
        ``rw_descs=1``), then calls ``virtqueue_kick`` once (``kick_prepare``: only
        when ``avail_event`` asks, VIRTIO 1.2 §2.7.10).  The header carries the
        connection's credit (``buf_alloc``, ``fwd_cnt``, §5.10.6.3); the caller keeps
        within the peer's credit.  Used tx buffers are freed first; when no
        descriptors are free it waits for some.  Returns how many were queued
        (fewer than ``count`` when the ring has no room for more).

        Raises:
            ValueError: a packet does not fit a tx buffer (``tx_buf``).
            TimeoutError: no tx descriptors came free within the timeout.
        """
        per = self.rw_descs if data else 1
        size = self.tx_size
        plen = HDR_SIZE + len(data)
        if plen > self.tx_buf:
            raise ValueError(f"packet of {plen} bytes > tx buffer {self.tx_buf}")
        if self.fe.memory.generation != self._views_gen:
            self._fast_views()
        self._reclaim_tx(block=self._tx_descs + per > size, need=per)
        n = min(count, (size - self._tx_descs) // per)
        if n <= 0:
            return 0
        mock = self.tx.mock
        start = mock._next_free
        hdr = HDR.pack(
            self.cid, dst_cid, src_port, dst_port, len(data), TYPE_STREAM, op, 0,
            self.buf_alloc, self.fwd_cnt.get((src_port, dst_port), 0),
        )  # fmt: skip
        area, stride = self._tx_area_v, self.tx_buf
        # The packet's bytes into its buffer, a copy each as into Linux's skb: small
        # payloads joined to the header once per batch, large ones copied once.
        if not self.copy_payload:
            filled = self._tx_filled
            for k in range(n):
                o = (start + per * k) % size * stride
                area[o : o + HDR_SIZE] = hdr
                if filled.get(o) is not data:
                    area[o + HDR_SIZE : o + plen] = data
                    filled[o] = data
        elif len(data) < 16384:
            pkt = hdr + data
            for k in range(n):
                o = (start + per * k) % size * stride
                area[o : o + plen] = pkt
        else:
            for k in range(n):
                o = (start + per * k) % size * stride
                area[o : o + HDR_SIZE] = hdr
                area[o + HDR_SIZE : o + plen] = data
        table = self._desc_table(len(data), per, start % per)
        descs = self._tx_desc_v
        a, b, end = 16 * start, 16 * (start + per * n), 16 * size
        if b <= end:
            descs[a:b] = table[a:b]
        else:
            descs[a:] = table[a:]
            descs[: b - end] = table[: b - end]
        old = mock.avail_idx()
        if n == 1:
            mock.add_avail(start)
        else:
            first = start // per
            mock.publish(self._heads(per, start % per)[first : first + n])
        mock._next_free = (start + per * n) % size
        self._tx_chains.append((start, n, per, True))
        self._tx_descs += per * n
        self.tx_outstanding += n
        self.tx_packets += n
        self._kick(TX, old)
        return n

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
        packets (:meth:`wait_rx`, after any packets :meth:`expect` left pending)."""
        if self.pending:
            out, self.pending = self.pending, []
            return 0, out
        return self.wait_rx(timeout)

    def poll_rx(self, into: bytearray | None = None) -> tuple[int, list[Packet]]:
        """Take every used rx buffer without waiting: the RW payload bytes (copied
        out of guest memory as a reader would, each connection's ``fwd_cnt``
        counted, §5.10.6.3; appended to ``into`` when given) and the other packets.

        As Linux's ``virtio_transport_rx_work``: take every used buffer, turn
        callbacks back on (``virtqueue_enable_cb``: ``used_event``, §2.7.10) and look
        again; repost the taken buffers in one batch (their descriptors never change)
        only when fewer than half are posted (``virtio_vsock_rx_fill``), with one kick
        if the device asks.

        Raises:
            ValueError: a used buffer's header claims more payload than the device
                wrote (its used length), naming both.
        """
        if self.fe.memory.generation != self._views_gen:
            self._fast_views()
        mock = self.rx.mock
        idx = self._rx_idx_v
        total, others = 0, []
        while True:
            last, end = mock.last_used, idx[0]
            if end != last:
                t, o = self._take_rx(last, (end - last) & 0xFFFF, into)
                total += t
                others += o
                mock.last_used = end
                continue
            mock.set_used_event(end)
            if idx[0] == end:
                break
        unposted = self._rx_unposted
        if 2 * len(unposted) > self.rx_size:
            old = mock.avail_idx()
            mock.publish(unposted)
            unposted.clear()
            self._kick(RX, old)
        return total, others

    def _take_rx(self, first: int, count: int, into: bytearray | None) -> tuple[int, list[Packet]]:
        """Read ``count`` used rx buffers from used-ring slot ``first`` in place."""
        used, size = self._rx_used_v, self.rx_size
        start = first % size
        if start + count <= size:
            heads = used[2 * start : 2 * (start + count) : 2].tolist()
            lengths = used[2 * start + 1 : 2 * (start + count) : 2].tolist()
        else:
            rest = 2 * (start + count - size)
            heads = used[2 * start :: 2].tolist() + used[0:rest:2].tolist()
            lengths = used[2 * start + 1 :: 2].tolist() + used[1:rest:2].tolist()
        if count < _RUN_MIN or not self._rx_words:
            return self._take_each(heads, lengths, into)
        total, others = 0, []
        i = 0
        while i < count:
            # The longest stretch of adjacent buffers from here (heads wrap at the
            # ring's end), read as one run as far as it holds one connection's RW
            # packets; what stops the run is read packet by packet up to the next
            # stretch.
            h0 = heads[i]
            n = min(count - i, size - h0)
            if heads[i : i + n] != list(range(h0, h0 + n)):
                n = 1
            taken = self._take_run(h0, n, lengths[i : i + n], into)
            if taken:
                total += taken[1]
                self._rx_unposted += heads[i : i + taken[0]]
                i += taken[0]
                if taken[0] == n:
                    continue
            t, o = self._take_each(heads[i : i + 1], lengths[i : i + 1], into)
            total += t
            others += o
            i += 1
        return total, others

    def _take_run(
        self, h0: int, count: int, lengths: list[int], into: bytearray | None
    ) -> tuple[int, int] | None:
        """The longest prefix of buffers ``h0 .. h0+count-1`` (adjacent in guest
        memory) that holds RW packets of one stream connection, read at once: the
        headers' fields as strided slices of a 32-bit view (no Python step per packet),
        the payload copied out in one copy, as a reader's.  Returns how many buffers
        and payload bytes it took; None when the first buffer holds anything else or
        a header claims more than the device wrote (:meth:`_take_each` reads it, and
        refuses the latter)."""
        words, step = self._rx_area32, self.rx_buf // 4
        base = h0 * step
        end = base + count * step
        ops = words[base + 7 : end : step].tolist()
        src = words[base + 4 : end : step].tolist()
        dst = words[base + 5 : end : step].tolist()
        if ops.count(_RW_STREAM) != count or src.count(src[0]) != count or dst.count(dst[0]) != count:
            first = (src[0], dst[0])
            count = next(
                (k for k, key in enumerate(zip(ops, src, dst, strict=True)) if key != (_RW_STREAM, *first)),
                count,
            )
            if count == 0:
                return None
            end = base + count * step
        payload = words[base + 6 : end : step].tolist()
        if max(map(operator.sub, payload, lengths)) > -HDR_SIZE:
            return None
        if into is None:
            if self.copy_payload:
                self._run_reader[: 4 * (end - base)] = self._rx_area_v[4 * base : 4 * end]
        else:
            for k, length in enumerate(payload):
                data = 4 * base + k * self.rx_buf + HDR_SIZE
                into += self._rx_area_v[data : data + length]
        total = sum(payload)
        self.rx_runs += 1
        key = (dst[0], src[0])
        self.fwd_cnt[key] = (self.fwd_cnt.get(key, 0) + total) & 0xFFFFFFFF
        self.rx_packets += count
        return count, total

    def _take_each(
        self, heads: list[int], lengths: list[int], into: bytearray | None
    ) -> tuple[int, list[Packet]]:
        """Read used rx buffers one by one (packets of any kind)."""
        area, reader = self._rx_area_v, self._reader
        stride, fwd, route = self.rx_buf, self.fwd_cnt, _HDR_ROUTE
        unposted = self._rx_unposted
        total, others = 0, []
        for head, used_len in zip(heads, lengths, strict=True):
            off = head * stride
            src, dst, length, op = route.unpack_from(area, off)
            if length > used_len - HDR_SIZE:
                raise ValueError(
                    f"rx buffer {head}: header len {length} > used length {used_len} less the header"
                )
            data = off + HDR_SIZE
            if op == OP_RW:
                self.rx_packets += 1
                if into is None:
                    if self.copy_payload:
                        reader[:length] = area[data : data + length]
                else:
                    into += area[data : data + length]
                key = (dst, src)
                fwd[key] = (fwd.get(key, 0) + length) & 0xFFFFFFFF
                total += length
            else:
                f = HDR.unpack_from(area, off)
                others.append(Packet(*f[:4], f[5], f[6], f[7], f[8], f[9], bytes(area[data : data + length])))
            unposted.append(head)
        return total, others

    def wait_rx(
        self, timeout: float | None = None, into: bytearray | None = None
    ) -> tuple[int, list[Packet]]:
        """:meth:`poll_rx`, waiting for the device's used-buffer notification (the
        rx call eventfd) while nothing has come.

        Raises:
            TimeoutError: nothing came within ``timeout`` (default: the driver's).
        """
        wait = self.timeout if timeout is None else timeout
        while True:
            total, others = self.poll_rx(into)
            if total or others:
                return total, others
            self.rx_waits += 1
            if not self._rx_call.poll(wait):
                raise TimeoutError("rx: no used buffers within the timeout")

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
        self._rx_call.close()
        self._rx_call = select.epoll()
        self._rx_call.register(fe.rings[RX].call_fd, select.EPOLLIN | select.EPOLLET)
        for index in bases:
            fe.kick(index)

    def config_cid(self) -> int:
        return int(struct.unpack("<Q", self.fe.get_config(0, 8))[0])

    def close(self) -> None:
        self._rx_call.close()
        self.fe.close()


def _next_ring(addr: int) -> int:
    return (addr + 0xFFFF) & ~0xFFFF
