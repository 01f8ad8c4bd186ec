"""Wire structs, header validation and payload parsers (QEMU docs/interop/vhost-user.rst)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhost_backends.protocol import messages as m
from vhost_backends.protocol.codes import (
    MAX_MSG_SIZE,
    VHOST_USER_F_PROTOCOL_FEATURES,
    BackendReq,
    FrontendReq,
    VhostUserProtocolFeatures,
)
from vhost_backends.protocol.errors import (
    Disconnected,
    IncorrectFds,
    InvalidMessage,
    OversizedMessage,
    PartialMessage,
    VhostUserError,
)
from virtio_queue.errors import VirtioError


def test_struct_sizes_match_the_spec() -> None:
    # "Message specification": header 3 x u32; vring state 2 x u32; vring address
    # 2 x u32 + 4 x u64; memory region 4 x u64 (+2 x u32 with XEN_MMAP); single
    # region = u64 padding + region; config header 3 x u32; inflight 2 x u64 + 2 x u16
    # with QEMU's tail padding; log 2 x u64.
    assert m.HEADER.size == 12
    assert m.VRING_STATE.size == 8
    assert m.VRING_ADDR.size == 40
    assert m.MEMORY_REGION.size == 32
    assert m.XEN_MEMORY_REGION.size == 40
    assert m.MEMORY_TABLE_HEADER.size == 8
    assert m.CONFIG_HEADER.size == 12
    assert m.INFLIGHT.size == 24
    assert m.LOG.size == 16
    assert m.DEVICE_STATE_TRANSFER.size == 8
    # "Inflight I/O tracking", split rings: DescStateSplit 16 bytes, QueueRegionSplit head 16.
    assert m.INFLIGHT_DESC.size == 16
    assert m.INFLIGHT_QUEUE_HEADER.size == 16


def test_codes_match_the_spec() -> None:
    assert FrontendReq.SET_MEM_TABLE == 5
    assert FrontendReq.SET_BACKEND_REQ_FD == 21
    assert FrontendReq.GET_INFLIGHT_FD == 31
    assert FrontendReq.REM_MEM_REG == 38
    assert FrontendReq.CHECK_DEVICE_STATE == 43
    assert BackendReq.CONFIG_CHANGE_MSG == 2
    assert VhostUserProtocolFeatures.REPLY_ACK == 1 << 3
    assert VhostUserProtocolFeatures.CONFIGURE_MEM_SLOTS == 1 << 15
    assert VhostUserProtocolFeatures.XEN_MMAP == 1 << 17
    assert VhostUserProtocolFeatures.DEVICE_STATE == 1 << 19
    assert VHOST_USER_F_PROTOCOL_FEATURES == 1 << 30


def test_error_tree() -> None:
    assert issubclass(VhostUserError, VirtioError)
    assert issubclass(InvalidMessage, ValueError)
    assert issubclass(OversizedMessage, InvalidMessage)
    assert issubclass(IncorrectFds, InvalidMessage)
    assert Disconnected.should_reconnect and PartialMessage.should_reconnect
    assert not InvalidMessage.should_reconnect


def test_header_roundtrip() -> None:
    raw = m.pack_header(FrontendReq.GET_FEATURES, 0, need_reply=True)
    h = m.parse_header(raw)
    assert (h.request, h.size, h.need_reply, h.is_reply) == (1, 0, True, False)
    r = m.parse_header(m.pack_header(FrontendReq.GET_FEATURES, 8, reply=True))
    assert r.is_reply and r.flags == 0x5


@pytest.mark.parametrize(
    ("raw", "exc", "text"),
    [
        (struct.pack("<III", 1, 0x0, 0), InvalidMessage, "version 0"),  # version must be 1
        (struct.pack("<III", 1, 0x2, 0), InvalidMessage, "version 2"),
        (struct.pack("<III", 1, 0x11, 0), InvalidMessage, "reserved"),  # bit 4 undefined
        (struct.pack("<III", 0, 0x1, 0), InvalidMessage, "unknown request code 0"),
        (struct.pack("<III", 999, 0x1, 0), InvalidMessage, "unknown request code 999"),
        (struct.pack("<III", 5, 0x1, MAX_MSG_SIZE + 1), OversizedMessage, "exceeds"),
        (b"\x01\x00\x00", InvalidMessage, "3 bytes"),
    ],
)
def test_header_invalid_is_refused(raw: bytes, exc: type[Exception], text: str) -> None:
    with pytest.raises(exc, match=text):
        m.parse_header(raw)


def test_header_backend_codes_differ() -> None:
    raw = struct.pack("<III", BackendReq.SHARED_OBJECT_LOOKUP, 1, 0)
    assert m.parse_header(raw, from_frontend=False).request == 8
    with pytest.raises(InvalidMessage):
        m.parse_header(struct.pack("<III", 40, 1, 0), from_frontend=False)


def test_payload_sizes_are_exact() -> None:
    with pytest.raises(InvalidMessage, match="expected 8"):
        m.unpack_u64(b"\0" * 7)
    with pytest.raises(InvalidMessage, match="expected 8"):
        m.unpack_vring_state(b"\0" * 12)
    with pytest.raises(InvalidMessage, match="expected 40"):
        m.unpack_vring_addr(b"\0" * 32)
    with pytest.raises(InvalidMessage, match="expected 24"):
        m.unpack_inflight(b"\0" * 20)


def test_vring_fd_index_bits() -> None:
    assert m.unpack_vring_fd_index(m.pack_u64(3), "KICK") == (3, True)
    assert m.unpack_vring_fd_index(m.pack_u64(0x105), "KICK") == (5, False)  # bit 8: no fd
    with pytest.raises(InvalidMessage, match="reserved"):
        m.unpack_vring_fd_index(m.pack_u64(0x200), "KICK")


def test_vring_addr_unknown_flags_refused() -> None:
    with pytest.raises(InvalidMessage, match="flags"):
        m.unpack_vring_addr(m.VRING_ADDR.pack(0, 2, 0, 0, 0, 0))


def test_memory_table_roundtrip_and_limits() -> None:
    regions = [
        m.MemoryRegion(0, 0x1000, 0x7F0000000000, 0),
        m.MemoryRegion(0x100000, 0x2000, 0x7F0000100000, 0x1000),
    ]
    assert m.unpack_memory_table(m.pack_memory_table(regions)) == regions
    with pytest.raises(InvalidMessage, match="0 regions"):
        m.unpack_memory_table(m.MEMORY_TABLE_HEADER.pack(0, 0))
    with pytest.raises(InvalidMessage, match="33 regions"):
        m.unpack_memory_table(m.MEMORY_TABLE_HEADER.pack(33, 0) + bytes(33 * 32))
    with pytest.raises(InvalidMessage, match="expected"):
        m.unpack_memory_table(m.pack_memory_table(regions)[:-1])
    with pytest.raises(InvalidMessage, match="size 0"):
        m.unpack_memory_table(m.pack_memory_table([m.MemoryRegion(0, 0, 0, 0)]))
    with pytest.raises(InvalidMessage, match="overflows"):
        m.unpack_memory_table(m.pack_memory_table([m.MemoryRegion((1 << 64) - 0x1000, 0x2000, 0, 0)]))


def test_xen_region_layout() -> None:
    r = m.MemoryRegion(0, 0x1000, 0x1000, 0, xen_mmap_flags=2, domid=7)
    packed = m.pack_single_region(r)
    assert len(packed) == 8 + 40
    assert m.unpack_single_region(packed, xen=True) == r
    with pytest.raises(InvalidMessage):
        m.unpack_single_region(packed, xen=False)


def test_config_validation() -> None:
    assert m.unpack_config(m.pack_config(4, b"abcd")).payload == b"abcd"
    with pytest.raises(InvalidMessage, match="size 0"):
        m.unpack_config(m.CONFIG_HEADER.pack(0, 0, 0))
    with pytest.raises(InvalidMessage, match="size 257"):
        m.unpack_config(m.CONFIG_HEADER.pack(0, 257, 0) + bytes(257))
    with pytest.raises(InvalidMessage, match="beyond"):
        m.unpack_config(m.CONFIG_HEADER.pack(0xFFF, 4, 0) + bytes(4))
    with pytest.raises(InvalidMessage, match="flags"):
        m.unpack_config(m.CONFIG_HEADER.pack(0, 4, 7) + bytes(4))
    with pytest.raises(InvalidMessage, match="expected"):
        m.unpack_config(m.CONFIG_HEADER.pack(0, 4, 0) + bytes(3))


def test_inflight_queue_size_is_64_aligned() -> None:
    assert m.inflight_queue_size(1) == 64
    assert m.inflight_queue_size(128) == 16 + 16 * 128 + 48  # 2112
    assert m.inflight_queue_size(256) % 64 == 0


@pytest.mark.parametrize(
    ("req", "payload", "expected"),
    [
        (FrontendReq.SET_MEM_TABLE, m.MEMORY_TABLE_HEADER.pack(3, 0), (3, 3)),
        (FrontendReq.SET_VRING_KICK, m.pack_u64(0), (1, 1)),
        (FrontendReq.SET_VRING_CALL, m.pack_u64(0x100), (0, 0)),
        (FrontendReq.ADD_MEM_REG, b"", (1, 1)),
        (FrontendReq.REM_MEM_REG, b"", (0, 1)),  # the spec tolerates one stray fd
        (FrontendReq.GET_FEATURES, b"", (0, 0)),
    ],
)
def test_expected_fds(req: int, payload: bytes, expected: tuple[int, int]) -> None:
    assert m.expected_fds(req, payload) == expected


def test_check_fds_names_the_request() -> None:
    with pytest.raises(IncorrectFds, match="SET_VRING_KICK carries 0 fds, expected 1"):
        m.check_fds(FrontendReq.SET_VRING_KICK, m.pack_u64(0), [])


@given(st.binary(min_size=12, max_size=12))
def test_parse_header_never_raises_anything_else(raw: bytes) -> None:
    try:
        h = m.parse_header(raw)
    except InvalidMessage:
        return
    assert h.size <= MAX_MSG_SIZE


@given(st.binary(max_size=300), st.booleans())
def test_memory_table_parser_total(payload: bytes, xen: bool) -> None:
    try:
        regions = m.unpack_memory_table(payload, xen=xen)
    except InvalidMessage:
        return
    assert all(r.size > 0 for r in regions)


@given(st.binary(max_size=300))
def test_config_parser_total(payload: bytes) -> None:
    try:
        cfg = m.unpack_config(payload)
    except InvalidMessage:
        return
    assert len(cfg.payload) == cfg.size
