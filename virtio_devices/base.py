"""The transport-free device interface that every device in this package implements.

A device knows guest memory and virtqueues, never a transport.  A transport (our
vhost-user handler in :mod:`vhost_backends`, the virtio-mmio model in
:mod:`virtio_devices.mmio`, or an embedding VMM of your own) drives it like this::

    dev = RngDevice(source)                      # host backend given to the constructor
    features = dev.device_features()             # offer these to the driver
    dev.ack_features(driver_features)            # what the driver accepted
    data = dev.read_config(offset, size)         # config space (VIRTIO 1.2 §4.x.4)
    dev.activate(memory, queues, interrupt, loop)
    dev.process_queue(i)                         # each time the driver kicks queue i
    dev.quiesce(i)                               # before the transport takes queue i back
    dev.reset()                                  # device reset or front-end gone

* ``memory`` is a :class:`virtio_queue.GuestMemory`; it may change (regions added or
  removed) while the device is active, the queues follow it.
* ``queues`` are :class:`virtio_queue.Queue` objects, one per entry of
  :attr:`VirtioDevice.queue_sizes`, already configured and bound to ``memory``.
* ``interrupt`` is the transport's :class:`Interrupt`: ``signal_used(i)`` after used
  buffers were added to queue ``i`` and a notification is due, and
  ``signal_config_change()``.
* ``loop`` is the transport's :class:`EventLoop`: a device registers its host file
  descriptors (an evdev node, a Unix socket, a GPIO line) and timers there, and is
  called back on the same thread that calls :meth:`VirtioDevice.process_queue`, so a
  device never needs a lock against its own queue processing.

The drain loop (:meth:`VirtioDevice.process_chains`, what ``process_queue`` does by
default) pops chains and hands each to the device's ``handle_chain``; a device adds
only its own logic through these hooks:

* ``admit(index)``: asked before each pop while a chain is available; False leaves
  the chains in the avail ring (a rate limit, a full host socket) with notifications
  disabled, until the device calls ``resume(index)``;
* ``handle_chain`` returns the used length (completed now), ``None`` (the device
  keeps the chain: it completes it later with ``complete()``, or hands it to a
  worker with ``run_in_worker()``), or :data:`PARK` (stop draining; the framework
  holds the chain and hands it to ``retry_chain`` when the device calls
  ``resume(index)``, e.g. from an fd reader once the host has data);
* ``guest_fault`` / ``host_fault``: what the guest gets back for a chain that
  failed (see "Errors").

Ordering rules (who may do what, and when):

* **Only the loop thread touches a Queue** (pop, add_used, notification flags,
  next_avail).  Device callbacks registered on the loop (readers, timers,
  ``call_soon_threadsafe`` callbacks) run on that thread too.
* **Worker threads** (:mod:`virtio_devices.workers`) may read and write guest
  buffers of the chain they were given (a chain holds a snapshot of guest memory;
  unmaps are deferred while it lives) and may call ``loop.call_soon_threadsafe``,
  nothing else.  Their results are applied on the loop thread, in batches:
  ``add_used`` for each finished job, then one notification check per queue per
  batch.
* **add_used and the notification.**  The drain loop adds a chain to the used ring
  as soon as ``handle_chain`` returns its length, and checks
  ``needs_notification()`` once, at the end of the batch (VIRTIO 1.2 §2.7.10, EVENT_IDX
  honoured).  ``complete()`` notifies at once unless told not to.
* **quiesce(index)** is called by the transport, on the loop thread, before it
  takes a queue back (vhost-user GET_VRING_BASE, a ring stopped, a memory table
  replaced, RESET_DEVICE, a disconnect), and by ``reset()`` for every queue.  It
  returns the parked chain to the avail ring, gives back the queue's worker jobs
  not yet started whose chains were the last ones popped (to the avail ring), runs
  every other job to its end and completes it, and from then on the device does not touch the queue
  until the next ``process_queue(index)``: a late timer or fd callback that calls
  ``resume`` does nothing, and a worker completion that arrives after it is dropped
  (a generation counter per queue), so a ring the front-end took back is never
  written.  GET_VRING_BASE then reports the returned chains as not consumed.

Errors (issue 12, "host-fault policy"; the classes are in
:mod:`virtio_devices.errors`), per chain:

* the guest's fault (``QueueError`` other than ``InvalidAvailRingIndex``,
  ``GuestMemoryError``, ``MalformedRequest``): ``guest_fault`` (default: a
  rate-limited warning, used length 0) and the queue goes on;
* the host's fault (``HostFault``, ``OSError``): ``host_fault`` (default: a
  rate-limited error line, used length 0; a device with a status byte answers
  IO_ERR, CHECK CONDITION...) and the queue goes on;
* a broken avail ring (``InvalidAvailRingIndex``): the queue is stopped and the error
  raised to the transport, which stops that ring;
* anything else is a device bug: the device marks itself broken and raises
  ``DeviceNeedsReset`` (chained from the bug) to the transport, which resets it;
  until ``reset()`` every kick raises it again.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar, Final, Protocol

from virtio_queue import ByteSource, DescriptorChain, GuestMemory, Queue
from virtio_queue.errors import GuestMemoryError, InvalidAvailRingIndex, InvalidDescriptorIndex, QueueError
from virtio_queue.ratelimit import RateLimiter

from .errors import DeviceNeedsReset, HostFault, MalformedRequest

if TYPE_CHECKING:
    from ._pump import FdPump, RingWorker
    from .workers import DeviceJobs, WorkerPool

__all__ = [
    "COMMON_FEATURES",
    "PARK",
    "VIRTIO_F_ACCESS_PLATFORM",
    "VIRTIO_F_ANY_LAYOUT",
    "VIRTIO_F_NOTIFY_ON_EMPTY",
    "VIRTIO_F_RING_PACKED",
    "VIRTIO_F_VERSION_1",
    "VIRTIO_RING_F_EVENT_IDX",
    "VIRTIO_RING_F_INDIRECT_DESC",
    "EventLoop",
    "Interrupt",
    "Park",
    "TimerHandle",
    "VirtioDevice",
]

log = logging.getLogger(__name__)

# Reserved feature bits, VIRTIO 1.2 §6.
VIRTIO_F_NOTIFY_ON_EMPTY = 1 << 24
VIRTIO_F_ANY_LAYOUT = 1 << 27
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VIRTIO_RING_F_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_F_ACCESS_PLATFORM = 1 << 33
VIRTIO_F_RING_PACKED = 1 << 34

#: What nearly every upstream daemon offers (shared/reference/upstream-devices.md §0).
COMMON_FEATURES = (
    VIRTIO_F_VERSION_1 | VIRTIO_F_NOTIFY_ON_EMPTY | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX
)


class Park(enum.Enum):
    """The type of :data:`PARK` (an enum so that type checkers narrow on ``is``)."""

    PARK = "park"


#: Returned by ``handle_chain``: stop draining this queue and hold the chain until
#: the device calls :meth:`VirtioDevice.resume`.
PARK: Final = Park.PARK

# What the guest did wrong: the chain goes back, the queue goes on.
_GUEST_FAULTS = (QueueError, GuestMemoryError, MalformedRequest)
# What the host did wrong: the device's error status, the queue goes on.
_HOST_FAULTS = (HostFault, OSError)


class Interrupt(Protocol):
    """The transport's way to notify the driver (vhost-user: the call eventfds).

    A transport may also offer ``signaller(queue_index) -> Callable[[], None]``, that
    queue's ``signal_used`` as a callable of no argument (vhost-user: the ring's
    compiled one), for a compiled device path to call without a Python frame;
    devices look it up with ``getattr`` and fall back to :meth:`signal_used`.
    """

    def signal_used(self, queue_index: int) -> None:
        """Used buffers were added to queue ``queue_index`` and the driver wants to know."""

    def signal_config_change(self) -> None:
        """The device's config space changed (VIRTIO 1.2 §2.5.2)."""


class TimerHandle(Protocol):
    """A pending :meth:`EventLoop.call_later` callback."""

    def cancel(self) -> None:
        """Cancel the callback; cancelling twice or after it ran is harmless."""


class EventLoop(Protocol):
    """The transport's event loop, as a device sees it (single-threaded callbacks)."""

    def add_reader(self, fd: int, callback: Callable[[], None], pump: FdPump | None = None) -> None:
        """Call ``callback()`` whenever ``fd`` is readable, until :meth:`remove_reader`.

        ``pump``: a compiled server of the fd (:class:`virtio_devices._pump.FdPump`);
        a loop that knows pumps runs it without a Python frame and calls
        ``callback`` only when it asks, any other loop calls ``callback`` alone
        (which runs the pump first).
        """

    def remove_reader(self, fd: int) -> None:
        """Stop watching ``fd``; unknown fds are ignored."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Call ``callback()`` once, ``delay`` seconds from now (monotonic clock)."""

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` soon on the loop thread; the one call any thread may make.

        Callbacks run in the order they were posted, each once, after the events
        the loop is dispatching when it is woken; a loop that is closed drops them.
        """


class VirtioDevice:
    """Base class of every device: identity, features, config space, queues, the drain loop.

    Subclasses set :attr:`device_id`, :attr:`name`, :attr:`queue_sizes`, and
    implement :meth:`handle_chain` (and the hooks they need: :meth:`admit`,
    :meth:`retry_chain`, :meth:`guest_fault`, :meth:`host_fault`), or override
    :meth:`process_queue` altogether.
    """

    #: VIRTIO device id (VIRTIO 1.2 §5), 0 for the template device that has none.
    device_id: ClassVar[int] = 0
    #: Short name used in logs and in ``vhost-device-<name>``.
    name: ClassVar[str] = "virtio"
    #: Maximum size of each virtqueue, in queue index order.
    queue_sizes: tuple[int, ...] = ()
    #: Device feature bits offered (VIRTIO 1.2 §2.2), transport bits included.
    features: int = COMMON_FEATURES
    #: Whether the device has a config space (vhost-user: offer the CONFIG protocol feature).
    has_config: ClassVar[bool] = False
    #: The pool :meth:`run_in_worker` uses; None: the process-wide default pool.
    worker_pool: WorkerPool | None = None

    def __init__(self) -> None:
        self.acked_features = 0
        self.memory: GuestMemory | None = None
        self.queues: Sequence[Queue] = ()
        self.interrupt: Interrupt | None = None
        self.loop: EventLoop | None = None
        self.active = False
        #: The bug that broke the device (it refuses work until :meth:`reset`), or None.
        self.broken: BaseException | None = None
        # What the Python paths completed (chains_served adds the compiled paths' own).
        self._chains_py = 0
        self._bytes_py = 0
        self._ratelimit = RateLimiter()
        # Per queue: the parked chain, and whether the transport took the queue back.
        self._parked: list[DescriptorChain | None] = []
        self._quiesced: list[bool] = []
        self._jobs: DeviceJobs | None = None
        # Only a device that overrides admit pays for asking it (pending() per chain).
        self._admits = type(self).admit is not VirtioDevice.admit

    # -- identity and features ---------------------------------------------------
    @property
    def num_queues(self) -> int:
        """Number of virtqueues this device has."""
        return len(self.queue_sizes)

    def device_features(self) -> int:
        """Feature bits the device offers (VIRTIO 1.2 §2.2)."""
        return self.features

    def ack_features(self, features: int) -> None:
        """Record the features the driver accepted; bits we never offered are dropped."""
        self.acked_features = features & self.device_features()

    def has_feature(self, bit_mask: int) -> bool:
        """Whether the driver acknowledged every bit of ``bit_mask``."""
        return self.acked_features & bit_mask == bit_mask

    # -- config space ------------------------------------------------------------
    def config_space(self) -> bytes:
        """The whole config space as the driver sees it now (empty: none)."""
        return b""

    def read_config(self, offset: int, size: int) -> bytes:
        """Read ``size`` bytes at ``offset`` of the config space.

        Out-of-range reads return the bytes that exist (possibly none); a transport
        that must answer a fixed size pads.  Subclasses with live fields override
        :meth:`config_space`, not this.
        """
        if offset < 0 or size < 0:
            return b""
        return self.config_space()[offset : offset + size]

    def write_config(self, offset: int, data: bytes) -> None:
        """Driver write to the config space; read-only by default (writes ignored)."""
        log.debug("%s: ignoring config write of %d bytes at %d", self.name, len(data), offset)

    # -- lifecycle ---------------------------------------------------------------
    def activate(
        self,
        memory: GuestMemory,
        queues: Sequence[Queue],
        interrupt: Interrupt,
        loop: EventLoop,
    ) -> None:
        """Start the device: the driver set DRIVER_OK (or vhost-user started the rings).

        Raises:
            ValueError: ``queues`` does not match :attr:`queue_sizes`.
        """
        if len(queues) != self.num_queues:
            raise ValueError(f"{self.name}: {len(queues)} queues given, device has {self.num_queues}")
        self.memory, self.queues, self.interrupt, self.loop = memory, queues, interrupt, loop
        self._parked = [None] * len(queues)
        self._quiesced = [False] * len(queues)
        self.active = True

    def reset(self) -> None:
        """Return to the initial state: quiesce every queue, forget queues and memory.

        Subclasses cancel their own host work (timers, fd watches) and then call
        this.  A broken device is usable again afterwards.

        Raises:
            Exception: the first error a queue's :meth:`quiesce` raised (a used ring
                outside memory...); the device is reset all the same.
        """
        failed: Exception | None = None
        for index in range(len(self._parked)):
            try:
                self.quiesce(index)
            except Exception as e:  # still forget everything; the caller hears of it
                failed = failed or e
        self.active = False
        self.broken = None
        self.acked_features = 0
        self.memory, self.queues, self.interrupt, self.loop = None, (), None, None
        self._parked, self._quiesced = [], []
        if failed is not None:
            raise failed

    def quiesce(self, index: int) -> None:
        """Give queue ``index`` back: nothing the device holds may touch it afterwards.

        Called by the transport on the loop thread before it takes the queue back
        (vhost-user GET_VRING_BASE, a ring stopped, a memory table that removes
        regions, RESET_DEVICE, a disconnect) and by :meth:`reset`.  The parked chain
        is given back (:meth:`Queue.unpop`): nothing is popped while one is parked,
        so it is the last chain popped, and the next pop returns it (from the avail
        ring, ``next_avail`` steps back over it; resubmitted after a reconnect, it
        goes first in the resubmit list).  Worker jobs of
        the queue not yet started whose chains were the last ones popped are
        cancelled and their chains given back the same way; every other job is
        waited for and completed (add_used and one notification): a request is
        never returned undone.  Until the next :meth:`process_queue` of this queue,
        :meth:`resume` does nothing and late completions are dropped.  Idempotent,
        cheap when nothing is pending; a no-op on an inactive device.  Chains the
        device keeps itself (``handle_chain`` returned None without
        :meth:`run_in_worker`) are its own: it overrides this to complete them
        (``complete``) before calling ``super().quiesce(index)``.
        """
        if index >= len(self._parked):
            return
        queue = self.queues[index]
        chain = self._parked[index]
        if chain is not None:
            self._parked[index] = None
            queue.unpop(chain.head_index)
        if self._jobs is not None:
            self._jobs.quiesce(index)
        self._quiesced[index] = True

    # -- work ----------------------------------------------------------------------
    def process_queue(self, index: int) -> None:
        """The driver kicked queue ``index``: drain it (:meth:`process_chains`).

        The transport calls it only for queues that exist.  Override it only for a
        device whose queue is not a stream of independent requests.

        Raises:
            InvalidAvailRingIndex: the avail ring is broken; the queue is stopped.
            DeviceNeedsReset: the device is broken (see the module docstring).
        """
        self.process_chains(index)

    def kick_pump(self, index: int) -> FdPump | None:
        """A compiled server of queue ``index``'s kicks, asked when the vhost-user
        transport starts the ring (the device is active then).

        When it returns a :class:`~virtio_devices._pump.FdPump`, the transport runs
        its ``pump_c`` on every kick (and poll hit) of the ring, without a Python
        frame, and calls :meth:`process_queue` only when it answers 1; what it
        raises is handled as what :meth:`process_queue` raises.  It must leave the
        ring as :meth:`process_queue` would, or answer 1 with what it did not do
        left for it.  Other transports call :meth:`process_queue` alone.  None
        (the default): every kick goes to :meth:`process_queue`."""
        return None

    def ring_worker(self, index: int) -> RingWorker | None:
        """A compiled server of queue ``index`` on a thread of its own, asked when
        the vhost-user transport starts the ring (the device is active then).

        When it returns a :class:`~virtio_devices._pump.RingWorker`, the transport
        does not watch the ring's kick fd: the worker waits for the kicks on its
        thread and serves each there (``serve_c``), as :meth:`process_queue` would,
        releasing the GIL around what blocks; the transport stops it (waiting for a
        service under way) before :meth:`quiesce` and wakes it where it would call
        :meth:`process_queue` without a kick; what ``serve_c`` raises is handled on
        the loop thread as what :meth:`process_queue` raises.  For a device whose
        requests block on the host (a bus transfer) and are cheap to parse: each
        kick is served without a hop through the event loop.  Other transports
        call :meth:`process_queue` alone.  None (the default): the event loop
        serves the kicks."""
        return None

    def fill_source(self, index: int) -> ByteSource | None:
        """A host source whose bytes are all that a request of queue ``index`` needs, now.

        When it returns a :class:`~virtio_queue.ByteSource` (an fd to read, or
        bytes made another way), whoever runs the queue may serve every request
        that is one device-writable buffer by filling it from the source and
        completing it with the bytes it got (``Queue.fill_from``), without calling
        :meth:`handle_chain`, which still gets every request that path cannot
        finish (another shape of request, a read that gave nothing).  The drain
        loop asks once per pass and uses it; the vhost-user transport asks when the
        ring starts (None then: never for this ring) and on every kick, and serves
        such a queue in compiled code.  None (the default): every request goes
        through :meth:`handle_chain`."""
        return None

    def admit(self, index: int) -> bool:
        """Whether the drain loop may pop the next chain of queue ``index`` now.

        Asked only while a chain is available, before each pop.  False stops the
        drain: the chains stay in the avail ring (a vhost-user GET_VRING_BASE sees
        them as not consumed) and notifications stay disabled; the device arms
        whatever tells it that it can go on (a timer, an fd reader) and calls
        :meth:`resume` then.  Kicks meanwhile ask again.  Default: always True.
        """
        return True

    def handle_chain(self, index: int, chain: DescriptorChain) -> int | Park | None:
        """Serve one chain of queue ``index``.

        Returns the used length (the chain is completed now), None (the device
        keeps the chain and completes it later with :meth:`complete`, or gave it to
        :meth:`run_in_worker`), or :data:`PARK` (stop draining; the chain is held
        until :meth:`resume`, which hands it to :meth:`retry_chain`).

        Raises:
            MalformedRequest, QueueError, GuestMemoryError: the guest's fault
                (:meth:`guest_fault` answers).
            HostFault, OSError: the host's fault (:meth:`host_fault` answers).
        """
        raise NotImplementedError(f"{type(self).__name__} must override handle_chain or process_queue")

    def retry_chain(self, index: int, chain: DescriptorChain) -> int | Park | None:
        """Serve the parked chain again after :meth:`resume` (default: :meth:`handle_chain`).

        Override it when a retry means something else (rng: a second empty read is
        an end of file).  Same results and errors as :meth:`handle_chain`.
        """
        return self.handle_chain(index, chain)

    def guest_fault(self, index: int, chain: DescriptorChain, err: Exception) -> int:
        """The guest's chain was wrong: return its used length (default: log, 0).

        A device whose requests have a status byte writes its error status into the
        chain here and returns the bytes written.  VIRTIO 1.2 §2.7.8 lets a device
        return a buffer it did not write to with used length 0.
        """
        self._log_guest_fault(index, err)
        return 0

    def host_fault(self, index: int, chain: DescriptorChain, err: Exception) -> int:
        """The host failed the guest's request: return its used length (default: log, 0).

        A device answers with its error status here (virtio-blk/scsi IO_ERR, CHECK
        CONDITION, virtio-i2c VIRTIO_I2C_MSG_ERR) and returns the bytes written.
        The log is rate-limited: a failing disk must not flood the journal.
        """
        self._ratelimit.log(
            log, logging.ERROR, ("host", index), "%s q%d: host fault: %s", self.name, index, err
        )
        return 0

    def process_chains(self, index: int, limit: int | None = None) -> int:
        """Pop and serve available chains of queue ``index`` with :meth:`handle_chain`.

        Follows the notification-suppression protocol of VIRTIO 1.2 §2.7.10: disable
        notifications while draining, re-enable, and drain again if more chains
        arrived meanwhile.  One interrupt at most per call, and only if
        ``needs_notification()`` says the driver wants one (EVENT_IDX honoured).
        ``limit`` stops after that many chains; notifications then stay disabled.
        :meth:`admit` is asked before each pop; a chain returned by
        :meth:`fill_source`'s compiled path skips :meth:`handle_chain`.  While a
        chain is parked, a kick pops nothing (:meth:`resume` goes on).

        Errors per chain follow the module docstring.  Returns the number of chains
        completed.

        Raises:
            InvalidAvailRingIndex: the avail ring is broken; the queue is stopped.
            DeviceNeedsReset: the device is broken.
        """
        if self.broken is not None:
            raise DeviceNeedsReset(f"{self.name}: device is broken ({self.broken!r}) until it is reset")
        try:
            self._quiesced[index] = False  # a kick: the queue is the device's again
        except IndexError:
            log.warning("%s: kick on unknown queue %d ignored", self.name, index)
            return 0
        if self._parked[index] is not None:
            return 0
        return self._drain(index, limit, False)

    def resume(self, index: int) -> None:
        """Go on with queue ``index`` after :meth:`admit` said no or a chain was parked.

        Called by the device from its own callbacks (a timer, an fd reader, a worker
        completion), on the loop thread.  Retries the parked chain with
        :meth:`retry_chain` (parked again if it returns :data:`PARK`), then drains.
        Does nothing when the device is inactive or broken, or the queue was
        quiesced or stopped.

        Raises:
            InvalidAvailRingIndex: the avail ring is broken; the queue is stopped.
            DeviceNeedsReset: the device's retry raised a bug.
        """
        if not self.active or self.broken is not None or self._quiesced[index]:
            return
        queue = self.queues[index]
        if not queue.ready:
            return
        chain = self._parked[index]
        done = False
        if chain is not None:
            self._parked[index] = None
            used = self._call(self.retry_chain, index, chain)
            if used is PARK:
                self._parked[index] = chain
                return
            if used is not None:
                queue.add_used(chain.head_index, used)
                self._chains_py += 1
                self._bytes_py += used
                done = True
        self._drain(index, None, done)

    def _drain(self, index: int, limit: int | None, notify: bool) -> int:
        """The drain loop behind :meth:`process_chains` and :meth:`resume`; ``notify``:
        a chain was completed before, check for a notification even if none is now."""
        queue = self.queues[index]
        source = self.fill_source(index)
        if source is not None and limit is None and not notify:
            # A kick of a queue whose requests the compiled path serves: when it
            # serves them all and leaves the ring empty (notifications on again), the
            # loop below has nothing to add.
            try:
                served, nbytes, chain = queue.fill_from(source, -1, True)
            except InvalidAvailRingIndex:
                queue.ready = False
                raise
            if chain is not None:
                # A request for handle_chain: it is given back (the last chain popped,
                # perhaps a resubmitted one) and the loop below serves it.
                queue.unpop(chain.head_index)
            elif queue.pending() == 0:
                if served:
                    self._chains_py += served
                    self._bytes_py += nbytes
                    self.notify(index)
                return served
            # Otherwise a bad head index is next, which the loop below reports.
            if served:
                self._chains_py += served
                self._bytes_py += nbytes
            return served + self._drain_loop(index, None, served > 0, source)
        return self._drain_loop(index, limit, notify, source)

    def _drain_loop(self, index: int, limit: int | None, notify: bool, source: ByteSource | None) -> int:
        """The general drain loop: every chain through :meth:`handle_chain` under the
        error policy, the compiled fill path first when there is a ``source``."""
        queue = self.queues[index]
        # Bound once: the per-chain path is a handful of calls.
        handle = self.handle_chain
        pop = queue.pop_chain
        add_used = queue.add_used
        # What comes before each pop: nothing (most devices), the device's admit,
        # or the compiled fill path.  One test per chain for the plain case.
        gate = source is not None or self._admits
        park = PARK
        served = nbytes = 0
        chain: DescriptorChain | None
        try:
            while True:
                queue.disable_notification()
                stopped = False
                try:
                    while limit is None or served < limit:
                        if gate:
                            if source is not None:
                                # The compiled path fills well-formed requests straight
                                # from the source, suppressing notifications itself; what
                                # it does not serve comes back for handle_chain.
                                most = -1 if limit is None else limit - served
                                n, b, chain = queue.fill_from(source, most, True)
                                served += n
                                nbytes += b
                                if chain is None:
                                    if limit is not None and served >= limit:
                                        break
                                    # Empty with notifications on again, or a bad head
                                    # next, which pop_chain reports.
                                    chain = pop()
                                    if chain is None:
                                        return served
                            else:
                                # Only a chain that is there may be refused (and arm a timer).
                                if queue.pending() == 0:
                                    break
                                if not self.admit(index):
                                    stopped = True
                                    break
                                chain = pop()
                        else:
                            chain = pop()
                        if chain is None:
                            break
                        try:
                            used = handle(index, chain)
                        except InvalidAvailRingIndex:
                            raise
                        except _GUEST_FAULTS as e:
                            used = self.guest_fault(index, chain, e)
                        except _HOST_FAULTS as e:
                            used = self.host_fault(index, chain, e)
                        if used is None:
                            continue
                        if used is park:
                            self._parked[index] = chain
                            stopped = True
                            break
                        add_used(chain.head_index, used)
                        served += 1
                        nbytes += used
                except InvalidDescriptorIndex as e:
                    # pop_chain: a head index out of range.  The entry is consumed and
                    # there is no chain to return; go on with the next one.
                    self._log_guest_fault(index, e)
                    continue
                if stopped or (limit is not None and served >= limit):
                    break
                if not queue.enable_notification():
                    break
        except InvalidAvailRingIndex:
            queue.ready = False
            raise
        except (QueueError, GuestMemoryError):
            # The ring itself is unusable (not ready, add_used outside memory...):
            # the transport stops it.
            raise
        except DeviceNeedsReset as e:
            if self.broken is None:
                self.broken = e
            raise
        except Exception as e:
            raise self._break(index, e) from e
        finally:
            if served:
                self._chains_py += served
                self._bytes_py += nbytes
                log.debug("%s q%d: served %d chains, %d bytes", self.name, index, served, nbytes)
            if served or notify:
                self.notify(index)
        return served

    def _call(
        self, fn: Callable[[int, DescriptorChain], int | Park | None], index: int, chain: DescriptorChain
    ) -> int | Park | None:
        """``fn(index, chain)`` under the error policy (the slow paths' copy of the
        drain loop's per-chain ``try``)."""
        try:
            return fn(index, chain)
        except InvalidAvailRingIndex:
            self.queues[index].ready = False
            raise
        except _GUEST_FAULTS as e:
            return self.guest_fault(index, chain, e)
        except _HOST_FAULTS as e:
            return self.host_fault(index, chain, e)
        except DeviceNeedsReset as e:
            if self.broken is None:
                self.broken = e
            raise
        except Exception as e:
            raise self._break(index, e) from e

    def _break(self, index: int, err: BaseException) -> DeviceNeedsReset:
        """Mark the device broken by ``err`` (a bug) and make the error to raise."""
        self.broken = err
        return DeviceNeedsReset(f"{self.name} q{index}: device bug: {type(err).__name__}: {err}")

    def parked(self, index: int) -> DescriptorChain | None:
        """The chain parked on queue ``index`` (waiting for :meth:`resume`), or None."""
        return self._parked[index] if index < len(self._parked) else None

    def run_in_worker(self, index: int, chain: DescriptorChain, job: Callable[[], int]) -> None:
        """Run ``job()`` on a worker thread; its result completes ``chain`` on the loop.

        Call it from :meth:`handle_chain` for the chain being handled, and return
        None.  ``job`` runs host I/O off the loop (it may read and write the chain's
        buffers, nothing else of the device) and returns the used length; what it
        raises goes through the error policy like an exception of
        :meth:`handle_chain`.  Completions are applied on the loop thread in
        batches, with one notification per queue per batch.  The pool is
        :attr:`worker_pool`, else :func:`virtio_devices.workers.default_pool`.
        """
        if self._jobs is None:
            from .workers import DeviceJobs, default_pool  # noqa: PLC0415 - only devices that use it

            self._jobs = DeviceJobs(self, self.worker_pool or default_pool())
        self._jobs.submit(index, chain, job)

    def wait_completions(self, index: int, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the device's own asynchronous work of queue
        ``index`` (not :meth:`run_in_worker` jobs) and complete what finished.

        For a device that completes chains from an event source of its own (an
        io_uring's eventfd): an in-process transport without a running loop (the
        test kit's :class:`~virtio_devices.testing.MmioDeviceDriver`) calls it
        where the loop would call the device's reader.  Returns False when nothing
        of the queue is in flight (the default: such work does not exist)."""
        return False

    # -- what was served ---------------------------------------------------------------
    @property
    def chains_served(self) -> int:
        """Chains completed since the device was made: those the Python paths
        completed and those compiled paths counted on their own (:meth:`compiled_served`)."""
        return self._chains_py + self.compiled_served()[0]

    @chains_served.setter
    def chains_served(self, value: int) -> None:
        self._chains_py = value - self.compiled_served()[0]

    @property
    def bytes_served(self) -> int:
        """The used lengths the completed chains reported (as :attr:`chains_served`)."""
        return self._bytes_py + self.compiled_served()[1]

    @bytes_served.setter
    def bytes_served(self, value: int) -> None:
        self._bytes_py = value - self.compiled_served()[1]

    def compiled_served(self) -> tuple[int, int]:
        """Chains and used bytes that compiled paths (a kick pump, a nogil pump, a ring
        worker, an engine) completed and counted on their own, without a Python frame
        of the device: :attr:`chains_served` and :attr:`bytes_served` add them.  A
        device with such a path overrides this; the base has none."""
        return 0, 0

    def complete(self, index: int, head_index: int, used_len: int, notify: bool = True) -> None:
        """Return a chain that :meth:`handle_chain` kept (returned None for)."""
        self.queues[index].add_used(head_index, used_len)
        self._chains_py += 1
        self._bytes_py += used_len
        if notify:
            self.notify(index)

    def notify(self, index: int) -> None:
        """Signal the driver for queue ``index`` if it asked for it (EVENT_IDX aware)."""
        if self.interrupt is not None and self.queues[index].needs_notification():
            self.interrupt.signal_used(index)

    def _log_guest_fault(self, index: int, err: Exception) -> None:
        self._ratelimit.log(log, logging.WARNING, index, "%s q%d: dropped chain: %s", self.name, index, err)
