"""Host backends of virtio-vsock: where the host end of each guest connection lives.

Upstream (rust-vmm/vhost-device ``vhost-device-vsock``) has two, and so do we:

* :class:`UnixHost` (``--uds-path``): "hybrid vsock" over Unix sockets, the protocol
  Firecracker introduced.  Host programs connect to the listening socket at
  ``uds_path`` and write ``CONNECT <port>\\n`` to reach the guest's ``port``; a
  guest connecting to host port ``P`` reaches whatever listens at
  ``<uds_path>_<P>`` (a ``SOCK_STREAM`` socket, or ``SOCK_SEQPACKET`` for a
  seqpacket connection).
* :class:`VsockForwardHost` (``--forward-cid``/``--forward-listen``): the host end is
  an ``AF_VSOCK`` socket of the host's own vsock transport.  A guest connecting to
  port ``P`` reaches ``(forward_cid, P)``; host programs connecting to one of the
  ``--forward-listen`` ports (any CID) reach the guest's same port, with no text
  handshake.

Both are opened once per VM by the daemon's ``run`` and shared by every device
instance that serves that VM (one per front-end connection), so the listeners
survive a front-end reconnecting: clients wait in the backlog meanwhile.  The
device never opens host sockets itself: it asks its host for them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from dataclasses import dataclass
from typing import Protocol

from ..errors import HostFault

__all__ = ["Listener", "UnixHost", "VsockError", "VsockForwardHost", "VsockHost"]

#: Backlog of every listening socket (the kernel caps it at somaxconn).
BACKLOG = 128


class VsockError(HostFault):
    """A vsock host socket cannot be set up (a listening path in use, no vsock transport).

    Raised by the host backends' constructors; the CLI turns it into ``error: ...``
    and exit status 1.
    """


@dataclass(frozen=True)
class Listener:
    """A listening host socket of a VM.

    ``handshake``: clients first write ``CONNECT <port>\\n`` (hybrid vsock);
    otherwise ``guest_port`` is the port every client of this listener reaches.
    """

    sock: socket.socket
    handshake: bool
    guest_port: int = 0


class VsockHost(Protocol):
    """What a :class:`~virtio_devices.vsock.VsockDevice` needs of its host side."""

    #: Name for log lines (the path or the CID).
    name: str

    def listeners(self) -> list[Listener]:
        """The listening sockets whose clients connect to the guest (nonblocking)."""

    def connect(self, port: int, seqpacket: bool) -> tuple[socket.socket, bool]:
        """A nonblocking socket connecting to the host end of guest connections to
        ``port``, and whether the connection is still in progress (the socket becomes
        writable when it is made or failed: ``SO_ERROR`` tells which).

        Raises:
            OSError: nothing listens there (ENOENT, ECONNREFUSED...), or a seqpacket
                connection where the host has none.
        """

    def close(self) -> None:
        """Close the listeners (and remove their files)."""


def _unlink_stale(path: str) -> None:
    """Remove a socket file left behind at ``path`` (upstream unlinks it too).

    Raises:
        VsockError: ``path`` exists and is not a socket, or a program listens there.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise VsockError(f"--uds-path {path!r} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody answers: a leftover of a daemon that died
        return
    finally:
        probe.close()
    raise VsockError(f"--uds-path {path!r}: another program listens there")


class UnixHost:
    """Hybrid vsock over Unix sockets (``--uds-path``); see the module docstring.

    Raises:
        VsockError: the listening socket cannot be made at ``uds_path``.
    """

    def __init__(self, uds_path: str) -> None:
        self.path = os.fspath(uds_path)
        self.name = self.path
        _unlink_stale(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.path)
            sock.listen(BACKLOG)
        except OSError as e:
            sock.close()
            raise VsockError(f"--uds-path {self.path!r}: cannot listen: {e.strerror or e}") from e
        self._listener: Listener | None = Listener(sock, handshake=True)

    def listeners(self) -> list[Listener]:
        return [] if self._listener is None else [self._listener]

    def port_path(self, port: int) -> str:
        """``<uds_path>_<port>``: where the host end of guest connections to ``port`` listens."""
        return f"{self.path}_{port}"

    def connect(self, port: int, seqpacket: bool) -> tuple[socket.socket, bool]:
        kind = socket.SOCK_SEQPACKET if seqpacket else socket.SOCK_STREAM
        sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            # A Unix connect completes at once, or fails with EAGAIN when the
            # listener's backlog is full: the guest gets RST then, as for a refusal.
            sock.connect(self.port_path(port))
        except BaseException:
            sock.close()
            raise
        return sock, False

    def close(self) -> None:
        if self._listener is not None:
            self._listener.sock.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


class VsockForwardHost:
    """The AF_VSOCK backend (``--forward-cid``, ``--forward-listen``).

    Raises:
        VsockError: the host has no vsock transport, or a port cannot be listened on.
    """

    def __init__(self, forward_cid: int, listen_ports: list[int]) -> None:
        self.forward_cid = forward_cid
        self.name = f"vsock cid {forward_cid}"
        self._listeners: list[Listener] = []
        try:
            for port in listen_ports:
                sock = socket.socket(
                    socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
                )
                try:
                    sock.bind((socket.VMADDR_CID_ANY, port))
                    sock.listen(BACKLOG)
                except OSError:
                    sock.close()
                    raise
                self._listeners.append(Listener(sock, handshake=False, guest_port=port))
        except OSError as e:
            self.close()
            raise VsockError(f"--forward-listen: cannot listen on vsock port: {e.strerror or e}") from e

    def listeners(self) -> list[Listener]:
        return list(self._listeners)

    def connect(self, port: int, seqpacket: bool) -> tuple[socket.socket, bool]:
        kind = socket.SOCK_SEQPACKET if seqpacket else socket.SOCK_STREAM
        sock = socket.socket(socket.AF_VSOCK, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            # An AF_VSOCK connect takes a round trip to the peer (up to the kernel's
            # connect timeout when nobody answers): never wait for it on the loop.
            err = sock.connect_ex((self.forward_cid, port))
        except BaseException:
            sock.close()
            raise
        if err in (0, errno.EINPROGRESS, errno.EAGAIN):
            return sock, err != 0
        sock.close()
        raise OSError(err, os.strerror(err))

    def close(self) -> None:
        for listener in self._listeners:
            listener.sock.close()
        self._listeners = []
