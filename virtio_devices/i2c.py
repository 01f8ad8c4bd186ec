"""virtio-i2c: an I2C adapter device (VIRTIO 1.2 §5.19), over the adapters of an I2cBus.

Device id 34, one queue (requestq, at most 1024 entries), feature
``VIRTIO_I2C_F_ZERO_LENGTH_REQUEST`` offered (§5.19.3: mandatory), no config space.

A request (§5.19.6.1) is a chain: the device-readable ``virtio_i2c_out_hdr``
(``le16 addr``, ``le16 padding``, ``le32 flags``), an optional buffer (device-readable
for a write request, device-writable for a read request; absent for a zero-length
request such as SMBus quick), and the device-writable ``virtio_i2c_in_hdr`` (``u8
status``).  Buffers are taken as byte streams, however the driver split them into
descriptors (§2.6.4): the first 8 readable bytes are the header, the readable bytes
after it the data to write, the last writable byte the status and the writable
bytes before it the data to read.  ``addr`` holds a 7-bit address shifted left by
one (§5.19.6.1's table); a 10-bit address is refused.

Groups (§5.19.6.1, ``VIRTIO_I2C_FLAGS_FAIL_NEXT``): "for a group of requests, a
driver clears this bit on the final request and sets it on the other requests".
The device collects a group until its final request, then runs it on the adapter
as one I2C transaction (repeated START between its messages, as the guest's
``i2c_transfer`` meant them; a write then a read is the usual register read).
"If this bit is set and a device fails to process the current request, it needs to
fail the next request instead of attempting to execute it": when message ``k`` of a
group fails, it and every later request of the group get ``VIRTIO_I2C_MSG_ERR``
(§5.19.6.4: the device "MUST set the status of the first failed request" to ERR and
MAY set the rest; we always do), the requests before it ``VIRTIO_I2C_MSG_OK``.  A
group is checked whole before it reaches the bus, as the kernel checks an
``I2C_RDWR``: a malformed request, an address with no device, or addresses on two
adapters fail the whole group untouched.  Groups are independent: a failure never
reaches the request after a group's final one.  Upstream ignores FAIL_NEXT and runs
every chain of a kick as one transfer with one status for all (README, "Differences").

A group the ring cannot hold to its end (the driver cannot add the final request
while the device holds the others: Linux's ``virtio_i2c_prepare_reqs`` stops at a
full ring and kicks what it queued) is run as it is when it fills the ring, and the
next request starts a new group; the device never waits for a request that cannot
come.

Requests run in ring order (§5.19.6.4 "MUST guarantee the requests ... being
processed in order"): one group at a time per device.  An adapter whose transfers
may block (``/dev/i2c-N``) runs them on the framework's worker threads
(:mod:`virtio_devices.workers`), never on the event loop; the simulated adapter
answers in place.

The compiled request path: when every adapter of the bus is a ``/dev/i2c-N`` with
compiled ioctls (:attr:`HostAdapter.dev_port <virtio_devices.hosts.i2c.HostAdapter.dev_port>`),
the queue is served by :class:`virtio_devices._i2c_fast.I2cEngine` instead of the
Python below: the same parsing, groups and answers, in C.  Under vhost-user the
engine runs on the ring's own worker thread (:meth:`I2cDevice.ring_worker`), as
upstream's vring worker does: a kick is popped, transferred (the ioctls with the
GIL released: they hold that ring only, never the event loop), answered and
signalled on that one thread.  Under other transports (``process_queue`` on the
loop) the transfers run on each adapter's own thread in batches (one wake-up of
the loop per batch).  The Python path serves every other bus (``sim``, an
embedder's adapter) and is the reference the compiled one is tested against
(``I2cDevice(bus, compiled=False)``).

Used length: the status byte and, for a read request that succeeded, the bytes
read before it: ``len + 1``.  A failed read returns 0: the status byte is written,
but not the buffer before it, and §2.7.8.2 has ``len`` count bytes written from the
first writable byte (upstream reports 1).  A chain with no device-writable byte
cannot be answered and returns 0.
"""

from __future__ import annotations

import collections
import logging
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

from virtio_queue import DescriptorChain, GuestMemory, Queue, Writer
from virtio_queue.errors import GuestMemoryError, QueueError

from . import _i2c_fast
from .base import COMMON_FEATURES, EventLoop, Interrupt, VirtioDevice
from .hosts.i2c import I2cAdapter, I2cBus, I2cMsg
from .workers import Job, default_pool

if TYPE_CHECKING:
    from ._i2c_fast import I2cEngine
    from ._pump import RingWorker
    from .hosts._i2c_dev import I2cDevPort

__all__ = [
    "MAX_MSG_LEN",
    "QUEUE_SIZE",
    "VIRTIO_I2C_FLAGS_FAIL_NEXT",
    "VIRTIO_I2C_FLAGS_M_RD",
    "VIRTIO_I2C_F_ZERO_LENGTH_REQUEST",
    "VIRTIO_I2C_MSG_ERR",
    "VIRTIO_I2C_MSG_OK",
    "VIRTIO_ID_I2C_ADAPTER",
    "I2cDevice",
    "out_hdr",
]

log = logging.getLogger(__name__)

#: VIRTIO 1.2 §5.19.1.
VIRTIO_ID_I2C_ADAPTER = 34
#: Upstream's ``QUEUE_SIZE``.
QUEUE_SIZE = 1024
#: §5.19.3 (a bit number; the mask is ``1 << 0``).
VIRTIO_I2C_F_ZERO_LENGTH_REQUEST = 0
VIRTIO_I2C_FLAGS_FAIL_NEXT = 1 << 0
VIRTIO_I2C_FLAGS_M_RD = 1 << 1
VIRTIO_I2C_MSG_OK = 0
VIRTIO_I2C_MSG_ERR = 1
#: The longest buffer of one request: Linux's i2c-dev refuses longer I2C_RDWR
#: messages (``i2cdev_ioctl_rdwr``), so no adapter could run one.
MAX_MSG_LEN = 8192

_OUT_HDR = struct.Struct("<HHI")
_KNOWN_FLAGS = VIRTIO_I2C_FLAGS_FAIL_NEXT | VIRTIO_I2C_FLAGS_M_RD
_VIRTQ_DESC_F_INDIRECT = 4
_OK = bytes([VIRTIO_I2C_MSG_OK])
_ERR = bytes([VIRTIO_I2C_MSG_ERR])


def out_hdr(addr: int, flags: int = 0) -> bytes:
    """The ``virtio_i2c_out_hdr`` of a request to 7-bit address ``addr`` (a driver's
    view: tests, benches and embedders build requests with it)."""
    return _OUT_HDR.pack(addr << 1, 0, flags)


class _Request:
    """One parsed chain: its message, or why it cannot run, and where its status goes."""

    __slots__ = ("chain", "entries", "error", "fail_next", "msg", "wlen", "writer")

    def __init__(self, chain: DescriptorChain) -> None:
        self.chain = chain
        self.msg: I2cMsg | None = None
        self.error: str | None = None
        self.fail_next = False
        self.writer: Writer | None = None
        self.wlen = 0
        # Descriptor-table entries the chain occupies (1 when indirect).
        self.entries = 1


class _Group:
    """A complete group waiting for, or in, a transfer."""

    __slots__ = ("adapter", "done", "job", "msgs", "reqs")

    def __init__(self, reqs: list[_Request], adapter: I2cAdapter | None, msgs: list[I2cMsg]) -> None:
        self.reqs = reqs
        self.adapter = adapter  # None: the group fails without reaching a bus
        self.msgs = msgs
        self.job: Job | None = None
        self.done = -1  # messages completed, once the transfer ran


class I2cDevice(VirtioDevice):
    """The virtio-i2c device over an :class:`~virtio_devices.hosts.i2c.I2cBus`.

    Behaviour is in the module docstring (VIRTIO 1.2 §5.19).  The bus, its adapters
    and their devices are shared between every device made from them (every socket
    of a daemon); this object holds only the state of its own queue: the group being
    collected, the groups waiting for the adapter, the one in a transfer.
    """

    device_id = VIRTIO_ID_I2C_ADAPTER
    name = "i2c"
    queue_sizes = (QUEUE_SIZE,)
    features = COMMON_FEATURES | 1 << VIRTIO_I2C_F_ZERO_LENGTH_REQUEST
    has_config = False

    def __init__(self, bus: I2cBus, *, compiled: bool = True) -> None:
        super().__init__()
        self.bus = bus
        #: The compiled request path (see the module docstring), or None.
        self.engine: I2cEngine | None = None
        if compiled:
            ports: dict[int, I2cDevPort] = {}
            for addr in bus.addresses():
                port = getattr(bus.adapter_for(addr), "dev_port", None)
                if port is None:
                    break
                ports[addr] = port
            else:
                if ports:
                    self.engine = _i2c_fast.I2cEngine(self, ports)
        self._ring_worker: RingWorker | None = None
        self._open: list[_Request] = []  # the group being collected
        self._open_entries = 0
        self._waiting: collections.deque[_Group] = collections.deque()
        self._running: _Group | None = None
        # Bumped when the queue is given back: a late worker completion is dropped.
        self._gen = 0
        # Groups run and requests failed on the Python path (see groups, failed).
        self._groups = 0
        self._failed = 0

    def compiled_served(self) -> tuple[int, int]:
        """The nogil path (the ring worker's ``serve_nogil``) counts in the engine,
        which Python does not touch meanwhile."""
        engine = getattr(self, "engine", None)
        return (engine.nogil_chains, engine.nogil_bytes) if engine is not None else (0, 0)

    @property
    def groups(self) -> int:
        """Groups run since the device was made."""
        return self._groups + (self.engine.groups if self.engine is not None else 0)

    @property
    def failed(self) -> int:
        """Requests answered with VIRTIO_I2C_MSG_ERR (or not at all) since made."""
        return self._failed + (self.engine.failed if self.engine is not None else 0)

    # -- the compiled request path --------------------------------------------------------
    def activate(
        self, memory: GuestMemory, queues: Sequence[Queue], interrupt: Interrupt, loop: EventLoop
    ) -> None:
        """Start the device; bind the compiled path to the queue and watch its eventfd."""
        super().activate(memory, queues, interrupt, loop)
        engine = self.engine
        if engine is not None:
            engine.bind(queues[0], 0, interrupt)
            loop.add_reader(engine.fd, engine.on_done)

    def ring_worker(self, index: int) -> RingWorker | None:
        """With the compiled path, its :class:`~virtio_devices._i2c_fast.I2cRingWorker`:
        a transport that runs ring workers (vhost-user) serves each kick on the
        worker's thread, the transfers inline with the GIL released, as upstream's
        vring worker does (no adapter thread, no wake-up of the loop).  None on the
        Python path."""
        if self.engine is None:
            return None
        if self._ring_worker is None:
            self._ring_worker = _i2c_fast.I2cRingWorker(self, self.engine, index)
        return self._ring_worker

    #: The driver kicked the requestq: the compiled path (the engine) serves it when
    #: there is one, the Python path otherwise.  Compiled
    #: (:func:`virtio_devices._i2c_fast.process_queue`): a kick costs no Python frame.
    process_queue = _i2c_fast.process_queue

    def reset(self) -> None:
        """Stop watching the compiled path's eventfd, then the base reset."""
        if self.engine is not None and self.loop is not None:
            self.loop.remove_reader(self.engine.fd)
        super().reset()

    # -- parsing -------------------------------------------------------------------------
    def _parse(self, index: int, chain: DescriptorChain) -> _Request:
        """Read one request's header and buffer; never raises for the guest's errors."""
        req = _Request(chain)
        try:
            # The writer first: a bad readable buffer still gets its status.
            writer = chain.writer()
            req.writer = writer
            req.wlen = wlen = writer.available_bytes()
        except (QueueError, GuestMemoryError) as e:
            req.error = str(e)
            return req
        try:
            reader = chain.reader()
            rlen = reader.available_bytes()
            if rlen < _OUT_HDR.size:
                req.error = f"out_hdr is {rlen} device-readable bytes, needs {_OUT_HDR.size}"
                return req
            addr, _padding, flags = _OUT_HDR.unpack(reader.read(_OUT_HDR.size))
            req.fail_next = bool(flags & VIRTIO_I2C_FLAGS_FAIL_NEXT)
            if req.fail_next:
                req.entries = self._table_entries(index, chain)
            rlen -= _OUT_HDR.size
            is_read = bool(flags & VIRTIO_I2C_FLAGS_M_RD)
            if wlen < 1:
                req.error = "no device-writable byte for in_hdr.status"
            elif flags & ~_KNOWN_FLAGS:
                # §5.19.6.3: the driver MUST set the reserved bits of flags to zero.
                req.error = f"reserved flags bits {flags & ~_KNOWN_FLAGS:#x} set"
            elif addr & 0xFF01:
                # §5.19.6.1's table: a 7-bit address is A6..A0 in bits 7..1.
                req.error = f"addr {addr:#06x} is not a 7-bit address (10-bit addresses are not supported)"
            elif is_read and rlen:
                # §5.19.6.3: a read's buffer is device-writable (M_RD set).
                req.error = f"read request with {rlen} device-readable bytes after out_hdr"
            elif not is_read and wlen > 1:
                # §5.19.6.3: a write's buffer is device-readable (M_RD clear).
                req.error = f"write request with {wlen - 1} device-writable bytes before in_hdr.status"
            else:
                n = wlen - 1 if is_read else rlen
                if n > MAX_MSG_LEN:
                    req.error = f"buffer of {n} bytes is beyond {MAX_MSG_LEN}"
                else:
                    buf = bytearray(n) if is_read else bytearray(reader.read(n))
                    req.msg = I2cMsg(addr >> 1, is_read, buf)
        except (QueueError, GuestMemoryError) as e:
            req.error = str(e)
        return req

    def _table_entries(self, index: int, chain: DescriptorChain) -> int:
        """Descriptor-table entries ``chain`` holds: 1 if its head is indirect."""
        queue = self.queues[index]
        try:
            head = queue.memory.read(queue.desc_table + 16 * chain.head_index + 12, 2)  # type: ignore[union-attr]
        except (GuestMemoryError, AttributeError):
            return 1
        if int.from_bytes(head, "little") & _VIRTQ_DESC_F_INDIRECT:
            return 1
        return len(chain.descriptors())

    # -- the drain loop's hooks --------------------------------------------------------
    def handle_chain(self, index: int, chain: DescriptorChain) -> int | None:
        """Add the request to its group; run the group when it is complete.

        Returns the used length of this chain when its group was answered now (the
        simulated adapter, or a group that fails before reaching a bus), None while
        the group is open or waits for a worker.
        """
        req = self._parse(index, chain)
        group = self._open
        group.append(req)
        if req.fail_next:
            self._open_entries += req.entries
            # The driver can add the final request only if the ring has room for it
            # (one entry if indirect, else at least out_hdr and in_hdr).
            need = 1 if req.entries == 1 else 2
            if self._open_entries + need <= self.queues[index].size:
                return None
            log.debug("%s q%d: group of %d fills the ring: run as it is", self.name, index, len(group))
        if len(group) == 1 and self._running is None and not self._waiting:
            # The common case (a quick probe, a plain write or read): a group of one
            # that nothing waits before, answered without the group bookkeeping.
            msg = req.msg
            if msg is not None:
                adapter = self.bus.adapter_for(msg.addr)
                if adapter is not None and not adapter.blocking:
                    group.clear()
                    self._open_entries = 0
                    self._groups += 1
                    return self._status(req, adapter.transfer((msg,)) == 1)
        self._open = []
        self._open_entries = 0
        return self._dispatch(index, self._plan(index, group))

    def _plan(self, index: int, reqs: list[_Request]) -> _Group:
        """Check a complete group whole: its adapter and messages, or a failed group."""
        msgs: list[I2cMsg] = []
        adapter: I2cAdapter | None = None
        for req in reqs:
            if req.msg is None:
                self._ratelimit.log(
                    log, logging.WARNING, index, "%s q%d: request failed: %s", self.name, index, req.error
                )
                return _Group(reqs, None, [])
            here = self.bus.adapter_for(req.msg.addr)
            if here is None:
                # Bus scans probe every address: not worth a warning.
                log.debug("%s q%d: no device at address %#04x", self.name, index, req.msg.addr)
                return _Group(reqs, None, [])
            if adapter is None:
                adapter = here
            elif here is not adapter:
                self._ratelimit.log(
                    log,
                    logging.WARNING,
                    index,
                    "%s q%d: group spans adapters %s and %s: failed",
                    self.name,
                    index,
                    adapter.name,
                    here.name,
                )
                return _Group(reqs, None, [])
            msgs.append(req.msg)
        return _Group(reqs, adapter, msgs)

    def _dispatch(self, index: int, group: _Group) -> int | None:
        """Run ``group`` now, or after the groups before it; the last chain's used
        length if it was answered now."""
        if self._running is not None or self._waiting:
            self._waiting.append(group)
            return None
        adapter = group.adapter
        if adapter is not None and adapter.blocking:
            self._start(index, group)
            return None
        group.done = adapter.transfer(group.msgs) if adapter is not None else 0
        return self._answer(index, group, last_separately=True)

    def _start(self, index: int, group: _Group) -> None:
        """Hand ``group``'s transfer to a worker thread (the adapter may block)."""
        assert group.adapter is not None
        self._running = group
        adapter = group.adapter
        msgs = group.msgs
        loop = self.loop
        assert loop is not None
        gen = self._gen
        name = self.name

        def job() -> None:  # on a worker thread: only the adapter and these messages
            try:
                done = adapter.transfer(msgs)
            except Exception:  # an adapter bug must not kill the worker
                log.exception("%s: transfer on %s raised", name, adapter.name)
                done = 0
            group.done = done
            try:
                loop.call_soon_threadsafe(lambda: self._finished(index, gen, group))
            except (OSError, RuntimeError) as e:  # the loop is gone: so is the device
                log.debug("%s q%d: completion not posted: %s", name, index, e)

        group.job = (self.worker_pool or default_pool()).submit(job)

    def _finished(self, index: int, gen: int, group: _Group) -> None:
        """On the loop: a worker's transfer ended; answer it, start what waits."""
        if gen != self._gen or not self.active or group is not self._running:
            return  # the queue was given back meanwhile: never write its ring
        self._running = None
        self._answer(index, group, last_separately=False)
        self._run_waiting(index)
        self.notify(index)

    def _run_waiting(self, index: int) -> None:
        """Answer the waiting groups in order, up to the next one that needs a worker."""
        while self._waiting and self._running is None:
            group = self._waiting.popleft()
            adapter = group.adapter
            if adapter is not None and adapter.blocking:
                self._start(index, group)
                return
            group.done = adapter.transfer(group.msgs) if adapter is not None else 0
            self._answer(index, group, last_separately=False)

    def _answer(self, index: int, group: _Group, *, last_separately: bool) -> int | None:
        """Write every request's status (and read data) and return the chains.

        ``last_separately``: the last chain's used length is returned for the drain
        loop to add (it is the chain being handled); the others are added here.
        """
        self._groups += 1
        queue = self.queues[index]
        reqs = group.reqs
        done = group.done
        last = len(reqs) - 1
        used_last: int | None = None
        for i, req in enumerate(reqs):
            used = self._status(req, i < done)
            if last_separately and i == last:
                used_last = used
                break
            try:
                queue.add_used(req.chain.head_index, used)
            except (QueueError, GuestMemoryError) as e:
                log.warning("%s q%d: completion dropped: %s", self.name, index, e)
                continue
            self.chains_served += 1
            self.bytes_served += used
        return used_last

    def _status(self, req: _Request, ok: bool) -> int:
        """Write ``req``'s status (and its data when a read succeeded); its used length."""
        writer = req.writer
        if writer is None or req.wlen < 1:
            self._failed += 1
            return 0
        try:
            msg = req.msg
            if ok and msg is not None:
                writer.write(msg.buf + _OK if msg.read else _OK)
                return req.wlen
            self._failed += 1
            if req.wlen > 1:
                writer.consume(req.wlen - 1)
            writer.write(_ERR)
            return 1 if req.wlen == 1 else 0
        except (QueueError, GuestMemoryError) as e:
            self._log_guest_fault(0, e)
            return 0

    # -- giving the queue back ---------------------------------------------------------
    def quiesce(self, index: int) -> None:
        """Finish the transfer in flight, give the other held chains back, then the base.

        The group in a worker runs to its end and is answered (a request is never
        returned undone).  The groups waiting for it and the open group are given
        back (:meth:`Queue.unpop_many`): they are the last chains popped, so the
        avail ring takes them back (vhost-user GET_VRING_BASE reports them as not
        consumed) and whoever serves the ring next sees them again, whole; chains
        resubmitted after a reconnect go back to the resubmit list instead.
        """
        if index < len(self.queues) and self.active and self.engine is not None:
            self.engine.quiesce()
        if index < len(self.queues) and self.active:
            running = self._running
            if running is not None and running.job is not None:
                running.job.wait()
                self._running = None
                self._answer(index, running, last_separately=False)
                self.notify(index)
            # Popped in this order, after the running group's: given back the newest
            # first, so the next pops return them in order, whether they came from
            # the avail ring or were resubmitted after a reconnect.
            back = [req.chain.head_index for g in self._waiting for req in g.reqs]
            back += [req.chain.head_index for req in self._open]
            if back:
                self.queues[index].unpop_many(back)
        self._open = []
        self._open_entries = 0
        self._waiting.clear()
        self._running = None
        self._gen += 1
        super().quiesce(index)

    def held(self) -> int:
        """Chains popped and not yet answered (open, waiting and running groups)."""
        running = len(self._running.reqs) if self._running is not None else 0
        if self.engine is not None:
            running += self.engine.held()
        return len(self._open) + sum(len(g.reqs) for g in self._waiting) + running
