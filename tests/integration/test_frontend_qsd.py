"""Our Frontend against a back-end we did not write: qemu-storage-daemon's vhost-user-blk.

Blocks are written and read back through a split ring with virtio-blk requests
(VIRTIO 1.2 §5.2.6: a 16-byte header {type u32, reserved u32, sector u64}, the data,
then a status byte written by the device), then checked in the image file.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhost_backends.frontend import Frontend
from vhost_backends.protocol.codes import VHOST_USER_F_PROTOCOL_FEATURES
from virtio_queue.testing import RawDesc

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("qemu-storage-daemon") is None, reason="qemu-storage-daemon not installed"
    ),
]

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_S_OK = 0
VIRTIO_F_VERSION_1 = 1 << 32
WRITE = 2
SECTOR = 512


@pytest.fixture(params=["raw", "qcow2"])
def qsd_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Path, str]]:
    fmt = request.param
    img = tmp_path / f"disk.{fmt}"
    if fmt == "raw":
        with open(img, "wb") as f:
            f.truncate(1 << 20)
    else:
        if shutil.which("qemu-img") is None:
            pytest.skip("qemu-img not installed")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
    sock = tmp_path / "blk.sock"
    pidfile = tmp_path / "qsd.pid"
    # --daemonize: the parent exits only once the export listens, so no polling.
    subprocess.run(
        [
            "qemu-storage-daemon",
            "--daemonize",
            "--pidfile",
            str(pidfile),
            "--blockdev",
            f"driver=file,node-name=file0,filename={img}",
            "--blockdev",
            f"driver={fmt},node-name=disk0,file=file0",
            "--export",
            f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={sock},writable=on",
        ],
        check=True,
        timeout=30,
    )
    pid = int(pidfile.read_text())
    try:
        yield str(sock), img, fmt
    finally:
        os.kill(pid, signal.SIGTERM)
        # qsd removes its pidfile on exit; wait for the process with pidfd.
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        select.select([pidfd], [], [], 10)
        os.close(pidfd)


def blk_request(
    fe: Frontend, req_type: int, sector: int, data: bytes | None = None, read_len: int = 0
) -> tuple[int, bytes]:
    """Run one virtio-blk request on ring 0; returns (status, data read)."""
    mock = fe.rings[0].mock
    hdr = mock.alloc(16)
    fe.memory.write(hdr, struct.pack("<IIQ", req_type, 0, sector))
    status = mock.alloc(1)
    fe.memory.write(status, b"\xff")
    descs = [RawDesc(hdr, 16, 0, 0)]
    buf = 0
    if data is not None:
        buf = mock.alloc(len(data))
        fe.memory.write(buf, data)
        descs.append(RawDesc(buf, len(data), 0, 0))
    elif read_len:
        buf = mock.alloc(read_len)
        descs.append(RawDesc(buf, read_len, WRITE, 0))
    descs.append(RawDesc(status, 1, WRITE, 0))
    head = mock.add_chain(descs)
    fe.kick(0)
    [(used_head, _used_len)] = fe.wait_used(0)
    assert used_head == head
    return fe.memory.read(status, 1)[0], fe.memory.read(buf, read_len) if read_len else b""


def test_frontend_drives_qemu_storage_daemon(qsd_socket: tuple[str, Path, str]) -> None:
    path, img, fmt = qsd_socket
    with Frontend.connect(path) as fe:
        offered = fe.get_features()
        assert offered & VHOST_USER_F_PROTOCOL_FEATURES and offered & VIRTIO_F_VERSION_1
        fe.negotiate(features=offered & (VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES))
        fe.add_memory(1 << 20)
        fe.set_mem_table()
        # virtio-blk config space (§5.2.4): capacity u64 in 512-byte sectors first.
        capacity = struct.unpack("<Q", fe.get_config(0, 8))[0]
        assert capacity == (1 << 20) // SECTOR
        fe.setup_ring(0, 128)
        pattern = bytes(range(256)) * 4  # two sectors
        status, _ = blk_request(fe, VIRTIO_BLK_T_OUT, 3, data=pattern)
        assert status == VIRTIO_BLK_S_OK
        status, back = blk_request(fe, VIRTIO_BLK_T_IN, 3, read_len=len(pattern))
        assert status == VIRTIO_BLK_S_OK and back == pattern
        status, zeros = blk_request(fe, VIRTIO_BLK_T_IN, 0, read_len=SECTOR)
        assert status == VIRTIO_BLK_S_OK and zeros == bytes(SECTOR)
        assert fe.get_vring_base(0) == 3
    if fmt == "raw":
        with open(img, "rb") as f:
            f.seek(3 * SECTOR)
            assert f.read(len(pattern)) == pattern
