"""I2C host backends of virtio-i2c: ``/dev/i2c-N`` adapters and a simulated bus.

The device (:mod:`virtio_devices.i2c`) turns each group of requests (VIRTIO 1.2
§5.19.6.1: requests chained by ``VIRTIO_I2C_FLAGS_FAIL_NEXT``) into one list of
:class:`I2cMsg` and hands it to the adapter that serves the group's address, through
an :class:`I2cBus`.  An adapter runs the list as one combined transaction (repeated
START between messages, one STOP at the end, as Linux's ``i2c_transfer`` does) and
says how many messages, from the first, completed: all of them, or fewer when one
failed (a NAK, an unsupported shape, an adapter gone), which the device reports
as ``VIRTIO_I2C_MSG_ERR`` for that message and the rest of its group.

Adapters:

* :class:`HostAdapter`: ``/dev/i2c-N``, opened with ``smbus2`` (the ``hosts`` extra).
  ``I2C_FUNCS`` chooses per adapter, as upstream does: raw I2C (one ``I2C_RDWR``
  ioctl per group) where the adapter has ``I2C_FUNC_I2C``, else SMBus (one
  ``I2C_SMBUS`` ioctl per SMBus command, see :func:`smbus_plan`).  The ioctls are
  compiled (:mod:`virtio_devices.hosts._i2c_dev`, which also runs the adapter's
  own thread for the device's compiled request path), or go through smbus2
  (``compiled=False``).  Its transfers may take milliseconds: the device never
  runs them on the event loop (:attr:`I2cAdapter.blocking`).  ``I2C_RDWR`` cannot
  tell which message failed, so a failed group fails whole there.
* :class:`SimAdapter`: a simulated bus whose devices are :class:`Eeprom24c02`
  (256 bytes, one-byte address pointer, 8-byte pages, sequential reads), for users
  without I2C hardware and for tests.  The CLI selects it with the reserved adapter
  name ``sim`` (``-l sim:80``).  It answers in memory, on the loop thread.

Every socket of a daemon shares the same adapters (as upstream's one ``I2cMap``);
each adapter serialises its transfers with a lock, since the sockets' event loops
and workers run on different threads.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from virtio_queue.ratelimit import RateLimiter

from ..errors import HostFault

if TYPE_CHECKING:
    from ._i2c_dev import I2cDevPort

__all__ = [
    "I2C_FUNC_I2C",
    "I2C_FUNC_SMBUS_QUICK",
    "I2C_FUNC_SMBUS_READ_BYTE",
    "I2C_FUNC_SMBUS_READ_BYTE_DATA",
    "I2C_FUNC_SMBUS_READ_I2C_BLOCK",
    "I2C_FUNC_SMBUS_READ_WORD_DATA",
    "I2C_FUNC_SMBUS_WRITE_BYTE",
    "I2C_FUNC_SMBUS_WRITE_BYTE_DATA",
    "I2C_FUNC_SMBUS_WRITE_I2C_BLOCK",
    "I2C_FUNC_SMBUS_WRITE_WORD_DATA",
    "SIM_ADAPTER_NAME",
    "SMBUS_FUNCS",
    "Eeprom24c02",
    "HostAdapter",
    "I2cAdapter",
    "I2cBus",
    "I2cError",
    "I2cMsg",
    "SimAdapter",
    "SimSmbus",
    "Smbus2Port",
    "SmbusOp",
    "SmbusPort",
    "find_adapter",
    "run_smbus_plan",
    "smbus_plan",
]

log = logging.getLogger(__name__)

# Adapter functionality bits (linux/i2c.h, I2C_FUNCS).
I2C_FUNC_I2C = 0x00000001
I2C_FUNC_SMBUS_QUICK = 0x00010000
I2C_FUNC_SMBUS_READ_BYTE = 0x00020000
I2C_FUNC_SMBUS_WRITE_BYTE = 0x00040000
I2C_FUNC_SMBUS_READ_BYTE_DATA = 0x00080000
I2C_FUNC_SMBUS_WRITE_BYTE_DATA = 0x00100000
I2C_FUNC_SMBUS_READ_WORD_DATA = 0x00200000
I2C_FUNC_SMBUS_WRITE_WORD_DATA = 0x00400000
I2C_FUNC_SMBUS_READ_I2C_BLOCK = 0x04000000
I2C_FUNC_SMBUS_WRITE_I2C_BLOCK = 0x08000000
#: What an adapter needs for SMBus mode: byte, byte-data or word-data transfers
#: (upstream's ``I2C_FUNC_SMBUS_ALL``).
SMBUS_FUNCS = (
    I2C_FUNC_SMBUS_READ_BYTE
    | I2C_FUNC_SMBUS_WRITE_BYTE
    | I2C_FUNC_SMBUS_READ_BYTE_DATA
    | I2C_FUNC_SMBUS_WRITE_BYTE_DATA
    | I2C_FUNC_SMBUS_READ_WORD_DATA
    | I2C_FUNC_SMBUS_WRITE_WORD_DATA
)
_I2C_SLAVE = 0x0703
#: SMBus block transfers carry at most this many data bytes.
I2C_SMBUS_BLOCK_MAX = 32
#: The adapter name that selects the simulated bus on the command line.
SIM_ADAPTER_NAME = "sim"
# errnos that mean "nobody answered": expected while the guest scans a bus.
_NAK_ERRNOS = frozenset({errno.ENXIO, errno.EREMOTEIO, errno.EIO})


class I2cError(HostFault):
    """An I2C adapter cannot be found, opened or used.

    Raised at startup (the CLI prints it and exits 1): no adapter of that name, an
    adapter with neither I2C nor SMBus byte/word support, an address that
    ``I2C_SLAVE`` refuses (another driver owns it), ``smbus2`` missing.  Transfers do
    not raise it: they report how many messages completed.
    """


@dataclass(slots=True)
class I2cMsg:
    """One segment of an I2C transaction: a read or a write of ``len(buf)`` bytes.

    ``addr`` is the 7-bit target address.  A write sends ``buf``; a read fills
    ``buf`` in place (its length is the number of bytes to read).
    """

    addr: int
    read: bool
    buf: bytearray = field(default_factory=bytearray)


class I2cAdapter(Protocol):
    """An I2C bus master: runs a group of messages as one combined transaction."""

    #: Shown in logs: ``/dev/i2c-3``, ``sim``.
    name: str
    #: Whether :meth:`transfer` may block (host I/O): the device then runs it on a
    #: worker thread, never on the event loop.
    blocking: bool

    def transfer(self, msgs: Sequence[I2cMsg]) -> int:
        """Run ``msgs`` (one group) as one transaction; return how many completed.

        The count is of messages from the first: ``len(msgs)`` is success, fewer
        means message ``n`` failed and none after it ran.  Never raises for a bus
        error (it is logged, rate-limited); reads fill their ``buf``.
        """
        ...

    def close(self) -> None:
        """Release the adapter; idempotent."""
        ...


# -- the simulated bus ------------------------------------------------------------------------


class Eeprom24c02:
    """A 24C02 serial EEPROM: 256 bytes behind a one-byte address pointer.

    Behaviour (Microchip/Atmel 24C02 datasheets):

    * a write's first byte sets the address pointer; the bytes after it are stored
      from there, the pointer wrapping within its 8-byte page (a page write), and
      it points after the last byte written (still within the page);
    * a read returns bytes from the pointer on, wrapping from 255 to 0 (sequential
      read); a write of the pointer alone followed by a read is a random read;
    * zero-length transfers (SMBus quick) and a write of no bytes are acknowledged;
    * so SMBus byte-data and word-data commands work with the command as the
      address: ``read_word_data(c)`` is bytes ``c`` (low) and ``c + 1`` (high).

    Unlike the chip, a write cycle is instantaneous (no NAK while it programs).
    Fresh memory reads 0xff, like an erased chip.
    """

    SIZE = 256
    PAGE = 8

    def __init__(self, data: bytes | None = None) -> None:
        self.memory = bytearray(b"\xff" * self.SIZE if data is None else data)
        if len(self.memory) != self.SIZE:
            raise ValueError(f"24c02: initial contents are {len(self.memory)} bytes, not {self.SIZE}")
        self.pointer = 0

    def write(self, data: bytes | bytearray) -> None:
        """A write message: pointer, then page-wrapped data bytes."""
        if not data:
            return
        ptr = data[0]
        mem = self.memory
        page = ptr & ~(self.PAGE - 1)
        for b in data[1:]:
            mem[ptr] = b
            ptr = page | ((ptr + 1) & (self.PAGE - 1))
        self.pointer = ptr

    def read(self, buf: bytearray) -> None:
        """A read message: ``len(buf)`` bytes from the pointer on, wrapping at 256."""
        n = len(buf)
        ptr = self.pointer
        mem = self.memory
        if ptr + n <= self.SIZE:
            buf[:] = mem[ptr : ptr + n]
        else:
            for i in range(n):
                buf[i] = mem[(ptr + i) & 0xFF]
        self.pointer = (ptr + n) & 0xFF


class SimAdapter:
    """A simulated I2C adapter with a :class:`Eeprom24c02` at each address.

    Raw I2C (it has every SMBus function too, since every SMBus command is a short
    I2C transaction): a message to an address with no EEPROM is not acknowledged,
    which ends the transaction there, as on a real bus.

    Raises:
        ValueError: an address is not a 7-bit address.
    """

    blocking = False
    funcs = I2C_FUNC_I2C | SMBUS_FUNCS | I2C_FUNC_SMBUS_QUICK | I2C_FUNC_SMBUS_READ_I2C_BLOCK
    funcs |= I2C_FUNC_SMBUS_WRITE_I2C_BLOCK

    def __init__(self, addresses: Iterable[int], name: str = SIM_ADAPTER_NAME) -> None:
        self.name = name
        self.devices: dict[int, Eeprom24c02] = {}
        for addr in addresses:
            if not 0 <= addr < 128:
                raise ValueError(f"sim adapter: address {addr} is not a 7-bit address (0..=127)")
            self.devices[addr] = Eeprom24c02()
        # Sockets are served on different threads and share this bus.
        self._lock = threading.Lock()
        #: Transactions run and messages NAKed, since the adapter was made.
        self.transactions = 0
        self.naks = 0

    def transfer(self, msgs: Sequence[I2cMsg]) -> int:
        """Run ``msgs`` against the EEPROMs; stop at the first address that NAKs."""
        devices = self.devices
        with self._lock:
            self.transactions += 1
            for i, msg in enumerate(msgs):
                dev = devices.get(msg.addr)
                if dev is None:
                    self.naks += 1
                    return i
                if msg.read:
                    dev.read(msg.buf)
                else:
                    dev.write(msg.buf)
            return len(msgs)

    def close(self) -> None:
        """Nothing to release."""


# -- SMBus: the translation of a group into SMBus commands ------------------------------------


class SmbusPort(Protocol):
    """The SMBus commands an adapter without raw I2C offers (smbus2's names).

    Each raises ``OSError`` when the target does not answer.
    """

    def quick(self, addr: int, read: bool) -> None: ...
    def read_byte(self, addr: int) -> int: ...
    def write_byte(self, addr: int, value: int) -> None: ...
    def read_byte_data(self, addr: int, cmd: int) -> int: ...
    def write_byte_data(self, addr: int, cmd: int, value: int) -> None: ...
    def read_word_data(self, addr: int, cmd: int) -> int: ...
    def write_word_data(self, addr: int, cmd: int, value: int) -> None: ...
    def read_i2c_block_data(self, addr: int, cmd: int, length: int) -> list[int]: ...
    def write_i2c_block_data(self, addr: int, cmd: int, data: list[int]) -> None: ...


@dataclass(frozen=True, slots=True)
class SmbusOp:
    """One SMBus command standing for ``nmsgs`` I2C messages of a group.

    ``kind`` is the :class:`SmbusPort` method; ``cmd`` the command byte (or the
    quick command's direction, or write_byte's value); ``data`` what a write sends
    (the byte, the little-endian word, or the block); ``length`` what a block read
    reads.  ``target`` is the index of the read message its result fills, or -1.
    """

    kind: str
    addr: int
    nmsgs: int
    cmd: int = 0
    data: bytes = b""
    length: int = 0
    target: int = -1


def smbus_plan(msgs: Sequence[I2cMsg], funcs: int) -> list[SmbusOp] | None:
    """The SMBus commands that run ``msgs`` on an adapter with ``funcs``, or None.

    Reverses Linux's SMBus emulation (``i2c_smbus_xfer_emulated``), greedily:

    * a 1-byte write then a read from the same address (repeated START) is a read
      with a command: byte data (1 byte), word data (2), I2C block (3..32);
    * a write alone: quick (0 bytes), byte (1), byte data (2), word data (3), I2C
      block (4..33, the first byte the command);
    * a read alone: quick (0 bytes), byte (1).

    A pair the adapter cannot do as one command is tried as two commands; a
    message no command covers (a read of 2 bytes without a command, a write above
    33 bytes), or a command the adapter lacks, makes the whole group impossible:
    None, before anything reaches the bus.  Upstream knows quick, byte, byte data
    and word data, for groups of one or two messages only.
    """
    ops: list[SmbusOp] = []
    i = 0
    n = len(msgs)
    while i < n:
        m = msgs[i]
        if not m.read and len(m.buf) == 1 and i + 1 < n and msgs[i + 1].read and msgs[i + 1].addr == m.addr:
            r = len(msgs[i + 1].buf)
            cmd = m.buf[0]
            pair: SmbusOp | None = None
            if r == 1 and funcs & I2C_FUNC_SMBUS_READ_BYTE_DATA:
                pair = SmbusOp("read_byte_data", m.addr, 2, cmd, target=i + 1)
            elif r == 2 and funcs & I2C_FUNC_SMBUS_READ_WORD_DATA:
                pair = SmbusOp("read_word_data", m.addr, 2, cmd, target=i + 1)
            elif 1 <= r <= I2C_SMBUS_BLOCK_MAX and funcs & I2C_FUNC_SMBUS_READ_I2C_BLOCK:
                pair = SmbusOp("read_i2c_block_data", m.addr, 2, cmd, length=r, target=i + 1)
            if pair is not None:
                ops.append(pair)
                i += 2
                continue
        op = _single_op(m, i, funcs)
        if op is None:
            return None
        ops.append(op)
        i += 1
    return ops


def _single_op(m: I2cMsg, i: int, funcs: int) -> SmbusOp | None:
    """The SMBus command for message ``i`` alone, or None."""
    n = len(m.buf)
    if n == 0:
        return SmbusOp("quick", m.addr, 1, int(m.read)) if funcs & I2C_FUNC_SMBUS_QUICK else None
    if m.read:
        if n == 1 and funcs & I2C_FUNC_SMBUS_READ_BYTE:
            return SmbusOp("read_byte", m.addr, 1, target=i)
        return None
    b = bytes(m.buf)
    if n == 1 and funcs & I2C_FUNC_SMBUS_WRITE_BYTE:
        return SmbusOp("write_byte", m.addr, 1, b[0])
    if n == 2 and funcs & I2C_FUNC_SMBUS_WRITE_BYTE_DATA:
        return SmbusOp("write_byte_data", m.addr, 1, b[0], b[1:])
    if n == 3 and funcs & I2C_FUNC_SMBUS_WRITE_WORD_DATA:
        return SmbusOp("write_word_data", m.addr, 1, b[0], b[1:])
    if 2 <= n <= I2C_SMBUS_BLOCK_MAX + 1 and funcs & I2C_FUNC_SMBUS_WRITE_I2C_BLOCK:
        return SmbusOp("write_i2c_block_data", m.addr, 1, b[0], b[1:])
    return None


def run_smbus_plan(port: SmbusPort, ops: Sequence[SmbusOp], msgs: Sequence[I2cMsg]) -> int:
    """Run ``ops`` (from :func:`smbus_plan` for ``msgs``) on ``port``; return how
    many messages completed.

    The first command that fails (``OSError``: a NAK, an adapter gone) ends the run
    and is logged; every message it stands for counts as failed.  Read results
    fill the read messages' buffers.
    """
    done = 0
    for op in ops:
        try:
            result = _run_op(port, op)
        except OSError as e:
            _note_bus_error(port, op.addr, e)
            return done
        if op.target >= 0:
            buf = msgs[op.target].buf
            if op.kind == "read_word_data":
                assert isinstance(result, int)
                buf[0] = result & 0xFF
                buf[1] = result >> 8 & 0xFF
            elif op.kind == "read_i2c_block_data":
                assert isinstance(result, list)
                if len(result) != len(buf):  # a short block read is a failed read
                    return done
                buf[:] = bytes(result)
            else:
                assert isinstance(result, int)
                buf[0] = result & 0xFF
        done += op.nmsgs
    return done


def _run_op(port: SmbusPort, op: SmbusOp) -> int | list[int] | None:
    k = op.kind
    if k == "quick":
        port.quick(op.addr, bool(op.cmd))
        return None
    if k == "read_byte":
        return port.read_byte(op.addr)
    if k == "write_byte":
        port.write_byte(op.addr, op.cmd)
        return None
    if k == "read_byte_data":
        return port.read_byte_data(op.addr, op.cmd)
    if k == "write_byte_data":
        port.write_byte_data(op.addr, op.cmd, op.data[0])
        return None
    if k == "read_word_data":
        return port.read_word_data(op.addr, op.cmd)
    if k == "write_word_data":
        port.write_word_data(op.addr, op.cmd, op.data[0] | op.data[1] << 8)
        return None
    if k == "read_i2c_block_data":
        return port.read_i2c_block_data(op.addr, op.cmd, op.length)
    if k == "write_i2c_block_data":
        port.write_i2c_block_data(op.addr, op.cmd, list(op.data))
        return None
    raise AssertionError(f"unknown SMBus op {k!r}")


_bus_errors = RateLimiter()


def _note_bus_error(where: object, addr: int, err: OSError) -> None:
    """Log a failed transfer: debug for a NAK (bus scans are common), else a
    rate-limited warning (an adapter gone, a timeout)."""
    if err.errno in _NAK_ERRNOS:
        log.debug("%s: address %#04x: %s", where, addr, err)
    else:
        _bus_errors.log(log, logging.WARNING, id(where), "%s: address %#04x: %s", where, addr, err)


class SimSmbus:
    """An :class:`SmbusPort` over a :class:`SimAdapter`: each SMBus command as the
    I2C transaction it is on the wire.  Tests compare the SMBus path against raw I2C
    with it; an adapter with only some ``funcs`` can be simulated too."""

    def __init__(self, sim: SimAdapter) -> None:
        self.sim = sim
        #: The commands run, in order (method name, address).
        self.calls: list[tuple[str, int]] = []

    def _xfer(self, name: str, addr: int, *msgs: I2cMsg) -> None:
        self.calls.append((name, addr))
        if self.sim.transfer(msgs) != len(msgs):
            raise OSError(errno.ENXIO, f"no device at {addr:#04x}")

    def quick(self, addr: int, read: bool) -> None:
        self._xfer("quick", addr, I2cMsg(addr, read))

    def read_byte(self, addr: int) -> int:
        m = I2cMsg(addr, True, bytearray(1))
        self._xfer("read_byte", addr, m)
        return m.buf[0]

    def write_byte(self, addr: int, value: int) -> None:
        self._xfer("write_byte", addr, I2cMsg(addr, False, bytearray([value])))

    def read_byte_data(self, addr: int, cmd: int) -> int:
        m = I2cMsg(addr, True, bytearray(1))
        self._xfer("read_byte_data", addr, I2cMsg(addr, False, bytearray([cmd])), m)
        return m.buf[0]

    def write_byte_data(self, addr: int, cmd: int, value: int) -> None:
        self._xfer("write_byte_data", addr, I2cMsg(addr, False, bytearray([cmd, value])))

    def read_word_data(self, addr: int, cmd: int) -> int:
        m = I2cMsg(addr, True, bytearray(2))
        self._xfer("read_word_data", addr, I2cMsg(addr, False, bytearray([cmd])), m)
        return m.buf[0] | m.buf[1] << 8

    def write_word_data(self, addr: int, cmd: int, value: int) -> None:
        data = bytearray([cmd, value & 0xFF, value >> 8])
        self._xfer("write_word_data", addr, I2cMsg(addr, False, data))

    def read_i2c_block_data(self, addr: int, cmd: int, length: int) -> list[int]:
        m = I2cMsg(addr, True, bytearray(length))
        self._xfer("read_i2c_block_data", addr, I2cMsg(addr, False, bytearray([cmd])), m)
        return list(m.buf)

    def write_i2c_block_data(self, addr: int, cmd: int, data: list[int]) -> None:
        self._xfer("write_i2c_block_data", addr, I2cMsg(addr, False, bytearray([cmd, *data])))


# -- /dev/i2c-N -----------------------------------------------------------------------------


class Smbus2Port:
    """An :class:`SmbusPort` over an open ``smbus2.SMBus`` (``I2C_SMBUS`` ioctls).

    ``bus`` is typed ``Any``: smbus2 is optional and its quick read goes through
    its module's ``ioctl`` (tests replace that with a simulated kernel).
    """

    def __init__(self, bus: Any) -> None:
        self.bus = bus

    def quick(self, addr: int, read: bool) -> None:
        if not read:
            self.bus.write_quick(addr)
            return
        # smbus2 has no quick read (the R/W bit set): build the ioctl it would.
        impl: Any = importlib.import_module("smbus2.smbus2")

        self.bus._set_address(addr)
        msg = impl.i2c_smbus_ioctl_data.create(
            read_write=impl.I2C_SMBUS_READ, command=0, size=impl.I2C_SMBUS_QUICK
        )
        impl.ioctl(self.bus.fd, impl.I2C_SMBUS, msg)

    def read_byte(self, addr: int) -> int:
        return int(self.bus.read_byte(addr))

    def write_byte(self, addr: int, value: int) -> None:
        self.bus.write_byte(addr, value)

    def read_byte_data(self, addr: int, cmd: int) -> int:
        return int(self.bus.read_byte_data(addr, cmd))

    def write_byte_data(self, addr: int, cmd: int, value: int) -> None:
        self.bus.write_byte_data(addr, cmd, value)

    def read_word_data(self, addr: int, cmd: int) -> int:
        return int(self.bus.read_word_data(addr, cmd))

    def write_word_data(self, addr: int, cmd: int, value: int) -> None:
        self.bus.write_word_data(addr, cmd, value)

    def read_i2c_block_data(self, addr: int, cmd: int, length: int) -> list[int]:
        return list(self.bus.read_i2c_block_data(addr, cmd, length))

    def write_i2c_block_data(self, addr: int, cmd: int, data: list[int]) -> None:
        self.bus.write_i2c_block_data(addr, cmd, data)


def _import_smbus2() -> Any:
    try:
        import smbus2  # noqa: PLC0415 - optional: only real adapters need it
    except ImportError as e:
        raise I2cError(
            "I2C adapters need the smbus2 package (pip install smbus2, or the 'hosts' extra)"
        ) from e
    return smbus2


class HostAdapter:
    """``/dev/i2c-<number>``: raw I2C (``I2C_RDWR``) or SMBus, chosen by ``I2C_FUNCS``.

    Mode, as upstream: ``I2C_FUNC_I2C`` gives raw mode, one ``I2C_RDWR`` per group
    (all its messages or none: the ioctl does not say which failed); otherwise any
    SMBus byte, byte-data or word-data function gives SMBus mode, a group becoming
    SMBus commands by :func:`smbus_plan` (block transfers too where ``funcs`` has
    them); otherwise the adapter is refused.  Transfers hold a lock: SMBus commands
    need ``I2C_SLAVE`` then ``I2C_SMBUS`` on the shared fd, uninterrupted.

    ``bus`` is an open ``smbus2.SMBus``-like object (tests give a fake); by default
    the node is opened.  ``compiled`` (the default): the transfers are the compiled
    ioctls of :class:`~virtio_devices.hosts._i2c_dev.I2cDevPort` on the bus's fd
    (:attr:`dev_port`, which also runs the adapter's thread for the device's
    compiled request path), which cover every SMBus command :func:`smbus_plan`
    makes, so ``smbus2`` only opens the node and reads ``I2C_FUNCS``; False: each
    transfer goes through ``smbus2`` (the reference the compiled path is tested
    against).

    Raises:
        I2cError: the node cannot be opened (or ``smbus2`` is missing), or the
            adapter offers neither I2C nor SMBus byte/word transfers.
    """

    blocking = True

    def __init__(
        self, number: int, *, bus: Any = None, path: str | None = None, compiled: bool = True
    ) -> None:
        self.number = number
        self.name = path or f"/dev/i2c-{number}"
        if bus is None:
            smbus2 = _import_smbus2()
            try:
                bus = smbus2.SMBus(self.name)
            except OSError as e:
                raise I2cError(f"Failed to open adapter at {self.name}: {e}") from e
        self.bus = bus
        self.funcs = int(bus.funcs)
        if self.funcs & I2C_FUNC_I2C:
            self.smbus = False
        elif self.funcs & SMBUS_FUNCS:
            self.smbus = True
        else:
            self.close()
            raise I2cError(
                f"adapter {self.name}: Invalid Adapter function: {self.funcs:#x} "
                "(neither I2C_FUNC_I2C nor SMBus byte/byte-data/word-data)"
            )
        self.port = Smbus2Port(bus)
        self._lock = threading.Lock()
        #: The compiled ioctls and the adapter's thread; None: through smbus2.
        self.dev_port: I2cDevPort | None = None
        fd = getattr(bus, "fd", None)
        if compiled and isinstance(fd, int) and fd >= 0:
            from ._i2c_dev import I2cDevPort  # noqa: PLC0415 - compiled, loaded with the first adapter

            self.dev_port = I2cDevPort(fd, self.funcs)

    def __repr__(self) -> str:
        return self.name

    def check_address(self, addr: int) -> None:
        """Claim ``addr`` with ``I2C_SLAVE``, as upstream does for every address at start.

        Raises:
            I2cError: the kernel refuses it (a driver is bound to it: EBUSY).
        """
        try:
            if self.dev_port is not None:
                self.dev_port.set_address(addr)
            else:
                with self._lock:
                    self.bus._set_address(addr)
        except OSError as e:
            raise I2cError(f"adapter {self.name}: address {addr}: I2C_SLAVE failed: {e}") from e

    def transfer(self, msgs: Sequence[I2cMsg]) -> int:
        """One group: ``I2C_RDWR`` (raw mode) or its SMBus commands (SMBus mode)."""
        if self.dev_port is not None:
            done, err = self.dev_port.transfer(msgs)
            if done < len(msgs):
                if err:
                    addr = msgs[min(done, len(msgs) - 1)].addr if msgs else 0
                    _note_bus_error(self, addr, OSError(err, os.strerror(err)))
                elif self.smbus:
                    log.debug("%s: no SMBus command for group %s", self.name, _shape(msgs))
            return done
        if self.smbus:
            ops = smbus_plan(msgs, self.funcs)
            if ops is None:
                log.debug("%s: no SMBus command for group %s", self.name, _shape(msgs))
                return 0
            with self._lock:
                return run_smbus_plan(self.port, ops, msgs)
        from smbus2 import i2c_msg  # noqa: PLC0415 - a raw-mode adapter was opened with it

        rdwr = [
            i2c_msg.read(m.addr, len(m.buf)) if m.read else i2c_msg.write(m.addr, bytes(m.buf)) for m in msgs
        ]
        try:
            with self._lock:
                self.bus.i2c_rdwr(*rdwr)
        except OSError as e:
            _note_bus_error(self, msgs[0].addr if msgs else 0, e)
            return 0
        for m, r in zip(msgs, rdwr, strict=True):
            if m.read and m.buf:
                # i2c_msg.buf is a ctypes char pointer: slicing copies the bytes read.
                m.buf[:] = r.buf[: len(m.buf)]
        return len(msgs)

    def close(self) -> None:
        """Stop the adapter's thread and close its fd; idempotent."""
        port, self.dev_port = getattr(self, "dev_port", None), None
        if port is not None:
            port.close()
        bus, self.bus = getattr(self, "bus", None), None
        if bus is not None:
            bus.close()


def _shape(msgs: Sequence[I2cMsg]) -> str:
    return " ".join(f"{'r' if m.read else 'w'}{len(m.buf)}@{m.addr:#04x}" for m in msgs)


# -- the bus: which address is on which adapter -------------------------------------------


class I2cBus:
    """The adapters a daemon exposes and the 7-bit addresses each one serves.

    Every address is on one adapter (the CLI refuses duplicates).  Shared by every
    socket of a daemon, as upstream's ``I2cMap``.

    Raises:
        ValueError: an address is not 7-bit, or appears on two adapters.
    """

    def __init__(self, adapters: Iterable[tuple[I2cAdapter, Iterable[int]]]) -> None:
        items = adapters.items() if isinstance(adapters, Mapping) else adapters
        self.adapters: list[I2cAdapter] = []
        self._by_addr: list[I2cAdapter | None] = [None] * 128
        for adapter, addrs in items:
            self.adapters.append(adapter)
            for addr in addrs:
                if not 0 <= addr < 128:
                    raise ValueError(f"i2c bus: address {addr} is not a 7-bit address (0..=127)")
                if self._by_addr[addr] is not None:
                    raise ValueError(f"i2c bus: address {addr} is on two adapters")
                self._by_addr[addr] = adapter

    def adapter_for(self, addr: int) -> I2cAdapter | None:
        """The adapter serving 7-bit address ``addr``, or None (nothing there)."""
        return self._by_addr[addr] if 0 <= addr < 128 else None

    def addresses(self) -> list[int]:
        """Every address served, ascending."""
        return [a for a in range(128) if self._by_addr[a] is not None]

    def __iter__(self) -> Iterator[I2cAdapter]:
        return iter(self.adapters)

    def close(self) -> None:
        """Close every adapter."""
        for adapter in self.adapters:
            adapter.close()


# -- finding adapters by name ------------------------------------------------------------------

SYSFS_I2C_DEVICES = "/sys/bus/i2c/devices"


def find_adapter(name: str, sysfs: str | os.PathLike[str] = SYSFS_I2C_DEVICES) -> int:
    """The number N of the adapter ``i2c-N`` whose sysfs ``name`` is ``name``.

    Names are compared trimmed, as upstream does.  Only adapters (``i2c-N``
    entries) are considered, not the client devices listed beside them.

    Raises:
        I2cError: no adapter has that name ("Adapter not found"), or several do
            ("Multiple adapters share the same name"), or sysfs cannot be read.
    """
    root = Path(sysfs)
    found: list[int] = []
    try:
        entries = sorted(root.iterdir())
    except OSError as e:
        raise I2cError(f"adapter {name!r}: cannot list {root}: {e}") from e
    for entry in entries:
        prefix, _, num = entry.name.partition("-")
        if prefix != "i2c" or not num.isdigit():
            continue
        try:
            text = (entry / "name").read_text()
        except OSError:
            continue
        if text.strip() == name:
            found.append(int(num))
    if not found:
        raise I2cError(f"Adapter not found: no I2C adapter named {name!r} in {root}")
    if len(found) > 1:
        listed = ", ".join(f"i2c-{n}" for n in found)
        raise I2cError(f"Multiple adapters share the same name {name!r} ({listed}): choose one by number")
    return found[0]
