"""File-backed host backends: the entropy source of virtio-rng.

Upstream (rust-vmm/vhost-device, ``vhost-device-rng/src/main.rs``) opens the
``--rng-source`` file once and shares it, behind a mutex, between every socket; each
request reads from the shared file position.  We do the same with one open file
description: concurrent ``read(2)`` calls on it are serialised by the kernel, so no
lock is needed, and the bytes go from the fd straight into guest memory
(:meth:`virtio_queue.Writer.read_from_fd`).

When the file is the kernel's random device itself (``/dev/urandom`` or
``/dev/random``, whatever the path, told by its device number), the bytes come from
the same generator through the vDSO's ``getrandom`` instead of ``read(2)`` (Linux
>= 6.11; :mod:`virtio_devices.hosts._getrandom`): no system call per request and a
faster ChaCha20, with exactly what a read of that device would give (``/dev/urandom``
is ``getrandom(GRND_INSECURE)``, a non-blocking ``/dev/random`` is
``getrandom(GRND_NONBLOCK)``).  The fd stays open for waiting on.

The fd is nonblocking: a FIFO or a character device with nothing to give must not
stall the event loop (upstream blocks its worker thread instead).  A read then fails
with ``EAGAIN`` and the device waits for the fd to become readable.  A regular file
ignores ``O_NONBLOCK``; at its end reads return 0 bytes, and the device passes the
short (even empty) read to the guest exactly as upstream does.
"""

from __future__ import annotations

import os
import stat
from typing import Protocol, Self, runtime_checkable

from virtio_queue import ByteSource

from ..errors import HostFault
from . import _getrandom

__all__ = ["BytesEntropySource", "EntropySource", "FdEntropySource", "FileEntropySource", "RngError"]


class RngError(HostFault):
    """The entropy source of virtio-rng cannot be opened or read.

    Raised when the source file is missing, unreadable or a directory (upstream:
    "RNG source file doesn't exists or can't be accessed"): at startup the CLI
    exits 1 with the message.  Raised by :class:`~virtio_devices.rng.RngDevice`
    when a read of the source fails while serving: a host fault, so the request
    completes with 0 bytes and the log gets a rate-limited line.
    """


@runtime_checkable
class EntropySource(Protocol):
    """Where virtio-rng gets its bytes: a readable file descriptor.

    ``fileno()`` must stay valid until ``close()``.  The device reads with
    ``read(2)`` at the current file position, so several devices sharing one source
    consume disjoint bytes, as upstream's shared ``File`` does.
    """

    @property
    def name(self) -> str:
        """What the source is, for logs (a path, ``fd 5``, ``<bytes>``)."""

    def fileno(self) -> int:
        """The fd to read entropy from."""

    def byte_source(self) -> ByteSource:
        """What the compiled paths fill guest buffers from (reads ``fileno()``
        unless the source knows a faster way to the same bytes)."""

    def close(self) -> None:
        """Release the fd; closing twice is harmless."""


# The kernel's random devices (Documentation/admin-guide/devices.txt: char 1:8 and
# 1:9) and the getrandom(2) flags that give what reading them does.  /dev/random is
# always open non-blocking here: EAGAIN until the generator is seeded.
_RANDOM_DEVICES = {(1, 8): _getrandom.NONBLOCK, (1, 9): _getrandom.INSECURE}


class FdEntropySource:
    """An entropy source over an fd the caller already has (a pipe, a socket...).

    The fd is switched to nonblocking mode unless it is a regular file (where the
    flag means nothing).  With ``close_fd`` (the default) :meth:`close` closes it.
    With ``vdso`` (the default), the kernel's random device is served through the
    vDSO's getrandom where the kernel has it (see the module's docstring).
    """

    def __init__(self, fd: int, *, name: str | None = None, close_fd: bool = True, vdso: bool = True) -> None:
        self._fd = fd
        self._close_fd = close_fd
        self._name = name if name is not None else f"fd {fd}"
        st = os.fstat(fd)
        self.is_regular = stat.S_ISREG(st.st_mode)
        if not self.is_regular:
            os.set_blocking(fd, False)
        self._source: ByteSource | None = None
        #: Whether the bytes come from the vDSO's getrandom (the fd is the kernel's
        #: random device, ``vdso`` allows it and the kernel has it).
        self.uses_vdso = False
        device = (os.major(st.st_rdev), os.minor(st.st_rdev)) if stat.S_ISCHR(st.st_mode) else None
        flags = _RANDOM_DEVICES.get(device) if device is not None else None
        if vdso and flags is not None and _getrandom.vdso_available():
            self._source = _getrandom.GetrandomSource(fd, flags)
            self.uses_vdso = True

    @property
    def name(self) -> str:
        """What the source is, for logs."""
        return self._name

    def fileno(self) -> int:
        """The fd to read entropy from.

        Raises:
            ValueError: the source was closed.
        """
        if self._fd < 0:
            raise ValueError(f"entropy source {self._name} is closed")
        return self._fd

    def byte_source(self) -> ByteSource:
        """A :class:`~virtio_queue.ByteSource` reading the fd.

        Raises:
            ValueError: the source was closed.
        """
        src = self._source  # None once closed: fileno() then raises
        if src is None:
            src = self._source = ByteSource(self.fileno())
        return src

    def close(self) -> None:
        """Close the fd (if owned); closing twice is harmless."""
        fd, self._fd = self._fd, -1
        self._source = None
        if fd >= 0 and self._close_fd:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._name!r})"


class FileEntropySource(FdEntropySource):
    """The ``--rng-source`` file (``/dev/urandom`` by default), opened read-only.

    Opened with ``O_NONBLOCK`` so that opening a FIFO with no writer yet does not
    hang startup (upstream's ``File::open`` blocks there) and reads never block
    the event loop.

    Raises:
        RngError: the file does not exist, cannot be read, or is a directory
            (upstream: "RNG source file doesn't exists or can't be accessed"; a
            directory opens there and then fails on every read, we refuse it at once).
    """

    def __init__(self, path: str | os.PathLike[str], *, vdso: bool = True) -> None:
        spath = os.fspath(path)
        try:
            fd = os.open(spath, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise RngError(f"RNG source file {spath} doesn't exist or can't be accessed: {e.strerror}") from e
        try:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise RngError(f"RNG source file {spath} can't be accessed: it is a directory")
            super().__init__(fd, name=spath, vdso=vdso)
        except BaseException:
            os.close(fd)
            raise
        self.path = spath


class BytesEntropySource(FdEntropySource):
    """Simulated twin: a memfd holding ``data``, read once from the start, then EOF.

    Deterministic bytes for tests and demos; behaves like a regular file, so reads
    past the end return 0 bytes (what upstream gives the guest at EOF).
    """

    def __init__(self, data: bytes = b"") -> None:
        fd = os.memfd_create("vhd-entropy", os.MFD_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.lseek(fd, 0, os.SEEK_SET)
            super().__init__(fd, name=f"<{len(data)} bytes>")
        except BaseException:
            os.close(fd)
            raise
