"""Property tests: the compiled queue against the RefQueue oracle, Reader/Writer against
a byte-stream model, translation against PyGuestMemory.

Hostile rings are generated at random (cycles, out-of-range ``next``, nested or
malformed indirect tables, huge lengths, random flags, avail->idx far ahead).  The
compiled Queue runs on one copy of guest memory and RefQueue on an identical copy;
both must pop the same chains, see the same descriptors, raise the same error class
and leave byte-for-byte the same memory behind (used ring, event fields, written
buffers) — which also proves nothing outside a write-only buffer was written, since
the model only writes there.  Guard bytes around each region must stay intact.

Example counts come from the hypothesis profile in tests/conftest.py ("ci"/"dev").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from hypothesis import event, given
from hypothesis import strategies as st

from virtio_queue import DescriptorChainOverflow, GuestMemory, GuestRegion, VirtioError
from virtio_queue.testing import (
    VIRTQ_DESC_F_WRITE,
    GuardedMemory,
    MockSplitQueue,
    PyGuestMemory,
    RawDesc,
)

# Guest layout shared by every example (queue sizes up to 16).
REGIONS = [(0x0, 0x4000), (0x10000, 0x2000)]
DESC, AVAIL, USED = 0x0, 0x100, 0x200
TABLES = [0x400, 0x600]  # two indirect tables (room for 32 entries each)
TABLE_ENTRIES = 8
U64 = (1 << 64) - 1

_addr = st.one_of(
    st.integers(0x1000, 0x3FFF),  # region 0 (may run past its end)
    st.integers(0x10000, 0x11FFF),  # region 1
    st.sampled_from([0x0, 0x100, 0x3FF0, 0x4000, 0x8000, 0xFFFF, 0x11FF8, 0x12000, U64 - 7, U64]),
    st.sampled_from([*TABLES, 0x408, 0x3FF8]),  # indirect tables, aligned or not
    st.integers(0, U64),
)
_len = st.one_of(
    st.integers(0, 64),
    st.sampled_from([0, 8, 16, 24, 32, 48, 64, 128, 0x1000, 0x2000, 0x80000000, 0xFFFFFFFF]),
    st.integers(0, 0xFFFFFFFF),
)
# Mostly NEXT/WRITE (so that many chains are walkable), INDIRECT less often, any u16 rarely.
_flags = st.one_of(
    st.sampled_from([0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]),
    st.sampled_from([0, 1, 2, 3]),
    st.integers(0, 0xFFFF),
)


def _desc(n_next: int) -> st.SearchStrategy[RawDesc]:
    nxt = st.one_of(st.integers(0, n_next), st.integers(0, n_next), st.integers(0, 0xFFFF))
    return st.builds(RawDesc, _addr, _len, _flags, nxt)


@dataclass
class Ring:
    size: int
    table: list[RawDesc]
    indirect: list[list[RawDesc]]
    heads: list[int]
    next_avail: int
    pending: int
    next_used: int
    event_idx: bool
    used_event: int
    avail_flags: int
    notify_after: list[bool]


MUTATIONS = ["none", "cycle", "next_oob", "indirect_next", "nested", "bad_len", "huge", "unmapped"]


@st.composite
def structured_rings(draw: st.DrawFn) -> Ring:
    """Well-formed chains (direct and indirect) with at most one targeted defect."""
    size = draw(st.sampled_from([4, 8, 16]))
    table = [RawDesc(0x1000, 0) for _ in range(size)]
    indirect = [[RawDesc(0x1000, 0) for _ in range(TABLE_ENTRIES)] for _ in TABLES]
    heads: list[int] = []
    free, buf = 0, 0x1000
    chain_descs: list[tuple[list[RawDesc], int, int | None]] = []  # (table, base idx, table no)
    for t in range(draw(st.integers(1, 3))):
        n = draw(st.integers(1, 4))
        n_read = draw(st.integers(0, n))
        descs = []
        for k in range(n):
            length = draw(st.integers(0, 48))
            descs.append(RawDesc(buf, length, 0 if k < n_read else VIRTQ_DESC_F_WRITE))
            buf += length + 8
        use_table = t < len(TABLES) and draw(st.booleans())
        if use_table:
            linked = [d._replace(flags=d.flags | 1, next=k + 1) for k, d in enumerate(descs[:-1])]
            indirect[t][:n] = [*linked, descs[-1]]
            if free >= size:
                break
            table[free] = RawDesc(TABLES[t], 16 * n, 4, 0)
            heads.append(free)
            chain_descs.append((indirect[t], 0, t))
            free += 1
        else:
            if free + n > size:
                break
            linked = [d._replace(flags=d.flags | 1, next=free + k + 1) for k, d in enumerate(descs[:-1])]
            table[free : free + n] = [*linked, descs[-1]]
            heads.append(free)
            chain_descs.append((table, free, None))
            free += n
    # One defect in one chain.
    mutation = draw(st.sampled_from(MUTATIONS))
    if chain_descs and mutation != "none":
        tbl, base, tno = draw(st.sampled_from(chain_descs))
        last = base
        while tbl[last].flags & 1:
            last = tbl[last].next
        limit = TABLE_ENTRIES if tno is not None else size
        if mutation == "cycle":
            tbl[last] = tbl[last]._replace(flags=tbl[last].flags | 1, next=base)
        elif mutation == "next_oob":
            tbl[last] = tbl[last]._replace(flags=tbl[last].flags | 1, next=limit + draw(st.integers(0, 3)))
        elif mutation == "indirect_next" and tno is not None:
            table[heads[chain_descs.index((tbl, base, tno))]] = RawDesc(TABLES[tno], 16, 4 | 1, 0)
        elif mutation == "nested":
            tbl[last] = RawDesc(TABLES[1 - (tno or 0)], 16, 4, 0)
        elif mutation == "bad_len" and tno is not None:
            table[heads[chain_descs.index((tbl, base, tno))]] = RawDesc(
                TABLES[tno], draw(st.sampled_from([0, 8, 24, 16 * 65537])), 4, 0
            )
        elif mutation == "huge":
            tbl[last] = tbl[last]._replace(len=0xFFFFFFFF)
            tbl[base] = tbl[base]._replace(len=0xFFFFFFFF)
        elif mutation == "unmapped":
            tbl[last] = tbl[last]._replace(addr=draw(st.sampled_from([0x8000, 0x3FFC, U64 - 2])), len=8)
    next_avail = draw(st.one_of(st.just(0), st.integers(0, 0xFFFF)))
    return Ring(
        size=size,
        table=table,
        indirect=indirect,
        heads=heads + [0] * (size - len(heads)),
        next_avail=next_avail,
        pending=len(heads),
        next_used=draw(st.one_of(st.just(0), st.just(next_avail), st.integers(0, 0xFFFF))),
        event_idx=draw(st.booleans()),
        used_event=draw(st.integers(0, 0xFFFF)),
        avail_flags=draw(st.integers(0, 1)),
        notify_after=draw(st.lists(st.booleans(), min_size=size + 2, max_size=size + 2)),
    )


@st.composite
def random_rings(draw: st.DrawFn) -> Ring:
    size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    table = draw(st.lists(_desc(size + 1), min_size=size, max_size=size))
    indirect = [
        draw(st.lists(_desc(TABLE_ENTRIES + 1), min_size=TABLE_ENTRIES, max_size=TABLE_ENTRIES))
        for _ in TABLES
    ]
    heads = draw(
        st.lists(st.one_of(st.integers(0, size - 1), st.integers(0, 0xFFFF)), min_size=size, max_size=size)
    )
    pending = draw(st.one_of(st.integers(0, size), st.integers(0, size), st.integers(0, 0xFFFF)))
    return Ring(
        size=size,
        table=table,
        indirect=indirect,
        heads=heads,
        next_avail=draw(st.one_of(st.just(0), st.integers(0, 0xFFFF))),
        pending=pending,
        next_used=draw(st.one_of(st.just(0), st.integers(0, 0xFFFF))),
        event_idx=draw(st.booleans()),
        used_event=draw(st.integers(0, 0xFFFF)),
        avail_flags=draw(st.integers(0, 1)),
        notify_after=draw(st.lists(st.booleans(), min_size=size + 2, max_size=size + 2)),
    )


def _lay_out(gm: GuardedMemory, ring: Ring) -> MockSplitQueue:
    mem = gm.memory
    mock = MockSplitQueue(mem, ring.size, desc_table=DESC, avail_ring=AVAIL, used_ring=USED)
    mock.write_descs(0, ring.table)
    for addr, entries in zip(TABLES, ring.indirect, strict=True):
        mock.write_descs(0, entries, table=addr)
    for k, head in enumerate(ring.heads):
        mock.set_avail_entry(ring.next_avail + k, head)
    mock.set_avail_idx(ring.next_avail + ring.pending)
    mock.set_avail_flags(ring.avail_flags)
    mock.set_used_event(ring.used_event)
    mem.write_u16(USED + 2, ring.next_used)
    return mock


def _configure(q: Any, ring: Ring) -> Any:
    q.set_next_avail(ring.next_avail)
    q.set_next_used(ring.next_used)
    return q


def _outcome(fn: Any) -> tuple[str, Any]:
    """('ok', value) or ('err', exception class); only VirtioErrors are expected."""
    try:
        return "ok", fn()
    except VirtioError as e:
        return "err", type(e)


_PATTERN = bytes(range(256)) * 64


def _pattern(head: int, n: int) -> bytes:
    return _PATTERN[head & 0xFF : (head & 0xFF) + n]


@given(st.one_of(random_rings(), structured_rings()))
def test_queue_matches_reference_model_on_random_rings(ring: Ring) -> None:
    core_gm = GuardedMemory(REGIONS, guard=64)
    ref_gm = GuardedMemory(REGIONS, guard=64, backend="python")
    core_q = _configure(_lay_out(core_gm, ring).create_queue(event_idx=ring.event_idx), ring)
    ref_q = _configure(_lay_out(ref_gm, ring).create_ref_queue(event_idx=ring.event_idx), ring)
    assert core_gm.buffer == ref_gm.buffer

    for step in range(ring.size + 2):
        got = _outcome(core_q.pop_chain)
        want = _outcome(ref_q.pop_chain)
        assert (got[0], got[1] if got[0] == "err" else got[1] is None) == (
            want[0],
            want[1] if want[0] == "err" else want[1] is None,
        ), (step, got, want)
        assert core_q.next_avail() == ref_q.next_avail()
        if got[0] == "err" or got[1] is None:
            if got[1] is None or got[1].__name__ == "InvalidAvailRingIndex":
                break
            continue
        chain, ref_chain = got[1], want[1]
        assert chain.head_index == ref_chain.head_index

        # Same descriptors, or the same error.
        d_core = _outcome(lambda c=chain: [(d.addr, d.len, d.flags, d.next) for d in c.descriptors()])
        d_ref = _outcome(lambda c=ref_chain: [tuple(d) for d in c.descriptors()])
        event(f"walk: {d_core[1].__name__ if d_core[0] == 'err' else 'ok'}")
        assert d_core == d_ref
        # The same verdict on descriptor order (§2.7.4.2).
        assert _outcome(chain.check_order) == _outcome(ref_chain.check_order)

        # The Reader sees the model's byte stream; the Writer fills the model's buffers.
        r_core = _outcome(lambda c=chain: c.reader().read())
        r_ref = _outcome(ref_chain.read_all)
        assert r_core == r_ref
        w_core = _outcome(chain.writer)
        w_ref = _outcome(ref_chain.writable_buffers)
        assert w_core[0] == w_ref[0]
        written = 0
        if w_core[0] == "err":
            assert w_core[1] == w_ref[1]
        else:
            writer, bufs = w_core[1], w_ref[1]
            total = sum(n for _, n in bufs)
            assert writer.available_bytes() == total
            data = _pattern(chain.head_index, min(total, 0x3000))
            event(f"writer bytes > 0: {bool(data)}")
            written = writer.write(data)
            assert written == len(data)
            off = 0
            for gpa, n in bufs:  # the model of Writer.write
                take = min(n, len(data) - off)
                if take <= 0:
                    break
                ref_gm.memory.write(gpa, data[off : off + take])
                off += take

        core_q.add_used(chain.head_index, written)
        ref_q.add_used(ref_chain.head_index, written)
        if ring.notify_after[step]:
            assert core_q.needs_notification() == ref_q.needs_notification()
        core_gm.check_guards()
        assert core_gm.buffer == ref_gm.buffer, "memory differs after a chain"

    assert core_q.needs_notification() == ref_q.needs_notification()
    core_q.disable_notification()
    ref_q.disable_notification()
    assert core_q.enable_notification() == ref_q.enable_notification()
    assert core_q.used_idx() == ref_q.used_idx()
    assert core_q.next_used() == ref_q.next_used()
    core_gm.check_guards()
    assert core_gm.buffer == ref_gm.buffer


# -- Reader / Writer against a byte-stream model ---------------------------------------------

_seg_lens = st.lists(st.integers(0, 40), min_size=1, max_size=8)
_rops = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["read", "consume", "exact", "readinto", "buffers"]), st.integers(-1, 60)),
        st.tuples(st.just("obj"), st.sampled_from(["B", "H", "I", "Q", "QIHH", "3s"])),
        st.tuples(st.just("split"), st.integers(0, 80)),
    ),
    max_size=12,
)


def _chain_over(lens: list[int], write: bool) -> tuple[Any, GuardedMemory, list[tuple[int, int]]]:
    gm = GuardedMemory([(0, 0x4000)], guard=64)
    mock = MockSplitQueue(gm.memory, 16)
    segs = []
    gpa = 0x1000
    for n in lens:
        segs.append((gpa, n))
        gpa += n + 8
    descs = [(g, n, VIRTQ_DESC_F_WRITE if write else 0) for g, n in segs]
    if len(descs) <= 16:
        mock.add_chain(descs)
    else:  # pragma: no cover - lens are capped at 8
        mock.add_indirect_chain(descs)
    chain = mock.create_queue().pop_chain()
    assert chain is not None
    return chain, gm, segs


@given(_seg_lens, _rops, st.binary(min_size=0x200, max_size=0x200))
def test_reader_matches_byte_stream_model(lens: list[int], ops: list[tuple[str, Any]], blob: bytes) -> None:
    chain, gm, segs = _chain_over(lens, write=False)
    stream = bytearray()
    for gpa, n in segs:
        piece = blob[len(stream) : len(stream) + n]
        gm.memory.write(gpa, piece)
        stream += piece
    before = gm.snapshot()
    r = chain.reader()
    pos, end = 0, len(stream)  # the model: stream[pos:end] is what is left
    tails: list[tuple[Any, bytes]] = []
    for op, arg in ops:
        left = end - pos
        if op == "read":
            want = left if arg < 0 else min(arg, left)
            assert r.read(arg) == stream[pos : pos + want]
            pos += want
        elif op == "consume":
            if arg < 0:
                continue
            assert r.consume(arg) == min(arg, left)
            pos += min(arg, left)
        elif op == "readinto":
            buf = bytearray(max(arg, 0))
            got = r.readinto(buf)
            assert got == min(len(buf), left) and buf[:got] == stream[pos : pos + got]
            pos += got
        elif op == "exact":
            buf = bytearray(max(arg, 0))
            if len(buf) > left:
                try:
                    r.read_exact_into(buf)
                except DescriptorChainOverflow:
                    pass
                else:
                    raise AssertionError("read_exact_into past the end did not raise")
            else:
                r.read_exact_into(buf)
                assert buf == stream[pos : pos + len(buf)]
                pos += len(buf)
        elif op == "buffers":
            views = r.buffers(arg)
            want = left if arg < 0 else min(arg, left)
            assert b"".join(bytes(v) for v in views) == stream[pos : pos + want]
            assert all(len(v) > 0 for v in views)
        elif op == "obj":
            size = struct.calcsize("<" + arg)
            if size > left:
                try:
                    r.read_obj(arg)
                except DescriptorChainOverflow:
                    pass
                else:
                    raise AssertionError("read_obj past the end did not raise")
            else:
                assert r.read_obj(arg) == struct.unpack("<" + arg, stream[pos : pos + size])
                pos += size
        elif op == "split":
            if arg > left:
                try:
                    r.split_at(arg)
                except DescriptorChainOverflow:
                    pass
                else:
                    raise AssertionError("split_at past the end did not raise")
            else:
                tails.append((r.split_at(arg), bytes(stream[pos + arg : end])))
                end = pos + arg
        assert r.available_bytes() == end - pos
    assert r.read() == stream[pos:end]
    for tail, want_bytes in tails:
        assert tail.read() == want_bytes
    assert gm.snapshot() == before  # a Reader never writes


_wops = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["write", "write_all"]), st.binary(max_size=50)),
        st.tuples(st.just("consume"), st.integers(0, 50)),
        st.tuples(st.just("split"), st.integers(0, 80)),
        st.tuples(st.just("obj"), st.integers(0, U64)),
    ),
    max_size=12,
)


@given(_seg_lens, _wops)
def test_writer_matches_byte_stream_model(lens: list[int], ops: list[tuple[str, Any]]) -> None:
    chain, gm, segs = _chain_over(lens, write=True)
    before = gm.snapshot()
    w = chain.writer()
    total = sum(lens)
    model = bytearray(total)  # zero-filled, like the guest buffers
    pos, end = 0, total
    tails: list[tuple[Any, int, int]] = []
    for op, arg in ops:
        left = end - pos
        if op == "write":
            n = min(len(arg), left)
            assert w.write(arg) == n
            model[pos : pos + n] = arg[:n]
            pos += n
        elif op in ("write_all", "obj"):
            data = arg if op == "write_all" else struct.pack("<Q", arg)
            if len(data) > left:
                try:
                    if op == "obj":
                        w.write_obj("Q", arg)
                    else:
                        w.write_all(data)
                except DescriptorChainOverflow:
                    pass
                else:
                    raise AssertionError("an oversized write_all did not raise")
            else:
                if op == "obj":
                    w.write_obj("Q", arg)
                else:
                    w.write_all(data)
                model[pos : pos + len(data)] = data
                pos += len(data)
        elif op == "consume":
            assert w.consume(arg) == min(arg, left)
            pos += min(arg, left)
        elif op == "split":
            if arg > left:
                try:
                    w.split_at(arg)
                except DescriptorChainOverflow:
                    pass
                else:
                    raise AssertionError("split_at past the end did not raise")
            else:
                tails.append((w.split_at(arg), pos + arg, end))
                end = pos + arg
        assert w.available_bytes() == end - pos
    for tail, start, stop in tails:
        data = bytes((i * 13 + 1) & 0xFF or 1 for i in range(stop - start))
        tail.write_all(data)
        model[start:stop] = data
    got = b"".join(gm.memory.read(g, n) for g, n in segs)
    assert got == model
    gm.assert_unchanged_except(before, segs)


# -- translation against the pure-Python stand-in ---------------------------------------------


@st.composite
def layouts(draw: st.DrawFn) -> list[tuple[int, int]]:
    starts = sorted(
        draw(st.lists(st.integers(0, 64), min_size=1, max_size=4, unique=True)),
    )
    out = []
    top = draw(st.sampled_from([0, (1 << 64) - (65 << 12)]))
    for k, s in enumerate(starts):
        limit = (starts[k + 1] - s) if k + 1 < len(starts) else 1
        pages = draw(st.integers(1, max(limit, 1)))
        out.append((top + (s << 12), pages << 12))
    return out


@given(layouts(), st.lists(st.tuples(st.integers(0, U64), st.integers(0, 0x3000)), max_size=20), st.data())
def test_translation_matches_python_model(
    layout: list[tuple[int, int]], probes: list[tuple[int, int]], data: st.DataObject
) -> None:
    bufs = [bytearray(n) for _, n in layout]
    core = GuestMemory([GuestRegion.from_buffer(b, g) for (g, _), b in zip(layout, bufs, strict=True)])
    py = PyGuestMemory([(g, b) for (g, _), b in zip(layout, bufs, strict=True)])
    near = [
        (g + data.draw(st.integers(-8, n + 8)), data.draw(st.integers(0, 32)))
        for g, n in layout
        for _ in range(3)
    ]
    for gpa, n in probes + near:
        if not 0 <= gpa <= U64:
            continue
        # Mapped: every byte in some region (adjacent regions join, VIRTIO 1.2 §2.7).
        mapped = gpa + n <= U64 + 1 and all(
            any(g <= b < g + size for g, size in layout) for b in range(gpa, gpa + max(n, 1))
        )
        assert core.check_range(gpa, n) == mapped, (gpa, n)
        if mapped:
            core.write(gpa, bytes([gpa & 0xFF]) * n)
            assert core.read(gpa, n) == bytes([gpa & 0xFF]) * n
        if py.check_range(gpa, n):
            assert py.read(gpa, n) == bytes([gpa & 0xFF]) * n
