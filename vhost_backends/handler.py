"""The vhost-user back-end state machine: one :class:`VhostUserHandler` per connection.

It implements the front-end requests of QEMU's ``docs/interop/vhost-user.rst`` for
one :class:`~virtio_devices.base.VirtioDevice`, over one :class:`Connection`, on one
:class:`EventLoop` (all callbacks on the loop's thread, so nothing here locks).

Ring life cycle ("Ring states" in the spec), as rust-vmm's vhost-user-backend does it:

* a ring is *started* when SET_VRING_KICK brings a kick fd, and *stopped* by
  GET_VRING_BASE (which answers the next avail index);
* it is *enabled* by SET_VRING_ENABLE when VHOST_USER_F_PROTOCOL_FEATURES was
  negotiated, and enabled as soon as SET_FEATURES arrives without that bit;
* it is *polled* (its kick fd watched, ``Queue.ready`` true) while it is started,
  enabled, has its addresses and memory.  A device may serve a ring on a thread
  of its own (``VirtioDevice.ring_worker``): the worker then watches the kick fd
  and is the only one touching that ring while it runs; the handler starts it with
  the ring, stops it (waiting for a service under way) before it quiesces the
  device, and wakes it instead of calling ``process_queue``.

Device activation (our decision, documented in the report): the device is activated
with **all** its queues when the **first** ring starts polling; queues whose ring
has not started yet have ``ready == False`` and are never passed to
``process_queue``.  When the last polled ring stops (GET_VRING_BASE on every
started ring, RESET_DEVICE, RESET_OWNER or the front-end leaving) the device is
``reset()``, and activated again, with the features re-acknowledged, when a ring
starts next.  This matches QEMU, which starts and stops all rings of a device
together (vhost_dev_start/stop) but skips rings the driver never set up.

Taking a queue back (issue 12's contract with the device framework): before a ring
stops (GET_VRING_BASE reads next_avail after it, SET_VRING_ENABLE 0, RESET_DEVICE,
RESET_OWNER, the front-end leaving) and before SET_MEM_TABLE or REM_MEM_REG change
the memory under running rings, the device's ``quiesce(index)`` returns its parked
chain to the avail ring and finishes or cancels its worker jobs, so the used ring is
written before the reply and never after.  After a memory change the running rings
are served again at once (what went back to the avail ring was kicked already).

Errors from the device: a queue or guest-memory error stops that ring and writes its
err fd (vhost-user's NEEDS_RESET); ``DeviceNeedsReset`` or any other exception, from
``process_queue`` or from a callback the device registered on the loop (it gets a
:class:`~virtio_devices.device_loop.DeviceLoop` that guards each one), stops every ring
of the device, writes every err fd and resets the device.  The connection and the
process stay up; the front-end can start the rings again.

Every request is validated before it changes anything; a violation raises a
:class:`VhostUserError` that closes the connection (never the process).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import xen.flags
    from virtio_devices._pump import RingWorker

from virtio_devices.base import VIRTIO_RING_F_EVENT_IDX, VirtioDevice
from virtio_devices.device_loop import DeviceLoop
from virtio_queue import BUILT_WITH_XEN, GuestMemory, GuestRegion, Queue
from virtio_queue.errors import GuestMemoryError, QueueError
from virtio_queue.ratelimit import RateLimiter

from . import inflight
from .connection import Connection, Message
from .event_loop import EventLoop
from .inflight import InflightArea, InflightQueueRegion
from .protocol import messages as m
from .protocol.codes import (
    MAX_ATTACHED_FDS,
    MAX_MEM_SLOTS,
    VHOST_USER_F_PROTOCOL_FEATURES,
    BackendReq,
    FrontendReq,
    VhostUserProtocolFeatures,
)
from .protocol.errors import (
    Disconnected,
    FeatureMismatch,
    InactiveFeature,
    InactiveOperation,
    InvalidMessage,
    VhostUserError,
)
from .vrings import VhostUserInterrupt, Vring

# InflightQueueRegion and VhostUserInterrupt live in inflight.py and vrings.py; they
# stay importable from here.
__all__ = ["InflightQueueRegion", "VhostUserHandler", "VhostUserInterrupt", "offered_protocol_features"]

log = logging.getLogger(__name__)

PF = VhostUserProtocolFeatures

#: Requests a front-end may send before SET_OWNER.  QEMU's vhost_user_backend_init
#: negotiates features, queue count, memory slots and the back-end channel before
#: vhost_dev_init sends SET_OWNER, so those must work unowned.
_BEFORE_OWNER = frozenset(
    {
        FrontendReq.GET_FEATURES,
        FrontendReq.GET_PROTOCOL_FEATURES,
        FrontendReq.SET_PROTOCOL_FEATURES,
        FrontendReq.GET_QUEUE_NUM,
        FrontendReq.GET_MAX_MEM_SLOTS,
        FrontendReq.SET_BACKEND_REQ_FD,
        FrontendReq.SET_OWNER,
        FrontendReq.GET_STATUS,
    }
)


def offered_protocol_features(device: VirtioDevice, *, xen: bool = BUILT_WITH_XEN) -> int:
    """Protocol features we offer for ``device`` (CONFIG only with a config space,
    XEN_MMAP only in a Xen build)."""
    bits = (
        PF.MQ
        | PF.REPLY_ACK
        | PF.BACKEND_REQ
        | PF.INFLIGHT_SHMFD
        | PF.CONFIGURE_MEM_SLOTS
        | PF.RESET_DEVICE
        | PF.STATUS
    )
    if device.has_config:
        bits |= PF.CONFIG
    if xen:
        bits |= PF.XEN_MMAP
    return int(bits)


class VhostUserHandler:
    """Back-end side of one vhost-user connection (see the module docstring).

    Create it with the device (fresh per connection), the connection and the loop,
    then :meth:`attach` registers the socket on the loop; when a request fails or
    the peer leaves, the loop is stopped and :attr:`close_reason` says why.  The
    owner then calls :meth:`close`, which resets the device, unmaps memory and
    closes every fd the handler holds.
    """

    def __init__(
        self,
        device: VirtioDevice,
        conn: Connection,
        loop: EventLoop,
        *,
        name: str = "vhost-user",
        xen: bool = BUILT_WITH_XEN,
        xen_sys: xen.flags.XenSys | None = None,
    ) -> None:
        self.device = device
        self.conn = conn
        self.loop = loop
        self.name = name
        self.xen = xen
        self.xen_sys = xen_sys  # the Xen system calls; None: the real ones (tests replace them)
        self.num_queues = device.num_queues
        self.memory = GuestMemory()
        # (descriptor, region) per mapped region, in the order of the table, for the
        # front-end-user-address → guest-address translation of SET_VRING_ADDR.
        self.regions: list[m.MemoryRegion] = []
        serve = device.process_queue
        self.rings = [Vring(i, Queue(size, self.memory), serve) for i, size in enumerate(device.queue_sizes)]
        for ring in self.rings:
            # Where what process_queue raises on the ring's kick path stops.
            ring.kick.fail = functools.partial(self._serve_failed, ring)
        self.interrupt = VhostUserInterrupt(self, self.rings)
        self.owned = False
        self.features_acked = False
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.status = 0
        self.device_active = False
        self.backend_channel: Connection | None = None
        self.inflight_area: InflightArea | None = None
        self.close_reason: str | None = None
        self.closed = False
        self._ratelimit = RateLimiter()
        # The device's view of the loop: its callbacks run under the error policy.
        self.device_loop = DeviceLoop(loop, self._callback_failed)
        #: The device failures seen (DeviceNeedsReset or another exception): each
        #: stopped the device's rings and reset it; the connection stayed up.
        self.device_failures = 0
        # Front-end requests the device failed to answer (see _device_call_failed).
        self.request_failures = 0
        self._failing = False
        self._offered_features = device.device_features() | VHOST_USER_F_PROTOCOL_FEATURES
        self._offered_protocol = offered_protocol_features(device, xen=xen)
        self._dispatch: dict[int, Callable[[Message], None]] = {
            FrontendReq.GET_FEATURES: self._get_features,
            FrontendReq.SET_FEATURES: self._set_features,
            FrontendReq.SET_OWNER: self._set_owner,
            FrontendReq.RESET_OWNER: self._reset_owner,
            FrontendReq.RESET_DEVICE: self._reset_device,
            FrontendReq.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            FrontendReq.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            FrontendReq.SET_MEM_TABLE: self._set_mem_table,
            FrontendReq.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            FrontendReq.ADD_MEM_REG: self._add_mem_reg,
            FrontendReq.REM_MEM_REG: self._rem_mem_reg,
            FrontendReq.SET_VRING_NUM: self._set_vring_num,
            FrontendReq.SET_VRING_ADDR: self._set_vring_addr,
            FrontendReq.SET_VRING_BASE: self._set_vring_base,
            FrontendReq.GET_VRING_BASE: self._get_vring_base,
            FrontendReq.SET_VRING_KICK: self._set_vring_kick,
            FrontendReq.SET_VRING_CALL: self._set_vring_call,
            FrontendReq.SET_VRING_ERR: self._set_vring_err,
            FrontendReq.SET_VRING_ENABLE: self._set_vring_enable,
            FrontendReq.GET_QUEUE_NUM: self._get_queue_num,
            FrontendReq.GET_CONFIG: self._get_config,
            FrontendReq.SET_CONFIG: self._set_config,
            FrontendReq.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            FrontendReq.GET_INFLIGHT_FD: self._get_inflight_fd,
            FrontendReq.SET_INFLIGHT_FD: self._set_inflight_fd,
            FrontendReq.SET_STATUS: self._set_status,
            FrontendReq.GET_STATUS: self._get_status,
        }

    # -- connection plumbing ---------------------------------------------------------------
    def attach(self) -> None:
        """Watch the socket on the loop."""
        self.loop.add_reader(self.conn.fileno(), self.on_readable)

    def on_readable(self) -> None:
        """One message is (at least partly) there: read, handle, maybe close."""
        try:
            msg = self.conn.recv_message()
        except TimeoutError:
            return
        except VhostUserError as e:
            self._fail(e)
            return
        try:
            self.handle_message(msg)
        except VhostUserError as e:
            self._fail(e, msg)
        finally:
            msg.close_fds()

    def _fail(self, err: VhostUserError, msg: Message | None = None) -> None:
        if isinstance(err, Disconnected):
            self.close_reason = str(err)
            log.info("%s: %s", self.name, err)
        else:
            req = _req_name(msg.request) if msg is not None else "message"
            self.close_reason = f"{req}: {err}"
            self._ratelimit.log(
                log, logging.WARNING, "conn", "%s: closing connection: %s: %s", self.name, req, err
            )
            if msg is not None and msg.header.need_reply and self._has(PF.REPLY_ACK):
                # Best effort: tell the front-end its request failed before we go.
                with contextlib.suppress(VhostUserError):
                    self.conn.send(msg.request, m.pack_u64(1), reply=True)
        # The peer sees EOF at once, even before the owner gets to close().
        self.conn.shutdown()
        self.loop.stop()

    def handle_message(self, msg: Message) -> None:
        """Validate and apply one request, then send its reply or REPLY_ACK.

        Raises:
            VhostUserError: the request is invalid here; the caller closes.
        """
        req = msg.request
        if not self.owned and req not in _BEFORE_OWNER:
            raise InactiveOperation(f"{_req_name(req)} before SET_OWNER")
        if msg.header.is_reply:
            raise InvalidMessage("front-end sent a message flagged as a reply")
        fn = self._dispatch.get(req)
        if fn is None:
            raise InactiveOperation(f"{_req_name(req)} is not supported by this back-end")
        self._replied = False
        fn(msg)
        if msg.header.need_reply and not self._replied and self._has(PF.REPLY_ACK):
            # REPLY_ACK: 0 means success ("REPLY_ACK" section of the spec).
            self._reply(msg, m.pack_u64(0))

    def _reply(self, msg: Message, payload: bytes, fds: tuple[int, ...] = ()) -> None:
        self._replied = True
        self.conn.send(msg.request, payload, fds, reply=True)

    def _has(self, feature: int) -> bool:
        return bool(self.acked_protocol_features & feature)

    def _require(self, feature: PF, req: int) -> None:
        if not self.acked_protocol_features & feature:
            raise InactiveFeature(f"{_req_name(req)} needs protocol feature {feature.name}, not negotiated")

    def _ring(self, index: int) -> Vring:
        if index >= self.num_queues:
            raise InvalidMessage(f"vring index {index} out of range (device has {self.num_queues} queues)")
        return self.rings[index]

    # -- features and ownership -----------------------------------------------------
    def _get_features(self, msg: Message) -> None:
        self._reply(msg, m.pack_u64(self._offered_features))

    def _set_features(self, msg: Message) -> None:
        features = m.unpack_u64(msg.payload, "SET_FEATURES")
        if features & ~self._offered_features:
            raise FeatureMismatch(
                f"features 0x{features:x} include bits never offered "
                f"(0x{features & ~self._offered_features:x})"
            )
        self.acked_features = features
        self.features_acked = True
        event_idx = bool(features & VIRTIO_RING_F_EVENT_IDX)
        for ring in self.rings:
            ring.queue.event_idx = event_idx
        try:
            self.device.ack_features(features & ~VHOST_USER_F_PROTOCOL_FEATURES)
        except Exception as e:
            # The features stay acked on the transport side; the device gets them
            # again when its first ring starts, where a second failure is a device
            # failure (the ring does not start).
            self._device_call_failed(msg, "ack_features", e)
        # "Ring states": without VHOST_USER_F_PROTOCOL_FEATURES every ring is enabled
        # at once; with it the rings keep their state until SET_VRING_ENABLE.
        if not features & VHOST_USER_F_PROTOCOL_FEATURES:
            for ring in self.rings:
                ring.enabled = True
                self._update_ring(ring)

    def _get_protocol_features(self, msg: Message) -> None:
        self._reply(msg, m.pack_u64(self._offered_protocol))

    def _set_protocol_features(self, msg: Message) -> None:
        features = m.unpack_u64(msg.payload, "SET_PROTOCOL_FEATURES")
        if features & ~self._offered_protocol:
            raise FeatureMismatch(f"protocol features 0x{features:x} include bits never offered")
        if self.xen and not features & PF.XEN_MMAP:
            # A Xen build can only map guest memory through Xen, so a front-end that
            # does not speak the Xen region format cannot be served (STYLE.md §3).
            raise FeatureMismatch("this is a Xen build: the front-end must acknowledge XEN_MMAP")
        self.acked_protocol_features = features

    def _set_owner(self, msg: Message) -> None:
        if self.owned:
            raise InactiveOperation("SET_OWNER: the session already has an owner")
        self.owned = True

    def _reset_owner(self, msg: Message) -> None:
        self._stop_all()
        self.owned = False
        self.features_acked = False
        self.acked_features = 0
        self.acked_protocol_features = 0

    def _reset_device(self, msg: Message) -> None:
        self._require(PF.RESET_DEVICE, msg.request)
        # RESET_DEVICE: back to the state after SET_OWNER, protocol features kept.
        self._stop_all()
        for ring in self.rings:
            ring.enabled = False
        self.features_acked = False
        self.acked_features = 0
        self.status = 0

    # -- memory ---------------------------------------------------------------------------
    def _map_region(self, desc: m.MemoryRegion, fd: int) -> GuestRegion:
        if self.xen:
            # A Xen build maps every region as its xen mmap flags say (foreign through
            # privcmd, grant through gntdev, or plain mmap for UNIX); the flags are
            # validated there (xen.flags.validate_flags: rust-vmm's rules).
            from xen.flags import map_region  # noqa: PLC0415 - a Xen build's path only

            try:
                return map_region(
                    fd,
                    desc.size,
                    desc.guest_addr,
                    desc.mmap_offset,
                    desc.xen_mmap_flags or 0,
                    desc.domid or 0,
                    xen_sys=self.xen_sys,
                )
            except (GuestMemoryError, OSError) as e:  # XenMapError, InvalidXenFlags included
                raise InvalidMessage(f"cannot map Xen region at guest 0x{desc.guest_addr:x}: {e}") from None
        try:
            return GuestRegion.from_fd(fd, desc.size, desc.guest_addr, desc.mmap_offset)
        except (GuestMemoryError, OSError) as e:
            raise InvalidMessage(f"cannot map region at guest 0x{desc.guest_addr:x}: {e}") from None

    @staticmethod
    def _check_overlaps(descs: list[m.MemoryRegion]) -> None:
        spans = sorted((d.guest_addr, d.guest_addr + d.size) for d in descs)
        for (a0, a1), (b0, _b1) in itertools.pairwise(spans):
            if b0 < a1:
                raise InvalidMessage(f"memory regions overlap: [0x{a0:x}, 0x{a1:x}) and 0x{b0:x}")

    def _set_mem_table(self, msg: Message) -> None:
        descs = m.unpack_memory_table(msg.payload, xen=self.xen, max_regions=MAX_ATTACHED_FDS)
        self._check_overlaps(descs)
        # Map every new region before touching the current table, so a bad table
        # leaves the old one intact (the connection is closed anyway).
        new = [self._map_region(d, msg.fds[i]) for i, d in enumerate(descs)]
        # GuestRegion.from_fd does not keep the fd: the caller closes (finally).
        # The device gives its queues back first: nothing it holds may use the old
        # regions (its parked chains go back to the avail rings, its workers finish).
        self._quiesce_polled()
        self.memory.clear()
        for region in new:
            self.memory.add_region(region)
        self.regions = descs
        self._revalidate_rings()
        self._serve_polled()

    def _get_max_mem_slots(self, msg: Message) -> None:
        self._require(PF.CONFIGURE_MEM_SLOTS, msg.request)
        self._reply(msg, m.pack_u64(MAX_MEM_SLOTS))

    def _add_mem_reg(self, msg: Message) -> None:
        self._require(PF.CONFIGURE_MEM_SLOTS, msg.request)
        desc = m.unpack_single_region(msg.payload, xen=self.xen)
        if len(self.regions) >= MAX_MEM_SLOTS:
            raise InvalidMessage(f"ADD_MEM_REG: all {MAX_MEM_SLOTS} memory slots are in use")
        self._check_overlaps([*self.regions, desc])
        region = self._map_region(desc, msg.fds[0])
        try:
            self.memory.add_region(region)
        except GuestMemoryError as e:
            raise InvalidMessage(f"ADD_MEM_REG: {e}") from None
        self.regions.append(desc)
        self._revalidate_rings()

    def _rem_mem_reg(self, msg: Message) -> None:
        self._require(PF.CONFIGURE_MEM_SLOTS, msg.request)
        desc = m.unpack_single_region(msg.payload, xen=self.xen)
        # The region is named by guest address, user address and size; the mmap
        # offset (and any fd, which the spec says to close unused) is ignored.
        for i, have in enumerate(self.regions):  # noqa: B007 - i is used after the loop
            if (have.guest_addr, have.user_addr, have.size) == (desc.guest_addr, desc.user_addr, desc.size):
                break
        else:
            raise InvalidMessage(
                f"REM_MEM_REG: no region at guest 0x{desc.guest_addr:x} size 0x{desc.size:x}"
            )
        self._quiesce_polled()
        self.memory.remove_region(desc.guest_addr, desc.size)
        del self.regions[i]
        self._revalidate_rings()
        self._serve_polled()

    def _user_to_guest(self, index: int, what: str, user_addr: int) -> int:
        for r in self.regions:
            if r.user_addr <= user_addr < r.user_addr + r.size:
                return user_addr - r.user_addr + r.guest_addr
        raise InvalidMessage(f"vring {index} {what} address 0x{user_addr:x} is outside the memory table")

    def _quiesce_polled(self) -> None:
        """Take every running queue back from the device (a memory change is coming)."""
        for ring in self.rings:
            if ring.polled:
                self._quiesce(ring)

    def _serve_polled(self) -> None:
        """Give the running queues back: what a quiesce returned to the avail rings
        (a parked chain, cancelled worker jobs) was kicked already, so serve it now."""
        for ring in self.rings:
            if ring.polled:
                self._serve(ring)

    def _revalidate_rings(self) -> None:
        # Memory changed under polled rings: a ring whose parts left guest memory
        # cannot be served any more (the front-end broke its own rings).
        for ring in self.rings:
            if ring.polled and not ring.queue.is_valid():
                raise InvalidMessage(f"vring {ring.index} is no longer inside guest memory")

    # -- vrings -----------------------------------------------------------------------------
    def _set_vring_num(self, msg: Message) -> None:
        st = m.unpack_vring_state(msg.payload, "SET_VRING_NUM")
        ring = self._ring(st.index)
        max_size = self.device.queue_sizes[st.index]
        if not 1 <= st.num <= max_size or st.num & (st.num - 1):
            raise InvalidMessage(f"vring {st.index} size {st.num} is not a power of two in 1..{max_size}")
        if ring.started:
            raise InactiveOperation(f"vring {st.index}: SET_VRING_NUM on a started ring")
        ring.queue.size = st.num

    def _set_vring_addr(self, msg: Message) -> None:
        a = m.unpack_vring_addr(msg.payload)
        ring = self._ring(a.index)
        if a.flags & 0x1:
            raise InactiveFeature(
                f"vring {a.index}: used ring logging requested, VHOST_F_LOG_ALL not negotiated"
            )
        desc = self._user_to_guest(a.index, "descriptor", a.descriptor)
        avail = self._user_to_guest(a.index, "available", a.available)
        used = self._user_to_guest(a.index, "used", a.used)
        # VIRTIO 1.2 §2.7: descriptor table 16-byte, avail 2-byte, used 4-byte aligned.
        for what, gpa, align in (("descriptor", desc, 16), ("available", avail, 2), ("used", used, 4)):
            if gpa % align:
                raise InvalidMessage(f"vring {a.index} {what} ring 0x{gpa:x} is not {align}-byte aligned")
        n = ring.queue.size
        for what, gpa, length in (
            ("descriptor", desc, 16 * n),
            ("available", avail, 6 + 2 * n),
            ("used", used, 6 + 8 * n),
        ):
            # A part may run on into the next region (VIRTIO 1.2 §2.7 gives the driver
            # guest-physical addresses only); a gap is refused, naming its address.
            try:
                self.memory.check_access(gpa, length)
            except GuestMemoryError as e:
                raise InvalidMessage(f"vring {a.index} {what} ring: {e}") from None
        q = ring.queue
        q.desc_table, q.avail_ring, q.used_ring = desc, avail, used
        ring.addr_set = True
        self._update_ring(ring)

    def _set_vring_base(self, msg: Message) -> None:
        st = m.unpack_vring_state(msg.payload, "SET_VRING_BASE")
        ring = self._ring(st.index)
        if st.num > 0xFFFF:
            raise InvalidMessage(f"vring {st.index} base {st.num} exceeds 16 bits (split ring)")
        if ring.started:
            raise InactiveOperation(f"vring {st.index}: SET_VRING_BASE on a started ring")
        ring.queue.set_next_avail(st.num)

    def _get_vring_base(self, msg: Message) -> None:
        st = m.unpack_vring_state(msg.payload, "GET_VRING_BASE")
        ring = self._ring(st.index)
        # "stop ring upon receiving VHOST_USER_GET_VRING_BASE": stop polling, forget
        # the notifiers (the front-end sends new ones before it starts the ring again).
        ring.started = False
        self._update_ring(ring)
        base = ring.queue.next_avail()
        self._close_ring_fds(ring)
        self._maybe_deactivate()
        self._reply(msg, m.VRING_STATE.pack(st.index, base))

    def _vring_fd(self, msg: Message, what: str) -> tuple[Vring, int]:
        index, has_fd = m.unpack_vring_fd_index(msg.payload, what)
        ring = self._ring(index)
        return ring, msg.take_fd(0) if has_fd else -1

    def _set_vring_kick(self, msg: Message) -> None:
        ring, fd = self._vring_fd(msg, "SET_VRING_KICK")
        if ring.kick_fd >= 0:
            self._unwatch_kick(ring)
            ring.polled = False
            os.close(ring.kick_fd)
        if fd >= 0:
            # The kick callback reads the eventfd even when the compiled path took
            # the count first: it must never block.
            os.set_blocking(fd, False)
        ring.kick_fd = fd
        # A kick fd starts the ring; without one (bit 8, "polling mode") we cannot
        # serve it, as rust-vmm's back-end cannot: it stays stopped.
        ring.started = fd >= 0
        self._update_ring(ring)

    def _set_vring_call(self, msg: Message) -> None:
        ring, fd = self._vring_fd(msg, "SET_VRING_CALL")
        worker = ring.worker
        if worker is not None and worker.running:
            # The worker may signal with the GIL released (RingWorker.serve_nogil,
            # the ring's Signaller): the Signaller closes the old fd only when the
            # worker is stopped, and the worker starts again on the new one.
            worker.stop()
            ring.set_call_fd(fd)
            self._start_worker(ring)
        else:
            ring.set_call_fd(fd)
        if ring.polled and ring.call_fd >= 0:
            # QEMU starts rings with their interrupts masked (the call fd then is a
            # notifier it does not read after a start) and unmasks them with a second
            # SET_VRING_CALL: a completion signalled in between is lost, such as what
            # a back-end restarted under a running guest serves at once.  One spurious
            # interrupt is harmless (the driver reads the used ring); a lost one
            # leaves the guest waiting for its I/O.
            ring.kick.signal_used()

    def _set_vring_err(self, msg: Message) -> None:
        ring, fd = self._vring_fd(msg, "SET_VRING_ERR")
        if ring.err_fd >= 0:
            os.close(ring.err_fd)
        ring.err_fd = fd

    def _set_vring_enable(self, msg: Message) -> None:
        if not self.acked_features & VHOST_USER_F_PROTOCOL_FEATURES:
            raise InactiveFeature("SET_VRING_ENABLE needs VHOST_USER_F_PROTOCOL_FEATURES, not negotiated")
        st = m.unpack_vring_state(msg.payload, "SET_VRING_ENABLE")
        ring = self._ring(st.index)
        if st.num > 1:
            raise InvalidMessage(f"vring {st.index} enable value {st.num} is not 0 or 1")
        ring.enabled = bool(st.num)
        self._update_ring(ring)

    def _get_queue_num(self, msg: Message) -> None:
        self._reply(msg, m.pack_u64(self.num_queues))

    def _update_ring(self, ring: Vring) -> None:
        """Poll the ring iff it is started, enabled and fully configured."""
        want = ring.started and ring.enabled and ring.addr_set and ring.kick_fd >= 0 and bool(self.regions)
        if want == ring.polled:
            return
        q = ring.queue
        if not want:
            worker = ring.worker
            self._unwatch_kick(ring)
            # The device gives the queue back while it is still usable: its parked
            # chain returns to the avail ring (GET_VRING_BASE then reports it as not
            # consumed) and its worker jobs finish or are cancelled, so nothing
            # writes the used ring after the front-end took the ring back.
            self._quiesce(ring)
            ring.worker = None
            q.ready = False
            ring.polled = False
            self._maybe_deactivate()
            if worker is not None:
                self._worker_failure(ring, worker)
            return
        q.ready = True
        try:
            q.validate()
            # The driver's used->idx is authoritative for what was already returned
            # (after a reconnect the device side starts from a fresh Queue).
            q.set_next_used(q.used_idx())
        except (QueueError, GuestMemoryError) as e:
            q.ready = False
            raise InvalidMessage(f"vring {ring.index} cannot start: {e}") from None
        resubmit = ring.inflight is not None and self._resubmit_inflight(ring)
        ring.polled = True
        if not self.device_active:
            self.device_loop.open()
            try:
                self.device.ack_features(self.acked_features & ~VHOST_USER_F_PROTOCOL_FEATURES)
                self.device.activate(
                    self.memory, [r.queue for r in self.rings], self.interrupt, self.device_loop
                )
            except Exception as e:
                q.ready = False
                ring.polled = False
                self._device_failed(e, "activate")
                return
            self.device_active = True
        # A device that serves this ring on a thread of its own (asked once here):
        # the worker waits for the kicks, the loop does not watch them.
        ring.worker = self.device.ring_worker(ring.index)
        if ring.worker is not None:
            if self._start_worker(ring) and resubmit:
                ring.worker.wake()
            return
        kick = ring.kick
        kick.kick_fd = ring.kick_fd
        # A device that fills single-buffer requests from a host source has them
        # filled in compiled code; asked once here, so that other devices pay no
        # call for it per kick.
        fills = self.device.fill_source(ring.index) is not None
        kick.fill_source = self.device.fill_source if fills else None
        # A device that serves this ring's kicks in compiled code (asked once here).
        kick.pump = self.device.kick_pump(ring.index)
        self.loop.add_ring(kick)
        if resubmit:
            # The driver kicked these long ago: serve them without waiting for a kick.
            self._serve(ring)

    def _serve_failed(self, ring: Vring, err: Exception) -> None:
        """What ``process_queue`` (or ``fill_source``) raised on ``ring``'s kick path,
        the KickRing's one call of it: a guest error stops the ring; anything else
        (DeviceNeedsReset, a bug the device let out) is a device failure."""
        if isinstance(err, (QueueError, GuestMemoryError)):
            self._ring_broken(ring, err)
        else:
            self._device_failed(err, f"q{ring.index}")

    def _start_worker(self, ring: Vring) -> bool:
        """Start the ring's worker on its kick fd; what it raises comes back to the
        loop thread as what ``process_queue`` raises.  A failure of its last run not
        reported yet is handled instead (the ring is not served after it): False."""
        assert ring.worker is not None
        if self._worker_failure(ring, ring.worker):
            return False
        ring.worker.start(ring.kick_fd, ring.kick.fail, self.loop.call_soon_threadsafe)
        return True

    def _worker_failure(self, ring: Vring, worker: RingWorker) -> bool:
        """Handle, as what ``process_queue`` raises, the failure of the stopped
        ``worker`` whose report has not run yet (it failed while this message took
        the ring back): it is taken, so the report does nothing.  Whether there was one."""
        err = worker.take_failure()
        if err is None:
            return False
        # serve_c's exceptions are Exceptions; a BaseException (KeyboardInterrupt)
        # ended the worker's thread all the same: the device failed.
        self._serve_failed(ring, err if isinstance(err, Exception) else RuntimeError(repr(err)))
        return True

    def _serve(self, ring: Vring) -> None:
        if not ring.polled:
            return
        if ring.worker is not None:
            # Served on the worker's thread, never here (it owns the queue).
            if not ring.worker.running and not self._start_worker(ring):
                return
            ring.worker.wake()
            return
        try:
            self.device.process_queue(ring.index)
        except (QueueError, GuestMemoryError) as e:
            self._ring_broken(ring, e)
        except Exception as e:
            self._device_failed(e, f"q{ring.index}")

    def _ring_broken(self, ring: Vring, err: Exception) -> None:
        """The guest broke the ring: stop it and tell the front-end on the err fd
        (vhost-user's equivalent of NEEDS_RESET); the connection stays up."""
        self._ratelimit.log(
            log, logging.WARNING, ring.index, "%s q%d: ring stopped: %s", self.name, ring.index, err
        )
        ring.started = False
        self._update_ring(ring)
        ring.signal_err()

    def _maybe_deactivate(self) -> None:
        if self.device_active and not any(r.polled for r in self.rings):
            self._reset_device_state()

    # -- the device's faults (issue 12's policy, transport side) --------------------------
    def _quiesce(self, ring: Vring) -> None:
        """``device.quiesce(index)`` before the transport takes the queue back (its
        worker stopped first: the queue is the loop thread's again)."""
        if ring.worker is not None:
            ring.worker.stop()
        if not self.device_active:
            return
        try:
            self.device.quiesce(ring.index)
        except (QueueError, GuestMemoryError) as e:
            # Completing the last jobs hit the ring the guest broke (a used ring
            # outside memory...): the ring stops anyway, the device is not at fault.
            self._ratelimit.log(
                log, logging.WARNING, ring.index, "%s q%d: quiesce: %s", self.name, ring.index, e
            )
        except Exception as e:
            self._device_failed(e, f"q{ring.index} quiesce")

    def _reset_device_state(self) -> None:
        """Reset the device (it is inactive afterwards, whatever its reset raised) and
        drop what it left on the loop."""
        self.device_active = False
        try:
            self.device.reset()
        except Exception as e:
            self.device_failures += 1
            log.error("%s: device reset failed: %s: %s", self.name, type(e).__name__, e, exc_info=e)
        self.device_loop.clear()

    def _device_call_failed(self, msg: Message, where: str, err: Exception) -> None:
        """The device raised from a call that answers one front-end request
        (``ack_features``, ``read_config``, ``write_config``): that request fails,
        the session, the rings and the device stay as they were.

        Logged (the traceback the first time, then rate-limited lines) and counted in
        ``request_failures``; with REPLY_ACK asked for, the ack is 1 (failure).
        """
        self.request_failures += 1
        if self.request_failures == 1:
            req = _req_name(msg.request)
            log.error("%s: %s: device %s failed: %s", self.name, req, where, err, exc_info=err)
        else:
            self._ratelimit.log(
                log,
                logging.ERROR,
                "request",
                "%s: %s: device %s failed again: %s",
                self.name,
                _req_name(msg.request),
                where,
                err,
            )
        if msg.header.need_reply and not self._replied and self._has(PF.REPLY_ACK):
            self._reply(msg, m.pack_u64(1))

    def _device_failed(self, err: Exception, where: str) -> None:
        """The device raised ``DeviceNeedsReset`` or an exception outside the guest/host
        fault classes (a bug): it cannot be trusted with its queues.

        vhost-user has no NEEDS_RESET status bit (VIRTIO 1.2 §2.1.2): its equivalent
        is SET_VRING_ERR's eventfd.  So: log it (the traceback the first time, then
        rate-limited lines), stop every ring of the device, signal every err fd, and
        reset the device.  The connection and the process stay up: the front-end can
        start the rings again (the device is activated afresh) or reconnect.
        """
        self.device_failures += 1
        if self.device_failures == 1:
            log.error("%s: %s: device failed, rings stopped: %s", self.name, where, err, exc_info=err)
        else:
            self._ratelimit.log(
                log,
                logging.ERROR,
                "device",
                "%s: %s: device failed again, rings stopped: %s",
                self.name,
                where,
                err,
            )
        if self._failing:
            # A quiesce or a reset inside the teardown below failed too: it is logged,
            # the teardown goes on.
            return
        self._failing = True
        try:
            for ring in self.rings:
                if ring.started:
                    ring.started = False
                    self._update_ring(ring)
            for ring in self.rings:
                ring.signal_err()
            if self.device_active:
                self._reset_device_state()
        finally:
            self._failing = False

    def _callback_failed(self, err: Exception) -> None:
        """A device callback on the loop (reader, timer, worker completion) raised.

        A queue error stops the rings whose queue the device stopped (a broken avail
        ring found by ``resume``); any other error is a device failure.
        """
        if isinstance(err, (QueueError, GuestMemoryError)):
            stopped = [r for r in self.rings if r.polled and not r.queue.ready]
            for ring in stopped:
                self._ring_broken(ring, err)
            if stopped:
                return
        self._device_failed(err, "callback")

    def _stop_all(self) -> None:
        for ring in self.rings:
            ring.started = False
            self._update_ring(ring)
            self._close_ring_fds(ring)
            ring.queue.reset()
            ring.addr_set = False
        self._maybe_deactivate()

    def _close_ring_fds(self, ring: Vring) -> None:
        for attr in ("kick_fd", "err_fd"):
            fd = getattr(ring, attr)
            if fd >= 0:
                if attr == "kick_fd":
                    self._unwatch_kick(ring)
                os.close(fd)
                setattr(ring, attr, -1)
        ring.set_call_fd(-1)

    def _unwatch_kick(self, ring: Vring) -> None:
        """Stop watching the ring's kick fd, and with it its compiled kick path (or
        stop the ring's worker, which watches it)."""
        worker = ring.worker
        if worker is not None and worker.running:
            worker.stop()
            log.debug(
                "%s q%d: worker served %d kicks in %d services",
                self.name,
                ring.index,
                worker.kicks,
                worker.services,
            )
        kick = ring.kick
        if kick.attached:
            self.loop.remove_reader(ring.kick_fd)
            log.debug(
                "%s q%d: %d kicks, %d chains / %d bytes filled in compiled code, %d calls of"
                " process_queue, %d services found by polling",
                self.name,
                ring.index,
                kick.kicks,
                kick.chains,
                kick.bytes,
                kick.python_calls,
                kick.poll_hits,
            )

    # -- config space ------------------------------------------------------------------------
    def _get_config(self, msg: Message) -> None:
        self._require(PF.CONFIG, msg.request)
        cfg = m.unpack_config(msg.payload)
        try:
            data = self.device.read_config(cfg.offset, cfg.size)
        except Exception as e:
            # "GET_CONFIG": a back-end reports an error with a zero-length config
            # payload; the front-end fails that one read and the session goes on.
            self._device_call_failed(msg, "read_config", e)
            self._reply(msg, m.pack_config(cfg.offset, b"", cfg.flags))
            return
        # The reply has exactly the requested size; bytes beyond the device's
        # config space read as zero.
        data = bytes(data[: cfg.size]).ljust(cfg.size, b"\0")
        self._reply(msg, m.pack_config(cfg.offset, data, cfg.flags))

    def _set_config(self, msg: Message) -> None:
        self._require(PF.CONFIG, msg.request)
        cfg = m.unpack_config(msg.payload)
        try:
            self.device.write_config(cfg.offset, cfg.payload)
        except Exception as e:
            self._device_call_failed(msg, "write_config", e)

    def _set_backend_req_fd(self, msg: Message) -> None:
        self._require(PF.BACKEND_REQ, msg.request)
        fd = msg.take_fd(0)
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            os.close(fd)
            raise InvalidMessage(f"SET_BACKEND_REQ_FD: fd is not a socket: {e}") from None
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.close()
            raise InvalidMessage("SET_BACKEND_REQ_FD: fd is not a Unix stream socket")
        if self.backend_channel is not None:
            self.backend_channel.close()
        self.backend_channel = Connection(sock, from_frontend=False)

    def send_config_change(self) -> None:
        """Tell the front-end the config space changed (BackendReq CONFIG_CHANGE_MSG).

        Needs the BACKEND_REQ and CONFIG protocol features and a back-end channel;
        otherwise it is dropped with a debug message.  No reply is requested, so the
        loop never blocks on the front-end.
        """
        if self.backend_channel is None or not self._has(PF.CONFIG):
            log.debug("%s: config change not sent (no back-end channel or CONFIG)", self.name)
            return
        try:
            self.backend_channel.send(BackendReq.CONFIG_CHANGE_MSG)
        except VhostUserError as e:
            log.info("%s: back-end channel lost: %s", self.name, e)
            self.backend_channel.close()
            self.backend_channel = None

    # -- inflight I/O tracking (inflight.py) -----------------------------------------------
    def _use_inflight(self, area: InflightArea | None) -> None:
        """Make ``area`` the connection's inflight area (None: none), dropping the old one."""
        for i, ring in enumerate(self.rings):
            ring.inflight = area.regions[i] if area is not None and i < len(area.regions) else None
            # Tracking starts with the ring (_resubmit_inflight), after recovery.
            ring.queue.set_inflight(None)
        if self.inflight_area is not None:
            self.inflight_area.close()
        self.inflight_area = area

    def _get_inflight_fd(self, msg: Message) -> None:
        self._require(PF.INFLIGHT_SHMFD, msg.request)
        inf = m.unpack_inflight(msg.payload)
        inflight.check_shape(inf, self.device.queue_sizes)
        self._use_inflight(None)
        area, fd = InflightArea.create(inf, self.acked_features)
        try:
            self._use_inflight(area)
            size = len(area.mapping)
            self._reply(msg, m.Inflight(size, 0, inf.num_queues, inf.queue_size).pack(), (fd,))
        finally:
            # The front-end got its own copy of the fd with the reply; the mapping
            # keeps the memory alive on our side.
            os.close(fd)

    def _set_inflight_fd(self, msg: Message) -> None:
        self._require(PF.INFLIGHT_SHMFD, msg.request)
        inf = m.unpack_inflight(msg.payload)
        inflight.check_shape(inf, self.device.queue_sizes)
        self._use_inflight(None)
        self._use_inflight(InflightArea.attach(msg.fds[0], inf))

    def _resubmit_inflight(self, ring: Vring) -> bool:
        """Resume what a previous back-end left in flight on this ring (see
        :func:`inflight.resubmit`); returns whether anything is to be served again."""
        assert ring.inflight is not None
        if ring.queue.size > ring.inflight.queue_size:
            # QEMU 10.0's vhost-user-scsi-pci sizes the area from virtqueue_size but
            # gives the guest 1024-entry rings: say so, heads above the area are lost
            # to a restart (the compiled queue does not track them).
            log.warning(
                "%s q%d: ring of %d entries, inflight area of %d: heads from %d on are "
                "not tracked across a back-end restart",
                self.name,
                ring.index,
                ring.queue.size,
                ring.inflight.queue_size,
                ring.inflight.queue_size,
            )
        n = inflight.resubmit(ring.queue, ring.inflight)
        if n:
            log.info("%s q%d: resubmitting %d in-flight requests", self.name, ring.index, n)
        return bool(n)

    # -- status -----------------------------------------------------------------------------
    def _set_status(self, msg: Message) -> None:
        self._require(PF.STATUS, msg.request)
        status = m.unpack_u64(msg.payload, "SET_STATUS")
        if status > 0xFF:
            raise InvalidMessage(f"device status 0x{status:x} exceeds 8 bits")
        self.status = status

    def _get_status(self, msg: Message) -> None:
        self._require(PF.STATUS, msg.request)
        self._reply(msg, m.pack_u64(self.status))

    # -- teardown ---------------------------------------------------------------------------
    def close(self) -> None:
        """Stop every ring, reset the device, unmap memory, close every fd held."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError, ValueError):
            self.loop.remove_reader(self.conn.fileno())
        try:
            self._stop_all()
        finally:
            if self.device_active:
                self._reset_device_state()
            self._use_inflight(None)
            self.memory.clear()
            self.regions = []
            if self.backend_channel is not None:
                self.backend_channel.close()
                self.backend_channel = None
            self.conn.close()


def _req_name(req: int) -> str:
    try:
        return FrontendReq(req).name
    except ValueError:
        return f"request {req}"
