"""The packed structs of virtio_queue/layouts.pxd against the vhost-user spec.

vhost-user payloads are in no system header (STYLE.md §2), so their compiled sizeof
and offsets are asserted here against QEMU's docs/interop/vhost-user.rst; that their
Python users take them from here is checked in tests/vhost_backends/test_inflight.py.
"""

from __future__ import annotations

import pytest

from virtio_queue import layouts


@pytest.mark.parametrize(
    ("layout", "size", "fields"),
    [
        # "Memory region description": four u64.
        (layouts.MEMORY_REGION, 32, [("guest_addr", 0, 8), ("size", 8, 8), ("user_addr", 16, 8),
                                     ("mmap_offset", 24, 8)]),
        # The same with F_XEN_MMAP: xen mmap flags u32, domid u32.
        (layouts.XEN_MEMORY_REGION, 40, [("guest_addr", 0, 8), ("size", 8, 8), ("user_addr", 16, 8),
                                         ("mmap_offset", 24, 8), ("xen_mmap_flags", 32, 4),
                                         ("domid", 36, 4)]),
        # "Inflight I/O tracking", split rings: DescStateSplit.
        (layouts.INFLIGHT_DESC_SPLIT, 16, [("inflight", 0, 1), ("padding", 1, 5), ("next", 6, 2),
                                           ("counter", 8, 8)]),
        # QueueRegionSplit without its flexible desc[] member.
        (layouts.INFLIGHT_QUEUE_REGION_SPLIT, 16, [("features", 0, 8), ("version", 8, 2),
                                                   ("desc_num", 10, 2), ("last_batch_head", 12, 2),
                                                   ("used_idx", 14, 2)]),
    ],
)
def test_layout_sizeof_and_offsets_match_the_spec(
    layout: layouts.Layout, size: int, fields: list[tuple[str, int, int]]
) -> None:
    assert layout.size == size
    assert [tuple(f) for f in layout.fields] == fields
    assert layout.struct.size == size
    assert layout.offset(fields[-1][0]) == fields[-1][1]


def test_layout_struct_skips_padding_and_packs_little_endian() -> None:
    raw = layouts.INFLIGHT_DESC_SPLIT.struct.pack(1, 0x0203, 0x0405060708090A0B)
    assert raw == b"\x01" + b"\0" * 5 + b"\x03\x02" + bytes(range(0x0B, 0x03, -1))
    assert layouts.INFLIGHT_DESC_SPLIT.names == ("inflight", "next", "counter")


def test_layout_offset_of_unknown_field_raises_key_error() -> None:
    with pytest.raises(KeyError, match="no field 'nope'"):
        layouts.MEMORY_REGION.offset("nope")
