"""A Linux guest reads a 64 MiB disk through vhost-device-scsi and, in the same boot,
through qemu-storage-daemon's vhost-user-blk: sequential read time, ratio.

Both images hold the same bytes, on the host's page cache.  The guest (QEMU TCG,
tests/e2e/harness.py) drops its own cache before each read and times
``dd bs=1M`` with ``/proc/uptime``, alternating the two disks ``--reps`` times.

    PATH=.venv/bin:$PATH .venv/bin/python benches/scsi_guest.py [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
import harness

SIZE = 64 << 20

SCRIPT = r"""
waitfor /dev/sda 30 && waitfor /dev/vda 30 || exit 10
for i in $(seq @REPS@); do
    for d in sda vda; do
        sync; echo 3 > /proc/sys/vm/drop_caches
        t0=$(cut -d' ' -f1 /proc/uptime)
        dd if=/dev/$d of=/dev/null bs=1048576 2>/dev/null
        t1=$(cut -d' ' -f1 /proc/uptime)
        echo "T $d $t0 $t1"
    done
done
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    scsi = shutil.which("vhost-device-scsi")
    qsd = shutil.which("qemu-storage-daemon")
    if scsi is None or qsd is None or harness.qemu_binary() is None:
        print("needs vhost-device-scsi, qemu-storage-daemon and QEMU", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="scsi-guest-", dir="/tmp"))
    data = os.urandom(SIZE)
    for name in ("scsi.img", "blk.img"):
        (tmp / name).write_bytes(data)
    ours = subprocess.Popen(
        [scsi, "-s", str(tmp / "scsi.sock"), str(tmp / "scsi.img")], stderr=subprocess.DEVNULL
    )
    subprocess.run(
        [
            qsd,
            "--daemonize",
            "--pidfile",
            str(tmp / "qsd.pid"),
            "--blockdev",
            f"driver=file,node-name=file0,filename={tmp / 'blk.img'}",
            "--blockdev",
            "driver=raw,node-name=disk0,file=file0",
            "--export",
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
            f"addr.path={tmp / 'blk.sock'},writable=on",
        ],
        check=True,
        timeout=30,
    )
    try:
        while not (tmp / "scsi.sock").exists():
            time.sleep(0.05)
        devices = [
            (str(tmp / "scsi.sock"), "vhost-user-scsi-pci"),
            (str(tmp / "blk.sock"), "vhost-user-blk-pci"),
        ]
        res = harness.run_guest(SCRIPT.replace("@REPS@", str(args.reps)), devices, timeout=600)
        if res.exit_status != 0:
            print(res, file=sys.stderr)
            return 1
        times: dict[str, list[float]] = {"sda": [], "vda": []}
        for line in res.output.splitlines():
            if line.startswith("T "):
                _, dev, t0, t1 = line.split()
                times[dev].append(float(t1) - float(t0))
        ours_s, qsd_s = statistics.median(times["sda"]), statistics.median(times["vda"])
        print(f"guest sequential read of 64 MiB: ours {ours_s:.2f} s, qsd vhost-user-blk {qsd_s:.2f} s")
        print(f"| 64 MiB sequential read in the guest | {qsd_s / ours_s:.2f}x the speed | {times} |")
    finally:
        ours.send_signal(signal.SIGTERM)
        ours.wait(10)
        os.kill(int((tmp / "qsd.pid").read_text()), signal.SIGTERM)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
