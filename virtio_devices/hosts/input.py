"""Host backends of virtio-input: an evdev node, or a simulated keyboard or tablet.

:class:`InputHost` is what :class:`~virtio_devices.input.InputDevice` needs from the
host's input device: its identity (name, serial, ids), its capabilities (event
bits per type, property bits, the range of each absolute axis), a readable fd and
the events behind it, and a way to send the guest's status events (LEDs, sound,
repeat) back.  Two implementations:

* :class:`~virtio_devices.hosts.evdev_input.EvdevInputHost` (module
  :mod:`virtio_devices.hosts.evdev_input`, needs ``python-evdev``): a
  ``/dev/input/eventN`` node, as upstream's ``vhost-device-input``.
* :class:`SimInputHost`: ``sim:keyboard`` (a keyboard with three LEDs and key
  repeat) and ``sim:tablet`` (absolute X/Y 0..32767 with a resolution,
  ``BTN_TOUCH``, ``INPUT_PROP_DIRECT``), whose events come from a control socket
  (:class:`ControlServer`, protocol below) or from :meth:`SimInputHost.inject`.

The control socket protocol (one command per line, UTF-8, on a Unix stream
socket; every command gets one reply line, ``ok ...`` or ``error: ...``)::

    EV <type> <code> <value>     queue one event (names such as EV_KEY KEY_A, or numbers)
    SYN                          queue EV_SYN SYN_REPORT 0: ends a group
    KEY <code> <value>           EV_KEY <code> <value> then SYN
    GET <type> <code>            ok <value>: what the guest last wrote (0 if never)
    WAIT <type> <code> <value> [<seconds>]
                                 ok once the guest wrote that value (default 10 s),
                                 else "error: timeout ..."
    INFO                         ok <name>

Types and codes accept the names in :data:`NAMES` (the ones the simulated devices
use) and decimal or ``0x`` numbers.  Values are signed 32-bit integers.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import socket
import stat
import struct
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

from ..errors import HostFault

__all__ = [
    "EV_ABS",
    "EV_FF",
    "EV_KEY",
    "EV_LED",
    "EV_MAX",
    "EV_MSC",
    "EV_REL",
    "EV_REP",
    "EV_SND",
    "EV_SW",
    "EV_SYN",
    "INPUT_EVENT",
    "NAMES",
    "SIM_KINDS",
    "SYN_DROPPED",
    "SYN_REPORT",
    "AbsInfo",
    "ControlCommand",
    "ControlError",
    "ControlServer",
    "InputHost",
    "InputHostError",
    "PipeInputHost",
    "SimInputHost",
    "bitmap",
    "parse_control_line",
]

# Event types and codes of linux/input-event-codes.h that this module names.
EV_SYN, EV_KEY, EV_REL, EV_ABS, EV_MSC, EV_SW = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05
EV_LED, EV_SND, EV_REP, EV_FF = 0x11, 0x12, 0x14, 0x15
EV_MAX = 0x1F
SYN_REPORT, SYN_DROPPED = 0, 3
BTN_TOUCH, BTN_TOOL_PEN = 0x14A, 0x140
ABS_X, ABS_Y = 0x00, 0x01
INPUT_PROP_DIRECT = 0x01
MSC_SCAN = 0x04
LED_NUML, LED_CAPSL, LED_SCROLLL = 0x00, 0x01, 0x02
REP_DELAY, REP_PERIOD = 0x00, 0x01
BUS_VIRTUAL = 0x06
KEY_ESC, KEY_A, KEY_CAPSLOCK, KEY_MICMUTE = 1, 30, 58, 248

#: Names the control socket understands (types and the codes the sim devices use).
NAMES: Mapping[str, int] = {
    "EV_SYN": EV_SYN, "EV_KEY": EV_KEY, "EV_REL": EV_REL, "EV_ABS": EV_ABS, "EV_MSC": EV_MSC,
    "EV_SW": EV_SW, "EV_LED": EV_LED, "EV_SND": EV_SND, "EV_REP": EV_REP, "EV_FF": EV_FF,
    "SYN_REPORT": SYN_REPORT, "SYN_DROPPED": SYN_DROPPED,
    "BTN_TOUCH": BTN_TOUCH, "BTN_TOOL_PEN": BTN_TOOL_PEN, "ABS_X": ABS_X, "ABS_Y": ABS_Y,
    "MSC_SCAN": MSC_SCAN, "LED_NUML": LED_NUML, "LED_CAPSL": LED_CAPSL,
    "LED_SCROLLL": LED_SCROLLL, "REP_DELAY": REP_DELAY, "REP_PERIOD": REP_PERIOD,
    "KEY_ESC": KEY_ESC, "KEY_CAPSLOCK": KEY_CAPSLOCK, "KEY_ENTER": 28, "KEY_SPACE": 57,
    **{f"KEY_{c}": code for c, code in zip("QWERTYUIOP", range(16, 26), strict=True)},
    **{f"KEY_{c}": code for c, code in zip("ASDFGHJKL", range(30, 39), strict=True)},
    **{f"KEY_{c}": code for c, code in zip("ZXCVBNM", range(44, 51), strict=True)},
}  # fmt: skip

#: Linux's ``struct input_event`` (``struct timeval``, type u16, code u16, value s32),
#: native layout, as an evdev node yields it.
INPUT_EVENT = struct.Struct("@llHHi")

#: The ``sim:<kind>`` entries of ``--event-list``.
SIM_KINDS = ("keyboard", "tablet")

_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1
#: Longest control line accepted (a client that never sends a newline is cut off).
_MAX_LINE = 256


class InputHostError(HostFault):
    """The host input device cannot be opened, read or written.

    Raised at startup for an ``--event-list`` entry that is missing, unreadable or
    not an evdev node (the CLI prints it and exits 1), and while serving when the
    device is gone (unplugged: ``ENODEV``) or refuses a status write; the device
    then logs it and stays up.
    """


class AbsInfo(NamedTuple):
    """One absolute axis, as ``struct virtio_input_absinfo`` (VIRTIO 1.2 §5.8.4)."""

    min: int
    max: int
    fuzz: int = 0
    flat: int = 0
    res: int = 0


@runtime_checkable
class InputHost(Protocol):
    """A host input device as virtio-input needs it.

    ``fileno()`` is readable when :meth:`read_events` has something; it stays valid
    until :meth:`close`.  Bitmaps are little-endian bit arrays as ``EVIOCGBIT``
    returns them (bit ``n`` of byte ``n // 8``), without trailing zero bytes.

    Optional: a host whose nonblocking ``fileno()`` yields Linux's ``struct
    input_event`` records, as an evdev node does (whole records per read, ``ENODEV``
    or end of file once the device is gone), says so with a class attribute
    ``raw_input_events = True``; the device then reads them in compiled code.
    """

    @property
    def name(self) -> str:
        """What to call it in logs (the path, or ``sim:keyboard``)."""
        ...

    def fileno(self) -> int: ...

    def read_events(self) -> list[tuple[int, int, int]]:
        """Every event available now, as ``(type, code, value)``, without blocking.

        Raises:
            InputHostError: the device is gone or cannot be read.
        """
        ...

    def write_event(self, ev_type: int, code: int, value: int) -> None:
        """Send a status event (LED, sound, repeat) to the device.

        Raises:
            InputHostError: the device refused it or is gone.
        """
        ...

    def device_name(self) -> bytes: ...

    def serial(self) -> bytes: ...

    def ids(self) -> tuple[int, int, int, int]:
        """``(bustype, vendor, product, version)``."""
        ...

    def properties(self) -> bytes: ...

    def event_bits(self, ev_type: int) -> bytes:
        """The codes of ``ev_type`` the device has (empty: type not supported)."""
        ...

    def abs_info(self, axis: int) -> AbsInfo | None: ...

    def grab(self, on: bool) -> None:
        """Take (``EVIOCGRAB`` 1) or release exclusive access to the device."""
        ...

    def close(self) -> None: ...


def bitmap(codes: Iterable[int]) -> bytes:
    """The ``EVIOCGBIT``-style bitmap of ``codes``, without trailing zero bytes."""
    out = bytearray()
    for code in codes:
        byte = code >> 3
        if byte >= len(out):
            out.extend(bytes(byte + 1 - len(out)))
        out[byte] |= 1 << (code & 7)
    return bytes(out)


# -- the simulated devices -----------------------------------------------------------------


@dataclass(frozen=True)
class _SimSpec:
    name: str
    serial: str
    ids: tuple[int, int, int, int]
    caps: Mapping[int, tuple[int, ...]]
    props: tuple[int, ...]
    axes: Mapping[int, AbsInfo]


_SPECS = {
    "keyboard": _SimSpec(
        name="vhost-device-input simulated keyboard",
        serial="sim-keyboard-0",
        ids=(BUS_VIRTUAL, 0x0001, 0x0001, 0x0001),
        caps={
            EV_SYN: (EV_SYN, EV_KEY, EV_MSC, EV_LED, EV_REP),
            EV_KEY: tuple(range(KEY_ESC, KEY_MICMUTE + 1)),
            EV_MSC: (MSC_SCAN,),
            EV_LED: (LED_NUML, LED_CAPSL, LED_SCROLLL),
            EV_REP: (REP_DELAY, REP_PERIOD),
        },
        props=(),
        axes={},
    ),
    "tablet": _SimSpec(
        name="vhost-device-input simulated tablet",
        serial="sim-tablet-0",
        ids=(BUS_VIRTUAL, 0x0001, 0x0002, 0x0001),
        caps={
            EV_SYN: (EV_SYN, EV_KEY, EV_ABS),
            EV_KEY: (BTN_TOOL_PEN, BTN_TOUCH),
            EV_ABS: (ABS_X, ABS_Y),
        },
        props=(INPUT_PROP_DIRECT,),
        # 32768 units over about 327 mm: 100 units per mm, as evdev's res field says.
        axes={ABS_X: AbsInfo(0, 32767, 0, 0, 100), ABS_Y: AbsInfo(0, 32767, 0, 0, 100)},
    ),
}


class SimInputHost:
    """A simulated input device (``sim:keyboard`` or ``sim:tablet``).

    Events come from :meth:`inject` (any thread; the control socket's threads use
    it) and are read by the device on its loop through an eventfd.  Status events
    the guest writes (:meth:`write_event`) are remembered per ``(type, code)``;
    :meth:`status` reads them and :meth:`wait_status` waits for one.  Only the
    status types the device has (its ``EV_LED``/``EV_REP`` bits) are taken.

    Args:
        kind: one of :data:`SIM_KINDS`.

    Raises:
        ValueError: an unknown kind.
    """

    def __init__(self, kind: str) -> None:
        if kind not in _SPECS:
            raise ValueError(f"sim:{kind}: unknown simulated device (choose from {', '.join(SIM_KINDS)})")
        self.kind = kind
        self._spec = _SPECS[kind]
        self._events: deque[tuple[int, int, int]] = deque()
        self._cv = threading.Condition()
        self._status: dict[tuple[int, int], int] = {}
        #: Every status event the guest wrote, in order.
        self.status_log: list[tuple[int, int, int]] = []
        self.grabbed = False
        #: Set by a test to make the device behave as unplugged (reads fail with ENODEV).
        self.unplugged = False
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    @property
    def name(self) -> str:
        return f"sim:{self.kind}"

    def fileno(self) -> int:
        return self._efd

    # -- events in ------------------------------------------------------------------------
    def inject(self, events: Iterable[tuple[int, int, int]]) -> None:
        """Queue events as if the device produced them; wakes the reader."""
        with self._cv:
            self._events.extend(events)
        with contextlib.suppress(BlockingIOError):  # counter saturated: already readable
            os.eventfd_write(self._efd, 1)

    def read_events(self) -> list[tuple[int, int, int]]:
        if self.unplugged:
            raise InputHostError(f"{self.name}: reading events failed: {os.strerror(errno.ENODEV)}")
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._efd)
        with self._cv:
            out = list(self._events)
            self._events.clear()
        return out

    # -- status out -----------------------------------------------------------------------
    def write_event(self, ev_type: int, code: int, value: int) -> None:
        if self.unplugged:
            raise InputHostError(f"{self.name}: writing event failed: {os.strerror(errno.ENODEV)}")
        if code not in self._spec.caps.get(ev_type, ()):
            raise InputHostError(f"{self.name}: has no status event type {ev_type:#x} code {code:#x}")
        with self._cv:
            self._status[(ev_type, code)] = value
            self.status_log.append((ev_type, code, value))
            self._cv.notify_all()

    def status(self, ev_type: int, code: int) -> int:
        """The value the guest last wrote for ``(ev_type, code)``, 0 if never."""
        with self._cv:
            return self._status.get((ev_type, code), 0)

    def wait_status(self, ev_type: int, code: int, value: int, timeout: float) -> bool:
        """Wait until the guest wrote ``value`` for ``(ev_type, code)``; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: self._status.get((ev_type, code), 0) == value, timeout)

    # -- identity and capabilities --------------------------------------------------------
    def device_name(self) -> bytes:
        return self._spec.name.encode()

    def serial(self) -> bytes:
        return self._spec.serial.encode()

    def ids(self) -> tuple[int, int, int, int]:
        return self._spec.ids

    def properties(self) -> bytes:
        return bitmap(self._spec.props)

    def event_bits(self, ev_type: int) -> bytes:
        return bitmap(self._spec.caps.get(ev_type, ()))

    def abs_info(self, axis: int) -> AbsInfo | None:
        return self._spec.axes.get(axis)

    def grab(self, on: bool) -> None:
        self.grabbed = on

    def close(self) -> None:
        if self._efd >= 0:
            os.close(self._efd)
            self._efd = -1


class PipeInputHost(SimInputHost):
    """A simulated device whose events travel as an evdev node's do.

    :meth:`inject` writes ``struct input_event`` records (:data:`INPUT_EVENT`) into a
    pipe whose nonblocking read end is :meth:`fileno`, so the device reads them as
    it reads an evdev node (``raw_input_events``: its compiled event path), and
    :meth:`read_events` parses them for the Python path.  Unplugging closes the
    write end: the reader then sees end of file.  For tests and benchmarks of the
    event path without input hardware; not a ``--event-list`` entry.

    Raises:
        ValueError: an unknown kind.
        OSError: no pipe could be made.
    """

    raw_input_events = True
    #: Records per write: each write of at most PIPE_BUF bytes is atomic, so a
    #: reader only ever sees whole records.
    _PER_WRITE = select.PIPE_BUF // INPUT_EVENT.size

    def __init__(self, kind: str) -> None:
        self._unplugged = False
        self._rfd, self._wfd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._rfd, False)
        with contextlib.suppress(OSError):  # a bigger pipe holds more (evdev's buffer is bounded too)
            fcntl.fcntl(self._wfd, fcntl.F_SETPIPE_SZ, 1 << 20)
        super().__init__(kind)

    @property
    def unplugged(self) -> bool:
        return self._unplugged

    @unplugged.setter
    def unplugged(self, value: bool) -> None:
        self._unplugged = value
        if value and self._wfd >= 0:
            os.close(self._wfd)
            self._wfd = -1

    def fileno(self) -> int:
        return self._rfd

    def inject(self, events: Iterable[tuple[int, int, int]]) -> None:
        """Write events as ``struct input_event`` records (blocks while the pipe is full)."""
        records = [INPUT_EVENT.pack(0, 0, t, c, v) for t, c, v in events]
        with self._cv:
            for i in range(0, len(records), self._PER_WRITE):
                os.write(self._wfd, b"".join(records[i : i + self._PER_WRITE]))

    def read_events(self) -> list[tuple[int, int, int]]:
        if self._unplugged:
            raise InputHostError(f"{self.name}: reading events failed: {os.strerror(errno.ENODEV)}")
        out: list[tuple[int, int, int]] = []
        while True:
            try:
                data = os.read(self._rfd, 256 * INPUT_EVENT.size)
            except BlockingIOError:
                return out
            out.extend((t, c, v) for _s, _u, t, c, v in INPUT_EVENT.iter_unpack(data))
            if len(data) < 256 * INPUT_EVENT.size:
                return out

    def close(self) -> None:
        super().close()
        for fd in (self._rfd, self._wfd):
            if fd >= 0:
                os.close(fd)
        self._rfd = self._wfd = -1


# -- the control socket ------------------------------------------------------------------------


class ControlError(ValueError):
    """A control-socket line is not a valid command; the reply is ``error: <message>``."""


class ControlCommand(NamedTuple):
    """One parsed control line: ``verb`` and its integer arguments (``timeout`` for WAIT)."""

    verb: str
    args: tuple[int, ...] = ()
    timeout: float = 10.0


_ARITY = {"EV": 3, "SYN": 0, "KEY": 2, "GET": 2, "WAIT": 3, "INFO": 0}


def _number(word: str, what: str, lo: int, hi: int) -> int:
    value = NAMES.get(word)
    if value is None:
        try:
            value = int(word, 0)
        except ValueError:
            raise ControlError(f"{what} {word!r} is neither a known name nor a number") from None
    if not lo <= value <= hi:
        raise ControlError(f"{what} {value} out of range {lo}..{hi}")
    return value


def parse_control_line(line: str) -> ControlCommand:
    """Parse one control-socket line (protocol in the module docstring).

    Raises:
        ControlError: an unknown verb, a wrong number of arguments, a name that is
            not in :data:`NAMES`, a number out of range (type 0..0x1f, code 0..0x2ff,
            value signed 32-bit, timeout 0..3600 s).
    """
    words = line.split()
    if not words:
        raise ControlError("empty command")
    verb = words[0].upper()
    arity = _ARITY.get(verb)
    if arity is None:
        raise ControlError(f"unknown command {words[0]!r} (EV, SYN, KEY, GET, WAIT, INFO)")
    rest = words[1:]
    timeout = 10.0
    if verb == "WAIT" and len(rest) == 4:
        try:
            timeout = float(rest.pop())
        except ValueError:
            raise ControlError(
                f"WAIT timeout {line.rsplit(maxsplit=1)[-1]!r} is not a number of seconds"
            ) from None
        if not 0 <= timeout <= 3600:
            raise ControlError(f"WAIT timeout {timeout} out of range 0..3600 s")
    if len(rest) != arity:
        raise ControlError(f"{verb} takes {arity} arguments, not {len(rest)}")
    if verb == "KEY":
        code = _number(rest[0], "code", 0, 0x2FF)
        return ControlCommand(verb, (code, _number(rest[1], "value", _I32_MIN, _I32_MAX)))
    args: list[int] = []
    limits = (("type", 0, EV_MAX), ("code", 0, 0x2FF), ("value", _I32_MIN, _I32_MAX))
    for word, (what, lo, hi) in zip(rest, limits, strict=False):
        args.append(_number(word, what, lo, hi))
    return ControlCommand(verb, tuple(args), timeout)


def run_control_command(host: SimInputHost, cmd: ControlCommand) -> str:
    """Carry out ``cmd`` on ``host``; the reply line (without newline)."""
    if cmd.verb == "EV":
        host.inject([(cmd.args[0], cmd.args[1], cmd.args[2])])
    elif cmd.verb == "SYN":
        host.inject([(EV_SYN, SYN_REPORT, 0)])
    elif cmd.verb == "KEY":
        host.inject([(EV_KEY, cmd.args[0], cmd.args[1]), (EV_SYN, SYN_REPORT, 0)])
    elif cmd.verb == "GET":
        return f"ok {host.status(cmd.args[0], cmd.args[1])}"
    elif cmd.verb == "WAIT":
        if not host.wait_status(cmd.args[0], cmd.args[1], cmd.args[2], cmd.timeout):
            now = host.status(cmd.args[0], cmd.args[1])
            ev_type, code, want = cmd.args
            return f"error: timeout after {cmd.timeout} s: type {ev_type} code {code} is {now}, not {want}"
    elif cmd.verb == "INFO":
        return f"ok {host.device_name().decode()}"
    return "ok"


class ControlServer:
    """The control socket of a :class:`SimInputHost`: a listening Unix socket at
    ``path``, served by a thread (one more per client), until :meth:`close`.

    Raises:
        OSError: ``path`` cannot be bound (exists, no directory...).
    """

    def __init__(self, host: SimInputHost, path: str) -> None:
        self.host = host
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            with contextlib.suppress(FileNotFoundError):
                # A stale socket of an earlier run; anything else makes bind fail.
                if _is_socket(path):
                    os.unlink(path)
            self._sock.bind(path)
            self._sock.listen(8)
        except OSError:
            self._sock.close()
            raise
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._clients: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name=f"input-control {path}", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while True:
            ready, _, _ = select.select([self._sock.fileno(), self._wake_r], [], [])
            if self._wake_r in ready:
                return
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            with self._lock:
                self._clients.add(conn)
            threading.Thread(target=self._serve_client, args=(conn,), daemon=True).start()

    def _serve_client(self, conn: socket.socket) -> None:
        buf = b""
        try:
            with conn:
                while True:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    if lines:
                        # One send for the lines of one read: a client that writes many
                        # lines before it reads the replies does not fill its socket's
                        # receive queue with one small message per line.
                        conn.sendall("".join(self.handle_line(raw) + "\n" for raw in lines).encode())
                    if len(buf) > _MAX_LINE:
                        conn.sendall(f"error: line longer than {_MAX_LINE} bytes\n".encode())
                        return
        except OSError:
            return
        finally:
            with self._lock:
                self._clients.discard(conn)

    def handle_line(self, raw: bytes) -> str:
        """The reply to one line (also what tests call without a socket)."""
        try:
            return run_control_command(self.host, parse_control_line(raw.decode("utf-8")))
        except UnicodeDecodeError as e:
            return f"error: line is not UTF-8 ({e.reason} at byte {e.start})"
        except ControlError as e:
            return f"error: {e}"

    def close(self) -> None:
        """Stop accepting, drop the clients, remove the socket file."""
        if self._wake_w < 0:
            return
        os.write(self._wake_w, b"x")
        self._thread.join()
        with self._lock:
            for conn in self._clients:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._wake_w = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _is_socket(path: str) -> bool:
    return stat.S_ISSOCK(os.lstat(path).st_mode)
