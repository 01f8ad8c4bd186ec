"""The kernel's random device served through the vDSO's getrandom
(virtio_devices.hosts._getrandom and its use by the entropy sources)."""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from virtio_devices.hosts import _getrandom
from virtio_devices.hosts.files import FdEntropySource, FileEntropySource
from virtio_devices.rng import RngDevice
from virtio_devices.testing import FakeInterrupt, FakeLoop
from virtio_queue import ByteSource, GuestMemory
from virtio_queue.testing import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, GuardedMemory, MockSplitQueue, RawDesc

HAVE_VDSO = _getrandom.vdso_available()
needs_vdso = pytest.mark.skipif(not HAVE_VDSO, reason="this kernel's vDSO has no getrandom (Linux < 6.11)")


@pytest.fixture(params=["vdso", "syscall"])
def mode(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every behaviour holds through the vDSO and through the system call."""
    if request.param == "vdso" and not HAVE_VDSO:
        pytest.skip("this kernel's vDSO has no getrandom (Linux < 6.11)")
    _getrandom._disable_vdso(request.param == "syscall")
    try:
        yield request.param
    finally:
        _getrandom._disable_vdso(False)


def looks_random(data: bytes) -> None:
    """Every byte value within 6 sigma of its expected count (a constant, a short
    cycle or zero-filled pages fail; the generator's output passes with
    overwhelming probability)."""
    expect = len(data) / 256
    sigma = (expect * (1 - 1 / 256)) ** 0.5
    counts = Counter(data)
    worst = max(abs(counts.get(b, 0) - expect) for b in range(256))
    assert worst < 6 * sigma, f"byte counts off by {worst:.0f} (sigma {sigma:.0f})"


def test_getrandom_source_gives_fresh_random_bytes(mode: str) -> None:
    assert _getrandom.vdso_available() == (mode == "vdso")
    src = _getrandom.GetrandomSource()
    a, b = bytearray(1 << 20), bytearray(1 << 20)
    assert src.readinto(a) == len(a) and src.readinto(b) == len(b)
    assert a != b
    looks_random(bytes(a))
    assert src.fd == -1 and src.flags == _getrandom.INSECURE


def test_getrandom_source_refuses_unknown_flags() -> None:
    for flags in (0x2, 0x100, 0x1 | 0x8):  # GRND_RANDOM (blocking), unknown bits
        with pytest.raises(ValueError, match="unsupported getrandom flags"):
            _getrandom.GetrandomSource(-1, flags)


def test_getrandom_source_threads_never_share_a_stream(mode: str) -> None:
    """A vDSO state serves one thread at a time: four threads filling at once (GIL
    released in every call) get 16 KiB each, no 32-byte block seen twice."""
    src = _getrandom.GetrandomSource()
    out: list[bytes] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def work() -> None:
        start.wait()
        for _ in range(256):
            buf = bytearray(64)
            assert src.readinto(buf) == 64
            with lock:
                out.append(bytes(buf))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    blocks = [chunk[i : i + 32] for chunk in out for i in (0, 32)]
    assert len(blocks) == 2048 and len(set(blocks)) == 2048


def test_queue_fill_from_getrandom_fills_each_request_once(mode: str) -> None:
    """Queue.fill_from with the vDSO source: 16 requests of 4 KiB in one call (one
    getrandom per buffer), each filled in full, all different, nothing written
    outside them."""
    gm = GuardedMemory([(0, 1 << 20)])
    mock = MockSplitQueue(gm.memory, 16)
    q = mock.create_queue()
    bufs = [(0x10000 + 0x1100 * i, 4096) for i in range(16)]  # 256-byte gaps between them
    heads = [mock.add_chain([RawDesc(g, n, VIRTQ_DESC_F_WRITE, 0)]) for g, n in bufs]
    before = gm.snapshot()
    assert q.fill_from(_getrandom.GetrandomSource()) == (16, 65536, None)
    assert mock.used_elems() == [(h, 4096) for h in heads]
    got = [gm.memory.read(g, n) for g, n in bufs]
    assert len(set(got)) == 16
    looks_random(b"".join(got))
    gm.assert_unchanged_except(before, [*bufs, (mock.used_ring, 6 + 8 * 16)])


def test_writer_read_from_getrandom_fills_only_the_writable_buffers(mode: str) -> None:
    gm = GuardedMemory([(0, 1 << 20)])
    mem: GuestMemory = gm.memory
    mock = MockSplitQueue(mem, 16)
    q = mock.create_queue()
    segs = [(0x20000, 7), (0x20100, 4096), (0x22000, 100)]
    header = RawDesc(0x1F000, 16, VIRTQ_DESC_F_NEXT, 0)  # device-readable: never written
    mock.add_chain([header, *(RawDesc(g, n, VIRTQ_DESC_F_WRITE, 0) for g, n in segs)])
    chain = q.pop_chain()
    assert chain is not None
    before = gm.snapshot()
    w = chain.writer()
    assert w.read_from(_getrandom.GetrandomSource(), 1000) == 1000
    assert w.read_from(_getrandom.GetrandomSource()) == 7 + 4096 + 100 - 1000
    assert w.available_bytes() == 0
    gm.assert_unchanged_except(before, segs)
    assert len({mem.read(g, n) for g, n in segs[1:]}) == 2


def test_entropy_source_random_devices_use_the_vdso_by_device_number(tmp_path: Path) -> None:
    link = tmp_path / "entropy"
    link.symlink_to("/dev/urandom")
    cases = [
        ("/dev/urandom", _getrandom.INSECURE),
        ("/dev/random", _getrandom.NONBLOCK),
        (link, _getrandom.INSECURE),
    ]
    for path, flags in cases:
        with FileEntropySource(path) as src:
            assert src.uses_vdso == HAVE_VDSO
            bs = src.byte_source()
            if HAVE_VDSO:
                assert isinstance(bs, _getrandom.GetrandomSource)
                assert (bs.fd, bs.flags) == (src.fileno(), flags)
            else:
                assert type(bs) is ByteSource
        with FileEntropySource(path, vdso=False) as src:
            assert not src.uses_vdso and type(src.byte_source()) is ByteSource


def test_entropy_source_other_files_are_read(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"abc")
    for path in ("/dev/zero", p):
        with FileEntropySource(path) as src:
            assert not src.uses_vdso
            bs = src.byte_source()
            assert type(bs) is ByteSource and bs.fd == src.fileno()
            assert src.byte_source() is bs  # one per source
    r, w = os.pipe()
    os.close(w)
    with FdEntropySource(r) as src:
        assert not src.uses_vdso and src.byte_source().fd == r
    with pytest.raises(ValueError, match="closed"):
        src.byte_source()


@needs_vdso
def test_entropy_source_with_vdso_disabled_reads_the_device(mode: str) -> None:
    with FileEntropySource("/dev/urandom") as src:
        assert src.uses_vdso == (mode == "vdso")


@pytest.mark.parametrize("max_bytes", [None, 3000])
def test_rng_device_serves_urandom_through_both_paths(
    guest_memory: Any, loop: FakeLoop, interrupt: FakeInterrupt, max_bytes: int | None
) -> None:
    """RngDevice over /dev/urandom: the compiled fill path (no rate limit) and the
    per-chain path (rate limit: Writer.read_from) both give random bytes."""
    with FileEntropySource("/dev/urandom") as src:
        mock = MockSplitQueue(guest_memory, 16)
        queue = mock.create_queue(max_size=1024)
        dev = RngDevice(src, max_bytes=max_bytes)
        dev.activate(guest_memory, [queue], interrupt, loop)
        assert (dev.fill_source(0) is src.byte_source()) == (max_bytes is None)
        bufs = [mock.alloc(1024) for _ in range(4)]
        heads = [mock.add_chain([RawDesc(b, 1024, VIRTQ_DESC_F_WRITE, 0)]) for b in bufs]
        dev.process_queue(0)
        # 3000 bytes per window: two full requests, a short one, then the last waits.
        want = [1024, 1024, 952] if max_bytes else [1024] * 4
        assert mock.used_elems() == list(zip(heads, want, strict=False))
        data = b"".join(guest_memory.read(b, n) for b, n in zip(bufs, want, strict=False))
        blocks = [data[i : i + 32] for i in range(0, len(data) - 31, 32)]
        assert len(set(blocks)) == len(blocks)
        assert len(set(data)) > 200  # 3000+ bytes of a generator's output show most byte values
        dev.reset()
