"""virtio-vsock (VIRTIO 1.2 §5.10): stream and seqpacket sockets between a guest and the host.

The guest-visible device is upstream's (rust-vmm/vhost-device ``vhost-device-vsock``):
virtio id 19, three queues (rx 0, tx 1, event 2) of ``--queue-size`` entries,
VERSION_1, NOTIFY_ON_EMPTY and EVENT_IDX without INDIRECT_DESC, and a config space
holding ``guest_cid`` (le64, §5.10.4).  We also offer ``VIRTIO_VSOCK_F_SEQPACKET``
(§5.10.3), which upstream lacks.

Packets (§5.10.6) are a 44-byte little-endian header (:data:`HDR`) and a payload.
The guest sends on tx; the device answers and forwards host data on rx, in buffers
the driver posted there.  Each connection is keyed by (local port, peer port), the
host's port first (§5.10.6.2 addressing: the host is CID 2).  Its host end is a
socket from the device's :class:`~virtio_devices.hosts.vsock.VsockHost`:

* guest ``REQUEST`` to host port P: ``host.connect(P)``; ``RESPONSE`` on success,
  ``RST`` at once on failure (upstream leaves the guest waiting for its timeout);
* a host client of a listener (hybrid vsock: after its ``CONNECT <port>\\n`` line)
  gets a fresh host-side port; the device sends ``REQUEST``, and on the guest's
  ``RESPONSE`` writes ``OK <host port>\\n`` to the client, as Firecracker does
  (upstream echoes the guest's port; see README "Differences");
* ``RW`` payload goes from the tx buffers to the host socket with ``writev``
  (:meth:`~virtio_queue.Reader.write_to_fd`) and from the host socket into the rx
  buffers with ``readv`` (:meth:`~virtio_queue.Writer.read_from_fd`): no Python
  object per payload.  Only what a full host socket does not take is copied, into
  the connection's buffer of at most ``buf_alloc`` bytes, and only that connection
  waits for the socket to become writable;
* ``SHUTDOWN`` flags map to ``shutdown(2)`` of the host socket in each direction
  (a half-close crosses both ways), host end of file to ``SHUTDOWN(SEND)`` (with
  ``RCV`` too when the host closed both directions), ``RST`` to a close.

Credit (§5.10.6.3): every packet we send carries ``buf_alloc`` (``--tx-buffer-size``)
and ``fwd_cnt`` (bytes of the guest's payload handed to the host socket).  A guest
``RW`` beyond the free space it was told of is a violation: the connection is reset
and no byte of it reaches the host out of order.  Host data is read only while the
guest's own credit (its ``buf_alloc`` minus what we sent and it did not forward)
allows; at zero we send one ``CREDIT_REQUEST``.  A ``CREDIT_UPDATE`` goes out as soon
as the guest's view of our free space falls below half, and whenever a full host
socket has taken the last buffered byte, so a guest writing 64 KiB packets into a
64 KiB buffer never stalls.

The common packets take a compiled path (:mod:`virtio_devices._vsock_fast`): a
stream's ``RW``, ``CREDIT_UPDATE``, ``RST`` and ``RESPONSE`` on tx, and its
``REQUEST`` to a Unix host (the connect made in C); its data, ``REQUEST``,
``RESPONSE``, ``SHUTDOWN`` after the host's end of file and credit packets on
rx.  Every other packet goes through :meth:`VsockDevice.handle_chain` and the
Python producers; both paths make the same packets (the tests run both).

The tx nap (``tx_nap_us``, on by default): after a tx drain that took stream data
the loop thread waits a few microseconds for the driver's next packets, kicks
still off (§2.7.10), and drains again, unless anything else the loop watches
turns ready first; a streaming driver then kicks a fraction as often
(``_vsock_fast.drain_tx``).

A VM pause (the transport's :meth:`VsockDevice.reset` when every ring stops) keeps
the connections; :meth:`VsockDevice.close` ends them (see ``reset`` for a driver
reset).

Sibling VMs: a packet whose destination CID is another VM served by the same
process (:class:`VsockRegistry`) and sharing a group with this one is copied to that
VM's inbox, which that VM's own event loop empties into its rx queue (each loop owns
its rings); a paused VM's inbox waits for its resume.  Other destinations are
dropped, as upstream does.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Iterable
from typing import Final, cast

from virtio_queue import DescriptorChain, Reader, Writer

from . import _vsock_fast
from ._vsock_fast import Conn as _Conn
from .base import VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, Park, VirtioDevice
from .errors import MalformedRequest
from .hosts.vsock import Listener, UnixHost, VsockHost

__all__ = [
    "HDR",
    "HOST_CID",
    "VIRTIO_ID_VSOCK",
    "VIRTIO_VSOCK_F_SEQPACKET",
    "Hdr",
    "VsockDevice",
    "VsockRegistry",
    "parse_connect_line",
]

log = logging.getLogger(__name__)

#: Virtio device id of the socket device (VIRTIO 1.2 §5).
VIRTIO_ID_VSOCK: Final = 19
#: Feature bit 1 (§5.10.3): SOCK_SEQPACKET.  Bit 0 (STREAM) is implied when no bit is.
VIRTIO_VSOCK_F_SEQPACKET: Final = 1 << 1
#: The host's CID (§5.10.6.2: well-known address 2).
HOST_CID: Final = 2

RX, TX, EVENT = 0, 1, 2

#: ``struct virtio_vsock_hdr`` (§5.10.6): src_cid, dst_cid, src_port, dst_port, len,
#: type, op, flags, buf_alloc, fwd_cnt.
HDR: Final = struct.Struct("<QQIIIHHIII")
HDR_FMT: Final = "QQIIIHHIII"
HDR_SIZE: Final = HDR.size  # 44

TYPE_STREAM, TYPE_SEQPACKET = 1, 2
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = 1, 2, 3, 4, 5, 6, 7
SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2
SHUTDOWN_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND
#: RW flags of a seqpacket message (§5.10.6.6): end of message, end of record.
SEQ_EOM, SEQ_EOR = 1, 2

U32 = 0xFFFFFFFF
#: The longest ``CONNECT <port>\\n`` line a host client may send (Firecracker's bound
#: is of the same order); longer is refused.
MAX_CONNECT_LINE = 64
#: Seconds a host client has to send its ``CONNECT`` line.
CONNECT_TIMEOUT = 10.0
#: Host-side ports of host-initiated connections: from here up (Firecracker's choice,
#: far above the ports guests and host services listen on).
LOCAL_PORT_FIRST = 1 << 30
LOCAL_PORT_LAST = (1 << 31) - 1
#: Largest seqpacket record read from a host socket at once.
MAX_RECORD = 1 << 18
#: Packets queued for rx that belong to no connection (RSTs, a sibling's packets).
MAX_LOOSE = 4096
#: The tx nap (``_vsock_fast.drain_tx``): how long the loop thread waits, after a
#: tx drain that took stream data, for the driver's next packets before it asks
#: for a kick again (µs; 0: never; the CLI's ``VHD_VSOCK_TX_NAP_US``), and the most.
TX_NAP_US = 15
TX_NAP_US_MAX = 1000
# recv flags of the end-of-file check, as a plain int (or-ing the enums costs more
# than the call).
_PEEK_NOW = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)

# Pending rx operations of a connection, highest priority first.
_P_RST, _P_REQUEST, _P_RESPONSE, _P_SHUTDOWN, _P_CREDIT_UPDATE, _P_CREDIT_REQUEST = 1, 2, 4, 8, 16, 32


class Hdr:
    """A parsed packet header (§5.10.6); only :func:`Hdr.parse` makes one."""

    __slots__ = (
        "buf_alloc",
        "dst_cid",
        "dst_port",
        "flags",
        "fwd_cnt",
        "len",
        "op",
        "src_cid",
        "src_port",
        "type",
    )

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    @classmethod
    def parse(cls, data: bytes) -> Hdr:
        """The header in the first 44 bytes of ``data``.

        Raises:
            MalformedRequest: fewer than 44 bytes (§5.10.6: every packet starts
                with the whole header).
        """
        if len(data) < HDR_SIZE:
            raise MalformedRequest(f"vsock header needs {HDR_SIZE} bytes, packet has {len(data)}")
        return cls.from_fields(HDR.unpack_from(data))

    @classmethod
    def from_fields(cls, fields: tuple[object, ...]) -> Hdr:
        """A header from the ten values of :data:`HDR`, in order."""
        h = cls()
        (
            h.src_cid,
            h.dst_cid,
            h.src_port,
            h.dst_port,
            h.len,
            h.type,
            h.op,
            h.flags,
            h.buf_alloc,
            h.fwd_cnt,
        ) = fields  # type: ignore[assignment]
        return h

    def pack(self) -> bytes:
        return HDR.pack(
            self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len,
            self.type, self.op, self.flags, self.buf_alloc, self.fwd_cnt,
        )  # fmt: skip


def parse_connect_line(line: bytes) -> int:
    """The guest port of a hybrid-vsock ``CONNECT <port>`` line (newline excluded).

    Firecracker's protocol: the keyword (any case), whitespace, a decimal u32.

    Raises:
        ValueError: anything else, naming what was wrong.
    """
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"CONNECT line is not ASCII: {line[:MAX_CONNECT_LINE]!r}") from None
    parts = text.split()
    if len(parts) != 2 or parts[0].upper() != "CONNECT":
        raise ValueError(f"expected 'CONNECT <port>', got {text[:MAX_CONNECT_LINE]!r}")
    port = parts[1]
    if not (port.isascii() and port.isdigit()) or int(port) > U32:
        raise ValueError(f"CONNECT port must be a decimal u32, not {port!r}")
    return int(port)


class VsockRegistry:
    """The VMs of one process by CID, for sibling delivery (groups) and CID uniqueness.

    Thread-safe: each VM's device lives on its own event loop thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._devices: dict[int, VsockDevice] = {}

    def register(self, device: VsockDevice) -> None:
        """Make ``device`` reachable at its CID (a device made for the same VM later
        replaces it: the front-end reconnected)."""
        with self._lock:
            self._devices[device.guest_cid] = device

    def unregister(self, device: VsockDevice) -> None:
        with self._lock:
            if self._devices.get(device.guest_cid) is device:
                del self._devices[device.guest_cid]

    def deliver(self, sender: VsockDevice, dst_cid: int, header: bytes, payload: bytes) -> bool:
        """Queue a packet of ``sender`` for the VM at ``dst_cid``, if the two share a
        group; whether it was queued (else the caller drops it).

        The packet waits in the target's inbox, which its own loop empties into its
        rx queue; while the target is paused (its rings stopped) it waits there
        until it resumes, so a pause loses no sibling packet.  At most
        :data:`MAX_LOOSE` wait."""
        with self._lock:
            target = self._devices.get(dst_cid)
            if target is None or target is sender or not (target.groups & sender.groups):
                return False
            inbox = target._inbox
            if len(inbox) >= MAX_LOOSE:
                return False
            inbox.append((header, payload))
            loop = target.loop
            if loop is not None and not target._paused and not target._inbox_posted:
                target._inbox_posted = True
                loop.call_soon_threadsafe(target._take_inbox)
            return True

    def take(self, device: VsockDevice, paused: bool | None = None) -> list[tuple[bytes, bytes]]:
        """Empty ``device``'s inbox (its loop thread, under the lock), and mark it
        paused or running if ``paused`` is given."""
        with self._lock:
            if paused is not None:
                device._paused = paused
            device._inbox_posted = False
            out = list(device._inbox)
            device._inbox.clear()
            return out


class VsockDevice(VirtioDevice):
    """The socket device of one guest (see the module docstring).

    Args:
        guest_cid: the guest's CID (config space, §5.10.4); packets from another
            source CID are dropped.
        host: where connections' host ends are (hybrid Unix sockets or AF_VSOCK).
        tx_buffer_size: ``buf_alloc`` we advertise per connection (§5.10.6.3).
        queue_size: maximum size of each of the three queues.
        groups: sibling groups of this VM.
        registry: the process's VMs, for sibling delivery; None: no siblings.
        tx_nap_us: the tx nap in µs (``TX_NAP_US``; 0: none), taken on a loop that
            tells when it has work (``fileno()``, as ``DeviceLoop``'s).
        nogil: serve the steady state of a stream (host to guest, guest to host)
            without the GIL where the loop runs pumps' nogil paths
            (``_vsock_fast.KickPump``, ``InputPump``); False: always with it (the
            pumps offer no nogil path, the rings are served and polled as before).

    Raises:
        ValueError: ``tx_nap_us`` is not from 0 to ``TX_NAP_US_MAX``.
    """

    device_id = VIRTIO_ID_VSOCK
    name = "vsock"
    has_config = True
    # Upstream's bits: no INDIRECT_DESC; SEQPACKET is ours.
    features = (
        VIRTIO_F_VERSION_1 | VIRTIO_F_NOTIFY_ON_EMPTY | VIRTIO_RING_F_EVENT_IDX | VIRTIO_VSOCK_F_SEQPACKET
    )

    def __init__(
        self,
        guest_cid: int,
        host: VsockHost,
        *,
        tx_buffer_size: int = 65536,
        queue_size: int = 1024,
        groups: Iterable[str] = ("default",),
        registry: VsockRegistry | None = None,
        tx_nap_us: int = TX_NAP_US,
        nogil: bool = True,
    ) -> None:
        if not 0 <= tx_nap_us <= TX_NAP_US_MAX:
            raise ValueError(f"tx_nap_us must be from 0 to {TX_NAP_US_MAX}, not {tx_nap_us}")
        super().__init__()
        self.guest_cid = guest_cid
        self.host = host
        self.buf_alloc = tx_buffer_size
        self.queue_sizes = (queue_size, queue_size, queue_size)
        self.groups = frozenset(groups)
        self.registry = registry
        self.conns: dict[tuple[int, int], _Conn] = {}
        self._by_fd: dict[int, _Conn] = {}
        self._ready: collections.deque[_Conn] = collections.deque()
        # Packets for rx that belong to no connection: (header, payload).
        self._loose: collections.deque[tuple[bytes, bytes]] = collections.deque()
        # Host clients before their CONNECT line: socket and timeout (None while paused).
        self._handshakes: dict[int, tuple[socket.socket, object | None]] = {}
        self._local_ports: set[int] = set()
        self._next_port = LOCAL_PORT_FIRST
        self._wep: select.epoll | None = None
        self._listeners: list[Listener] = []
        # Sibling packets for this VM (VsockRegistry.deliver), under the registry's
        # lock; whether a loop callback to take them is posted; whether the rings
        # are stopped (the inbox waits for activate then).
        self._inbox: list[tuple[bytes, bytes]] = []
        self._inbox_posted = False
        self._paused = True
        # What the compiled paths read (virtio_devices._vsock_fast): the tables above
        # and the flags below, as C fields.
        self._fast = _vsock_fast.State(
            self.conns, self._ready, self._loose, guest_cid, tx_buffer_size, self._by_fd
        )
        self._fast.nap_ns = tx_nap_us * 1000
        self._fast.owner = self
        self._fast.nogil = nogil
        if isinstance(host, UnixHost) and host.path and not host.path.startswith("\0"):
            # A guest's stream REQUEST is connected in compiled code (UnixHost.connect's
            # path and socket).
            self._fast.set_connect_prefix(os.fsencode(host.path) + b"_")

    # -- config and lifecycle ------------------------------------------------------------
    def config_space(self) -> bytes:
        """``struct virtio_vsock_config`` (§5.10.4): ``le64 guest_cid``."""
        return struct.pack("<Q", self.guest_cid)

    @property
    def broken(self) -> BaseException | None:
        """The bug that broke the device (``VirtioDevice.broken``); setting one also
        stops the nogil paths of the compiled kicks until a pass with the GIL."""
        return self._broken

    @broken.setter
    def broken(self, value: BaseException | None) -> None:
        self._broken = value
        fast = self.__dict__.get("_fast")
        if value is not None and fast is not None:
            fast.live = False

    def _stop_nogil(self) -> None:
        """Stop the nogil paths until the next pass with the GIL (``live`` off) and
        put the connection they scheduled in the ready queue (``unpend``): what
        :meth:`activate` and :meth:`reset` do before they change the rings, the
        listeners or the connections."""
        self._fast.live = False
        self._fast.unpend()

    def compiled_served(self) -> tuple[int, int]:
        """Chains the compiled paths completed, with the GIL and without (their used
        bytes are not counted)."""
        fast = self._fast
        return fast.nogil_chains + fast.chains, 0

    @property
    def _compiled(self) -> bool:
        """Whether the compiled paths serve the common packets (False: everything
        through the Python path; the tests compare the two)."""
        return self._fast.compiled

    @_compiled.setter
    def _compiled(self, value: bool) -> None:
        self._fast.compiled = value

    @property
    def _rx_live(self) -> bool:
        """Whether rx is the device's: not taken back by the front-end since its
        driver last kicked it."""
        return self._fast.rx_live

    @_rx_live.setter
    def _rx_live(self, value: bool) -> None:
        self._fast.rx_live = value

    @property
    def seqpacket(self) -> bool:
        return self.has_feature(VIRTIO_VSOCK_F_SEQPACKET)

    def activate(self, memory, queues, interrupt, loop) -> None:  # type: ignore[no-untyped-def]
        """Start (or resume) the device: watch the listeners, and the host sockets of
        the connections kept across :meth:`reset` again.  Every established kept
        connection gets one ``CREDIT_REQUEST`` (§5.10.6.3): a guest that still has the
        socket answers with its credit, one whose driver was reset answers ``RST``
        (§5.10.6.5: a packet for no connection), which closes the host socket."""
        self._stop_nogil()
        super().activate(memory, queues, interrupt, loop)
        self._rx_live = True
        # The tx nap needs a fd that tells when the loop has work (DeviceLoop.fileno).
        fileno = getattr(loop, "fileno", None)
        self._fast.wait_fd = fileno() if fileno is not None else -1
        # Writability of host sockets: our own epoll set, watched as one fd by the
        # loop, so that only the connection whose socket is full waits.
        self._wep = select.epoll()
        loop.add_reader(self._wep.fileno(), self._on_writable)
        self._listeners = self.host.listeners()
        for listener in self._listeners:
            loop.add_reader(listener.sock.fileno(), self._acceptor(listener))
        for fd in list(self._handshakes):
            self._watch_handshake(fd)
        for conn in list(self.conns.values()):
            if conn.connecting or conn.txbuf or conn.seq_out:
                self._watch_output(conn, True)
            if conn.est:
                conn.ops |= _P_CREDIT_REQUEST
                self._schedule(conn)
            self._watch_input(conn)
        if self.registry is not None:
            self.registry.register(self)
            self._loose.extend(self.registry.take(self, paused=False))
            self._fast.touch()
        if self._ready or self._loose:
            # Packets that waited through the pause: the driver posted its rx buffers
            # before it, and kicks no more for them.
            loop.call_later(0, self._fill_rx)

    def reset(self) -> None:
        """Stop: host sockets and listeners are no longer watched, the queues are
        given back; connections, their credit and the packets they still owe the
        guest are kept for the next :meth:`activate`.

        A vhost-user transport resets the device whenever its rings stop, which QEMU
        does on ``stop`` and before a migration (GET_VRING_BASE on every ring), not
        only when the driver resets it, and it cannot tell the two apart (QEMU sends
        SET_STATUS 0 on every stop too).  The guest's sockets outlive a pause, so
        their host ends must too.  A driver that really resets forgets its
        connections: Linux resets every connected socket when its device goes, as
        it does on the device's ``VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`` (§5.10.6.6),
        and sends nothing for them.  The ``CREDIT_REQUEST`` that :meth:`activate`
        sends on each kept connection then meets ``RST`` (§5.10.6.5: the answer to
        a packet for no socket) and the host end is closed.  :meth:`close` closes
        them all.

        Raises:
            Exception: what the base class's reset raises.
        """
        self._stop_nogil()
        if self.registry is not None:
            # Still the VM at its CID: siblings' packets wait in the inbox.
            self._loose.extend(self.registry.take(self, paused=True))
            self._fast.touch()
        loop = self.loop
        for conn in self.conns.values():
            if (conn.armed or conn.muted) and loop is not None:
                loop.remove_reader(conn.fd)
            conn.armed = conn.muted = False
            conn.want_write = False  # the epoll set goes; activate makes a new one
        for fd, (_sock, timer) in self._handshakes.items():
            if loop is not None:
                loop.remove_reader(fd)
            if timer is not None:
                timer.cancel()  # type: ignore[attr-defined]
            self._handshakes[fd] = (_sock, None)
        if loop is not None:
            for listener in self._listeners:
                loop.remove_reader(listener.sock.fileno())
            if self._wep is not None:
                loop.remove_reader(self._wep.fileno())
        if self._wep is not None:
            self._wep.close()
            self._wep = None
        self._listeners = []
        self._rx_live = False
        self._fast.wait_fd = -1
        super().reset()

    def close(self) -> None:
        """The device is done with (its front-end left): reset it if active, close
        every connection's host socket and every host client still in its
        ``CONNECT`` handshake; the listeners stay open for the next front-end.

        Called once by the vhost-user daemon at the end of each session (a fresh
        device serves the next); closing twice is harmless.
        """
        fast = self._fast
        if fast.naps or fast.naps_cut:
            log.debug("vsock cid %d: tx naps %d, cut short %d", self.guest_cid, fast.naps, fast.naps_cut)
        if fast.nogil_passes:
            log.debug(
                "vsock cid %d: kicks seen without the GIL %d, handed over %d, chains %d",
                self.guest_cid, fast.nogil_passes, fast.nogil_handed, fast.nogil_chains,
            )  # fmt: skip
        try:
            if self.active:
                self.reset()
        finally:
            if self.registry is not None:
                self.registry.unregister(self)
            for conn in list(self.conns.values()):
                self._drop(conn)
            for sock, _timer in self._handshakes.values():
                sock.close()
            self._handshakes.clear()
            self._ready.clear()
            self._loose.clear()
            self._fast.touch()

    def quiesce(self, index: int) -> None:
        self._fast.live = False
        super().quiesce(index)
        if index == RX:
            # The front-end takes rx back: nothing may be written there until it kicks.
            self._rx_live = False

    # -- queues ----------------------------------------------------------------------------
    #: rx: fill the posted buffers with pending packets; tx: serve the guest's packets
    #: (the drain loop, under the framework's error policy), then send what they
    #: produced; event: never used (upstream neither).  Compiled
    #: (:func:`virtio_devices._vsock_fast.process_queue`): a kick costs no Python
    #: frame; the common packets are served there, the rest through
    #: :meth:`handle_chain` and the Python producers.
    process_queue = _vsock_fast.process_queue

    def kick_pump(self, index: int) -> _vsock_fast.KickPump | None:
        """rx and tx kicks served by the vhost-user loop in compiled code
        (:class:`._vsock_fast.KickPump`: :meth:`process_queue` without a Python call)."""
        return _vsock_fast.KickPump(self, index) if index in (RX, TX) else None

    def handle_chain(self, index: int, chain: DescriptorChain) -> int | Park | None:
        """One packet from the guest's tx queue (§5.10.6.4); used length 0 (tx buffers
        are device-readable only).

        Raises:
            MalformedRequest: a header shorter than 44 bytes, or ``len`` beyond the
                chain's readable bytes (the connection is reset too).
        """
        reader = chain.reader()
        avail = reader.available_bytes()
        if avail < HDR_SIZE:
            raise MalformedRequest(f"vsock header needs {HDR_SIZE} bytes, packet has {avail}")
        fields = cast("tuple[int, int, int, int, int, int, int, int, int, int]", reader.read_obj(HDR_FMT))
        hdr = Hdr.from_fields(fields)
        if hdr.len > reader.available_bytes():
            if hdr.src_cid == self.guest_cid and hdr.dst_cid == HOST_CID:
                self._reset_key((hdr.dst_port, hdr.src_port), hdr)
            raise MalformedRequest(
                f"vsock packet len {hdr.len} beyond its buffers ({reader.available_bytes()} bytes)"
            )
        if hdr.src_cid != self.guest_cid:
            # §5.10.6.2: the guest speaks only for its own CID.
            self._warn(
                "src", "packet from cid %d dropped: the guest's cid is %d", hdr.src_cid, self.guest_cid
            )
            return 0
        if hdr.dst_cid != HOST_CID:
            self._to_sibling(hdr, reader)
            return 0
        self._on_packet(hdr, reader)
        return 0

    # -- guest -> host -----------------------------------------------------------------------
    def _on_packet(self, hdr: Hdr, reader: Reader) -> None:
        if hdr.type != TYPE_STREAM and not (hdr.type == TYPE_SEQPACKET and self.seqpacket):
            # §5.10.6: a type the device does not support gets RST.
            self._warn("type", "packet of unsupported type %d refused", hdr.type)
            self._rst_reply(hdr)
            return
        key = (hdr.dst_port, hdr.src_port)
        conn = self.conns.get(key)
        op = hdr.op
        if op == OP_REQUEST:
            if conn is not None:
                self._warn("dup", "REQUEST for open connection %s refused", key)
                self._rst_reply(hdr)
                return
            self._guest_connect(hdr, key)
            return
        if conn is None or conn.dead:
            # §5.10.6.5: a packet for no connection is answered with RST (never an RST).
            if op != OP_RST:
                self._rst_reply(hdr)
            return
        if (hdr.type == TYPE_SEQPACKET) != conn.seq:
            self._reset(conn)
            return
        # Every packet carries the sender's credit (§5.10.6.3).
        conn.peer_buf_alloc = hdr.buf_alloc
        conn.peer_fwd_cnt = hdr.fwd_cnt
        if op == OP_RW:
            self._guest_data(conn, hdr, reader)
        elif op == OP_RESPONSE:
            if conn.est:
                self._reset(conn)
                return
            self._established(conn)
        elif op == OP_RST:
            self._drop(conn)
            return
        elif op == OP_SHUTDOWN:
            self._guest_shutdown(conn, hdr.flags & SHUTDOWN_BOTH)
        elif op == OP_CREDIT_REQUEST:
            self._want(conn, _P_CREDIT_UPDATE)
        elif op == OP_CREDIT_UPDATE:
            pass  # the credit fields were all it had
        else:
            self._warn("op", "unknown op %d: connection %s reset", op, key)
            self._reset(conn)
            return
        if not conn.dead:
            if conn.peer_free() > 0:
                conn.credit_asked = False
            self._watch_input(conn)
            if conn.readable and conn.peer_free() > 0:
                self._schedule(conn)

    def _guest_connect(self, hdr: Hdr, key: tuple[int, int]) -> None:
        seq = hdr.type == TYPE_SEQPACKET
        try:
            sock, pending = self.host.connect(hdr.dst_port, seq)
        except OSError as e:
            # Nothing listens there: RST at once (upstream sends nothing).
            log.info("%s: guest connect to port %d refused: %s", self.host.name, hdr.dst_port, e)
            self._rst_reply(hdr)
            return
        conn = self._add(key, sock, seq)
        conn.peer_buf_alloc, conn.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        if pending:
            # AF_VSOCK: answer once the host's connect is done (the socket turns writable).
            conn.connecting = True
            self._watch_output(conn, True)
            return
        self._want(conn, _P_RESPONSE)
        self._established(conn)

    def _connect_done(self, conn: _Conn) -> None:
        conn.connecting = False
        self._watch_output(conn, False)
        err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            log.info("%s: guest connect to port %d failed: %s", self.host.name, conn.key[0], os.strerror(err))
            self._reset(conn)
            return
        self._want(conn, _P_RESPONSE)
        self._established(conn)

    def _established(self, conn: _Conn) -> None:
        conn.est = True
        if conn.ok_reply:
            conn.ok_reply = False
            line = b"OK %d\n" % conn.key[0]
            try:
                sent = conn.sock.send(line)
            except OSError:
                sent = -1
            if sent != len(line):  # a fresh socket's buffer always takes a line
                self._reset(conn)
                return
        self._watch_input(conn)

    def _guest_data(self, conn: _Conn, hdr: Hdr, reader: Reader) -> None:
        n = hdr.len
        if not conn.est or conn.guest_shut & SHUTDOWN_SEND:
            self._reset(conn)
            return
        if n > self.buf_alloc - conn.pending_tx():
            # §5.10.6.3: the guest sent more than the free space we told it of.
            self._warn("credit", "credit violation on %s: %d bytes, %d free", conn.key, n,
                       self.buf_alloc - conn.pending_tx())  # fmt: skip
            self._reset(conn)
            return
        if conn.seq:
            conn.rx_cnt = (conn.rx_cnt + n) & U32
            conn.seq_msg += reader.read(n)
            if hdr.flags & SEQ_EOM:
                conn.seq_out.append(bytes(conn.seq_msg))
                conn.seq_msg.clear()
            self._flush(conn)
            return
        self._guest_stream_data(conn, reader, n)

    def _guest_stream_data(self, conn: _Conn, reader: Reader, n: int) -> None:
        """``n`` payload bytes of an open stream, within credit: to the host socket."""
        conn.rx_cnt = (conn.rx_cnt + n) & U32
        if conn.txbuf:
            conn.txbuf += reader.read(n)
            return
        try:
            wrote = reader.write_to_fd(conn.fd, n) if n else 0
        except OSError as e:
            self._host_broke(conn, e)
            return
        if wrote < n:
            self._tx_buffer(conn, reader, n - wrote)
        self._forwarded(conn, wrote)
        if (
            conn.credit_asked
            or (conn.readable and not conn.in_ready)
            or (not conn.armed and not conn.readable)
        ):
            self._credit_changed(conn)

    def _tx_buffer(self, conn: _Conn, reader: Reader, n: int) -> None:
        """The host socket is full: keep the packet's last ``n`` bytes until it is
        writable again (only this connection waits)."""
        conn.txbuf += reader.read(n)
        self._watch_output(conn, True)

    def _credit_changed(self, conn: _Conn) -> None:
        """The guest's credit in its last packet may let host data flow again."""
        if conn.peer_free() > 0:
            conn.credit_asked = False
        self._watch_input(conn)
        if conn.readable and conn.peer_free() > 0:
            self._schedule(conn)

    def _forwarded(self, conn: _Conn, n: int, drained: bool = False) -> None:
        """``n`` more guest bytes reached the host: tell the guest (§5.10.6.3
        CREDIT_UPDATE) when its view of our free space falls below half, or when a
        full host socket has just taken the last buffered byte (the guest may be
        waiting for room for one whole packet)."""
        conn.fwd_cnt = (conn.fwd_cnt + n) & U32
        unseen = (conn.fwd_cnt - conn.last_fwd_sent) & U32
        if not unseen:
            return
        if drained or self.buf_alloc - ((conn.rx_cnt - conn.last_fwd_sent) & U32) < self.buf_alloc // 2 + 1:
            self._want(conn, _P_CREDIT_UPDATE)

    def _flush(self, conn: _Conn, woke: bool = False) -> None:
        """Write buffered guest bytes to the host socket as far as it takes them
        (``woke``: the socket has just turned writable after it was full)."""
        sent_total = 0
        try:
            if conn.seq:
                while conn.seq_out:
                    msg = conn.seq_out[0]
                    conn.sock.send(msg)
                    conn.seq_out.popleft()
                    sent_total += len(msg)
            else:
                while conn.txbuf:
                    sent = conn.sock.send(conn.txbuf)
                    del conn.txbuf[:sent]
                    sent_total += sent
        except BlockingIOError:
            pass
        except OSError as e:
            self._host_broke(conn, e)
            return
        busy = bool(conn.txbuf or conn.seq_out)
        if sent_total:
            self._forwarded(conn, sent_total, drained=woke and not busy)
        self._watch_output(conn, busy)
        if not busy:
            self._after_flush(conn)

    def _after_flush(self, conn: _Conn) -> None:
        if conn.guest_shut & SHUTDOWN_SEND and not conn.host_shut & 0x100:
            conn.host_shut |= 0x100  # our SHUT_WR done
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
        if conn.guest_shut == SHUTDOWN_BOTH:
            # §5.10.6.5: a clean disconnect is SHUTDOWN(s) answered by RST.
            self._reset(conn)

    def _guest_shutdown(self, conn: _Conn, flags: int) -> None:
        conn.guest_shut |= flags
        if flags & SHUTDOWN_RCV and not conn.host_shut & 0x200:
            conn.host_shut |= 0x200
            conn.readable = False
            self._watch_input(conn)
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RD)
        if not (conn.txbuf or conn.seq_out):
            self._after_flush(conn)

    def _host_broke(self, conn: _Conn, err: OSError) -> None:
        """The host socket failed mid-stream (reset, broken pipe): RST to the guest."""
        if err.errno not in (errno.EPIPE, errno.ECONNRESET):
            self._warn("host", "host socket of %s failed: %s", conn.key, err)
        self._reset(conn)

    # -- host -> guest ---------------------------------------------------------------------
    def _acceptor(self, listener: Listener) -> Callable[[], None]:
        def accept() -> None:
            try:
                sock, _addr = listener.sock.accept()
            except OSError:
                return  # EAGAIN (another loop took it), ECONNABORTED...
            sock.setblocking(False)
            if listener.handshake:
                self._start_handshake(sock)
            else:
                self._host_connect(sock, listener.guest_port, ok_reply=False)

        return accept

    def _start_handshake(self, sock: socket.socket) -> None:
        self._handshakes[sock.fileno()] = (sock, None)
        self._watch_handshake(sock.fileno())

    def _watch_handshake(self, fd: int) -> None:
        """Wait for the host client's ``CONNECT`` line, for :data:`CONNECT_TIMEOUT`
        seconds (from the start, or again after the device was paused)."""
        assert self.loop is not None
        sock = self._handshakes[fd][0]

        def too_late() -> None:
            self._end_handshake(fd, "no CONNECT line in time")

        self._handshakes[fd] = (sock, self.loop.call_later(CONNECT_TIMEOUT, too_late))
        self.loop.add_reader(fd, lambda: self._on_handshake(fd))

    def _end_handshake(self, fd: int, why: str | None) -> socket.socket | None:
        entry = self._handshakes.pop(fd, None)
        if entry is None:
            return None
        sock, timer = entry
        assert self.loop is not None
        self.loop.remove_reader(fd)
        if timer is not None:
            timer.cancel()  # type: ignore[attr-defined]
        if why is not None:
            self._warn("connect", "%s: host client refused: %s", self.host.name, why)
            sock.close()
            return None
        return sock

    def _on_handshake(self, fd: int) -> None:
        sock = self._handshakes[fd][0]
        try:
            data = sock.recv(MAX_CONNECT_LINE + 1, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError as e:
            self._end_handshake(fd, str(e))
            return
        if not data:
            self._end_handshake(fd, "closed before its CONNECT line")
            return
        end = data.find(b"\n")
        if end < 0:
            if len(data) > MAX_CONNECT_LINE:
                self._end_handshake(fd, f"CONNECT line longer than {MAX_CONNECT_LINE} bytes")
            return
        try:
            port = parse_connect_line(data[:end])
        except ValueError as e:
            self._end_handshake(fd, str(e))
            return
        sock.recv(end + 1)  # the line only: what follows is the connection's data
        taken = self._end_handshake(fd, None)
        assert taken is sock
        self._host_connect(sock, port, ok_reply=True)

    def _host_connect(self, sock: socket.socket, guest_port: int, ok_reply: bool) -> None:
        port = self._alloc_port(guest_port)
        if port is None:
            self._warn("ports", "no free host port for a connection to guest port %d", guest_port)
            sock.close()
            return
        conn = self._add((port, guest_port), sock, False)
        conn.local_alloc = True
        self._local_ports.add(port)
        conn.ok_reply = ok_reply
        self._want(conn, _P_REQUEST)
        self._fill_rx()

    def _alloc_port(self, guest_port: int) -> int | None:
        """A host-side port no open connection uses (upstream may hand out one in use)."""
        span = LOCAL_PORT_LAST - LOCAL_PORT_FIRST + 1
        port = self._next_port
        for _ in range(min(span, len(self._local_ports) + 1)):
            if port not in self._local_ports and (port, guest_port) not in self.conns:
                self._next_port = LOCAL_PORT_FIRST + (port + 1 - LOCAL_PORT_FIRST) % span
                return port
            port = LOCAL_PORT_FIRST + (port + 1 - LOCAL_PORT_FIRST) % span
        return None

    def _on_input(self, conn: _Conn, pump: _vsock_fast.InputPump | None = None) -> None:
        """The host socket has input: wait for rx buffers and credit to take it
        (``pump``: served in compiled code first, when it can)."""
        assert self.loop is not None
        if pump is not None and not pump.pump():
            return
        self.loop.remove_reader(conn.fd)
        conn.armed = conn.muted = False
        conn.readable = True
        self._schedule(conn)
        self._fill_rx()

    def _watch_input(self, conn: _Conn) -> None:
        """Watch the host socket for input exactly when the guest can take some."""
        want = (
            conn.est
            and not conn.dead
            and not conn.readable
            and not conn.host_eof
            and not conn.guest_shut & SHUTDOWN_RCV
            and conn.peer_free() > 0
        )
        if want == conn.armed or self.loop is None:
            return
        conn.armed = want
        if want:
            pump = _vsock_fast.InputPump(self, conn)
            # The pump is the callback too: _on_input when it hands over.  (A socket
            # its nogil path muted is watched again, registered as it is.)
            self.loop.add_reader(conn.fd, pump, pump=pump)
            conn.muted = False
        else:
            self.loop.remove_reader(conn.fd)

    def _watch_output(self, conn: _Conn, want: bool) -> None:
        if want == conn.want_write or self._wep is None:
            return
        conn.want_write = want
        if want:
            self._wep.register(conn.fd, select.EPOLLOUT)
        else:
            self._wep.unregister(conn.fd)

    def _on_writable(self) -> None:
        assert self._wep is not None
        for fd, _ev in self._wep.poll(0):
            conn = self._by_fd.get(fd)
            if conn is None:
                continue
            if conn.connecting:
                self._connect_done(conn)
            else:
                self._flush(conn, woke=True)
        self._fill_rx()

    # -- rx ----------------------------------------------------------------------------------
    def _fill_rx(self) -> None:
        """Write pending packets into the guest's rx buffers (§5.10.6.4), one per chain."""
        _vsock_fast.fill_rx(self, self._fast)

    def _fill_rx_py(self) -> None:
        """:meth:`_fill_rx` in Python (``_compiled`` False), once rx is the device's."""
        queue = self.queues[RX]
        added = 0
        chain: DescriptorChain | None = None
        ready, loose = self._ready, self._loose
        try:
            while loose or ready:
                if chain is None:
                    chain = queue.pop_chain()
                    if chain is None:
                        # Wait for the driver's kick (§2.7.10), unless buffers came meanwhile.
                        if queue.enable_notification():
                            continue
                        break
                writer = chain.writer()
                if writer.available_bytes() < HDR_SIZE:
                    self._warn("rx", "rx buffer of %d bytes cannot hold a header", writer.available_bytes())
                    queue.add_used(chain.head_index, 0)
                    added += 1
                    chain = None
                    continue
                used = self._produce(writer)
                if used is None:
                    continue
                queue.add_used(chain.head_index, used)
                added += 1
                chain = None
        finally:
            if chain is not None:
                # Popped and unused: the next pop returns it (a resubmitted head
                # too, which moving next_avail back would lose).
                queue.unpop(chain.head_index)
            if added:
                self.chains_served += added
                self.notify(RX)

    def _produce(self, writer: Writer) -> int | None:
        """One packet into ``writer``; its length, or None when the work at hand gave none."""
        if self._loose:
            header, payload = self._loose[0]
            body = writer.split_at(HDR_SIZE)
            room = body.available_bytes()
            if len(payload) <= room:
                self._loose.popleft()
                writer.write(header)
                return HDR_SIZE + body.write(payload)
            # A sibling's packet larger than this buffer: split it, the message flags on
            # the last part only (§5.10.6.6).
            h = Hdr.parse(header)
            first, rest = payload[:room], payload[room:]
            flags = h.flags
            h.len, h.flags = room, 0 if h.type == TYPE_SEQPACKET else flags
            writer.write(h.pack())
            h.len, h.flags = len(rest), flags
            self._loose[0] = (h.pack(), rest)
            return HDR_SIZE + body.write(first)
        conn = self._ready.popleft()
        conn.in_ready = False
        self._fast.touch()
        if conn.dead:
            return None
        used = self._produce_conn(conn, writer)
        if not conn.dead and (conn.ops or (conn.readable and conn.peer_free() > 0)):
            self._schedule(conn)
        return used

    def _header(self, writer: Writer, conn: _Conn, op: int, flags: int = 0, length: int = 0) -> None:
        writer.write(
            HDR.pack(HOST_CID, self.guest_cid, conn.key[0], conn.key[1], length,
                     TYPE_SEQPACKET if conn.seq else TYPE_STREAM, op, flags, self.buf_alloc, conn.fwd_cnt)
        )  # fmt: skip
        conn.last_fwd_sent = conn.fwd_cnt
        conn.ops &= ~_P_CREDIT_UPDATE  # every header carries the credit

    def _produce_conn(self, conn: _Conn, writer: Writer) -> int | None:
        ops = conn.ops
        if ops & _P_RST:
            self._header(writer, conn, OP_RST)
            self._drop(conn)
            return HDR_SIZE
        if ops & _P_REQUEST:
            conn.ops &= ~_P_REQUEST
            self._header(writer, conn, OP_REQUEST)
            return HDR_SIZE
        if ops & _P_RESPONSE:
            conn.ops &= ~_P_RESPONSE
            self._header(writer, conn, OP_RESPONSE)
            return HDR_SIZE
        if conn.readable:
            used = self._produce_data(conn, writer)
            if used is not None:
                return used
        return self._produce_ops(conn, writer)

    def _produce_ops(self, conn: _Conn, writer: Writer) -> int | None:
        """The control packet ``conn`` owes after its data (SHUTDOWN, then credit)."""
        ops = conn.ops  # end of file may have asked for SHUTDOWN
        if ops & _P_SHUTDOWN:
            conn.ops &= ~_P_SHUTDOWN
            self._header(writer, conn, OP_SHUTDOWN, conn.host_shut & SHUTDOWN_BOTH)
            return HDR_SIZE
        if ops & _P_CREDIT_UPDATE:
            self._header(writer, conn, OP_CREDIT_UPDATE)
            return HDR_SIZE
        if ops & _P_CREDIT_REQUEST:
            conn.ops &= ~_P_CREDIT_REQUEST
            self._header(writer, conn, OP_CREDIT_REQUEST)
            return HDR_SIZE
        return None

    def _produce_data(self, conn: _Conn, writer: Writer) -> int | None:
        credit = conn.peer_free()
        if credit == 0:
            # §5.10.6.3: ask once for the guest's credit while it has none for us.
            if not conn.credit_asked:
                conn.credit_asked = True
                conn.ops |= _P_CREDIT_REQUEST
            return None
        body = writer.split_at(HDR_SIZE)
        room = min(credit, body.available_bytes())
        if room == 0:
            # A buffer with room for a header only (credit is there): it carries our
            # credit instead (§5.10.6.3), so the data waits for the next buffer and
            # the connection does not come round to this one forever.
            self._header(writer, conn, OP_CREDIT_UPDATE)
            return HDR_SIZE
        flags = 0
        if conn.seq:
            got, flags = self._seq_chunk(conn, body, room)
        else:
            try:
                got = body.read_from_fd(conn.fd, room)
            except OSError as e:
                self._host_broke(conn, e)
                return None
            if got == 0:
                self._no_input(conn)
                return None
            if got < room:
                # Probably drained: let the loop say when there is more.
                conn.readable = False
                self._watch_input(conn)
        if got == 0:
            return None
        self._header(writer, conn, OP_RW, flags, got)
        conn.tx_cnt = (conn.tx_cnt + got) & U32
        if conn.peer_free() == 0 and not conn.credit_asked:
            # §5.10.6.3: ask once for the guest's credit while it has none for us.
            conn.credit_asked = True
            conn.ops |= _P_CREDIT_REQUEST
        return HDR_SIZE + got

    def _seq_chunk(self, conn: _Conn, body: Writer, room: int) -> tuple[int, int]:
        """Part of the host's current seqpacket record: (bytes, flags), EOM on its last part."""
        if conn.seq_in is None:
            try:
                record = conn.sock.recv(MAX_RECORD)
            except BlockingIOError:
                conn.readable = False
                self._watch_input(conn)
                return 0, 0
            except OSError as e:
                self._host_broke(conn, e)
                return 0, 0
            if not record:
                self._host_eof(conn)
                return 0, 0
            conn.seq_in = memoryview(record)
        part = conn.seq_in[:room]
        got = body.write(part)
        rest = conn.seq_in[got:]
        if len(rest):
            conn.seq_in = rest
            return got, 0
        conn.seq_in = None
        conn.readable = False
        self._watch_input(conn)
        return got, SEQ_EOM | SEQ_EOR

    def _no_input(self, conn: _Conn) -> None:
        """A read gave 0 bytes: no data now (EAGAIN), or the host's end of file."""
        try:
            peek = conn.sock.recv(1, _PEEK_NOW)
        except BlockingIOError:
            conn.readable = False
            self._watch_input(conn)
            return
        except OSError as e:
            self._host_broke(conn, e)
            return
        if peek:
            return  # data arrived meanwhile: the next buffer takes it
        self._host_eof(conn)

    def _host_eof(self, conn: _Conn) -> None:
        """The host will send no more (§5.10.6.5 SHUTDOWN SEND); RCV too when it closed
        both directions (a Unix socket reports POLLHUP then)."""
        conn.host_eof = True
        conn.readable = False
        flags = SHUTDOWN_SEND
        if conn.host_shut & 0x100:
            # We shut our writing side ourselves (the guest's SHUTDOWN SEND): a hang-up
            # now says nothing about the host's reading side, and the guest sends no more.
            conn.host_shut |= flags
            self._watch_input(conn)
            self._want(conn, _P_SHUTDOWN)
            return
        poller = select.poll()
        poller.register(conn.fd, select.POLLIN)
        for _fd, ev in poller.poll(0):
            if ev & select.POLLHUP:
                flags |= SHUTDOWN_RCV
        conn.host_shut |= flags
        self._watch_input(conn)
        self._want(conn, _P_SHUTDOWN)

    # -- siblings ------------------------------------------------------------------------
    def _to_sibling(self, hdr: Hdr, reader: Reader) -> None:
        if self.registry is None:
            return
        payload = reader.read(hdr.len) if hdr.len else b""
        if not self.registry.deliver(self, hdr.dst_cid, hdr.pack(), payload):
            self._warn("sibling", "packet to cid %d dropped: no VM of a shared group there", hdr.dst_cid)

    def _take_inbox(self) -> None:
        """Siblings' packets for this guest (on this device's loop) onto rx."""
        if self.registry is None or not self.active:
            return
        packets = self.registry.take(self)
        room = MAX_LOOSE - len(self._loose)
        if len(packets) > room:
            self._warn("loose", "rx backlog full: %d sibling packets dropped", len(packets) - room)
            packets = packets[:room]
        self._loose.extend(packets)
        self._fast.touch()
        self._fill_rx()

    # -- connection table ----------------------------------------------------------------
    def _add(self, key: tuple[int, int], sock: socket.socket, seq: bool) -> _Conn:
        conn = _Conn(key, sock, seq)
        self.conns[key] = conn
        self._by_fd[conn.fd] = conn
        return conn

    def _drop(self, conn: _Conn) -> None:
        """Forget ``conn`` and close its host socket (no packet is sent)."""
        if conn.dead:
            return
        self._fast.unpend()  # in the deque before it is dropped (see _vsock_fast.State)
        conn.dead = True
        if self.loop is not None and (conn.armed or conn.muted):
            self.loop.remove_reader(conn.fd)
        conn.armed = conn.muted = False
        self._watch_output(conn, False)
        self.conns.pop(conn.key, None)
        self._by_fd.pop(conn.fd, None)
        if conn.local_alloc:
            self._local_ports.discard(conn.key[0])
        conn.sock.close()

    def _reset(self, conn: _Conn) -> None:
        """Abort ``conn``: RST to the guest, host socket closed (§5.10.6.5)."""
        if conn.dead:
            return
        conn.readable = False
        self._watch_input(conn)
        self._want(conn, _P_RST)

    def _reset_key(self, key: tuple[int, int], hdr: Hdr) -> None:
        conn = self.conns.get(key)
        if conn is not None:
            self._reset(conn)

    def _rst_reply(self, hdr: Hdr) -> None:
        """RST for a packet that belongs to no connection (never in reply to an RST)."""
        if hdr.op == OP_RST:
            return
        if len(self._loose) >= MAX_LOOSE:
            return
        self._loose.append(
            (HDR.pack(HOST_CID, hdr.src_cid, hdr.dst_port, hdr.src_port, 0, hdr.type, OP_RST, 0, 0, 0), b"")
        )
        self._fast.touch()

    def _want(self, conn: _Conn, op: int) -> None:
        conn.ops |= op
        self._schedule(conn)

    def _schedule(self, conn: _Conn) -> None:
        if not conn.in_ready and not conn.dead:
            conn.in_ready = True
            self._ready.append(conn)
            self._fast.touch()

    def _warn(self, kind: str, msg: str, *args: object) -> None:
        self._ratelimit.log(
            log, logging.WARNING, ("vsock", kind), "vsock cid %d: " + msg, self.guest_cid, *args
        )
