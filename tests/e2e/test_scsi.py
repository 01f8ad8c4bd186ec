"""vhost-device-scsi under QEMU's vhost-user-scsi-pci, proven by a Linux guest.

A first guest writes until QEMU is killed under it; the daemons then serve a
second guest, whose one boot checks several things: two daemons, one serving two writable images (two
request queues) and one ``-r`` image; the guest's virtio_scsi/sd_mod see three
disks.  The guest checksums a whole disk, writes with ``dd conv=fsync`` (checked in
the image file on the host), discards a range (a hole on the host, found with
``SEEK_HOLE``), sends a WRITE straight to the read-only LUN with ``sg_raw`` (DATA
PROTECT), and runs sg3-utils (``sg_inq``, ``sg_vpd -p bl/bdc/lbpv``, ``sg_readcap
-l``, ``sg_luns``, REPORT SUPPORTED OPERATION CODES through ``sg_raw``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import harness
import pytest

if TYPE_CHECKING:
    from conftest import Daemons

pytestmark = pytest.mark.qemu

GUEST_TIMEOUT = 240.0
MIB = 1 << 20
SIZES = {"a": 16 * MIB, "b": 8 * MIB, "ro": 4 * MIB}


def _pattern(size: int, seed: int) -> bytes:
    block = hashlib.sha256(bytes([seed])).digest() * 16  # 512 bytes
    return b"".join(block[i % 7 :] + block[: i % 7] for i in range(size // 512))


SCRIPT = r"""
find_disk() {  # the sd node whose size is $1 bytes
    for d in /sys/block/sd*; do
        [ "$(cat $d/size)" = "$(( $1 / 512 ))" ] && { basename $d; return; }
    done
}
for n in a b c; do waitfor /dev/sd$n 30 || { ls /dev; dmesg | tail -30; exit 10; }; done
A=$(find_disk @A@); B=$(find_disk @B@); R=$(find_disk @RO@)
echo "disks=$A,$B,$R"
echo "ro_flag=$(cat /sys/block/$R/ro)"
echo "rot=$(cat /sys/block/$A/queue/rotational)"
echo "sha_a=$(sha256sum < /dev/$A | cut -d' ' -f1)"
head -c 1048576 /dev/$A > /tmp/p
dd if=/tmp/p of=/dev/$B bs=65536 seek=16 conv=fsync 2>/dev/null && echo "dd=ok"
echo "sha_p=$(sha256sum < /tmp/p | cut -d' ' -f1)"
echo "discard_max=$(cat /sys/block/$B/queue/discard_max_bytes)"
blkdiscard -o 4194304 -l 2097152 /dev/$B && echo "blkdiscard=ok"
sync
head -c 512 /dev/zero > /tmp/z
echo "--- sg_raw write ro"
sg_raw -R -s 512 -i /tmp/z /dev/$R 2a 00 00 00 00 00 00 00 01 00 2>&1
echo "--- sg_inq"
sg_inq /dev/$A 2>&1
echo "--- sg_vpd bl"
sg_vpd -p bl /dev/$A 2>&1
echo "--- sg_vpd bdc"
sg_vpd -p bdc /dev/$R 2>&1
echo "--- sg_vpd lbpv"
sg_vpd -p lbpv /dev/$B 2>&1
echo "--- sg_readcap"
sg_readcap -l /dev/$A 2>&1
echo "--- sg_luns"
sg_luns /dev/$A 2>&1
echo "--- opcodes"
sg_raw -r 4096 /dev/$A a3 0c 00 00 00 00 00 00 10 00 00 00 2>&1 | head -8
echo "--- end"
"""


# The first guest writes without end until QEMU is killed under it.
ENDLESS_WRITE = r"""
waitfor /dev/sda 30 || exit 10
i=0
while true; do
    dd if=/dev/urandom of=/dev/sda bs=65536 count=16 seek=$(( (i % 8) * 16 )) conv=fsync 2>/dev/null
    echo "WROTE $i"
    i=$((i + 1))
done
"""


def _section(out: str, name: str) -> str:
    start = out.index(f"--- {name}\n") + len(name) + 5
    return out[start : out.index("\n---", start)]


def test_scsi_guest_disks(daemon: Daemons, sockdir: Path, tmp_path: Path) -> None:
    imgs = {}
    for seed, (name, size) in enumerate(SIZES.items()):
        p = tmp_path / f"{name}.img"
        p.write_bytes(_pattern(size, seed))
        imgs[name] = p
    ro_before = imgs["ro"].read_bytes()
    rw_sock, ro_sock = str(sockdir / "rw.sock"), str(sockdir / "ro.sock")
    d = daemon("scsi", "-s", rw_sock, str(imgs["a"]), str(imgs["b"]), socket=rw_sock)
    dro = daemon("scsi", "-s", ro_sock, "-r", "--solid-state", str(imgs["ro"]), socket=ro_sock)
    script = (
        SCRIPT.replace("@A@", str(SIZES["a"]))
        .replace("@B@", str(SIZES["b"]))
        .replace("@RO@", str(SIZES["ro"]))
    )
    devices = [
        (rw_sock, "vhost-user-scsi-pci,num_queues=2"),
        (ro_sock, "vhost-user-scsi-pci,num_queues=1"),
    ]
    # QEMU killed mid-write: the daemons serve the next QEMU (the checks below).
    with harness.start_guest(ENDLESS_WRITE, devices, extra_args=["-smp", "2"]) as g:
        seen = g.wait_for("WROTE 2\n", timeout=GUEST_TIMEOUT)
        g.kill()
        assert seen, f"the first guest never wrote\n{g.result().console}\n{g.qemu_log()}"
    assert d.alive() and dro.alive(), f"a daemon died with its front-end\n{d.log()}\n{dro.log()}"
    res = harness.run_guest(script, devices, timeout=GUEST_TIMEOUT, extra_args=["-smp", "2"])
    logs = f"\n--- daemon rw ---\n{d.log()}\n--- daemon ro ---\n{dro.log()}"
    assert res.exit_status == 0, f"{res}{logs}"
    out = res.output
    kv = dict(
        line.split("=", 1) for line in out.splitlines() if "=" in line and " " not in line.split("=")[0]
    )
    # Whole-disk read checksummed against the host image.
    assert kv["sha_a"] == hashlib.sha256(imgs["a"].read_bytes()).hexdigest(), out
    # The guest's write is in the image file after its fsync.
    b = imgs["b"].read_bytes()
    assert kv["dd"] == "ok" and kv["sha_p"] == hashlib.sha256(b[MIB : 2 * MIB]).hexdigest(), out
    assert b[MIB : 2 * MIB] == imgs["a"].read_bytes()[:MIB]
    # blkdiscard punched a hole: zeros, and SEEK_HOLE finds it on the host.
    assert kv["blkdiscard"] == "ok" and int(kv["discard_max"]) > 0, out
    assert b[4 * MIB : 6 * MIB] == bytes(2 * MIB)
    with open(imgs["b"], "rb") as f:
        hole = os.lseek(f.fileno(), 4 * MIB, os.SEEK_HOLE)
        assert hole == 4 * MIB, f"no hole at 4 MiB (next hole at {hole})"
    # The read-only LUN: write-protected for the block layer, a WRITE refused by the device.
    assert kv["ro_flag"] == "1", out
    raw = _section(out, "sg_raw write ro").lower()
    assert "data protect" in raw and "write protected" in raw, raw
    assert imgs["ro"].read_bytes() == ro_before
    # sg3-utils show what the device reports.
    inq = _section(out, "sg_inq")
    assert "rust-vmm" in inq and "vhost-user-scsi" in inq and "SPC-5" in inq, inq
    bl = _section(out, "sg_vpd bl")
    assert "Maximum unmap LBA count: 4194304" in bl and "Optimal unmap granularity: 8" in bl, bl
    assert "non-rotating" in _section(out, "sg_vpd bdc").lower()
    lbpv = _section(out, "sg_vpd lbpv")
    assert "(LBPU): 1" in lbpv and "(LBPRZ): 1" in lbpv and "thin provisioned" in lbpv, lbpv
    cap = _section(out, "sg_readcap")
    assert f"Last LBA={SIZES['a'] // 512 - 1} " in cap and "lbpme=1, lbprz=1" in cap, cap
    luns = _section(out, "sg_luns")
    assert "Lun list length = 16" in luns, luns
    # REPORT SUPPORTED OPERATION CODES, all commands: a 4-byte header and 24 descriptors.
    assert "Received 196 bytes" in _section(out, "opcodes"), out
    assert kv["rot"] == "1"  # no --solid-state on the rw daemon: rotational
    for dd in (d, dro):
        assert dd.alive() and "Traceback" not in dd.log(), logs
