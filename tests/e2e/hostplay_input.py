"""Run inside a guest that plays the host (``inhost python /tmp/hostplay_input.py``).

The real backend: two uinput devices (a keyboard with LEDs, and an absolute
tablet with a resolution and INPUT_PROP_DIRECT) made with python-evdev, and
vhost-device-input on their ``/dev/input/eventN`` nodes, driven by our front-end.
Checks each config select against what the devices were made with, that key
presses and ABS events written to the uinput devices arrive grouped in eventq
buffers, and that an LED written to the statusq reaches the uinput device.
Prints ``input-ok`` and exits 0, or prints the failure and exits non-zero.
"""

from __future__ import annotations

import select
import struct
import sys
import time

from daemon_process import DaemonProcess  # tests/integration, on PYTHONPATH in the guest
from device_drivers import console_script
from evdev import AbsInfo, UInput
from evdev import ecodes as e
from input_frontend import InputGuest

# Python starts slowly over 9p under TCG on a shared machine.
TIMEOUT = 120.0


def check(what: str, got: object, want: object) -> None:
    if got != want:
        raise AssertionError(f"{what}: got {got!r}, want {want!r}")


def wait_uinput_event(dev: UInput, want: tuple[int, int, int], deadline: float) -> tuple[int, int, int]:
    """Wait until the uinput device receives ``want`` (its feedback: LEDs); the input
    core also sends the LEDs' state when a handler opens the device: skipped."""
    seen = []
    while time.monotonic() < deadline:
        if not select.select([dev.fd], [], [], deadline - time.monotonic())[0]:
            break
        for ev in dev.read():
            seen.append((ev.type, ev.code, ev.value))
            if seen[-1] == want:
                return want
    raise AssertionError(f"uinput device never got {want}, only {seen}")


def main() -> int:
    kbd = UInput({e.EV_KEY: [e.KEY_A, e.KEY_B], e.EV_LED: [e.LED_NUML, e.LED_CAPSL]}, name="vdev-uinput-kbd")
    axis = AbsInfo(value=0, min=0, max=32767, fuzz=0, flat=0, resolution=100)
    tab = UInput(
        {e.EV_KEY: [e.BTN_TOUCH], e.EV_ABS: [(e.ABS_X, axis), (e.ABS_Y, axis)]},
        name="vdev-uinput-tablet",
        input_props=[e.INPUT_PROP_DIRECT],
    )
    nodes = f"{kbd.device.path},{tab.device.path}"
    cmd = [*console_script("vhost-device-input", "vhost_backends.cli.input"), "-s", "/tmp/in.sock"]
    daemon = DaemonProcess("/tmp/in.sock0", [*cmd, "-e", nodes])
    try:
        daemon.wait_for("/tmp/in.sock1: listening", TIMEOUT)
        g = InputGuest("/tmp/in.sock0", timeout=TIMEOUT)
        check("ID_NAME", g.select(0x01), b"vdev-uinput-kbd")
        check("EV_BITS EV_LED", g.select(0x11, e.EV_LED), b"\x03")
        g.post(8)
        kbd.write(e.EV_KEY, e.KEY_A, 1)
        kbd.syn()
        check("key press", g.events(2), [(e.EV_KEY, e.KEY_A, 1), (0, 0, 0)])
        g.status((e.EV_LED, e.LED_CAPSL, 1))
        led = (e.EV_LED, e.LED_CAPSL, 1)
        check("LED", wait_uinput_event(kbd, led, time.monotonic() + TIMEOUT), led)
        g.close()

        t = InputGuest("/tmp/in.sock1", timeout=TIMEOUT)
        check("ABS_INFO ABS_X", struct.unpack("<iiiii", t.select(0x12, e.ABS_X)), (0, 32767, 0, 0, 100))
        check("PROP_BITS", t.select(0x10), b"\x02")
        t.post(8)
        tab.write(e.EV_ABS, e.ABS_X, 100)
        tab.write(e.EV_ABS, e.ABS_Y, 200)
        tab.write(e.EV_KEY, e.BTN_TOUCH, 1)
        tab.syn()
        got = t.events(4)
        check(
            "tablet",
            got,
            [(e.EV_ABS, e.ABS_X, 100), (e.EV_ABS, e.ABS_Y, 200), (e.EV_KEY, e.BTN_TOUCH, 1), (0, 0, 0)],
        )
        t.close()
    except (AssertionError, TimeoutError) as err:
        print(f"input: {err}\n--- daemon ---\n" + "\n".join(daemon.log[-20:]))
        return 1
    finally:
        if daemon.alive():
            daemon.terminate(TIMEOUT)
        kbd.close()
        tab.close()
    print(f"input-ok python={sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
