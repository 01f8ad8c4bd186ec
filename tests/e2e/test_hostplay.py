"""The "guest plays the host" harness, proven with the rng daemon.

One boot: the guest mounts the host's root over 9p, makes the fake hardware
the real-backend tests of the other devices need (a gpio-sim chip, an
i2c-stub adapter, uinput, an snd-aloop card) and runs the project's venv in
the host's root: vhost-device-rng on a file of known bytes, driven by our
front-end, must return exactly those bytes.
"""

from __future__ import annotations

import re
from pathlib import Path

import harness
import pytest

pytestmark = pytest.mark.qemu

HERE = Path(__file__).resolve().parent

SCRIPT = """\
chip=$(mkgpiosim vdev 4) || { echo "mkgpiosim failed"; exit 10; }
set -- $chip
echo "gpio-sim chip=$1 dev=$2 lines=$(ls -d /sys/devices/platform/$2/$1/sim_gpio* | wc -l)"
[ -c /dev/$1 ] && echo "gpio-cdev=/dev/$1"
echo pull-up > /sys/devices/platform/$2/$1/sim_gpio2/pull
echo "sim_gpio2=$(cat /sys/devices/platform/$2/$1/sim_gpio2/value)"
modprobe i2c-stub chip_addr=0x50 && modprobe i2c-dev && waitfor /dev/i2c-0 && echo "i2c=/dev/i2c-0"
modprobe uinput && waitfor /dev/uinput && echo "uinput=/dev/uinput"
modprobe snd-aloop && grep -q Loopback /proc/asound/cards && echo "snd-aloop=ok"
inhost sh -c 'echo "inhost pwd=$PWD python=$(command -v python)"'
inhost touch /host-is-read-only 2>/dev/null && echo "host root is writable"
head -c 4096 /dev/urandom > /tmp/src
echo "src=$(head -c 128 /tmp/src | sha256sum | cut -d' ' -f1)"
inhost python /tmp/hostplay_rng.py /tmp/src
"""


def test_guest_plays_the_host_with_the_rng_daemon(guest: harness.Guest) -> None:
    files = {"hostplay_rng.py": (HERE / "hostplay_rng.py").read_text()}
    res = harness.run_as_host(SCRIPT, files=files, timeout=240)
    out = res.output
    print(f"hostplay: script started at guest uptime {res.uptime_at_start}s, wall {res.wall_time:.1f}s")
    assert res.exit_status == 0, str(res)
    m = re.search(r"gpio-sim chip=(gpiochip\d+) dev=(gpio-sim\.\d+) lines=4", out)
    assert m, str(res)
    assert f"gpio-cdev=/dev/{m.group(1)}" in out, str(res)
    assert "sim_gpio2=1" in out, res  # a pull-up reads back high
    assert "i2c=/dev/i2c-0" in out, str(res)
    assert "uinput=/dev/uinput" in out, str(res)
    assert "snd-aloop=ok" in out, str(res)
    assert f"inhost pwd={harness.REPO} python=" in out, str(res)
    assert "host root is writable" not in out, str(res)
    assert "rng-ok python=" in out, str(res)
