"""DescriptorChain walking and every bad-input case of VIRTIO 1.2 §2.7.5.

Each hostile chain must raise its specific VirtioError (never crash, never hang) and
must not change a byte of guest memory outside write-only buffers: guest memory here
is a GuardedMemory (guard bytes around each region, snapshot compared afterwards).
Every case also runs against the RefQueue model so the oracle agrees with the core.
"""

from __future__ import annotations

from typing import Any

import pytest

from virtio_queue import (
    DescriptorChainOverflow,
    GuestMemoryError,
    InvalidChain,
    InvalidDescriptorIndex,
    InvalidIndirectDescriptor,
    VirtioError,
)
from virtio_queue.chain import VIRTQ_DESC_F_INDIRECT as CORE_F_INDIRECT
from virtio_queue.chain import VIRTQ_DESC_F_NEXT as CORE_F_NEXT
from virtio_queue.chain import VIRTQ_DESC_F_WRITE as CORE_F_WRITE
from virtio_queue.testing import (
    VIRTQ_DESC_F_INDIRECT as INDIRECT,
)
from virtio_queue.testing import (
    VIRTQ_DESC_F_NEXT as NEXT,
)
from virtio_queue.testing import (
    VIRTQ_DESC_F_WRITE as WRITE,
)
from virtio_queue.testing import (
    GuardedMemory,
    MockSplitQueue,
    RawDesc,
)

# Two 64 KiB regions with a hole between them; guard bytes around each.
REGION0 = (0x0, 0x10000)
REGION1 = (0x20000, 0x10000)
QSIZE = 16
DATA = 0x4000  # buffers in region 0
TABLES = 0x8000  # indirect tables in region 0


class Setup:
    """Guarded memory, a 16-entry mock driver and a way to pop one chain."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.gm = GuardedMemory([REGION0, REGION1])
        self.mem = self.gm.memory
        self.mock = MockSplitQueue(self.mem, QSIZE)
        self.before = b""

    def queue(self) -> Any:
        q = self.mock.create_queue() if self.kind == "core" else self.mock.create_ref_queue()
        self.before = self.gm.snapshot()
        return q

    def pop(self) -> Any:
        chain = self.queue().pop_chain()
        assert chain is not None
        return chain

    def unchanged(self, allowed: list[tuple[int, int]] | None = None) -> None:
        self.gm.assert_unchanged_except(self.before, allowed or [])


@pytest.fixture(params=["core", "ref"])
def s(request: pytest.FixtureRequest) -> Setup:
    return Setup(request.param)


def expect_all(chain: Any, exc: type[BaseException], is_core: bool, *, reader_writer: bool = True) -> None:
    """The walk (descriptors(), iteration) raises ``exc``; so do reader() and writer()
    unless ``reader_writer`` is False (then a buffer met earlier may fail first)."""
    with pytest.raises(exc):
        chain.descriptors()
    if is_core:
        with pytest.raises(exc):
            list(chain)
    if not reader_writer:
        return
    with pytest.raises(exc):
        chain.reader() if is_core else chain.readable_buffers()
    with pytest.raises(exc):
        chain.writer() if is_core else chain.writable_buffers()


def descs(chain: Any) -> list[tuple[int, int, int, int]]:
    return [(d.addr, d.len, d.flags, d.next) for d in chain.descriptors()]


def test_chain_flag_constants_match_linux() -> None:
    assert (CORE_F_NEXT, CORE_F_WRITE, CORE_F_INDIRECT) == (NEXT, WRITE, INDIRECT) == (1, 2, 4)


# -- valid shapes ------------------------------------------------------------------------


def test_chain_direct_walks_next_links(s: Setup) -> None:
    s.mock.write_desc(3, (DATA, 8, NEXT, 7))
    s.mock.write_desc(7, (DATA + 8, 8, NEXT | WRITE, 1))
    s.mock.write_desc(1, (DATA + 16, 8, WRITE, 0))
    s.mock.add_avail(3)
    chain = s.pop()
    assert chain.head_index == 3
    assert descs(chain) == [(DATA, 8, NEXT, 7), (DATA + 8, 8, NEXT | WRITE, 1), (DATA + 16, 8, WRITE, 0)]
    s.unchanged()


def test_chain_iteration_matches_descriptors(s: Setup) -> None:
    s.mock.add_chain([(DATA, 8), (DATA + 8, 8, WRITE)])
    chain = s.pop()
    assert [(d.addr, d.len) for d in chain] == [(DATA, 8), (DATA + 8, 8)]
    assert [(d.addr, d.len) for d in chain.descriptors()] == [(DATA, 8), (DATA + 8, 8)]


def test_chain_of_exactly_queue_size_is_valid(s: Setup) -> None:
    """The TTL is the queue size: a chain using every descriptor once is legal."""
    s.mock.add_chain([(DATA + 4 * i, 4) for i in range(QSIZE)])
    assert len(s.pop().descriptors()) == QSIZE


def test_chain_indirect_table_walked_in_place(s: Setup) -> None:
    """VIRTIO 1.2 §2.7.5.3: the table replaces the INDIRECT descriptor; its entries'
    `next` is relative to the table."""
    table = [(DATA, 4, NEXT, 2), (0xDEAD, 4, 0, 0), (DATA + 4, 4, WRITE, 0)]
    s.mock.write_descs(0, table, table=TABLES)
    s.mock.write_desc(5, (TABLES, 16 * len(table), INDIRECT, 0))
    s.mock.add_avail(5)
    assert descs(s.pop()) == [(DATA, 4, NEXT, 2), (DATA + 4, 4, WRITE, 0)]
    s.unchanged()


def test_chain_direct_then_indirect_is_valid(s: Setup) -> None:
    """A direct descriptor may link to a last descriptor that is INDIRECT (§2.7.5.3)."""
    table, length = s.mock.build_indirect_table([(DATA + 0x100, 4), (DATA + 0x200, 4, WRITE)])
    s.mock.write_desc(0, (DATA, 4, NEXT, 1))
    s.mock.write_desc(1, (table, length, INDIRECT, 0))
    s.mock.add_avail(0)
    assert [(d.addr, d.len) for d in s.pop().descriptors()] == [
        (DATA, 4),
        (DATA + 0x100, 4),
        (DATA + 0x200, 4),
    ]


def test_chain_indirect_write_flag_on_pointer_is_ignored(s: Setup) -> None:
    """VIRTIO 1.2 §2.7.5.3.2: the device MUST ignore the write-only flag in the
    descriptor that refers to an indirect table."""
    s.mock.add_indirect_chain([(DATA, 4)], flags=WRITE)
    chain = s.pop()
    assert descs(chain) == [(DATA, 4, 0, 0)]
    if s.kind == "core":
        assert chain.reader().available_bytes() == 4
        assert chain.writer().available_bytes() == 0
    else:
        assert chain.readable_buffers() == [(DATA, 4)]


def test_chain_indirect_of_max_table_entries_is_valid(s: Setup) -> None:
    """The TTL inside an indirect table is its entry count."""
    n = 64
    s.mock.add_indirect_chain([(DATA + i, 1) for i in range(n)])
    assert len(s.pop().descriptors()) == n


def test_chain_zero_length_descriptor_contributes_nothing(s: Setup) -> None:
    s.mock.add_chain([(DATA, 0), (DATA, 4), (DATA + 4, 0, WRITE)])
    chain = s.pop()
    assert len(chain.descriptors()) == 3
    if s.kind == "core":
        assert chain.reader().available_bytes() == 4
        assert chain.writer().available_bytes() == 0
    else:
        assert chain.readable_buffers() == [(DATA, 4)]
        assert chain.writable_buffers() == []


def test_chain_total_exactly_2_32_is_valid(s: Setup) -> None:
    """VIRTIO 1.2 §2.7.5.2: up to 2^32 bytes in total are allowed."""
    s.mock.add_chain([(DATA, 0xFFFFFFFF), (DATA, 1)])
    assert [d.len for d in s.pop().descriptors()] == [0xFFFFFFFF, 1]


# -- bad input: indexes and cycles ---------------------------------------------------------


def test_chain_head_index_out_of_range_raises(s: Setup) -> None:
    """VIRTIO 1.2 §2.7.6: avail->ring[] entries are descriptor-table indexes (< size)."""
    s.mock.add_avail(QSIZE)
    q = s.queue()
    with pytest.raises(InvalidDescriptorIndex):
        q.pop_chain()
    s.unchanged()


@pytest.mark.parametrize("bad_next", [QSIZE, QSIZE + 1, 0xFFFF])
def test_chain_next_out_of_range_raises(s: Setup, bad_next: int) -> None:
    """VIRTIO 1.2 §2.7.5: `next` indexes the descriptor table (< queue size)."""
    s.mock.write_desc(0, (DATA, 4, NEXT, 1))
    s.mock.write_desc(1, (DATA + 4, 4, NEXT | WRITE, bad_next))
    s.mock.add_avail(0)
    chain = s.pop()
    expect_all(chain, InvalidDescriptorIndex, s.kind == "core")
    s.unchanged()


def test_chain_self_loop_stops_at_ttl(s: Setup) -> None:
    """VIRTIO 1.2 §2.7.5.2 (a chain is finite); rust-vmm bounds the walk by the queue size."""
    s.mock.write_desc(4, (DATA, 4, NEXT | WRITE, 4))
    s.mock.add_avail(4)
    chain = s.pop()
    expect_all(chain, InvalidChain, s.kind == "core")
    s.unchanged()


def test_chain_with_cycle_stops_at_ttl(s: Setup) -> None:
    for i in range(3):
        s.mock.write_desc(i, (DATA + 4 * i, 4, NEXT, (i + 1) % 3))
    s.mock.add_avail(0)
    s.mock.add_avail(0)
    q = s.queue()
    expect_all(q.pop_chain(), InvalidChain, s.kind == "core")
    n = 0
    with pytest.raises(InvalidChain):
        for _ in q.pop_chain():
            n += 1
    assert n == QSIZE  # exactly the TTL, then the error
    s.unchanged()


def test_chain_cycle_through_every_descriptor_stops_at_ttl(s: Setup) -> None:
    for i in range(QSIZE):
        s.mock.write_desc(i, (DATA, 1, NEXT | WRITE, (i + 1) % QSIZE))
    s.mock.add_avail(0)
    expect_all(s.pop(), InvalidChain, s.kind == "core")
    s.unchanged()


def test_chain_cycle_inside_indirect_table_stops_at_table_ttl(s: Setup) -> None:
    """Inside an indirect table the TTL is its entry count."""
    s.mock.write_descs(0, [(DATA, 4, NEXT, 1), (DATA, 4, NEXT | WRITE, 0)], table=TABLES)
    s.mock.write_desc(0, (TABLES, 32, INDIRECT, 0))
    s.mock.add_avail(0)
    expect_all(s.pop(), InvalidChain, s.kind == "core")
    s.unchanged()


def test_chain_indirect_next_beyond_table_raises(s: Setup) -> None:
    """VIRTIO 1.2 §2.7.5.3.2: `next` inside a table indexes that table."""
    s.mock.write_descs(0, [(DATA, 4, NEXT, 2), (DATA, 4, 0, 0)], table=TABLES)
    s.mock.write_desc(0, (TABLES, 32, INDIRECT, 0))
    s.mock.add_avail(0)
    expect_all(s.pop(), InvalidDescriptorIndex, s.kind == "core")
    s.unchanged()


# -- bad input: indirect descriptors ----------------------------------------------------------


def test_chain_indirect_with_next_raises(s: Setup) -> None:
    """VIRTIO 1.2 §2.7.5.3.1: the driver MUST NOT set both INDIRECT and NEXT."""
    table, length = s.mock.build_indirect_table([(DATA, 4)])
    s.mock.write_desc(0, (table, length, INDIRECT | NEXT, 1))
    s.mock.write_desc(1, (DATA, 4, 0, 0))
    s.mock.add_avail(0)
    expect_all(s.pop(), InvalidIndirectDescriptor, s.kind == "core")
    s.unchanged()


def test_chain_nested_indirect_raises(s: Setup) -> None:
    """VIRTIO 1.2 §2.7.5.3.1: the driver MUST NOT set INDIRECT within an indirect table."""
    inner, inner_len = s.mock.build_indirect_table([(DATA, 4)])
    outer, outer_len = s.mock.build_indirect_table([(DATA, 4), (inner, inner_len, INDIRECT)])
    s.mock.write_desc(0, (outer, outer_len, INDIRECT, 0))
    s.mock.add_avail(0)
    expect_all(s.pop(), InvalidIndirectDescriptor, s.kind == "core")
    s.unchanged()


def test_chain_nested_indirect_pointing_to_itself_raises(s: Setup) -> None:
    s.mock.write_descs(0, [(TABLES, 16, INDIRECT, 0)], table=TABLES)
    s.mock.write_desc(0, (TABLES, 16, INDIRECT, 0))
    s.mock.add_avail(0)
    expect_all(s.pop(), InvalidIndirectDescriptor, s.kind == "core")


@pytest.mark.parametrize("length", [0, 8, 15, 17, 24, 0xFFFFFFFF])
def test_chain_indirect_table_length_not_multiple_of_16_raises(s: Setup, length: int) -> None:
    """VIRTIO 1.2 §2.7.5.3: an indirect table holds whole 16-byte descriptors, at
    least one (a zero-length table describes no buffer)."""
    s.mock.write_descs(0, [(DATA, 4), (DATA, 4)], table=TABLES)
    s.mock.write_desc(0, (TABLES, length, INDIRECT, 0))
    s.mock.add_avail(0)
    expect_all(s.pop(), InvalidIndirectDescriptor, s.kind == "core")
    s.unchanged()


@pytest.mark.parametrize(
    "addr",
    [
        0x10000,  # the hole between the regions
        0xFFF0,  # starts in region 0, ends in the hole
        0x1FFF0,  # starts in the hole, ends in region 1
        (1 << 64) - 16,  # the top of the address space, unmapped
    ],
)
def test_chain_indirect_table_outside_memory_raises(s: Setup, addr: int) -> None:
    """VIRTIO 1.2 §2.7.5.3: the table is read from guest memory; an unmapped or
    region-crossing table is refused before a byte of it is read."""
    s.mock.write_desc(0, (addr, 32, INDIRECT, 0))
    s.mock.add_avail(0)
    expect_all(s.pop(), GuestMemoryError, s.kind == "core")
    s.unchanged()


def test_chain_indirect_table_address_overflow_raises(s: Setup) -> None:
    s.mock.write_desc(0, ((1 << 64) - 16, 48, INDIRECT, 0))
    s.mock.add_avail(0)
    expect_all(s.pop(), GuestMemoryError, s.kind == "core")


def test_chain_indirect_table_too_many_entries_raises(s: Setup) -> None:
    """A table longer than 2^16 entries cannot be addressed by a u16 `next`."""
    s.mock.write_desc(0, (0, 16 * 65537, INDIRECT, 0))
    s.mock.add_avail(0)
    expect_all(s.pop(), InvalidIndirectDescriptor, s.kind == "core")


# -- bad input: lengths and buffer addresses ---------------------------------------------------


def test_chain_total_length_above_2_32_raises(s: Setup) -> None:
    """VIRTIO 1.2 §2.7.5.2: the total length of a chain stays ≤ 2^32."""
    s.mock.add_chain([(DATA, 0xFFFFFFFF), (DATA, 1), (DATA, 1, WRITE)])
    chain = s.pop()
    expect_all(chain, DescriptorChainOverflow, s.kind == "core", reader_writer=False)
    # Buffers are mapped as the walk meets them: the Reader meets the unmapped
    # 4 GiB buffer first, the Writer skips it and meets the overflow.
    with pytest.raises(GuestMemoryError):
        chain.reader() if s.kind == "core" else chain.readable_buffers()
    with pytest.raises(DescriptorChainOverflow):
        chain.writer() if s.kind == "core" else chain.writable_buffers()
    s.unchanged()


def test_chain_total_length_above_2_32_in_indirect_table_raises(s: Setup) -> None:
    s.mock.add_indirect_chain([(DATA, 0x80000000, WRITE)] * 3)
    chain = s.pop()
    expect_all(chain, DescriptorChainOverflow, s.kind == "core", reader_writer=False)
    with pytest.raises(DescriptorChainOverflow):
        chain.reader() if s.kind == "core" else chain.readable_buffers()
    s.unchanged()


def test_chain_many_huge_writable_lengths_raise_overflow(s: Setup) -> None:
    s.mock.add_chain([(DATA, 0xFFFFFFFF, WRITE)] * QSIZE)
    chain = s.pop()
    expect_all(chain, DescriptorChainOverflow, s.kind == "core", reader_writer=False)
    with pytest.raises(DescriptorChainOverflow):
        chain.reader() if s.kind == "core" else chain.readable_buffers()
    s.unchanged()


@pytest.mark.parametrize(
    ("addr", "length"),
    [
        (0x10000, 4),  # unmapped (the hole)
        (0xFFFE, 4),  # crosses from region 0 into the hole
        (0x1FFFE, 4),  # crosses from the hole into region 1
        ((1 << 64) - 2, 4),  # wraps round 2^64
        (0x30000, 1),  # just past region 1
        (0x0, 0x20001),  # longer than region 0
    ],
)
@pytest.mark.parametrize("flags", [0, WRITE])
def test_chain_buffer_outside_memory_raises_on_reader_writer(
    s: Setup, addr: int, length: int, flags: int
) -> None:
    """A buffer must lie inside one guest region: the Reader/Writer refuse the chain
    rather than touch anything (DESIGN.md "Behaviour under bad input")."""
    s.mock.add_chain([(DATA, 4), (addr, length, flags), (DATA + 8, 4, WRITE)])
    chain = s.pop()
    assert len(chain.descriptors()) == 3  # the walk itself does not map buffers
    if s.kind == "core":
        if flags & WRITE:
            with pytest.raises(GuestMemoryError):
                chain.writer()
            assert chain.reader().available_bytes() == 4
        else:
            with pytest.raises(GuestMemoryError):
                chain.reader()
            assert chain.writer().available_bytes() == 4
    else:
        with pytest.raises(GuestMemoryError):
            chain.writable_buffers() if flags & WRITE else chain.readable_buffers()
    s.unchanged()


def test_chain_buffer_in_second_region_is_usable(s: Setup) -> None:
    s.mock.add_chain([(0x2FFFC, 4, WRITE)])
    chain = s.pop()
    if s.kind == "core":
        w = chain.writer()
        w.write_all(b"\x01\x02\x03\x04")
        assert s.mem.read(0x2FFFC, 4) == b"\x01\x02\x03\x04"
        s.unchanged([(0x2FFFC, 4)])
    else:
        assert chain.writable_buffers() == [(0x2FFFC, 4)]


def test_writer_over_readable_only_chain_writes_nothing(s: Setup) -> None:
    """VIRTIO 1.2 §2.7.4: the device MUST NOT write to a device-readable buffer."""
    s.mock.add_chain([(DATA, 16), (DATA + 16, 16)])
    s.mem.write(DATA, b"R" * 32)
    chain = s.pop()
    if s.kind == "ref":
        assert chain.writable_buffers() == []
        return
    s.before = s.gm.snapshot()
    w = chain.writer()
    assert w.available_bytes() == 0
    assert w.write(b"x" * 8) == 0
    with pytest.raises(DescriptorChainOverflow):
        w.write_all(b"x")
    with pytest.raises(DescriptorChainOverflow):
        w.write_obj("I", 1)
    assert w.buffers() == []
    assert s.mem.read(DATA, 32) == b"R" * 32
    s.unchanged()


def test_reader_over_writable_only_chain_reads_nothing(s: Setup) -> None:
    s.mock.add_chain([(DATA, 16, WRITE)])
    chain = s.pop()
    if s.kind == "ref":
        assert chain.readable_buffers() == []
        return
    r = chain.reader()
    assert r.available_bytes() == 0
    assert r.read() == b""
    with pytest.raises(DescriptorChainOverflow):
        r.read_exact_into(bytearray(1))


def test_writer_mixed_chain_writes_only_writable_buffers(s: Setup) -> None:
    """Nothing is ever written outside a write-only descriptor (DESIGN.md)."""
    s.mock.add_chain([(DATA, 8), (DATA + 0x10, 8, WRITE), (DATA + 0x20, 8), (DATA + 0x30, 8, WRITE)])
    chain = s.pop()
    if s.kind == "ref":
        assert chain.writable_buffers() == [(DATA + 0x10, 8), (DATA + 0x30, 8)]
        return
    w = chain.writer()
    assert w.available_bytes() == 16
    w.write_all(bytes(range(1, 17)))
    with pytest.raises(DescriptorChainOverflow):
        w.write_all(b"more")
    assert s.mem.read(DATA + 0x10, 8) == bytes(range(1, 9))
    assert s.mem.read(DATA + 0x30, 8) == bytes(range(9, 17))
    s.unchanged([(DATA + 0x10, 8), (DATA + 0x30, 8)])


def test_writer_write_all_too_long_writes_nothing(s: Setup) -> None:
    s.mock.add_chain([(DATA, 8, WRITE), (DATA + 0x10, 8, WRITE)])
    chain = s.pop()
    if s.kind == "ref":
        return
    w = chain.writer()
    with pytest.raises(DescriptorChainOverflow):
        w.write_all(b"y" * 17)
    assert w.bytes_written() == 0 and w.available_bytes() == 16
    s.unchanged()


# -- descriptor order (VIRTIO 1.2 §2.7.4.2) ----------------------------------------------


def test_chain_check_order_accepts_readable_then_writable(s: Setup) -> None:
    s.mock.add_chain([(DATA, 8), (DATA + 8, 0), (DATA + 16, 8, WRITE), (DATA + 24, 8, WRITE)])
    s.pop().check_order()
    s.mock.add_chain([(DATA, 8, WRITE)])  # one direction only
    s.pop().check_order()
    s.mock.add_chain([(DATA, 8)])
    s.pop().check_order()


@pytest.mark.parametrize(
    ("layout", "pos"),
    [
        ([(DATA, 8, WRITE), (DATA + 8, 8)], 1),
        ([(DATA, 8), (DATA + 8, 8, WRITE), (DATA + 16, 8), (DATA + 24, 8, WRITE)], 2),
        ([(DATA, 8), (DATA + 8, 8, WRITE), (DATA + 16, 0)], 2),  # even an empty one
    ],
)
def test_chain_readable_after_writable_raises(s: Setup, layout: list[tuple[int, ...]], pos: int) -> None:
    """VIRTIO 1.2 §2.7.4.2: the driver MUST place any device-writable descriptor
    elements after any device-readable descriptor elements."""
    s.mock.add_chain(layout)
    chain = s.pop()
    with pytest.raises(InvalidChain, match=f"descriptor {pos} is device-readable after a device-writable"):
        chain.check_order()
    s.unchanged()


def test_chain_readable_after_writable_inside_indirect_table_raises(s: Setup) -> None:
    """§2.7.4.2 over the walk: a direct writable descriptor, then a readable one in
    the indirect table it links to."""
    table, length = s.mock.build_indirect_table([(DATA + 0x100, 4), (DATA + 0x200, 4, WRITE)])
    s.mock.write_desc(0, (DATA, 4, NEXT | WRITE, 1))
    s.mock.write_desc(1, (table, length, INDIRECT, 0))
    s.mock.add_avail(0)
    with pytest.raises(InvalidChain, match="descriptor 1 is device-readable"):
        s.pop().check_order()


def test_chain_check_order_reports_walk_errors(s: Setup) -> None:
    s.mock.write_desc(0, (DATA, 8, NEXT, 0))  # a self-loop of readable descriptors
    s.mock.add_avail(0)
    with pytest.raises(InvalidChain, match="cycle"):
        s.pop().check_order()


def test_chain_walk_error_is_a_virtio_error_subclass() -> None:
    for exc in (
        InvalidChain,
        InvalidDescriptorIndex,
        InvalidIndirectDescriptor,
        DescriptorChainOverflow,
        GuestMemoryError,
    ):
        assert issubclass(exc, VirtioError) and issubclass(exc, ValueError)


def test_mock_build_desc_chain_links_like_mock_rs() -> None:
    """The mock forces NEXT/next on all but the last descriptor and clears it there."""
    gm = GuardedMemory([REGION0], backend="python")
    mock = MockSplitQueue(gm.memory, 8)
    head = mock.build_desc_chain([(1, 2, 0, 5), (3, 4, NEXT, 7), RawDesc(5, 6, WRITE | NEXT, 1)], start=6)
    assert head == 6
    assert [mock.read_desc(i) for i in (6, 7, 0)] == [
        RawDesc(1, 2, NEXT, 7),
        RawDesc(3, 4, NEXT, 0),
        RawDesc(5, 6, WRITE, 0),
    ]
