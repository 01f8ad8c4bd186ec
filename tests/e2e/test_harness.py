"""The harness against a vhost-user back-end that is none of our code.

qemu-storage-daemon exports a file as vhost-user-blk; the guest reads and
writes ``/dev/vda``. This proves the harness (shared memfd memory, chardev
sockets, driver loading, killing QEMU mid-I/O and reconnecting) on its own,
so a failing daemon test points at the daemon.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import harness
import pytest

if TYPE_CHECKING:
    from conftest import Daemons

pytestmark = pytest.mark.qemu

DISK_SIZE = 4 << 20
PATTERN = b"vdev-e2e was here"


@pytest.fixture
def blk_socket(guest: harness.Guest, daemon: Daemons, sockdir: Path) -> tuple[Path, Path]:
    """A qemu-storage-daemon vhost-user-blk export of a random 4 MiB image."""
    qsd = shutil.which("qemu-storage-daemon")
    if qsd is None:
        pytest.skip("qemu-storage-daemon is not installed (package qemu-system-common)")
    image = sockdir / "disk.img"
    image.write_bytes(os.urandom(DISK_SIZE))
    sock = sockdir / "blk.sock"
    argv = [
        qsd,
        "--blockdev",
        f"driver=file,node-name=file0,filename={image}",
        "--export",
        f"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={sock},writable=on",
    ]
    daemon.start(argv, socket=sock)
    return sock, image


def test_harness_vhost_user_blk(blk_socket: tuple[Path, Path]) -> None:
    sock, image = blk_socket
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    script = f"""\
set -e
waitfor /dev/vda 10
echo "size=$(cat /sys/block/vda/size)"
echo "sha=$(sha256sum < /dev/vda | cut -d' ' -f1)"
printf '{PATTERN.decode()}' | dd of=/dev/vda bs=512 seek=3 conv=sync,fsync 2>/dev/null
"""
    res = harness.run_guest(script, [(str(sock), "vhost-user-blk-pci")], timeout=120)
    print(f"blk: script started at guest uptime {res.uptime_at_start}s, wall {res.wall_time:.1f}s")
    assert res.exit_status == 0, res
    assert f"size={DISK_SIZE // 512}" in res.output, res
    assert f"sha={before}" in res.output, res
    data = image.read_bytes()
    assert data[3 * 512 : 3 * 512 + len(PATTERN)] == PATTERN


def test_harness_guest_killed_mid_read_then_restarted(blk_socket: tuple[Path, Path]) -> None:
    """``start_guest`` + ``kill()``: a new QEMU reconnects to the same back-end."""
    sock, image = blk_socket
    devices = [(str(sock), "vhost-user-blk-pci")]
    endless = """\
waitfor /dev/vda 10 || exit 1
i=0
while dd if=/dev/vda of=/dev/null bs=64k iflag=direct 2>/dev/null; do
    i=$((i + 1))
    echo "PASS $i"
done
exit 1
"""
    with harness.start_guest(endless, devices) as g:
        assert g.wait_for("PASS 2\n", timeout=120), g.result().console[-3000:] + g.qemu_log()
        g.kill()
        assert not g.running()
        killed = g.result()
    assert killed.exit_status is None
    assert killed.qemu_returncode == -9
    assert "PASS 2" in killed.output

    res = harness.run_guest("waitfor /dev/vda 10 && sha256sum < /dev/vda", devices, timeout=120)
    assert res.exit_status == 0, res
    assert hashlib.sha256(image.read_bytes()).hexdigest() in res.output, res
