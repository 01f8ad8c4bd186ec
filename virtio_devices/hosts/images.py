"""Disk images for virtio-scsi: a raw image file behind an fd, opened once.

Upstream (rust-vmm/vhost-device, ``vhost-device-scsi/src/scsi/emulation/block_device.rs``)
opens every image read-write whatever ``-r`` says, and panics when one is missing.
:func:`open_image` opens it read-only under ``-r`` (so a write can never reach it) and
raises :class:`ImageError`, which the command prints as one line.

The device reads and writes the image with ``preadv``/``pwritev`` straight between
the fd and guest memory (:meth:`virtio_queue.Writer.read_from_fd`,
:meth:`virtio_queue.Reader.write_to_fd`); this module holds what else an image
needs: its size, ``fdatasync`` for FUA and SYNCHRONIZE CACHE, and hole punching for
UNMAP and WRITE SAME.  A ``memfd`` works as an in-memory twin for tests
(:meth:`DiskImage.from_bytes`): it punches holes and syncs like a file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import Self

from ..errors import HostFault

__all__ = ["DiskImage", "ImageError", "open_image"]

# fallocate(2) modes from <linux/falloc.h>; os.posix_fallocate cannot pass them.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc_fallocate = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` with a mode (ctypes: the os module has no such call)."""
    global _libc_fallocate
    if _libc_fallocate is None:
        import ctypes  # noqa: PLC0415 - only images that unmap need it

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.fallocate
        fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
        fn.restype = ctypes.c_int
        _libc_fallocate = fn
    if _libc_fallocate(fd, mode, offset, length) != 0:
        import ctypes  # noqa: PLC0415

        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(mode={mode:#x}, offset={offset}, length={length}): {os.strerror(err)}")


class ImageError(HostFault):
    """A disk image cannot be opened or is not usable as a disk."""


class DiskImage:
    """One open raw image: its fd, size in bytes, and whether it is read-only.

    The fd is owned by the image (:meth:`close`).  ``size`` is read once when the image
    is opened: the LUN's capacity is ``size // 512`` blocks for the daemon's life, as
    upstream; an image that shrinks later makes reads past its end fail with a
    MEDIUM ERROR instead of reading outside the file.
    """

    def __init__(self, fd: int, *, name: str, read_only: bool, direct_fd: int = -1) -> None:
        self.fd = fd
        self.name = name
        self.read_only = read_only
        #: A second fd of the same file opened with O_DIRECT (``--direct``), or -1:
        #: the device's engine reads and writes aligned transfers through it,
        #: bypassing the host page cache; everything else goes through :attr:`fd`.
        self.direct_fd = direct_fd
        #: Whether ``preadv2``/``pwritev2`` with RWF_NOWAIT are worth trying on this
        #: image (a device clears them when the file system refuses the flag).
        self.nowait_read = True
        self.nowait_write = not read_only
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode):
            self.size = os.lseek(fd, 0, os.SEEK_END)
        else:
            self.size = st.st_size

    @classmethod
    def from_bytes(cls, data: bytes | int, *, name: str = "memfd", read_only: bool = False) -> Self:
        """An in-memory image (a memfd) holding ``data``, or that many zero bytes."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        if isinstance(data, int):
            os.ftruncate(fd, data)
        else:
            os.pwrite(fd, data, 0)
        return cls(fd, name=name, read_only=read_only)

    def sync(self) -> None:
        """Flush written data to stable storage (``fdatasync``: SBC-4 SYNCHRONIZE CACHE, FUA).

        Raises:
            OSError: the kernel reported a write-back error.
        """
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int, *, unmap: bool) -> None:
        """Make ``[offset, offset+length)`` read as zeros.

        ``unmap``: deallocate (punch a hole, SBC-4 UNMAP and WRITE SAME with UNMAP=1);
        otherwise zero the range and keep it allocated (WRITE SAME of zeros without
        UNMAP, SBC-4 §5.50: the blocks stay mapped).  Where the file system cannot do
        either, zeros are written.

        Raises:
            OSError: the write failed.
        """
        mode = FALLOC_FL_KEEP_SIZE | (FALLOC_FL_PUNCH_HOLE if unmap else FALLOC_FL_ZERO_RANGE)
        try:
            _fallocate(self.fd, mode, offset, length)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
        self.fill(offset, length, bytes(512))

    def fill(self, offset: int, length: int, pattern: bytes) -> None:
        """Write ``pattern`` (one block) repeatedly over ``[offset, offset+length)``.

        Raises:
            OSError: the write failed (ENOSPC...).
        """
        chunk = pattern * max(1, (1 << 20) // len(pattern))
        end = offset + length
        while offset < end:
            n = os.pwrite(self.fd, memoryview(chunk)[: min(len(chunk), end - offset)], offset)
            if n <= 0:
                raise OSError(errno.EIO, f"pwrite at {offset} wrote nothing")
            offset += n

    def close(self) -> None:
        """Close the fds (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.direct_fd >= 0:
            os.close(self.direct_fd)
            self.direct_fd = -1

    def __repr__(self) -> str:
        return f"<DiskImage {self.name!r} size={self.size} {'ro' if self.read_only else 'rw'}>"


def open_image(path: str, *, read_only: bool, direct: bool = False) -> DiskImage:
    """Open the raw image at ``path`` (read-only when ``read_only``); ``direct``: also
    with O_DIRECT (:attr:`DiskImage.direct_fd`), and the image's clean pages in the
    host's page cache are dropped once (``POSIX_FADV_DONTNEED``): io_uring cannot
    start an O_DIRECT write over cached pages without blocking (they must be
    invalidated) and hands each such write to its worker threads, as it would for
    every write to a freshly copied image.

    Raises:
        ImageError: the file is missing, unreadable, not writable without ``-r``,
            neither a regular file nor a block device, or (``direct``) on a file
            system that refuses O_DIRECT.
    """
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as e:
        mode = "read-only" if read_only else "read-write"
        raise ImageError(f"cannot open image {path!r} {mode}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise ImageError(f"image {path!r} is neither a regular file nor a block device")
        direct_fd = -1
        if direct:
            try:
                direct_fd = os.open(path, flags | os.O_DIRECT)
            except OSError as e:
                raise ImageError(f"cannot open image {path!r} with O_DIRECT: {e.strerror}") from e
            # Only a hint: a file system that ignores it costs nothing but the punts.
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return DiskImage(fd, name=path, read_only=read_only, direct_fd=direct_fd)
    except BaseException:
        os.close(fd)
        raise
