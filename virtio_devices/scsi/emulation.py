"""SCSI command emulation of a direct-access block device (SPC-5, SBC-4), without I/O.

A :class:`Target` (one SCSI target, id 0, as upstream) holds one
:class:`LogicalUnit` per image (LUN k = image k).  :meth:`Target.execute` takes a
LUN number and a CDB and answers with one of:

* ``bytes``: the data-in of a command emulated here (INQUIRY, MODE SENSE...), already
  cut to the CDB's allocation length;
* a :class:`BlockIO`: a command that reads or writes the image (READ, WRITE,
  SYNCHRONIZE CACHE, WRITE SAME, UNMAP); the device runs it on a worker thread;
* or it raises :class:`CheckCondition` with the sense data (SPC-5 §4.4).

Nothing here touches guest memory or the image: every check on the CDB is done
before any I/O, so an I/O outside the LUN is never issued (SBC-4 §4.5: LOGICAL
BLOCK ADDRESS OUT OF RANGE).

Sense data is fixed format (SPC-5 §4.4.3) unless REQUEST SENSE asks for descriptor
format (DESC=1, §4.4.2); D_SENSE of the control mode page is 0 and not changeable.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from typing import NamedTuple

__all__ = [
    "BLOCK_SIZE",
    "BlockIO",
    "CheckCondition",
    "LogicalUnit",
    "Sense",
    "Target",
    "cdb_length",
]

#: Logical block size in bytes (upstream's 512).
BLOCK_SIZE = 512
BLOCK_SHIFT = 9
#: Largest READ/WRITE transfer, in blocks (config space ``max_sectors``).
MAX_TRANSFER_BLOCKS = 0xFFFF
#: Largest UNMAP / WRITE SAME range, in blocks (VPD page B0h).
MAX_UNMAP_BLOCKS = 1 << 22
MAX_UNMAP_DESCRIPTORS = 256
#: LUNs a target may hold (upstream: "Currently only up to 256 targets are supported").
MAX_LUNS = 256
#: The REPORT LUNS well-known logical unit (SPC-5 §8.2, W-LUN C101h).
REPORT_LUNS_WLUN = 0xC101

# SCSI status (SAM-6 §5.3).
GOOD = 0x00
CHECK_CONDITION = 0x02

# Sense keys (SPC-5 Table 52).
NO_SENSE = 0x0
MEDIUM_ERROR = 0x3
HARDWARE_ERROR = 0x4
ILLEGAL_REQUEST = 0x5
DATA_PROTECT = 0x7


class Sense(NamedTuple):
    """Sense key, additional sense code and qualifier (SPC-5 §4.4)."""

    key: int
    asc: int
    ascq: int

    def fixed(self) -> bytes:
        """Fixed-format sense data, 18 bytes (SPC-5 §4.4.3): response code 70h (current)."""
        return bytes([0x70, 0, self.key, 0, 0, 0, 0, 10, 0, 0, 0, 0, self.asc, self.ascq, 0, 0, 0, 0])

    def descriptor(self) -> bytes:
        """Descriptor-format sense data with no descriptors, 8 bytes (SPC-5 §4.4.2): 72h."""
        return bytes([0x72, self.key, self.asc, self.ascq, 0, 0, 0, 0])

    def encode(self, descriptor: bool) -> bytes:
        """The sense data in the format asked for."""
        return self.descriptor() if descriptor else self.fixed()


# Additional sense codes used (SPC-5 Table 53).
SENSE_NONE = Sense(NO_SENSE, 0x00, 0x00)
UNRECOVERED_READ_ERROR = Sense(MEDIUM_ERROR, 0x11, 0x00)
WRITE_ERROR = Sense(MEDIUM_ERROR, 0x0C, 0x00)
INTERNAL_TARGET_FAILURE = Sense(HARDWARE_ERROR, 0x44, 0x00)
PARAMETER_LIST_LENGTH_ERROR = Sense(ILLEGAL_REQUEST, 0x1A, 0x00)
INVALID_COMMAND_OPERATION_CODE = Sense(ILLEGAL_REQUEST, 0x20, 0x00)
LBA_OUT_OF_RANGE = Sense(ILLEGAL_REQUEST, 0x21, 0x00)
INVALID_FIELD_IN_CDB = Sense(ILLEGAL_REQUEST, 0x24, 0x00)
LOGICAL_UNIT_NOT_SUPPORTED = Sense(ILLEGAL_REQUEST, 0x25, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST = Sense(ILLEGAL_REQUEST, 0x26, 0x00)
SAVING_PARAMETERS_NOT_SUPPORTED = Sense(ILLEGAL_REQUEST, 0x39, 0x00)
WRITE_PROTECTED = Sense(DATA_PROTECT, 0x27, 0x00)
SPACE_ALLOCATION_FAILED = Sense(DATA_PROTECT, 0x27, 0x07)


class CheckCondition(Exception):
    """The command ends with CHECK CONDITION and this sense data."""

    def __init__(self, sense: Sense, detail: str = "") -> None:
        super().__init__(f"{sense.key:#x}/{sense.asc:02x}h/{sense.ascq:02x}h {detail}".rstrip())
        self.sense = sense


class BlockIO(NamedTuple):
    """A checked command that touches the image: what the device runs on a worker.

    ``op`` is ``"read"``, ``"write"``, ``"sync"``, ``"write_same"`` or ``"unmap"``.
    ``lba``/``blocks`` are inside the LUN (checked).  ``data_out`` is the number of
    data-out bytes the command needs (the UNMAP parameter list, WRITE SAME's block).
    """

    op: str
    lba: int = 0
    blocks: int = 0
    fua: bool = False
    unmap: bool = False
    ndob: bool = False
    data_out: int = 0


# Opcodes (SPC-5 / SBC-4).
TEST_UNIT_READY = 0x00
REQUEST_SENSE = 0x03
READ_6 = 0x08
WRITE_6 = 0x0A
INQUIRY = 0x12
MODE_SENSE_6 = 0x1A
START_STOP_UNIT = 0x1B
PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
READ_CAPACITY_10 = 0x25
READ_10 = 0x28
WRITE_10 = 0x2A
SYNCHRONIZE_CACHE_10 = 0x35
WRITE_SAME_10 = 0x41
UNMAP = 0x42
MODE_SENSE_10 = 0x5A
READ_16 = 0x88
WRITE_16 = 0x8A
SYNCHRONIZE_CACHE_16 = 0x91
WRITE_SAME_16 = 0x93
SERVICE_ACTION_IN_16 = 0x9E
SAI_READ_CAPACITY_16 = 0x10
REPORT_LUNS = 0xA0
MAINTENANCE_IN = 0xA3
MI_REPORT_SUPPORTED_OPERATION_CODES = 0x0C
READ_12 = 0xA8
WRITE_12 = 0xAA


def cdb_length(opcode: int) -> int:
    """CDB length from the opcode's group code (SPC-5 §4.2.5.1); 0 for variable/vendor."""
    return (6, 10, 10, 0, 16, 12, 0, 0)[opcode >> 5]


def _usage(opcode: int, length: int, sa: int | None = None) -> bytes:
    """A CDB usage map (SPC-5 §6.35.3): every field this emulation reads is marked.

    Marking whole bytes is what the standard allows for fields we look at; the
    control byte shows NACA as not supported (bit 2 clear)."""
    body = [opcode] + [0xFF] * (length - 2) + [0x00]
    if sa is not None:
        body[1] = 0x1F  # the SERVICE ACTION field
    return bytes(body)


#: Every command implemented: (opcode, service action or None, CDB length).
SUPPORTED: tuple[tuple[int, int | None, int], ...] = (
    (TEST_UNIT_READY, None, 6),
    (REQUEST_SENSE, None, 6),
    (READ_6, None, 6),
    (WRITE_6, None, 6),
    (INQUIRY, None, 6),
    (MODE_SENSE_6, None, 6),
    (START_STOP_UNIT, None, 6),
    (PREVENT_ALLOW_MEDIUM_REMOVAL, None, 6),
    (READ_CAPACITY_10, None, 10),
    (READ_10, None, 10),
    (WRITE_10, None, 10),
    (SYNCHRONIZE_CACHE_10, None, 10),
    (WRITE_SAME_10, None, 10),
    (UNMAP, None, 10),
    (MODE_SENSE_10, None, 10),
    (READ_16, None, 16),
    (WRITE_16, None, 16),
    (SYNCHRONIZE_CACHE_16, None, 16),
    (WRITE_SAME_16, None, 16),
    (SERVICE_ACTION_IN_16, SAI_READ_CAPACITY_16, 16),
    (REPORT_LUNS, None, 12),
    (MAINTENANCE_IN, MI_REPORT_SUPPORTED_OPERATION_CODES, 12),
    (READ_12, None, 12),
    (WRITE_12, None, 12),
)
_SUPPORTED_BY_OP = {op: (sa, length) for op, sa, length in SUPPORTED}
#: What a LUN that does not exist, and the REPORT LUNS well-known LUN, accept.
_WLUN_OPS = frozenset({TEST_UNIT_READY, REQUEST_SENSE, INQUIRY, REPORT_LUNS})


def _be16(cdb: bytes, at: int) -> int:
    return int.from_bytes(cdb[at : at + 2], "big")


def _be32(cdb: bytes, at: int) -> int:
    return int.from_bytes(cdb[at : at + 4], "big")


def _be64(cdb: bytes, at: int) -> int:
    return int.from_bytes(cdb[at : at + 8], "big")


def encode_lun(lun: int) -> bytes:
    """A LUN as REPORT LUNS lists it (SAM-6 §4.7): peripheral addressing below 256,
    flat space (01b) above, one level."""
    if lun == REPORT_LUNS_WLUN:
        return bytes([0xC1, 0x01, 0, 0, 0, 0, 0, 0])
    if lun < 256:
        return bytes([0, lun, 0, 0, 0, 0, 0, 0])
    return bytes([0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0, 0, 0])


def _inquiry_common(lun_present: bool, pdt: int) -> bytes:
    pq_pdt = pdt if lun_present else 0x7F  # PQ 011b, PDT 1Fh: no LU here (SPC-5 §6.7.2)
    data = bytearray(36)
    data[0] = pq_pdt
    data[2] = 0x07  # VERSION: SPC-5
    data[3] = 0x12  # HISUP, RESPONSE DATA FORMAT 2
    data[7] = 0x02  # CMDQUE: tagged commands run concurrently
    data[8:16] = b"rust-vmm"
    data[16:32] = b"vhost-user-scsi "
    data[32:36] = b"v0  "
    # Version descriptors (SPC-5 §6.7.2 Table 150): SAM-6, SPC-5, SBC-4.
    data += bytes(22) + struct.pack(">8H", 0x00C0, 0x05C0, 0x0600, 0, 0, 0, 0, 0)
    data[4] = len(data) - 5
    return bytes(data)


def _report_luns(cdb: bytes, luns: Sequence[int]) -> bytes:
    """REPORT LUNS (SPC-5 §6.33)."""
    select = cdb[2]
    alloc = _be32(cdb, 6)
    if alloc < 4:
        raise CheckCondition(INVALID_FIELD_IN_CDB, f"REPORT LUNS allocation length {alloc}")
    if select in (0x00, 0x02):
        listed = list(luns) + ([REPORT_LUNS_WLUN] if select == 0x02 else [])
    elif select == 0x01:
        listed = [REPORT_LUNS_WLUN]
    elif select in (0x10, 0x11, 0x12):
        # No administrative logical units (§6.33.2): 10h/12h list none; 11h lists all
        # when addressed to LUN 0 or the W-LUN, which is how we reach here.
        listed = list(luns) if select == 0x11 else []
    else:
        raise CheckCondition(INVALID_FIELD_IN_CDB, f"REPORT LUNS select report {select:#x}")
    body = b"".join(encode_lun(n) for n in listed)
    return (struct.pack(">II", len(body), 0) + body)[:alloc]


def _request_sense(cdb: bytes, sense: Sense) -> bytes:
    """REQUEST SENSE (SPC-5 §6.39): no deferred sense is kept, so the answer is the
    LU's state (no sense, or LOGICAL UNIT NOT SUPPORTED for a missing LU)."""
    return sense.encode(bool(cdb[1] & 0x01))[: cdb[4]]


class LogicalUnit:
    """One LUN over one image: the emulated answers of SPC-5 and SBC-4.

    ``blocks`` is the capacity in 512-byte blocks; ``read_only`` makes every command
    that writes end with DATA PROTECT / WRITE PROTECTED (SBC-4 §4.11); ``solid_state``
    is reported as rotation rate 1 in VPD page B1h; ``serial`` names the LU in VPD
    pages 80h/83h.
    """

    def __init__(
        self, lun: int, blocks: int, *, read_only: bool = False, solid_state: bool = False, serial: str = ""
    ) -> None:
        self.lun = lun
        self.blocks = blocks
        self.read_only = read_only
        self.solid_state = solid_state
        self.serial = (serial or f"LUN{lun}")[:20]
        # Thin provisioning (UNMAP, WRITE SAME with UNMAP) is offered when writable.
        self.thin = not read_only

    @staticmethod
    def serial_for(path: str, lun: int) -> str:
        """A stable serial number for an image path: the first 16 hex digits of its hash."""
        return hashlib.sha256(f"{lun}:{path}".encode()).hexdigest()[:16]

    # -- dispatch ----------------------------------------------------------------------
    def execute(self, cdb: bytes) -> bytes | BlockIO:
        """Answer one CDB (at least 16 bytes; the virtio header carries 32).

        Raises:
            CheckCondition: the command is unknown (INVALID COMMAND OPERATION CODE),
                a field is invalid (INVALID FIELD IN CDB), the range is outside the
                LUN (LOGICAL BLOCK ADDRESS OUT OF RANGE), or it writes a read-only
                LUN (WRITE PROTECTED).
        """
        op = cdb[0]
        handler = _HANDLERS.get(op)
        if handler is None:
            raise CheckCondition(INVALID_COMMAND_OPERATION_CODE, f"opcode {op:#04x}")
        length = cdb_length(op)
        if length and cdb[length - 1] & 0x04:
            # NACA set: we do not support ACA (SAM-6 §5.13: INVALID FIELD IN CDB).
            raise CheckCondition(INVALID_FIELD_IN_CDB, f"NACA set in control byte of {op:#04x}")
        return handler(self, cdb)

    # -- block I/O ---------------------------------------------------------------------
    def _range(self, lba: int, blocks: int) -> None:
        if lba + blocks > self.blocks or lba > self.blocks:
            raise CheckCondition(
                LBA_OUT_OF_RANGE, f"lba {lba} + {blocks} blocks beyond capacity {self.blocks}"
            )

    def _rw(self, cdb: bytes, write: bool) -> BlockIO:
        op = cdb[0]
        if op in (READ_6, WRITE_6):
            lba = ((cdb[1] & 0x1F) << 16) | _be16(cdb, 2)
            blocks = cdb[4] or 256  # SBC-4 §5.12: 0 means 256 blocks
            fua = False
        else:
            if cdb[1] & 0xE0:
                # RDPROTECT/WRPROTECT without protection information (SBC-4 §5.14 Table 70).
                raise CheckCondition(INVALID_FIELD_IN_CDB, f"RD/WRPROTECT {cdb[1] >> 5} with no protection")
            fua = bool(cdb[1] & 0x08)
            if op in (READ_10, WRITE_10):
                lba, blocks = _be32(cdb, 2), _be16(cdb, 7)
            elif op in (READ_12, WRITE_12):
                lba, blocks = _be32(cdb, 2), _be32(cdb, 6)
            else:
                lba, blocks = _be64(cdb, 2), _be32(cdb, 10)
        if write and self.read_only:
            raise CheckCondition(WRITE_PROTECTED, f"write to read-only LUN {self.lun}")
        self._range(lba, blocks)
        if blocks > MAX_TRANSFER_BLOCKS:
            raise CheckCondition(
                INVALID_FIELD_IN_CDB, f"transfer length {blocks} above {MAX_TRANSFER_BLOCKS}"
            )
        return BlockIO("write" if write else "read", lba, blocks, fua)

    def _read(self, cdb: bytes) -> BlockIO:
        return self._rw(cdb, False)

    def _write(self, cdb: bytes) -> BlockIO:
        return self._rw(cdb, True)

    def _sync(self, cdb: bytes) -> BlockIO:
        """SYNCHRONIZE CACHE (SBC-4 §5.26/5.27): the whole image is synced, a range included."""
        if cdb[0] == SYNCHRONIZE_CACHE_10:
            lba, blocks = _be32(cdb, 2), _be16(cdb, 7)
        else:
            lba, blocks = _be64(cdb, 2), _be32(cdb, 10)
        self._range(lba, blocks)
        return BlockIO("sync", lba, blocks)

    def _write_same(self, cdb: bytes) -> BlockIO:
        """WRITE SAME(10/16) (SBC-4 §5.50/5.51)."""
        if cdb[1] & 0xE0:
            raise CheckCondition(INVALID_FIELD_IN_CDB, f"WRPROTECT {cdb[1] >> 5} with no protection")
        if cdb[1] & 0x10:
            raise CheckCondition(INVALID_FIELD_IN_CDB, "ANCHOR is not supported")
        unmap = bool(cdb[1] & 0x08)
        if cdb[0] == WRITE_SAME_10:
            lba, blocks, ndob = _be32(cdb, 2), _be16(cdb, 7), False
        else:
            lba, blocks, ndob = _be64(cdb, 2), _be32(cdb, 10), bool(cdb[1] & 0x01)
        if self.read_only:
            raise CheckCondition(WRITE_PROTECTED, f"WRITE SAME to read-only LUN {self.lun}")
        if blocks == 0:
            # WSNZ=1 in VPD page B0h: a length of 0 is refused (SBC-4 §5.50).
            raise CheckCondition(INVALID_FIELD_IN_CDB, "WRITE SAME of 0 blocks (WSNZ)")
        if blocks > MAX_UNMAP_BLOCKS:
            raise CheckCondition(
                INVALID_FIELD_IN_CDB, f"WRITE SAME of {blocks} blocks above {MAX_UNMAP_BLOCKS}"
            )
        self._range(lba, blocks)
        return BlockIO("write_same", lba, blocks, unmap=unmap, ndob=ndob, data_out=0 if ndob else BLOCK_SIZE)

    def _unmap(self, cdb: bytes) -> BlockIO:
        """UNMAP (SBC-4 §5.32): the parameter list is read by the device, then
        :meth:`unmap_ranges` checks it."""
        if self.read_only:
            raise CheckCondition(WRITE_PROTECTED, f"UNMAP on read-only LUN {self.lun}")
        if cdb[1] & 0x01:
            raise CheckCondition(INVALID_FIELD_IN_CDB, "ANCHOR is not supported")
        return BlockIO("unmap", data_out=_be16(cdb, 7))

    def unmap_ranges(self, params: bytes) -> list[tuple[int, int]]:
        """The ``(lba, blocks)`` ranges of an UNMAP parameter list (SBC-4 §5.32.2).

        Raises:
            CheckCondition: the list is shorter than its header (PARAMETER LIST
                LENGTH ERROR), has too many descriptors or a bad length (INVALID FIELD
                IN PARAMETER LIST), or a range leaves the LUN (LBA OUT OF RANGE).
        """
        if not params:
            return []
        if len(params) < 8:
            raise CheckCondition(PARAMETER_LIST_LENGTH_ERROR, f"UNMAP parameter list of {len(params)} bytes")
        desc_len = _be16(params, 2)
        usable = min(desc_len, len(params) - 8) // 16
        if usable > MAX_UNMAP_DESCRIPTORS:
            raise CheckCondition(INVALID_FIELD_IN_PARAMETER_LIST, f"{usable} UNMAP descriptors")
        ranges = []
        total = 0
        for i in range(usable):
            lba, blocks = struct.unpack_from(">QI", params, 8 + 16 * i)
            self._range(lba, blocks)
            total += blocks
            if blocks:
                ranges.append((lba, blocks))
        if total > MAX_UNMAP_BLOCKS:
            raise CheckCondition(INVALID_FIELD_IN_PARAMETER_LIST, f"UNMAP of {total} blocks")
        return ranges

    # -- emulated commands -------------------------------------------------------------
    def _tur(self, cdb: bytes) -> bytes:
        return b""

    def _noop(self, cdb: bytes) -> bytes:
        """START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL: nothing to do for an image."""
        return b""

    def _request_sense(self, cdb: bytes) -> bytes:
        return _request_sense(cdb, SENSE_NONE)

    def _inquiry(self, cdb: bytes) -> bytes:
        """INQUIRY (SPC-5 §6.7): standard data, or a VPD page when EVPD=1."""
        alloc = _be16(cdb, 3)
        if not cdb[1] & 0x01:
            if cdb[2]:
                raise CheckCondition(INVALID_FIELD_IN_CDB, f"INQUIRY page {cdb[2]:#x} without EVPD")
            return _inquiry_common(True, 0x00)[:alloc]
        page = cdb[2]
        body = self._vpd(page)
        return (bytes([0x00, page]) + struct.pack(">H", len(body)) + body)[:alloc]

    def _vpd(self, page: int) -> bytes:
        if page == 0x00:  # supported pages (SPC-5 §7.7.16)
            return bytes([0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2])
        if page == 0x80:  # unit serial number (§7.7.18)
            return self.serial.encode()
        if page == 0x83:  # device identification (§7.7.6): a T10 vendor ID designator
            ident = b"rust-vmm" + self.serial.encode()
            return bytes([0x02, 0x01, 0x00, len(ident)]) + ident
        if page == 0xB0:  # block limits (SBC-4 §6.6.4)
            b0 = bytearray(0x3C)
            b0[0] = 0x01  # WSNZ
            struct.pack_into(">I", b0, 4, MAX_TRANSFER_BLOCKS)
            if self.thin:
                struct.pack_into(">II", b0, 16, MAX_UNMAP_BLOCKS, MAX_UNMAP_DESCRIPTORS)
                struct.pack_into(">I", b0, 24, 8)  # OPTIMAL UNMAP GRANULARITY: a 4 KiB page
            struct.pack_into(">Q", b0, 32, MAX_UNMAP_BLOCKS)  # MAXIMUM WRITE SAME LENGTH
            return bytes(b0)
        if page == 0xB1:  # block device characteristics (SBC-4 §6.6.2)
            b1 = bytearray(0x3C)
            struct.pack_into(">H", b1, 0, 1 if self.solid_state else 0)
            return bytes(b1)
        if page == 0xB2:  # logical block provisioning (SBC-4 §6.6.6)
            if not self.thin:
                return bytes([0, 0, 0, 0])
            # LBPU, LBPWS, LBPWS10, LBPRZ=001b (holes read as zeros); thin provisioned.
            return bytes([0, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0])
        raise CheckCondition(INVALID_FIELD_IN_CDB, f"INQUIRY VPD page {page:#x}")

    def _mode_sense(self, cdb: bytes) -> bytes:
        """MODE SENSE(6/10) (SPC-5 §6.13/6.14): caching (08h) and control (0Ah) pages."""
        ten = cdb[0] == MODE_SENSE_10
        dbd = bool(cdb[1] & 0x08)
        llbaa = ten and bool(cdb[1] & 0x10)
        pc, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
        alloc = _be16(cdb, 7) if ten else cdb[4]
        if pc == 3:
            raise CheckCondition(SAVING_PARAMETERS_NOT_SUPPORTED, "MODE SENSE of saved values")
        if subpage not in (0x00, 0xFF) or (subpage == 0xFF and page != 0x3F):
            raise CheckCondition(INVALID_FIELD_IN_CDB, f"MODE SENSE subpage {subpage:#x} of page {page:#x}")
        changeable = pc == 1
        pages = {0x08: self._caching_page(changeable), 0x0A: self._control_page(changeable)}
        if page == 0x3F:
            body = pages[0x08] + pages[0x0A]
        elif page in pages:
            body = pages[page]
        else:
            raise CheckCondition(INVALID_FIELD_IN_CDB, f"MODE SENSE page {page:#x}")
        # Device-specific parameter (SBC-4 §6.5.1): WP when read-only, DPOFUA (FUA honoured).
        dsp = (0x80 if self.read_only else 0) | 0x10
        blocks = self.blocks
        if dbd:
            bd = b""
        elif llbaa:
            bd = struct.pack(">QII", blocks, 0, BLOCK_SIZE)
        else:
            # Short LBA block descriptor (SBC-4 §6.5.2): FFFFFFFFh when it does not fit.
            bd = struct.pack(">I", min(blocks, 0xFFFFFFFF)) + b"\x00" + BLOCK_SIZE.to_bytes(3, "big")
        if ten:
            header = struct.pack(
                ">HBBBBH", 6 + len(bd) + len(body), 0, dsp, 0x01 if llbaa and bd else 0, 0, len(bd)
            )
        else:
            header = bytes([3 + len(bd) + len(body), 0, dsp, len(bd)])
        return (header + bd + body)[:alloc]

    @staticmethod
    def _caching_page(changeable: bool) -> bytes:
        page = bytearray(20)
        page[0], page[1] = 0x08, 0x12
        if not changeable:
            page[2] = 0x04  # WCE: writes are cached until SYNCHRONIZE CACHE or FUA
        return bytes(page)

    @staticmethod
    def _control_page(changeable: bool) -> bytes:
        page = bytearray(12)
        page[0], page[1] = 0x0A, 0x0A
        if not changeable:
            page[3] = 0x10  # QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
            struct.pack_into(">H", page, 8, 0xFFFF)  # BUSY TIMEOUT PERIOD: unlimited
        return bytes(page)

    def _read_capacity_10(self, cdb: bytes) -> bytes:
        """READ CAPACITY(10) (SBC-4 §5.16): FFFFFFFFh when the last LBA needs 64 bits."""
        last = max(self.blocks - 1, 0)
        return struct.pack(">II", min(last, 0xFFFFFFFF), BLOCK_SIZE)

    def _service_action_in(self, cdb: bytes) -> bytes:
        """READ CAPACITY(16) (SBC-4 §5.17), the one service action of opcode 9Eh we have."""
        sa = cdb[1] & 0x1F
        if sa != SAI_READ_CAPACITY_16:
            raise CheckCondition(INVALID_FIELD_IN_CDB, f"SERVICE ACTION IN(16) service action {sa:#x}")
        alloc = _be32(cdb, 10)
        data = bytearray(32)
        struct.pack_into(">QI", data, 0, max(self.blocks - 1, 0), BLOCK_SIZE)
        if self.thin:
            data[14] = 0x80 | 0x40  # LBPME, LBPRZ
        return bytes(data)[:alloc]

    def _maintenance_in(self, cdb: bytes) -> bytes:
        sa = cdb[1] & 0x1F
        if sa != MI_REPORT_SUPPORTED_OPERATION_CODES:
            raise CheckCondition(INVALID_FIELD_IN_CDB, f"MAINTENANCE IN service action {sa:#x}")
        return report_supported_operation_codes(cdb)

    def _report_luns(self, cdb: bytes) -> bytes:
        raise AssertionError("REPORT LUNS is answered by the target")  # pragma: no cover


def report_supported_operation_codes(cdb: bytes) -> bytes:
    """REPORT SUPPORTED OPERATION CODES (SPC-5 §6.35), reporting options 0 to 3."""
    rctd = bool(cdb[2] & 0x80)
    options = cdb[2] & 0x07
    req_op, req_sa, alloc = cdb[3], _be16(cdb, 4), _be32(cdb, 6)
    timeouts = struct.pack(">HBBII", 10, 0, 0, 0, 0) if rctd else b""
    if options == 0:
        descs = b""
        for op, sa, length in SUPPORTED:
            flags = (0x02 if rctd else 0) | (0x01 if sa is not None else 0)
            descs += struct.pack(">BBHBBH", op, 0, sa or 0, 0, flags, length) + timeouts
        return (struct.pack(">I", len(descs)) + descs)[:alloc]
    if options not in (1, 2, 3):
        raise CheckCondition(INVALID_FIELD_IN_CDB, f"REPORTING OPTIONS {options}")
    entry = _SUPPORTED_BY_OP.get(req_op)
    support = 0x01  # not supported
    usage = b""
    if entry is not None:
        sa, length = entry
        if options == 1 and sa is not None:
            # The command has service actions: option 1 cannot name one (§6.35.2).
            raise CheckCondition(INVALID_FIELD_IN_CDB, f"opcode {req_op:#x} has service actions")
        if options == 2 and sa is None:
            raise CheckCondition(INVALID_FIELD_IN_CDB, f"opcode {req_op:#x} has no service actions")
        if sa is None or sa == req_sa:
            support = 0x03
            usage = _usage(req_op, length, sa)
    head = bytes([0, (0x80 if rctd else 0) | support]) + struct.pack(">H", len(usage))
    return (head + usage + (timeouts if support == 0x03 else b""))[:alloc]


_HANDLERS: dict[int, Callable[[LogicalUnit, bytes], bytes | BlockIO]] = {
    TEST_UNIT_READY: LogicalUnit._tur,
    REQUEST_SENSE: LogicalUnit._request_sense,
    READ_6: LogicalUnit._read,
    WRITE_6: LogicalUnit._write,
    INQUIRY: LogicalUnit._inquiry,
    MODE_SENSE_6: LogicalUnit._mode_sense,
    START_STOP_UNIT: LogicalUnit._noop,
    PREVENT_ALLOW_MEDIUM_REMOVAL: LogicalUnit._noop,
    READ_CAPACITY_10: LogicalUnit._read_capacity_10,
    READ_10: LogicalUnit._read,
    WRITE_10: LogicalUnit._write,
    SYNCHRONIZE_CACHE_10: LogicalUnit._sync,
    WRITE_SAME_10: LogicalUnit._write_same,
    UNMAP: LogicalUnit._unmap,
    MODE_SENSE_10: LogicalUnit._mode_sense,
    READ_16: LogicalUnit._read,
    WRITE_16: LogicalUnit._write,
    SYNCHRONIZE_CACHE_16: LogicalUnit._sync,
    WRITE_SAME_16: LogicalUnit._write_same,
    SERVICE_ACTION_IN_16: LogicalUnit._service_action_in,
    REPORT_LUNS: LogicalUnit._report_luns,
    MAINTENANCE_IN: LogicalUnit._maintenance_in,
    READ_12: LogicalUnit._read,
    WRITE_12: LogicalUnit._write,
}
assert set(_HANDLERS) == set(_SUPPORTED_BY_OP)


class Target:
    """SCSI target 0: its logical units, REPORT LUNS and the answers for absent LUNs."""

    def __init__(self, units: Sequence[LogicalUnit]) -> None:
        if len(units) > MAX_LUNS:
            raise ValueError(f"at most {MAX_LUNS} LUNs, not {len(units)}")
        self.units = list(units)

    def unit(self, lun: int) -> LogicalUnit | None:
        """The logical unit ``lun``, or None."""
        return self.units[lun] if 0 <= lun < len(self.units) else None

    def execute(self, lun: int, cdb: bytes) -> bytes | BlockIO:
        """Run ``cdb`` on ``lun`` of this target.

        REPORT LUNS is answered by every LUN (SPC-5 §6.33); the REPORT LUNS
        well-known LUN and absent LUNs answer only TEST UNIT READY, REQUEST SENSE,
        INQUIRY and REPORT LUNS (SPC-5 §4.6.2 / §8.2).  For an absent LUN, INQUIRY
        reports PQ 011b / PDT 1Fh and every other command ends with LOGICAL UNIT NOT
        SUPPORTED (ASC 25h; upstream answers 21h).

        Raises:
            CheckCondition: see :meth:`LogicalUnit.execute`.
        """
        op = cdb[0]
        if op == REPORT_LUNS:
            return _report_luns(cdb, range(len(self.units)))
        unit = self.unit(lun)
        if unit is not None:
            return unit.execute(cdb)
        wlun = lun == REPORT_LUNS_WLUN
        if op not in _WLUN_OPS:
            if wlun:
                raise CheckCondition(
                    INVALID_COMMAND_OPERATION_CODE, f"opcode {op:#04x} on the REPORT LUNS W-LUN"
                )
            raise CheckCondition(LOGICAL_UNIT_NOT_SUPPORTED, f"LUN {lun}")
        if op == INQUIRY:
            if cdb[1] & 0x01 or cdb[2]:
                if not wlun:
                    raise CheckCondition(LOGICAL_UNIT_NOT_SUPPORTED, f"VPD page of LUN {lun}")
                raise CheckCondition(INVALID_FIELD_IN_CDB, f"INQUIRY VPD page {cdb[2]:#x} of the W-LUN")
            # A well-known LU has PDT 1Eh (SPC-5 §8.1).
            return _inquiry_common(wlun, 0x1E)[: _be16(cdb, 3)]
        if op == REQUEST_SENSE:
            return _request_sense(cdb, SENSE_NONE if wlun else LOGICAL_UNIT_NOT_SUPPORTED)
        if not wlun:  # TEST UNIT READY
            raise CheckCondition(LOGICAL_UNIT_NOT_SUPPORTED, f"LUN {lun}")
        return b""
