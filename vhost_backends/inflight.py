"""vhost-user "Inflight I/O tracking" (GET/SET_INFLIGHT_FD), split rings.

The front-end keeps a shared memory area that outlives a back-end, so a restarted
back-end can serve again what its predecessor had popped but not completed.  The area
holds one :class:`InflightQueueRegion` per queue; its layout (a ``QueueRegionSplit``
head, then ``desc_num`` ``DescStateSplit``) is declared once, as packed structs in
``virtio_queue/layouts.pxd``: the compiled :class:`~virtio_queue.Queue` keeps the area
current on its pop/used path (``Queue.set_inflight``), and this module sets the area
up and recovers from it, through the same layout.  rust-vmm's vhost-user-backend and
libvhost-user keep this apart from the message dispatcher too.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
from collections.abc import Sequence

from virtio_queue import Queue, layouts

from .protocol import messages as m
from .protocol.errors import InvalidMessage

__all__ = ["MAX_INFLIGHT_MMAP_SIZE", "InflightArea", "InflightQueueRegion", "check_shape", "resubmit"]

log = logging.getLogger(__name__)

_HEADER = layouts.INFLIGHT_QUEUE_REGION_SPLIT.struct
_DESC = layouts.INFLIGHT_DESC_SPLIT.struct

#: The largest area SET_INFLIGHT_FD may map: far above any real layout (32768-entry
#: queues use 512 KiB each), small enough that a hostile size maps nothing huge.
MAX_INFLIGHT_MMAP_SIZE = 64 << 20


class InflightQueueRegion:
    """One queue's split-ring area of the shared inflight region.

    While a ring runs, the compiled Queue keeps the area current (Queue.set_inflight);
    this class sets it up and, when a back-end is restarted with SET_INFLIGHT_FD,
    reads what was in flight (:meth:`recover`).
    """

    VERSION = 1

    def __init__(self, buf: memoryview, queue_size: int) -> None:
        self.buf = buf
        self.queue_size = queue_size
        self.counter = 0

    # header fields
    def header(self) -> tuple[int, int, int, int, int]:
        """``(features, version, desc_num, last_batch_head, used_idx)``."""
        fields: tuple[int, int, int, int, int] = _HEADER.unpack_from(self.buf, 0)
        return fields

    def init_header(self, features: int) -> None:
        """Fresh area (GET_INFLIGHT_FD): the spec has the back-end set version and desc_num."""
        _HEADER.pack_into(self.buf, 0, features, self.VERSION, self.queue_size, 0, 0)

    @property
    def used_idx(self) -> int:
        return self.header()[4]

    def _set_header(self, last_batch_head: int, used_idx: int) -> None:
        features, version, desc_num, _lbh, _ui = self.header()
        _HEADER.pack_into(self.buf, 0, features, version, desc_num, last_batch_head, used_idx)

    def desc(self, head: int) -> tuple[int, int, int]:
        """``(inflight, next, counter)`` of descriptor ``head``."""
        fields: tuple[int, int, int] = _DESC.unpack_from(self.buf, _HEADER.size + _DESC.size * head)
        return fields

    def _set_desc(self, head: int, inflight: int, nxt: int, counter: int) -> None:
        _DESC.pack_into(self.buf, _HEADER.size + _DESC.size * head, inflight, nxt, counter)

    def recover(self, ring_used_idx: int) -> list[int]:
        """On reconnect: fix up the last batch, then return the heads still in flight,
        oldest (lowest counter) first.

        If the used ring's idx moved past ``used_idx`` the back-end died between
        publishing a batch and clearing its inflight flags: the batch is walked from
        ``last_batch_head`` and cleared ("When reconnecting", split rings, step 1).

        Raises:
            InvalidMessage: the area's version or desc_num do not match the queue.
        """
        _features, version, desc_num, last_batch_head, used_idx = self.header()
        if version != self.VERSION or desc_num != self.queue_size:
            raise InvalidMessage(
                f"inflight area version {version}/desc_num {desc_num} "
                f"does not match queue size {self.queue_size}"
            )
        if used_idx != ring_used_idx:
            batch = (ring_used_idx - used_idx) & 0xFFFF
            head = last_batch_head
            for _ in range(min(batch, self.queue_size)):
                if head >= self.queue_size:
                    break
                _i, nxt, counter = self.desc(head)
                self._set_desc(head, 0, nxt, counter)
                head = nxt
            self._set_header(last_batch_head, ring_used_idx)
        found = []
        for head in range(self.queue_size):
            inflight, _nxt, counter = self.desc(head)
            if inflight == 1:
                found.append((counter, head))
        found.sort()
        self.counter = found[-1][0] if found else 0
        return [h for _c, h in found]


def check_shape(inf: m.Inflight, queue_sizes: Sequence[int]) -> None:
    """Check GET/SET_INFLIGHT_FD's queue count and size against the device's queues.

    Raises:
        InvalidMessage: ``num_queues`` or ``queue_size`` out of the device's range.
    """
    if not 1 <= inf.num_queues <= len(queue_sizes):
        raise InvalidMessage(f"inflight num_queues {inf.num_queues} out of range (1..{len(queue_sizes)})")
    biggest = max(queue_sizes[: inf.num_queues])
    if not 1 <= inf.queue_size <= biggest:
        raise InvalidMessage(f"inflight queue_size {inf.queue_size} out of range (1..{biggest})")


class InflightArea:
    """The mapped inflight area of one connection and its per-queue regions.

    :meth:`create` answers GET_INFLIGHT_FD (a fresh memfd), :meth:`attach` maps what
    SET_INFLIGHT_FD passes; :meth:`close` unmaps.
    """

    def __init__(self, mapping: mmap.mmap, num_queues: int, queue_size: int) -> None:
        self.mapping = mapping
        per_queue = m.inflight_queue_size(queue_size)
        view = memoryview(mapping)
        #: Region of queue ``i`` for ``i < num_queues``.
        self.regions = [
            InflightQueueRegion(view[i * per_queue : (i + 1) * per_queue], queue_size)
            for i in range(num_queues)
        ]

    @classmethod
    def create(cls, inf: m.Inflight, features: int) -> tuple[InflightArea, int]:
        """A fresh, initialised area for GET_INFLIGHT_FD and the memfd behind it
        (the caller sends the fd and closes it; the mapping keeps the memory)."""
        size = m.inflight_queue_size(inf.queue_size) * inf.num_queues
        fd = os.memfd_create("vhost-inflight", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            area = cls(mmap.mmap(fd, size, mmap.MAP_SHARED), inf.num_queues, inf.queue_size)
        except BaseException:
            os.close(fd)
            raise
        for region in area.regions:
            region.init_header(features)
        return area, fd

    @classmethod
    def attach(cls, fd: int, inf: m.Inflight) -> InflightArea:
        """Map the area SET_INFLIGHT_FD passed (the fd is not kept).

        Raises:
            InvalidMessage: ``mmap_size`` smaller than the layout or implausibly large,
                or the area cannot be mapped.
        """
        need = m.inflight_queue_size(inf.queue_size) * inf.num_queues
        if inf.mmap_size < need:
            raise InvalidMessage(f"inflight mmap_size {inf.mmap_size} too small for the layout ({need})")
        if inf.mmap_size > MAX_INFLIGHT_MMAP_SIZE:
            raise InvalidMessage(f"inflight mmap_size {inf.mmap_size} is implausibly large")
        try:
            mapping = mmap.mmap(fd, inf.mmap_size, mmap.MAP_SHARED, offset=inf.mmap_offset)
        except (OSError, ValueError, OverflowError) as e:
            raise InvalidMessage(f"SET_INFLIGHT_FD: cannot map the area: {e}") from None
        return cls(mapping, inf.num_queues, inf.queue_size)

    def close(self) -> None:
        """Unmap the area (once the queues let go of their views)."""
        self.regions = []
        # If a memoryview still refers to it, it goes when the last one does.
        with contextlib.suppress(BufferError):
            self.mapping.close()


def resubmit(queue: Queue, region: InflightQueueRegion) -> int:
    """Resume what a previous back-end left in flight on ``queue``; return how many.

    The spec's "When reconnecting" procedure: fix the last batch from the used ring,
    then serve the in-flight heads again in the order they were popped (their
    counters), before anything new; the device's next avail index is the used index
    plus the in-flight count, as libvhost-user sets it.  From here on the compiled
    queue keeps the region current.

    Raises:
        InvalidMessage: the region does not match the queue (see
            :meth:`InflightQueueRegion.recover`).
    """
    used = queue.used_idx()
    heads = [h for h in region.recover(used) if h < queue.size]
    queue.set_inflight(region.buf, region.counter)
    if heads:
        queue.set_next_avail((used + len(heads)) & 0xFFFF)
        queue.resubmit(heads)
    return len(heads)
