"""vhost-device-vsock in the e2e guest: throughput ours against the Rust daemon, one run.

Boots the e2e guest (tests/e2e/harness.py: QEMU, TCG here) once per daemon, ours and
the Rust one from ``VHOST_DEVICE_RUST_BIN`` (else "n/a"), and times inside the guest
(``/proc/uptime``) ``socat`` moving 32 MiB guest -> host and host -> guest, with
64 KiB and 4 KiB writes, through hybrid vsock.  Prints MiB/s and ours/Rust.  Run by
hand (each boot takes a minute or two under TCG)::

    VHOST_DEVICE_RUST_BIN=~/.cache/vsock-sid/root/usr/bin .venv/bin/python benches/vsock_e2e_table.py
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "e2e")]

import harness  # noqa: E402
from test_vsock import _host_connect  # noqa: E402

MIB = 32
SCRIPT = f"""\
set -e
i=0
while [ ! -e /dev/vsock ]; do i=$((i+1)); [ $i -gt 100 ] && exit 10; sleep 0.1; done
(socat -u VSOCK-LISTEN:1235 - | wc -c > /tmp/h2g.n) &
h2g=$!
echo READY
for bs in 65536 4096; do
    t0=$(cut -d' ' -f1 /proc/uptime)
    n=$(({MIB} * 1048576 / bs))
    dd if=/dev/zero bs=$bs count=$n 2>/dev/null | socat -u -b $bs - VSOCK-CONNECT:2:5001
    t1=$(cut -d' ' -f1 /proc/uptime)
    echo "g2h_$bs=$t0 $t1"
done
t0=$(cut -d' ' -f1 /proc/uptime)
wait $h2g
t1=$(cut -d' ' -f1 /proc/uptime)
echo "h2g_bytes=$(cat /tmp/h2g.n)"
echo "h2g_end=$t1"
"""


def _sink(lst: socket.socket) -> None:
    for _ in range(2):
        c, _ = lst.accept()
        with c:
            while c.recv(1 << 20):
                pass


def run(cmd: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        sock, uds = f"{tmp}/v.sock", f"{tmp}/vm.vsock"
        d = harness.Daemon(
            [*cmd, "--guest-cid", "3", "--socket", sock, "--uds-path", uds], sock, f"{tmp}/d.log"
        )
        try:
            d.wait_for_socket()
            lst = socket.socket(socket.AF_UNIX)
            lst.bind(f"{uds}_5001")
            lst.listen(4)
            t = threading.Thread(target=_sink, args=(lst,), daemon=True)
            t.start()
            with harness.start_guest(SCRIPT, [(sock, "vhost-user-vsock-pci")], memory="512M") as g:
                if not g.wait_for("READY", 600):
                    raise RuntimeError(g.console()[-2000:])
                # The host -> guest stream, timed on the host (the guest's clock
                # cannot see when the host started).
                c = _host_connect(uds, 1235)  # retried until the guest listens
                block = b"\0" * (1 << 20)
                t0 = time.monotonic()
                for _ in range(MIB):
                    c.sendall(block)
                c.close()
                h2g_host = MIB / (time.monotonic() - t0)
                res = g.wait(900)
            out = {}
            for line in res.output.splitlines():
                key, _, value = line.partition("=")
                if key.startswith("g2h_"):
                    a, b = (float(x) for x in value.split())
                    out[key] = MIB / (b - a)
            out["h2g (host clock)"] = h2g_host
            return out
        finally:
            d.stop()


def main() -> None:
    ours = shutil.which("vhost-device-vsock") or str(Path(sys.executable).parent / "vhost-device-vsock")
    rust_dir = os.environ.get("VHOST_DEVICE_RUST_BIN")
    rust = Path(rust_dir) / "vhost-device-vsock" if rust_dir else None
    a = run([ours])
    print("ours:", {k: round(v, 1) for k, v in a.items()}, flush=True)
    b = run([str(rust)]) if rust is not None and rust.exists() else None
    print(f"{'e2e guest, MiB/s':24} {'ours':>8} {'rust':>8} {'ours/rust':>10}")
    for k, v in a.items():
        r = None if b is None else b.get(k)
        rust_text = "n/a" if r is None else f"{r:.1f}"
        ratio = "n/a" if r is None else f"{v / r:.2f}x"
        print(f"{k:24} {v:8.1f} {rust_text:>8} {ratio:>10}")


if __name__ == "__main__":
    main()
