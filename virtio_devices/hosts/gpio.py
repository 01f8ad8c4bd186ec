"""GPIO chips behind one small Protocol: what virtio-gpio drives on the host side.

:class:`GpioChip` is the interface :class:`~virtio_devices.gpio.GpioDevice` talks to;
two implementations exist:

* :class:`~virtio_devices.hosts.gpiod_chip.GpiodChip`: a host ``/dev/gpiochipN``
  through the python ``gpiod`` 2.x binding of libgpiod v2 (its own module, so that
  only that backend needs the ``hosts`` extra);
* :class:`SimGpioChip` here: a simulated chip (the ``sN`` entries of
  ``vhost-device-gpio -l``), upstream's ``MockGpioDevice`` made into a real twin:
  lines named ``dummy0 .. dummy{N-1}`` as upstream names them, outputs that keep
  their value, inputs whose level the host sets (:meth:`SimGpioChip.set_input`,
  the ``--sim-control`` socket of :class:`SimControlServer`), and edge events
  delivered exactly as the gpiod backend delivers them: a per-line fd that becomes
  readable, and :meth:`GpioChip.read_edges` to drain it.

The model is libgpiod v2's: a line is *requested* (here :meth:`GpioChip.configure`)
as an input or an output, optionally with edge detection, reconfigured in place,
and *released*.  Only requested lines are read or written.  Edge events of a line
are queued by the chip (the kernel's line-request buffer for gpiod) until read.

Threads: the device calls a chip only from its event loop thread, but a simulated
chip is also driven by the control server's thread and outlives the front-end
connections (a fresh device per connection, one chip per ``-l`` entry), so
:class:`SimGpioChip` guards its state with a lock and wakes the device through an
eventfd per line, never by calling it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import socket
import stat
import threading
from collections import deque
from collections.abc import Sequence
from typing import Protocol, Self, runtime_checkable

from ..errors import HostFault

__all__ = [
    "DIRECTION_IN",
    "DIRECTION_NONE",
    "DIRECTION_OUT",
    "EDGE_BOTH",
    "EDGE_FALLING",
    "EDGE_NONE",
    "EDGE_RISING",
    "GpioChip",
    "GpioChipError",
    "SimControlServer",
    "SimGpioChip",
]

log = logging.getLogger(__name__)

# Line directions, with VIRTIO 1.2 §5.17.6's values so that no table is needed.
DIRECTION_NONE = 0
DIRECTION_OUT = 1
DIRECTION_IN = 2

# Edge detection of a requested input, as bits (VIRTIO's IRQ type bits for edges);
# an edge event is EDGE_RISING or EDGE_FALLING.
EDGE_NONE = 0
EDGE_RISING = 1
EDGE_FALLING = 2
EDGE_BOTH = EDGE_RISING | EDGE_FALLING

#: Most edge events a simulated line keeps unread (the kernel's default request
#: buffer holds 16 per line; older ones are dropped, as the kernel drops them).
SIM_EVENT_BUFFER = 16


class GpioChipError(HostFault):
    """A GPIO chip cannot be opened, or refused an operation on a line.

    At startup (``/dev/gpiochipN`` missing, no permission, not a GPIO chip) the CLI
    exits 1 with the message.  While serving it is a host fault: the guest's
    request is answered ``VIRTIO_GPIO_STATUS_ERR`` and the log gets a rate-limited
    line; the device and its other lines keep working.
    """


@runtime_checkable
class GpioChip(Protocol):
    """A GPIO chip as virtio-gpio needs it (libgpiod v2's line-request model).

    Line numbers are checked by the device (0 <= line < :meth:`num_lines`) before
    any call.  Every method may raise :class:`GpioChipError` or ``OSError`` (a chip
    that vanished): host faults.
    """

    @property
    def name(self) -> str:
        """What the chip is, for logs (``/dev/gpiochip0``, ``sim4``)."""

    def num_lines(self) -> int:
        """Number of lines (``ngpio``)."""

    def line_name(self, line: int) -> str:
        """The line's name, ``""`` when it has none."""

    def line_direction(self, line: int) -> int:
        """The direction the chip reports for ``line`` now, requested or not
        (libgpiod's line info: :data:`DIRECTION_IN` or :data:`DIRECTION_OUT`;
        :data:`DIRECTION_NONE` when it cannot tell)."""

    def configure(self, line: int, direction: int, value: int = 0, edges: int = EDGE_NONE) -> None:
        """Request ``line`` (or reconfigure it in place) as :data:`DIRECTION_IN`
        with edge detection ``edges``, or :data:`DIRECTION_OUT` driven to
        ``value`` (0 or 1).  Edge events queued before are discarded."""

    def release(self, line: int) -> None:
        """Give ``line`` back (no longer requested); releasing a free line is a no-op."""

    def get_value(self, line: int) -> int:
        """The level of a requested line now (its output value for an output)."""

    def set_value(self, line: int, value: int) -> None:
        """Drive a line requested as an output to ``value`` (0 or 1)."""

    def event_fd(self, line: int) -> int:
        """An fd that is readable while edge events of ``line`` wait to be read
        (valid while the line is requested with edge detection)."""

    def read_edges(self, line: int) -> list[int]:
        """The edge events of ``line`` queued so far (:data:`EDGE_RISING` or
        :data:`EDGE_FALLING` each, oldest first), without blocking."""

    def close(self) -> None:
        """Release every line and the chip; closing twice is harmless."""


class _SimLine:
    """State of one simulated line (guarded by the chip's lock)."""

    __slots__ = ("direction", "edges", "efd", "events", "input_level", "output_value")

    def __init__(self) -> None:
        self.direction = DIRECTION_NONE
        self.output_value = 0
        self.input_level = 0
        self.edges = EDGE_NONE
        self.events: deque[int] = deque(maxlen=SIM_EVENT_BUFFER)
        self.efd = -1

    def level(self) -> int:
        return self.output_value if self.direction == DIRECTION_OUT else self.input_level


class SimGpioChip:
    """A simulated chip of ``ngpio`` lines named ``dummy0 .. dummy{ngpio-1}``.

    Outputs keep the value the device drives; the level of an input is what the
    host set with :meth:`set_input` (0 until then).  A change of an input's level
    while the line is requested as an input with edge detection queues an edge
    event (rising or falling, filtered by the detection as the kernel does) and
    makes the line's :meth:`event_fd` readable.  Thread-safe.

    Raises:
        ValueError: ``ngpio`` is not 0..65535 (virtio-gpio's ``ngpio`` is 16 bits).
    """

    def __init__(self, ngpio: int, *, name: str | None = None) -> None:
        if not 0 <= ngpio <= 0xFFFF:
            raise ValueError(f"simulated chip: {ngpio} lines, virtio-gpio allows 0..65535")
        self._name = name if name is not None else f"sim{ngpio}"
        self._lines = [_SimLine() for _ in range(ngpio)]
        self._lock = threading.Lock()
        self._closed = False

    # -- GpioChip ----------------------------------------------------------------------
    @property
    def name(self) -> str:
        """``sim<N>`` unless named otherwise."""
        return self._name

    def num_lines(self) -> int:
        return len(self._lines)

    def line_name(self, line: int) -> str:
        """``dummy<line>``: upstream's mock chip names (``vhost-device-gpio/src/mock_gpio.rs``)."""
        self._line(line)
        return f"dummy{line}"

    def line_direction(self, line: int) -> int:
        """What the line is now: an input unless requested as an output."""
        with self._lock:
            return DIRECTION_OUT if self._line(line).direction == DIRECTION_OUT else DIRECTION_IN

    def configure(self, line: int, direction: int, value: int = 0, edges: int = EDGE_NONE) -> None:
        """Request or reconfigure ``line``; see :meth:`GpioChip.configure`.

        Raises:
            GpioChipError: the chip is closed, or ``direction``/``value``/``edges``
                are not ones the Protocol allows (a device bug shows here).
        """
        if direction not in (DIRECTION_IN, DIRECTION_OUT):
            raise GpioChipError(f"{self._name}: line {line}: cannot request direction {direction}")
        if value not in (0, 1) or edges & ~EDGE_BOTH:
            raise GpioChipError(f"{self._name}: line {line}: bad value {value} or edges {edges}")
        if direction == DIRECTION_OUT and edges:
            # The kernel refuses edge detection on an output (EINVAL): so do we.
            raise GpioChipError(f"{self._name}: line {line}: edge detection on an output")
        with self._lock:
            st = self._line(line)
            log.info("gpio dummy%d set direction to %d", line, direction)
            st.direction = direction
            if direction == DIRECTION_OUT:
                st.output_value = value
            st.edges = edges
            st.events.clear()
            self._drain_efd(st)

    def release(self, line: int) -> None:
        with self._lock:
            st = self._line(line)
            if st.direction != DIRECTION_NONE:
                log.info("gpio dummy%d set direction to %d", line, DIRECTION_NONE)
            st.direction = DIRECTION_NONE
            st.edges = EDGE_NONE
            st.events.clear()
            self._drain_efd(st)

    def get_value(self, line: int) -> int:
        """The line's level (the output value of an output).

        Raises:
            GpioChipError: the line is not requested (libgpiod reads only through
                a request).
        """
        with self._lock:
            st = self._line(line)
            if st.direction == DIRECTION_NONE:
                raise GpioChipError(f"{self._name}: line {line} is not requested")
            return st.level()

    def set_value(self, line: int, value: int) -> None:
        """Drive an output.

        Raises:
            GpioChipError: the line is not an output (the kernel answers EPERM), or
                ``value`` is not 0 or 1.
        """
        if value not in (0, 1):
            raise GpioChipError(f"{self._name}: line {line}: bad value {value}")
        with self._lock:
            st = self._line(line)
            if st.direction != DIRECTION_OUT:
                raise GpioChipError(f"{self._name}: line {line} is not an output")
            log.info("gpio dummy%d set value to %d", line, value)
            st.output_value = value

    def event_fd(self, line: int) -> int:
        """The line's eventfd (made on first use, closed by :meth:`close`)."""
        with self._lock:
            st = self._line(line)
            if st.efd < 0:
                st.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                if st.events:
                    os.eventfd_write(st.efd, 1)
            return st.efd

    def read_edges(self, line: int) -> list[int]:
        with self._lock:
            st = self._line(line)
            events = list(st.events)
            st.events.clear()
            self._drain_efd(st)
            return events

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for st in self._lines:
                st.direction = DIRECTION_NONE
                st.edges = EDGE_NONE
                st.events.clear()
                if st.efd >= 0:
                    os.close(st.efd)
                    st.efd = -1

    # -- the host side (--sim-control) ----------------------------------------------------
    def set_input(self, line: int, level: int) -> None:
        """Set the level a line has as an input (what the guest reads from it).

        A change while the line is requested as an input with edge detection is an
        edge event (if the detection asks for its kind).  An output keeps driving
        its own value; the input level applies once it is an input again.

        Raises:
            ValueError: ``line`` out of range or ``level`` not 0 or 1.
        """
        if level not in (0, 1):
            raise ValueError(f"level must be 0 or 1, not {level}")
        with self._lock:
            st = self._line(line, ValueError)
            if st.input_level == level:
                return
            st.input_level = level
            kind = EDGE_RISING if level else EDGE_FALLING
            if st.direction == DIRECTION_IN and st.edges & kind:
                st.events.append(kind)
                if st.efd >= 0:
                    os.eventfd_write(st.efd, 1)

    def state(self, line: int) -> tuple[int, int]:
        """``(direction, level)`` of a line now (the output value of an output).

        Raises:
            ValueError: ``line`` out of range.
        """
        with self._lock:
            st = self._line(line, ValueError)
            return st.direction, st.level()

    # -- helpers ---------------------------------------------------------------------------
    def _line(self, line: int, exc: type[Exception] = GpioChipError) -> _SimLine:
        if self._closed:
            raise exc(f"{self._name}: chip is closed")
        if not 0 <= line < len(self._lines):
            raise exc(f"{self._name}: line {line} out of range (chip has {len(self._lines)} lines)")
        return self._lines[line]

    @staticmethod
    def _drain_efd(st: _SimLine) -> None:
        if st.efd >= 0:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(st.efd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SimGpioChip({len(self._lines)}, name={self._name!r})"


# -- the control socket of simulated chips --------------------------------------------------

_DIRECTION_NAMES = {DIRECTION_NONE: "none", DIRECTION_IN: "in", DIRECTION_OUT: "out"}
#: Longest command line accepted; a client that sends more is answered and dropped.
MAX_COMMAND = 256


def _parse_uint(text: str, what: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"{what} must be a decimal number, not {text!r}")
    return int(text)


class SimControlServer:
    """The ``--sim-control PATH`` socket: set inputs and read lines of simulated chips.

    A Unix stream socket at exactly ``path``, any number of clients, ASCII lines,
    one reply line per command (the contract with the e2e tests):

    * ``set <dev> <line> <0|1>`` -> ``ok``: set the input level of a line
      (:meth:`SimGpioChip.set_input`: an edge for IRQ waiters when it changes);
    * ``get <dev> <line>`` -> ``ok <none|in|out> <value>``: the line's direction and
      level now (the output value of an output);
    * anything else -> ``err <message>``.

    ``<dev>`` is the index of the entry in ``-l`` (the socket index); ``chips[dev]``
    is None for a host chip.  The server runs on its own thread (:meth:`start`)
    until :meth:`close`.

    Raises:
        GpioChipError: the path exists and is not a socket, another process
            listens there, or binding failed.
    """

    def __init__(self, path: str, chips: Sequence[SimGpioChip | None]) -> None:
        self.path = path
        self.chips = list(chips)
        self._sock = self._bind(path)
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread: threading.Thread | None = None

    @staticmethod
    def _bind(path: str) -> socket.socket:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise GpioChipError(f"--sim-control {path}: {e.strerror}") from e
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise GpioChipError(f"--sim-control {path}: the path exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)  # a leftover of a previous run
            except OSError as e:
                raise GpioChipError(f"--sim-control {path}: cannot probe the socket: {e.strerror}") from e
            else:
                raise GpioChipError(f"--sim-control {path}: another process is listening on it")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)
            sock.listen(8)
        except OSError as e:
            sock.close()
            raise GpioChipError(f"--sim-control {path}: {e.strerror or e}") from e
        sock.setblocking(False)
        return sock

    def start(self) -> None:
        """Serve on a daemon thread."""
        self._thread = threading.Thread(target=self._serve, name="gpio-sim-control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving, close every client and remove the socket file."""
        if self._stop_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._sock.close()
        for fd in (self._stop_r, self._stop_w):
            if fd >= 0:
                os.close(fd)
        self._stop_r = self._stop_w = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def handle(self, command: str) -> str:
        """The reply line (without newline) to one command line."""
        words = command.split()
        try:
            if not words:
                raise ValueError("empty command (expected set or get)")
            verb, args = words[0], words[1:]
            if verb == "set":
                if len(args) != 3:
                    raise ValueError(f"set takes <dev> <line> <0|1>, got {len(args)} arguments")
                chip, line = self._target(args[0], args[1])
                level = _parse_uint(args[2], "level")
                chip.set_input(line, level)
                return "ok"
            if verb == "get":
                if len(args) != 2:
                    raise ValueError(f"get takes <dev> <line>, got {len(args)} arguments")
                chip, line = self._target(args[0], args[1])
                direction, level = chip.state(line)
                return f"ok {_DIRECTION_NAMES[direction]} {level}"
            raise ValueError(f"unknown command {verb!r} (expected set or get)")
        except (ValueError, GpioChipError) as e:
            return f"err {e}"

    def _target(self, dev_text: str, line_text: str) -> tuple[SimGpioChip, int]:
        dev = _parse_uint(dev_text, "dev")
        if dev >= len(self.chips):
            raise ValueError(f"dev {dev} out of range ({len(self.chips)} devices in -l)")
        chip = self.chips[dev]
        if chip is None:
            raise ValueError(f"dev {dev} is a host chip, not a simulated one")
        return chip, _parse_uint(line_text, "line")

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        buffers: dict[socket.socket, bytes] = {}
        sel.register(self._sock, selectors.EVENT_READ)
        sel.register(self._stop_r, selectors.EVENT_READ)
        try:
            while True:
                for key, _mask in sel.select():
                    if key.fileobj == self._stop_r:
                        return
                    if key.fileobj is self._sock:
                        try:
                            client, _ = self._sock.accept()
                        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                            continue
                        client.setblocking(False)
                        buffers[client] = b""
                        sel.register(client, selectors.EVENT_READ)
                        continue
                    peer = key.fileobj
                    assert isinstance(peer, socket.socket)
                    if not self._serve_client(peer, buffers):
                        sel.unregister(peer)
                        buffers.pop(peer, None)
                        peer.close()
        finally:
            for client in buffers:
                client.close()
            sel.close()

    def _serve_client(self, client: socket.socket, buffers: dict[socket.socket, bytes]) -> bool:
        """Read what a client sent and answer each complete line; False: drop it."""
        try:
            data = client.recv(4096)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not data:
            return False
        pending = buffers[client] + data
        *lines, rest = pending.split(b"\n")
        replies = []
        for raw in lines:
            try:
                text = raw.rstrip(b"\r").decode("ascii")
            except UnicodeDecodeError:
                replies.append("err command is not ASCII")
                continue
            replies.append(self.handle(text))
        keep = len(rest) <= MAX_COMMAND
        if not keep:
            replies.append(f"err command longer than {MAX_COMMAND} bytes")
        buffers[client] = rest
        if replies:
            try:
                client.sendall("".join(r + "\n" for r in replies).encode("ascii", "replace"))
            except BlockingIOError:
                # A client that does not read its replies: drop it rather than block.
                return False
            except OSError as e:
                if e.errno not in (errno.EPIPE, errno.ECONNRESET):
                    log.warning("--sim-control %s: reply failed: %s", self.path, e)
                return False
        return keep
