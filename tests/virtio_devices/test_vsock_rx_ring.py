"""The rx ring invariant of virtio-vsock under random host traffic (VIRTIO 1.2 §2.7).

A guest driver of its own here keeps the ring's books: which heads it made
available, which came back.  Host programs write to several connections in any
order while the guest posts rx buffers of mixed shapes (one buffer of a page, a
small one, a header and a page in two descriptors, a header's worth, one too
small for a header),
takes used entries back and gives credit; the device is the compiled path (the
batched ``readv`` of ``_rx_batch``, the one-chain path, the pumps), the compiled
path with the pumps' nogil paths first (as the vhost-user loop runs them), or the
Python one.  After every step: each used entry names a head that was available and not
yet returned (returned once), ``used->idx`` never passes ``avail->idx``, no used
length exceeds its buffer, and each connection's bytes reach the guest in order.
The ring indexes start just below the u16 wrap, so a run crosses it.
"""

from __future__ import annotations

import contextlib
import random
import socket
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vsock_guest import RX, VsockGuest

from virtio_devices.hosts.vsock import UnixHost
from virtio_devices.vsock import HDR_SIZE, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RW, Hdr, VsockDevice
from virtio_queue.testing import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, RawDesc

SIZE = 16  # ring entries (and descriptors): small, so the ring turns over often
PAGE = 4096
SLOT = 2 * PAGE  # guest memory per descriptor
# Buffer shapes: descriptor lengths of one chain, every one device-writable.
SHAPES = {
    "page": (HDR_SIZE + PAGE,),
    "small": (HDR_SIZE + 7,),
    "split": (HDR_SIZE, PAGE),
    "tiny": (HDR_SIZE - 4,),
    "header": (HDR_SIZE,),
}
CONNS = 3
GUEST_BUF = 64 * 1024
MODES = ["compiled", "python", "nogil"]


class RxBooks:
    """The guest's rx ring, by the book: descriptors from a free list, heads
    published with ``MockSplitQueue.publish`` (which checks the outstanding count)."""

    def __init__(self, guest: VsockGuest, base: int) -> None:
        self.guest = guest
        self.mock = guest.rig.mocks[RX]
        mem = guest.rig.memory
        self.area = self.mock.alloc(SIZE * SLOT, PAGE)
        # Start the indexes just below the u16 wrap (as after a long run).
        self.mock.set_avail_idx(base)
        mem.write_u16(self.mock.used_ring + 2, base)
        self.mock.last_used = base
        queue = guest.device.queues[RX]
        queue.set_next_avail(base)
        queue.set_next_used(base)
        self.free = list(range(SIZE))
        self.out: dict[int, tuple[list[int], tuple[int, ...]]] = {}  # head -> (descriptors, lengths)
        self.returned = 0

    def post(self, shapes: list[str]) -> None:
        heads = []
        for name in shapes:
            lens = SHAPES[name]
            if len(lens) > len(self.free):
                break
            idx = [self.free.pop() for _ in lens]
            for k, (i, n) in enumerate(zip(idx, lens, strict=True)):
                last = k == len(lens) - 1
                flags = VIRTQ_DESC_F_WRITE | (0 if last else VIRTQ_DESC_F_NEXT)
                self.mock.write_desc(i, RawDesc(self.area + i * SLOT, n, flags, 0 if last else idx[k + 1]))
            self.out[idx[0]] = (idx, lens)
            heads.append(idx[0])
        self.mock.publish(heads)

    def check_ring(self) -> None:
        avail, used = self.mock.avail_idx(), self.mock.used_idx()
        assert (avail - used) & 0xFFFF <= SIZE, f"used idx {used} passed avail idx {avail}"
        assert (avail - used) & 0xFFFF == len(self.out) - (used - self.mock.last_used) & 0xFFFF

    def take(self) -> list[tuple[Hdr, bytes]]:
        """Every new used entry: each must be an outstanding head, returned once."""
        self.check_ring()
        out = []
        for head, length in self.mock.used_elems():
            assert head in self.out, f"used head {head} was not available (outstanding {sorted(self.out)})"
            idx, lens = self.out.pop(head)
            assert length <= sum(lens), f"head {head}: used length {length} > buffer {sum(lens)}"
            self.free += idx
            self.returned += 1
            if length == 0:
                continue  # a buffer too small for a header, given back empty
            parts = zip(idx, lens, strict=True)
            raw = b"".join(self.guest.rig.read(self.area + i * SLOT, n) for i, n in parts)
            hdr = Hdr.parse(raw)
            assert length == HDR_SIZE + hdr.len
            out.append((hdr, raw[HDR_SIZE : HDR_SIZE + hdr.len]))
        return out


step = st.one_of(
    st.tuples(st.just("write"), st.integers(0, CONNS - 1), st.integers(1, 120000)),
    st.tuples(st.just("post"), st.lists(st.sampled_from(sorted(SHAPES)), min_size=1, max_size=SIZE)),
    st.tuples(st.just("take"), st.just(0)),
    st.tuples(st.just("pump"), st.just(0)),
    st.tuples(st.just("credit"), st.integers(0, CONNS - 1)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    steps=st.lists(step, min_size=5, max_size=50),
    mode=st.sampled_from(MODES),
    base=st.sampled_from([0, 0xFFFA]),
)
def test_rx_ring_invariant_under_random_host_traffic(
    tmp_path_factory: pytest.TempPathFactory,
    steps: list[tuple[Any, ...]],
    mode: str,
    base: int,
) -> None:
    """VIRTIO 1.2 §2.7.8/§2.7.13: the device MUST only use buffers the driver made
    available, each once; §5.10.6.3: it sends no more than the guest's credit."""
    _run(tmp_path_factory, steps, mode, base)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [1])
def test_rx_ring_invariant_over_a_long_random_run(
    tmp_path_factory: pytest.TempPathFactory, mode: str, seed: int
) -> None:
    """The property above over one long seeded run: the ring turns over hundreds
    of times, across the u16 wrap, with batches of every length up to the ring."""
    rng = random.Random(seed)
    steps: list[tuple[Any, ...]] = []
    for _ in range(500):
        kind = rng.choice(["write", "write", "post", "post", "take", "take", "pump", "credit"])
        if kind == "write":
            steps.append((kind, rng.randrange(CONNS), rng.randint(1, 120000)))
        elif kind == "post":
            shapes = sorted(SHAPES)
            steps.append((kind, [rng.choice(shapes + ["page"] * 4) for _ in range(rng.randint(1, SIZE))]))
        elif kind == "credit":
            steps.append((kind, rng.randrange(CONNS)))
        else:
            steps.append((kind, 0))
    g = _run(tmp_path_factory, steps, mode, 0xFF00)
    if mode == "nogil":
        # The nogil paths did serve (the run is not the compiled one again).
        assert g.nogil is not None and g.nogil.served > 0 and g.device._fast.nogil_chains > 0


def _run(
    tmp_path_factory: pytest.TempPathFactory,
    steps: list[tuple[Any, ...]],
    mode: str,
    base: int,
) -> VsockGuest:
    """One run of ``steps`` (see the module docstring); the guest, closed."""
    tmp = tmp_path_factory.mktemp("rxring")
    host = UnixHost(str(tmp / "v.sock"))
    dev = VsockDevice(3, host, tx_buffer_size=65536)
    dev._compiled = mode != "python"
    g = VsockGuest(dev, queue_size=SIZE, nogil=mode == "nogil")
    g.buf_alloc = GUEST_BUF
    socks: list[socket.socket] = []
    try:
        books = RxBooks(g, base)
        books.post(["page"] * 8)
        peers, sent, got, fwd = [], [], [], []
        for c in range(CONNS):
            lst = socket.socket(socket.AF_UNIX)
            socks.append(lst)
            lst.bind(host.port_path(1000 + c))
            lst.listen(1)
            g.send(5000 + c, 1000 + c, OP_REQUEST)
            pkts = books.take()
            assert [h.op for h, _ in pkts] == [OP_RESPONSE], pkts
            books.post(["page"])
            peer = lst.accept()[0]
            socks.append(peer)
            peer.setblocking(False)
            peers.append(peer)
            sent.append(bytearray())
            got.append(bytearray())
            fwd.append(0)

        def absorb(pkts: list[tuple[Hdr, bytes]]) -> None:
            for h, data in pkts:
                c = h.dst_port - 5000
                if h.op == OP_RW:
                    got[c] += data
                    # §5.10.6.3: never beyond the guest's buffer.
                    assert len(got[c]) - fwd[c] <= GUEST_BUF

        def pump() -> None:
            g.pump()
            for c in range(CONNS):
                conn = dev.conns.get((1000 + c, 5000 + c))
                if conn is not None and conn.fd in g.rig.loop.pumps:
                    with contextlib.suppress(KeyError):
                        g.fire(conn.fd)

        for kind, arg, *rest in steps:
            if kind == "write":
                data = bytes((len(sent[arg]) + i) * (arg + 3) & 0xFF for i in range(rest[0]))
                with contextlib.suppress(BlockingIOError):
                    sent[arg] += data[: peers[arg].send(data)]
                pump()
            elif kind == "post":
                books.post(arg)
                dev.process_queue(RX)  # the rig's kick would read the used entries itself
            elif kind == "take":
                absorb(books.take())
            elif kind == "pump":
                pump()
            else:
                fwd[arg] = len(got[arg])
                g.send(5000 + arg, 1000 + arg, OP_CREDIT_UPDATE, buf_alloc=GUEST_BUF, fwd_cnt=fwd[arg])
            books.check_ring()
        # Drain: buffers and credit until every host byte is in.
        order = sorted(SHAPES)
        for n in range(400):
            if all(len(got[c]) == len(sent[c]) for c in range(CONNS)):
                break
            absorb(books.take())
            books.post([order[(n + k) % len(order)] for k in range(len(books.free))])
            dev.process_queue(RX)  # the rig's kick would read the used entries itself
            for c in range(CONNS):
                fwd[c] = len(got[c])
                g.send(5000 + c, 1000 + c, OP_CREDIT_UPDATE, buf_alloc=GUEST_BUF, fwd_cnt=fwd[c])
            pump()
        absorb(books.take())
        for c in range(CONNS):
            assert got[c] == sent[c], f"connection {c}: {len(got[c])} of {len(sent[c])} bytes, in order"
        # The run did cross the u16 wrap of the ring indexes when it started below it.
        assert base < 0xFF00 or books.returned <= 0xFFFF - base or dev.queues[RX].next_used() < base
    finally:
        for s in socks:
            s.close()
        g.close()
        host.close()
    return g
