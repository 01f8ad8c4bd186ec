"""xen.flags: flag values and rules, the region description, Xen limits (every build)."""

from __future__ import annotations

import mmap

import pytest

import virtio_queue
import xen
from virtio_queue.errors import GuestMemoryError
from xen import flags as xf
from xen.errors import InvalidXenFlags, XenMapError
from xen.flags import XenMmapFlags

PAGE = mmap.PAGESIZE
FOREIGN, GRANT, NO_ADV = XenMmapFlags.FOREIGN, XenMmapFlags.GRANT, XenMmapFlags.NO_ADVANCE_MAP


def test_flag_values_match_rust_vmm() -> None:
    # vm-memory src/mmap/xen.rs MmapXenFlags; vhost-user bit 17.
    assert (XenMmapFlags.UNIX, FOREIGN, GRANT, NO_ADV) == (0x0, 0x1, 0x2, 0x8)
    assert xf.KNOWN_FLAGS == 0xB
    assert xf.VHOST_USER_PROTOCOL_F_XEN_MMAP == 17
    assert xf.XEN_GRANT_ADDR_OFF == 1 << 63


def test_error_tree() -> None:
    assert issubclass(XenMapError, GuestMemoryError)
    assert issubclass(InvalidXenFlags, XenMapError)
    assert issubclass(InvalidXenFlags, ValueError)
    assert xen.XenMapError is XenMapError


@pytest.mark.parametrize(
    ("flags", "kind", "advance"),
    [(0, "unix", True), (FOREIGN, "foreign", True), (GRANT, "grant", True), (GRANT | NO_ADV, "grant", False)],
)
def test_validate_flags_accepts_rust_vmm_valid_sets(flags: int, kind: str, advance: bool) -> None:
    assert xf.validate_flags(flags) == flags
    assert xf.mapping_kind(flags) == kind
    assert xf.mmap_in_advance(flags) is advance


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (0x10, "unknown bits 0x10"),
        (0x4, "unknown bits 0x4"),
        (0x80000001, "unknown bits 0x80000000"),
        (FOREIGN | GRANT, "FOREIGN and GRANT are exclusive"),
        (FOREIGN | GRANT | NO_ADV, "FOREIGN and GRANT are exclusive"),
        (FOREIGN | NO_ADV, "FOREIGN region must be mapped in advance"),
        (NO_ADV, "UNIX region must be mapped in advance"),
        (0x100, "bit 8 (0x100) is the vhost-user spec's"),
        (GRANT | 0x100, "rust-vmm and this implementation use NO_ADVANCE_MAP = 0x8"),
        (1 << 32, "do not fit the 32-bit field"),
        (-1, "do not fit the 32-bit field"),
    ],
)
def test_validate_flags_refuses_with_specific_message(flags: int, message: str) -> None:
    with pytest.raises(InvalidXenFlags, match=message.replace("(", r"\(").replace(")", r"\)")):
        xf.validate_flags(flags)


def test_every_32_bit_value_with_an_unknown_bit_is_refused() -> None:
    for bit in range(32):
        value = 1 << bit
        if value & xf.KNOWN_FLAGS:
            continue
        with pytest.raises(InvalidXenFlags):
            xf.validate_flags(value | GRANT)


def test_region_description_layout() -> None:
    # guest address, size, user address, mmap offset (u64 each), flags, domid (u32).
    assert xf.MEMORY_REGION.size == 32
    assert xf.XEN_MEMORY_REGION.size == 40
    raw = bytes.fromhex(
        "0000100000000000"  # guest address 0x100000
        "0000200000000000"  # size 0x200000
        "00007f0000000000"  # user address 0x7f0000
        "0000000000000000"  # mmap offset 0
        "01000000"  # xen mmap flags FOREIGN
        "05000000"  # domid 5
    )
    r = xf.XenMemoryRegion.unpack(raw)
    assert r == xf.XenMemoryRegion(0x100000, 0x200000, 0x7F0000, 0, 1, 5)
    assert r.pack() == raw
    assert r.flags == FOREIGN
    assert r.validate() == "foreign"


@pytest.mark.parametrize("length", [0, 32, 39, 41])
def test_region_description_wrong_length_refused(length: int) -> None:
    with pytest.raises(XenMapError, match=f"is 40 bytes, got {length}"):
        xf.XenMemoryRegion.unpack(bytes(length))


def test_region_description_validate_checks_flags_and_limits() -> None:
    with pytest.raises(InvalidXenFlags):
        xf.XenMemoryRegion(0, PAGE, 0, 0, FOREIGN | NO_ADV, 1).validate()
    with pytest.raises(XenMapError, match="mmap offset 0"):
        xf.XenMemoryRegion(0, PAGE, 0, 0x1000, FOREIGN, 1).validate()
    # A unix region keeps its mmap offset and ignores domid.
    assert xf.XenMemoryRegion(0x1234, 1, 0, 0x10, 0, 0xFFFFFFFF).validate() == "unix"


def test_page_span_rounds_up_to_whole_pages() -> None:
    span = xf.page_span(0x40000, 1, PAGE)
    assert (span.first_pfn, span.count, span.map_len) == (0x40000 // PAGE, 1, PAGE)
    span = xf.page_span(0x40000, 3 * PAGE + 1, PAGE)
    assert span.count == 4 and span.map_len == 4 * PAGE
    assert list(span.pfns) == [0x40000 // PAGE + i for i in range(4)]


def test_page_span_refuses_empty_and_unaligned() -> None:
    with pytest.raises(XenMapError, match="cannot be empty"):
        xf.page_span(0, 0)
    with pytest.raises(XenMapError, match="0x1001 is not page aligned"):
        xf.page_span(0x1001, PAGE, 0x1000)


def test_grant_ref_base_drops_the_grant_address_bit() -> None:
    assert xf.grant_ref_base(xf.XEN_GRANT_ADDR_OFF | (7 * PAGE)) == 7
    assert xf.grant_ref_base(7 * PAGE) == 7


@pytest.mark.parametrize(
    ("kind", "gpa", "size", "offset", "domid", "message"),
    [
        ("foreign", 0, PAGE, 0, 0x10000, "domid 0x10000 does not fit Xen's 16-bit domid_t"),
        ("foreign", 0, PAGE, PAGE, 1, "foreign region must have mmap offset 0"),
        ("grant", 0, PAGE, 8, 1, "grant region must have mmap offset 0"),
        ("foreign", (1 << 64) - PAGE, 2 * PAGE, 0, 1, "overflows the address space"),
        ("grant", 0xFFFFFFFF * PAGE, 2 * PAGE, 0, 1, "do not fit 32 bits"),
        ("foreign", 0, (1 << 32) * PAGE + 1, 0, 1, "32-bit page count"),
    ],
)
def test_check_region_refuses_what_the_xen_ioctls_cannot_express(  # noqa: PLR0917
    kind: xf.MappingKind, gpa: int, size: int, offset: int, domid: int, message: str
) -> None:
    with pytest.raises(XenMapError, match=message):
        xf.check_region(kind, gpa, size, offset, domid)


def test_check_region_accepts_the_limits() -> None:
    assert xf.check_region("foreign", (1 << 64) - PAGE, PAGE, 0, 0xFFFF).count == 1
    grant_addr = xf.XEN_GRANT_ADDR_OFF | (0xFFFFFFFF * PAGE)
    assert xf.check_region("grant", grant_addr, PAGE, 0, 1).count == 1


def _non_xen_build(monkeypatch: pytest.MonkeyPatch) -> None:
    if virtio_queue.BUILT_WITH_XEN:
        monkeypatch.setattr(xf, "_built_with_xen", lambda: False)


def test_map_region_checks_flags_before_the_build(monkeypatch: pytest.MonkeyPatch) -> None:
    _non_xen_build(monkeypatch)
    with pytest.raises(InvalidXenFlags, match="exclusive"):
        xen.map_region(None, PAGE, 0, 0, FOREIGN | GRANT, 1)


@pytest.mark.parametrize("flags", [0, FOREIGN, GRANT])
def test_map_region_in_non_xen_build_names_xen_1(monkeypatch: pytest.MonkeyPatch, flags: int) -> None:
    # Real in a non-Xen build; simulated in a Xen build, so both builds run it.
    _non_xen_build(monkeypatch)
    with pytest.raises(XenMapError, match="XEN=1") as info:
        xen.map_region(None, PAGE, 0, 0, flags, 1)
    assert not isinstance(info.value, InvalidXenFlags)


def test_build_flag_is_what_map_region_checks() -> None:
    assert xf._built_with_xen() is bool(virtio_queue.BUILT_WITH_XEN)


def test_device_error_explains_missing_node() -> None:
    e = xf.device_error(xf.PRIVCMD_PATH, FileNotFoundError(2, "No such file or directory"))
    assert isinstance(e, XenMapError)
    assert "cannot open /dev/xen/privcmd" in str(e) and "xen-privcmd" in str(e)
    e = xf.device_error(xf.GNTDEV_PATH, PermissionError(13, "Permission denied"))
    assert "needs root" in str(e)
