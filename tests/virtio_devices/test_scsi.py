"""virtio-scsi device: framing (VIRTIO 1.2 §5.6.6), commands (SPC-5, SBC-4), sense, I/O, TMF.

Byte-level: each test puts a request on a queue of a :class:`DeviceRig`, runs the
worker jobs when the command touches the image, and checks the used length, the
response header, the data-in and the image.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_devices.hosts.images import DiskImage, open_image
from virtio_devices.scsi.device import REQUEST_QUEUES, ScsiDevice, parse_lun
from virtio_devices.scsi.emulation import SUPPORTED
from virtio_devices.scsi.testing import (
    RESP_HEADER,
    Resp,
    cmd_req,
    inquiry,
    lun_bytes,
    read10,
    read16,
    read_capacity16,
    report_luns,
    sync10,
    tmf_req,
    unmap,
    unmap_params,
    write10,
    write16,
    write_same16,
)
from virtio_devices.testing import DeviceRig
from virtio_queue.testing import VIRTQ_DESC_F_WRITE, RawDesc

BLOCKS = 64
IMAGE = bytes((i * 7 + i // 512) & 0xFF for i in range(BLOCKS * 512))
RQ = 2  # the first request queue

ILLEGAL, DATA_PROTECT, MEDIUM = 0x5, 0x7, 0x3


class Scsi:
    """A rig over a ScsiDevice with two memfd images (LUN 0 read-write, LUN 1 as given)."""

    def __init__(self, *, read_only: bool = False, solid_state: bool = False) -> None:
        self.images = [DiskImage.from_bytes(IMAGE, name="lun0"), DiskImage.from_bytes(512 * 8, name="lun1")]
        self.device = ScsiDevice(self.images, read_only=read_only, solid_state=solid_state)
        self.rig = DeviceRig(self.device, queue_size=64, memory_size=8 << 20, event_idx=True)

    def run(
        self,
        cdb: bytes,
        *,
        lun: int = 0,
        data_out: bytes = b"",
        data_in: int = 0,
        queue: int = RQ,
        lun_field: bytes | None = None,
        wait: bool = False,
        header: bytes | None = None,
    ) -> tuple[int, Resp, bytes]:
        """One command: (used length, response, data-in bytes); ``header``: the raw
        request header instead of one built from ``cdb`` and ``lun``."""
        req = header if header is not None else cmd_req(cdb, lun, lun_field=lun_field)
        readable = [req] + ([data_out] if data_out else [])
        writable = [RESP_HEADER] + ([data_in] if data_in else [])
        head, outs = self.rig.add_request(queue, readable, writable)
        used = self.rig.kick(queue)
        if not used or wait:
            self.rig.complete_workers()
            used = self.rig.used(queue)
        assert [h for h, _ in used] == [head]
        length = used[0][1]
        resp = Resp.parse(self.rig.read(outs[0], RESP_HEADER))
        data = self.rig.read(outs[1], max(0, length - RESP_HEADER)) if data_in else b""
        return length, resp, data

    def image(self, k: int = 0) -> bytes:
        img = self.images[k]
        return os.pread(img.fd, img.size, 0)

    def close(self) -> None:
        self.rig.close()
        for img in self.images:
            img.close()


@pytest.fixture
def scsi() -> Iterator[Scsi]:
    s = Scsi()
    yield s
    s.close()


@pytest.fixture
def ro() -> Iterator[Scsi]:
    s = Scsi(read_only=True, solid_state=True)
    yield s
    s.close()


def good(resp: Resp) -> None:
    assert (resp.response, resp.status, resp.sense_len) == (0, 0, 0), resp


def check(resp: Resp, key: int, asc: int, ascq: int = 0) -> None:
    assert (resp.response, resp.status) == (0, 2), resp
    assert resp.sense_len == 18
    assert resp.key_asc == (key, asc, ascq)


# -- identity and config (§5.6.3, §5.6.4) ----------------------------------------------------


def test_identity_features_and_config() -> None:
    dev = ScsiDevice([])
    assert dev.device_id == 8
    assert dev.num_queues == 2 + REQUEST_QUEUES
    # Rings up to QEMU's VIRTQUEUE_MAX_SIZE (QEMU 10.0 sets 1024 whatever virtqueue_size says).
    assert dev.queue_sizes == (1024,) * (2 + REQUEST_QUEUES)
    assert dev.device_features() == (1 << 32) | (1 << 28) | (1 << 29) | 1 | 4  # no NOTIFY_ON_EMPTY
    cfg = struct.unpack("<IIIIIIIHHI", dev.config_space())
    assert cfg == (REQUEST_QUEUES, 126, 0xFFFF, 128, 16, 96, 32, 0, 255, 16383)


def test_parse_lun_formats() -> None:
    assert parse_lun(lun_bytes(0)) == (0, 0)
    assert parse_lun(lun_bytes(300, target=2)) == (2, 300)
    assert parse_lun(bytes([1, 0, 0, 5, 0, 0, 0, 0])) == (0, 5)  # peripheral, bus 0
    assert parse_lun(bytes([0xC1, 1, 0, 0, 0, 0, 0, 0])) == (0, 0xC101)
    assert parse_lun(bytes([1, 0, 0xC1, 1, 0, 0, 0, 0])) == (0, 0xC101)
    assert parse_lun(bytes([2, 0, 0x40, 0, 0, 0, 0, 0])) is None
    assert parse_lun(bytes([1, 0, 0x80, 0, 0, 0, 0, 0])) is None  # logical unit addressing
    assert parse_lun(bytes([1, 0, 0x40, 0, 1, 0, 0, 0])) is None  # a second level


# -- framing and response codes (§5.6.6.1) ---------------------------------------------------


def test_bad_target_and_lun_format(scsi: Scsi) -> None:
    n, resp, _ = scsi.run(b"\x00", lun_field=lun_bytes(0, target=1), data_in=64)
    assert n == RESP_HEADER and resp.response == 3 and resp.resid == 64
    _, resp, _ = scsi.run(b"\x00", lun_field=bytes([1, 0, 0x80, 0, 0, 0, 0, 0]))
    assert resp.response == 3


def test_short_request_header_gets_failure(scsi: Scsi) -> None:
    """§5.6.6.1: the request header comes first, whole; a short one is FAILURE."""
    head, (out,) = scsi.rig.add_request(RQ, [b"\x01" * 20], [RESP_HEADER])
    assert scsi.rig.kick(RQ) == [(head, RESP_HEADER)]
    assert Resp.parse(scsi.rig.read(out, RESP_HEADER)).response == 9


def _chain(scsi: Scsi, queue: int, parts: list[bytes | int]) -> tuple[int, list[int]]:
    """A chain in exactly this order: bytes are device-readable buffers, ints the sizes
    of device-writable ones (filled with 0xee); returns the head and every address."""
    gpas = [scsi.rig.alloc(queue, p) for p in parts]
    descs = [
        RawDesc(gpa, p, VIRTQ_DESC_F_WRITE, 0) if isinstance(p, int) else RawDesc(gpa, len(p), 0, 0)
        for gpa, p in zip(gpas, parts, strict=True)
    ]
    return scsi.rig.add_chain(queue, descs), gpas


@pytest.mark.parametrize(
    "order",
    [
        "header, response, data-out",  # a WRITE's data after the response header
        "response, header, data-out",
        "header, response, data-out, data-in",
    ],
)
def test_readable_after_writable_gets_failure_and_is_not_executed(scsi: Scsi, order: str) -> None:
    """VIRTIO 1.2 §2.7.4.2: the driver MUST place any device-writable descriptor
    elements after any device-readable ones (§5.6.6.1 spells the request that way).
    A WRITE laid out otherwise is answered FAILURE and never reaches the image."""
    payload = b"\x5a" * 1024
    parts: dict[str, bytes | int] = {
        "header": cmd_req(write10(3, 2)),
        "response": RESP_HEADER,
        "data-out": payload,
        "data-in": 512,
    }
    layout = [parts[name] for name in order.split(", ")]
    head, gpas = _chain(scsi, RQ, layout)
    assert scsi.rig.kick(RQ) == [(head, RESP_HEADER)]
    first_writable = gpas[[isinstance(p, int) for p in layout].index(True)]
    resp = Resp.parse(scsi.rig.read(first_writable, RESP_HEADER))
    assert (resp.response, resp.status, resp.sense_len) == (9, 0, 0), resp
    assert scsi.image() == IMAGE
    # The queue goes on: the next request, in order, is served.
    _, resp, data = scsi.run(read10(3, 2), data_in=1024)
    good(resp)
    assert data == IMAGE[3 * 512 : 5 * 512]


def test_readable_after_writable_on_control_queue_is_returned_empty(scsi: Scsi) -> None:
    """§2.7.4.2 on the control queue: the TMF is not answered, the chain comes back
    with used length 0."""
    head, _ = _chain(scsi, 0, [1, tmf_req(5)])
    assert scsi.rig.kick(0) == [(head, 0)]


_PART = st.sampled_from(["header", "response", "data-out", "data-in", "empty-readable", "empty-writable"])


@given(names=st.lists(_PART, min_size=1, max_size=6), write=st.booleans())
def test_any_descriptor_layout_gets_a_defined_answer(names: list[str], write: bool) -> None:
    """Header, response, data buffers and empty ones in any order and direction:
    never a crash; a layout with a device-readable descriptor after a
    device-writable one (VIRTIO 1.2 §2.7.4.2) is answered FAILURE when a response
    header fits (else used length 0) and leaves the image as it was; any layout
    writes the image only inside the command's blocks."""
    scsi = Scsi()
    try:
        parts: dict[str, bytes | int] = {
            "header": cmd_req(write10(3, 2) if write else read10(3, 2)),
            "response": RESP_HEADER,
            "data-out": b"\x5a" * 1024,
            "data-in": 1024,
            "empty-readable": b"",
            "empty-writable": 0,
        }
        layout = [parts[n] for n in names]
        head, gpas = _chain(scsi, RQ, layout)
        used = scsi.rig.kick(RQ)
        if not used:
            scsi.rig.complete_workers()
            used = scsi.rig.used(RQ)
        ((got, length),) = used
        assert got == head
        writable = [i for i, p in enumerate(layout) if isinstance(p, int)]
        room = sum(p for p in layout if isinstance(p, int))
        misordered = any(isinstance(p, bytes) for p in layout[writable[0] :]) if writable else False
        if misordered:
            assert scsi.image() == IMAGE
            if room < RESP_HEADER:
                assert length == 0
            else:
                assert length == RESP_HEADER
                first = layout[writable[0]]
                if isinstance(first, int) and first >= RESP_HEADER:  # the header lands there whole
                    assert Resp.parse(scsi.rig.read(gpas[writable[0]], RESP_HEADER)).response == 9
        image = scsi.image()
        assert image[: 3 * 512] == IMAGE[: 3 * 512] and image[5 * 512 :] == IMAGE[5 * 512 :]
    finally:
        scsi.close()


def test_no_room_for_response_header_is_returned_empty(scsi: Scsi) -> None:
    head, _ = scsi.rig.add_request(RQ, [cmd_req(b"\x00")], [50])
    assert scsi.rig.kick(RQ) == [(head, 0)]


def test_overrun_when_data_in_is_smaller_than_the_answer(scsi: Scsi) -> None:
    n, resp, _ = scsi.run(inquiry(alloc=96), data_in=16)
    assert (n, resp.response) == (RESP_HEADER, 1)
    n, resp, _ = scsi.run(read10(0, 2), data_in=512)
    assert (n, resp.response) == (RESP_HEADER, 1)
    n, resp, _ = scsi.run(write10(0, 2), data_out=bytes(512))
    assert (n, resp.response) == (RESP_HEADER, 1)
    assert scsi.image() == IMAGE


def test_residual_of_a_short_answer(scsi: Scsi) -> None:
    n, resp, data = scsi.run(inquiry(alloc=255), data_in=200)
    good(resp)
    assert n == RESP_HEADER + len(data) and resp.resid == 200 - len(data)


# -- commands ----------------------------------------------------------------------------------


def test_test_unit_ready_and_noops(scsi: Scsi) -> None:
    for cdb in (b"\x00", b"\x1b\x00\x00\x00\x01\x00", b"\x1e\x00\x00\x00\x01\x00"):
        n, resp, _ = scsi.run(cdb)
        assert n == RESP_HEADER
        good(resp)


def test_unknown_opcode_is_invalid_command_operation_code(scsi: Scsi) -> None:
    _, resp, _ = scsi.run(b"\x15")  # MODE SELECT(6)
    check(resp, ILLEGAL, 0x20)


def test_naca_is_refused(scsi: Scsi) -> None:
    """SAM-6 §5.13: NACA=1 without ACA support is INVALID FIELD IN CDB."""
    _, resp, _ = scsi.run(b"\x00\x00\x00\x00\x00\x04")
    check(resp, ILLEGAL, 0x24)


def test_request_sense_fixed_and_descriptor(scsi: Scsi) -> None:
    _, resp, data = scsi.run(b"\x03\x00\x00\x00\xfc\x00", data_in=252)
    good(resp)
    assert data == bytes([0x70, 0, 0, 0, 0, 0, 0, 10]) + bytes(10)
    _, resp, data = scsi.run(b"\x03\x01\x00\x00\xfc\x00", data_in=252)
    assert data == bytes([0x72, 0, 0, 0, 0, 0, 0, 0])


def test_inquiry_standard(scsi: Scsi) -> None:
    _, resp, data = scsi.run(inquiry(), data_in=255)
    good(resp)
    assert data[0] == 0 and data[2] == 7 and data[3] & 0x0F == 2 and data[7] & 0x02
    assert data[4] == len(data) - 5
    assert data[8:16] == b"rust-vmm" and data[16:32] == b"vhost-user-scsi "
    _, resp, data = scsi.run(inquiry(alloc=5), data_in=255)
    assert len(data) == 5
    _, resp, _ = scsi.run(inquiry(page=0x80), data_in=255)
    check(resp, ILLEGAL, 0x24)


def test_inquiry_vpd_pages(scsi: Scsi, ro: Scsi) -> None:
    _, _, data = scsi.run(inquiry(True, 0x00), data_in=255)
    assert data[:4] == bytes([0, 0, 0, 6]) and data[4:] == bytes([0, 0x80, 0x83, 0xB0, 0xB1, 0xB2])
    _, _, serial = scsi.run(inquiry(True, 0x80), data_in=255)
    assert serial[1] == 0x80 and len(serial[4:]) == serial[3] > 0
    _, _, ident = scsi.run(inquiry(True, 0x83), data_in=255)
    assert ident[4:8] == bytes([2, 1, 0, ident[7]]) and ident[8:16] == b"rust-vmm"
    _, _, b0 = scsi.run(inquiry(True, 0xB0), data_in=255)
    assert b0[3] == 0x3C and b0[4] & 1  # WSNZ
    assert struct.unpack_from(">I", b0, 8)[0] == 0xFFFF
    assert struct.unpack_from(">II", b0, 20) == (1 << 22, 256)
    _, _, b1 = scsi.run(inquiry(True, 0xB1), data_in=255)
    assert b1[4:6] == b"\0\0"  # rotation rate not reported
    _, _, b1 = ro.run(inquiry(True, 0xB1), data_in=255)
    assert b1[4:6] == b"\0\1"  # --solid-state: non-rotating
    _, _, b2 = scsi.run(inquiry(True, 0xB2), data_in=255)
    assert b2[5] & 0xE0 == 0xE0 and b2[5] & 0x1C == 0x04 and b2[6] & 7 == 2
    _, _, b2 = ro.run(inquiry(True, 0xB2), data_in=255)
    assert b2[5] == 0 and b2[6] == 0
    _, resp, _ = scsi.run(inquiry(True, 0x86), data_in=255)
    check(resp, ILLEGAL, 0x24)


def test_read_capacity(scsi: Scsi, ro: Scsi) -> None:
    _, resp, data = scsi.run(b"\x25" + bytes(9), data_in=8)
    good(resp)
    assert struct.unpack(">II", data) == (BLOCKS - 1, 512)
    _, resp, data = scsi.run(read_capacity16(), data_in=32)
    assert struct.unpack_from(">QI", data) == (BLOCKS - 1, 512) and data[14] == 0xC0  # LBPME, LBPRZ
    _, _, data = ro.run(read_capacity16(), data_in=32)
    assert data[14] == 0
    _, resp, _ = scsi.run(bytes([0x9E, 0x11]) + bytes(14), data_in=32)
    check(resp, ILLEGAL, 0x24)


def test_mode_sense(scsi: Scsi, ro: Scsi) -> None:
    _, resp, data = scsi.run(bytes([0x1A, 0, 0x3F, 0, 255, 0]), data_in=255)
    good(resp)
    assert data[0] == len(data) - 1 and data[2] == 0x10 and data[3] == 8  # DPOFUA, one descriptor
    assert struct.unpack_from(">I", data, 4)[0] == BLOCKS
    pages = data[12:]
    assert pages[0:2] == bytes([0x08, 0x12]) and pages[2] & 0x04  # WCE
    assert pages[20:22] == bytes([0x0A, 0x0A])
    _, _, data = ro.run(bytes([0x1A, 0x08, 0x08, 0, 255, 0]), data_in=255)
    assert data[2] & 0x80 and data[3] == 0 and data[4] == 0x08  # WP, DBD, caching page
    _, _, data = scsi.run(bytes([0x5A, 0x10, 0x0A, 0, 0, 0, 0, 0, 255, 0]), data_in=255)
    assert struct.unpack_from(">H", data, 6)[0] == 16 and data[4] & 1  # LONGLBA
    assert data[24:26] == bytes([0x0A, 0x0A])
    _, resp, _ = scsi.run(bytes([0x1A, 0, 0xC8, 0, 255, 0]), data_in=255)
    check(resp, ILLEGAL, 0x39)  # saved values
    _, resp, _ = scsi.run(bytes([0x1A, 0, 0x1C, 0, 255, 0]), data_in=255)
    check(resp, ILLEGAL, 0x24)


def test_report_luns(scsi: Scsi) -> None:
    _, resp, data = scsi.run(report_luns(), data_in=4096)
    good(resp)
    assert data == struct.pack(">II", 16, 0) + bytes(8) + bytes([0, 1]) + bytes(6)
    _, resp, data = scsi.run(report_luns(select=1), data_in=4096, lun_field=bytes([0xC1, 1]) + bytes(6))
    assert data == struct.pack(">II", 8, 0) + bytes([0xC1, 1]) + bytes(6)
    _, resp, _ = scsi.run(report_luns(select=7), data_in=4096)
    check(resp, ILLEGAL, 0x24)


def test_missing_lun(scsi: Scsi) -> None:
    """SPC-5 §6.7.2: PQ 011b/PDT 1Fh; other commands LOGICAL UNIT NOT SUPPORTED (25h)."""
    _, resp, data = scsi.run(inquiry(), lun=5, data_in=255)
    good(resp)
    assert data[0] == 0x7F
    _, resp, _ = scsi.run(read10(0, 1), lun=5, data_in=512)
    check(resp, ILLEGAL, 0x25)
    _, resp, data = scsi.run(b"\x03\x00\x00\x00\xfc\x00", lun=5, data_in=252)
    good(resp)
    assert data[2] == ILLEGAL and data[12] == 0x25
    _, resp, data = scsi.run(report_luns(), lun=5, data_in=4096)
    good(resp)


def test_report_supported_operation_codes(scsi: Scsi) -> None:
    _, resp, data = scsi.run(bytes([0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0]), data_in=4096)
    good(resp)
    (n,) = struct.unpack_from(">I", data)
    ops = {data[4 + 8 * i] for i in range(n // 8)}
    assert {0x00, 0x28, 0x2A, 0x35, 0x42, 0x93, 0xA0, 0xA3} <= ops
    _, _, one = scsi.run(bytes([0xA3, 0x0C, 1, 0x28, 0, 0, 0, 0, 1, 0, 0, 0]), data_in=256)
    assert one[1] & 7 == 3 and struct.unpack_from(">H", one, 2)[0] == 10 and one[4] == 0x28
    _, _, one = scsi.run(bytes([0xA3, 0x0C, 1, 0x15, 0, 0, 0, 0, 1, 0, 0, 0]), data_in=256)
    assert one[1] & 7 == 1
    _, resp, _ = scsi.run(bytes([0xA3, 0x0C, 1, 0x9E, 0, 0, 0, 0, 1, 0, 0, 0]), data_in=256)
    check(resp, ILLEGAL, 0x24)  # has service actions: option 1 cannot ask for it
    _, _, one = scsi.run(bytes([0xA3, 0x0C, 0x82, 0x9E, 0, 0x10, 0, 0, 1, 0, 0, 0]), data_in=256)
    assert one[1] == 0x83 and len(one) == 4 + 16 + 12  # CTDP, supported, usage, timeouts


# -- block I/O ---------------------------------------------------------------------------------


def test_read(scsi: Scsi) -> None:
    n, resp, data = scsi.run(read10(3, 4), data_in=4 * 512)
    good(resp)
    assert n == RESP_HEADER + 2048 and data == IMAGE[3 * 512 : 7 * 512]
    n, resp, data = scsi.run(read16(0, 1), data_in=1024)  # bigger buffer: residual
    assert resp.resid == 512 and data == IMAGE[:512]
    n, resp, data = scsi.run(bytes([0x08, 0, 0, 2, 1, 0]), data_in=512)  # READ(6)
    assert data == IMAGE[1024:1536]


def test_write_and_fua(scsi: Scsi) -> None:
    payload = b"\xab" * 1024
    n, resp, _ = scsi.run(write10(10, 2, flags=0x08), data_out=payload)
    good(resp)
    assert n == RESP_HEADER
    assert scsi.image()[5120:6144] == payload
    scsi.run(write16(0, 1), data_out=b"\x01" * 512)
    scsi.run(bytes([0x0A, 0, 0, 1, 1, 0]), data_out=b"\x02" * 512)  # WRITE(6)
    img = scsi.image()
    assert img[:512] == b"\x01" * 512 and img[512:1024] == b"\x02" * 512


def test_zero_length_transfer_is_good(scsi: Scsi) -> None:
    n, resp, _ = scsi.run(read10(0, 0))
    good(resp)
    assert n == RESP_HEADER


def test_lba_out_of_range(scsi: Scsi) -> None:
    """SBC-4 §4.5: an I/O past the capacity is LOGICAL BLOCK ADDRESS OUT OF RANGE, no access."""
    for cdb in (read10(BLOCKS - 1, 2), read16(1 << 63, 1), write10(BLOCKS, 1), sync10(BLOCKS, 1)):
        _, resp, _ = scsi.run(cdb, data_in=1024)
        check(resp, ILLEGAL, 0x21)
    assert scsi.image() == IMAGE


def test_rdprotect_is_invalid_field(scsi: Scsi) -> None:
    _, resp, _ = scsi.run(read10(0, 1, flags=0x20), data_in=512)
    check(resp, ILLEGAL, 0x24)


def test_read_only_refuses_writes(ro: Scsi) -> None:
    """SBC-4 §4.11: DATA PROTECT / WRITE PROTECTED; upstream writes anyway."""
    for cdb, out in (
        (write10(0, 1), b"\xff" * 512),
        (write_same16(0, 4, unmap=True), bytes(512)),
        (unmap(24), unmap_params((0, 4))),
    ):
        _, resp, _ = ro.run(cdb, data_out=out)
        check(resp, DATA_PROTECT, 0x27)
    assert ro.image() == IMAGE


def test_synchronize_cache(scsi: Scsi) -> None:
    _, resp, _ = scsi.run(sync10())
    good(resp)
    _, resp, _ = scsi.run(bytes([0x91]) + bytes(15))
    good(resp)


def test_unmap_punches_holes(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"\x55" * (1 << 20))
    img = open_image(str(path), read_only=False)
    dev = ScsiDevice([img])
    with DeviceRig(dev, queue_size=16, memory_size=4 << 20) as rig:
        head, (out,) = rig.add_request(RQ, [cmd_req(unmap(24)), unmap_params((0, 256))], [RESP_HEADER])
        rig.kick(RQ)
        rig.complete_workers()
        assert rig.used(RQ) == [(head, RESP_HEADER)]
        assert Resp.parse(rig.read(out, RESP_HEADER)).status == 0
    data = path.read_bytes()
    assert data[: 256 * 512] == bytes(256 * 512) and data[256 * 512 :] == b"\x55" * ((1 << 20) - 256 * 512)
    with open(path, "rb") as f:
        assert os.lseek(f.fileno(), 0, os.SEEK_DATA) == 256 * 512  # a hole at the start
    img.close()


def test_unmap_bad_parameter_lists(scsi: Scsi) -> None:
    _, resp, _ = scsi.run(unmap(4), data_out=b"\0\0\0\0")
    check(resp, ILLEGAL, 0x1A)
    _, resp, _ = scsi.run(unmap(24), data_out=unmap_params((BLOCKS - 1, 2)))
    check(resp, ILLEGAL, 0x21)
    _, resp, _ = scsi.run(unmap(0))
    good(resp)
    assert scsi.image() == IMAGE


def test_write_same(scsi: Scsi) -> None:
    _, resp, _ = scsi.run(write_same16(4, 4), data_out=b"\x33" * 512)
    good(resp)
    _, resp, _ = scsi.run(write_same16(8, 2, unmap=True), data_out=bytes(512))
    good(resp)
    _, resp, _ = scsi.run(write_same16(12, 2, ndob=True))
    good(resp)
    img = scsi.image()
    assert img[4 * 512 : 8 * 512] == b"\x33" * 2048
    assert img[8 * 512 : 10 * 512] == bytes(1024) == img[12 * 512 : 14 * 512]
    assert img[10 * 512 : 12 * 512] == IMAGE[10 * 512 : 12 * 512]
    assert img[14 * 512 :] == IMAGE[14 * 512 :]
    _, resp, _ = scsi.run(write_same16(0, 0), data_out=bytes(512))
    check(resp, ILLEGAL, 0x24)  # WSNZ
    _, resp, _ = scsi.run(bytes([0x93, 0x10]) + struct.pack(">QI", 0, 1) + b"\0\0", data_out=bytes(512))
    check(resp, ILLEGAL, 0x24)  # ANCHOR


def test_image_that_shrank_gives_medium_error(scsi: Scsi) -> None:
    os.ftruncate(scsi.images[0].fd, 512 * 4)
    n, resp, data = scsi.run(read10(2, 4), data_in=2048)
    check(resp, MEDIUM, 0x11)
    assert n == RESP_HEADER + 1024 and data == IMAGE[1024:2048]


# -- queues, control, quiesce -----------------------------------------------------------------


def test_event_queue_buffers_stay_available(scsi: Scsi) -> None:
    scsi.rig.add_request(1, [], [16])
    assert scsi.rig.kick(1) == []
    assert scsi.rig.queues[1].pending() == 1


def test_every_request_queue_serves(scsi: Scsi) -> None:
    for q in range(2, 2 + REQUEST_QUEUES):
        _, resp, data = scsi.run(read10(q, 1), data_in=512, queue=q)
        good(resp)
        assert data == IMAGE[q * 512 : (q + 1) * 512]


def test_task_management(scsi: Scsi) -> None:
    for subtype, expect in ((0, 0), (1, 0), (2, 11), (3, 0), (4, 0), (5, 0), (6, 0), (7, 0)):
        head, (out,) = scsi.rig.add_request(0, [tmf_req(subtype)], [1])
        assert scsi.rig.kick(0) == [(head, 1)]
        assert scsi.rig.read(out, 1) == bytes([expect]), subtype
    head, (out,) = scsi.rig.add_request(0, [struct.pack("<II", 0, 5) + lun_bytes(0, 3) + bytes(8)], [1])
    assert scsi.rig.kick(0) == [(head, 1)] and scsi.rig.read(out, 1) == b"\x03"


def test_lun_reset_completes_requests_in_flight_first(scsi: Scsi) -> None:
    """The TMF is answered after the request in flight, without holding the loop
    (SYNCHRONIZE CACHE: always on a worker; a cached READ may complete at the kick)."""
    head, _ = scsi.rig.add_request(RQ, [cmd_req(sync10())], [RESP_HEADER])
    assert scsi.rig.kick(RQ) == []
    tmf, (out,) = scsi.rig.add_request(0, [tmf_req(5)], [1])
    assert scsi.rig.kick(0) == []  # held: a request is in flight
    scsi.rig.complete_workers()
    assert scsi.rig.used(RQ) == [(head, RESP_HEADER)]
    scsi.rig.clock.advance(0.01)
    scsi.rig.loop.run_due()
    assert scsi.rig.used(0) == [(tmf, 1)] and scsi.rig.read(out, 1) == b"\0"


def test_quiesce_answers_a_held_tmf(scsi: Scsi) -> None:
    scsi.rig.add_request(RQ, [cmd_req(sync10())], [RESP_HEADER])
    scsi.rig.kick(RQ)
    tmf, _ = scsi.rig.add_request(0, [tmf_req(1)], [1])
    assert scsi.rig.kick(0) == []
    scsi.device.quiesce(0)
    assert scsi.rig.used(0) == [(tmf, 1)]
    scsi.device.quiesce(RQ)  # the request: completed or given back, never lost
    assert scsi.rig.used(RQ) or scsi.rig.queues[RQ].pending() == 1


def test_asynchronous_notification_query(scsi: Scsi) -> None:
    for kind in (1, 2):
        head, (out,) = scsi.rig.add_request(0, [struct.pack("<I8sI", kind, lun_bytes(0), 0xFF)], [5])
        assert scsi.rig.kick(0) == [(head, 5)]
        assert scsi.rig.read(out, 5) == bytes(5)


def test_bad_control_request_is_dropped(scsi: Scsi) -> None:
    head, _ = scsi.rig.add_request(0, [b"\x09\0\0\0"], [1])
    assert scsi.rig.kick(0) == [(head, 0)]
    head, _ = scsi.rig.add_request(0, [b"\0\0"], [1])
    assert scsi.rig.kick(0) == [(head, 0)]


def test_quiesce_completes_io_in_flight(scsi: Scsi) -> None:
    head, _ = scsi.rig.add_request(RQ, [cmd_req(write10(0, 1)), b"\x77" * 512], [RESP_HEADER])
    used = scsi.rig.kick(RQ)  # the engine may have completed it already
    scsi.device.quiesce(RQ)
    used += scsi.rig.used(RQ)
    if used:  # the job had started: it ran to its end and was completed
        assert used == [(head, RESP_HEADER)]
        assert scsi.image()[:512] == b"\x77" * 512
    else:  # not started: the chain went back to the avail ring
        assert scsi.rig.queues[RQ].pending() == 1


# -- hypothesis: any header and CDB gets a defined answer, never an I/O outside the LUN --------


@settings(max_examples=300, deadline=None)
@given(
    lun=st.binary(min_size=8, max_size=8) | st.sampled_from([lun_bytes(0), lun_bytes(1), lun_bytes(2)]),
    cdb=st.binary(min_size=1, max_size=32),
    op=st.sampled_from([*(op for op, _, _ in SUPPORTED), 0x15, 0xFF]),
    data_out=st.binary(max_size=1024),
    data_in=st.sampled_from([0, 1, 96, 512, 4096]),
    attrs=st.none() | st.binary(min_size=11, max_size=11),
)
def test_any_request_gets_a_response(
    *, lun: bytes, cdb: bytes, op: int, data_out: bytes, data_in: int, attrs: bytes | None
) -> None:
    """Any LUN field, id/task_attr/prio/crn bytes, CDB, data-out and data-in size."""
    scsi = Scsi()
    try:
        cdb = bytes([op]) + cdb[1:]
        header = None if attrs is None else lun + attrs + cdb.ljust(32, b"\0")
        n, resp, _ = scsi.run(cdb, lun_field=lun, data_out=data_out, data_in=data_in, header=header)
        assert n >= RESP_HEADER
        assert resp.response in (0, 1, 3)
        if resp.response == 0:
            assert resp.status in (0, 2)
            assert n <= RESP_HEADER + data_in
        assert len(scsi.image()) == BLOCKS * 512  # never written past the LUN's end
    finally:
        scsi.close()


def test_cached_reads_are_served_without_a_worker(tmp_path: Path) -> None:
    """A page-cache hit is read with RWF_NOWAIT on the loop thread: completed by the
    kick itself; writes the file system cannot do without blocking go to a worker."""
    path = tmp_path / "disk.img"
    path.write_bytes(IMAGE)
    img = open_image(str(path), read_only=False)
    dev = ScsiDevice([img])
    try:
        with DeviceRig(dev, queue_size=16, memory_size=4 << 20) as rig:
            head, (resp, data) = rig.add_request(RQ, [cmd_req(read10(2, 4))], [RESP_HEADER, 2048])
            used = rig.kick(RQ)
            if not img.nowait_read:
                pytest.skip("this file system refuses RWF_NOWAIT reads")
            assert used == [(head, RESP_HEADER + 2048)]
            assert rig.read(data, 2048) == IMAGE[1024:3072]
            good(Resp.parse(rig.read(resp, RESP_HEADER)))
            head, _ = rig.add_request(RQ, [cmd_req(write10(0, 1, flags=0x08)), b"\x42" * 512], [RESP_HEADER])
            assert rig.kick(RQ) == []  # FUA: fdatasync on a worker
            rig.complete_workers()
            assert rig.used(RQ) == [(head, RESP_HEADER)]
        assert path.read_bytes()[:512] == b"\x42" * 512
    finally:
        img.close()


def test_unreadable_image_gives_medium_error(scsi: Scsi, tmp_path: Path) -> None:
    """An image that becomes unreadable (here: its fd now names a directory, EISDIR)
    answers MEDIUM ERROR / UNRECOVERED READ ERROR, and WRITE ERROR for writes."""
    bad = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    os.dup2(bad, scsi.images[0].fd)
    os.close(bad)
    _, resp, _ = scsi.run(read10(0, 1), data_in=512)
    check(resp, MEDIUM, 0x11)
    _, resp, _ = scsi.run(write10(0, 1), data_out=bytes(512))
    check(resp, MEDIUM, 0x0C)


def test_full_host_file_system_is_space_allocation_failed(scsi: Scsi) -> None:
    """ENOSPC on a write (here /dev/full) is DATA PROTECT / SPACE ALLOCATION FAILED
    WRITE PROTECT (SBC-4 §4.7.3.6), which thin-provisioning aware guests understand."""
    full = os.open("/dev/full", os.O_RDWR)
    os.dup2(full, scsi.images[0].fd)
    os.close(full)
    _, resp, _ = scsi.run(write10(0, 1), data_out=bytes(512))
    check(resp, DATA_PROTECT, 0x27, 0x07)
