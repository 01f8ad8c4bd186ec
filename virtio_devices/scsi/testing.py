"""Request builders and response parsing for virtio-scsi tests (VIRTIO 1.2 §5.6.6).

Public, like :mod:`virtio_devices.testing`: our tests and embedders use them.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

REQ_HEADER = 51
RESP_HEADER = 108
SENSE_SIZE = 96


def lun_bytes(lun: int = 0, target: int = 0) -> bytes:
    """The LUN field as Linux's virtio_scsi fills it: flat space addressing."""
    return bytes([1, target, 0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0])


def cmd_req(cdb: bytes, lun: int = 0, target: int = 0, tag: int = 1, lun_field: bytes | None = None) -> bytes:
    """``virtio_scsi_cmd_req`` with ``cdb`` padded to 32 bytes."""
    field = lun_field if lun_field is not None else lun_bytes(lun, target)
    return field + struct.pack("<QBBB", tag, 0, 0, 0) + cdb.ljust(32, b"\0")


class Resp(NamedTuple):
    """A parsed ``virtio_scsi_cmd_resp``."""

    sense_len: int
    resid: int
    status_qualifier: int
    status: int
    response: int
    sense: bytes

    @classmethod
    def parse(cls, raw: bytes) -> Resp:
        sense_len, resid, sq, status, response = struct.unpack_from("<IIHBB", raw)
        return cls(sense_len, resid, sq, status, response, raw[12 : 12 + min(sense_len, SENSE_SIZE)])

    @property
    def key_asc(self) -> tuple[int, int, int]:
        """(sense key, ASC, ASCQ) from fixed-format sense."""
        assert self.sense[0] == 0x70, self.sense.hex()
        return self.sense[2] & 0xF, self.sense[12], self.sense[13]


def read10(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", 0x28, flags, lba, 0, blocks, 0)


def write10(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, flags, lba, 0, blocks, 0)


def read16(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", 0x88, flags, lba, blocks, 0, 0)


def write16(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, flags, lba, blocks, 0, 0)


def inquiry(evpd: bool = False, page: int = 0, alloc: int = 255) -> bytes:
    return struct.pack(">BBBHB", 0x12, int(evpd), page, alloc, 0)


def report_luns(select: int = 0, alloc: int = 4096) -> bytes:
    return struct.pack(">BBBHBIBB", 0xA0, 0, select, 0, 0, alloc, 0, 0)


def unmap(param_len: int) -> bytes:
    return struct.pack(">BB5sHB", 0x42, 0, b"", param_len, 0)


def unmap_params(*ranges: tuple[int, int]) -> bytes:
    descs = b"".join(struct.pack(">QII", lba, n, 0) for lba, n in ranges)
    return struct.pack(">HH4s", 6 + len(descs), len(descs), b"") + descs


def write_same16(lba: int, blocks: int, unmap: bool = False, ndob: bool = False) -> bytes:
    return struct.pack(">BBQIBB", 0x93, (0x08 if unmap else 0) | (0x01 if ndob else 0), lba, blocks, 0, 0)


def sync10(lba: int = 0, blocks: int = 0) -> bytes:
    return struct.pack(">BBIBHB", 0x35, 0, lba, 0, blocks, 0)


def read_capacity16(alloc: int = 32) -> bytes:
    return struct.pack(">BBQIBB", 0x9E, 0x10, 0, alloc, 0, 0)


def tmf_req(subtype: int, lun: int = 0, tag: int = 0) -> bytes:
    return struct.pack("<II8sQ", 0, subtype, lun_bytes(lun), tag)
