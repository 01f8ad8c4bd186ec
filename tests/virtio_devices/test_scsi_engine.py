"""The compiled request path of virtio-scsi (virtio_devices/scsi/_engine.pyx).

The engine serves READ/WRITE(10/16) of the common shape; the Python path serves
everything else.  The differential test sends the same requests to a device with
the engine and to one without and checks that both answer the same, byte for byte,
and leave the same image; the others check the engine's own decisions (what it
refuses, inline writes that turn slow, the eventfd completion path, no io_uring).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import mmap
import os
import select
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_devices.hosts.images import DiskImage, ImageError, open_image
from virtio_devices.scsi import device as scsi_device
from virtio_devices.scsi.device import ScsiDevice
from virtio_devices.scsi.testing import (
    RESP_HEADER,
    Resp,
    cmd_req,
    inquiry,
    lun_bytes,
    read10,
    read16,
    write10,
    write16,
)
from virtio_devices.testing import DeviceRig, FakeInterrupt
from virtio_queue import GuestMemory, GuestRegion, InvalidAvailRingIndex
from virtio_queue.testing import VIRTQ_DESC_F_WRITE, RawDesc

BLOCKS = 64
IMAGE = bytes((i * 13 + i // 512) & 0xFF for i in range(BLOCKS * 512))
RQ = 2


class Pair:
    """Two devices over equal memfd images: ``fast`` with the engine, ``slow`` without."""

    def __init__(self, *, read_only: bool = False, pool: str = "") -> None:
        """``pool``: "direct", O_DIRECT transfers on the engine's threads; "fixed",
        the same but those in one buffer through the ring's registered buffers;
        "cached", page-cache ones on the threads; "": the engine's defaults."""
        self.rigs: list[DeviceRig] = []
        self.images: list[list[DiskImage]] = []
        for engine in (True, False):
            imgs = [DiskImage.from_bytes(IMAGE, name="lun0"), DiskImage.from_bytes(512 * 8, name="lun1")]
            if engine and pool in ("direct", "fixed"):
                # The engine routes a transfer by its LUN's O_DIRECT fd and the
                # buffers' alignment; a memfd refuses O_DIRECT, so a second fd of
                # it stands in: what is under test is the threads, not the flag.
                for img in imgs:
                    img.direct_fd = os.dup(img.fd)
            dev = ScsiDevice(imgs, read_only=read_only, use_engine=engine)
            self.rigs.append(DeviceRig(dev, queue_size=64, memory_size=8 << 20, event_idx=True))
            self.images.append(imgs)
        engine_dev = self.rigs[0].device
        assert isinstance(engine_dev, ScsiDevice)
        if engine_dev._engine is None:
            self.close()
            pytest.skip("io_uring is not available here")
        if pool in ("direct", "fixed"):
            engine_dev._engine.pool_min_read = engine_dev._engine.pool_min_write = 512
            if pool == "direct":
                engine_dev._engine.fixed_max = 0
        elif pool == "cached":
            engine_dev._engine.pool_min_cached_read = engine_dev._engine.pool_min_cached_write = 512

    @property
    def engine(self) -> scsi_device.Engine:
        dev = self.rigs[0].device
        assert isinstance(dev, ScsiDevice) and dev._engine is not None
        return dev._engine

    def run(self, readable: Sequence[bytes], writable: Sequence[int]) -> list[tuple[int, bytes]]:
        """The request on both devices: per device, (used length, every writable byte)."""
        out = []
        for rig in self.rigs:
            head, outs = rig.add_request(RQ, readable, writable)
            used = rig.kick(RQ)
            if not used:
                rig.complete_workers()
                used = rig.used(RQ)
            assert [h for h, _ in used] == [head]
            written = b"".join(rig.read(gpa, n) for gpa, n in zip(outs, writable, strict=True))
            out.append((used[0][1], written))
        return out

    def image(self, which: int, k: int = 0) -> bytes:
        img = self.images[which][k]
        return os.pread(img.fd, img.size, 0)

    def close(self) -> None:
        for rig, imgs in zip(self.rigs, self.images, strict=False):
            rig.close()
            for img in imgs:
                img.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    yield p
    p.close()


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at these offsets (buffers of a chain; empty pieces dropped)."""
    pieces, last = [], 0
    for c in sorted({min(max(c, 0), len(data)) for c in cuts}):
        pieces.append(data[last:c])
        last = c
    pieces.append(data[last:])
    return [p for p in pieces if p]


@settings(max_examples=200, deadline=None)
@given(
    op=st.sampled_from([0x28, 0x2A, 0x88, 0x8A, 0x08, 0x0A]),
    lba=st.integers(0, BLOCKS + 4),
    blocks=st.integers(0, 9),
    flags=st.sampled_from([0, 0x08, 0x10, 0x20]),
    control=st.sampled_from([0, 0x04]),
    lun=st.sampled_from(
        [lun_bytes(0), lun_bytes(1), lun_bytes(5), lun_bytes(0, target=1), b"\x01\x00\x80\x00" + bytes(4)]
    ),
    data_in=st.integers(0, 12).map(lambda n: n * 256),
    data_out=st.integers(0, 12).map(lambda n: n * 256),
    cuts=st.lists(st.integers(0, 3200), max_size=3),
    fill=st.integers(0, 255),
    read_only=st.booleans(),
)
def test_engine_answers_as_the_python_path(  # noqa: PLR0917 - hypothesis passes them by name
    op: int,
    lba: int,
    blocks: int,
    flags: int,
    control: int,
    lun: bytes,
    data_in: int,
    data_out: int,
    cuts: list[int],
    fill: int,
    read_only: bool,
) -> None:
    """Same requests, same answers (used length, response header, data-in) and
    the same image, whether the engine or the Python path serves them."""
    p = Pair(read_only=read_only)
    try:
        if op in (0x08, 0x0A):
            cdb = bytes([op, (lba >> 16) & 0x1F, (lba >> 8) & 0xFF, lba & 0xFF, blocks, control])
        elif op in (0x28, 0x2A):
            cdb = struct.pack(">BBIBHB", op, flags, lba, 0, blocks, control)
        else:
            cdb = struct.pack(">BBQIBB", op, flags, lba, blocks, 0, control)
        header = lun + cmd_req(cdb)[8:]
        payload = bytes([fill]) * data_out
        readable = _split(header + payload, [51, *cuts])
        writable = [RESP_HEADER] + ([data_in] if data_in else [])
        fast, slow = p.run(readable, writable)
        assert fast == slow
        assert p.image(0) == p.image(1) and p.image(0, 1) == p.image(1, 1)
    finally:
        p.close()


def _run_batch(
    rig: DeviceRig, requests: Sequence[Sequence[tuple[bytes | int, bool]]]
) -> list[tuple[int, bytes]]:
    """Make every request available (buffers: bytes to read, or a size to write,
    each 512-byte aligned after the first), kick once, wait for all; per request in
    order, (used length, every writable byte)."""
    mock = rig.mocks[RQ]
    heads, outs = [], []
    for bufs in requests:
        descs, mine = [], []
        for k, (buf, writable) in enumerate(bufs):
            n = buf if isinstance(buf, int) else len(buf)
            gpa = mock.alloc(max(n, 1), align=16 if k == 0 else 512)
            rig.memory.write(gpa, b"\xee" * n if isinstance(buf, int) else buf)
            descs.append(RawDesc(gpa, n, VIRTQ_DESC_F_WRITE if writable else 0, 0))
            if writable:
                mine.append((gpa, n))
        heads.append(rig.add_chain(RQ, descs))
        outs.append(mine)
    done = dict(rig.kick(RQ))
    while len(done) < len(heads):
        rig.complete_workers()
        done.update(rig.used(RQ))
    return [
        (done[h], b"".join(rig.read(gpa, n) for gpa, n in mine)) for h, mine in zip(heads, outs, strict=True)
    ]


@settings(max_examples=60, deadline=None)
@given(
    requests=st.lists(
        st.tuples(
            st.sampled_from([0x28, 0x2A, 0x88, 0x8A]),
            st.integers(0, BLOCKS + 2),
            st.integers(1, 9),
            st.booleans(),
            st.sampled_from([0, 1]),
            st.integers(-1, 1),
            st.lists(st.integers(1, 8), max_size=3),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=8,
    ),
    pool=st.sampled_from(["direct", "fixed", "cached"]),
)
def test_engine_threads_answer_as_the_python_path(
    requests: list[tuple[int, int, int, bool, int, int, list[int], int]], pool: str
) -> None:
    """Transfers on the engine's threads (through the O_DIRECT fd or the page
    cache), several in flight at once, give the same answers (used length,
    response, data-in) and the same image as the Python path; every request the
    engine serves goes to the threads (with ``pool="fixed"``: those in one buffer
    through registered buffers on the ring)."""
    p = Pair(pool=pool)
    try:
        # A read and a write of the same block in flight at once may run in either
        # order (SAM-5 SIMPLE tasks): such a pair goes to the next batch.
        batches: list[list[list[tuple[bytes | int, bool]]]] = [[]]
        spans: list[tuple[int, int, int, bool]] = []
        expect = 0
        for op, lba, blocks, fua, lun, slack, cuts, fill in requests:
            write = op in (0x2A, 0x8A)
            if op in (0x28, 0x2A):
                cdb = struct.pack(">BBIBHB", op, 0x08 if fua else 0, lba, 0, blocks, 0)
            else:
                cdb = struct.pack(">BBQIBB", op, 0x08 if fua else 0, lba, blocks, 0, 0)
            nbytes = (blocks + slack) * 512
            edges = sorted({c * 512 for c in cuts if c * 512 < nbytes})
            sizes = [b - a for a, b in zip([0, *edges], [*edges, nbytes], strict=True) if b > a]
            bufs: list[tuple[bytes | int, bool]] = [(lun_bytes(lun) + cmd_req(cdb)[8:], False)]
            if write:
                bufs += [(bytes([fill ^ i]) * n, False) for i, n in enumerate(sizes)]
                bufs.append((RESP_HEADER, True))
            else:
                bufs.append((RESP_HEADER, True))
                bufs += [(n, True) for n in sizes]
            span = (lun, lba, lba + blocks, write)
            if any(o[0] == lun and o[1] < span[2] and span[1] < o[2] and (write or o[3]) for o in spans):
                batches.append([])
                spans = []
            batches[-1].append(bufs)
            spans.append(span)
            expect += slack >= 0 and lba + blocks <= (BLOCKS if lun == 0 else 8)
        before = p.engine.pool_requests + p.engine.fixed_requests
        for batch in batches:
            fast, slow = (_run_batch(rig, batch) for rig in p.rigs)
            assert fast == slow
        assert p.image(0) == p.image(1) and p.image(0, 1) == p.image(1, 1)
        assert p.engine.pool_requests + p.engine.fixed_requests - before == expect
        assert p.engine.fixed_error == 0
    finally:
        p.close()


def test_large_page_cache_reads_go_to_the_threads_and_writes_stay_inline() -> None:
    """Page-cache reads of ``pool_min_cached_read`` (256 KiB) and more run on the
    engine's threads (copies side by side); smaller ones, and writes of any size,
    stay on the loop's thread (inline, or the ring where the file refuses
    RWF_NOWAIT)."""
    data = os.urandom(1 << 20)
    img = DiskImage.from_bytes(data, name="lun0")
    dev = ScsiDevice([img])
    rig = DeviceRig(dev, queue_size=16, memory_size=8 << 20)
    try:
        eng = dev._engine
        if eng is None:
            pytest.skip("io_uring is not available here")
        assert (eng.pool_min_cached_read, eng.pool_min_cached_write) == (256 << 10, 1 << 62)
        pool, writes = eng.pool_requests, eng.inline_writes
        assert _direct_run(rig, read10(0, 512), data_in=256 << 10) == data[: 256 << 10]
        assert eng.pool_requests == pool + 1
        # (A memfd refuses RWF_NOWAIT, so this read goes to the ring, not inline.)
        assert _direct_run(rig, read10(512, 256), data_in=128 << 10) == data[256 << 10 : 384 << 10]
        _direct_run(rig, write10(1024, 1024), data[::-1][: 512 << 10])
        assert (eng.pool_requests, eng.inline_writes) == (pool + 1, writes + 1)
        assert os.pread(img.fd, 512 << 10, 512 << 10) == data[::-1][: 512 << 10]
    finally:
        rig.close()
        img.close()


def test_engine_serves_reads_and_writes_over_split_buffers(pair: Pair) -> None:
    """A header and data cut over several buffers are served by the engine."""
    eng = pair.engine
    served0 = eng.inline_reads + eng.inline_writes + eng.ring_requests
    hdr = cmd_req(write16(3, 2, flags=0x08))
    data = bytes(range(256)) * 4
    fast, slow = pair.run([hdr[:20], hdr[20:], data[:100], data[100:700], data[700:]], [60, 48])
    assert fast == slow and Resp.parse(fast[1][:RESP_HEADER]).status == 0
    assert pair.image(0)[3 * 512 : 5 * 512] == data
    hdr = cmd_req(read10(3, 2))
    fast, slow = pair.run([hdr[:7], hdr[7:]], [RESP_HEADER, 300, 724])
    assert fast == slow and fast[1][RESP_HEADER:] == data
    assert eng.inline_reads + eng.inline_writes + eng.ring_requests == served0 + 2


def test_engine_leaves_readable_after_writable_to_python(pair: Pair) -> None:
    """A device-readable buffer after a device-writable one (VIRTIO 1.2 §2.7.4.2
    orders them) is not the engine's: the Python path decides what to answer."""
    rig = pair.rigs[0]
    reads = pair.engine.inline_reads
    resp, extra = rig.alloc(RQ, RESP_HEADER), rig.alloc(RQ, b"\0" * 16)
    hdr = rig.alloc(RQ, cmd_req(read10(0, 1)))
    data = rig.alloc(RQ, 512)
    rig.add_chain(
        RQ,
        [
            RawDesc(hdr, 51, 0, 0),
            RawDesc(resp, RESP_HEADER, VIRTQ_DESC_F_WRITE, 0),
            RawDesc(extra, 16, 0, 0),
            RawDesc(data, 512, VIRTQ_DESC_F_WRITE, 0),
        ],
    )
    ring = pair.engine.ring_requests
    rig.kick(RQ)
    assert (pair.engine.inline_reads, pair.engine.ring_requests) == (reads, ring)
    assert pair.engine.in_flight() == 0


def test_slow_inline_write_sends_writes_to_the_ring_until_they_are_fast(pair: Pair) -> None:
    """An inline write slower than ``slow_ns`` sends the LUN's writes to the ring;
    64 ring writes in a row faster than it bring them back inline."""
    eng = pair.engine
    eng.slow_ns = 0  # every inline write is slow
    first = eng.inline_writes
    pair.run([cmd_req(write10(0, 1)), b"\x11" * 512], [RESP_HEADER])
    assert (eng.inline_writes, eng.slow_writes) == (first + 1, 1)
    eng.slow_ns = 10**12  # every ring write is fast
    for k in range(64):
        pair.run([cmd_req(write10(k % BLOCKS, 1)), bytes([k]) * 512], [RESP_HEADER])
    assert eng.inline_writes == first + 1  # all 64 through the ring
    pair.run([cmd_req(write10(1, 1)), b"\x22" * 512], [RESP_HEADER])
    assert eng.inline_writes == first + 2
    assert pair.image(0) == pair.image(1)


def test_ring_completion_through_the_eventfd(pair: Pair) -> None:
    """A FUA write goes through the ring (RWF_DSYNC); when it did not complete at
    once, the loop's reader of the engine's eventfd finishes it."""
    rig = pair.rigs[0]
    head, (out,) = rig.add_request(RQ, [cmd_req(write10(5, 1, flags=0x08)), b"\x5a" * 512], [RESP_HEADER])
    used = rig.kick(RQ)
    if not used:
        assert select.select([pair.engine.fd], [], [], 10)[0]
        rig.loop.fire_reader(pair.engine.fd)
        used = rig.used(RQ)
    assert used == [(head, RESP_HEADER)]
    assert Resp.parse(rig.read(out, RESP_HEADER)).status == 0
    assert pair.image(0)[5 * 512 : 6 * 512] == b"\x5a" * 512


def test_without_io_uring_every_request_takes_the_python_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """io_uring refused (a seccomp filter, io_uring_disabled): the device still serves."""

    def refuse(*args: object) -> None:
        raise OSError(1, "io_uring_queue_init refused")

    monkeypatch.setattr(scsi_device, "Engine", refuse)
    img = DiskImage.from_bytes(IMAGE)
    dev = ScsiDevice([img])
    try:
        with DeviceRig(dev, queue_size=16, memory_size=4 << 20) as rig:
            assert dev._engine is None
            head, (_, data) = rig.add_request(RQ, [cmd_req(read16(2, 1))], [RESP_HEADER, 512])
            used = rig.kick(RQ)
            if not used:
                rig.complete_workers()
                used = rig.used(RQ)
            assert used == [(head, RESP_HEADER + 512)]
            assert rig.read(data, 512) == IMAGE[1024:1536]
    finally:
        img.close()


def _direct_image(tmp_path: Path) -> DiskImage:
    """A writable image of ``IMAGE * 4``, ``tmp_path / "direct.img"``, opened with
    O_DIRECT (skips where the file system refuses it)."""
    path = tmp_path / "direct.img"
    path.write_bytes(IMAGE * 4)
    try:
        return open_image(str(path), read_only=False, direct=True)
    except ImageError:
        pytest.skip("this file system refuses O_DIRECT")


def test_direct_io_goes_through_the_o_direct_fd(tmp_path: Path) -> None:
    """With an O_DIRECT fd, aligned transfers go through it, never inline: from
    64 KiB on the engine's threads (the ring when there are none), smaller ones on
    the ring; unaligned ones use the page cache; all land in the file."""
    # No registered buffers: the threads' rule.
    with _direct_rig(tmp_path, fixed_max=0) as (rig, _dev, eng):

        def run(cdb: bytes, data: bytes = b"", data_in: int = 0, align: int = 4096) -> bytes:
            return _direct_run(rig, cdb, data, data_in=data_in, align=align)

        pool, ring = eng.pool_requests, eng.ring_requests
        inline = eng.inline_reads + eng.inline_writes
        big = bytes(range(256)) * 256  # 64 KiB: the engine's threads
        run(write10(32, 128), big)
        assert run(read10(32, 128), data_in=len(big)) == big
        run(write10(24, 128, flags=0x08), big)  # FUA: RWF_DSYNC on a thread
        run(write10(8, 8), b"\x3c" * 4096)  # small: the ring
        assert run(read10(8, 8), data_in=4096) == b"\x3c" * 4096
        assert (eng.pool_requests, eng.ring_requests) == (pool + 3, ring + 2)
        assert eng.inline_reads + eng.inline_writes == inline
        # An odd buffer address: the page cache (the buffered fd), inline.
        run(write10(16, 1), b"\x4d" * 512, align=8)
        assert run(read10(16, 1), data_in=512, align=8) == b"\x4d" * 512
        assert eng.pool_requests == pool + 3
        # Without threads, large O_DIRECT transfers take the ring too.
        eng.direct_threads = 0
        assert run(read10(32, 128), data_in=len(big)) == big
        assert (eng.ring_requests, eng.pool_requests) == (ring + 3, pool + 3)
    data = (tmp_path / "direct.img").read_bytes()
    assert data[8 * 512 : 16 * 512] == b"\x3c" * 4096 and data[16 * 512 : 17 * 512] == b"\x4d" * 512
    assert data[24 * 512 : 32 * 512] == big[: 8 * 512] and data[32 * 512 : 160 * 512] == big


def _direct_run(
    rig: DeviceRig,
    cdb: bytes,
    data: bytes = b"",
    *,
    data_in: int = 0,
    at: int | None = None,
    split: int = 0,
    align: int = 4096,
) -> bytes:
    """One READ/WRITE through ``rig``'s request queue with a buffer at guest address
    ``at``, or allocated at an address of alignment ``align`` (not ``2 * align``),
    as one descriptor or, with ``split``, two apart (the first ``split`` bytes, a
    page's gap, then the rest); returns the data read."""
    hdr = rig.alloc(RQ, cmd_req(cdb))
    resp = rig.alloc(RQ, RESP_HEADER)
    n = len(data) or data_in
    if at is None:
        at = (rig.alloc(RQ, n + 12288) + 4095) // 4096 * 4096 + (4096 - align) % 4096
    buf = at
    flags = VIRTQ_DESC_F_WRITE if data_in else 0
    parts = [(buf, split), (buf + split + 4096, n - split)] if split else [(buf, n)]
    descs = [RawDesc(hdr, 51, 0, 0)]
    if data:
        for (a, k), at_ in zip(parts, (0, split), strict=False):
            rig.memory.write(a, data[at_ : at_ + k])
        descs += [RawDesc(a, k, 0, 0) for a, k in parts]
    descs.append(RawDesc(resp, RESP_HEADER, VIRTQ_DESC_F_WRITE, 0))
    if data_in:
        descs += [RawDesc(a, k, flags, 0) for a, k in parts]
    head = rig.add_chain(RQ, descs)
    used = rig.kick(RQ)
    if not used:
        rig.complete_workers()
        used = rig.used(RQ)
    assert [h for h, _ in used] == [head]
    assert Resp.parse(rig.read(resp, RESP_HEADER)).status == 0
    return b"".join(rig.read(a, k) for a, k in parts) if data_in else b""


@contextlib.contextmanager
def _direct_rig(
    tmp_path: Path, *, fixed_max: int | None = None, **rig_kw: Any
) -> Iterator[tuple[DeviceRig, ScsiDevice, scsi_device.Engine]]:
    """A rig (``rig_kw``: DeviceRig's, 16 entries and 16 MiB unless given) over one
    O_DIRECT image (``_direct_image``) and its engine (skips where io_uring is
    unavailable); the image is closed afterwards."""
    img = _direct_image(tmp_path)
    dev = ScsiDevice([img], fixed_max=fixed_max)
    try:
        with DeviceRig(dev, **{"queue_size": 16, "memory_size": 16 << 20, **rig_kw}) as rig:
            if dev._engine is None:
                pytest.skip("io_uring is not available here")
            yield rig, dev, dev._engine
    finally:
        img.close()


def _add_direct_read(rig: DeviceRig, lba: int) -> tuple[int, int, int]:
    """A 4 KiB READ(10) of ``lba`` into one page-aligned guest buffer, added to
    ``rig``'s request queue (not kicked): its head and the addresses of its
    response and of the buffer."""
    hdr = rig.alloc(RQ, cmd_req(read10(lba, 8)))
    resp = rig.alloc(RQ, RESP_HEADER)
    buf = (rig.alloc(RQ, 2 * 4096) + 4095) // 4096 * 4096
    descs = [
        RawDesc(hdr, 51, 0, 0),
        RawDesc(resp, RESP_HEADER, VIRTQ_DESC_F_WRITE, 0),
        RawDesc(buf, 4096, VIRTQ_DESC_F_WRITE, 0),
    ]
    return rig.add_chain(RQ, descs), resp, buf


@pytest.mark.parametrize(("lead", "calls"), [(2, 4), (0, 2)])
def test_a_drain_submits_its_first_requests_at_once_when_nothing_is_in_flight(
    tmp_path: Path, lead: int, calls: int
) -> None:
    """Ring requests go to the kernel in groups of ``submit_batch`` (4) and at the
    end of a drain, but each at once while at most ``submit_lead`` are in flight
    with it: a kick of 8 O_DIRECT reads on an idle engine is submitted as 1, 1, 4
    and the last 2 with the default lead of 2, as 4 and 4 without it; every read
    completes with the image's bytes."""
    with _direct_rig(tmp_path, queue_size=32) as (rig, _dev, eng):  # 8 chains of 3 descriptors
        assert (eng.submit_batch, eng.submit_lead) == (4, 2)
        eng.submit_lead = lead
        eng.spin_ns = 0  # completions through the eventfd, after the drain
        bufs = [_add_direct_read(rig, 8 * k)[2] for k in range(8)]
        before, ring = eng.submit_calls, eng.ring_requests
        used = rig.kick(RQ)
        assert eng.submit_calls - before == calls and eng.ring_requests - ring == 8
        while len(used) < 8:
            rig.complete_workers()
            used += rig.used(RQ)
        image = IMAGE * 4
        assert [rig.read(b, 4096) for b in bufs] == [image[k * 4096 : (k + 1) * 4096] for k in range(8)]


def test_o_direct_transfers_use_registered_buffers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With O_DIRECT, a transfer in one guest buffer goes through the ring as a
    registered ("fixed") buffer at any size: guest RAM is registered with io_uring
    once per memory table (again after it changed, once nothing is in flight);
    a queue taken back gives it up.  A transfer in two buffers (where the kernel has
    no vectored fixed transfers), or with more RAM than ``fixed_max``, pins its
    pages itself as before (the threads from 64 KiB on).  Every byte lands where it
    should; each registration, and each refusal, is one log line."""
    caplog.set_level(logging.INFO, logger="virtio_devices.scsi")
    with _direct_rig(tmp_path) as (rig, dev, eng):
        assert eng.fixed_max == 16 << 30 and eng.fixed_registrations == 0
        big = os.urandom(64 << 10)
        _direct_run(rig, write10(32, 128), big)
        if eng.fixed_error:
            pytest.skip(f"io_uring refused to register guest RAM here (errno {eng.fixed_error})")
        assert _direct_run(rig, read10(32, 128), data_in=len(big)) == big
        small = os.urandom(4096)
        _direct_run(rig, write10(8, 8, flags=0x08), small)  # FUA: RWF_DSYNC, fixed as well
        assert _direct_run(rig, read10(8, 8), data_in=4096) == small
        assert (eng.fixed_registrations, eng.fixed_requests, eng.pool_requests) == (1, 4, 0)
        assert eng.fixed_bytes == 16 << 20
        # A queue taken back (a memory table that removes regions, a reset)
        # unpins it; the next transfer registers the table again.
        dev.quiesce(RQ)
        assert eng.fixed_bytes == 0
        # Two buffers: a vectored fixed transfer where the kernel has it (6.15);
        # without, each transfer pins its own pages (the threads at 64 KiB).
        vec = eng.vec_fixed
        assert _direct_run(rig, read10(32, 128), data_in=len(big), split=4096) == big
        _direct_run(rig, write10(32, 128), big, split=8192)
        assert (eng.fixed_requests, eng.pool_requests) == ((6, 0) if vec else (4, 2))
        eng.vec_fixed = False
        assert _direct_run(rig, read10(32, 128), data_in=len(big), split=4096) == big
        assert (eng.fixed_requests, eng.pool_requests) == ((6, 1) if vec else (4, 3))
        eng.vec_fixed = vec
        done = eng.fixed_requests
        # A new region: the next transfer's chain has a new memory table, which
        # is registered in place of the old one; its buffer there is fixed too.
        region, fd = GuestRegion.memfd(1 << 20, 16 << 20)  # right after the rig's RAM
        try:
            rig.memory.add_region(region)
            _direct_run(rig, write10(192, 64), big[::-1][:32768], at=16 << 20)
            regs = 3 if vec else 2  # the split transfers registered it again, or the threads took them
            assert (eng.fixed_registrations, eng.fixed_requests) == (regs, done + 1)
            assert eng.fixed_bytes == 17 << 20
            assert _direct_run(rig, read10(192, 64), data_in=32768) == big[::-1][:32768]
            assert eng.fixed_requests == done + 2
            # Two buffers in two regions (two registered pieces): the threads.
            pool = eng.pool_requests
            at = (16 << 20) - 8192
            assert _direct_run(rig, read10(32, 128), data_in=len(big), at=at, split=4096) == big
            assert (eng.fixed_requests, eng.pool_requests) == (done + 2, pool + 1)
            # More RAM than fixed_max: refused (E2BIG), the threads take it.
            eng.fixed_max = 16 << 20
            rig.memory.remove_region(16 << 20)
            rig.memory.add_region(GuestRegion.memfd(2 << 20, 16 << 20)[0])
            assert _direct_run(rig, read10(32, 128), data_in=len(big)) == big
            assert eng.fixed_error == errno.E2BIG
            assert caplog.text.count("of guest RAM registered with io_uring for O_DIRECT") == regs
            assert "guest RAM not registered with io_uring (more than 16 MiB" in caplog.text
            assert (eng.fixed_registrations, eng.fixed_requests) == (regs, done + 2)
            assert eng.pool_requests == pool + 2
        finally:
            os.close(fd)
    data = (tmp_path / "direct.img").read_bytes()
    assert data[8 * 512 : 16 * 512] == small and data[32 * 512 : 160 * 512] == big
    assert data[192 * 512 : 256 * 512] == big[::-1][:32768]


def test_registration_waits_until_the_guest_ram_is_allocated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Registering would allocate every page of guest RAM the guest never touched
    (and stall the loop meanwhile): with more than ``fixed_populate_max`` of it not
    allocated the table is not registered (``fixed_error`` EAGAIN, one log line),
    transfers pin their own pages, and it is looked at again after
    ``fixed_retry_ns``: once the RAM is allocated, it is registered."""
    caplog.set_level(logging.INFO, logger="virtio_devices.scsi")
    with _direct_rig(tmp_path) as (rig, _dev, eng):
        assert (eng.fixed_populate_max, eng.fixed_retry_ns) == (64 << 20, 10**9)
        eng.fixed_populate_max = 1 << 20  # the rig's 16 MiB are mostly untouched
        eng.fixed_retry_ns = 0  # looked at again at the next transfer
        big = os.urandom(64 << 10)
        _direct_run(rig, write10(32, 128), big)
        assert _direct_run(rig, read10(32, 128), data_in=len(big)) == big
        assert (eng.fixed_error, eng.fixed_registrations, eng.pool_requests) == (errno.EAGAIN, 0, 2)
        assert caplog.text.count("guest RAM not registered with io_uring yet") == 1
        for gpa in range(0, 16 << 20, 1 << 20):  # the guest touches all of it
            rig.memory.write(gpa, rig.memory.read(gpa, 1 << 20))
        assert _direct_run(rig, read10(32, 128), data_in=len(big)) == big
        assert (eng.fixed_error, eng.fixed_registrations, eng.fixed_requests) == (0, 1, 1)


def test_o_direct_without_registered_buffers_where_the_kernel_refuses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Guest RAM that the kernel will not pin for good (a shared mapping of a file
    on a disk file system: Linux 6.5 refuses long-term write pins of pages it must
    track as dirty) is not registered: one warning, ``fixed_error`` set, and the
    transfers pin their own pages (the threads at 64 KiB) with every byte right."""
    caplog.set_level(logging.WARNING, logger="virtio_devices.scsi")
    ram = tmp_path / "guest-ram"
    ram.write_bytes(bytes(8 << 20))
    fd = os.open(ram, os.O_RDWR)
    try:
        memory = GuestMemory([GuestRegion.from_fd(fd, 8 << 20, 0)])
        with _direct_rig(tmp_path, memory=memory, memory_size=8 << 20) as (rig, _dev, eng):
            big = os.urandom(64 << 10)
            _direct_run(rig, write10(32, 128), big)
            if eng.fixed_error == 0:
                pytest.skip("this kernel pins file-backed shared memory for good (before Linux 6.5)")
            assert _direct_run(rig, read10(32, 128), data_in=len(big)) == big
            assert (eng.fixed_registrations, eng.fixed_requests, eng.pool_requests) == (0, 0, 2)
            assert caplog.text.count("io_uring refused to register") == 1
        assert (tmp_path / "direct.img").read_bytes()[32 * 512 : 160 * 512] == big
    finally:
        os.close(fd)


def _cached_pages(path: Path) -> int:
    """How many of the file's pages are in the page cache (``mincore`` of a shared
    mapping, which reports the file's pages whoever brought them in)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), f"mmap failed: errno {ctypes.get_errno()}"
        try:
            vec = ctypes.create_string_buffer(pages)
            assert libc.mincore(addr, size, vec) == 0, f"mincore failed: errno {ctypes.get_errno()}"
            return sum(b & 1 for b in vec.raw)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def test_opening_with_o_direct_drops_the_images_cached_pages(tmp_path: Path) -> None:
    """``--direct``: the image's clean pages leave the host's page cache when it is
    opened, so that io_uring can start O_DIRECT writes over them without handing
    each to its worker threads (an O_DIRECT write must invalidate cached pages)."""
    path = tmp_path / "cached.img"
    path.write_bytes(IMAGE * 4)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # clean pages: the ones the kernel may drop at once
        os.pread(fd, len(IMAGE) * 4, 0)
    finally:
        os.close(fd)
    if _cached_pages(path) == 0:
        pytest.skip("this file system keeps nothing in the page cache")
    try:
        img = open_image(str(path), read_only=False, direct=True)
    except ImageError:
        pytest.skip("this file system refuses O_DIRECT")
    try:
        assert _cached_pages(path) == 0
    finally:
        img.close()


class _RecordingInterrupt(FakeInterrupt):
    """A transport's interrupt with a compiled-style ``signaller``: records the
    used index each notification was sent at, and (``rearm``) asks for the next
    used entry each time, as a driver that took what was used does."""

    def __init__(self, rearm: bool) -> None:
        super().__init__()
        self.rearm = rearm
        self.rig: DeviceRig | None = None
        self.at: list[int] = []

    def signal_used(self, queue_index: int) -> None:
        super().signal_used(queue_index)
        assert self.rig is not None
        mock = self.rig.mocks[queue_index]
        self.at.append(mock.used_idx())
        if self.rearm:
            mock.set_used_event(mock.used_idx())

    def signaller(self, index: int) -> Callable[[], None]:
        return lambda: self.signal_used(index)


class _WriteDrains:
    """One device with the engine and a recording interrupt: :meth:`drain` kicks
    ``n`` inline writes in one go and tells where notifications fell."""

    def __init__(self, event_idx: bool, rearm: bool) -> None:
        self.interrupt = _RecordingInterrupt(rearm)
        self.img = DiskImage.from_bytes(IMAGE, name="lun0")
        dev = ScsiDevice([self.img], use_engine=True)
        self.rig = DeviceRig(
            dev, queue_size=128, memory_size=8 << 20, event_idx=event_idx, interrupt=self.interrupt
        )
        self.interrupt.rig = self.rig
        if dev._engine is None:
            self.close()
            pytest.skip("io_uring is not available here")
        self.engine = dev._engine
        # Every write inline: one preempted on a loaded machine would read as slow
        # and send the next ones to the ring, whose completions come after the kick
        # (that path has its own test).
        self.engine.slow_ns = 10**15
        # No preemption seen unless a test says so: on a loaded machine another
        # task taking this CPU mid-drain would hold the early notifications back
        # (signal_adapt), which only the tests of that adaptation are about.
        self.engine.switch_counter = lambda: 0

    def drain(self, n: int) -> tuple[list[int], int]:
        """``n`` writes in one kick, the driver waiting for the first of them: the
        used indexes (counted from this drain's first) notifications were sent
        at, and how many the engine sent partway through its drain."""
        mock = self.rig.mocks[RQ]
        base = mock.used_idx()
        mock.set_used_event(base)
        self.interrupt.at.clear()
        early, writes = self.engine.early_signals, self.engine.inline_writes
        for k in range(n):
            self.rig.add_request(RQ, [cmd_req(write10(k, 1)), bytes([k]) * 512], [RESP_HEADER])
        used = self.rig.kick(RQ)
        assert len(used) == n and self.engine.inline_writes == writes + n
        return [(i - base) & 0xFFFF for i in self.interrupt.at], self.engine.early_signals - early

    def close(self) -> None:
        self.rig.close()
        self.img.close()


@contextlib.contextmanager
def _write_drains(
    event_idx: bool = True, rearm: bool = False, every: int | None = None
) -> Iterator[_WriteDrains]:
    d = _WriteDrains(event_idx, rearm)
    try:
        if every is not None:
            d.engine.signal_every = every
        yield d
    finally:
        d.close()


def test_drain_notifies_partway_when_the_driver_asks() -> None:
    """VIRTIO 1.2 §2.7.10: with EVENT_IDX the device notifies once used->idx passes
    used_event.  A long drain asks every ``signal_every`` (8) completions while at
    least as many chains are left, so a driver that waits for its first used entry
    hears at the 8th, not after all 20; one that asks again each time hears at 8,
    16 and the drain's end of 30; at the 24th only 6 are left (the end's
    notification comes soon), and of 20 the 16th has 4 after it."""
    with _write_drains(rearm=False) as d:
        assert d.drain(20) == ([8], 1)
    with _write_drains(rearm=True) as d:
        assert d.drain(30) == ([8, 16, 30], 2)
        assert d.drain(20) == ([8, 20], 1)
        assert d.drain(15) == ([15], 0)


def test_drain_notifies_only_at_its_end_without_event_idx_or_when_off() -> None:
    """Without EVENT_IDX the driver cannot say which entry it waits for (only the
    coarse VRING_AVAIL_F_NO_INTERRUPT, §2.7.7): one notification for the drain;
    ``signal_every`` = 0 turns the early ones off."""
    with _write_drains(event_idx=False) as d:
        assert d.drain(20) == ([20], 0)
    with _write_drains(rearm=True, every=0) as d:
        assert d.drain(20) == ([20], 0)


def test_a_drain_preempted_after_an_early_notification_holds_the_next_ones_back() -> None:
    """A driver woken on the drain's own CPU preempts it (the engine counts its
    thread's involuntary context switches, here the fake counter that each
    notification bumps): the queue's next drains notify only at their end until
    the hold has passed; ``signal_adapt`` = False keeps notifying."""
    with _write_drains(rearm=True) as d:
        eng = d.engine
        eng.switch_counter = lambda: len(d.interrupt.at)  # every wake-up preempts
        eng.hold_min_ns = eng.hold_max_ns = 3600 * 10**9
        # The notification at 8 preempted the drain; the engine sees it at the end.
        assert d.drain(30) == ([8, 16, 30], 2)
        assert eng.early_preempted == 1
        assert d.drain(30) == ([30], 0)  # held back
        assert d.drain(30) == ([30], 0)
        assert eng.early_preempted == 1
    with _write_drains(rearm=True) as d:
        eng = d.engine
        eng.switch_counter = lambda: len(d.interrupt.at)
        eng.signal_adapt = False
        assert d.drain(30) == ([8, 16, 30], 2)
        assert d.drain(30) == ([8, 16, 30], 2)
        assert eng.early_preempted == 0


def test_the_hold_passes_and_a_drain_not_preempted_keeps_notifying_partway() -> None:
    """The hold is a time (``hold_min_ns``, doubling up to ``hold_max_ns``): once
    it has passed the drain notifies partway again, and one whose thread was not
    preempted goes on doing so."""
    with _write_drains(rearm=True) as d:
        eng = d.engine
        preempting = [True]
        count = [0]

        def switches() -> int:
            # Each notification preempts while ``preempting`` says so.
            if preempting[0]:
                count[0] = len(d.interrupt.at)
            return count[0]

        eng.switch_counter = switches
        eng.hold_min_ns = eng.hold_max_ns = 0  # a hold that is over at once
        assert d.drain(30) == ([8, 16, 30], 2)
        assert d.drain(30) == ([8, 16, 30], 2)
        assert eng.early_preempted == 2
        preempting[0] = False
        assert d.drain(30) == ([8, 16, 30], 2)
        assert d.drain(30) == ([8, 16, 30], 2)
        assert eng.early_preempted == 2


def test_attach_refuses_a_signaller_count_that_is_not_the_queue_count(pair: Pair) -> None:
    """One signaller per queue, by index: any other count is a caller's bug."""
    queues = pair.rigs[0].queues
    with pytest.raises(ValueError, match=f"{len(queues)} queues, 1 signallers"):
        pair.engine.attach(queues, [lambda: None])


def test_the_kick_pump_serves_the_engines_drains_and_hands_the_rest_to_process_queue() -> None:
    """``kick_pump`` (a request queue's kicks in compiled code): a drain of READ and
    WRITE is finished without ``process_queue`` and counted in ``chains_served``; a
    drain with a command the engine does not serve (INQUIRY) is handed over, and
    ``process_queue`` answers it, the drain's read served by the engine; a
    broken avail ring (VIRTIO 1.2 §2.7.6: more than a queue ahead) raises from
    ``process_queue``, as without the pump.  No pump for the control and event
    queues."""
    with _write_drains(rearm=True) as d:
        dev = d.rig.device
        assert isinstance(dev, ScsiDevice)
        assert dev.kick_pump(0) is None and dev.kick_pump(1) is None
        pump = dev.kick_pump(RQ)
        assert pump is not None
        served = dev.chains_served

        got: dict[int, int] = {}

        def used(n: int) -> dict[int, int]:
            # A read the page cache could not serve at once completes on the ring.
            got.update(d.rig.used(RQ))
            while len(got) < n:
                d.rig.complete_workers()
                got.update(d.rig.used(RQ))
            return got

        d.rig.add_request(RQ, [cmd_req(write10(3, 1)), b"\x5a" * 512], [RESP_HEADER])
        d.rig.add_request(RQ, [cmd_req(read10(3, 1))], [RESP_HEADER, 512])
        assert pump.pump() is False  # done in compiled code
        assert len(used(2)) == 2 and dev.chains_served == served + 2
        got.clear()
        read, bufs = d.rig.add_request(RQ, [cmd_req(read10(3, 1))], [RESP_HEADER, 512])
        inq, _ = d.rig.add_request(RQ, [cmd_req(inquiry())], [RESP_HEADER, 255])
        assert pump.pump() is True  # the INQUIRY is Python's
        got.update(d.rig.used(RQ))
        assert inq not in got
        dev.process_queue(RQ)
        used(2)
        assert got[read] == RESP_HEADER + 512 and d.rig.read(bufs[1], 512) == b"\x5a" * 512
        assert got[inq] > RESP_HEADER and dev.chains_served == served + 4
        mock = d.rig.mocks[RQ]
        mock.set_avail_idx(mock.avail_idx() + 1000)
        assert pump.pump() is True
        with pytest.raises(InvalidAvailRingIndex):
            dev.process_queue(RQ)


def test_the_engine_waits_for_the_completions_of_a_deep_queue_on_its_thread() -> None:
    """With at least ``spin_min`` requests in flight, the engine waits on its own
    thread for their completions (``spin_ns``) and finishes each as it comes: a
    kick of 16 writes on the engine's threads returns with all 16 used, none left
    for the eventfd (the threads complete them while the drain and its first reap
    run)."""
    interrupt = _RecordingInterrupt(rearm=True)
    img = DiskImage.from_bytes(IMAGE, name="lun0")
    dev = ScsiDevice([img], use_engine=True)
    rig = DeviceRig(dev, queue_size=64, memory_size=8 << 20, event_idx=True, interrupt=interrupt)
    interrupt.rig = rig
    try:
        eng = dev._engine
        if eng is None:
            pytest.skip("io_uring is not available here")
        assert (eng.spin_ns, eng.spin_min) == (50_000, 8)
        eng.pool_min_cached_write = 512  # every write on the engine's threads
        eng.spin_min = 1
        # Bounded so that a broken wait fails the test instead of hanging it; not
        # cut short by another task taking this CPU (a loaded machine would).
        eng.spin_ns = eng.spin_max_ns = 30 * 10**9
        eng.spin_give_way = False
        heads = [
            rig.add_request(RQ, [cmd_req(write10(k, 1)), bytes([k]) * 512], [RESP_HEADER])[0]
            for k in range(16)
        ]
        used = rig.kick(RQ)
        assert sorted(h for h, _ in used) == sorted(heads)
        assert eng.in_flight() == 0 and eng.pool_requests == 16
        assert os.pread(img.fd, 16 * 512, 0) == b"".join(bytes([k]) * 512 for k in range(16))
    finally:
        rig.close()
        img.close()


@pytest.mark.parametrize("compiled_signallers", [True, False])
def test_the_reap_pump_finishes_completions_without_python_unless_they_need_it(
    tmp_path: Path, compiled_signallers: bool
) -> None:
    """The engine's eventfd is served by a compiled pump (``ReapPump``): a ring
    completion of a whole transfer is finished (GOOD, its used entry, the driver
    notified through the compiled signaller) without the device's Python callback,
    and counted in ``chains_served``; with a transport that has no compiled
    signallers the reap's notification is Python's, so the pump hands the reap over
    and the callback notifies (VIRTIO 1.2 §2.7.10: the driver still hears of it)."""
    interrupt = _RecordingInterrupt(rearm=True) if compiled_signallers else FakeInterrupt()
    with _direct_rig(tmp_path, event_idx=True, interrupt=interrupt) as (rig, dev, eng):
        if isinstance(interrupt, _RecordingInterrupt):
            interrupt.rig = rig
        eng.spin_ns = 0  # every completion through the eventfd
        served = dev.chains_served
        # A completion the submission's own look at the ring did not find goes through
        # the eventfd.  The disk is slower than that look but a preempted test thread is
        # not: requests go on until one went through the pump (and three in all).
        n = via_eventfd = 0
        while n < 3 or not via_eventfd:
            assert n < 200, "200 reads all completed before the submission's look at the ring"
            lba = 8 * (n % 4)
            head, resp, buf = _add_direct_read(rig, lba)
            rig.mocks[RQ].set_used_event(rig.mocks[RQ].used_idx())  # the driver waits for it
            got = rig.kick(RQ)  # an O_DIRECT read: on the ring
            via_eventfd += not got
            while not got:
                assert select.select([eng.fd], [], [], 10)[0], "no completion on the engine's eventfd"
                pumped = eng.reaps_pumped
                ran = rig.loop.fire_pump(eng.fd)
                got = rig.used(RQ)
                if got:
                    # Compiled signallers: the pump finished it; else the callback did.
                    assert ran is (not compiled_signallers)
                    assert eng.reaps_pumped == pumped + (1 if compiled_signallers else 0)
            assert got == [(head, RESP_HEADER + 4096)]
            assert Resp.parse(rig.read(resp, RESP_HEADER)).status == 0
            assert rig.read(buf, 4096) == (IMAGE * 4)[lba * 512 : (lba + 8) * 512]
            n += 1
        assert dev.chains_served == served + n and eng.ring_requests == n
        assert interrupt.used.count(RQ) == n
        assert (eng.reaps_pumped >= 1) if compiled_signallers else (eng.reaps_pumped == 0)


def _in_thread(fn: Callable[[], object]) -> object:
    """``fn()`` on a new thread; its result (or what it raised, raised here)."""
    out: list[object] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # handed to the caller's thread
            err.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert not t.is_alive(), "the thread did not finish"
    if err:
        raise err[0]
    return out[0]


def test_a_deferred_ring_belongs_to_one_thread_and_moves_only_when_idle(tmp_path: Path) -> None:
    """``defer_taskrun`` (IORING_SETUP_SINGLE_ISSUER | DEFER_TASKRUN: the kernel posts
    completions only when the submitting thread asks): the ring is the first
    thread's; while its requests are in flight another thread's requests take the
    Python path (answered all the same); once none is, the next thread that
    submits gets a new ring (``ring_moves``), and every request completes."""
    with _direct_rig(tmp_path) as (rig, _dev, eng):
        if not eng.defer_taskrun:
            pytest.skip("this kernel has no IORING_SETUP_DEFER_TASKRUN")
        eng.spin_ns = 0

        def finish(want: set[int]) -> dict[int, int]:
            """The used entries until those of ``want`` are there."""
            got: dict[int, int] = dict(rig.used(RQ))
            while not want <= set(got):
                rig.complete_workers()
                got.update(rig.used(RQ))
            return got

        first, _, buf1 = _add_direct_read(rig, 8)
        got = dict(rig.kick(RQ))  # this thread's: on the ring
        assert eng.ring_requests == 1
        if first not in got:
            # In flight: another thread's request goes to the Python path meanwhile.
            second, _, buf2 = _add_direct_read(rig, 16)
            got.update(_in_thread(lambda: rig.kick(RQ)))  # type: ignore[arg-type]
            assert eng.ring_requests == 1
            got.update(finish({first}))
            assert got[second] == RESP_HEADER + 4096
            assert rig.read(buf2, 4096) == (IMAGE * 4)[16 * 512 : 24 * 512]
        assert got[first] == RESP_HEADER + 4096 and rig.read(buf1, 4096) == (IMAGE * 4)[8 * 512 : 16 * 512]
        assert eng.in_flight() == 0 and eng.ring_moves == 0
        # Nothing in flight: a new thread takes a new ring and completes on it.
        third, _, buf3 = _add_direct_read(rig, 24)

        def kick_and_finish() -> dict[int, int]:
            rig.kick(RQ)
            return finish({third})

        got = _in_thread(kick_and_finish)  # type: ignore[assignment]
        assert got[third] == RESP_HEADER + 4096 and rig.read(buf3, 4096) == (IMAGE * 4)[24 * 512 : 32 * 512]
        assert eng.ring_moves == 1 and eng.ring_requests == 2


def test_a_plain_ring_is_made_when_deferred_completions_are_not_asked_for() -> None:
    """``defer_taskrun=False``: a ring of the usual kind (completions posted by the
    kernel's task work at once), which any thread may use."""
    fd = os.memfd_create("lun0")
    try:
        os.ftruncate(fd, 1 << 20)
        eng = scsi_device.Engine([fd], [2048], [False], defer_taskrun=False)
        assert eng.defer_taskrun is False
    finally:
        os.close(fd)
