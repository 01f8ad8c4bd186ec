"""Message framing over a vhost-user Unix stream socket, with SCM_RIGHTS fds.

One :class:`Connection` wraps one connected ``AF_UNIX``/``SOCK_STREAM`` socket.  It
reads exactly one message at a time: a 12-byte header (whose ancillary data carries
the fds, as the spec says fds travel with the message), then exactly ``size``
payload bytes, bounded by :data:`~vhost_backends.protocol.codes.MAX_MSG_SIZE`
before anything is read.  Received fds are owned by the returned
:class:`Message`; whoever handles it takes the fds it keeps and calls
:meth:`Message.close_fds`, so every fd is closed exactly once, on errors too.

Errno mapping (STYLE.md §4): EINTR is retried by Python itself (PEP 475), EAGAIN
cannot happen on the blocking socket we use (a timeout is reported as
:class:`PartialMessage` inside a message), and ECONNRESET/EPIPE/EOF become
:class:`Disconnected`.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import socket
from collections.abc import Sequence

from .protocol.codes import MAX_ATTACHED_FDS
from .protocol.errors import Disconnected, IncorrectFds, PartialMessage, VhostUserError
from .protocol.messages import HEADER_SIZE, Header, check_fds, close_fds, pack_header, parse_header

__all__ = ["DEFAULT_TIMEOUT", "Connection", "Message"]

log = logging.getLogger(__name__)

#: Seconds a peer may take to finish a message it started (and to drain our replies).
DEFAULT_TIMEOUT = 5.0
_FD_SIZE = array.array("i").itemsize
_ANC_SPACE = socket.CMSG_SPACE(MAX_ATTACHED_FDS * _FD_SIZE)
_DISCONNECT_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ESHUTDOWN, errno.EBADF})


class Message:
    """One received message: header, payload and the fds that came with it."""

    __slots__ = ("fds", "header", "payload")

    def __init__(self, header: Header, payload: bytes, fds: list[int]) -> None:
        self.header = header
        self.payload = payload
        self.fds = fds

    @property
    def request(self) -> int:
        return self.header.request

    def take_fd(self, i: int = 0) -> int:
        """Take ownership of fd ``i``: :meth:`close_fds` will no longer close it."""
        fd = self.fds[i]
        self.fds[i] = -1
        return fd

    def close_fds(self) -> None:
        """Close every fd not taken; safe to call more than once."""
        fds = [fd for fd in self.fds if fd >= 0]
        self.fds = [-1] * len(self.fds)
        close_fds(fds)


def _fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % _FD_SIZE])
            fds.extend(arr)
    return fds


class Connection:
    """Framing of vhost-user messages on one connected Unix stream socket.

    ``from_frontend`` tells which request codes are valid in received headers: a
    back-end receives front-end requests, a front-end receives back-end ones (and
    replies, which reuse the request code they answer).
    """

    def __init__(
        self, sock: socket.socket, *, from_frontend: bool = True, timeout: float | None = DEFAULT_TIMEOUT
    ) -> None:
        self.sock = sock
        self.from_frontend = from_frontend
        self.sock.settimeout(timeout)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def shutdown(self) -> None:
        """Tell the peer we are done (EOF on its side) while keeping our fd open."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    # -- receiving --------------------------------------------------------------------
    def _recv_header(self) -> tuple[bytes, list[int]]:
        buf = bytearray(HEADER_SIZE)
        got = 0
        fds: list[int] = []
        truncated = False
        try:
            while got < HEADER_SIZE:
                view = memoryview(buf)[got:]
                try:
                    n, ancdata, msg_flags, _addr = self.sock.recvmsg_into([view], _ANC_SPACE)
                except TimeoutError:
                    if got == 0:
                        raise
                    raise PartialMessage(f"timed out after {got} of {HEADER_SIZE} header bytes") from None
                fds.extend(_fds_from_ancillary(ancdata))
                if msg_flags & socket.MSG_CTRUNC:
                    truncated = True
                if n == 0:
                    if got == 0:
                        raise Disconnected(
                            "front-end closed the connection"
                            if self.from_frontend
                            else "back-end closed the connection"
                        )
                    raise PartialMessage(f"connection closed after {got} of {HEADER_SIZE} header bytes")
                got += n
            if truncated:
                raise IncorrectFds(
                    f"too many fds attached (more than {MAX_ATTACHED_FDS}); ancillary data truncated"
                )
        except BaseException:
            close_fds(fds)
            raise
        return bytes(buf), fds

    def _recv_exact(self, size: int) -> bytes:
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            try:
                # Fds arriving with payload bytes would break the one-message-one-fd-set
                # framing; recvmsg with ancillary space catches and closes them.
                n, ancdata, _flags, _addr = self.sock.recvmsg_into([view[got:]], _ANC_SPACE)
            except TimeoutError:
                raise PartialMessage(f"timed out after {got} of {size} payload bytes") from None
            stray = _fds_from_ancillary(ancdata)
            if stray:
                close_fds(stray)
                raise IncorrectFds(f"{len(stray)} fds attached to payload bytes, not to the header")
            if n == 0:
                raise PartialMessage(f"connection closed after {got} of {size} payload bytes")
            got += n
        return bytes(buf)

    def recv_message(self, *, check_fd_count: bool = True) -> Message:
        """Read one whole message.

        Raises:
            Disconnected: EOF before a message began, ECONNRESET.
            PartialMessage: EOF or timeout inside a message.
            InvalidMessage, OversizedMessage: the header is invalid (nothing more read).
            IncorrectFds: wrong fd count for the request, or truncated ancillary data.
            TimeoutError: no message began within the timeout (the caller decides).
        """
        try:
            raw, fds = self._recv_header()
        except OSError as e:
            if isinstance(e, TimeoutError):
                raise
            raise self._map_oserror(e) from e
        try:
            header = parse_header(raw, from_frontend=self.from_frontend)
            payload = self._recv_exact(header.size) if header.size else b""
            if check_fd_count and self.from_frontend:
                check_fds(header.request, payload, fds)
        except OSError as e:
            close_fds(fds)
            raise self._map_oserror(e) from e
        except BaseException:
            close_fds(fds)
            raise
        return Message(header, payload, fds)

    # -- sending ------------------------------------------------------------------------
    def send(
        self,
        request: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        *,
        reply: bool = False,
        need_reply: bool = False,
    ) -> None:
        """Send one message; ``fds`` travel with its first byte (and are not closed).

        Raises:
            Disconnected: the peer is gone (EPIPE, ECONNRESET) or stopped reading.
        """
        self.send_raw(pack_header(request, len(payload), reply=reply, need_reply=need_reply) + payload, fds)

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send arbitrary bytes with ``fds`` attached to the first chunk."""
        view = memoryview(data)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        try:
            while True:
                n = self.sock.sendmsg([view], anc)
                anc = []
                view = view[n:]
                if not view:
                    return
        except TimeoutError:
            raise Disconnected("peer stopped reading (send timed out)") from None
        except OSError as e:
            raise self._map_oserror(e) from e

    @staticmethod
    def _map_oserror(e: OSError) -> VhostUserError:
        if e.errno in _DISCONNECT_ERRNOS:
            return Disconnected(f"connection lost: {e.strerror}")
        return Disconnected(f"socket error: {e}")
