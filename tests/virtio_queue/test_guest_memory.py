"""GuestMemory / GuestRegion: region sources, translation bounds, helpers, deferred unmap."""

from __future__ import annotations

import gc
import os
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from virtio_queue import GuestMemory, GuestMemoryError, GuestRegion
from virtio_queue.testing import MockSplitQueue, PyGuestMemory

U64_MAX = (1 << 64) - 1


@pytest.fixture
def two_regions() -> GuestMemory:
    """[0x0, 0x1000) and [0x1000, 0x2000) as two adjacent regions, then a hole, then
    [0x10000, 0x11000)."""
    return GuestMemory(
        [
            GuestRegion.from_buffer(bytearray(0x1000), 0x0),
            GuestRegion.from_buffer(bytearray(0x1000), 0x1000),
            GuestRegion.from_buffer(bytearray(0x1000), 0x10000),
        ]
    )


@pytest.fixture
def memfd_memory() -> Iterator[tuple[GuestMemory, int]]:
    mem, fd = GuestMemory.memfd(0x10000, 0x100000)
    try:
        yield mem, fd
    finally:
        os.close(fd)


# -- region sources -----------------------------------------------------------------


def test_memory_from_bytearray_shares_the_buffer() -> None:
    buf = bytearray(0x1000)
    mem = GuestMemory.from_buffer(buf, 0x2000)
    mem.write(0x2010, b"abc")
    assert buf[0x10:0x13] == b"abc"
    buf[0x20] = 7
    assert mem.read_u8(0x2020) == 7
    assert mem.total_size == 0x1000
    (region,) = mem.regions
    assert (region.guest_addr, region.size, region.last_addr) == (0x2000, 0x1000, 0x2FFF)


def test_memory_memfd_is_shared_with_the_fd(memfd_memory: tuple[GuestMemory, int]) -> None:
    mem, fd = memfd_memory
    mem.write(0x100100, b"hello")
    assert os.pread(fd, 5, 0x100) == b"hello"
    os.pwrite(fd, b"world", 0x200)
    assert mem.read(0x100200, 5) == b"world"


def test_region_from_fd_with_offset_maps_that_part_of_the_file() -> None:
    with tempfile.TemporaryFile() as f:
        page = os.sysconf("SC_PAGESIZE")
        f.write(bytes(range(256)) * (3 * page // 256))
        f.flush()
        region = GuestRegion.from_fd(f.fileno(), page, 0x40000, offset=page)
        mem = GuestMemory([region])
        assert mem.read(0x40000, 4) == bytes(range(4))
        mem.write(0x40001, b"\xff")
        f.seek(page + 1)
        assert f.read(1) == b"\xff"


def test_region_from_fd_with_unaligned_offset_maps_from_that_byte() -> None:
    with tempfile.TemporaryFile() as f:
        f.write(bytes(range(256)) * 64)
        f.flush()
        region = GuestRegion.from_fd(f.fileno(), 0x100, 0x0, offset=0x1003)
        assert GuestMemory([region]).read(0, 2) == bytes([3, 4])


def test_region_memfd_returns_region_and_fd() -> None:
    region, fd = GuestRegion.memfd(0x2000, 0x8000)
    try:
        mem = GuestMemory([region])
        mem.write_u32(0x9000, 0xDEADBEEF)
        assert os.pread(fd, 4, 0x1000) == struct.pack("<I", 0xDEADBEEF)
    finally:
        os.close(fd)


def test_region_readonly_fd_refuses_writes() -> None:
    region, fd = GuestRegion.memfd(0x1000, 0)
    try:
        ro = GuestRegion.from_fd(fd, 0x1000, 0x10000, writable=False)
        mem = GuestMemory([region, ro])
        assert not ro.writable
        assert mem.read(0x10000, 4) == bytes(4)
        with pytest.raises(GuestMemoryError):
            mem.write(0x10000, b"x")
    finally:
        os.close(fd)


def test_region_empty_buffer_is_refused() -> None:
    with pytest.raises(GuestMemoryError):
        GuestRegion.from_buffer(bytearray(), 0)


def test_region_overflowing_address_space_is_refused() -> None:
    with pytest.raises(GuestMemoryError):
        GuestRegion.from_buffer(bytearray(0x1000), U64_MAX - 0x10)


def test_memory_overlapping_regions_are_refused() -> None:
    a = GuestRegion.from_buffer(bytearray(0x1000), 0x1000)
    b = GuestRegion.from_buffer(bytearray(0x1000), 0x1800)
    with pytest.raises(GuestMemoryError):
        GuestMemory([a, b])
    mem = GuestMemory([a])
    with pytest.raises(GuestMemoryError):
        mem.add_region(b)
    assert len(mem) == 1


def test_memory_same_region_twice_is_refused() -> None:
    a = GuestRegion.from_buffer(bytearray(0x1000), 0x1000)
    with pytest.raises(GuestMemoryError):
        GuestMemory([a, a])


# -- translation ----------------------------------------------------------------------


def test_translate_inside_one_region_gives_host_address(two_regions: GuestMemory) -> None:
    base = two_regions.translate(0x1000, 0x1000)
    assert two_regions.translate(0x1010, 1) == base + 0x10
    assert two_regions.check_range(0x1FFF, 1)


def test_translate_crossing_adjacent_regions_is_mapped_but_has_no_host_pointer(
    two_regions: GuestMemory,
) -> None:
    # The two regions are adjacent in guest space but not in host space: the range is
    # mapped (rust-vmm's check_range agrees) and copies run over both, but one host
    # address or view cannot span them.
    assert two_regions.check_range(0xFFF, 2)
    two_regions.check_access(0x800, 0x1000, write=True)
    with pytest.raises(GuestMemoryError, match="crosses from one region into the next at 0x1000"):
        two_regions.translate(0xFFF, 2)
    with pytest.raises(GuestMemoryError, match="at 0x1000"):
        two_regions.get_slice(0x800, 0x1000)
    data = bytes(range(256)) * 16
    two_regions.write(0x800, data)
    assert two_regions.read(0x800, 0x1000) == data
    assert two_regions.read(0x800, 0x800) + two_regions.read(0x1000, 0x800) == data


def test_translate_unmapped_raises(two_regions: GuestMemory) -> None:
    for gpa, n in [(0x2000, 1), (0x1FFF, 2), (0xFFFF, 1), (0x11000, 1), (0x10FFF, 2)]:
        assert not two_regions.check_range(gpa, n)
        with pytest.raises(GuestMemoryError):
            two_regions.translate(gpa, n)


@pytest.mark.parametrize(
    ("gpa", "length"),
    [(U64_MAX, 2), (U64_MAX - 7, 16), (0x10, U64_MAX), (U64_MAX, U64_MAX)],
)
def test_translate_overflow_near_2_64_raises(gpa: int, length: int) -> None:
    mem = GuestMemory.from_buffer(bytearray(0x1000))
    assert not mem.check_range(gpa, length)
    with pytest.raises(GuestMemoryError):
        mem.translate(gpa, length)


def test_translate_region_ending_at_2_64_is_usable() -> None:
    mem = GuestMemory.from_buffer(bytearray(0x1000), (1 << 64) - 0x1000)
    mem.write_u64(U64_MAX - 7, 0x0102030405060708)
    assert mem.read_u64(U64_MAX - 7) == 0x0102030405060708
    assert mem.check_range(U64_MAX, 1)
    with pytest.raises(GuestMemoryError):
        mem.read(U64_MAX, 2)


def test_translate_zero_length_at_mapped_address_is_valid(two_regions: GuestMemory) -> None:
    assert two_regions.check_range(0x10, 0)
    assert two_regions.read(0x10, 0) == b""


def test_memory_empty_refuses_everything() -> None:
    mem = GuestMemory()
    assert not mem.check_range(0, 1)
    with pytest.raises(GuestMemoryError):
        mem.read_u8(0)


def test_find_region_returns_the_holder(two_regions: GuestMemory) -> None:
    r = two_regions.find_region(0x10800)
    assert r is not None and r.guest_addr == 0x10000
    assert two_regions.find_region(0x5000) is None


# -- helpers --------------------------------------------------------------------------


def test_scalar_helpers_are_little_endian() -> None:
    buf = bytearray(64)
    mem = GuestMemory.from_buffer(buf)
    mem.write_u16(0, 0x0102)
    mem.write_u32(2, 0x03040506)
    mem.write_u64(6, 0x0708090A0B0C0D0E)
    mem.write_u8(14, 0xFF)
    assert bytes(buf[:15]) == bytes.fromhex("0201 06050403 0e0d0c0b0a090807 ff")
    assert (mem.read_u16(0), mem.read_u32(2), mem.read_u64(6), mem.read_u8(14)) == (
        0x0102,
        0x03040506,
        0x0708090A0B0C0D0E,
        0xFF,
    )


def test_read_obj_write_obj_use_little_endian_struct() -> None:
    buf = bytearray(32)
    mem = GuestMemory.from_buffer(buf, 0x1000)
    mem.write_obj(0x1000, "QIHH", 0x1122334455667788, 0x99AABBCC, 0xDDEE, 0x0F)
    assert bytes(buf[:16]) == struct.pack("<QIHH", 0x1122334455667788, 0x99AABBCC, 0xDDEE, 0x0F)
    assert mem.read_obj(0x1000, "QIHH") == (0x1122334455667788, 0x99AABBCC, 0xDDEE, 0x0F)


def test_readinto_fills_the_buffer() -> None:
    mem = GuestMemory.from_buffer(bytearray(b"0123456789"))
    out = bytearray(4)
    mem.readinto(3, out)
    assert out == b"3456"
    with pytest.raises(GuestMemoryError):
        mem.readinto(8, out)


def test_write_out_of_range_changes_nothing() -> None:
    buf = bytearray(16)
    mem = GuestMemory.from_buffer(buf)
    with pytest.raises(GuestMemoryError):
        mem.write(10, b"x" * 7)
    assert buf == bytearray(16)


def test_get_slice_is_a_writable_view_into_guest_memory() -> None:
    buf = bytearray(0x100)
    mem = GuestMemory.from_buffer(buf, 0x1000)
    view = mem.get_slice(0x1010, 8)
    assert len(view) == 8 and not view.readonly
    view[0:4] = b"abcd"
    assert buf[0x10:0x14] == b"abcd"
    with pytest.raises(GuestMemoryError):
        mem.get_slice(0x10F8, 9)


def test_generation_bumps_on_every_change() -> None:
    mem = GuestMemory()
    g0 = mem.generation
    mem.add_region(GuestRegion.from_buffer(bytearray(16), 0))
    g1 = mem.generation
    mem.remove_region(0)
    g2 = mem.generation
    assert g0 < g1 < g2


def test_remove_region_unknown_raises(two_regions: GuestMemory) -> None:
    with pytest.raises(GuestMemoryError):
        two_regions.remove_region(0x800)


def test_remove_region_makes_range_unmapped(two_regions: GuestMemory) -> None:
    removed = two_regions.remove_region(0x1000)
    assert removed.guest_addr == 0x1000
    assert not two_regions.check_range(0x1000, 1)
    assert two_regions.check_range(0x0, 0x1000)


# -- deferred unmap ---------------------------------------------------------------------


def test_remove_region_while_view_alive_keeps_view_readable() -> None:
    region, fd = GuestRegion.memfd(0x10000, 0x100000)
    os.close(fd)
    mem = GuestMemory([region])
    mem.write(0x100000, b"still here")
    view = mem.get_slice(0x100000, 10)
    del region
    mem.remove_region(0x100000)
    gc.collect()
    assert bytes(view) == b"still here"
    view[0:5] = b"STILL"  # still mapped, so writing does not fault either
    assert bytes(view) == b"STILL here"
    view.release()


def test_remove_region_while_chain_and_reader_alive_keeps_them_readable() -> None:
    mem, fd = GuestMemory.memfd(0x10000)
    os.close(fd)
    mock = MockSplitQueue(mem, 8)
    mem.write(0x8000, b"payload!")
    mock.add_chain([(0x8000, 8)])
    q = mock.create_queue()
    chain = q.pop_chain()
    assert chain is not None
    reader_before = chain.reader()
    mem.remove_region(0)
    gc.collect()
    assert [(d.addr, d.len) for d in chain.descriptors()] == [(0x8000, 8)]
    assert reader_before.read() == b"payload!"
    assert chain.reader().read() == b"payload!"


def test_pymemory_standin_agrees_with_core_on_checks(two_regions: GuestMemory) -> None:
    py = PyGuestMemory([(0x0, bytearray(0x1000)), (0x1000, bytearray(0x1000)), (0x10000, bytearray(0x1000))])
    probes = [
        (0, 0),
        (0xFFF, 1),
        (0xFFF, 2),
        (0x1000, 0x1000),
        (0x2000, 0),
        (0x10FFF, 1),
        (U64_MAX, 1),
        (U64_MAX - 7, 16),
    ]
    for gpa, n in probes:
        # The stand-in holds ranges to one region, as the core's host pointers do.
        try:
            two_regions.translate(gpa, n)
            one_region = True
        except GuestMemoryError:
            one_region = False
        assert py.check_range(gpa, n) == one_region, (gpa, n)


def test_region_from_bytes_is_read_only() -> None:
    data = bytes(0x100)
    mem = GuestMemory.from_buffer(data)
    assert not mem.regions[0].writable
    with pytest.raises(GuestMemoryError):
        mem.write(0, b"x")
    assert data == bytes(0x100)
    assert mem.get_slice(0, 4).readonly


def test_region_from_bytearray_pins_the_buffer() -> None:
    """While mapped, the bytearray cannot be resized (its memory would move)."""
    buf = bytearray(0x100)
    mem = GuestMemory.from_buffer(buf)
    with pytest.raises(BufferError):
        buf.extend(b"x")
    assert mem.read(0, 1) == b"\0"


# -- ring indexes are read and written whole ----------------------------------------------

# The other side of a ring flips a field between two values whose both bytes differ
# (0x58FF -> 0x5900, as a ring index does when it crosses 0x..FF); a read done byte by
# byte sees 0x59FF or 0x5800 now and then, and a driver that reads used->idx that way
# finds "used range ... longer than the ring".
_FLIP = {2: (0x58FF, 0x5900), 4: (0x1234FFFF, 0x12350000)}
_OTHER_SIDE = """
import ctypes, mmap, os, sys
fd, width, writer, ready = (int(a) for a in sys.argv[1:5])
m = mmap.mmap(fd, 4096)
v = (ctypes.c_uint16 if width == 2 else ctypes.c_uint32).from_buffer(m, 8)
a, b = {2: (0x58FF, 0x5900), 4: (0x1234FFFF, 0x12350000)}[width]
os.write(ready, b"r")
if writer:
    while True:
        v.value = a
        v.value = b
else:
    torn = 0
    for _ in range(300_000):
        if v.value not in (0, a, b):
            torn += 1
    print(torn)
"""


@pytest.mark.parametrize("width", [2, 4])
def test_scalar_reads_see_a_field_changed_by_another_process_whole(
    memfd_memory: tuple[GuestMemory, int], width: int
) -> None:
    """read_u16/read_u32 of an aligned field are one load each (VIRTIO 1.2 §2.7.13:
    the ring indexes are read as a whole): another process flipping the field's
    every byte is never seen half-way."""
    mem, fd = memfd_memory
    r, w = os.pipe()
    child = subprocess.Popen(
        [sys.executable, "-c", _OTHER_SIDE, str(fd), str(width), "1", str(w)], pass_fds=(fd, w)
    )
    try:
        assert os.read(r, 1) == b"r"
        read = mem.read_u16 if width == 2 else mem.read_u32
        values = {read(0x100000 + 8) for _ in range(300_000)}
    finally:
        child.kill()
        child.wait()
        os.close(r)
        os.close(w)
    assert values <= {0, *_FLIP[width]}, f"torn reads: {sorted(hex(v) for v in values - {0, *_FLIP[width]})}"


@pytest.mark.parametrize("width", [2, 4])
def test_scalar_writes_are_seen_by_another_process_whole(
    memfd_memory: tuple[GuestMemory, int], width: int
) -> None:
    """write_u16/write_u32 of an aligned field are one store each: another process
    reading it while it flips never sees half of a change."""
    mem, fd = memfd_memory
    r, w = os.pipe()
    child = subprocess.Popen(
        [sys.executable, "-c", _OTHER_SIDE, str(fd), str(width), "0", str(w)],
        pass_fds=(fd, w), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    write = mem.write_u16 if width == 2 else mem.write_u32
    a, b = _FLIP[width]
    try:
        assert os.read(r, 1) == b"r"
        while child.poll() is None:
            for _ in range(1000):
                write(0x100000 + 8, a)
                write(0x100000 + 8, b)
        out, _ = child.communicate()
    finally:
        os.close(r)
        os.close(w)
    assert child.returncode == 0
    assert int(out) == 0, f"{int(out)} torn reads of what write_u{8 * width} stored"
