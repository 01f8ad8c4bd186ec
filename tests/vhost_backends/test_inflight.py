"""Inflight I/O tracking (inflight.py) and the one declaration of the shared layouts."""

from __future__ import annotations

import xen.flags
from vhost_backends.inflight import InflightQueueRegion
from vhost_backends.protocol import messages as m
from virtio_queue import GuestMemory, layouts
from virtio_queue.testing import VIRTQ_DESC_F_WRITE, MockSplitQueue, RawDesc


def test_layout_users_take_the_one_declaration() -> None:
    assert m.MEMORY_REGION is layouts.MEMORY_REGION.struct is xen.flags.MEMORY_REGION
    assert m.XEN_MEMORY_REGION is layouts.XEN_MEMORY_REGION.struct is xen.flags.XEN_MEMORY_REGION
    assert m.INFLIGHT_DESC is layouts.INFLIGHT_DESC_SPLIT.struct
    assert m.INFLIGHT_QUEUE_HEADER is layouts.INFLIGHT_QUEUE_REGION_SPLIT.struct
    # The records' field names are the structs' (MemoryRegion(*unpacked) relies on it).
    assert m.MemoryRegion._fields == layouts.XEN_MEMORY_REGION.names
    assert tuple(xen.flags.XenMemoryRegion.__dataclass_fields__) == layouts.XEN_MEMORY_REGION.names


def test_inflight_area_written_by_queue_reads_back_through_the_layout(
    guest_memory: GuestMemory, mock_queue: MockSplitQueue
) -> None:
    size = mock_queue.size
    area = InflightQueueRegion(memoryview(bytearray(m.inflight_queue_size(size))), size)
    area.init_header(0x1234)
    q = mock_queue.create_queue()
    q.set_inflight(area.buf)
    buf = mock_queue.alloc(16)
    head = mock_queue.add_chain([RawDesc(buf, 16, VIRTQ_DESC_F_WRITE)])
    chain = q.pop_chain()
    assert chain is not None and chain.head_index == head
    # Popped: in flight with counter 1 (written by queue.pyx through the packed struct).
    assert area.desc(head) == (1, 0, 1)
    q.add_used(head, 16)
    # Used: cleared, linked as the last batch, used_idx published.
    assert area.desc(head)[0] == 0
    assert area.header() == (0x1234, 1, size, head, 1)
    assert area.recover(1) == []
