"""Our front-end set up as QEMU's vhost-user-input does, for the input daemon's tests
(tests/integration, and the guest that plays the host in tests/e2e)."""

from __future__ import annotations

import struct

from vhost_backends.frontend import Frontend
from virtio_devices.base import VIRTIO_RING_F_EVENT_IDX
from virtio_queue.testing import VIRTQ_DESC_F_WRITE, RawDesc

#: struct virtio_input_event (VIRTIO 1.2 §5.8.6): type le16, code le16, value le32.
EV = struct.Struct("<HHi")


class InputGuest:
    """Both rings of ``ring`` entries on the socket ``path``; ``timeout`` for every wait."""

    def __init__(self, path: str, *, timeout: float, event_idx: bool = True, ring: int = 64) -> None:
        self.timeout = timeout
        self.fe = Frontend.connect(path, timeout=timeout)
        offered = self.fe.get_features()
        self.fe.negotiate(offered if event_idx else offered & ~VIRTIO_RING_F_EVENT_IDX)
        self.fe.add_memory(4 << 20)
        self.fe.set_mem_table()
        self.rings = [self.fe.setup_ring(i, ring) for i in range(2)]
        self.bufs: dict[int, int] = {}

    def select(self, sel: int, subsel: int = 0) -> bytes:
        """The config payload of ``select``/``subsel`` (its ``size`` bytes)."""
        self.fe.set_config(0, bytes([sel, subsel]))
        cfg = self.fe.get_config(0, 136)
        return cfg[8 : 8 + cfg[2]]

    def post(self, n: int) -> None:
        """Make ``n`` eventq buffers available and kick."""
        mock = self.rings[0].mock
        for _ in range(n):
            gpa = mock.alloc(8)
            self.bufs[mock.add_chain([RawDesc(gpa, 8, VIRTQ_DESC_F_WRITE, 0)])] = gpa
        self.fe.kick(0)

    def events(self, count: int) -> list[tuple[int, int, int]]:
        """Wait for ``count`` filled eventq buffers; their events, in used order."""
        used = self.fe.wait_used(0, count, self.timeout)
        return [EV.unpack(self.fe.memory.read(self.bufs.pop(head), 8)) for head, _ in used]

    def status(self, *events: tuple[int, int, int]) -> None:
        """Send ``events`` on the statusq; each comes back with used length 0."""
        mock = self.rings[1].mock
        for ev in events:
            gpa = mock.alloc(8)
            self.fe.memory.write(gpa, EV.pack(*ev))
            mock.add_chain([RawDesc(gpa, 8, 0, 0)])
        self.fe.kick(1)
        lengths = [n for _, n in self.fe.wait_used(1, len(events), self.timeout)]
        if lengths != [0] * len(events):
            raise AssertionError(f"statusq used lengths {lengths}, want zeros")

    def close(self) -> None:
        self.fe.close()
