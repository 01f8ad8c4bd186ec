"""vhost-user daemons: listen on a socket, serve one front-end at a time, repeat.

:class:`VhostUserDaemon` serves one socket path: it unlinks a stale socket file,
binds and listens, then for each front-end that connects builds a **fresh device**
(rust-vmm's daemons also build a new back-end per connection), runs a
:class:`VhostUserHandler` on a new :class:`EventLoop` until the front-end leaves or
breaks the protocol, cleans up and accepts the next one.

The listening socket stays bound for the daemon's lifetime instead of being
re-created after each disconnect as upstream's ``Listener`` is: a front-end that
reconnects right away then never finds the path missing or refusing, and waits in
the backlog until the previous session is cleaned up.  The socket file is removed
at exit.

:func:`run_daemons` runs one daemon per path, each on its own thread (``-c N``),
and turns SIGINT/SIGTERM into a clean shutdown: a shared stop eventfd that every
accept wait and every event loop watches.  Threads share one GIL: the per-socket
loops scale only as far as the device hot paths release it (see the report and
``benches/``); forked workers are the fallback if they do not.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import socket
import stat
import threading
from collections.abc import Callable, Sequence
from types import FrameType

from virtio_devices.base import VirtioDevice

from .connection import Connection
from .event_loop import DEFAULT_POLL_MAX_US, EventLoop
from .handler import VhostUserHandler

__all__ = ["VhostUserDaemon", "run_daemons"]

log = logging.getLogger(__name__)

#: sizeof(sockaddr_un.sun_path) on Linux, the terminating NUL included.
_SUN_PATH_MAX = 108


class VhostUserDaemon:
    """Serve ``device_factory()`` devices on the Unix socket ``socket_path``.

    ``stop_fd`` is an eventfd shared by every daemon of the process: once it is
    readable (never read by anyone) the daemon finishes its session and returns
    from :meth:`serve`.  Without one, the daemon makes its own (:meth:`stop`).
    ``poll_max_us`` bounds the sessions' adaptive ring polling (:class:`EventLoop`).
    """

    def __init__(
        self,
        name: str,
        socket_path: str,
        device_factory: Callable[[], VirtioDevice],
        *,
        stop_fd: int | None = None,
        max_connections: int | None = None,
        poll_max_us: int = DEFAULT_POLL_MAX_US,
    ) -> None:
        self.name = name
        self.poll_max_us = poll_max_us
        self.socket_path = socket_path
        self.device_factory = device_factory
        self.max_connections = max_connections
        self._own_stop = stop_fd is None
        self.stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) if stop_fd is None else stop_fd
        self.listener: socket.socket | None = None
        self.connections = 0
        self.ready = threading.Event()

    def stop(self) -> None:
        """Ask :meth:`serve` to return (thread-safe)."""
        os.eventfd_write(self.stop_fd, 1)

    def _stopping(self) -> bool:
        p = select.poll()
        p.register(self.stop_fd, select.POLLIN)
        return bool(p.poll(0))

    def bind(self) -> None:
        """Unlink a stale socket file and listen on ``socket_path``.

        Raises:
            OSError: the path exists and is not a socket, or binding failed.
        """
        path = self.socket_path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
            # A leftover of a previous run: upstream unlinks it too.
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # The path appears only once the socket listens: bound and listening under a
        # temporary name first, then renamed (atomic), so a front-end, supervisor or
        # test that waits for the file never meets ECONNREFUSED between bind() and
        # listen().  A path too long for the temporary name is bound directly.
        tmp = f"{path}.{os.getpid()}~"
        if len(os.fsencode(tmp)) >= _SUN_PATH_MAX:
            tmp = path
        try:
            sock.bind(tmp)
            sock.listen(1)
            if tmp != path:
                os.rename(tmp, path)
        except BaseException:
            sock.close()
            if tmp != path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            raise
        self.listener = sock
        self.ready.set()
        # Tests and supervisors wait for this line rather than polling the path.
        log.info("%s: listening", path)

    def _accept(self) -> socket.socket | None:
        assert self.listener is not None
        p = select.poll()
        p.register(self.listener.fileno(), select.POLLIN)
        p.register(self.stop_fd, select.POLLIN)
        while True:
            events = dict(p.poll())
            if self.stop_fd in events:
                return None
            if events:
                try:
                    conn, _addr = self.listener.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue
                return conn

    def serve(self) -> None:
        """Accept front-ends one after the other until stopped."""
        if self.listener is None:
            self.bind()
        try:
            while self.max_connections is None or self.connections < self.max_connections:
                sock = self._accept()
                if sock is None:
                    break
                self.connections += 1
                self.serve_connection(sock)
                if self._stopping():
                    break
        finally:
            self.close()

    def serve_connection(self, sock: socket.socket) -> str | None:
        """Run one front-end session to its end; returns why it ended."""
        tag = f"{self.socket_path}"
        log.info("%s: front-end connected", tag)
        loop = EventLoop(self.poll_max_us)
        conn = Connection(sock)
        handler: VhostUserHandler | None = None
        try:
            device = self.device_factory()
            handler = VhostUserHandler(device, conn, loop, name=tag)
            handler.attach()
            loop.add_stop_fd(self.stop_fd)
            loop.run()
        except Exception:
            # A bug (front-end and guest errors are handled inside): log it loudly,
            # drop this session and keep serving.
            log.exception("%s: session failed", tag)
        finally:
            reason = handler.close_reason if handler is not None else "setup failed"
            try:
                if handler is not None:
                    handler.close()
                else:
                    conn.close()
            except Exception:
                log.exception("%s: cleanup failed", tag)
            loop.close()
        log.info("%s: front-end session ended: %s", tag, reason or "shutdown")
        return reason

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        if self._own_stop:
            self._own_stop = False
            os.close(self.stop_fd)


def run_daemons(
    name: str,
    socket_paths: Sequence[str],
    device_factory: Callable[[int], VirtioDevice],
    *,
    poll_max_us: int | None = None,
) -> int:
    """Serve ``device_factory(i)`` devices on ``socket_paths[i]``, one thread each
    (``poll_max_us``: see :class:`VhostUserDaemon`; None: ``DEFAULT_POLL_MAX_US``).

    SIGINT and SIGTERM (when called from the main thread) shut every daemon down
    cleanly.  Returns 0 after a clean shutdown, 1 if a socket could not be bound
    or a daemon thread died of an unexpected error (both are logged).
    """
    if poll_max_us is None:
        poll_max_us = DEFAULT_POLL_MAX_US
    stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    daemons = [
        VhostUserDaemon(name, path, _bind_index(device_factory, i), stop_fd=stop_fd, poll_max_us=poll_max_us)
        for i, path in enumerate(socket_paths)
    ]
    failed = False
    previous: dict[int, object] = {}

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: signal %d, shutting down", name, signum)
        os.eventfd_write(stop_fd, 1)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        try:
            for d in daemons:
                d.bind()
        except OSError as e:
            log.error("%s: cannot listen: %s", name, e)
            for d in daemons:
                d.close()
            return 1
        errors: list[BaseException] = []

        def worker(d: VhostUserDaemon) -> None:
            try:
                d.serve()
            except BaseException as e:
                log.exception("%s: daemon on %s died", name, d.socket_path)
                errors.append(e)
                os.eventfd_write(stop_fd, 1)

        threads = [
            threading.Thread(target=worker, args=(d,), name=f"{name}-{i}", daemon=True)
            for i, d in enumerate(daemons)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        failed = bool(errors)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        os.close(stop_fd)
    return 1 if failed else 0


def _bind_index(factory: Callable[[int], VirtioDevice], index: int) -> Callable[[], VirtioDevice]:
    return lambda: factory(index)
