"""vhost-device-i2c proven by a Linux guest's i2c-virtio driver, and on a real i2c-stub adapter.

Two boots (each shared by several checks, CI budget):

- ``test_guest_i2c_tools_on_simulated_eeprom``: QEMU's vhost-user-i2c-pci on
  ``vhost-device-i2c -l sim:80``; the guest (i2c-virtio, built out of tree by the
  harness, and i2c-tools) finds the adapter, ``i2cdetect -y`` sees 0x50 and
  nothing else, ``i2ctransfer`` writes 8 bytes and reads them back in one
  write-then-read transaction (a FAIL_NEXT group), ``i2cset``/``i2cget`` round
  trip byte data and word data, and a read from an empty address fails.
- ``test_real_i2c_stub_adapter``: a guest that plays the host makes an i2c-stub
  adapter (``modprobe i2c-stub chip_addr=0x50``), sets a word with i2cset, and runs
  ``hostplay_i2c.py``: the daemon on that adapter by name, through smbus2,
  driven by our front-end; the shell reads the daemon's writes back with i2cget.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import harness
import pytest

if TYPE_CHECKING:
    from conftest import Daemons

pytestmark = pytest.mark.qemu

HERE = Path(__file__).resolve().parent
GUEST_TIMEOUT = 240.0

GUEST_SCRIPT = """\
modprobe -q i2c-dev 2>/dev/null
modprobe -q i2c-virtio 2>/dev/null
bus=
i=0
while [ -z "$bus" ]; do
    for d in /sys/bus/i2c/devices/i2c-*; do
        [ -e "$d/name" ] || continue
        case "$(cat $d/name)" in *virtio*) bus=${d##*/i2c-};; esac
    done
    [ -n "$bus" ] && break
    i=$((i + 1)); [ $i -lt 1500 ] || { echo "no i2c-virtio adapter: $(ls /sys/bus/i2c/devices)"; exit 10; }
    usleep 20000
done
waitfor /dev/i2c-$bus 30
echo "bus=$bus name=$(cat /sys/bus/i2c/devices/i2c-$bus/name)"
echo "features: $(cat /sys/bus/virtio/devices/*/features | head -1)"
i2cdetect -y $bus | sed 's/^/detect: /'
i2ctransfer -y $bus w9@0x50 0x10 1 2 3 4 5 6 7 8 && echo "transfer-write ok"
echo "transfer-read: $(i2ctransfer -y $bus w1@0x50 0x10 r8)"
i2cset -y $bus 0x50 0x20 0xab && echo "set ok"
echo "get: $(i2cget -y $bus 0x50 0x20)"
i2cset -y $bus 0x50 0x30 0x1234 w && echo "setw ok"
echo "getw: $(i2cget -y $bus 0x50 0x30 w)"
if i2cget -y $bus 0x51 0x00 >/dev/null 2>&1; then echo "absent answered"; else echo "absent fails"; fi
echo "after-absent: $(i2cget -y $bus 0x50 0x20)"
"""


def detected(output: str) -> set[int]:
    """Addresses i2cdetect's table shows as present (a hex number or UU)."""
    found: set[int] = set()
    for line in output.splitlines():
        m = re.match(r"detect: ([0-7]0):(.*)", line)
        if not m:
            continue
        row = int(m.group(1), 16)
        cells = m.group(2).split()
        for col, cell in enumerate(cells[:16]):
            if cell not in ("--", ""):
                found.add(row + col)
    return found


def test_guest_i2c_tools_on_simulated_eeprom(guest: harness.Guest, daemon: Daemons, sockdir: Path) -> None:
    sock = sockdir / "i2c.sock"
    daemon("i2c", "-s", str(sock), "-l", "sim:80", socket=f"{sock}0")
    res = harness.run_guest(GUEST_SCRIPT, [(f"{sock}0", "vhost-user-i2c-pci")], timeout=GUEST_TIMEOUT)
    out = res.output
    print(f"i2c e2e: script at uptime {res.uptime_at_start}s, wall {res.wall_time:.1f}s")
    assert res.exit_status == 0, res
    assert re.search(r"bus=\d+ name=.*virtio", out), res
    # VIRTIO_I2C_F_ZERO_LENGTH_REQUEST (bit 0) negotiated: the driver insists on it.
    features = re.search(r"features: ([01]+)", out)
    assert features and features.group(1)[0] == "1", res
    assert detected(out) == {0x50}, res
    assert "transfer-write ok" in out, res
    assert "transfer-read: 0x01 0x02 0x03 0x04 0x05 0x06 0x07 0x08" in out, res
    assert "set ok" in out and "get: 0xab" in out, res
    assert "setw ok" in out and "getw: 0x1234" in out, res
    assert "absent fails" in out, res
    assert "after-absent: 0xab" in out, res


HOSTPLAY_SCRIPT = """\
modprobe i2c-stub chip_addr=0x50 && modprobe i2c-dev || { echo "i2c-stub failed"; exit 10; }
n=
for d in /sys/bus/i2c/devices/i2c-*; do
    [ "$(cat $d/name)" = "SMBus stub driver" ] && n=${d##*/i2c-}
done
[ -n "$n" ] || { echo "no i2c-stub adapter"; exit 11; }
waitfor /dev/i2c-$n 30
i2cset -y $n 0x50 0x20 0x1234 w || { echo "i2cset failed"; exit 12; }
inhost python /tmp/hostplay_i2c.py $n "SMBus stub driver"
rc=$?
echo "after-get: $(i2cget -y $n 0x50 0x10)"
echo "after-getw: $(i2cget -y $n 0x50 0x30 w)"
exit $rc
"""


def test_real_i2c_stub_adapter(guest: harness.Guest) -> None:
    if shutil.which("vhost-device-i2c") is None:
        pytest.skip("vhost-device-i2c is not installed")
    files = {"hostplay_i2c.py": (HERE / "hostplay_i2c.py").read_text()}
    res = harness.run_as_host(HOSTPLAY_SCRIPT, files=files, timeout=GUEST_TIMEOUT)
    print(f"i2c real backend: script at uptime {res.uptime_at_start}s, wall {res.wall_time:.1f}s")
    if "No module named 'smbus2'" in res.output or "need the smbus2 package" in res.output:
        pytest.skip("smbus2 is not installed in the venv (the 'hosts' or 'test' extra)")
    assert res.exit_status == 0, res
    for name in (
        "word-read-i2cset-value",
        "byte-and-word-data",
        "byte-data-value",
        "word-data-value",
        "i2c-block",
        "quick",
        "fail-next-group",
    ):
        assert f"check {name} ok" in res.output, (name, res)
    assert "i2c-real-ok" in res.output, res
    assert "after-get: 0xab" in res.output, res
    assert "after-getw: 0xbeef" in res.output, res
