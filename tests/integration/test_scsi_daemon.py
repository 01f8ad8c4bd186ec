"""vhost-device-scsi as a process over real image files, driven by our front-end.

Four request queues in parallel, front-end after front-end on one daemon, SIGTERM,
and a daemon killed with SIGKILL while writes are in flight: restarted on the same
socket, it resubmits them from the inflight area (vhost-user "Inflight I/O
tracking") and every write is in the image.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_process import DaemonProcess
from device_drivers import console_script

from vhost_backends.frontend import Frontend, FrontendRing
from vhost_backends.protocol import messages as m
from virtio_devices.scsi import testing as st
from virtio_queue.testing import VIRTQ_DESC_F_WRITE, RawDesc

pytestmark = pytest.mark.slow

TIMEOUT = 10.0
QSIZE = 128
NQ = 6  # control, event, 4 request queues
BLOCKS = 2048  # 1 MiB image


def command(*images: Path, read_only: bool = False) -> list[str]:
    return [
        *console_script("vhost-device-scsi", "vhost_backends.cli.scsi"),
        *(["-r"] if read_only else []),
        *map(str, images),
    ]


class Daemon:
    def __init__(self, tmp: Path, images: list[Path]) -> None:
        self.sock = str(tmp / "scsi.sock")
        self.proc = DaemonProcess(self.sock, [*command(*images), "-s", self.sock])
        self.proc.wait_for("listening", TIMEOUT)

    def connect(self, memory: int = 16 << 20) -> Frontend:
        fe = Frontend.connect(self.sock, timeout=TIMEOUT)
        fe.negotiate()
        fe.add_memory(memory)
        fe.set_mem_table()
        return fe


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(bytes((i * 11 + i // 512) & 0xFF for i in range(BLOCKS * 512)))
    return p


@pytest.fixture
def daemon(tmp_path: Path, image: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path, [image])
    yield d
    if d.proc.alive():
        d.proc.terminate()


class Buffers:
    """Buffers from guest memory above the rings (the rings sit in the first MiB)."""

    def __init__(self, start: int = 1 << 20) -> None:
        self.next = start

    def alloc(self, size: int) -> int:
        gpa = self.next
        self.next += (size + 63) & ~63
        return gpa


BUFS = Buffers()


def request(
    fe: Frontend, q: int, cdb: bytes, data_out: bytes = b"", data_in: int = 0
) -> tuple[int, int, int]:
    """Put one command on ring ``q``: (head, response gpa, data-in gpa); header and
    data-out share one readable buffer (the device reads them as one stream)."""
    mock = fe.rings[q].mock
    if BUFS.next > fe.memory.total_size - (4 << 20):
        BUFS.next = 1 << 20
    req = st.cmd_req(cdb) + data_out
    src = BUFS.alloc(len(req))
    fe.memory.write(src, req)
    resp = BUFS.alloc(st.RESP_HEADER + max(data_in, 1))
    descs = [RawDesc(src, len(req), 0, 0), RawDesc(resp, st.RESP_HEADER + data_in, VIRTQ_DESC_F_WRITE, 0)]
    return mock.add_chain(descs), resp, resp + st.RESP_HEADER


def test_four_request_queues_in_parallel(daemon: Daemon, image: Path) -> None:
    fe = daemon.connect()
    try:
        for i in range(NQ):
            fe.setup_ring(i, QSIZE)
        expect: dict[int, dict[int, tuple[int, bytes]]] = {}
        for q in range(2, NQ):
            expect[q] = {}
            for k in range(16):
                lba = (q - 2) * 64 + k * 4
                payload = bytes([q, k]) * 1024
                head, resp, _ = request(fe, q, st.write10(lba, 4), payload)
                expect[q][head] = (resp, payload)
        for q in range(2, NQ):
            fe.kick(q)
        for q in range(2, NQ):
            used = fe.wait_used(q, 16, TIMEOUT)
            assert sorted(h for h, _ in used) == sorted(expect[q])
            for head, length in used:
                assert length == st.RESP_HEADER
                r = st.Resp.parse(fe.memory.read(expect[q][head][0], st.RESP_HEADER))
                assert (r.response, r.status) == (0, 0)
        data = image.read_bytes()
        for q in range(2, NQ):
            for k in range(16):
                lba = (q - 2) * 64 + k * 4
                assert data[lba * 512 : (lba + 4) * 512] == bytes([q, k]) * 1024
        # Read back through all queues at once.
        reads = {}
        for q in range(2, NQ):
            head, _, din = request(fe, q, st.read10((q - 2) * 64, 64), data_in=64 * 512)
            reads[q] = (head, din)
            fe.kick(q)
        for q in range(2, NQ):
            assert fe.wait_used(q, 1, TIMEOUT) == [(reads[q][0], st.RESP_HEADER + 64 * 512)]
            lba = (q - 2) * 64
            assert fe.memory.read(reads[q][1], 64 * 512) == data[lba * 512 : (lba + 64) * 512]
    finally:
        fe.close()


def test_front_end_after_front_end_then_sigterm(daemon: Daemon) -> None:
    for round_ in range(3):
        fe = daemon.connect()
        try:
            for i in range(3):
                fe.setup_ring(i, QSIZE)
            head, _, din = request(fe, 2, st.inquiry(), data_in=96)
            fe.kick(2)
            ((got, length),) = fe.wait_used(2, 1, TIMEOUT)
            assert got == head and length > st.RESP_HEADER, round_
            assert fe.memory.read(din + 8, 8) == b"rust-vmm"
        finally:
            fe.close()
    assert daemon.proc.terminate() == 0


def _restart_ring(fe: Frontend, ring: FrontendRing) -> None:
    """Start ``ring`` (same memory, same rings) on a new back-end, QEMU's way after a
    crash: base = the used index (the back-end recovers the rest from the area)."""
    mock = ring.mock
    fe.rings[ring.index] = ring
    fe.set_vring_num(ring.index, mock.size)
    fe.set_vring_base(ring.index, mock.used_idx())
    fe.set_vring_addr(
        ring.index, fe.user_addr(mock.desc_table), fe.user_addr(mock.avail_ring), fe.user_addr(mock.used_ring)
    )
    fe.set_vring_call(ring.index, ring.call_fd)
    fe.set_vring_kick(ring.index, ring.kick_fd)
    fe.set_vring_enable(ring.index, True)


def _in_flight(ifd: int, inf: m.Inflight, q: int) -> int:
    raw = os.pread(ifd, inf.mmap_size, 0)
    base = q * m.inflight_queue_size(QSIZE)
    return sum(
        m.INFLIGHT_DESC.unpack_from(raw, base + 16 + i * m.INFLIGHT_DESC.size)[0] for i in range(QSIZE)
    )


def test_sigkill_with_64_writes_in_flight_loses_none(tmp_path: Path, image: Path) -> None:
    """Issue 17 §6: kill -9 mid-write, restart on the same socket, reconnect with the
    same inflight area: the in-flight writes are resubmitted, all 64 complete GOOD,
    and every one is in the image."""
    for attempt in range(5):
        started: list[Daemon] = []
        try:
            d = Daemon(tmp_path, [image])
            started.append(d)
            fe = d.connect(memory=32 << 20)
            inf, ifd = fe.get_inflight_fd(NQ, QSIZE)
            fe.set_inflight_fd(inf, ifd)
            rings = [fe.setup_ring(i, QSIZE) for i in range(3)]
            payloads = {}
            for k in range(64):
                payload = bytes([attempt + 1, k]) * 8192  # 16 KiB each: 64 of them fill the image
                head, resp, _ = request(fe, 2, st.write10(k * 32, 32, flags=0x08), payload)
                payloads[head] = (k, resp, payload)
            fe.kick(2)
            done = fe.wait_used(2, 1, TIMEOUT)
            os.kill(d.proc.proc.pid, signal.SIGKILL)
            d.proc.proc.wait(TIMEOUT)
            assert d.proc.proc.stderr is not None
            d.proc.proc.stderr.close()
            left = _in_flight(ifd, inf, 2)
            # A second daemon on the same socket path, the same guest memory and area.
            d2 = Daemon(tmp_path, [image])
            started.append(d2)
            fe2 = Frontend.connect(d2.sock, timeout=TIMEOUT)
            fe2.negotiate()
            fe2.memory, fe2.regions, fe.regions = fe.memory, fe.regions, []
            fe2.set_mem_table()
            fe2.set_inflight_fd(inf, ifd)
            for ring in rings:
                _restart_ring(fe2, ring)
            fe.rings.clear()
            # What was never popped is served on the next kick, as the guest's next one.
            fe2.kick(2)
            if len(done) < 64:
                done += fe2.wait_used(2, 64 - len(done), TIMEOUT)
            assert sorted({h for h, _ in done}) == sorted(payloads)
            data = image.read_bytes()
            for head, length in done:
                k, resp, payload = payloads[head]
                assert length == st.RESP_HEADER
                r = st.Resp.parse(fe2.memory.read(resp, st.RESP_HEADER))
                assert (r.response, r.status) == (0, 0)
                assert data[k * 32 * 512 : (k + 1) * 32 * 512] == payload
            if left:
                assert "resubmitting" in d2.proc.wait_for("in-flight requests", TIMEOUT)
            fe2.close()
            fe.close()
            os.close(ifd)
            assert d2.proc.terminate() == 0
            if left:
                return
        finally:
            for daemon in started:
                if daemon.proc.alive():
                    daemon.proc.proc.kill()
                    daemon.proc.terminate()

    pytest.skip("no write was in flight at SIGKILL in 5 attempts: resubmission not exercised")


def test_read_only_daemon_refuses_writes(tmp_path: Path, image: Path) -> None:
    before = image.read_bytes()
    sock = str(tmp_path / "ro.sock")
    proc = DaemonProcess(sock, [*command(image, read_only=True), "-s", sock])
    try:
        proc.wait_for("listening", TIMEOUT)
        fe = Frontend.connect(sock, timeout=TIMEOUT)
        fe.negotiate()
        fe.add_memory(4 << 20)
        fe.set_mem_table()
        for i in range(3):
            fe.setup_ring(i, QSIZE)
        _, resp, _ = request(fe, 2, st.write10(0, 1), b"\xff" * 512)
        fe.kick(2)
        fe.wait_used(2, 1, TIMEOUT)
        r = st.Resp.parse(fe.memory.read(resp, st.RESP_HEADER))
        assert r.status == 2 and r.key_asc == (7, 0x27, 0)
        _, _, din = request(fe, 2, bytes([0x1A, 0, 0x3F, 0, 64, 0]), data_in=64)
        fe.kick(2)
        fe.wait_used(2, 1, TIMEOUT)
        assert fe.memory.read(din + 2, 1)[0] & 0x80  # WP
        fe.close()
    finally:
        assert proc.terminate() == 0
    assert image.read_bytes() == before


def test_readable_after_writable_refused_by_the_daemon(daemon: Daemon, image: Path) -> None:
    """VIRTIO 1.2 §2.7.4.2: the driver MUST place device-writable descriptors after
    device-readable ones.  A WRITE whose data-out follows its response buffer is
    answered FAILURE over vhost-user, the image keeps its bytes, and the daemon goes
    on serving the same ring."""
    before = image.read_bytes()
    fe = daemon.connect()
    try:
        for i in range(3):
            fe.setup_ring(i, QSIZE)
        mock = fe.rings[2].mock
        hdr, resp, data = BUFS.alloc(st.REQ_HEADER), BUFS.alloc(st.RESP_HEADER), BUFS.alloc(4096)
        fe.memory.write(hdr, st.cmd_req(st.write10(0, 8)))
        fe.memory.write(data, b"\xa5" * 4096)
        fe.memory.write(resp, b"\xee" * st.RESP_HEADER)
        head = mock.add_chain(
            [
                RawDesc(hdr, st.REQ_HEADER, 0, 0),
                RawDesc(resp, st.RESP_HEADER, VIRTQ_DESC_F_WRITE, 0),
                RawDesc(data, 4096, 0, 0),
            ]
        )
        fe.kick(2)
        assert fe.wait_used(2, 1, TIMEOUT) == [(head, st.RESP_HEADER)]
        r = st.Resp.parse(fe.memory.read(resp, st.RESP_HEADER))
        assert (r.response, r.status) == (9, 0), r  # VIRTIO_SCSI_S_FAILURE
        assert image.read_bytes() == before
        # The same ring goes on: a read in the spec's order is served.
        head, resp, din = request(fe, 2, st.read10(0, 8), data_in=4096)
        fe.kick(2)
        assert fe.wait_used(2, 1, TIMEOUT) == [(head, st.RESP_HEADER + 4096)]
        assert fe.memory.read(din, 4096) == before[:4096]
    finally:
        fe.close()
    assert "device-readable after a device-writable" in daemon.proc.wait_for("device-readable", TIMEOUT)


def test_ring_larger_than_the_inflight_area_is_served_and_reported(daemon: Daemon) -> None:
    """QEMU 10.0's vhost-user-scsi-pci: GET_INFLIGHT_FD for 128-entry queues (its
    virtqueue_size), then 1024-entry rings (what it gives the guest).  The daemon
    takes the rings (vhost-user leaves a ring's size to the front-end), serves them,
    and logs that heads from 128 on are not tracked across a restart."""
    fe = daemon.connect()
    try:
        inf, ifd = fe.get_inflight_fd(NQ, QSIZE)
        fe.set_inflight_fd(inf, ifd)
        for i in range(3):
            fe.setup_ring(i, 1024)
        head, _, din = request(fe, 2, st.inquiry(), data_in=96)
        fe.kick(2)
        ((got, length),) = fe.wait_used(2, 1, TIMEOUT)
        assert got == head and length > st.RESP_HEADER
        assert fe.memory.read(din + 8, 8) == b"rust-vmm"
        line = daemon.proc.wait_for("not tracked across a back-end restart", TIMEOUT)
        assert "ring of 1024 entries, inflight area of 128" in line
        os.close(ifd)
    finally:
        fe.close()
