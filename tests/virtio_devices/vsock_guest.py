"""A guest's vsock driver in miniature, over :class:`virtio_devices.testing.DeviceRig`.

It posts rx buffers, sends packets on tx and reads back what the device put on rx;
:meth:`VsockGuest.pump` plays the event loop over the rig's :class:`FakeLoop` (fires
the readers whose fds are ready now, ``poll`` with a zero timeout: no sleep).
"""

from __future__ import annotations

import select
from dataclasses import dataclass

from virtio_devices.testing import DeviceRig
from virtio_devices.vsock import HDR, HDR_SIZE, HOST_CID, TYPE_STREAM, Hdr, VsockDevice
from virtio_queue.testing import VIRTQ_DESC_F_WRITE, RawDesc

RX, TX = 0, 1


@dataclass
class Packet:
    hdr: Hdr
    data: bytes

    @property
    def op(self) -> int:
        return self.hdr.op


class VsockGuest:
    """Drives ``device`` as a guest with CID ``cid`` would (see the module docstring)."""

    def __init__(self, device: VsockDevice, *, queue_size: int = 256, rx_buf: int = 4096 + HDR_SIZE) -> None:
        self.device = device
        self.cid = device.guest_cid
        self.rig = DeviceRig(device, queue_size=queue_size, event_idx=True, memory_size=16 << 20)
        self.rx_buf = rx_buf
        self._rx: dict[int, int] = {}  # head -> gpa of posted rx buffers
        self.buf_alloc = 1 << 20
        self.fwd_cnt: dict[tuple[int, int], int] = {}

    # -- rx -----------------------------------------------------------------------------
    def post_rx(self, count: int = 32) -> None:
        for _ in range(count):
            gpa = self.rig.mocks[RX].alloc(self.rx_buf)
            head = self.rig.add_chain(RX, [_desc(gpa, self.rx_buf, write=True)])
            self._rx[head] = gpa
        self.rig.kick(RX) and None

    def received(self) -> list[Packet]:
        """Packets the device completed on rx since the last call (buffers reposted)."""
        out = []
        for head, used in self.rig.used(RX):
            gpa = self._rx.pop(head)
            raw = self.rig.read(gpa, used)
            hdr = Hdr.parse(raw)
            assert used == HDR_SIZE + hdr.len, (used, hdr.len)
            out.append(Packet(hdr, raw[HDR_SIZE:]))
        if out:
            self.post_rx(len(out))
        return out

    # -- tx -----------------------------------------------------------------------------
    def send(
        self, src_port: int, dst_port: int, op: int, data: bytes = b"", *, flags: int = 0,
        type_: int = TYPE_STREAM, dst_cid: int = HOST_CID, src_cid: int | None = None,
        buf_alloc: int | None = None, fwd_cnt: int | None = None, length: int | None = None,
    ) -> list[tuple[int, int]]:  # fmt: skip
        """One packet on tx; returns the tx used entries."""
        hdr = HDR.pack(
            self.cid if src_cid is None else src_cid, dst_cid, src_port, dst_port,
            len(data) if length is None else length, type_, op, flags,
            self.buf_alloc if buf_alloc is None else buf_alloc,
            self.fwd_cnt.get((src_port, dst_port), 0) if fwd_cnt is None else fwd_cnt,
        )  # fmt: skip
        bufs = [hdr, data] if data else [hdr]
        self.rig.add_request(TX, readable=bufs)
        return self.rig.kick(TX)

    def pump(self, rounds: int = 50, wait: float = 0.0) -> None:
        """Fire every reader of the fake loop whose fd is ready, until none is; the
        first look waits up to ``wait`` seconds for one."""
        loop = self.rig.loop
        for r in range(rounds):
            fds = list(loop.readers)
            if not fds:
                return
            p = select.poll()
            for fd in fds:
                p.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
            ready = [fd for fd, _ev in p.poll(int(wait * 1000) if r == 0 else 0)]
            if not ready:
                return
            for fd in ready:
                cb = loop.readers.get(fd)
                if cb is not None:
                    cb()

    def exchange(self) -> list[Packet]:
        self.pump()
        return self.received()

    def close(self) -> None:
        self.rig.close()
        self.device.close()


def _desc(gpa: int, size: int, *, write: bool) -> RawDesc:
    return RawDesc(gpa, size, VIRTQ_DESC_F_WRITE if write else 0, 0)
