"""A guest's vsock driver in miniature, over :class:`virtio_devices.testing.DeviceRig`.

It posts rx buffers, sends packets on tx and reads back what the device put on rx;
:meth:`VsockGuest.pump` plays the event loop over the rig's :class:`FakeLoop` (fires
the readers whose fds are ready now, ``poll`` with a zero timeout: no sleep).  With
``nogil`` it plays the vhost-user loop's nogil phase too: kicks and readable host
sockets go to the pumps' nogil paths first (the GIL released), to ``pump_c`` when
they ask, as :class:`vhost_backends.event_loop.EventLoop` serves them.
"""

from __future__ import annotations

import os
import select
from collections.abc import Callable
from dataclasses import dataclass, field

from virtio_devices import _vsock_fast
from virtio_devices._pump import Signaller
from virtio_devices.testing import DeviceRig, FakeInterrupt
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


@dataclass
class SignallingInterrupt(FakeInterrupt):
    """An interrupt with compiled signallers (as vhost-user's), each on an eventfd:
    what the nogil paths need to notify the driver."""

    sigs: dict[int, Signaller] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i in (RX, TX):
            s = Signaller()
            s.set_fd(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
            self.sigs[i] = s

    def signaller(self, index: int) -> Signaller:
        return self.sigs[index]

    def close(self) -> None:
        for s in self.sigs.values():
            s.set_fd(-1)


@dataclass
class NogilKicks:
    """The device's kicks routed as the vhost-user loop serves them (installed over
    ``device.process_queue``): the kick pump's nogil path first, the GIL released;
    ``pump_c`` when it asks; ``process_queue`` when that asks.  ``served`` /
    ``handed``: kicks the nogil path served / handed over."""

    device: VsockDevice
    served: int = 0
    handed: int = 0
    pumps: dict[int, _vsock_fast.KickPump] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i in (RX, TX):
            pump = self.device.kick_pump(i)
            assert pump is not None and pump.offers_nogil
            self.pumps[i] = pump
        self.device.process_queue = self.kick  # type: ignore[method-assign]

    def kick(self, index: int) -> None:
        pump = self.pumps.get(index)
        if pump is None:
            _vsock_fast.process_queue(self.device, index)
        elif pump.serve_nogil():
            self.handed += 1
            if pump.pump():
                _vsock_fast.process_queue(self.device, index)
        else:
            self.served += 1


class VsockGuest:
    """Drives ``device`` as a guest with CID ``cid`` would (see the module docstring)."""

    def __init__(
        self,
        device: VsockDevice,
        *,
        queue_size: int = 256,
        rx_buf: int = 4096 + HDR_SIZE,
        nogil: bool = False,
    ) -> None:
        self.device = device
        self.cid = device.guest_cid
        self.rig = DeviceRig(device, queue_size=queue_size, event_idx=True, memory_size=16 << 20)
        self.nogil: NogilKicks | None = None
        self.irq: SignallingInterrupt | None = None
        if nogil:
            self.irq = SignallingInterrupt()
            device.interrupt = self.irq
            self.nogil = NogilKicks(device)
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
                    pump = loop.pumps.get(fd)
                    nogil = self.nogil is not None and isinstance(pump, _vsock_fast.InputPump)
                    if nogil and not pump.serve_nogil():  # type: ignore[union-attr]
                        continue
                    cb()

    def fire(self, fd: int) -> None:
        """Serve ``fd``'s readiness as the vhost-user loop does (the nogil path first
        in ``nogil`` mode, then ``FakeLoop.fire_pump``).

        Raises:
            KeyError: nothing watches ``fd``.
        """
        pump = self.rig.loop.pumps.get(fd)
        if self.nogil is not None and isinstance(pump, _vsock_fast.InputPump) and not pump.serve_nogil():
            return
        self.rig.loop.fire_pump(fd)

    def exchange(self) -> list[Packet]:
        self.pump()
        return self.received()

    def close(self) -> None:
        self.rig.close()
        self.device.close()
        if self.irq is not None:
            self.irq.close()


def _desc(gpa: int, size: int, *, write: bool) -> RawDesc:
    return RawDesc(gpa, size, VIRTQ_DESC_F_WRITE if write else 0, 0)


def first_naps(
    kick: Callable[[], list[tuple[int, int]]],
    rw: Callable[[int], None],
    state: Callable[[], tuple[int, int, int, int]],
    wait: int,
) -> None:
    """The tx nap's first steps, as both tx drains (with and without the GIL) take
    them: ``rw(n)`` posts ``n`` small RW packets, ``kick()`` kicks tx and returns
    its used entries, ``state()`` the nap counters (naps, naps cut short, drains
    to skip, back-off) and ``wait`` is the loop's fd the nap waits on.  A pass
    that took stream data naps, and a first nap that finds nothing makes the next
    drain skip it; a ready loop fd cuts a nap short.  ``wait`` is left empty."""
    rw(4)
    assert len(kick()) == 4
    assert state() == (1, 0, 1, 1)  # one nap, which found nothing: skip one
    rw(4)
    assert len(kick()) == 4
    assert state() == (1, 0, 0, 1)  # skipped
    os.eventfd_write(wait, 1)  # the loop has work: the next nap ends at once
    rw(4)
    assert len(kick()) == 4
    assert state() == (1, 1, 0, 1)
    os.eventfd_read(wait)
