"""A vhost-user **front-end** in Python: the QEMU side of the protocol, for tests and tools.

:class:`Frontend` connects to any vhost-user back-end (ours, the Rust daemons,
``qemu-storage-daemon``), negotiates features, shares memfd guest memory
(SET_MEM_TABLE or ADD_MEM_REG), lays out split rings with
:class:`virtio_queue.mock.MockSplitQueue` (the driver side), starts them with
the SET_VRING_* requests, kicks and waits for calls.  :meth:`Frontend.send_raw`
sends arbitrary bytes and fds, for adversity tests.

Front-end "user addresses" are the host addresses of our own memfd mappings, as
QEMU's are, so a back-end's user-address translation is exercised for real.
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from virtio_queue import GuestMemory, GuestRegion
from virtio_queue.mock import VIRTQ_DESC_F_WRITE, MockSplitQueue, RawDesc

from .connection import Connection, Message
from .protocol import messages as m
from .protocol.codes import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_VRING_NOFD_MASK,
    FrontendReq,
    VhostUserProtocolFeatures,
)
from .protocol.errors import InvalidMessage, VhostUserError

__all__ = ["BackendError", "Frontend", "FrontendRing"]

PF = VhostUserProtocolFeatures


class BackendError(VhostUserError):
    """The back-end answered a request with a REPLY_ACK failure, or an unexpected reply."""


@dataclass
class FrontendRing:
    """One ring as the front-end set it up: the driver-side mock and its eventfds."""

    index: int
    mock: MockSplitQueue
    kick_fd: int
    call_fd: int


class Frontend:
    """A vhost-user front-end over one connected Unix socket.

    Typical session::

        with Frontend.connect(path) as fe:
            fe.negotiate()                   # owner, features, protocol features
            fe.add_memory(1 << 20)           # memfd guest RAM at guest address 0
            fe.set_mem_table()
            ring = fe.setup_ring(0, 256)     # NUM, BASE, ADDR, CALL, KICK, ENABLE
            head = ring.mock.add_chain([...])
            fe.kick(0); fe.wait_call(0)

    Every request method raises :class:`VhostUserError` subclasses on protocol
    failures (:class:`Disconnected` when the back-end closed the connection).
    """

    def __init__(self, sock: socket.socket, *, timeout: float = 5.0) -> None:
        self.conn = Connection(sock, from_frontend=True, timeout=timeout)
        self.timeout = timeout
        self.memory = GuestMemory()
        self.regions: list[tuple[m.MemoryRegion, int]] = []  # descriptor, memfd
        self.rings: dict[int, FrontendRing] = {}
        self.features = 0
        self.protocol_features = 0
        self.backend_channel: socket.socket | None = None

    @classmethod
    def connect(cls, path: str, *, timeout: float = 5.0) -> Frontend:
        """Connect to the back-end listening on ``path``."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return cls(sock, timeout=timeout)

    # -- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:
        """Close the socket, every eventfd and memfd, and unmap guest memory."""
        for ring in self.rings.values():
            for fd in (ring.kick_fd, ring.call_fd):
                if fd >= 0:
                    os.close(fd)
        self.rings.clear()
        for _desc, fd in self.regions:
            os.close(fd)
        self.regions.clear()
        self.memory.clear()
        if self.backend_channel is not None:
            self.backend_channel.close()
            self.backend_channel = None
        self.conn.close()

    def __enter__(self) -> Frontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw messaging ------------------------------------------------------------------
    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send arbitrary bytes (with ``fds`` on the first byte): adversity tests."""
        self.conn.send_raw(data, fds)

    def send(
        self, req: int, payload: bytes = b"", fds: Sequence[int] = (), *, need_reply: bool = False
    ) -> None:
        """Send one well-framed request."""
        self.conn.send(req, payload, fds, need_reply=need_reply)

    def recv_reply(self, req: int) -> Message:
        """Read the reply to ``req``; the caller closes its fds (``Message.close_fds``).

        Raises:
            BackendError: the reply is not flagged as a reply or answers another request.
        """
        msg = self.conn.recv_message(check_fd_count=False)
        if not msg.header.is_reply or msg.request != req:
            msg.close_fds()
            raise BackendError(
                f"expected a reply to {FrontendReq(req).name}, "
                f"got request {msg.request} flags 0x{msg.header.flags:x}"
            )
        return msg

    def call(self, req: int, payload: bytes = b"", fds: Sequence[int] = ()) -> bytes:
        """Send a request that has a reply and return the reply payload."""
        self.send(req, payload, fds)
        msg = self.recv_reply(req)
        msg.close_fds()
        return msg.payload

    def request(self, req: int, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        """Send a request without a natural reply; with REPLY_ACK negotiated, ask
        for and check the ack.

        Raises:
            BackendError: the back-end acknowledged with a non-zero status.
        """
        ack = bool(self.protocol_features & PF.REPLY_ACK)
        self.send(req, payload, fds, need_reply=ack)
        if ack:
            status = m.unpack_u64(self.call_reply_payload(req), "REPLY_ACK")
            if status:
                raise BackendError(f"{FrontendReq(req).name} failed: back-end replied {status}")

    def call_reply_payload(self, req: int) -> bytes:
        msg = self.recv_reply(req)
        msg.close_fds()
        return msg.payload

    # -- features and ownership -------------------------------------------------------
    def get_features(self) -> int:
        return m.unpack_u64(self.call(FrontendReq.GET_FEATURES))

    def set_features(self, features: int) -> None:
        self.request(FrontendReq.SET_FEATURES, m.pack_u64(features))
        self.features = features

    def get_protocol_features(self) -> int:
        return m.unpack_u64(self.call(FrontendReq.GET_PROTOCOL_FEATURES))

    def set_protocol_features(self, features: int) -> None:
        # Sent before REPLY_ACK is in force, as QEMU does.
        self.send(FrontendReq.SET_PROTOCOL_FEATURES, m.pack_u64(features))
        self.protocol_features = features

    def set_owner(self) -> None:
        self.request(FrontendReq.SET_OWNER)

    def reset_owner(self) -> None:
        self.request(FrontendReq.RESET_OWNER)

    def reset_device(self) -> None:
        self.request(FrontendReq.RESET_DEVICE)

    def get_queue_num(self) -> int:
        return m.unpack_u64(self.call(FrontendReq.GET_QUEUE_NUM))

    def get_max_mem_slots(self) -> int:
        return m.unpack_u64(self.call(FrontendReq.GET_MAX_MEM_SLOTS))

    def negotiate(self, features: int | None = None, protocol_features: int | None = None) -> tuple[int, int]:
        """QEMU's order: GET_FEATURES, GET/SET_PROTOCOL_FEATURES, SET_OWNER, SET_FEATURES.

        ``features``/``protocol_features`` default to everything offered (protocol
        features limited to what this front-end implements).  Returns what was set.
        """
        offered = self.get_features()
        feats = offered if features is None else features
        pfeats = 0
        if offered & VHOST_USER_F_PROTOCOL_FEATURES:
            poffered = self.get_protocol_features()
            mine = (
                PF.MQ
                | PF.REPLY_ACK
                | PF.CONFIG
                | PF.BACKEND_REQ
                | PF.INFLIGHT_SHMFD
                | PF.CONFIGURE_MEM_SLOTS
                | PF.RESET_DEVICE
                | PF.STATUS
                # A Xen build of a back-end insists on Xen region descriptions; ours
                # describe plain memfd regions with the UNIX mapping flag.
                | PF.XEN_MMAP
            )
            pfeats = poffered & mine if protocol_features is None else protocol_features
            self.set_protocol_features(pfeats)
        self.set_owner()
        self.set_features(feats)
        return feats, pfeats

    # -- memory ---------------------------------------------------------------------------
    def add_memory(self, size: int, guest_addr: int = 0, fd: int | None = None) -> m.MemoryRegion:
        """A region of guest RAM (not yet sent to the back-end): a new memfd, or ``fd``
        (another front-end's memfd, duplicated: the same pages behind both guests'
        addresses)."""
        if fd is None:
            region, fd = GuestRegion.memfd(size, guest_addr)
        else:
            fd = os.dup(fd)  # ours to close, as a memfd of our own is
            region = GuestRegion.from_fd(fd, size, guest_addr)
        self.memory.add_region(region)
        desc = m.MemoryRegion(guest_addr, size, region.host_addr, 0)
        self.regions.append((desc, fd))
        return desc

    def _wire(self, desc: m.MemoryRegion) -> m.MemoryRegion:
        """The description as sent: the Xen variant (UNIX mapping, domid 0) once
        XEN_MMAP was negotiated."""
        if self.protocol_features & PF.XEN_MMAP and desc.xen_mmap_flags is None:
            return desc._replace(xen_mmap_flags=0, domid=0)
        return desc

    def set_mem_table(self) -> None:
        """SET_MEM_TABLE with every region, one memfd per region."""
        descs = [self._wire(d) for d, _fd in self.regions]
        self.request(FrontendReq.SET_MEM_TABLE, m.pack_memory_table(descs), [fd for _d, fd in self.regions])

    def add_mem_reg(self, desc: m.MemoryRegion) -> None:
        fd = next(f for d, f in self.regions if d == desc)
        self.request(FrontendReq.ADD_MEM_REG, m.pack_single_region(self._wire(desc)), [fd])

    def rem_mem_reg(self, desc: m.MemoryRegion) -> None:
        self.request(FrontendReq.REM_MEM_REG, m.pack_single_region(self._wire(desc)))

    def user_addr(self, gpa: int) -> int:
        """The front-end (our) virtual address of guest address ``gpa``."""
        for desc, _fd in self.regions:
            if desc.guest_addr <= gpa < desc.guest_addr + desc.size:
                return gpa - desc.guest_addr + desc.user_addr
        raise InvalidMessage(f"guest address 0x{gpa:x} is not in the front-end's memory")

    # -- rings ------------------------------------------------------------------------------
    def set_vring_num(self, index: int, num: int) -> None:
        self.request(FrontendReq.SET_VRING_NUM, m.VRING_STATE.pack(index, num))

    def set_vring_base(self, index: int, base: int) -> None:
        self.request(FrontendReq.SET_VRING_BASE, m.VRING_STATE.pack(index, base))

    def set_vring_addr(
        self, index: int, desc: int, avail: int, used: int, *, flags: int = 0, log: int = 0
    ) -> None:
        """SET_VRING_ADDR with front-end user addresses (see :meth:`user_addr`)."""
        self.request(FrontendReq.SET_VRING_ADDR, m.VRING_ADDR.pack(index, flags, desc, used, avail, log))

    def get_vring_base(self, index: int) -> int:
        state = m.unpack_vring_state(self.call(FrontendReq.GET_VRING_BASE, m.VRING_STATE.pack(index, 0)))
        return state.num

    def _vring_fd(self, req: int, index: int, fd: int) -> None:
        if fd < 0:
            self.request(req, m.pack_u64(index | VHOST_USER_VRING_NOFD_MASK))
        else:
            self.request(req, m.pack_u64(index), [fd])

    def set_vring_kick(self, index: int, fd: int) -> None:
        self._vring_fd(FrontendReq.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int) -> None:
        self._vring_fd(FrontendReq.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int) -> None:
        self._vring_fd(FrontendReq.SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool = True) -> None:
        self.request(FrontendReq.SET_VRING_ENABLE, m.VRING_STATE.pack(index, int(enable)))

    def setup_ring(
        self, index: int, size: int, *, base: int = 0, gpa: int | None = None, enable: bool = True
    ) -> FrontendRing:
        """Lay out a split ring at ``gpa`` (default: after the previous ring) and start
        it: SET_VRING_NUM, BASE, ADDR, CALL, KICK, then ENABLE when protocol features
        were negotiated (QEMU's vhost_virtqueue_start order)."""
        if gpa is None:
            gpa = max((r.mock.data_addr + 0x10000 for r in self.rings.values()), default=0)
        mock = MockSplitQueue(self.memory, size, base=gpa)
        kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        ring = FrontendRing(index, mock, kick, call)
        self.rings[index] = ring
        self.set_vring_num(index, size)
        self.set_vring_base(index, base)
        self.set_vring_addr(
            index,
            self.user_addr(mock.desc_table),
            self.user_addr(mock.avail_ring),
            self.user_addr(mock.used_ring),
        )
        self.set_vring_call(index, call)
        self.set_vring_kick(index, kick)
        if enable and self.features & VHOST_USER_F_PROTOCOL_FEATURES:
            self.set_vring_enable(index, True)
        return ring

    def add_request(
        self,
        index: int,
        readable: Sequence[bytes] = (),
        writable: Sequence[int] = (),
        fill: int | None = None,
    ) -> tuple[int, list[int]]:
        """Make one chain available on ring ``index``: a device-readable buffer holding
        each of ``readable``, then a device-writable buffer of each size in
        ``writable`` (each byte ``fill`` when given). Returns the head and the
        writable buffers' guest addresses. Does not kick."""
        mock = self.rings[index].mock
        descs = []
        for data in readable:
            gpa = mock.alloc(max(len(data), 1))
            self.memory.write(gpa, data)
            descs.append(RawDesc(gpa, len(data), 0, 0))
        outs = []
        for size in writable:
            gpa = mock.alloc(max(size, 1))
            if fill is not None:
                self.memory.write(gpa, bytes([fill]) * size)
            outs.append(gpa)
            descs.append(RawDesc(gpa, size, VIRTQ_DESC_F_WRITE, 0))
        return mock.add_chain(descs), outs

    def kick(self, index: int) -> None:
        """Notify the back-end that ring ``index`` has new buffers."""
        os.eventfd_write(self.rings[index].kick_fd, 1)

    def wait_call(self, index: int, timeout: float | None = None) -> bool:
        """Wait until the back-end signals ring ``index``; False on timeout."""
        fd = self.rings[index].call_fd
        p = select.poll()
        p.register(fd, select.POLLIN)
        if not p.poll(int(1000 * (self.timeout if timeout is None else timeout))):
            return False
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return False
        return True

    def wait_used(self, index: int, count: int = 1, timeout: float | None = None) -> list[tuple[int, int]]:
        """Wait for calls until ``count`` new used elements are there; return them.

        Raises:
            TimeoutError: they did not arrive in time.
        """
        mock = self.rings[index].mock
        while True:
            seen = mock.used_idx()
            if (seen - mock.last_used) & 0xFFFF >= count:
                return mock.used_elems()
            # VIRTIO 1.2 §2.7.10: with EVENT_IDX the device only notifies once
            # used->idx passes used_event, so ask for one as soon as an entry past
            # those already seen is used (a device may well notify for the first of
            # a batch), then look again (it may have published before it could see
            # our request).
            mock.set_used_event(seen)
            now = mock.used_idx()
            if (now - mock.last_used) & 0xFFFF >= count:
                return mock.used_elems()
            if now != seen:
                # The device went past ``seen`` while we asked: it may have checked
                # used_event before our store and will not notify for entries it has
                # already published, so ask again from where the ring is now.
                continue
            if not self.wait_call(index, timeout):
                raise TimeoutError(f"ring {index}: no used buffers within the timeout")

    # -- config, status, inflight, back-end channel ----------------------------------------
    def get_config(self, offset: int, size: int) -> bytes:
        """GET_CONFIG of ``size`` bytes at ``offset``.

        Raises:
            BackendError: the back-end answered with a zero-length config payload,
                its way of reporting that the read failed ("GET_CONFIG").
        """
        reply = self.call(FrontendReq.GET_CONFIG, m.pack_config(offset, bytes(size)))
        if len(reply) >= m.CONFIG_HEADER.size and m.CONFIG_HEADER.unpack_from(reply)[1] == 0:
            raise BackendError(f"GET_CONFIG offset {offset} size {size} failed: zero-length reply")
        return m.unpack_config(reply).payload

    def set_config(self, offset: int, data: bytes) -> None:
        self.request(FrontendReq.SET_CONFIG, m.pack_config(offset, data))

    def set_status(self, status: int) -> None:
        self.request(FrontendReq.SET_STATUS, m.pack_u64(status))

    def get_status(self) -> int:
        return m.unpack_u64(self.call(FrontendReq.GET_STATUS))

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[m.Inflight, int]:
        """GET_INFLIGHT_FD: returns the area description and its fd (caller closes)."""
        self.send(FrontendReq.GET_INFLIGHT_FD, m.Inflight(0, 0, num_queues, queue_size).pack())
        msg = self.recv_reply(FrontendReq.GET_INFLIGHT_FD)
        try:
            inf = m.unpack_inflight(msg.payload)
            if len(msg.fds) != 1:
                raise BackendError(f"GET_INFLIGHT_FD reply carries {len(msg.fds)} fds")
            return inf, msg.take_fd(0)
        finally:
            msg.close_fds()

    def set_inflight_fd(self, inflight: m.Inflight, fd: int) -> None:
        self.request(FrontendReq.SET_INFLIGHT_FD, inflight.pack(), [fd])

    def set_backend_req_fd(self) -> socket.socket:
        """Create the back-end channel; returns our end (back-end requests arrive there)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.request(FrontendReq.SET_BACKEND_REQ_FD, b"", [theirs.fileno()])
        finally:
            theirs.close()
        self.backend_channel = ours
        return ours
