"""Entropy sources of virtio-rng (virtio_devices.hosts.files)."""

from __future__ import annotations

import logging
import os
import pwd
import socket
import tempfile
from pathlib import Path
from typing import Any

import pytest

from virtio_devices.errors import DeviceError
from virtio_devices.hosts.files import (
    BytesEntropySource,
    EntropySource,
    FdEntropySource,
    FileEntropySource,
    RngError,
)
from virtio_devices.rng import RngDevice
from virtio_devices.testing import FakeInterrupt, FakeLoop
from virtio_queue.testing import VIRTQ_DESC_F_WRITE, MockSplitQueue, RawDesc


def test_file_source_reads_file_in_order(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"abcdef")
    with FileEntropySource(p) as src:
        assert isinstance(src, EntropySource)
        assert src.name == str(p)
        assert os.read(src.fileno(), 4) == b"abcd"
        assert os.read(src.fileno(), 4) == b"ef"
        assert os.read(src.fileno(), 4) == b""  # EOF: 0 bytes, as upstream's File


def test_file_source_missing_raises_rng_error(tmp_path: Path) -> None:
    with pytest.raises(RngError, match="doesn't exist or can't be accessed") as exc:
        FileEntropySource(tmp_path / "missing")
    assert isinstance(exc.value, DeviceError)


def test_file_source_directory_refused(tmp_path: Path) -> None:
    with pytest.raises(RngError, match="is a directory"):
        FileEntropySource(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file: the next test drops privileges")
def test_file_source_unreadable_raises_rng_error(tmp_path: Path) -> None:
    p = tmp_path / "secret"
    p.write_bytes(b"x")
    p.chmod(0)
    with pytest.raises(RngError, match="Permission denied"):
        FileEntropySource(p)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root: the test above runs")
def test_file_source_unreadable_after_dropping_root_raises_rng_error() -> None:
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' to drop privileges to")
    # A directory the unprivileged user may pass through (pytest's own temporary
    # directories are root's alone), holding a file nobody may read.
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o711)
        p = Path(tmp) / "secret"
        p.write_bytes(b"x")
        p.chmod(0)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: no return into pytest, whatever happens
            status = 2
            try:
                os.close(r)
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                try:
                    FileEntropySource(p).close()
                    os.write(w, b"opened")
                except RngError as e:
                    os.write(w, str(e).encode())
                    status = 0
            finally:
                os._exit(status)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            message = f.read().decode()
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, message
    assert message == f"RNG source file {p} doesn't exist or can't be accessed: Permission denied"


def test_file_source_socket_file_raises_rng_error(tmp_path: Path) -> None:
    # Opening a Unix socket file fails (ENXIO) for root too.
    p = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(p))
        with pytest.raises(RngError, match="can't be accessed: No such device or address"):
            FileEntropySource(p)


def test_file_source_fifo_without_writer_opens_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with FileEntropySource(fifo) as src:
        assert not os.get_blocking(src.fileno())


def test_fd_source_pipe_made_nonblocking_and_closed() -> None:
    r, w = os.pipe()
    try:
        src = FdEntropySource(r)
        assert not os.get_blocking(r)
        assert src.name == f"fd {r}"
        src.close()
        src.close()  # twice is harmless
        with pytest.raises(ValueError, match="closed"):
            src.fileno()
        with pytest.raises(OSError):
            os.fstat(r)
    finally:
        os.close(w)


def test_fd_source_can_leave_fd_open() -> None:
    r, w = os.pipe()
    try:
        FdEntropySource(r, close_fd=False).close()
        os.fstat(r)  # still open
    finally:
        os.close(r)
        os.close(w)


def test_bytes_source_gives_its_bytes_then_eof() -> None:
    with BytesEntropySource(b"0123") as src:
        assert os.read(src.fileno(), 10) == b"0123"
        assert os.read(src.fileno(), 10) == b""
        assert repr(src) == "BytesEntropySource('<4 bytes>')"


def test_rng_source_read_error_completes_with_zero_and_logs(
    guest_memory: Any,
    tmp_path: Path,
    loop: FakeLoop,
    interrupt: FakeInterrupt,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A directory fd fails every read with EISDIR: the host's fault, not the guest's;
    # the guest still gets its buffer back (upstream's worker would stop).
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    with FdEntropySource(fd, name="dir") as src:
        mock = MockSplitQueue(guest_memory, 16)
        queue = mock.create_queue(max_size=1024)
        dev = RngDevice(src)
        dev.activate(guest_memory, [queue], interrupt, loop)
        buf = mock.alloc(16)
        head = mock.add_chain([RawDesc(buf, 16, VIRTQ_DESC_F_WRITE, 0)])
        with caplog.at_level(logging.ERROR, logger="virtio_devices"):
            dev.process_queue(0)
        assert mock.used_elems() == [(head, 0)]
        assert "reading dir failed" in caplog.text
