"""Property test of Queue.fill_from_fd (the compiled rng fast path) against a model
that serves the same ring one request at a time with one read each.

The fast path looks at a run of available chains first (``_peek_fill``: descriptors
and buffers the guest wrote) and then fills them with one ``readv``; the model walks
each chain with the reference walker (``RefChain``) and reads for each alone.  On
random rings (chains of one to three descriptors with random addresses, lengths and
flags, indirect tables, head indexes out of range, sources shorter than the
requests, a limit on the chains served) both must complete the same chains with the
same lengths, write the same bytes, return the same chain to the caller, and leave
everything else alone (guard bytes around the regions, every byte outside the
filled buffers and the used ring).  Buffers are kept out of the ring area, where a
guest that points a request at its own ring makes the two orders differ (both
safely); the example-based test at the end covers that case for safety alone.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from dataclasses import dataclass

from hypothesis import event, given
from hypothesis import strategies as st

from virtio_queue import GuestMemory, InvalidAvailRingIndex
from virtio_queue.testing import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    GuardedMemory,
    MockSplitQueue,
    RawDesc,
    RefChain,
)

SIZE = 32
REGIONS = [(0x0, 0x4000), (0x10000, 0x1000)]
DESC, AVAIL, USED = 0x0, 0x200, 0x300  # 32 x 16, 4 + 64 + 2, 4 + 256 + 2
RING_END = 0x1000  # buffers never start below this
TABLE = 0x1000  # one indirect table, 8 entries
SOURCE = bytes((i * 37 + 11) & 0xFF for i in range(4096))


def _mapped(addr: int, length: int) -> bool:
    last = addr + max(length, 1) - 1
    return any(start <= addr and last < start + size for start, size in REGIONS)


_in0 = st.integers(0x1100, 0x3FC0)
_small = st.integers(0, 64)
_buf_addr = st.one_of(
    _in0,
    _in0,
    st.integers(0x10000, 0x10FC0),
    st.sampled_from([0x3FF8, 0x4000, 0x8000, 0x10FF8, 0x11000, (1 << 64) - 8]),
)
_len = st.one_of(_small, _small, _small, st.sampled_from([0, 1, 8, 255, 256, 0x1000, 0xFFFFFFFF]))
# Mostly a plain device-writable buffer (what the fast path serves), sometimes a
# link, a readable buffer, an indirect table, or any u16.
_plain = st.sampled_from(
    [VIRTQ_DESC_F_WRITE] * 6 + [0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE]
)
_flags = st.one_of(
    _plain,
    _plain,
    _plain,
    _plain,
    st.sampled_from([VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE]),
    st.integers(0, 0xFFFF),
)


@dataclass
class Ring:
    chains: list[list[tuple[int, int, int]]]  # (addr, len, flags) per descriptor
    bad_heads: list[int]  # positions (in avail order) of out-of-range heads
    indirect: list[tuple[int, int, int]]  # entries of the one indirect table
    source_len: int
    max_chains: int


@st.composite
def rings(draw: st.DrawFn) -> Ring:
    chains = draw(
        st.lists(
            st.lists(st.tuples(_buf_addr, _len, _flags), min_size=1, max_size=3), min_size=1, max_size=10
        )
    )
    bad = draw(st.sampled_from([[], [], [], [draw(st.integers(0, len(chains)))]]))
    indirect = draw(st.lists(st.tuples(_buf_addr, _len, _flags), min_size=1, max_size=3))
    return Ring(
        chains=chains,
        bad_heads=bad,
        indirect=indirect,
        source_len=draw(st.one_of(st.integers(0, 300), st.just(4096))),
        max_chains=draw(st.sampled_from([-1, -1, -1, -1, 0, 1, 2, 5])),
    )


def _build(ring: Ring) -> tuple[GuardedMemory, MockSplitQueue, list[int]]:
    gm = GuardedMemory(REGIONS)
    mock = MockSplitQueue(gm.memory, SIZE, desc_table=DESC, avail_ring=AVAIL, used_ring=USED)
    # The indirect table: entries link to the next one while NEXT is set.
    for i, (a, n, f) in enumerate(ring.indirect):
        gm.memory.write(
            TABLE + 16 * i, struct.pack("<QIHH", a, n, f & ~VIRTQ_DESC_F_INDIRECT & 0xFFFF, i + 1)
        )
    avail: list[int] = []
    index = 0
    for pos, chain in enumerate(ring.chains):
        if pos in ring.bad_heads:
            avail.append(SIZE + 3)
        descs = []
        for j, (addr, length, flags) in enumerate(chain):
            if flags & VIRTQ_DESC_F_INDIRECT:
                descs.append(RawDesc(TABLE, 16 * len(ring.indirect), flags, index + j + 1))
            else:
                descs.append(RawDesc(addr, length, flags, index + j + 1))
        mock.write_descs(index, descs)
        avail.append(index)
        index += len(chain)
    if len(ring.chains) in ring.bad_heads:
        avail.append(SIZE + 3)
    mock.publish(avail)
    return gm, mock, avail


def _model(
    memory: GuestMemory, avail: list[int], source: bytes, max_chains: int
) -> tuple[list[tuple[int, int]], list[tuple[int, bytes]], int | None]:
    """Serve one request at a time: (used entries, (address, bytes) written in
    order, the head returned to the caller or None)."""
    used: list[tuple[int, int]] = []
    writes: list[tuple[int, bytes]] = []
    pos = 0
    for head in avail:
        if 0 <= max_chains <= len(used):
            return used, writes, None
        if head >= SIZE:
            return used, writes, None  # left in the ring for pop_chain
        try:
            descs = RefChain(memory, DESC, SIZE, head).descriptors()
        except Exception:  # any malformed chain is the caller's
            return used, writes, head
        if (
            len(descs) != 1
            or not descs[0].flags & VIRTQ_DESC_F_WRITE
            or not _mapped(descs[0].addr, descs[0].len)
        ):
            return used, writes, head
        d = descs[0]
        take = min(d.len, len(source) - pos)
        if d.len and not take:
            return used, writes, head  # end of file: the caller decides
        writes.append((d.addr, source[pos : pos + take]))
        pos += take
        used.append((head, take))
    return used, writes, None


@given(rings())
def test_fill_from_fd_matches_one_read_per_request(ring: Ring) -> None:
    gm, mock, avail = _build(ring)
    # Buffers of eligible chains never reach into the ring area (see the docstring).
    source = SOURCE[: ring.source_len]
    used, writes, returned = _model(gm.memory, avail, source, ring.max_chains)
    before = gm.snapshot()
    q = mock.create_queue()
    with tempfile.TemporaryFile() as f:
        f.write(source)
        f.flush()
        fd = os.dup(f.fileno())
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        served, nbytes, chain = q.fill_from_fd(fd, ring.max_chains)
    finally:
        os.close(fd)
    event(f"served {min(served, 3)}{'+' if served > 3 else ''}, returned {'a chain' if chain else 'none'}")
    assert (served, nbytes) == (len(used), sum(n for _, n in used))
    assert mock.used_elems() == used
    assert (chain.head_index if chain is not None else None) == returned
    # The same buffer may take part in several requests: the last write stands.
    final: dict[int, int] = {}
    for addr, data in writes:
        for i, b in enumerate(data):
            final[addr + i] = b
    for addr, byte in final.items():
        assert gm.memory.read(addr, 1)[0] == byte
    allowed = [(a, len(d)) for a, d in writes] + [(USED, 4 + 8 * SIZE + 2)]
    gm.assert_unchanged_except(before, allowed)


def test_fill_from_fd_request_pointing_at_its_own_ring_is_safe() -> None:
    """A hostile guest points requests at the descriptor table and the avail ring:
    the bytes land there (it is the guest's own memory), nothing outside the
    guest's memory is written and the call returns."""
    gm = GuardedMemory(REGIONS)
    mock = MockSplitQueue(gm.memory, SIZE, desc_table=DESC, avail_ring=AVAIL, used_ring=USED)
    heads = [mock.add_chain([RawDesc(addr, 0x80, VIRTQ_DESC_F_WRITE, 0)]) for addr in (DESC, AVAIL, 0x1100)]
    q = mock.create_queue()
    r, w = os.pipe()
    try:
        os.write(w, bytes(range(256)) * 2)
        os.set_blocking(r, False)
        # The bytes written over the avail ring may make its index absurd, which
        # the next look at it reports (the caller stops the ring).
        with contextlib.suppress(InvalidAvailRingIndex):
            q.fill_from_fd(r)
    finally:
        os.close(r)
        os.close(w)
    assert len(heads) == 3
    assert gm.memory.read(DESC, 16) == bytes(range(16))  # the first request was filled
    gm.check_guards()
