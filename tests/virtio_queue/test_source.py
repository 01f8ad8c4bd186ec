"""virtio_queue.ByteSource: the fd source of the compiled fill paths."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from virtio_queue import ByteSource, GuestMemory
from virtio_queue.testing import VIRTQ_DESC_F_WRITE, MockSplitQueue, RawDesc


def test_byte_source_reads_its_fd() -> None:
    r, w = os.pipe()
    try:
        os.write(w, b"abc")
        src = ByteSource(r)
        assert src.fd == src.fileno() == r
        buf = bytearray(8)
        assert src.readinto(buf) == 3 and buf[:3] == b"abc"
        os.set_blocking(r, False)
        assert src.readinto(buf) is None  # EAGAIN: nothing now
        os.close(w)
        w = -1
        assert src.readinto(buf) == 0  # end of file
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert repr(src) == f"ByteSource(fd={r})"


def test_byte_source_errors_are_oserrors() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError) as info:
        ByteSource(r).readinto(bytearray(4))
    assert info.value.errno == errno.EBADF
    with pytest.raises(BufferError):
        ByteSource(0).readinto(b"read-only")


def test_queue_fill_from_byte_source_matches_fill_from_fd(tmp_path: Path) -> None:
    """Queue.fill_from_fd is fill_from over ByteSource(fd): the same chains, bytes
    and used ring."""
    data = bytes(range(256)) * 4
    path = tmp_path / "src"
    path.write_bytes(data)
    results = []
    for use_source in (False, True):
        mem = GuestMemory.from_buffer(bytearray(1 << 20))
        mock = MockSplitQueue(mem, 16)
        q = mock.create_queue()
        for i in range(5):
            mock.add_chain([RawDesc(0x8000 + 0x1000 * i, 100 + i, VIRTQ_DESC_F_WRITE, 0)])
        fd = os.open(path, os.O_RDONLY)
        try:
            got = q.fill_from(ByteSource(fd)) if use_source else q.fill_from_fd(fd)
        finally:
            os.close(fd)
        guest = [mem.read(0x8000 + 0x1000 * i, 100 + i) for i in range(5)]
        results.append((got, mock.used_elems(), guest))
    assert results[0] == results[1]
    assert results[1][0] == (5, 510, None)
    assert b"".join(results[1][2]) == data[:510]


def test_queue_fill_from_rejects_what_is_not_a_source() -> None:
    mem = GuestMemory.from_buffer(bytearray(1 << 16))
    q = MockSplitQueue(mem, 16).create_queue()
    with pytest.raises(TypeError):
        q.fill_from(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        q.fill_from(None)  # type: ignore[arg-type]
