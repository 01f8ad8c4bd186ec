"""The back-end state machine, driven by our Frontend over a socketpair.

The handler runs on its own EventLoop in a thread (as in the daemon); the test is
the front-end.  A refused request closes the connection: the front-end then sees
Disconnected, and ``handler.close_reason`` names the check.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import vhost_backends.handler as handler_mod
from vhost_backends.connection import Connection
from vhost_backends.event_loop import EventLoop
from vhost_backends.frontend import Frontend, FrontendRing
from vhost_backends.handler import InflightQueueRegion, VhostUserHandler
from vhost_backends.protocol import messages as m
from vhost_backends.protocol.codes import (
    MAX_MEM_SLOTS,
    VHOST_USER_F_PROTOCOL_FEATURES,
    BackendReq,
    FrontendReq,
)
from vhost_backends.protocol.codes import VhostUserProtocolFeatures as PF
from vhost_backends.protocol.errors import Disconnected, VhostUserError
from virtio_queue import BUILT_WITH_XEN
from virtio_queue.testing import MockSplitQueue, RawDesc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from echo_device import EchoDevice

WRITE = 2


class Session:
    """A handler on a loop thread plus the Frontend talking to it."""

    def __init__(self, xen: bool = False, xen_sys: object = None) -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.device = EchoDevice()
        self.loop = EventLoop()
        self.handler = VhostUserHandler(
            self.device, Connection(a), self.loop, name="test", xen=xen, xen_sys=xen_sys  # type: ignore[arg-type]
        )
        self.handler.attach()
        self.thread = threading.Thread(target=self.loop.run)
        self.thread.start()
        self.fe = Frontend(b, timeout=2.0)

    def finish(self) -> str | None:
        """Wait for the handler to stop (the test closed or broke the connection)."""
        self.fe.close()
        self.thread.join(5)
        assert not self.thread.is_alive()
        reason = self.handler.close_reason
        self.handler.close()
        self.loop.close()
        return reason

    def refused(self) -> str:
        """The connection must be closed by the back-end; return its reason."""
        with pytest.raises(Disconnected):
            # Whatever is pending, the next reply read sees EOF.
            self.fe.conn.recv_message(check_fd_count=False)
        reason = self.finish()
        assert reason is not None
        return reason


@pytest.fixture
def s() -> Iterator[Session]:
    sess = Session()
    yield sess
    if sess.thread.is_alive() or not sess.handler.closed:
        sess.finish()


def ready(s: Session, size: int = 256) -> None:
    s.fe.negotiate()
    s.fe.add_memory(1 << 20)
    s.fe.set_mem_table()
    s.fe.setup_ring(0, size)


def echo(s: Session, payload: bytes, index: int = 0) -> bytes:
    mock = s.fe.rings[index].mock
    src, dst = mock.alloc(len(payload)), mock.alloc(len(payload))
    s.fe.memory.write(src, payload)
    head = mock.add_chain([RawDesc(src, len(payload), 0, 0), RawDesc(dst, len(payload), WRITE, 0)])
    s.fe.kick(index)
    assert s.fe.wait_used(index) == [(head, len(payload))]
    return s.fe.memory.read(dst, len(payload))


def test_handler_happy_path_echoes(s: Session) -> None:
    ready(s)
    assert echo(s, b"one request") == b"one request"
    assert echo(s, b"and another") == b"and another"
    assert s.device.activations == 1
    assert s.fe.get_vring_base(0) == 2
    assert s.device.resets == 1  # last ring stopped -> device reset
    assert s.finish() is not None


def test_handler_negotiation_values(s: Session) -> None:
    feats = s.fe.get_features()
    assert feats & VHOST_USER_F_PROTOCOL_FEATURES
    assert feats & ~VHOST_USER_F_PROTOCOL_FEATURES == EchoDevice.features
    pf = s.fe.get_protocol_features()
    want = (
        PF.MQ
        | PF.REPLY_ACK
        | PF.CONFIG
        | PF.BACKEND_REQ
        | PF.INFLIGHT_SHMFD
        | PF.CONFIGURE_MEM_SLOTS
        | PF.RESET_DEVICE
        | PF.STATUS
    )
    assert pf == want
    s.fe.negotiate()
    assert s.fe.get_queue_num() == 2
    assert s.fe.get_max_mem_slots() == MAX_MEM_SLOTS
    assert s.device.acked_features == EchoDevice.features


def test_handler_ring_without_protocol_features_starts_on_kick(s: Session) -> None:
    feats = s.fe.get_features() & ~VHOST_USER_F_PROTOCOL_FEATURES
    s.fe.set_owner()
    s.fe.set_features(feats)
    s.fe.add_memory(1 << 20)
    s.fe.set_mem_table()
    s.fe.setup_ring(0, 64)  # no SET_VRING_ENABLE: rings are enabled by SET_FEATURES
    assert echo(s, b"legacy") == b"legacy"


def test_handler_disabled_ring_is_not_served(s: Session) -> None:
    ready(s)
    s.fe.set_vring_enable(0, False)
    mock = s.fe.rings[0].mock
    buf = mock.alloc(4)
    mock.add_chain([RawDesc(buf, 4, 0, 0), RawDesc(buf, 4, WRITE, 0)])
    s.fe.kick(0)
    assert not s.fe.wait_call(0, timeout=0.05)
    s.fe.set_vring_enable(0, True)  # the pending kick is still readable: served now
    assert s.fe.wait_used(0) == [(0, 4)]


def test_handler_stopped_ring_keeps_base_for_the_next_start(s: Session) -> None:
    ready(s)
    echo(s, b"x")
    base = s.fe.get_vring_base(0)
    assert base == 1
    # Restart like QEMU does after vhost_dev_stop: same ring memory, base carried
    # over, new notifiers (GET_VRING_BASE dropped the old ones).
    ring = s.fe.rings[0]
    mock = ring.mock
    for fd in (ring.kick_fd, ring.call_fd):
        os.close(fd)
    ring.kick_fd, ring.call_fd = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    s.fe.set_vring_num(0, 256)
    s.fe.set_vring_base(0, base)
    s.fe.set_vring_addr(
        0, s.fe.user_addr(mock.desc_table), s.fe.user_addr(mock.avail_ring), s.fe.user_addr(mock.used_ring)
    )
    s.fe.set_vring_call(0, ring.call_fd)
    s.fe.set_vring_kick(0, ring.kick_fd)
    s.fe.set_vring_enable(0, True)
    assert echo(s, b"after restart") == b"after restart"
    assert s.device.activations == 2


def test_handler_ring_kick_path_owns_the_call_fd(s: Session) -> None:
    """The ring's KickRing serves its kicks with one process_queue call each and is
    the one owner of the call eventfd: SET_VRING_CALL replaces it (closing the old
    one), the device's interrupt signals the new one, and a stop closes it."""
    ready(s)
    ring = s.handler.rings[0]
    kick = ring.kick
    assert echo(s, b"one") == b"one"
    assert kick.attached and kick.kicks >= 1 and kick.python_calls >= 1
    old = ring.call_fd
    assert old >= 0 and old == kick.call_fd
    fe_ring = s.fe.rings[0]
    with contextlib.suppress(BlockingIOError):
        os.eventfd_read(fe_ring.call_fd)   # the echo's call, if wait_used left it
    new_call = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        s.fe.set_vring_call(0, new_call)   # acked: the handler has applied it
        assert kick.call_fd not in (-1, old)
        # Replaced on a running ring: signalled once (see the next test), then quiet.
        assert os.eventfd_read(new_call) == 1
        with pytest.raises(BlockingIOError):
            os.eventfd_read(new_call)
        s.handler.interrupt.signal_used(0)   # the device's interrupt goes through the ring
        assert os.eventfd_read(new_call) == 1
        with pytest.raises(BlockingIOError):
            os.eventfd_read(fe_ring.call_fd)   # the old eventfd is not written any more
        s.fe.get_vring_base(0)   # stops the ring
        assert not kick.attached
        assert s.finish() is not None
        assert kick.call_fd == -1   # closed by its owner with the ring's fds
    finally:
        os.close(new_call)


def test_handler_call_fd_replaced_on_a_running_ring_is_signalled(s: Session) -> None:
    """QEMU starts a ring with its interrupt masked (the call fd is a notifier it does
    not read after the start) and unmasks it with a second SET_VRING_CALL; a
    completion signalled in between would be lost and the guest would wait for it
    (seen with a back-end restarted under a running guest).  So a call fd replaced
    while the ring runs is signalled once; one given before the start is not."""
    s.fe.negotiate()
    s.fe.add_memory(1 << 20)
    s.fe.set_mem_table()
    early = os.eventfd(0, os.EFD_NONBLOCK)
    unmasked = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        s.fe.set_vring_call(0, early)   # not started: nothing to catch up on
        with pytest.raises(BlockingIOError):
            os.eventfd_read(early)
        ring = s.fe.setup_ring(0, 256)
        mock = ring.mock
        buf = mock.alloc(4)
        mock.add_chain([RawDesc(buf, 4, 0, 0), RawDesc(buf, 4, WRITE, 0)])
        s.fe.kick(0)
        assert s.fe.wait_used(0) == [(0, 4)]   # signalled on the "masked" fd
        s.fe.set_vring_call(0, unmasked)
        assert os.eventfd_read(unmasked) == 1
    finally:
        os.close(early)
        os.close(unmasked)


def test_handler_config_and_backend_channel(s: Session) -> None:
    s.fe.negotiate()
    assert s.fe.get_config(0, 8) == b"ECHO\0\0\0\0"
    assert s.fe.get_config(4, 16) == b"\0" * 16  # padded past the config space
    chan = s.fe.set_backend_req_fd()
    ready_ring = s.fe
    ready_ring.add_memory(1 << 20)
    ready_ring.set_mem_table()
    ready_ring.setup_ring(0, 16)  # activates the device (so it has an interrupt)
    s.fe.set_config(4, struct.pack("<I", 7))
    assert s.fe.get_config(4, 4) == struct.pack("<I", 7)
    backend = Connection(chan, from_frontend=False, timeout=2.0)
    msg = backend.recv_message(check_fd_count=False)
    assert msg.request == BackendReq.CONFIG_CHANGE_MSG and not msg.header.need_reply


def test_handler_status(s: Session) -> None:
    s.fe.negotiate()
    s.fe.set_status(0x0F)
    assert s.fe.get_status() == 0x0F


def test_handler_reset_device_stops_rings(s: Session) -> None:
    ready(s)
    echo(s, b"x")
    s.fe.reset_device()
    assert s.device.resets == 1 and not s.device.active
    assert not s.handler.rings[0].polled


def test_handler_add_and_remove_regions(s: Session) -> None:
    s.fe.negotiate()
    low = s.fe.add_memory(1 << 20)
    high = s.fe.add_memory(1 << 16, guest_addr=1 << 30)
    s.fe.add_mem_reg(low)
    s.fe.add_mem_reg(high)
    assert len(s.handler.memory.regions) == 2
    s.fe.rem_mem_reg(high)
    assert [r.guest_addr for r in s.handler.memory.regions] == [0]
    s.fe.setup_ring(0, 64, gpa=0)
    assert echo(s, b"slots") == b"slots"


def test_handler_reply_ack_on_every_request(s: Session) -> None:
    s.fe.negotiate()
    s.fe.send(FrontendReq.SET_VRING_NUM, m.VRING_STATE.pack(0, 64), need_reply=True)
    assert m.unpack_u64(s.fe.call_reply_payload(FrontendReq.SET_VRING_NUM)) == 0


def test_handler_failure_acks_nonzero_then_closes(s: Session) -> None:
    s.fe.negotiate()
    s.fe.send(FrontendReq.SET_VRING_NUM, m.VRING_STATE.pack(0, 3), need_reply=True)  # not a power of 2
    assert m.unpack_u64(s.fe.call_reply_payload(FrontendReq.SET_VRING_NUM)) == 1
    assert "power of two" in s.refused()


# -- refusals: each names the spec rule it enforces ------------------------------------------
def test_handler_request_before_owner_refused(s: Session) -> None:
    s.fe.send(FrontendReq.SET_FEATURES, m.pack_u64(0))
    assert "before SET_OWNER" in s.refused()


def test_handler_vring_index_out_of_range_refused(s: Session) -> None:
    s.fe.negotiate()
    s.fe.send(FrontendReq.SET_VRING_NUM, m.VRING_STATE.pack(2, 64))
    assert "vring index 2 out of range" in s.refused()


def test_handler_ring_outside_memory_refused(s: Session) -> None:
    s.fe.negotiate()
    desc = s.fe.add_memory(1 << 16)
    s.fe.set_mem_table()
    s.fe.set_vring_num(0, 256)
    # The used ring's user address lies past the end of the only region.
    s.fe.send(
        FrontendReq.SET_VRING_ADDR,
        m.VRING_ADDR.pack(0, 0, desc.user_addr, desc.user_addr + (1 << 16) + 64, desc.user_addr + 4096, 0),
    )
    assert "outside the memory table" in s.refused()


def test_handler_ring_crossing_memory_end_refused(s: Session) -> None:
    s.fe.negotiate()
    desc = s.fe.add_memory(1 << 16)
    s.fe.set_mem_table()
    s.fe.set_vring_num(0, 256)
    end = desc.user_addr + (1 << 16)
    s.fe.send(
        FrontendReq.SET_VRING_ADDR,
        m.VRING_ADDR.pack(0, 0, desc.user_addr, end - 64, desc.user_addr + 4096, 0),
    )
    assert "used ring: guest range [0xffc0, +0x806) crosses a gap at 0x10000" in s.refused()


def test_handler_ring_across_adjacent_regions_accepted(s: Session) -> None:
    """A ring part that runs from one region into the next one, adjacent in guest-physical
    memory, is accepted (VIRTIO 1.2 §2.7); the queue serves through both mappings."""
    s.fe.negotiate()
    first = s.fe.add_memory(1 << 16)
    s.fe.add_memory(1 << 16, 1 << 16)
    s.fe.set_mem_table()
    s.fe.set_vring_num(0, 256)
    end = first.user_addr + (1 << 16)
    s.fe.request(
        FrontendReq.SET_VRING_ADDR,
        m.VRING_ADDR.pack(0, 0, first.user_addr, end - 64, first.user_addr + 4096, 0),
    )
    assert s.fe.get_queue_num() >= 1  # still connected: the message was accepted


def test_handler_overlapping_regions_refused(s: Session) -> None:
    s.fe.negotiate()
    fd = os.memfd_create("r")
    os.ftruncate(fd, 1 << 16)
    try:
        regions = [m.MemoryRegion(0, 1 << 16, 0x10000000, 0), m.MemoryRegion(1 << 15, 1 << 16, 0x20000000, 0)]
        s.fe.send(FrontendReq.SET_MEM_TABLE, m.pack_memory_table(regions), [fd, fd])
    finally:
        os.close(fd)
    assert "overlap" in s.refused()


def test_handler_too_many_regions_refused(s: Session) -> None:
    s.fe.negotiate()
    fd = os.memfd_create("r")
    os.ftruncate(fd, 4096)
    try:
        regions = [m.MemoryRegion(i << 12, 4096, 0x10000000 + (i << 12), 0) for i in range(32)]
        regions.append(m.MemoryRegion(33 << 12, 4096, 0, 0))
        s.fe.send(FrontendReq.SET_MEM_TABLE, m.pack_memory_table(regions), [fd] * 32)
    finally:
        os.close(fd)
    assert "expected 33" in s.refused()


def test_handler_add_mem_reg_beyond_slots_refused(s: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handler_mod, "MAX_MEM_SLOTS", 2)
    s.fe.negotiate()
    descs = [s.fe.add_memory(4096, guest_addr=i << 20) for i in range(3)]
    s.fe.add_mem_reg(descs[0])
    s.fe.add_mem_reg(descs[1])
    fd = s.fe.regions[2][1]
    s.fe.send(FrontendReq.ADD_MEM_REG, m.pack_single_region(descs[2]), [fd])
    assert "all 2 memory slots are in use" in s.refused()


def test_handler_add_mem_reg_overlap_refused(s: Session) -> None:
    s.fe.negotiate()
    desc = s.fe.add_memory(1 << 16)
    s.fe.add_mem_reg(desc)
    fd = s.fe.regions[0][1]
    s.fe.send(
        FrontendReq.ADD_MEM_REG, m.pack_single_region(m.MemoryRegion(0x8000, 0x1000, 0x5000000, 0)), [fd]
    )
    assert "overlap" in s.refused()


def test_handler_vring_enable_without_protocol_features_refused(s: Session) -> None:
    s.fe.set_owner()
    s.fe.set_features(EchoDevice.features)
    s.fe.send(FrontendReq.SET_VRING_ENABLE, m.VRING_STATE.pack(0, 1))
    assert "PROTOCOL_FEATURES" in s.refused()


def test_handler_unoffered_features_refused(s: Session) -> None:
    s.fe.set_owner()
    s.fe.send(FrontendReq.SET_FEATURES, m.pack_u64(1 << 63))
    assert "never offered" in s.refused()


def test_handler_unsupported_request_refused(s: Session) -> None:
    s.fe.set_owner()
    s.fe.send(FrontendReq.SEND_RARP, bytes(8))
    assert "not supported" in s.refused()


def test_handler_xen_build_requires_xen_mmap() -> None:
    sess = Session(xen=True)
    assert sess.fe.get_protocol_features() & PF.XEN_MMAP
    sess.fe.set_protocol_features(int(PF.REPLY_ACK))
    assert "XEN_MMAP" in sess.refused()


def _xen_session(xen_sys: object = None) -> Session:
    sess = Session(xen=True, xen_sys=xen_sys)
    sess.fe.set_protocol_features(int(PF.XEN_MMAP))
    sess.fe.set_owner()
    return sess


def _send_xen_table(sess: Session, flags: int, domid: int = 1) -> None:
    fd = os.memfd_create("x")
    try:
        os.ftruncate(fd, 1 << 20)
        region = m.MemoryRegion(0, 1 << 20, 0x7F0000000000, 0, xen_mmap_flags=flags, domid=domid)
        sess.fe.send(FrontendReq.SET_MEM_TABLE, m.pack_memory_table([region]), [fd])
    finally:
        os.close(fd)


def test_handler_xen_region_bad_flags_refused() -> None:
    sess = _xen_session()
    _send_xen_table(sess, 0x3)  # grant AND foreign
    assert "FOREIGN and GRANT are exclusive" in sess.refused()
    sess = _xen_session()
    _send_xen_table(sess, 0x1 | 0x8)  # foreign must be mapped in advance
    assert "advance" in sess.refused()


@pytest.mark.skipif(BUILT_WITH_XEN, reason="checks the refusal of a non-Xen build")
def test_handler_xen_region_in_unix_build_refused_naming_xen_build() -> None:
    sess = _xen_session()
    _send_xen_table(sess, 0x1)
    assert "XEN=1" in sess.refused()


@pytest.mark.xen
@pytest.mark.skipif(not BUILT_WITH_XEN, reason="needs a XEN=1 build (xen._foreign)")
def test_handler_xen_foreign_region_mapped_through_privcmd() -> None:
    from xen.flags import PRIVCMD_PATH  # noqa: PLC0415
    from xen.testing import FakeXenSys  # noqa: PLC0415

    fake = FakeXenSys(foreign_fds_are=PRIVCMD_PATH)
    sess = _xen_session(fake)
    _send_xen_table(sess, 0x1, domid=7)
    assert sess.fe.get_queue_num() == len(EchoDevice.queue_sizes)  # still served
    regions = sess.handler.memory.regions
    assert [(r.guest_addr, r.size) for r in regions] == [(0, 1 << 20)]
    assert [b.dom for b in fake.batches] == [7]
    sess.finish()


@pytest.mark.xen
@pytest.mark.skipif(not BUILT_WITH_XEN, reason="needs a XEN=1 build")
def test_handler_xen_unix_flag_region_is_plain_mmap() -> None:
    sess = _xen_session()
    _send_xen_table(sess, 0x0)
    assert sess.fe.get_queue_num() == len(EchoDevice.queue_sizes)
    assert [(r.guest_addr, r.size) for r in sess.handler.memory.regions] == [(0, 1 << 20)]
    sess.finish()


class DeadBackendArea(InflightQueueRegion):
    """Writes an inflight area the way a previous back-end left it, one step of the
    spec's procedure at a time (the running daemon does this in compiled code)."""

    def mark_available(self, head: int) -> None:
        """A head was popped: ``inflight = 1`` with the next counter value."""
        self.counter += 1
        _i, nxt, _c = self.desc(head)
        self._set_desc(head, 1, nxt, self.counter)

    def prepare_used(self, head: int) -> None:
        """Before publishing a head: ``next = last_batch_head``, ``last_batch_head = head``."""
        _f, _v, _d, last_batch_head, used_idx = self.header()
        inflight, _n, counter = self.desc(head)
        self._set_desc(head, inflight, last_batch_head, counter)
        self._set_header(head, used_idx)


# -- inflight I/O tracking ----------------------------------------------------------------
def test_inflight_area_layout_and_tracking(s: Session) -> None:
    s.fe.negotiate()
    inf, fd = s.fe.get_inflight_fd(2, 256)
    try:
        assert inf.mmap_size == 2 * m.inflight_queue_size(256) and inf.mmap_offset == 0
        assert os.fstat(fd).st_size == inf.mmap_size
        area = memoryview(bytearray(os.pread(fd, inf.mmap_size, 0)))
        _features, version, desc_num, _lbh, used_idx = m.INFLIGHT_QUEUE_HEADER.unpack_from(area, 0)
        assert (version, desc_num, used_idx) == (1, 256, 0)
        s.fe.add_memory(1 << 20)
        s.fe.set_mem_table()
        s.fe.setup_ring(0, 256)
        echo(s, b"tracked")
        raw = os.pread(fd, m.inflight_queue_size(256), 0)
        _f, _v, _d, last_batch_head, used_idx = m.INFLIGHT_QUEUE_HEADER.unpack_from(raw, 0)
        assert (last_batch_head, used_idx) == (0, 1)
        inflight, _next, counter = m.INFLIGHT_DESC.unpack_from(raw, 16)
        assert (inflight, counter) == (0, 1)  # popped (counter 1) then completed
    finally:
        os.close(fd)


def test_inflight_resubmitted_after_reconnect() -> None:
    """A back-end died with heads 0 and 1 in flight; the next one resumes them."""
    first = Session()
    first.fe.negotiate()
    inf, ifd = first.fe.get_inflight_fd(1, 64)
    first.finish()
    try:
        sess = Session()
        sess.fe.negotiate()
        sess.fe.add_memory(1 << 20)
        sess.fe.set_mem_table()
        sess.fe.set_inflight_fd(inf, ifd)
        # Driver state as the dead back-end left it: two chains popped, none used.
        mock = MockSplitQueue(sess.fe.memory, 64)
        bufs = []
        for text in (b"first", b"second"):
            src, dst = mock.alloc(8), mock.alloc(8)
            sess.fe.memory.write(src, text.ljust(8, b"."))
            mock.add_chain([RawDesc(src, 8, 0, 0), RawDesc(dst, 8, WRITE, 0)])
            bufs.append(dst)
        area = DeadBackendArea(memoryview(bytearray(m.inflight_queue_size(64))), 64)
        area.buf[:] = os.pread(ifd, m.inflight_queue_size(64), 0)
        area.mark_available(0)
        area.mark_available(2)  # heads are 0 and 2 (two descriptors each)
        os.pwrite(ifd, bytes(area.buf), 0)
        # Start the ring with base 2 (what GET_VRING_BASE would have said).
        kick, call = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
        sess.fe.rings[0] = FrontendRing(0, mock, kick, call)
        sess.fe.set_vring_num(0, 64)
        sess.fe.set_vring_base(0, 2)
        sess.fe.set_vring_addr(
            0,
            sess.fe.user_addr(mock.desc_table),
            sess.fe.user_addr(mock.avail_ring),
            sess.fe.user_addr(mock.used_ring),
        )
        sess.fe.set_vring_call(0, call)
        sess.fe.set_vring_kick(0, kick)
        sess.fe.set_vring_enable(0, True)  # no kick: the back-end serves them on its own
        assert sess.fe.wait_used(0, count=2) == [(0, 8), (2, 8)]
        assert [sess.fe.memory.read(b, 8) for b in bufs] == [b"first...", b"second.."]
        sess.finish()
    finally:
        os.close(ifd)


def test_inflight_recover_fixes_the_last_batch() -> None:
    area = DeadBackendArea(memoryview(bytearray(m.inflight_queue_size(8))), 8)
    area.init_header(0)
    for head in (1, 3, 5):
        area.mark_available(head)
    # Head 3 was published in the used ring, but the back-end died before clearing
    # its inflight flag (used_idx still 0, ring idx 1).
    area.prepare_used(3)
    assert area.recover(ring_used_idx=1) == [1, 5]
    assert area.used_idx == 1


def test_inflight_recover_rejects_wrong_layout() -> None:
    area = InflightQueueRegion(memoryview(bytearray(m.inflight_queue_size(8))), 8)
    with pytest.raises(VhostUserError, match="version"):
        area.recover(0)


def test_two_frontends_can_share_a_region_of_guest_ram() -> None:
    """``add_memory(fd=...)`` maps another front-end's memfd (the benches give every
    daemon the same pages): a write through one is read through the other, and each
    closes its own duplicate of the fd."""
    pairs = [socket.socketpair() for _ in range(2)]
    first, second = (Frontend(a, timeout=1.0) for a, _b in pairs)
    try:
        first.add_memory(1 << 16, 0)
        shared = first.add_memory(1 << 20, 1 << 20)
        second.add_memory(1 << 16, 0)
        second.add_memory(shared.size, shared.guest_addr, fd=first.regions[1][1])
        assert second.regions[1][1] != first.regions[1][1]
        first.memory.write((1 << 20) + 4096, b"same pages")
        assert second.memory.read((1 << 20) + 4096, 10) == b"same pages"
        first.memory.write(4096, b"own pages")
        assert second.memory.read(4096, 9) == bytes(9)
        first.close()
        second.memory.write((2 << 20) - 4, b"live")
        assert second.memory.read((2 << 20) - 4, 4) == b"live"
    finally:
        second.close()
        for _a, b in pairs:
            b.close()
