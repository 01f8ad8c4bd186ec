"""vhost-device-input under QEMU's vhost-user-input-pci, proven by a Linux guest.

One boot serves every check: the daemon runs ``-e sim:keyboard,sim:tablet``, the
guest's virtio_input driver binds both, and ``evtest`` in the guest shows each
device's name, ids, event types and (for the tablet) the absolute axes with their
range and resolution and INPUT_PROP_DIRECT.  Keys and pen events injected on the
host through the control sockets appear in the guest's ``/dev/input/eventN``; the
guest turns Caps Lock's LED on by writing an EV_LED event to the keyboard's node
(the input core forwards it to virtio_input's statusq), and the host's simulated
keyboard sees it.

QEMU 7.2's vhost-user-input (a VhostUserBackend) refuses to start without KVM's
ioeventfds ("vhost initialization failed: requires kvm"), and KVM does not boot
here: the test takes the oldest QEMU build of at least 10.0 the harness has.

A second boot, a guest that plays the host, runs the real backend: uinput devices
made with python-evdev and the daemon on their ``/dev/input/eventN`` nodes, driven
by our front-end (``hostplay_input.py``).
"""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import harness
import pytest

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import Daemons

pytestmark = pytest.mark.qemu

HERE = Path(__file__).resolve().parent

GUEST_TIMEOUT = 240.0

# busybox sh.  Finds both devices by name, starts evtest on each (its header is the
# capability dump), then waits for the host's events and writes the LED.
GUEST_SCRIPT = r"""
# Nothing loads modules on demand in this initramfs: evdev makes the event nodes.
modprobe evdev
find_dev() {
    for d in /sys/class/input/event*; do
        if grep -q "$1" "$d/device/name" 2>/dev/null; then echo "/dev/input/${d##*/}"; return 0; fi
    done
    return 1
}
n=0
until kbd=$(find_dev "simulated keyboard") && tab=$(find_dev "simulated tablet"); do
    n=$((n + 1)); [ $n -gt 300 ] && { echo "devices not found"; ls /sys/class/input; exit 10; }
    sleep 0.1
done
evtest "$kbd" > /tmp/kbd.log 2>&1 &
evtest "$tab" > /tmp/tab.log 2>&1 &
# evtest prints "Testing ..." once its header is out and it reads events.
n=0
until grep -q Testing /tmp/kbd.log && grep -q Testing /tmp/tab.log; do
    n=$((n + 1)); [ $n -gt 300 ] && { echo "evtest did not start"; cat /tmp/*.log; exit 11; }
    sleep 0.1
done
echo "READY"
n=0
until grep -q "(KEY_A), value 0" /tmp/kbd.log && grep -q "(ABS_Y), value 4321" /tmp/tab.log; do
    n=$((n + 1)); [ $n -gt 600 ] && { echo "events did not arrive"; break; }
    sleep 0.1
done
# struct input_event: 16 bytes of timeval, type EV_LED (0x11), code LED_CAPSL (1), value 1.
printf '\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\021\0\001\0\001\0\0\0' > "$kbd"
echo "LED_WRITTEN"
echo "=== keyboard ==="
cat /tmp/kbd.log
echo "=== tablet ==="
cat /tmp/tab.log
echo "=== end ==="
"""


def _control(path: Path, *lines: str) -> list[str]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(60)
        s.connect(str(path))
        s.sendall("".join(f"{line}\n" for line in lines).encode())
        data = b""
        while data.count(b"\n") < len(lines):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.decode().splitlines()


def test_input_guest_sees_sim_keyboard_and_tablet(
    guest: harness.Guest,
    daemon: Daemons,
    sockdir: Path,
    qemu_at_least: Callable[[tuple[int, ...]], str],
) -> None:
    qemu = qemu_at_least((10,))
    sock = sockdir / "in.sock"
    script = shutil.which("vhost-device-input")
    argv = [script] if script else [sys.executable, "-m", "vhost_backends.cli.input"]
    d = daemon.start([*argv, "-s", str(sock), "-e", "sim:keyboard,sim:tablet"], socket=f"{sock}1")
    devices = [(f"{sock}0", "vhost-user-input-pci"), (f"{sock}1", "vhost-user-input-pci")]
    kbd_ctl, tab_ctl = Path(f"{sock}0.ctl"), Path(f"{sock}1.ctl")
    with harness.start_guest(GUEST_SCRIPT, devices, qemu=qemu) as g:
        ready = g.wait_for("READY\n", timeout=GUEST_TIMEOUT)
        assert ready, (
            f"guest never got ready\n{g.console()[-4000:]}\n{g.qemu_log()}\n--- daemon ---\n{d.log()}"
        )
        assert _control(kbd_ctl, "EV EV_MSC MSC_SCAN 30", "KEY KEY_A 1", "KEY KEY_A 0") == ["ok"] * 3
        pen = ["EV EV_ABS ABS_X 1234", "EV EV_ABS ABS_Y 4321", "EV EV_KEY BTN_TOUCH 1", "SYN"]
        assert _control(tab_ctl, *pen) == ["ok"] * 4
        assert g.wait_for("LED_WRITTEN\n", timeout=GUEST_TIMEOUT), g.console()[-4000:]
        led = _control(kbd_ctl, "WAIT EV_LED LED_CAPSL 1 60")
        res = g.wait(GUEST_TIMEOUT)
    out = res.output
    assert res.exit_status == 0, res
    kbd_log = out.split("=== keyboard ===", 1)[1].split("=== tablet ===", 1)[0]
    tab_log = out.split("=== tablet ===", 1)[1]
    print(out)
    # Identity and capabilities, as the guest's evdev sees them (evtest lists EV_REP
    # under "Key repeat handling").
    assert 'Input device name: "vhost-device-input simulated keyboard"' in kbd_log, out
    assert "bus 0x6 vendor 0x1 product 0x1 version 0x1" in kbd_log, out
    for line in (
        "Event type 1 (EV_KEY)",
        "Event type 4 (EV_MSC)",
        "Event type 17 (EV_LED)",
        "Repeat type 20 (EV_REP)",
    ):
        assert line in kbd_log, (line, kbd_log)
    assert "(LED_CAPSL)" in kbd_log, kbd_log
    assert 'Input device name: "vhost-device-input simulated tablet"' in tab_log, out
    assert "Event code 0 (ABS_X)" in tab_log and "Event code 1 (ABS_Y)" in tab_log, tab_log
    assert "Max    32767" in tab_log and "Resolution     100" in tab_log, tab_log
    assert "Property type 1 (INPUT_PROP_DIRECT)" in tab_log, tab_log
    # The host's events, in order and grouped as sent.
    assert "type 4 (EV_MSC), code 4 (MSC_SCAN), value 1e" in kbd_log, kbd_log
    assert "type 1 (EV_KEY), code 30 (KEY_A), value 1" in kbd_log, kbd_log
    assert "type 1 (EV_KEY), code 30 (KEY_A), value 0" in kbd_log, kbd_log
    assert "(ABS_X), value 1234" in tab_log and "(BTN_TOUCH), value 1" in tab_log, tab_log
    # The guest's LED reached the host's (simulated) keyboard.
    assert led == ["ok"], (led, d.log())
    assert d.alive() and "Traceback" not in d.log(), d.log()


HOSTPLAY_SCRIPT = """\
modprobe evdev
modprobe uinput && waitfor /dev/uinput || { echo "no /dev/uinput"; exit 10; }
inhost python /tmp/hostplay_input.py
"""


def test_input_real_evdev_backend_in_a_guest_that_plays_the_host(guest: harness.Guest) -> None:
    files = {"hostplay_input.py": (HERE / "hostplay_input.py").read_text()}
    res = harness.run_as_host(HOSTPLAY_SCRIPT, files=files, timeout=GUEST_TIMEOUT)
    print(f"input real backend: script at uptime {res.uptime_at_start}s, wall {res.wall_time:.1f}s")
    if "No module named 'evdev'" in res.output:
        pytest.skip("python-evdev is not installed in the venv (the 'hosts' and 'test' extras)")
    assert res.exit_status == 0, res
    assert "input-ok" in res.output, res
