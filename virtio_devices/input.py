"""virtio-input (VIRTIO 1.2 §5.8), as vhost-device-input serves it, over an :class:`InputHost`.

Behaviour follows rust-vmm/vhost-device ``vhost-device-input/src/vhu_input.rs``:
device id 18, two queues (eventq 0, statusq 1; max size 1024), features
VERSION_1, INDIRECT_DESC, EVENT_IDX and no NOTIFY_ON_EMPTY; a config space of
``{select u8, subsel u8, size u8, reserved[5], union[128]}`` (§5.8.4) whose
``select``/``subsel`` the driver writes and whose other fields the device computes
from the host device; host events delivered as 8-byte ``struct
virtio_input_event`` (``type le16, code le16, value le32``), one per eventq buffer.

Where we differ from upstream, on purpose (README, "Differences"):

* every config select is answered (§5.8.4): ``ID_NAME`` (size = the name's length,
  upstream always 128), ``ID_SERIAL`` (``EVIOCGUNIQ``), ``ID_DEVIDS`` with ``size``
  8, the size of ``struct virtio_input_devids`` (upstream reports 128; Linux only
  checks ``size >= 8``), ``PROP_BITS`` (``EVIOCGPROP``), ``EV_BITS`` for every event
  type the device has (upstream: KEY, REL, ABS, MSC, SW only, so a guest never sees
  LEDs, sound or repeat) and ``ABS_INFO`` per axis (upstream: zeros, which leaves
  tablets and touchscreens with a 0..0 range in the guest).  Unsupported
  combinations answer ``size`` 0 and a zero union, as §5.8.5.2 requires;
* events are delivered a whole group at a time, a group being the events up to and
  including ``EV_SYN``/``SYN_REPORT`` (§5.8.6.2: the device SHOULD NOT drop
  individual events of one update; it buffers or drops the whole sequence).  A
  group waits until the driver has posted a buffer for each of its events (a group
  longer than the whole ring could never fit: it goes in parts, in order).
  Meanwhile groups are held in a bounded queue (``max_pending`` events); when a
  group does not fit, the held groups are dropped and replaced by one
  ``EV_SYN``/``SYN_DROPPED`` event, as the kernel's evdev does when a reader's
  buffer overflows.  Upstream drops whatever it holds without a word;
* events flow with and without EVENT_IDX (upstream reads and discards every event
  unless EVENT_IDX was negotiated);
* statusq events (``EV_LED``, ``EV_SND``, ``EV_REP``) go back to the host device
  when it has that code (upstream ignores the statusq);
* the host device may be grabbed (``EVIOCGRAB``) while a driver uses the device
  (``grab=True``; the CLI's ``VHD_INPUT_GRAB=1``), off by default as upstream;
* a host device that goes away (unplugged) is logged once; the device stays up,
  answers its config space and completes statusq buffers, and delivers no more
  events.

Buffers of the eventq are popped when the driver kicks, or when events need them
(the kick may not come: see below), and kept, in the order popped, until an event
fills them; :meth:`quiesce` gives the kept ones back to the avail ring (they are
always the last ones popped).  Kicks are asked for (VIRTIO 1.2 §2.7.10) only while
groups are held for want of buffers: otherwise the next events pop what the driver
posted, as upstream does, and a wake-up per kick is saved.

The common case runs in compiled code (:mod:`virtio_devices._input_fast`), on the
device's hot state kept in C (:class:`~virtio_devices._input_fast.InputState`):
a kick's good buffers are kept without a Python call each, and when the host's fd
yields ``struct input_event`` records (an evdev node: ``raw_input_events``) and
nothing is held, one call reads them and writes each whole group into the buffers.
What it gives back (held groups, ``SYN_DROPPED``, bad buffers) takes the Python
path below, which answers the same (the unit tests compare the two).
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from collections.abc import Sequence
from typing import Final

from virtio_queue import DescriptorChain, GuestMemory, Queue
from virtio_queue.errors import GuestMemoryError, QueueError

from . import _input_fast
from .base import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    EventLoop,
    Interrupt,
    Park,
    VirtioDevice,
)
from .errors import MalformedRequest
from .hosts.input import (
    EV_ABS,
    EV_LED,
    EV_MAX,
    EV_REP,
    EV_SND,
    EV_SYN,
    SYN_DROPPED,
    SYN_REPORT,
    InputHost,
    InputHostError,
)

__all__ = [
    "CONFIG_SIZE",
    "DEFAULT_MAX_PENDING",
    "EVENT_SIZE",
    "QUEUE_SIZE",
    "VIRTIO_ID_INPUT",
    "VIRTIO_INPUT_CFG_ABS_INFO",
    "VIRTIO_INPUT_CFG_EV_BITS",
    "VIRTIO_INPUT_CFG_ID_DEVIDS",
    "VIRTIO_INPUT_CFG_ID_NAME",
    "VIRTIO_INPUT_CFG_ID_SERIAL",
    "VIRTIO_INPUT_CFG_PROP_BITS",
    "VIRTIO_INPUT_CFG_UNSET",
    "InputDevice",
    "pack_event",
]

log = logging.getLogger(__name__)

#: VIRTIO 1.2 §5: input device.
VIRTIO_ID_INPUT = 18
#: Upstream's ``QUEUE_SIZE`` for both queues.
QUEUE_SIZE = 1024
EVENTQ, STATUSQ = 0, 1

# VIRTIO 1.2 §5.8.4, enum virtio_input_config_select.
VIRTIO_INPUT_CFG_UNSET = 0x00
VIRTIO_INPUT_CFG_ID_NAME = 0x01
VIRTIO_INPUT_CFG_ID_SERIAL = 0x02
VIRTIO_INPUT_CFG_ID_DEVIDS = 0x03
VIRTIO_INPUT_CFG_PROP_BITS = 0x10
VIRTIO_INPUT_CFG_EV_BITS = 0x11
VIRTIO_INPUT_CFG_ABS_INFO = 0x12

#: Bytes of the union ``u`` of ``struct virtio_input_config``.
UNION_SIZE = 128
#: The whole config space: select, subsel, size, reserved[5], then the union.
CONFIG_SIZE = 8 + UNION_SIZE
#: ``struct virtio_input_event``: type le16, code le16, value le32.
EVENT_SIZE = 8
#: Events held for a driver that posts no buffers, by default (one full ring).
DEFAULT_MAX_PENDING = QUEUE_SIZE
#: Status event types the driver may send on the statusq (§5.8.6.1 names LEDs;
#: Linux's virtio_input forwards what its input core passes to the device).
STATUS_TYPES: Final = frozenset((EV_LED, EV_SND, EV_REP))

_EVENT = struct.Struct("<HHi")
_DEVIDS = struct.Struct("<HHHH")
_ABSINFO = struct.Struct("<iiiii")


def pack_event(ev_type: int, code: int, value: int) -> bytes:
    """``struct virtio_input_event`` for one event (value as signed 32-bit)."""
    return _EVENT.pack(ev_type, code, value)


_SYN_DROPPED: Final = (pack_event(EV_SYN, SYN_DROPPED, 0),)


class InputDevice(VirtioDevice):
    """The virtio input device over one host input device (evdev node or simulated).

    Args:
        host: the host device; several devices may share it only one at a time
            (one front-end connection per socket, as the daemon serves them).
        max_pending: events held at most while the driver posts no buffers
            (at least 2: a group and the ``SYN_DROPPED`` marker).
        grab: take exclusive access (``EVIOCGRAB``) while a driver uses the device.
        compiled: keep posted eventq buffers, and deliver events when the host's
            fd yields ``struct input_event`` records (its ``raw_input_events`` is
            true: an evdev node) and nothing is held, in compiled code
            (:mod:`._input_fast`); False leaves both to the Python drain loop and
            delivery (the tests compare the two).

    Raises:
        ValueError: ``max_pending`` below 2.
    """

    device_id = VIRTIO_ID_INPUT
    name = "input"
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)
    # Upstream offers no NOTIFY_ON_EMPTY.
    features = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX
    has_config = True

    def __init__(
        self,
        host: InputHost,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        grab: bool = False,
        compiled: bool = True,
    ) -> None:
        # The hot state, in C, shared with the compiled servers (made first: the
        # base class sets the attributes that are its properties).  It holds:
        # ``partial``, the events read since the last SYN_REPORT (a group being
        # built); ``skip_to_report``, after a host SYN_DROPPED, evdev's rule (ignore
        # events up to the next SYN_REPORT); ``groups``, the complete groups waiting
        # for buffers, oldest first; the eventq chains popped and kept until an
        # event fills them, in pop order (a malformed one is kept behind good ones,
        # so that the kept chains stay the last ones popped); ``unnotified``,
        # buffers used since the last notification (one per batch); the counters.
        self._st = _input_fast.InputState(
            max_pending,
            records=compiled and bool(getattr(host, "raw_input_events", False)),
            compiled_keep=compiled,
        )
        self._broken: BaseException | None = None
        super().__init__()
        self.host = host
        self.max_pending = max_pending
        self.grab = grab
        self._select = 0
        self._subsel = 0
        self._config_cache: dict[tuple[int, int], bytes] = {}
        self._groups: deque[Sequence[bytes]] = self._st.groups
        # Events the held groups hold.
        self._held = 0
        # Events of the head group already delivered (a group longer than the ring).
        self._pos = 0
        self._watching = -1
        # The host fd's compiled server while watched (the vhost-user loop runs it
        # without a Python frame; elsewhere _on_host_readable does).
        self._pump: _input_fast.InputPump | None = None
        self._grabbed = False
        #: Groups dropped for want of buffers (each reported by a SYN_DROPPED).
        self.dropped_groups = 0

    # -- state kept in C (the base class's attributes too) ----------------------------------
    @property
    def events_delivered(self) -> int:
        """Events delivered into eventq buffers."""
        return self._st.delivered

    @property
    def events_compiled(self) -> int:
        """Events the compiled path delivered (a part of :attr:`events_delivered`)."""
        return self._st.compiled

    @property
    def host_gone(self) -> bool:
        """Whether the host device went away (unplugged)."""
        return self._st.host_gone

    @property
    def active(self) -> bool:
        return self._st.active

    @active.setter
    def active(self, value: bool) -> None:
        self._st.active = value

    @property
    def broken(self) -> BaseException | None:
        return self._broken

    @broken.setter
    def broken(self, value: BaseException | None) -> None:
        self._broken = value
        self._st.broken = value is not None

    def compiled_served(self) -> tuple[int, int]:
        """The compiled event path and kick pump count in the state."""
        return self._st.chains, self._st.nbytes

    # -- config space (VIRTIO 1.2 §5.8.4) ------------------------------------------------
    def config_space(self) -> bytes:
        """``struct virtio_input_config`` for the current ``select``/``subsel``.

        ``size`` is the number of valid bytes of the union; an unsupported
        combination (an unknown select, an event type or axis the device lacks,
        ``VIRTIO_INPUT_CFG_UNSET``) has ``size`` 0 and a zero union (§5.8.5.2: the
        device MUST set size to zero if it does not support a select/subsel).
        """
        key = (self._select, self._subsel)
        union = self._config_cache.get(key)
        if union is None:
            union = self._union(*key)[:UNION_SIZE]
            self._config_cache[key] = union
        return bytes((self._select, self._subsel, len(union))) + bytes(5) + union.ljust(UNION_SIZE, b"\0")

    def _union(self, select: int, subsel: int) -> bytes:
        """The valid bytes of the union for ``select``/``subsel`` (empty: unsupported)."""
        host = self.host
        if select == VIRTIO_INPUT_CFG_ID_NAME and subsel == 0:
            return host.device_name()
        if select == VIRTIO_INPUT_CFG_ID_SERIAL and subsel == 0:
            return host.serial()
        if select == VIRTIO_INPUT_CFG_ID_DEVIDS and subsel == 0:
            return _DEVIDS.pack(*host.ids())
        if select == VIRTIO_INPUT_CFG_PROP_BITS and subsel == 0:
            return host.properties().rstrip(b"\0")
        if select == VIRTIO_INPUT_CFG_EV_BITS and subsel <= EV_MAX:
            return host.event_bits(subsel).rstrip(b"\0")
        if select == VIRTIO_INPUT_CFG_ABS_INFO and _has_code(host.event_bits(EV_ABS), subsel):
            info = host.abs_info(subsel)
            if info is not None:
                return _ABSINFO.pack(info.min, info.max, info.fuzz, info.flat, info.res)
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """Take the driver's ``select`` (offset 0) and ``subsel`` (offset 1).

        The driver writes only those two fields (§5.8.4, §5.8.5.1); a write that
        covers other offsets changes nothing there, as upstream.
        """
        for i, byte in enumerate(data):
            if offset + i == 0:
                self._select = byte
            elif offset + i == 1:
                self._subsel = byte

    # -- lifecycle ------------------------------------------------------------------------
    def activate(
        self, memory: GuestMemory, queues: Sequence[Queue], interrupt: Interrupt, loop: EventLoop
    ) -> None:
        """Start: drop what the host queued while no driver was there, watch the
        host's fd, and grab the device if asked."""
        super().activate(memory, queues, interrupt, loop)
        st = self._st
        st.bind(queues[EVENTQ], interrupt)
        st.quiesced = False
        self._discard_stale()
        if not self.host_gone:
            self._watching = st.fd = self.host.fileno()
            self._pump = _input_fast.InputPump(st)
            loop.add_reader(self._watching, self._on_host_readable, pump=self._pump)
        if self.grab and not self.host_gone:
            try:
                self.host.grab(True)
                self._grabbed = True
            except InputHostError as e:
                log.error("%s: %s", self.name, e)

    def reset(self) -> None:
        """Stop watching and release the host device; drop held events."""
        self._unwatch()
        if self._grabbed:
            self._grabbed = False
            try:
                self.host.grab(False)
            except InputHostError as e:
                log.warning("%s: %s", self.name, e)
        super().reset()
        st = self._st
        st.unbind()
        self._groups.clear()
        self._held = self._pos = 0
        st.unnotified = False
        st.partial.clear()
        st.skip_to_report = False

    def quiesce(self, index: int) -> None:
        """Give the kept eventq buffers back (:meth:`Queue.unpop_many`: they are the
        last ones popped, in order) and ask for the driver's next kick (which gives
        the queue back), then the framework's quiesce."""
        if index == EVENTQ and index < len(self.queues):
            queue = self.queues[index]
            if self._st.kept:
                # Oldest first: given back the newest first, the next pops return
                # them in order (resubmitted ones too, which next_avail does not count).
                queue.unpop_many(self._st.forget())
            # The queue is the device's again at its next kick: ask for one (kicks
            # may have been suppressed while nothing was held).
            try:
                if queue.ready:
                    queue.enable_notification()
            except (QueueError, GuestMemoryError) as e:
                self._log_guest_fault(EVENTQ, e)
        super().quiesce(index)
        if index == EVENTQ:
            self._st.quiesced = True

    def _discard_stale(self) -> None:
        try:
            self.host.read_events()
        except InputHostError as e:
            self._lost(e)

    def _unwatch(self) -> None:
        if self._watching >= 0 and self.loop is not None:
            self.loop.remove_reader(self._watching)
        self._watching = self._st.fd = -1
        # Events the pump read and left for the Python path go with the reset.
        self._st.rest.clear()
        self._pump = None

    def _lost(self, err: InputHostError) -> None:
        """The host device is gone: say so once, stop watching it, stay up."""
        if not self.host_gone:
            log.error("%s: host device %s is gone, no more events: %s", self.name, self.host.name, err)
        self._st.host_gone = True
        self._unwatch()

    # -- events: host -> eventq ------------------------------------------------------------
    def _on_host_readable(self) -> None:
        """Loop callback: the host has events; the compiled pump serves them when it
        knows the state (the vhost-user loop ran it already), else group them and
        deliver what fits."""
        pump = self._pump
        if pump is not None and not pump.pump():
            return
        self._pull_and_deliver()

    def _pull_and_deliver(self) -> None:
        """The compiled path when it knows the state (nothing held, every kept
        buffer good, the eventq running), else the Python path; first the events
        the pump read and left to Python (they come before any read now)."""
        st = self._st
        if st.rest:
            rest, st.rest = st.rest, []
            self._group(rest)
        if st.fast():
            try:
                _delivered, rest = st.deliver_records()
            except OSError as e:
                self._lost(InputHostError(f"{self.host.name}: reading events failed: {e.strerror}"))
                return
            if rest:
                self._group(rest)
            self._deliver()
            return
        self._pull()
        self._deliver()

    def _pull(self) -> None:
        """Read the host's events into groups (bounded, §5.8.6.2)."""
        if self.host_gone:
            return
        try:
            events = self.host.read_events()
        except InputHostError as e:
            self._lost(e)
            return
        self._group(events)

    def _group(self, events: Sequence[tuple[int, int, int]]) -> None:
        """Add host events to the group being built; hold each complete group."""
        st = self._st
        partial = st.partial
        for ev_type, code, value in events:
            if ev_type == EV_SYN and code == SYN_DROPPED:
                # The host's own buffer overflowed: its partial group is incomplete.
                partial.clear()
                st.skip_to_report = True
                self._drop_held()
                continue
            if st.skip_to_report:
                if ev_type == EV_SYN and code == SYN_REPORT:
                    st.skip_to_report = False
                continue
            partial.append(pack_event(ev_type, code, value))
            if ev_type == EV_SYN and code == SYN_REPORT:
                self._enqueue(partial)
                partial = st.partial = []
                # Deliver each group as soon as it is whole, before the next one is
                # held: only groups the buffers cannot take count against max_pending.
                self._deliver(notify=False)
            elif len(partial) >= self.max_pending:
                # A host that never ends its group: the group cannot be delivered whole.
                partial.clear()
                st.skip_to_report = True
                self._drop_held()

    def _enqueue(self, group: list[bytes]) -> None:
        """Hold a complete group; if it does not fit, drop the held ones for a
        ``SYN_DROPPED`` (and this group too when it alone is too long)."""
        if self._held + len(group) > self.max_pending:
            self._drop_held()
            if self._held + len(group) > self.max_pending:
                self.dropped_groups += 1
                return
        self._groups.append(group)
        self._held += len(group)

    def _drop_held(self) -> None:
        """Replace the held groups by one ``SYN_DROPPED`` event, as evdev does."""
        groups = self._groups
        if self._pos:
            # The head group (longer than the ring) is partly delivered: what the
            # guest has of it is ended by the marker, not left dangling.
            head = groups[0]
            lost = len(groups)
            groups.clear()
            groups.append([*head[: self._pos], *_SYN_DROPPED])
        else:
            lost = sum(1 for g in groups if g is not _SYN_DROPPED)
            groups.clear()
            groups.append(_SYN_DROPPED)
        self._held = len(groups[0])
        self.dropped_groups += lost
        self._ratelimit.log(
            log,
            logging.WARNING,
            ("drop", EVENTQ),
            "%s: eventq has too few buffers: %d held event group(s) dropped, SYN_DROPPED queued",
            self.name,
            lost,
        )

    def _deliver(self, *, notify: bool = True) -> None:
        """Write held groups into eventq buffers: a group only when a buffer waits
        for each of its events (a group longer than the ring goes in parts), then
        (``notify``) one notification for all delivered since the last one."""
        if self._groups and self._can_deliver():
            self._deliver_held()
        st = self._st
        if notify and st.unnotified:
            st.unnotified = False
            self.notify(EVENTQ)

    def _take_posted(self) -> None:
        """Pop the buffers the driver posted since the last kick (kicks are asked
        for only while groups are held), as a kick does."""
        try:
            if self._st.compiled_keep and self._st.keep():
                return
            self.process_chains(EVENTQ)
        except (QueueError, GuestMemoryError) as e:
            # The avail ring is broken: the next kick meets it and stops the ring.
            self._log_guest_fault(EVENTQ, e)

    def _deliver_held(self) -> None:
        queue = self.queues[EVENTQ]
        st = self._st
        events = completed = 0
        try:
            while self._groups:
                group = self._groups[0]
                left = len(group) - self._pos
                if left > st.good:
                    self._take_posted()
                if left > st.good and (len(group) <= queue.size or not st.good):
                    break  # wait for buffers: never half a group (§5.8.6.2)
                while left and st.good:
                    head, ok = st.take_head()
                    completed += 1
                    if not ok:
                        queue.add_used(head, 0)
                        continue
                    try:
                        used = st.write_event(head, group[self._pos])
                    except (QueueError, GuestMemoryError) as e:
                        self._log_guest_fault(EVENTQ, e)
                        used = 0
                    queue.add_used(head, used)
                    events += 1
                    self._pos += 1
                    left -= 1
                if left == 0:
                    self._groups.popleft()
                    self._held -= len(group)
                    self._pos = 0
            # Malformed buffers now at the head: no good buffer waits before them.
            while st.kept and not st.first_ok():
                queue.add_used(st.take_head()[0], 0)
                completed += 1
        finally:
            if completed:
                st.delivered += events
                self.chains_served += completed
                self.bytes_served += events * EVENT_SIZE
                st.unnotified = True

    def _can_deliver(self) -> bool:
        """Whether the eventq may be used now (running, not quiesced, ready)."""
        st = self._st
        running = st.active and not st.broken and not st.quiesced
        return running and bool(self.queues) and self.queues[EVENTQ].ready

    # -- queues ---------------------------------------------------------------------------
    def process_queue(self, index: int) -> None:
        """Kick of a queue: the statusq is drained; the eventq's new buffers are
        kept, then the host's events (read now, so that a kick alone delivers what
        is pending) go into them."""
        st = self._st
        if index == EVENTQ:
            st.quiesced = False
        # The device never parks an eventq chain: no parked chain to wait for.
        if index == EVENTQ and st.compiled_keep and st.active and not st.broken and self.queues[EVENTQ].ready:
            # The good buffers in compiled code; unless it left the ring empty (kicks
            # asked for again while groups are held, §2.7.10), the drain loop goes on
            # from the first chain it did not take.
            self._quiesced[EVENTQ] = False
            if not st.keep():
                self.process_chains(index)
        else:
            self.process_chains(index)
        if index == EVENTQ:
            self._pull_and_deliver()

    def kick_pump(self, index: int) -> _input_fast.InputKickPump | None:
        """The eventq's kicks in compiled code (:class:`._input_fast.InputKickPump`:
        the compiled branch of :meth:`process_queue`), unless ``compiled`` is off."""
        if index == EVENTQ and self._st.compiled_keep:
            return _input_fast.InputKickPump(self._st)
        return None

    def handle_chain(self, index: int, chain: DescriptorChain) -> int | Park | None:
        """An eventq buffer is kept for an event; a statusq buffer is sent to the host.

        Raises:
            MalformedRequest: an eventq buffer that is not device-writable or shorter
                than ``struct virtio_input_event`` (§5.8.6.1: the driver MUST post
                device-writable buffers of at least that size), or one more than
                the ring has entries (§2.7.13: a head made available twice); a statusq buffer
                whose readable bytes are not a whole number of events, or none.
            InputHostError: the host refused a status event (a host fault: used 0).
        """
        if index == EVENTQ:
            st = self._st
            if st.kept >= self.queues[EVENTQ].size:
                # Only a driver that made a head available twice gets here.
                raise MalformedRequest(
                    f"eventq buffer {chain.head_index} is one more than the {st.kept} "
                    "ring entries the device keeps already (a head made available twice)"
                )
            # One device-writable area of at least one event (compiled: it is per event).
            ok = _input_fast.event_buffer_ok(chain)
            if not ok and not st.kept:
                raise MalformedRequest(
                    f"eventq buffer must be one device-writable area of at least {EVENT_SIZE} bytes, "
                    f"got {chain.reader().available_bytes()} readable and "
                    f"{chain.writer().available_bytes()} writable bytes"
                )
            if not ok:
                self._log_guest_fault(EVENTQ, MalformedRequest("eventq buffer too short or device-readable"))
            st.keep_head(chain.head_index, ok)
            return None
        return self._status(chain)

    def _status(self, chain: DescriptorChain) -> int:
        reader = chain.reader()
        n = reader.available_bytes()
        # §5.8.6.1: statusq buffers MUST be at least one virtio_input_event; Linux
        # sends exactly one.  Several whole events are taken, a torn one is not.
        if n < EVENT_SIZE or n % EVENT_SIZE:
            raise MalformedRequest(
                f"statusq buffer of {n} readable bytes is not a whole number of {EVENT_SIZE}-byte events"
            )
        data = reader.read(n)
        failed: InputHostError | None = None
        for ev_type, code, value in _EVENT.iter_unpack(data):
            if ev_type not in STATUS_TYPES or not _has_code(self.host.event_bits(ev_type), code):
                self._ratelimit.log(
                    log,
                    logging.DEBUG,
                    ("status", ev_type),
                    "%s: status event type %#x code %#x ignored: the host device has no such code",
                    self.name,
                    ev_type,
                    code,
                )
                continue
            if self.host_gone:
                continue
            try:
                self.host.write_event(ev_type, code, value)
            except InputHostError as e:
                failed = e
        if failed is not None:
            raise failed
        return 0


def _has_code(bits: bytes, code: int) -> bool:
    """Whether bit ``code`` is set in an ``EVIOCGBIT``-style bitmap."""
    byte = code >> 3
    return byte < len(bits) and bool(bits[byte] >> (code & 7) & 1)
