"""The queue benchmark's workloads, shared by the pytest benches and ``queue_table.py``.

Every workload is the one of the Rust anchor (rust-vmm virtio-queue 0.18; ``queue_table.py``):
1 MiB of anonymous-mmap guest memory at guest address 0, a split queue of size 256 with
the descriptor table at 0x0, the available ring at 0x1000 and the used ring at 0x2000.

* A: 256 one-descriptor chains per batch (descriptor ``i`` = 64 bytes at
  ``0x4000 + 64*i``); the driver publishes heads 0..255, the device pops each chain,
  reads its head descriptor and ``add_used(head, 0)``, then one
  ``needs_notification()`` per batch.  B is A with EVENT_IDX (the driver also sets
  ``used_event``).
* C: one 64 KiB chain of n = 1, 4 or 16 descriptors at 0x10000, all WRITE (Writer) or
  none (Reader); per iteration the driver publishes head 0 and the device pops it,
  copies a 64 KiB host buffer into (out of) it and ``add_used``.
* fd: C-W16, but the Writer is filled from a 64 KiB file in the page cache with
  ``Writer.read_from_fd(fd, offset=0)``.

Each ``make_*`` returns a :class:`Workload`: ``run(n)`` does ``n`` inner steps and
returns the units done (chains or bytes), ``check()`` runs one step more and asserts
what it did (used ring, copied bytes), untimed.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import tempfile
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from _bench_build import load as _load_bench

from virtio_queue import GuestMemory, GuestRegion, Queue
from virtio_queue.chain import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from virtio_queue.testing import MockSplitQueue, RawDesc, RefQueue, workload_a

_bench = _load_bench()

MEM_SIZE = 1 << 20
QSIZE = 256
DESC_TABLE = 0x0000
AVAIL_RING = 0x1000
USED_RING = 0x2000
SMALL_LEN = 64
BIG_BUF = 0x10000
BIG_LEN = 64 * 1024
PAGE = 4096

#: Host-buffer placements of workload C: bytes past a page boundary, or a bytearray.
ALIGNMENTS = ("pg", "+1", "+16", "ba")
NDESCS = (1, 4, 16)


@dataclass
class Workload:
    name: str
    what: str
    unit: str  # "chains" or "bytes"
    run: Callable[[int], int]
    check: Callable[[], None]
    #: the objects that must outlive run() (mmaps, memory, queues, fds)
    keep: list[object] = field(default_factory=list)
    close: Callable[[], None] | None = None


# ------------------------------------------------------------------ memory


def guest_memory() -> tuple[GuestMemory, mmap.mmap]:
    """1 MiB of anonymous mmap at guest address 0 (like the anchor's GuestMemoryMmap)."""
    buf = mmap.mmap(-1, MEM_SIZE)
    return GuestMemory.from_buffer(buf), buf


def buffer_address(buf: object) -> int:
    """Host address of a writable buffer (for reporting alignment)."""
    view = memoryview(buf)  # type: ignore[arg-type]
    if view.readonly:
        raise ValueError("need a writable buffer")
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class HostBuffer:
    """A 64 KiB host buffer ``offset`` bytes past a page boundary (an mmap), or a plain
    ``bytearray`` for placement "ba" (malloc's alignment, 16 bytes)."""

    def __init__(self, placement: str, length: int = BIG_LEN, fill: int = 7) -> None:
        self.placement = placement
        if placement == "ba":
            self._backing: object = bytearray(length)
            self.view = memoryview(self._backing)  # type: ignore[arg-type]
        else:
            off = 0 if placement == "pg" else int(placement)
            self._backing = mmap.mmap(-1, length + PAGE)
            self.view = memoryview(self._backing)[off : off + length]  # type: ignore[arg-type]
        pattern = bytes((i * fill + 3) & 0xFF for i in range(256))
        self.view[:] = (pattern * (length // 256 + 1))[:length]

    @property
    def address(self) -> int:
        return buffer_address(self.view)


def pattern(length: int, mul: int, add: int) -> bytes:
    p = bytes((i * mul + add) & 0xFF for i in range(256))
    return (p * (length // 256 + 1))[:length]


# ------------------------------------------------------------------ A / B


def _check_batch(mock: MockSplitQueue, do_batch: Callable[[], int]) -> None:
    used0 = mock.used_idx()
    n = do_batch()
    assert n == QSIZE, n
    assert mock.used_idx() == (used0 + QSIZE) & 0xFFFF
    assert mock.read_used(used0) == [(k, 0) for k in range(QSIZE)]


def make_a_cython(event_idx: bool = False) -> Workload:
    """A (B with ``event_idx``) through ``_bench.workload_a``: the Cython-level API the
    devices' hot paths use, driver stores in the same loop, both sides timed."""
    mem, buf = guest_memory()
    mock = workload_a(mem)
    q = mock.create_queue(event_idx=event_idx)

    def run(n: int) -> int:
        return _bench.workload_a(q, n)[0]

    def check() -> None:
        def one() -> int:
            chains, sink, notes = _bench.workload_a(q, 1)
            assert sink == QSIZE * SMALL_LEN, sink
            assert notes == 1, notes
            return chains

        _check_batch(mock, one)
        if event_idx:
            assert mock.used_event() == (mock.avail_idx() - QSIZE) & 0xFFFF

    name = "B" if event_idx else "A"
    what = "pop+add_used 1-desc chains, Cython loop" + (", EVENT_IDX" if event_idx else "")
    return Workload(name, what, "chains", run, check, [mem, buf, mock, q])


def make_a_python(ref: bool = False) -> Workload:
    """A through the Python API: one ``pop_chain``, one ``next(chain)`` (head descriptor)
    and one ``add_used`` per chain, the driver publishing with
    ``MockSplitQueue.publish_all``; both sides timed.  ``ref``: the same loop on
    :class:`virtio_queue.testing.RefQueue` (the plain-Python model)."""
    mem, buf = guest_memory()
    mock = workload_a(mem)
    q: Queue | RefQueue = mock.create_ref_queue() if ref else mock.create_queue()
    sinks = [0]

    if ref:

        def batches(n: int) -> int:
            pub = mock.publish_all
            pop = q.pop_chain
            add = q.add_used
            notify = q.needs_notification
            sink = 0
            chains = 0
            for _ in range(n):
                pub()
                while (c := pop()) is not None:
                    sink += next(iter(c)).len
                    add(c.head_index, 0)
                    chains += 1
                notify()
            sinks[0] += sink
            return chains

    else:

        def batches(n: int) -> int:
            pub = mock.publish_all
            pop = q.pop_chain
            add = q.add_used
            notify = q.needs_notification
            sink = 0
            chains = 0
            for _ in range(n):
                pub()
                while (c := pop()) is not None:
                    sink += next(c).len
                    add(c.head_index, 0)
                    chains += 1
                notify()
            sinks[0] += sink
            return chains

    def check() -> None:
        s0 = sinks[0]
        _check_batch(mock, lambda: batches(1))
        assert sinks[0] - s0 == QSIZE * SMALL_LEN

    if ref:
        return Workload(
            "A-ref",
            "as A-py on testing.RefQueue (Python model)",
            "chains",
            batches,
            check,
            [mem, buf, mock, q],
        )
    return Workload(
        "A-py", "as A, Python API: pop_chain/next/add_used", "chains", batches, check, [mem, buf, mock, q]
    )


def make_a2_python() -> Workload:
    """A with one ``for chain in queue`` per batch (the anchor's A2): heads collected,
    head descriptor read in the loop, then add_used for each."""
    mem, buf = guest_memory()
    mock = workload_a(mem)
    q = mock.create_queue()

    def run(n: int) -> int:
        pub = mock.publish_all
        add = q.add_used
        chains = 0
        for _ in range(n):
            pub()
            heads = []
            push = heads.append
            for c in q:
                next(c)
                push(c.head_index)
            for h in heads:
                add(h, 0)
            chains += len(heads)
            q.needs_notification()
        return chains

    def check() -> None:
        _check_batch(mock, lambda: run(1))

    return Workload(
        "A2-py", "as A-py, one `for c in queue` per batch", "chains", run, check, [mem, buf, mock, q]
    )


def make_a0_python() -> Workload:
    """The driver side of A-py alone: ``MockSplitQueue.publish_all`` (information)."""
    mem, buf = guest_memory()
    mock = workload_a(mem)

    def run(n: int) -> int:
        pub = mock.publish_all
        for _ in range(n):
            pub(checked=False)  # no device takes them: the driver side alone
        return n * QSIZE

    def check() -> None:
        i0 = mock.avail_idx()
        run(1)
        assert mock.avail_idx() == (i0 + QSIZE) & 0xFFFF

    return Workload("A0-py", "driver side of A-py only (publish_all)", "chains", run, check, [mem, buf, mock])


# ------------------------------------------------------------------ C


# A "spread" chain leaves one page unused after every buffer, so that no two
# buffers are back to back in guest memory: the Reader/Writer cannot join them
# into one segment and pays the per-descriptor cost the anchor's layout hides.
SPREAD_GAP = 4096


def _segs(ndesc: int, spread: bool = False) -> list[tuple[int, int]]:
    part = BIG_LEN // ndesc
    stride = part + (SPREAD_GAP if spread else 0)
    return [(BIG_BUF + stride * i, part) for i in range(ndesc)]


def _guest_read(mem: GuestMemory, segs: list[tuple[int, int]]) -> bytes:
    return b"".join(mem.read(g, n) for g, n in segs)


def _guest_write(mem: GuestMemory, segs: list[tuple[int, int]], data: bytes) -> None:
    off = 0
    for g, n in segs:
        mem.write(g, data[off : off + n])
        off += n


def _big_chain(
    ndesc: int, device_writes: bool, spread: bool = False
) -> tuple[GuestMemory, mmap.mmap, MockSplitQueue]:
    mem, buf = guest_memory()
    segs = _segs(ndesc, spread)
    end = segs[-1][0] + segs[-1][1]
    mock = MockSplitQueue(
        mem,
        QSIZE,
        desc_table=DESC_TABLE,
        avail_ring=AVAIL_RING,
        used_ring=USED_RING,
        data_addr=(end + 4095) & ~4095,
    )
    descs = []
    for i, (gpa, n) in enumerate(segs):
        flags = (VIRTQ_DESC_F_NEXT if i + 1 < ndesc else 0) | (VIRTQ_DESC_F_WRITE if device_writes else 0)
        descs.append(RawDesc(gpa, n, flags, i + 1 if i + 1 < ndesc else 0))
    mock.write_descs(0, descs)
    if not device_writes:
        _guest_write(mem, segs, pattern(BIG_LEN, 13, 1))
    return mem, buf, mock


def _check_c(
    mem: GuestMemory,
    mock: MockSplitQueue,
    host: memoryview,
    device_writes: bool,
    one: Callable[[], None],
    *,
    segs: list[tuple[int, int]],
) -> None:
    used0 = mock.used_idx()
    if device_writes:
        _guest_write(mem, segs, b"\0" * BIG_LEN)
    else:
        host[:] = b"\0" * BIG_LEN
    one()
    assert _guest_read(mem, segs) == bytes(host), "guest and host buffers differ"
    assert mock.read_used(used0) == [(0, BIG_LEN if device_writes else 0)]


def make_c_cython(ndesc: int, device_writes: bool, placement: str = "pg", spread: bool = False) -> Workload:
    """C through ``_bench.workload_c`` (Cython-level Writer.copy_in / Reader.copy_out);
    ``spread``: buffers not back to back (:data:`SPREAD_GAP`)."""
    mem, buf, mock = _big_chain(ndesc, device_writes, spread)
    q = mock.create_queue()
    host = HostBuffer(placement)

    def run(n: int) -> int:
        return _bench.workload_c(q, host.view, n, device_writes)

    def check() -> None:
        _check_c(
            mem,
            mock,
            host.view,
            device_writes,
            lambda: _bench.workload_c(q, host.view, 1, device_writes),
            segs=_segs(ndesc, spread),
        )

    kind = "W" if device_writes else "R"
    name = f"C-{kind}{ndesc}{'s' if spread else ''}@{placement}"
    what = f"{'Writer' if device_writes else 'Reader'} 64K, {ndesc} desc{' spread' if spread else ''}, "
    what += f"host {_place_text(placement)}"
    return Workload(name, what, "bytes", run, check, [mem, buf, mock, q, host])


#: Where the two regions of the cross-region workload meet: half-way through the
#: 64 KiB buffer at BIG_BUF.
CROSS_SPLIT = BIG_BUF + BIG_LEN // 2


def make_c_cross(device_writes: bool, placement: str = "pg") -> Workload:
    """C with one 64 KiB buffer that runs from one region into the next (two mmaps,
    adjacent in guest-physical memory only): the Writer/Reader copies it as two
    segments.  Rings and table sit in the first region."""
    bufs = [mmap.mmap(-1, CROSS_SPLIT), mmap.mmap(-1, MEM_SIZE - CROSS_SPLIT)]
    mem = GuestMemory([GuestRegion.from_buffer(bufs[0], 0), GuestRegion.from_buffer(bufs[1], CROSS_SPLIT)])
    segs = [(BIG_BUF, BIG_LEN)]
    mock = MockSplitQueue(
        mem,
        QSIZE,
        desc_table=DESC_TABLE,
        avail_ring=AVAIL_RING,
        used_ring=USED_RING,
        data_addr=BIG_BUF + BIG_LEN,
    )
    mock.write_descs(0, [RawDesc(BIG_BUF, BIG_LEN, VIRTQ_DESC_F_WRITE if device_writes else 0, 0)])
    if not device_writes:
        _guest_write(mem, segs, pattern(BIG_LEN, 13, 1))
    q = mock.create_queue()
    host = HostBuffer(placement)

    def run(n: int) -> int:
        return _bench.workload_c(q, host.view, n, device_writes)

    def check() -> None:
        _check_c(
            mem,
            mock,
            host.view,
            device_writes,
            lambda: _bench.workload_c(q, host.view, 1, device_writes),
            segs=segs,
        )

    kind = "W" if device_writes else "R"
    what = (
        f"{'Writer' if device_writes else 'Reader'} 64K, 1 desc over 2 regions, host {_place_text(placement)}"
    )
    return Workload(f"C-{kind}1x2@{placement}", what, "bytes", run, check, [mem, bufs, mock, q, host])


class _BatchDriver:
    """Publishes head 0 ``QSIZE`` times at once and hands the slots out one by one, so
    that the Python-level driver costs a few ns per chain: the C figures through the
    Python API time the device side (one ``MockSplitQueue.publish`` of one head costs
    about 0.7 us in Python, a quarter of a 64 KiB copy)."""

    def __init__(self, mock: MockSplitQueue) -> None:
        self.mock = mock
        self.heads = array("H", [0] * QSIZE)
        self.left = 0

    def runs(self, n: int) -> Iterator[int]:
        """Split ``n`` iterations into runs of published slots, publishing a batch
        whenever the slots run out, so that the loop inside a run is the device's
        work alone (as the reference's loop is its own work alone)."""
        while n:
            if not self.left:
                self.mock.publish(self.heads)
                self.left = QSIZE
            k = min(self.left, n)
            self.left -= k
            n -= k
            yield k


def make_c_python(ndesc: int, device_writes: bool, placement: str = "pg") -> Workload:
    """C through the Python API: pop_chain, writer().write_all(buf) or
    reader().read_exact_into(buf), add_used; the driver publishes head 0 for 256
    iterations at once (:class:`_BatchDriver`)."""
    mem, buf, mock = _big_chain(ndesc, device_writes)
    q = mock.create_queue()
    host = HostBuffer(placement)
    drv = _BatchDriver(mock)
    hv = host.view

    if device_writes:

        def run(n: int) -> int:
            pop = q.pop_chain
            add = q.add_used
            for k in drv.runs(n):
                for _ in range(k):
                    c = pop()
                    w = c.writer()
                    w.write_all(hv)
                    add(c.head_index, w.bytes_written())
            return n * BIG_LEN

    else:

        def run(n: int) -> int:
            pop = q.pop_chain
            add = q.add_used
            for k in drv.runs(n):
                for _ in range(k):
                    c = pop()
                    c.reader().read_exact_into(hv)
                    add(c.head_index, 0)
            return n * BIG_LEN

    def check() -> None:
        _check_c(mem, mock, hv, device_writes, lambda: run(1), segs=_segs(ndesc))

    kind = "W" if device_writes else "R"
    name = f"Cpy-{kind}{ndesc}@{placement}"
    what = f"as C-{kind}{ndesc}, Python API ({'write_all' if device_writes else 'read_exact_into'})"
    return Workload(name, what, "bytes", run, check, [mem, buf, mock, q, host])


def _place_text(placement: str) -> str:
    return {"pg": "page-aligned", "ba": "bytearray"}.get(placement, f"page{placement}")


def make_memcpy(placement: str = "pg", to_host: bool = True, mode: str = "libc") -> Workload:
    """A copy of 64 KiB between a page-aligned buffer (the guest side) and a host buffer
    at ``placement``: ``to_host`` copies guest -> host (the Reader's direction), else
    host -> guest (the Writer's).  ``mode``: "libc" (glibc memcpy, out of line) or "vq"
    (our vq_copy).  The reference of every C figure is ("pg", libc)."""
    guest = HostBuffer("pg", fill=13)
    host = HostBuffer(placement, fill=5)
    dst, src = (host, guest) if to_host else (guest, host)

    def run(n: int) -> int:
        return _bench.memcpy_loop(dst.view, src.view, n, mode)

    def check() -> None:
        dst.view[:] = b"\0" * BIG_LEN
        run(1)
        assert bytes(dst.view) == bytes(src.view)
        dst.view[:] = pattern(BIG_LEN, 3, 9)

    if placement == "pg":
        name = "memcpy" if mode == "libc" else "vq_copy"
        what = f"{'glibc memcpy' if mode == 'libc' else 'our vq_copy'} 64K page-aligned -> page-aligned"
    else:
        arrow = "G->H" if to_host else "H->G"
        name = f"{mode}-{arrow}@{placement}"
        what = f"{'glibc memcpy' if mode == 'libc' else 'our vq_copy'} 64K " + (
            "page -> " + _place_text(placement) if to_host else _place_text(placement) + " -> page"
        )
    return Workload(name, what, "bytes", run, check, [guest, host])


# ------------------------------------------------------------------ fd


def page_cache_file(length: int = BIG_LEN) -> int:
    """An unlinked regular file of ``length`` bytes, read once so that it sits in the
    page cache.  Returns its fd (the caller closes it)."""
    fd, path = tempfile.mkstemp(prefix="vq-bench-")
    try:
        os.unlink(path)
        os.write(fd, pattern(length, 11, 5))
        os.fsync(fd)
        os.pread(fd, length, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_fd_writer(ndesc: int = 16, spread: bool = False) -> Workload:
    """fd: per iteration pop, ``writer().read_from_fd(fd, offset=0)`` (one preadv
    straight into the 16 guest buffers), add_used; Python API, the driver publishing
    256 heads at a time (:class:`_BatchDriver`).  ``spread``: as in workload C."""
    mem, buf, mock = _big_chain(ndesc, True, spread)
    segs = _segs(ndesc, spread)
    q = mock.create_queue()
    fd = page_cache_file()
    drv = _BatchDriver(mock)

    def run(n: int) -> int:
        pop = q.pop_chain
        add = q.add_used
        total = 0
        for k in drv.runs(n):
            for _ in range(k):
                c = pop()
                got = c.writer().read_from_fd(fd, offset=0)
                add(c.head_index, got)
                total += got
        return total

    def check() -> None:
        used0 = mock.used_idx()
        _guest_write(mem, segs, b"\0" * BIG_LEN)
        assert run(1) == BIG_LEN
        assert _guest_read(mem, segs) == pattern(BIG_LEN, 11, 5)
        assert mock.read_used(used0) == [(0, BIG_LEN)]

    return Workload(
        f"fd-W{ndesc}{'s' if spread else ''}",
        f"Writer.read_from_fd 64K file -> {ndesc} desc{' spread' if spread else ''} (Python API)",
        "bytes",
        run,
        check,
        [mem, buf, mock, q],
        close=lambda: os.close(fd),
    )


def make_fd_writer_cython(ndesc: int = 16, variant: int = 0) -> Workload:
    """As fd-W16 at Cython level (``_bench.workload_fd``: publish, pop, Writer, preadv
    into its iovecs, add_used, in one C loop): no Python call per iteration.
    ``variant`` 2: no Writer built (pop, preadv into fixed iovecs, add_used): for
    profiling."""
    mem, buf, mock = _big_chain(ndesc, True)
    q = mock.create_queue()
    fd = page_cache_file()

    def run(n: int) -> int:
        return _bench.workload_fd(q, fd, n, 0, variant)

    def check() -> None:
        used0 = mock.used_idx()
        mem.write(BIG_BUF, b"\0" * BIG_LEN)
        assert run(1) == BIG_LEN
        assert mem.read(BIG_BUF, BIG_LEN) == pattern(BIG_LEN, 11, 5)
        assert mock.read_used(used0) == [(0, BIG_LEN)]

    suffix = " no Writer" if variant == 2 else ""
    return Workload(
        f"fdc-W{ndesc}" + ("x" if variant == 2 else ""),
        f"as fd-W{ndesc}, Cython loop (_bench.workload_fd){suffix}",
        "bytes",
        run,
        check,
        [mem, buf, mock, q],
        close=lambda: os.close(fd),
    )


def make_fd_preadv_c(nseg: int = 1) -> Workload:
    """C-level preadv of the 64 KiB file into one page-aligned buffer described as
    ``nseg`` iovecs (the kernel's own cost of splitting the read)."""
    fd = page_cache_file()
    host = HostBuffer("pg")

    def run(n: int) -> int:
        return _bench.preadv_loop(fd, host.view, n, nseg, 0)

    def check() -> None:
        host.view[:] = b"\0" * BIG_LEN
        assert run(1) == BIG_LEN
        assert bytes(host.view) == pattern(BIG_LEN, 11, 5)

    return Workload(
        f"preadv-c{nseg}",
        f"preadv from C, one buffer as {nseg} iovec{'s' if nseg > 1 else ''}",
        "bytes",
        run,
        check,
        [host],
        close=lambda: os.close(fd),
    )


def make_fd_preadv() -> Workload:
    """fd reference: one ``os.preadv(fd, [buf], 0)`` of the same 64 KiB into one
    page-aligned host buffer."""
    fd = page_cache_file()
    host = HostBuffer("pg")
    bufs = [host.view]

    def run(n: int) -> int:
        preadv = os.preadv
        total = 0
        for _ in range(n):
            total += preadv(fd, bufs, 0)
        return total

    def check() -> None:
        host.view[:] = b"\0" * BIG_LEN
        assert run(1) == BIG_LEN
        assert bytes(host.view) == pattern(BIG_LEN, 11, 5)

    return Workload(
        "preadv",
        "os.preadv 64K file -> one page-aligned buffer",
        "bytes",
        run,
        check,
        [host],
        close=lambda: os.close(fd),
    )
