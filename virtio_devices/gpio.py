"""virtio-gpio (VIRTIO 1.2 §5.17), as vhost-device-gpio serves it.

Behaviour follows rust-vmm/vhost-device ``vhost-device-gpio/src/{vhu_gpio,gpio}.rs``
where it follows the spec:

* device id 41; queues requestq (0) and eventq (1); feature VIRTIO_GPIO_F_IRQ;
  transport features VERSION_1, NOTIFY_ON_EMPTY, INDIRECT_DESC, EVENT_IDX; config
  space ``{le16 ngpio; u8 padding[2]; le32 gpio_names_size}`` (§5.17.4);
* a request is ``{le16 type; le16 gpio; le32 value}`` (8 device-readable bytes)
  followed by the device-writable response ``{u8 status; u8 value}``, or
  ``{u8 status; u8 names[gpio_names_size]}`` for GET_LINE_NAMES (§5.17.6);
* GET_LINE_NAMES answers every line's name, NUL-terminated, in line order (an
  unnamed line is a lone NUL); GET_DIRECTION the direction the driver configured,
  or for a line it did not configure what the chip reports (input or output, as
  upstream asks libgpiod's line info; a simulated line is an input);
  SET_DIRECTION requests the line from the host chip as an input or an output, or
  releases it; GET_VALUE reads a requested line; SET_VALUE caches
  the output value and drives it at once if the line is an output (§5.17.6.5: "may
  get configured to output later, at which point this output value must be used");
  SET_DIRECTION to output without a SET_VALUE before is refused, as upstream does;
* IRQ_TYPE (§5.17.6.6) enables an interrupt (edge rising/falling/both, level
  high/low) on a line requested as an input, or disables it (NONE).  An eventq
  buffer for a line (§5.17.7) unmasks its interrupt: it is returned
  VIRTIO_GPIO_IRQ_STATUS_VALID on the next edge of the enabled kind (an edge seen
  while masked is latched, §5.17.7.3 "MUST latch an edge interrupt"), or at once
  and after each edge while a level interrupt's level is present (never latched);
  and returned VIRTIO_GPIO_IRQ_STATUS_INVALID when the interrupt is disabled, the
  line released, or the buffer came for a line whose interrupt is not enabled.

Errors: a request the device cannot honour (unknown type, a line >= ngpio, a value
out of range, a response buffer of the wrong size, IRQ_TYPE without
VIRTIO_GPIO_F_IRQ...) is answered ``VIRTIO_GPIO_STATUS_ERR`` (§5.17.6.9: the device
MUST set ``status``), with the value byte 0, and logged with rate limiting; a
chain without a device-writable byte has nowhere to put a status and is returned
with used length 0.  A host chip that refuses or vanished is a host fault:
``VIRTIO_GPIO_STATUS_ERR`` too.  The device and its other lines keep working.

Where we differ from upstream, on purpose (README, "Differences"): checks come
before any effect (upstream performs SET_VALUE and then refuses a response buffer
of the wrong size); a line number >= ngpio is an error status (upstream panics on
its state vector or asks libgpiod); a malformed chain is answered, not fatal to
the vring worker; requests are parsed as byte streams, whatever the descriptor
split (VIRTIO 1.2 §2.6.4); level interrupts are emulated (upstream's libgpiod
backend refuses them); edge events come through the line request's fd on the
event loop (upstream: a thread per waiting line polling with a 1 s timeout); a
release or an output direction disables the line's interrupt and returns its
buffer; setting the IRQ type a line already has is a no-op (upstream: an error);
IRQ types other than the six of the spec are refused (upstream accepts any
combination of the four bits); both queues accept up to 1024 entries (upstream:
256, which QEMU 10's 1024-entry rings exceed).

Lifecycle: a :meth:`GpioDevice.reset` (which the vhost-user transport also does
when the rings stop) returns the waiting eventq buffers INVALID and keeps the
lines; :meth:`GpioDevice.close` (the session is over) releases them.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence

from virtio_queue import DescriptorChain, GuestMemory, Queue
from virtio_queue.errors import GuestMemoryError, QueueError

from .base import COMMON_FEATURES, EventLoop, Interrupt, VirtioDevice
from .errors import HostFault, MalformedRequest
from .hosts.gpio import (
    DIRECTION_IN,
    DIRECTION_NONE,
    DIRECTION_OUT,
    EDGE_BOTH,
    EDGE_FALLING,
    EDGE_NONE,
    EDGE_RISING,
    GpioChip,
)

__all__ = [
    "QUEUE_SIZE",
    "VIRTIO_GPIO_F_IRQ",
    "VIRTIO_ID_GPIO",
    "GpioDevice",
    "GpioRequestError",
]

log = logging.getLogger(__name__)

#: VIRTIO 1.2 §5.17.1.
VIRTIO_ID_GPIO = 41
#: Feature bit 0: the device supports interrupts on lines (§5.17.3).
VIRTIO_GPIO_F_IRQ = 1 << 0
#: Largest ring accepted on both queues: QEMU 7.2 asks for 256, QEMU 10 for 1024.
QUEUE_SIZE = 1024

REQUEST_QUEUE = 0
EVENT_QUEUE = 1

# Message types (§5.17.6).
MSG_GET_LINE_NAMES = 0x0001
MSG_GET_DIRECTION = 0x0002
MSG_SET_DIRECTION = 0x0003
MSG_GET_VALUE = 0x0004
MSG_SET_VALUE = 0x0005
MSG_IRQ_TYPE = 0x0006

STATUS_OK = 0x0
STATUS_ERR = 0x1

# IRQ trigger types (§5.17.6.6).
IRQ_TYPE_NONE = 0x00
IRQ_TYPE_EDGE_RISING = 0x01
IRQ_TYPE_EDGE_FALLING = 0x02
IRQ_TYPE_EDGE_BOTH = 0x03
IRQ_TYPE_LEVEL_HIGH = 0x04
IRQ_TYPE_LEVEL_LOW = 0x08
_IRQ_TYPES = frozenset(
    (
        IRQ_TYPE_NONE,
        IRQ_TYPE_EDGE_RISING,
        IRQ_TYPE_EDGE_FALLING,
        IRQ_TYPE_EDGE_BOTH,
        IRQ_TYPE_LEVEL_HIGH,
        IRQ_TYPE_LEVEL_LOW,
    )
)
# What the host chip must detect for each type: level types are emulated from
# both edges (libgpiod has no level events).
_EDGES_FOR = {
    IRQ_TYPE_EDGE_RISING: EDGE_RISING,
    IRQ_TYPE_EDGE_FALLING: EDGE_FALLING,
    IRQ_TYPE_EDGE_BOTH: EDGE_BOTH,
    IRQ_TYPE_LEVEL_HIGH: EDGE_BOTH,
    IRQ_TYPE_LEVEL_LOW: EDGE_BOTH,
}

# eventq status (§5.17.7).
IRQ_STATUS_INVALID = 0x0
IRQ_STATUS_VALID = 0x1

_REQUEST = struct.Struct("<HHI")
_IRQ_REQUEST = struct.Struct("<H")
_CONFIG = struct.Struct("<HHI")
# What a failed request gets: status ERR, value 0 (§5.17.6.9: all fields set).
_ERR_REPLY = bytes((STATUS_ERR, 0))
# What a host chip raises when it fails (a vanished chip: OSError).
_CHIP_ERRORS = (OSError, HostFault)
_MSG_NAMES = {
    MSG_GET_LINE_NAMES: "GET_LINE_NAMES",
    MSG_GET_DIRECTION: "GET_DIRECTION",
    MSG_SET_DIRECTION: "SET_DIRECTION",
    MSG_GET_VALUE: "GET_VALUE",
    MSG_SET_VALUE: "SET_VALUE",
    MSG_IRQ_TYPE: "IRQ_TYPE",
}


class GpioRequestError(MalformedRequest):
    """A virtio-gpio request the device refuses (the driver's fault).

    Raised by :meth:`GpioDevice.handle_chain` for an unknown type, a line out of
    range, a value the message does not allow, a response buffer of the wrong size,
    or a state the spec forbids (IRQ_TYPE on an output...).  The guest gets
    ``VIRTIO_GPIO_STATUS_ERR``; the log a rate-limited warning.
    """


class GpioDevice(VirtioDevice):
    """The virtio GPIO device over a :class:`~virtio_devices.hosts.gpio.GpioChip`.

    One device per front-end connection; the chip outlives it (it is opened once
    per ``-l`` entry).  A :meth:`reset` keeps the lines' configuration (a vhost-user
    ring stop is a reset here); :meth:`close` releases every line the device
    requested.

    Args:
        chip: the host chip (or simulated one) whose lines the guest gets.

    Raises:
        GpioChipError, OSError: the chip cannot tell its lines or their names.
        ValueError: the chip has more than 65535 lines.
    """

    device_id = VIRTIO_ID_GPIO
    name = "gpio"
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)
    features = COMMON_FEATURES | VIRTIO_GPIO_F_IRQ
    has_config = True

    def __init__(self, chip: GpioChip) -> None:
        super().__init__()
        self.chip = chip
        self.ngpio = chip.num_lines()
        if not 0 <= self.ngpio <= 0xFFFF:
            raise ValueError(f"gpio: chip {chip.name} has {self.ngpio} lines, virtio-gpio allows 0..65535")
        # §5.17.6.1: names in 7-bit ASCII, each NUL-terminated, in line order.
        names = [chip.line_name(i).encode("ascii", "replace").replace(b"\0", b"?") for i in range(self.ngpio)]
        self.names = b"".join(n + b"\0" for n in names)
        self._config = _CONFIG.pack(self.ngpio, 0, len(self.names))
        self._names_reply = bytes((STATUS_OK,)) + self.names
        # Per line: direction configured by the driver, output value set (None: not
        # yet), IRQ type, whether an edge is latched; the eventq chain that waits
        # (unmasked interrupt), and the fds watched for edge events.
        self._direction = bytearray(self.ngpio)
        self._value: list[int | None] = [None] * self.ngpio
        self._irq_type = [IRQ_TYPE_NONE] * self.ngpio
        self._latched = bytearray(self.ngpio)
        self._waiters: dict[int, DescriptorChain] = {}
        self._watched: dict[int, int] = {}
        #: Eventq buffers returned VALID / INVALID since the device was made.
        self.irqs_valid = 0
        self.irqs_invalid = 0

    # -- config space ------------------------------------------------------------------
    def config_space(self) -> bytes:
        """``virtio_gpio_config`` (§5.17.4): ngpio, padding 0, gpio_names_size."""
        return self._config

    # -- state seen by tests and tools -------------------------------------------------
    def direction(self, line: int) -> int:
        """The direction the driver configured for ``line`` (0 none, 1 out, 2 in);
        GET_DIRECTION of an unconfigured line asks the chip instead."""
        return self._direction[line]

    def irq_type(self, line: int) -> int:
        """The IRQ type the driver enabled on ``line`` (0: none)."""
        return self._irq_type[line]

    def waiting(self) -> list[int]:
        """Lines whose interrupt is unmasked (an eventq buffer waits), sorted."""
        return sorted(self._waiters)

    # -- lifecycle -----------------------------------------------------------------------
    def quiesce(self, index: int) -> None:
        """Give queue ``index`` back; for the eventq, every waiting buffer is
        returned INVALID first (a held chain must not be lost to the driver)."""
        if index == EVENT_QUEUE and self._waiters:
            if self.active and self.queues[EVENT_QUEUE].ready:
                for line in sorted(self._waiters):
                    self._fire(line, IRQ_STATUS_INVALID, notify=False)
                self.notify(EVENT_QUEUE)
            else:
                self._waiters.clear()  # the ring is gone already: nothing to write to
        super().quiesce(index)

    def activate(
        self, memory: GuestMemory, queues: Sequence[Queue], interrupt: Interrupt, loop: EventLoop
    ) -> None:
        """Start the device (see :meth:`VirtioDevice.activate`); lines whose interrupt
        was enabled before a reset are watched again (the edges the chip queued
        meanwhile are latched when the loop reads them).

        Raises:
            ValueError: ``queues`` does not match the device's queues.
        """
        super().activate(memory, queues, interrupt, loop)
        for line in range(self.ngpio):
            if self._irq_type[line] != IRQ_TYPE_NONE:
                self._watch(line)

    def reset(self) -> None:
        """Stop: waiting eventq buffers are returned INVALID (through
        :meth:`quiesce`), edge watches end; the lines keep their configuration.

        A vhost-user transport resets the device whenever its rings stop, which
        QEMU does on ``stop`` and before a migration, not only when the driver resets
        it: lines released there would leave a paused guest's outputs floating and,
        once it runs again, its enabled interrupts refused (Linux's driver requeues
        an INVALID buffer of an enabled line at once: an endless ping-pong).  A
        driver that resets the device releases its lines itself first (Linux frees
        every requested line on remove).  :meth:`close` releases them.

        Raises:
            Exception: what the base class's reset raises.
        """
        for line in list(self._watched):
            self._unwatch(line)
        try:
            super().reset()
        finally:
            self._waiters.clear()

    def close(self) -> None:
        """The device is done with (its front-end left): reset it if active and
        release every line it requested from the chip; the chip stays open.

        Called once by the vhost-user daemon at the end of each session (a fresh
        device serves the next); closing twice is harmless.
        """
        try:
            if self.active:
                self.reset()
        finally:
            for line in range(self.ngpio):
                if self._direction[line] != DIRECTION_NONE or self._irq_type[line] != IRQ_TYPE_NONE:
                    try:
                        self._forget_line(line, release=True)
                    except _CHIP_ERRORS as e:  # the chip vanished: nothing left to release
                        self._ratelimit.log(
                            log, logging.ERROR, ("host", 0), "%s: release line %d: %s", self.name, line, e
                        )

    # -- the drain loop ------------------------------------------------------------------
    def handle_chain(self, index: int, chain: DescriptorChain) -> int | None:
        """A requestq message (answered now) or an eventq buffer (held until its
        line's interrupt fires, or answered now).

        Raises:
            GpioRequestError: the request is refused (status ERR, §5.17.6.9).
            MalformedRequest: no device-writable byte for a status.
            GpioChipError, OSError: the host chip failed (status ERR).
        """
        if index == REQUEST_QUEUE:
            return self._request(chain)
        return self._unmask(chain)

    def guest_fault(self, index: int, chain: DescriptorChain, err: Exception) -> int:
        """A refused request: ``VIRTIO_GPIO_STATUS_ERR`` on the requestq, INVALID on
        the eventq; used length 0 when the chain has no writable byte."""
        self._ratelimit.log(log, logging.WARNING, index, "%s q%d: %s", self.name, index, err)
        return self._write_error(index, chain)

    def host_fault(self, index: int, chain: DescriptorChain, err: Exception) -> int:
        """The host chip failed: answered as :meth:`guest_fault`, logged as an error."""
        self._ratelimit.log(
            log, logging.ERROR, ("host", index), "%s q%d: host chip: %s", self.name, index, err
        )
        return self._write_error(index, chain)

    def _write_error(self, index: int, chain: DescriptorChain) -> int:
        reply = _ERR_REPLY if index == REQUEST_QUEUE else bytes((IRQ_STATUS_INVALID,))
        try:
            writer = chain.writer()
            return writer.write(reply[: writer.available_bytes()])
        except (QueueError, GuestMemoryError):
            return 0  # the chain itself is broken: returned empty (§2.7.8)

    # -- requestq ------------------------------------------------------------------------
    def _request(self, chain: DescriptorChain) -> int:
        reader = chain.reader()
        writer = chain.writer()
        room = writer.available_bytes()
        if room == 0:
            raise MalformedRequest("request has no device-writable byte for the status")
        size = reader.available_bytes()
        if size != _REQUEST.size:
            raise GpioRequestError(f"request is {size} device-readable bytes, expected {_REQUEST.size}")
        rtype, gpio, value = _REQUEST.unpack(reader.read(_REQUEST.size))
        if rtype == MSG_GET_LINE_NAMES:
            # The response is sized by gpio_names_size (§5.17.6.1); gpio and value are 0.
            if room != len(self._names_reply):
                raise GpioRequestError(
                    f"GET_LINE_NAMES response buffer is {room} bytes, expected {len(self._names_reply)}"
                )
            return writer.write(self._names_reply)
        name = _MSG_NAMES.get(rtype)
        if name is None:
            raise GpioRequestError(f"unknown request type {rtype}")
        if room != 2:
            raise GpioRequestError(f"{name} response buffer is {room} bytes, expected 2")
        if gpio >= self.ngpio:
            raise GpioRequestError(f"{name}: line {gpio} out of range (ngpio {self.ngpio})")
        answer = 0
        if rtype == MSG_GET_DIRECTION:
            # A line the driver configured: what it set.  Otherwise what the chip
            # says (input or output), as upstream answers for host chips: Linux's
            # gpio-virtio takes "none" for an error, and some gpiolib versions
            # refuse to register a chip whose get_direction fails.
            answer = self._direction[gpio] or self.chip.line_direction(gpio)
        elif rtype == MSG_SET_DIRECTION:
            self._set_direction(gpio, value)
        elif rtype == MSG_GET_VALUE:
            answer = self._get_value(gpio)
        elif rtype == MSG_SET_VALUE:
            self._set_value(gpio, value)
        else:
            self._set_irq_type(gpio, value)
        return writer.write(bytes((STATUS_OK, answer)))

    def _set_direction(self, line: int, direction: int) -> None:
        """§5.17.6.3.  NONE releases the line and discards all its state
        (§5.17.6.9 MUST); OUT drives the value set before (upstream refuses OUT
        without one); an output cannot interrupt, so OUT disables the interrupt."""
        if direction == DIRECTION_NONE:
            self._forget_line(line, release=True)
            return
        if direction == DIRECTION_IN:
            # Reconfiguring an input keeps its edge detection.
            self.chip.configure(line, DIRECTION_IN, 0, _EDGES_FOR.get(self._irq_type[line], EDGE_NONE))
        elif direction == DIRECTION_OUT:
            value = self._value[line]
            if value is None:
                raise GpioRequestError(f"SET_DIRECTION: line {line} set to output before any SET_VALUE")
            if self._irq_type[line] != IRQ_TYPE_NONE:
                self._disable_irq(line)
            self.chip.configure(line, DIRECTION_OUT, value)
        else:
            raise GpioRequestError(f"SET_DIRECTION: line {line}: direction {direction} is not 0, 1 or 2")
        self._direction[line] = direction

    def _get_value(self, line: int) -> int:
        if self._direction[line] == DIRECTION_NONE:
            raise GpioRequestError(f"GET_VALUE: line {line} has no direction set")
        return self.chip.get_value(line)

    def _set_value(self, line: int, value: int) -> None:
        if value > 1:
            raise GpioRequestError(f"SET_VALUE: line {line}: value {value} is not 0 or 1")
        if self._direction[line] == DIRECTION_OUT:
            self.chip.set_value(line, value)
        self._value[line] = value

    def _set_irq_type(self, line: int, irq_type: int) -> None:
        """§5.17.6.6: enable (edge or level) or disable a line's interrupt."""
        if not self.has_feature(VIRTIO_GPIO_F_IRQ):
            raise GpioRequestError(f"IRQ_TYPE: line {line}: VIRTIO_GPIO_F_IRQ was not negotiated")
        if irq_type not in _IRQ_TYPES:
            raise GpioRequestError(f"IRQ_TYPE: line {line}: type {irq_type:#x} is not one of the spec's")
        current = self._irq_type[line]
        if irq_type == current:
            return
        if irq_type == IRQ_TYPE_NONE:
            self._disable_irq(line)
            return
        if current != IRQ_TYPE_NONE:
            # §5.17.6.8: the driver MUST disable the interrupt before changing its type.
            raise GpioRequestError(f"IRQ_TYPE: line {line}: type {current:#x} must be set to NONE first")
        if self._direction[line] != DIRECTION_IN:
            # §5.17.6.8: the driver MUST NOT send IRQ messages for an output line.
            raise GpioRequestError(f"IRQ_TYPE: line {line} is not an input")
        self.chip.configure(line, DIRECTION_IN, 0, _EDGES_FOR[irq_type])
        self._irq_type[line] = irq_type
        self._latched[line] = 0
        self._watch(line)

    def _disable_irq(self, line: int) -> None:
        """IRQ type NONE: discard the latch (§5.17.6.9 MUST), return the waiting
        buffer INVALID (§5.17.7.3 MUST), stop detecting edges."""
        self._irq_type[line] = IRQ_TYPE_NONE
        self._latched[line] = 0
        self._unwatch(line)
        if line in self._waiters:
            self._fire(line, IRQ_STATUS_INVALID)
        if self._direction[line] == DIRECTION_IN:
            self.chip.configure(line, DIRECTION_IN, 0, EDGE_NONE)

    def _forget_line(self, line: int, *, release: bool) -> None:
        """Discard everything about ``line`` (direction NONE, device reset)."""
        self._irq_type[line] = IRQ_TYPE_NONE
        self._latched[line] = 0
        self._unwatch(line)
        if line in self._waiters:
            self._fire(line, IRQ_STATUS_INVALID)
        self._direction[line] = DIRECTION_NONE
        self._value[line] = None
        if release:
            self.chip.release(line)

    # -- eventq and edges ----------------------------------------------------------------
    def _unmask(self, chain: DescriptorChain) -> int | None:
        """An eventq buffer: hold it for its line, or answer INVALID at once."""
        reader = chain.reader()
        room = chain.writer().available_bytes()
        if room == 0:
            raise MalformedRequest("eventq buffer has no device-writable byte for the status")
        size = reader.available_bytes()
        if size != _IRQ_REQUEST.size:
            raise GpioRequestError(
                f"eventq request is {size} device-readable bytes, expected {_IRQ_REQUEST.size}"
            )
        (line,) = _IRQ_REQUEST.unpack(reader.read(_IRQ_REQUEST.size))
        if line >= self.ngpio:
            raise GpioRequestError(f"eventq: line {line} out of range (ngpio {self.ngpio})")
        if room != 1:
            raise GpioRequestError(f"eventq: line {line}: response buffer is {room} bytes, expected 1")
        if line in self._waiters:
            # §5.17.7.2: the driver MUST NOT queue two buffers for one line; the
            # first keeps waiting, the second is returned.
            raise GpioRequestError(f"eventq: line {line} already has a buffer waiting")
        if self._irq_type[line] == IRQ_TYPE_NONE:
            # "unmasked without being enabled first": returned INVALID (§5.17.6.6).
            self.irqs_invalid += 1
            return chain.writer().write(bytes((IRQ_STATUS_INVALID,)))
        self._waiters[line] = chain
        self._check(line)
        return None

    def _watch(self, line: int) -> None:
        if line in self._watched or self.loop is None:
            return
        fd = self.chip.event_fd(line)
        self._watched[line] = fd
        self.loop.add_reader(fd, lambda: self._on_edges(line))

    def _unwatch(self, line: int) -> None:
        fd = self._watched.pop(line, None)
        if fd is not None and self.loop is not None:
            self.loop.remove_reader(fd)

    def _on_edges(self, line: int) -> None:
        """The line's event fd is readable: latch the edges of the enabled kind and
        fire the waiting buffer if the interrupt is active."""
        try:
            edges = self.chip.read_edges(line)
        except _CHIP_ERRORS as e:  # the chip vanished
            self._ratelimit.log(
                log, logging.ERROR, ("host", 1), "%s: line %d: edge events: %s", self.name, line, e
            )
            self._unwatch(line)
            if line in self._waiters:
                self._fire(line, IRQ_STATUS_INVALID)
            return
        irq_type = self._irq_type[line]
        if irq_type & IRQ_TYPE_EDGE_BOTH and any(e & irq_type for e in edges):
            self._latched[line] = 1
        self._check(line)

    def _check(self, line: int) -> None:
        """Fire the waiting buffer of ``line`` if its interrupt is active now: a
        latched edge, or the level of a level interrupt (read from the chip)."""
        if line not in self._waiters:
            return
        irq_type = self._irq_type[line]
        if irq_type & IRQ_TYPE_EDGE_BOTH:
            if self._latched[line]:
                self._latched[line] = 0
                self._fire(line, IRQ_STATUS_VALID)
            return
        try:
            level = self.chip.get_value(line)
        except _CHIP_ERRORS as e:
            self._ratelimit.log(log, logging.ERROR, ("host", 1), "%s: line %d: level: %s", self.name, line, e)
            return
        if level == (1 if irq_type == IRQ_TYPE_LEVEL_HIGH else 0):
            self._fire(line, IRQ_STATUS_VALID)

    def _fire(self, line: int, status: int, *, notify: bool = True) -> None:
        """Return the waiting buffer of ``line`` with ``status`` (once: it leaves
        the waiters before it is completed)."""
        chain = self._waiters.pop(line)
        if status == IRQ_STATUS_VALID:
            self.irqs_valid += 1
        else:
            self.irqs_invalid += 1
        try:
            used = chain.writer().write(bytes((status,)))
        except (QueueError, GuestMemoryError) as e:
            self._ratelimit.log(log, logging.WARNING, EVENT_QUEUE, "%s q1: line %d: %s", self.name, line, e)
            used = 0
        self.complete(EVENT_QUEUE, chain.head_index, used, notify=notify)
