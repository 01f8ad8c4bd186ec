"""Reader / Writer: byte streams over a chain's buffers, splitting, structs, views, fd I/O."""

from __future__ import annotations

import errno
import os
import socket
import struct
import tempfile
from collections.abc import Iterator, Sequence

import pytest

from virtio_queue import (
    ByteSource,
    DescriptorChain,
    DescriptorChainOverflow,
    GuestMemory,
    GuestMemoryError,
    InvalidChain,
    InvalidDescriptorIndex,
    Reader,
    Writer,
)
from virtio_queue.testing import VIRTQ_DESC_F_INDIRECT as INDIRECT
from virtio_queue.testing import VIRTQ_DESC_F_NEXT as NEXT
from virtio_queue.testing import VIRTQ_DESC_F_WRITE as WRITE
from virtio_queue.testing import GuardedMemory, MockSplitQueue, RawDesc

DATA = 0x10000  # readable buffers
WDATA = 0x30000  # writable buffers
PATTERN = bytes((i * 7 + 3) & 0xFF for i in range(0x10000))


class Env:
    """1 MiB of guarded guest memory, a 16-entry queue, helpers to make chains."""

    def __init__(self) -> None:
        self.gm = GuardedMemory([(0, 1 << 20)])
        self.mem: GuestMemory = self.gm.memory
        self.mock = MockSplitQueue(self.mem, 16)
        self.queue = self.mock.create_queue()
        self.before = b""

    def chain(
        self, segs: Sequence[tuple[int, int]], *, write: bool, indirect: bool = False
    ) -> DescriptorChain:
        """A chain of buffers at (gpa, len); readable buffers hold PATTERN bytes."""
        flags = WRITE if write else 0
        descs = [(gpa, n, flags) for gpa, n in segs]
        if not write:
            for gpa, n in segs:
                self.mem.write(gpa, PATTERN[gpa - DATA : gpa - DATA + n])
        if indirect:
            self.mock.add_indirect_chain(descs)
        else:
            self.mock.add_chain(descs)
        chain = self.queue.pop_chain()
        assert chain is not None
        self.before = self.gm.snapshot()
        return chain

    def reader(self, lens: Sequence[int], **kw: bool) -> tuple[Reader, bytes]:
        segs = _segments(lens)
        r = self.chain(segs, write=False, **kw).reader()
        expected = b"".join(PATTERN[g - DATA : g - DATA + n] for g, n in segs)
        return r, expected

    def writer(self, lens: Sequence[int], **kw: bool) -> tuple[Writer, list[tuple[int, int]]]:
        segs = _segments(lens, WDATA)
        return self.chain(segs, write=True, **kw).writer(), segs

    def written(self, segs: Sequence[tuple[int, int]]) -> bytes:
        return b"".join(self.mem.read(g, n) for g, n in segs)

    def only_changed(self, segs: Sequence[tuple[int, int]]) -> None:
        self.gm.assert_unchanged_except(self.before, segs)


def _segments(lens: Sequence[int], base: int = DATA) -> list[tuple[int, int]]:
    """Buffers of the given lengths with 16-byte gaps between them, from ``base``."""
    out = []
    gpa = base
    for n in lens:
        out.append((gpa, n))
        gpa += n + 16
    return out


@pytest.fixture
def env() -> Env:
    return Env()


# -- Reader ------------------------------------------------------------------------------


def test_reader_reads_across_descriptors(env: Env) -> None:
    r, expected = env.reader([3, 5, 1, 7])
    assert r.available_bytes() == 16 and r.bytes_read() == 0
    assert r.read(4) == expected[:4]
    assert r.read(10) == expected[4:14]
    assert r.bytes_read() == 14 and r.available_bytes() == 2
    assert r.read() == expected[14:]
    assert r.read() == b"" and r.read(5) == b""


def test_reader_readinto_returns_count(env: Env) -> None:
    r, expected = env.reader([4, 4])
    buf = bytearray(6)
    assert r.readinto(buf) == 6 and buf == expected[:6]
    buf = bytearray(6)
    assert r.readinto(buf) == 2 and buf[:2] == expected[6:]


def test_reader_read_exact_into_short_raises_and_reads_nothing(env: Env) -> None:
    r, expected = env.reader([4, 4])
    with pytest.raises(DescriptorChainOverflow):
        r.read_exact_into(bytearray(9))
    assert r.bytes_read() == 0 and r.available_bytes() == 8
    buf = bytearray(8)
    r.read_exact_into(buf)
    assert buf == expected


def test_reader_read_obj_spans_descriptors(env: Env) -> None:
    env.mock.add_chain([(DATA, 3), (DATA + 0x100, 13)])
    env.mem.write(DATA, struct.pack("<QIHH", 0x1122334455667788, 0x99AABBCC, 0xDDEE, 0x00FF)[:3])
    env.mem.write(DATA + 0x100, struct.pack("<QIHH", 0x1122334455667788, 0x99AABBCC, 0xDDEE, 0x00FF)[3:])
    chain = env.queue.pop_chain()
    assert chain is not None
    r = chain.reader()
    assert r.read_obj("QIHH") == (0x1122334455667788, 0x99AABBCC, 0xDDEE, 0x00FF)
    with pytest.raises(DescriptorChainOverflow):
        r.read_obj("B")


def test_reader_read_obj_short_raises_and_reads_nothing(env: Env) -> None:
    r, _ = env.reader([6])
    with pytest.raises(DescriptorChainOverflow):
        r.read_obj("Q")
    assert r.available_bytes() == 6


def test_reader_consume_skips(env: Env) -> None:
    r, expected = env.reader([5, 5])
    assert r.consume(7) == 7
    assert r.read() == expected[7:]
    assert r.consume(3) == 0


def test_reader_consume_negative_raises(env: Env) -> None:
    r, _ = env.reader([5])
    with pytest.raises(ValueError):
        r.consume(-1)


@pytest.mark.parametrize("offset", [0, 1, 3, 4, 9, 12])
def test_reader_split_at_keeps_head_returns_tail(env: Env, offset: int) -> None:
    r, expected = env.reader([4, 5, 3])
    rest = r.split_at(offset)
    assert r.available_bytes() == offset
    assert rest.available_bytes() == 12 - offset
    assert rest.read() == expected[offset:]
    assert r.read() == expected[:offset]


def test_reader_split_after_partial_read(env: Env) -> None:
    r, expected = env.reader([4, 4, 4])
    r.read(3)
    rest = r.split_at(4)
    assert r.read() == expected[3:7]
    assert rest.read() == expected[7:]


def test_reader_split_beyond_available_raises(env: Env) -> None:
    r, _ = env.reader([4])
    with pytest.raises(DescriptorChainOverflow):
        r.split_at(5)
    assert r.available_bytes() == 4


def test_reader_buffers_are_views_and_do_not_consume(env: Env) -> None:
    r, expected = env.reader([4, 6, 2])
    r.read(2)
    views = r.buffers(7)
    assert [len(v) for v in views] == [2, 5]
    assert b"".join(bytes(v) for v in views) == expected[2:9]
    assert all(v.readonly for v in views)
    assert r.available_bytes() == 10
    assert [len(v) for v in r.buffers()] == [2, 6, 2]


def test_reader_many_segments_via_indirect_table(env: Env) -> None:
    lens = [(i % 13) + 1 for i in range(150)]  # more than one IOV batch
    r, expected = env.reader(lens, indirect=True)
    assert r.available_bytes() == sum(lens)
    assert r.read() == expected


def test_reader_large_copy_releases_gil_path(env: Env) -> None:
    """Copies of 256 KiB and more take the nogil path; the bytes must be the same."""
    env.mock.add_chain([(0x40000, 0x30000), (0x80000, 0x20000)])
    blob = os.urandom(0x50000)
    env.mem.write(0x40000, blob[:0x30000])
    env.mem.write(0x80000, blob[0x30000:])
    chain = env.queue.pop_chain()
    assert chain is not None
    buf = bytearray(0x50000)
    chain.reader().read_exact_into(buf)
    assert buf == blob
    assert chain.reader().readinto(memoryview(buf)) == 0x50000


# -- Writer ------------------------------------------------------------------------------


def test_writer_writes_across_descriptors(env: Env) -> None:
    w, segs = env.writer([3, 5, 2])
    assert w.available_bytes() == 10
    assert w.write(b"abcd") == 4
    assert w.write(b"efghijklmn") == 6  # only what fits
    assert w.bytes_written() == 10 and w.available_bytes() == 0
    assert env.written(segs) == b"abcdefghij"
    env.only_changed(segs)


def test_writer_write_obj_spans_descriptors(env: Env) -> None:
    w, segs = env.writer([5, 11])
    w.write_obj("QIHH", 1, 2, 3, 4)
    assert env.written(segs) == struct.pack("<QIHH", 1, 2, 3, 4)
    with pytest.raises(DescriptorChainOverflow):
        w.write_obj("B", 1)
    env.only_changed(segs)


def test_writer_write_obj_too_big_writes_nothing(env: Env) -> None:
    w, _ = env.writer([3, 3])
    with pytest.raises(DescriptorChainOverflow):
        w.write_obj("Q", 0xFFFFFFFFFFFFFFFF)
    assert w.bytes_written() == 0
    env.only_changed([])


@pytest.mark.parametrize("offset", [0, 2, 5, 7])
def test_writer_split_at_writes_both_parts(env: Env, offset: int) -> None:
    w, segs = env.writer([2, 3, 2])
    tail = w.split_at(offset)
    assert (w.available_bytes(), tail.available_bytes()) == (offset, 7 - offset)
    tail.write_all(b"T" * (7 - offset))
    w.write_all(b"H" * offset)
    assert env.written(segs) == b"H" * offset + b"T" * (7 - offset)
    env.only_changed(segs)


def test_writer_split_beyond_available_raises(env: Env) -> None:
    w, _ = env.writer([2])
    with pytest.raises(DescriptorChainOverflow):
        w.split_at(3)


def test_back_to_back_buffers_join_into_one_segment(env: Env) -> None:
    # Descriptors whose buffers follow each other in guest memory become one
    # segment (one copy, one iovec); splitting and reading inside it still work.
    segs = [(DATA, 4), (DATA + 4, 8), (DATA + 12, 4), (DATA + 32, 4)]
    r = env.chain(segs, write=False).reader()
    assert [len(v) for v in r.buffers()] == [16, 4]
    rest = r.split_at(6)
    assert r.read() == PATTERN[:6]
    assert [len(v) for v in rest.buffers()] == [10, 4]
    assert rest.read() == PATTERN[6:16] + PATTERN[32:36]


def test_back_to_back_writable_buffers_skip_readable_ones_between(env: Env) -> None:
    # Readable descriptors between two writable ones are not part of the Writer:
    # the writable buffers [W, W+4) and [W+4, W+8) still join.
    descs = [(WDATA, 4, WRITE), (DATA, 4, 0), (WDATA + 4, 4, WRITE)]
    env.mock.add_chain(descs)
    chain = env.queue.pop_chain()
    assert chain is not None
    env.before = env.gm.snapshot()
    w = chain.writer()
    assert [len(v) for v in w.buffers()] == [8]
    assert w.write(b"ABCDEFGHIJ") == 8
    assert env.mem.read(WDATA, 8) == b"ABCDEFGH"
    env.only_changed([(WDATA, 8)])


def _raw_chain(env: Env, descs: Sequence[RawDesc]) -> DescriptorChain:
    """Descriptors written as given (links and flags included) from index 0."""
    env.mock.write_descs(0, descs)
    env.mock.add_avail(0)
    chain = env.queue.pop_chain()
    assert chain is not None
    return chain


def test_direct_descriptors_then_an_indirect_table(env: Env) -> None:
    """VIRTIO 1.2 §2.7.5.3: a chain's last descriptor may point at an indirect
    table; the walk of the direct ones hands over to it in the middle."""
    env.mem.write(DATA, PATTERN[:64])
    table, length = env.mock.build_indirect_table([(DATA + 16, 8, 0), (DATA + 40, 4, 0)])
    chain = _raw_chain(
        env,
        [
            RawDesc(DATA, 8, NEXT, 1),
            RawDesc(WDATA, 8, WRITE | NEXT, 2),
            RawDesc(table, length, INDIRECT, 0),
        ],
    )
    assert chain.reader().read() == PATTERN[:8] + PATTERN[16:24] + PATTERN[40:44]
    assert chain.writer().available_bytes() == 8


@pytest.mark.parametrize(
    ("tail", "error", "message"),
    [
        ([RawDesc(DATA + 8, 4, NEXT, 99)], InvalidDescriptorIndex, "descriptor index 99 out of range"),
        ([RawDesc(DATA + 8, 4, NEXT, 0)], InvalidChain, "a cycle"),
    ],
)
def test_chain_errors_after_direct_descriptors(
    env: Env, tail: list[RawDesc], error: type[Exception], message: str
) -> None:
    """VIRTIO 1.2 §2.7.5.2: a bad next index or a cycle found after some good
    descriptors is reported, by the Writer too (whose buffers are all fine)."""
    chain = _raw_chain(env, [RawDesc(DATA, 8, NEXT, 1), *tail])
    for make in (chain.reader, chain.writer):
        with pytest.raises(error, match=message):
            make()


def test_chain_longer_than_4_gib_after_direct_descriptors(env: Env) -> None:
    """VIRTIO 1.2 §2.7.5.2: the total length counts the buffers the Reader skips
    (here a huge device-writable one, never translated)."""
    chain = _raw_chain(
        env,
        [
            RawDesc(DATA, 8, NEXT, 1),
            RawDesc(WDATA, 0xFFFF_FFF0, WRITE | NEXT, 2),
            RawDesc(DATA + 8, 0x20, 0, 0),
        ],
    )
    with pytest.raises(DescriptorChainOverflow, match="exceeds 2"):
        chain.reader()


def test_buffer_outside_memory_after_direct_descriptors(env: Env) -> None:
    chain = _raw_chain(env, [RawDesc(WDATA, 8, WRITE | NEXT, 1), RawDesc(1 << 30, 8, WRITE, 0)])
    with pytest.raises(GuestMemoryError, match=r"\[0x40000000, \+0x8\) is not mapped at 0x40000000"):
        chain.writer()
    assert chain.reader().available_bytes() == 0


def test_writer_chain_of_runs_and_jumps_follows_next(env: Env) -> None:
    """A chain whose links go forward by one, jump, and go back: the walk follows
    `next`, whatever the table order (VIRTIO 1.2 §2.7.5: the driver chooses the
    indices)."""
    order = [0, 1, 5, 6, 7, 3, 4, 2]
    descs = [RawDesc(0, 0, 0, 0)] * 8
    for k, idx in enumerate(order):
        if k + 1 < len(order):
            descs[idx] = RawDesc(WDATA + 0x100 * k, 16, WRITE | NEXT, order[k + 1])
        else:
            descs[idx] = RawDesc(WDATA + 0x100 * k, 16, WRITE, 0)
    w = _raw_chain(env, descs).writer()
    env.before = env.gm.snapshot()
    assert w.write(PATTERN[: 16 * 8]) == 16 * 8
    assert [env.mem.read(WDATA + 0x100 * k, 16) for k in range(8)] == [
        PATTERN[16 * k : 16 * k + 16] for k in range(8)
    ]
    env.only_changed([(WDATA + 0x100 * k, 16) for k in range(8)])


def test_chain_run_to_one_past_the_table_is_an_index_error(env: Env) -> None:
    """A run of next = index + 1 that reaches the queue size (16) is an index out
    of range (VIRTIO 1.2 §2.7.5.2), not a read past the table."""
    descs = [RawDesc(DATA + 8 * i, 8, NEXT, i + 1) for i in range(16)]
    chain = _raw_chain(env, descs)
    for make in (chain.reader, chain.writer):
        with pytest.raises(InvalidDescriptorIndex, match="descriptor index 16 out of range"):
            make()


def test_writer_buffer_running_into_the_next_region_is_split() -> None:
    """A buffer that starts in one region and ends in the next one, adjacent in
    guest-physical memory, is two segments (VIRTIO 1.2 §2.7.5 addresses buffers by
    guest-physical address; rust-vmm's Writer accepts it too); nothing else is
    written, and the region held for the previous buffer is not reused for it."""
    gm = GuardedMemory([(0, 0x10000), (0x10000, 0x10000)])
    mock = MockSplitQueue(gm.memory, 16)
    q = mock.create_queue()
    mock.add_chain([(0x8000, 16, WRITE), (0xFFF8, 16, WRITE)])
    mock.add_chain([(0x8000, 16, WRITE), (0x10000, 16, WRITE)])  # adjacent, each in one region
    crossing, good = q.pop_chain(), q.pop_chain()
    assert crossing is not None and good is not None
    before = gm.snapshot()
    w = crossing.writer()
    assert w.available_bytes() == 32 and len(w.buffers()) == 3
    assert w.write(PATTERN[:32]) == 32
    assert gm.memory.read(0x8000, 16) + gm.memory.read(0xFFF8, 16) == PATTERN[:32]
    w = good.writer()
    assert w.write(b"x" * 32) == 32
    gm.assert_unchanged_except(before, [(0x8000, 16), (0xFFF8, 16), (0x10000, 16)])
    gm.check_guards()


def test_writer_buffer_running_into_a_gap_is_refused() -> None:
    """A buffer that runs off its region into unmapped space is refused, naming the
    first unmapped address (VIRTIO 1.2 §2.7.5.1: the device MUST NOT write outside
    the driver's buffers), and nothing is written."""
    gm = GuardedMemory([(0, 0x10000), (0x11000, 0x10000)])
    mock = MockSplitQueue(gm.memory, 16)
    q = mock.create_queue()
    mock.add_chain([(0x8000, 16, WRITE), (0xFFF8, 16, WRITE)])
    chain = q.pop_chain()
    assert chain is not None
    before = gm.snapshot()
    with pytest.raises(GuestMemoryError, match=r"\[0xfff8, \+0x10\) crosses a gap at 0x10000"):
        chain.writer()
    gm.assert_unchanged_except(before, [])
    gm.check_guards()


def test_writer_buffers_are_writable_views(env: Env) -> None:
    w, segs = env.writer([4, 4])
    views = w.buffers()
    assert [len(v) for v in views] == [4, 4]
    assert not any(v.readonly for v in views)
    views[1][:] = b"WXYZ"
    assert w.available_bytes() == 8  # not consumed
    assert w.consume(8) == 8 and w.bytes_written() == 8
    assert env.mem.read(segs[1][0], 4) == b"WXYZ"
    env.only_changed(segs)


# -- fd I/O: pipes -------------------------------------------------------------------------


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


def test_reader_write_to_fd_pipe_drains(env: Env, pipe: tuple[int, int]) -> None:
    r, expected = env.reader([10, 20, 30])
    assert r.write_to_fd(pipe[1], 25) == 25
    assert r.bytes_read() == 25
    assert r.write_to_fd(pipe[1]) == 35
    assert r.available_bytes() == 0
    assert os.read(pipe[0], 100) == expected


def test_writer_read_from_fd_pipe_fills(env: Env) -> None:
    w, segs = env.writer([4, 4, 4])
    rfd, wfd = os.pipe()
    try:
        os.write(wfd, b"0123456789")
        os.close(wfd)
        assert w.read_from_fd(rfd) == 10  # short read at EOF returns the count
        assert w.bytes_written() == 10 and w.available_bytes() == 2
        assert env.written(segs)[:10] == b"0123456789"
        assert w.read_from_fd(rfd) == 0
    finally:
        os.close(rfd)
    env.only_changed(segs)


def test_writer_read_from_source_fills_across_descriptors(env: Env, pipe: tuple[int, int]) -> None:
    """Writer.read_from: the same fill as read_from_fd, through a ByteSource."""
    w, segs = env.writer([3, 5, 4])
    os.write(pipe[1], b"abcdefghij")
    os.set_blocking(pipe[0], False)
    src = ByteSource(pipe[0])
    assert w.read_from(src, 9) == 9
    assert w.read_from(src) == 1  # short: all there is right now
    assert w.read_from(src) == 0  # EAGAIN, nothing read
    assert w.bytes_written() == 10 and w.available_bytes() == 2
    assert env.written(segs)[:10] == b"abcdefghij"
    env.only_changed(segs)


def test_writer_read_from_failing_source_raises_and_keeps_guest_memory(env: Env) -> None:
    w, _ = env.writer([8])
    fd = os.open(tempfile.gettempdir(), os.O_RDONLY)  # a directory: read() fails, EISDIR
    try:
        with pytest.raises(OSError) as info:
            w.read_from(ByteSource(fd))
        assert info.value.errno == errno.EISDIR
    finally:
        os.close(fd)
    assert w.bytes_written() == 0
    env.only_changed([])


def test_writer_read_from_fd_respects_n(env: Env, pipe: tuple[int, int]) -> None:
    w, segs = env.writer([8, 8])
    os.write(pipe[1], b"x" * 16)
    assert w.read_from_fd(pipe[0], 5) == 5
    assert w.read_from_fd(pipe[0], 100) == 11
    assert env.written(segs) == b"x" * 16


def test_reader_write_to_bad_fd_raises_oserror(env: Env) -> None:
    r, _ = env.reader([4])
    fd = os.open("/dev/null", os.O_RDONLY)
    os.close(fd)
    with pytest.raises(OSError) as e:
        r.write_to_fd(fd)
    assert e.value.errno == errno.EBADF


# -- fd I/O: regular files -------------------------------------------------------------------


def test_reader_write_to_file_without_offset_appends_at_position(env: Env) -> None:
    r, expected = env.reader([7, 9])
    with tempfile.TemporaryFile() as f:
        f.write(b"head")
        f.flush()
        assert r.write_to_fd(f.fileno()) == 16
        f.seek(0)
        assert f.read() == b"head" + expected


def test_reader_write_to_file_with_offset_uses_pwritev(env: Env) -> None:
    r, expected = env.reader([7, 9])
    with tempfile.TemporaryFile() as f:
        f.write(b"." * 40)
        f.flush()
        pos = f.tell()
        assert r.write_to_fd(f.fileno(), 10, offset=20) == 10
        assert r.write_to_fd(f.fileno(), offset=30) == 6
        assert os.lseek(f.fileno(), 0, os.SEEK_CUR) == pos  # position untouched
        f.seek(0)
        assert f.read() == b"." * 20 + expected[:10] + expected[10:] + b"." * 4


def test_writer_read_from_file_with_offset_uses_preadv(env: Env) -> None:
    w, segs = env.writer([5, 5, 5])
    with tempfile.TemporaryFile() as f:
        f.write(bytes(range(64)))
        f.flush()
        f.seek(3)
        assert w.read_from_fd(f.fileno(), 6, offset=50) == 6
        assert w.read_from_fd(f.fileno(), offset=60) == 4  # EOF: short
        assert os.lseek(f.fileno(), 0, os.SEEK_CUR) == 3
    assert env.written(segs)[:10] == bytes(range(50, 56)) + bytes(range(60, 64))
    env.only_changed(segs)


def test_writer_read_from_file_without_offset_reads_at_position(env: Env) -> None:
    w, segs = env.writer([3, 3])
    with tempfile.TemporaryFile() as f:
        f.write(bytes(range(20)))
        f.seek(10)
        assert w.read_from_fd(f.fileno()) == 6
        assert f.tell() == 16
    assert env.written(segs) == bytes(range(10, 16))


def test_fd_io_many_segments_in_batches(env: Env) -> None:
    """More iovecs than one readv/writev batch."""
    lens = [(i % 5) + 1 for i in range(200)]
    r, expected = env.reader(lens, indirect=True)
    w, segs = env.writer(lens, indirect=True)
    with tempfile.TemporaryFile() as f:
        assert r.write_to_fd(f.fileno(), offset=0) == len(expected)
        assert w.read_from_fd(f.fileno(), offset=0) == len(expected)
    assert env.written(segs) == expected


# -- fd I/O: sockets ------------------------------------------------------------------------


@pytest.fixture
def sockpair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    b.setblocking(False)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    yield a, b
    a.close()
    b.close()


def test_reader_write_to_full_socket_reports_short_count(
    env: Env, sockpair: tuple[socket.socket, socket.socket]
) -> None:
    """A non-blocking socket takes what fits; the Reader keeps the rest."""
    a, b = sockpair
    env.mock.add_chain([(0x20000, 0x40000), (0x80000, 0x40000)])
    blob = os.urandom(0x80000)
    env.mem.write(0x20000, blob[:0x40000])
    env.mem.write(0x80000, blob[0x40000:])
    chain = env.queue.pop_chain()
    assert chain is not None
    r = chain.reader()
    sent = r.write_to_fd(a.fileno())
    assert 0 < sent < 0x80000
    assert r.bytes_read() == sent and r.available_bytes() == 0x80000 - sent
    # Full now: EAGAIN with nothing written reports 0 and consumes nothing.
    assert r.write_to_fd(a.fileno()) == 0
    assert r.bytes_read() == sent
    received = bytearray()
    while True:
        try:
            chunk = b.recv(1 << 16)
        except BlockingIOError:
            break
        received += chunk
    assert received == blob[:sent]
    more = r.write_to_fd(a.fileno())
    assert more > 0 and r.bytes_read() == sent + more


def test_writer_read_from_empty_socket_returns_zero(
    env: Env, sockpair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = sockpair
    w, segs = env.writer([8, 8])
    assert w.read_from_fd(b.fileno()) == 0  # EAGAIN, nothing read
    a.send(b"hello")
    assert w.read_from_fd(b.fileno()) == 5  # short: all there is right now
    assert w.bytes_written() == 5
    assert env.written(segs)[:5] == b"hello"
    env.only_changed(segs)


def test_buffers_work_with_sendmsg_recvmsg_into(
    env: Env, sockpair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = sockpair
    r, expected = env.reader([3, 4, 5])
    w, segs = env.writer([6, 6])
    n = a.sendmsg(r.buffers())
    r.consume(n)
    got, _, _, _ = b.recvmsg_into(w.buffers())
    w.consume(got)
    assert n == got == 12
    assert env.written(segs) == expected


# -- fd I/O with flags (preadv2/pwritev2) -------------------------------------------------------


def test_read_from_fd_with_flags_uses_preadv2(env: Env) -> None:
    """RWF_NOWAIT on data in the page cache reads all of it, at the offset."""
    w, segs = env.writer([5, 11])
    with tempfile.TemporaryFile() as f:
        f.write(bytes(range(64)))
        f.flush()
        assert w.read_from_fd(f.fileno(), 16, offset=8, flags=os.RWF_NOWAIT) == 16
    assert env.written(segs) == bytes(range(8, 24))


def test_read_from_fd_nowait_stops_short_where_the_cache_has_nothing(env: Env) -> None:
    """Pages the kernel dropped from the cache: EAGAIN ends the call at 0 bytes
    instead of waiting for the disk; a plain read then gets them."""
    w, segs = env.writer([4096])
    with tempfile.TemporaryFile(dir=os.getcwd()) as f:
        f.write(b"\x5a" * 4096)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        got = w.read_from_fd(f.fileno(), 4096, offset=0, flags=os.RWF_NOWAIT)
        if got == 4096:
            pytest.skip("this file system kept (or has no) page cache: nothing to wait for")
        assert got == 0 and w.bytes_written() == 0
        assert w.read_from_fd(f.fileno(), 4096, offset=0) == 4096
    assert env.written(segs) == b"\x5a" * 4096


def test_write_to_fd_with_flags_uses_pwritev2(env: Env) -> None:
    r, expected = env.reader([7, 9])
    with tempfile.TemporaryFile() as f:
        f.write(b"." * 32)
        f.flush()
        assert r.write_to_fd(f.fileno(), offset=4, flags=os.RWF_DSYNC) == 16
        f.seek(0)
        assert f.read() == b"...." + expected + b"." * 12


def test_fd_io_with_bad_flags_raises(env: Env) -> None:
    w, _ = env.writer([8])
    with tempfile.TemporaryFile() as f, pytest.raises(OSError) as e:
        w.read_from_fd(f.fileno(), offset=0, flags=1 << 30)
    assert e.value.errno == errno.EOPNOTSUPP
