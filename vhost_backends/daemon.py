"""vhost-user daemons: listen on a socket, serve one front-end at a time, repeat.

:class:`VhostUserDaemon` serves one socket path: it refuses a path where another
process is listening, replaces a stale socket file (nobody listening), binds and
listens (under a temporary name, renamed into place once listening), then for
each front-end that connects builds a **fresh device** (rust-vmm's daemons also
build a new back-end per connection), runs a :class:`VhostUserHandler` on a new
:class:`EventLoop` until the front-end leaves or breaks the protocol, cleans up
(the device's ``close()`` too, if it has one) and accepts the next one.

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

__all__ = ["ListenError", "VhostUserDaemon", "run_daemons"]

log = logging.getLogger(__name__)


class ListenError(OSError):
    """A daemon cannot listen on its socket path: another process listens there, the
    path is not a socket, its directory is missing, or the bind failed.

    The message names the path and the reason; the commands print it as
    ``error: <message>`` and exit 1.  The user must free or fix the path.
    """

    def __init__(self, path: str, reason: str, err: int | None = None) -> None:
        self.message = f"cannot listen on {path}: {reason}"
        super().__init__(self.message)
        self.errno = err
        self.filename = path

    def __str__(self) -> str:
        # OSError's own form ("[Errno 2] None: 'path'") hides the reason.
        return self.message


#: Bytes of a Unix socket path, its terminating NUL included (``sun_path``).
_SUN_PATH_MAX = 108


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _someone_listens(path: str) -> bool:
    """Whether a process accepts connections on the Unix socket file ``path``.

    A non-blocking connect answers without waiting: it succeeds or finds the backlog
    full (EAGAIN) when a listener is there, and is refused (ECONNREFUSED) when the
    file is a leftover whose listener is gone.  The listener sees a front-end that
    connects and leaves at once.

    Raises:
        OSError: the connect failed for another reason (permissions, ...).
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        probe.connect(path)
    except BlockingIOError:
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    finally:
        probe.close()
    return True


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
        # False for an adopted socket (adopt): its path is a label, not a file of ours.
        self._owns_path = True
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
        """Listen on ``socket_path``, replacing a stale socket file.

        A socket file nobody listens on is a leftover of a previous run and is
        replaced, as upstream does.  One where another daemon listens is refused:
        upstream unlinks it too, which leaves that daemon running but unreachable.
        The path appears only once the socket listens.

        Raises:
            ListenError: another process listens on the path, the path exists and
                is not a socket, its directory does not exist, or binding failed.
        """
        path = self.socket_path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise ListenError(path, e.strerror or str(e), e.errno) from e
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise ListenError(path, "the path exists and is not a socket", errno.EEXIST)
            try:
                live = _someone_listens(path)
            except OSError as e:
                reason = f"cannot probe the existing socket: {e.strerror or e}"
                raise ListenError(path, reason, e.errno) from e
            if live:
                raise ListenError(path, "another process is listening on it", errno.EADDRINUSE)
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # The file appears at bind(), before listen(): a front-end that connects as
        # soon as it sees the path would be refused in between.  Bound and
        # listening under a temporary name in the same directory, the socket is
        # then renamed into place, so the path only ever leads to a listener.
        # (A path too long for a temporary name beside it is bound directly.)
        tmp = f"{path}.{os.getpid()}~"
        if len(os.fsencode(tmp)) >= _SUN_PATH_MAX:
            tmp = path
        elif _is_socket(tmp):
            os.unlink(tmp)  # left by a process of the same pid that died here
        try:
            try:
                sock.bind(tmp)
                sock.listen(1)
                if tmp != path:
                    os.rename(tmp, path)
            except BaseException:
                if tmp != path:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                raise
        except OSError as e:
            sock.close()
            parent = os.path.dirname(path) or "."
            if isinstance(e, FileNotFoundError) and not os.path.isdir(parent):
                raise ListenError(path, f"directory {parent} does not exist", e.errno) from e
            raise ListenError(path, e.strerror or str(e), e.errno) from e
        except BaseException:
            sock.close()
            raise
        self.listener = sock
        self.ready.set()
        # Tests and supervisors wait for this line rather than polling the path.
        log.info("%s: listening", path)

    def adopt(self, fd: int) -> None:
        """Serve the listening socket ``fd`` that the daemon inherited (systemd
        socket activation, libvirt: upstream sound's ``--socket-fd``) instead of
        binding :attr:`socket_path`, which then only names it in logs and is never
        unlinked.

        Raises:
            ListenError: ``fd`` is not an open, listening Unix stream socket.
        """
        label = self.socket_path
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            raise ListenError(label, f"fd {fd} is not a socket: {e.strerror or e}", e.errno) from e
        try:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            ok = sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM and listening
        except OSError as e:
            sock.detach()
            raise ListenError(label, f"fd {fd}: {e.strerror or e}", e.errno) from e
        if not ok:
            sock.detach()  # not ours to close
            raise ListenError(label, f"fd {fd} is not a listening Unix stream socket", errno.ENOTSOCK)
        os.set_inheritable(fd, False)
        self.listener = sock
        self._owns_path = False
        self.ready.set()
        log.info("%s: listening", label)

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
        device: VirtioDevice | None = None
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
            # The device is done with (the next session gets a fresh one): one that
            # holds host resources beyond a reset (gpio's requested lines) lets
            # them go in its close(), if it has one.
            close = getattr(device, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.exception("%s: device close failed", tag)
            loop.close()
        log.info("%s: front-end session ended: %s", tag, reason or "shutdown")
        return reason

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            if self._owns_path:
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
    listen_fds: Sequence[int | None] = (),
) -> int:
    """Serve ``device_factory(i)`` devices on ``socket_paths[i]``, one thread each
    (``poll_max_us``: see :class:`VhostUserDaemon`; None: ``DEFAULT_POLL_MAX_US``).
    Where ``listen_fds[i]`` is an fd, daemon ``i`` serves that inherited listening
    socket (:meth:`VhostUserDaemon.adopt`) and ``socket_paths[i]`` only names it.

    SIGINT and SIGTERM (when called from the main thread) shut every daemon down
    cleanly, whichever thread the kernel hands the signal to: Python runs its
    handlers in the main thread only, so that thread waits on the signal wakeup fd
    (which the C-level handler writes from any thread) instead of blocking in a
    join that only the daemons' end would wake.  Every socket is bound before any
    is served.  Returns 0 after a clean shutdown, 1 if a daemon thread died of an
    unexpected error (logged).

    Raises:
        ListenError: a socket could not be bound (the ones already bound are
            closed and their files removed; a path found in use is left alone).
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
    # Woken by a signal (any thread's) and by each daemon thread's end.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_wakeup: int | None = None

    stopping = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping:
            return  # seen by the main thread's wait first (see below)
        stopping = True
        log.info("%s: signal %d, shutting down", name, signum)
        os.eventfd_write(stop_fd, 1)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
        old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    try:
        try:
            for i, d in enumerate(daemons):
                fd = listen_fds[i] if i < len(listen_fds) else None
                if fd is None:
                    d.bind()
                else:
                    d.adopt(fd)
        except ListenError:
            for d in daemons:
                d.close()
            raise
        errors: list[BaseException] = []

        def worker(d: VhostUserDaemon) -> None:
            try:
                d.serve()
            except BaseException as e:
                log.exception("%s: daemon on %s died", name, d.socket_path)
                errors.append(e)
                os.eventfd_write(stop_fd, 1)
            finally:
                os.write(wake_w, b"\0")  # (a pipe's buffer holds every thread's)

        threads = [
            threading.Thread(target=worker, args=(d,), name=f"{name}-{i}", daemon=True)
            for i, d in enumerate(daemons)
        ]
        for t in threads:
            t.start()
        running = len(threads)
        while running:
            # The C-level handler writes the signal's number here from whatever
            # thread took it.  When a daemon thread took it, the Python handler
            # did not run after this wait returned (only the main thread runs
            # them, on a cue a daemon thread's bytecode can clear), so the byte
            # itself starts the shutdown.  A 0 is a daemon thread's end.
            select.select([wake_r], [], [])
            with contextlib.suppress(BlockingIOError):
                for signum in os.read(wake_r, 4096):
                    if signum == 0:
                        running -= 1
                    elif signum in previous:
                        on_signal(signum, None)
        for t in threads:
            t.join()
        failed = bool(errors)
    finally:
        if old_wakeup is not None:
            signal.set_wakeup_fd(old_wakeup)
        for signum, handler in previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        os.close(stop_fd)
        os.close(wake_r)
        os.close(wake_w)
    return 1 if failed else 0


def _bind_index(factory: Callable[[int], VirtioDevice], index: int) -> Callable[[], VirtioDevice]:
    return lambda: factory(index)
