"""Guest memory made of several regions: buffers, descriptor tables, indirect tables and
rings that run from one region into the next one (adjacent in guest-physical memory).

VIRTIO 1.2 §2.7 and §2.7.5 give the driver guest-physical addresses only: it cannot know
how the VMM split its RAM into regions, so any of these may cross a boundary.  A gap
(unmapped guest-physical space) anywhere in a range is still refused, naming the first
unmapped address.
"""

from __future__ import annotations

import itertools
import os
import re
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtio_queue import (
    ByteSource,
    GuestMemory,
    GuestMemoryError,
    GuestRegion,
    InvalidQueueConfig,
)
from virtio_queue.testing import VIRTQ_DESC_F_INDIRECT as INDIRECT
from virtio_queue.testing import VIRTQ_DESC_F_NEXT as NEXT
from virtio_queue.testing import VIRTQ_DESC_F_WRITE as WRITE
from virtio_queue.testing import GuardedMemory, MockSplitQueue, RawDesc

QSIZE = 16
DESC, AVAIL, USED = 0x0, 0x100, 0x140  # rings end at 0x1C6
DATA = 0x200
SIZE = 0x4000


def _layout(cuts: list[int], gaps: frozenset[int] = frozenset()) -> list[tuple[int, int]]:
    """Regions ``[0, SIZE)`` cut at ``cuts``; the pieces whose index is in ``gaps`` left out."""
    edges = [0, *sorted(set(cuts)), SIZE]
    return [(a, b - a) for k, (a, b) in enumerate(itertools.pairwise(edges)) if k not in gaps]


def _mapped_upto(layout: list[tuple[int, int]], gpa: int, length: int) -> int | None:
    """The model: None if every byte of the range is mapped, else the first unmapped one."""
    for b in range(gpa, gpa + max(length, 1)):
        if not any(g <= b < g + n for g, n in layout):
            return b
    return None


# -- GuestMemory copies -------------------------------------------------------------------


def test_memory_copies_run_over_many_adjacent_regions() -> None:
    gm = GuardedMemory([(0x1000 * k, 0x1000) for k in range(8)])
    data = bytes((i * 31 + 7) & 0xFF for i in range(0x5000))
    gm.memory.write(0x0FF0, data)
    assert gm.memory.read(0x0FF0, len(data)) == data
    buf = bytearray(0x3000)
    gm.memory.readinto(0x1800, buf)
    assert bytes(buf) == data[0x810 : 0x810 + 0x3000]
    gm.check_guards()


def test_memory_scalars_straddling_a_boundary_are_read_and_written() -> None:
    gm = GuardedMemory([(0, 0x1000), (0x1000, 0x1000)])
    gm.memory.write_u64(0xFFC, 0x1122334455667788)
    assert gm.memory.read_u64(0xFFC) == 0x1122334455667788
    assert gm.memory.read(0xFFC, 4) + gm.memory.read(0x1000, 4) == struct.pack("<Q", 0x1122334455667788)
    assert gm.memory.read_u32(0xFFE) == 0x33445566
    gm.memory.write_u16(0xFFF, 0xBEEF)
    assert gm.memory.read_u8(0xFFF) == 0xEF and gm.memory.read_u8(0x1000) == 0xBE
    gm.memory.write_obj(0xFF8, "IQ", 7, 9)
    assert gm.memory.read_obj(0xFF8, "IQ") == (7, 9)
    gm.check_guards()


def test_memory_range_over_a_gap_names_the_first_unmapped_address() -> None:
    gm = GuardedMemory([(0, 0x1000), (0x2000, 0x1000)])
    before = gm.snapshot()
    with pytest.raises(GuestMemoryError, match=r"\[0xff0, \+0x20\) crosses a gap at 0x1000"):
        gm.memory.write(0xFF0, b"x" * 0x20)
    with pytest.raises(GuestMemoryError, match=r"\[0x1800, \+0x10\) is not mapped at 0x1800"):
        gm.memory.read(0x1800, 0x10)
    with pytest.raises(GuestMemoryError, match="crosses a gap at 0x1000"):
        gm.memory.check_access(0x800, 0x1000)
    assert not gm.memory.check_range(0xFF0, 0x20)
    gm.assert_unchanged_except(before, [])  # all or nothing: no partial write
    gm.check_guards()


def test_memory_write_into_a_read_only_region_names_it_and_writes_nothing() -> None:
    ro = bytes(0x1000)
    rw = bytearray(0x1000)
    mem = GuestMemory([GuestRegion.from_buffer(rw, 0), GuestRegion.from_buffer(ro, 0x1000)])
    with pytest.raises(GuestMemoryError, match="is read-only at 0x1000"):
        mem.write(0xFF0, b"y" * 0x20)
    assert rw == bytearray(0x1000) and ro == bytes(0x1000)
    assert mem.read(0xFF0, 0x20) == bytes(0x20)


# -- queues whose parts cross regions --------------------------------------------------------


def _queue(layout: list[tuple[int, int]]) -> tuple[GuardedMemory, MockSplitQueue]:
    gm = GuardedMemory(layout)
    mock = MockSplitQueue(gm.memory, QSIZE, desc_table=DESC, avail_ring=AVAIL, used_ring=USED, data_addr=DATA)
    return gm, mock


@pytest.mark.parametrize(
    "cuts",
    [
        [0x80],  # inside the descriptor table, between descriptors
        [0x88],  # inside descriptor 8 (tables are copied piece by piece)
        [0x104],  # inside the avail ring, at a u16 boundary
        [0x150],  # inside the used ring, at a u32 boundary
        [0x40, 0x108, 0x14C, 0x180],  # all three, many regions
        list(range(0x10, 0x1C0, 0x10)),  # a region every 16 bytes
    ],
)
def test_queue_rings_and_table_over_regions_serve_chains(cuts: list[int]) -> None:
    """Tables and rings over adjacent regions behave as in one region (VIRTIO 1.2 §2.7):
    the same descriptors, bytes and used entries; nothing outside the written buffers
    and the used ring changes."""
    gm, mock = _queue(_layout(cuts))
    q = mock.create_queue(event_idx=True)
    q.validate()
    mock.memory.write(0x1000, b"request!")
    heads = [mock.add_chain([(0x1000, 8, 0), (0x2000, 16, WRITE)]) for _ in range(QSIZE // 2)]
    before = gm.snapshot()
    for k, head in enumerate(heads):
        chain = q.pop_chain()
        assert chain is not None and chain.head_index == head
        assert [(d.addr, d.len, d.flags & WRITE) for d in chain.descriptors()] == [
            (0x1000, 8, 0),
            (0x2000, 16, WRITE),
        ]
        assert chain.reader().read() == b"request!"
        w = chain.writer()
        w.write_all(bytes([k]) * 16)
        q.add_used(head, w.bytes_written())
    assert q.pop_chain() is None
    assert mock.used_elems() == [(h, 16) for h in heads]
    assert q.needs_notification()
    q.enable_notification()
    assert mock.memory.read_u16(USED + 4 + 8 * QSIZE) == q.next_avail()  # avail_event
    gm.assert_unchanged_except(before, [(0x2000, 16), (USED, 6 + 8 * QSIZE)])
    gm.check_guards()


def test_queue_indirect_table_over_regions_is_walked() -> None:
    """An indirect table (VIRTIO 1.2 §2.7.5.3) that runs into the next region, with a
    descriptor split by the boundary, is read as in one region."""
    gm, mock = _queue([(0, 0x1008), (0x1008, SIZE - 0x1008)])
    mock.alloc(0x1000 - DATA - 0x10)  # the table starts at 0xFF0: entry 1 straddles 0x1008
    q = mock.create_queue()
    descs = [RawDesc(0x2000 + 0x100 * i, 0x10, WRITE, 0) for i in range(4)]
    head = mock.add_indirect_chain(descs)
    table = mock.read_desc(head).addr
    assert table < 0x1008 < table + 0x40
    chain = q.pop_chain()
    assert chain is not None
    assert [(d.addr, d.len) for d in chain] == [(d.addr, d.len) for d in descs]
    w = chain.writer()
    assert w.available_bytes() == 0x40 and w.write(b"z" * 0x40) == 0x40
    gm.check_guards()


def test_queue_indirect_table_over_a_gap_is_refused() -> None:
    """An indirect table that runs into unmapped space: GuestMemoryError naming the
    gap (VIRTIO 1.2 §2.7.5.3: the table is in guest memory), nothing written."""
    gm, mock = _queue([(0, 0x1000), (0x1100, SIZE - 0x1100)])
    q = mock.create_queue()
    mock.write_descs(0, [RawDesc(0x2000, 0x10, WRITE | NEXT, 1)] * 2, table=0xFE0)  # what is mapped
    mock.write_desc(0, RawDesc(0xFE0, 0x40, INDIRECT, 0))
    mock.add_avail(0)
    chain = q.pop_chain()
    assert chain is not None
    before = gm.snapshot()
    with pytest.raises(GuestMemoryError, match=r"indirect table \[0xfe0, \+0x40\) crosses a gap at 0x1000"):
        chain.writer()
    gm.assert_unchanged_except(before, [])


@pytest.mark.parametrize(
    ("cuts", "gaps", "message"),
    [
        (
            [0x101],
            frozenset(),
            r"available ring \[0x100, \+0x26\) has a region boundary inside a field at 0x101",
        ),
        ([0x142], frozenset(), r"used ring \[0x140, \+0x86\) has a region boundary inside a field at 0x142"),
        ([0x80, 0x90], frozenset({1}), r"descriptor table \[0x0, \+0x100\) crosses a gap at 0x80"),
        ([0x150, 0x160], frozenset({1}), r"used ring \[0x140, \+0x86\) crosses a gap at 0x150"),
    ],
)
def test_queue_ring_split_inside_a_field_or_over_a_gap_is_refused(
    cuts: list[int], gaps: frozenset[int], message: str
) -> None:
    """A ring field is loaded or stored in one access (VIRTIO 1.2 §2.7.13.3 orders
    those accesses), so a boundary inside one is refused, and so is a gap."""
    _, mock = _queue(_layout(cuts, gaps))
    q = mock.create_queue()
    with pytest.raises(InvalidQueueConfig, match=message):
        q.validate()
    assert not q.is_valid()


def test_queue_leaves_split_mode_when_memory_changes() -> None:
    """Rings re-translated after a memory change: over regions, then in one."""
    gm, mock = _queue(_layout([0x104]))
    q = mock.create_queue()
    mock.add_chain([(0x2000, 4, WRITE)])
    chain = q.pop_chain()
    assert chain is not None
    q.add_used(chain.head_index, 0)
    whole = GuardedMemory([(0, SIZE)])
    whole.memory.write(0, gm.memory.read(0, SIZE))
    q.memory = whole.memory
    mock.memory = whole.memory
    mock.add_chain([(0x2000, 4, WRITE)])
    chain = q.pop_chain()
    assert chain is not None
    q.add_used(chain.head_index, 4)
    assert mock.read_used(0) == [(0, 0), (1, 4)]


# -- property: any layout of adjacent regions serves the same chains as one region ---------


@st.composite
def _chain_specs(draw: st.DrawFn) -> list[tuple[bool, list[tuple[int, int, int]]]]:
    out = []
    for _ in range(draw(st.integers(1, 6))):
        n = draw(st.integers(1, 4))
        descs = []
        for _ in range(n):
            gpa = draw(st.integers(0x1000, SIZE - 0x200))
            length = draw(st.integers(0, 0x1F0))
            descs.append((gpa, length, draw(st.sampled_from([0, WRITE]))))
        out.append((draw(st.booleans()), descs))
    return out


def _ring_cuts() -> st.SearchStrategy[list[int]]:
    # Cuts in the rings on 4-byte boundaries (fields stay whole), anywhere after them.
    return st.lists(
        st.one_of(st.integers(1, 0x1C0 // 4).map(lambda k: 4 * k), st.integers(0x1C8, SIZE - 1)),
        max_size=12,
    )


def _serve(mock: MockSplitQueue, specs: list[tuple[bool, list[tuple[int, int, int]]]]) -> list[object]:
    q = mock.create_queue()
    seen: list[object] = []
    for indirect, descs in specs:
        if indirect:
            mock.add_indirect_chain(descs)
        else:
            mock.add_chain(descs)
        chain = q.pop_chain()
        assert chain is not None
        seen.append([(d.addr, d.len, d.flags) for d in chain.descriptors()])
        seen.append(chain.reader().read())
        w = chain.writer()
        n = w.available_bytes()
        w.write(bytes((chain.head_index * 7 + i) & 0xFF for i in range(n)))
        q.add_used(chain.head_index, n)
    seen.append(mock.used_elems())
    return seen


@given(_ring_cuts(), _chain_specs())
def test_chains_over_any_adjacent_layout_match_one_region(
    cuts: list[int], specs: list[tuple[bool, list[tuple[int, int, int]]]]
) -> None:
    """Property: the same driver actions on one region and on the same memory cut into
    adjacent regions give the same descriptors, bytes read, used entries and final
    memory, and no guard byte around any region changes."""
    one, mock1 = _queue([(0, SIZE)])
    many, mock2 = _queue(_layout(cuts))
    pattern = bytes((i * 13 + 5) & 0xFF for i in range(SIZE - 0x1000))
    one.memory.write(0x1000, pattern)
    many.memory.write(0x1000, pattern)
    assert _serve(mock2, specs) == _serve(mock1, specs)
    assert many.memory.read(0, SIZE) == one.memory.read(0, SIZE)
    many.check_guards()


@given(
    _ring_cuts(),
    st.frozensets(st.integers(1, 8), max_size=3),
    st.integers(0x200, SIZE - 1),
    st.integers(1, 0x1800),
    st.booleans(),
)
def test_buffer_over_layouts_with_gaps_is_served_or_refused_by_the_model(
    cuts: list[int], gaps: frozenset[int], gpa: int, length: int, write: bool
) -> None:
    """Property: a one-buffer chain over a layout with gaps (the rings kept mapped) is
    served in full when every byte of the buffer is mapped, else refused with
    GuestMemoryError naming the first unmapped address, "not mapped at" when the
    buffer starts there and "crosses a gap at" otherwise; nothing outside the buffer
    is written either way (VIRTIO 1.2 §2.7.5.1)."""
    layout = [(g, n) for g, n in _layout([*cuts, 0x200]) if g < 0x200] + [
        r for k, r in enumerate(_layout([*cuts, 0x200])) if r[0] >= 0x200 and k not in gaps
    ]
    gm, mock = _queue(layout)
    q = mock.create_queue()
    length = min(length, SIZE - gpa)
    mock.add_chain([(gpa, length, WRITE if write else 0)])
    chain = q.pop_chain()
    assert chain is not None
    before = gm.snapshot()
    bad = _mapped_upto(layout, gpa, length)
    make = chain.writer if write else chain.reader
    if bad is None:
        s = make()
        assert s.available_bytes() == length
        if write:
            s.write(b"\x5a" * length)
            assert gm.memory.read(gpa, length) == b"\x5a" * length
        gm.assert_unchanged_except(before, [(gpa, length)] if write else [])
    else:
        what = "is not mapped at" if bad == gpa else "crosses a gap at"
        with pytest.raises(GuestMemoryError, match=re.escape(f"{what} {bad:#x}")):
            make()
        gm.assert_unchanged_except(before, [])
    gm.check_guards()


# -- the compiled fill path (virtio-rng) -----------------------------------------------------


@pytest.mark.parametrize("cuts", [[0x1000], [0x104, 0x1000]])  # a buffer over 0x1000; also the avail ring
def test_fill_from_hands_chains_over_regions_to_the_general_path(tmp_path: Path, cuts: list[int]) -> None:
    """fill_from's batch takes one-region buffers only: a chain whose buffer crosses
    (or any chain, while a ring crosses) is returned to the caller, which serves it
    with a Writer (VIRTIO 1.2 §5.4: one device-writable buffer, filled in order)."""
    gm, mock = _queue(_layout(cuts))
    q = mock.create_queue()
    one = mock.add_chain([(0x800, 0x10, WRITE)])
    cross = mock.add_chain([(0xFF8, 0x10, WRITE)])
    path = tmp_path / "src"
    path.write_bytes(bytes(range(0x20)))
    fd = os.open(path, os.O_RDONLY)
    try:
        source = ByteSource(fd)
        served = []
        while True:
            n, nbytes, chain = q.fill_from(source)
            served.append((n, nbytes))
            if chain is None:
                break
            w = chain.writer()
            q.add_used(chain.head_index, w.read_from(source))
    finally:
        os.close(fd)
    assert mock.used_elems() == [(one, 0x10), (cross, 0x10)]
    assert gm.memory.read(0x800, 0x10) + gm.memory.read(0xFF8, 0x10) == bytes(range(0x20))
    assert served[0] == ((1, 0x10) if len(cuts) == 1 else (0, 0))
    gm.check_guards()


def test_notification_fields_of_rings_over_regions() -> None:
    """avail->flags, used_event, used->flags and avail_event (VIRTIO 1.2 §2.7.10) work
    when the rings run over regions (each field inside one)."""
    _, mock = _queue(_layout([0x104, 0x14C]))
    q = mock.create_queue()
    q.disable_notification()
    assert mock.used_flags() & 1  # VRING_USED_F_NO_NOTIFY
    assert not q.enable_notification()
    assert not mock.used_flags() & 1
    mock.set_avail_flags(1)  # VRING_AVAIL_F_NO_INTERRUPT
    assert not q.needs_notification()
    mock.set_avail_flags(0)
    assert q.needs_notification()
    mock.add_chain([(0x800, 4, WRITE)])
    assert q.pending() == 1 and q.avail_idx() == 1
    q2 = mock.create_queue(event_idx=True)
    q2.enable_notification()
    assert mock.memory.read_u16(USED + 4 + 8 * QSIZE) == 0  # avail_event = next_avail
