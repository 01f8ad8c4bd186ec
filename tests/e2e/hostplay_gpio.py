"""Run inside a guest that plays the host: vhost-device-gpio on a real gpio-sim chip.

``inhost python /tmp/hostplay_gpio.py CHIP SYSFS`` where CHIP is the number N
of /dev/gpiochipN (a gpio-sim chip made by ``mkgpiosim vdev 8``, lines named
vdev-0..vdev-7) and SYSFS its ``/sys/devices/platform/<dev>/<chip>``
directory. The daemon runs on the chip through python gpiod (``-l N``), our
front-end drives it with VIRTIO 1.2 §5.17 requests, and gpio-sim's sysfs is
the other side:

- config ngpio and GET_LINE_NAMES give gpio-sim's lines and names;
- SET_VALUE 1 then SET_DIRECTION out on line 3 (the Linux driver's order),
  then SET_VALUE 0: gpio-sim's ``sim_gpio3/value`` reads 1, then 0;
- line 4 as input with IRQ type EDGE_RISING and an eventq waiter: the waiter
  stays pending while nothing happens, then ``pull-up`` on ``sim_gpio4/pull``
  completes it with VIRTIO_GPIO_IRQ_STATUS_VALID, and GET_VALUE reads 1.

Prints ``check <name> ok`` lines and ``gpio-real-ok``; exits 1 with the
offending value at the first failed check.
"""

from __future__ import annotations

import contextlib
import struct
import sys
from pathlib import Path

import device_drivers
from device_drivers import VhostUserDeviceDriver  # tests/integration, on PYTHONPATH in the guest

# Python starts slowly over 9p under TCG on a shared machine: give the daemon
# (and each ring) far longer than the integration tests' 10 s.
device_drivers.TIMEOUT = 120.0

# VIRTIO 1.2 §5.17.6: request types, directions, IRQ types, statuses.
GET_LINE_NAMES, GET_DIRECTION, SET_DIRECTION, GET_VALUE, SET_VALUE, SET_IRQ_TYPE = range(1, 7)
DIR_NONE, DIR_OUT, DIR_IN = 0, 1, 2
IRQ_TYPE_NONE, IRQ_TYPE_EDGE_RISING = 0, 1
STATUS_OK = 0
IRQ_STATUS_VALID = 1
REQUESTQ, EVENTQ = 0, 1
NLINES = 8


class Failed(Exception):
    pass


def check(name: str, cond: bool, detail: object) -> None:
    if not cond:
        raise Failed(f"check {name} failed: {detail}")
    print(f"check {name} ok", flush=True)


def request(drv: VhostUserDeviceDriver, rtype: int, gpio: int, value: int = 0, resp_len: int = 2) -> bytes:
    """One requestq round trip; returns the response buffer (status first)."""
    _head, (gpa,) = drv.add_request(
        REQUESTQ, readable=[struct.pack("<HHI", rtype, gpio, value)], writable=[resp_len]
    )
    used = drv.kick(REQUESTQ)
    assert len(used) == 1, used
    return drv.read(gpa, resp_len)


def sysfs(base: Path, line: int, attr: str) -> str:
    return (base / f"sim_gpio{line}" / attr).read_text().strip()


def main(chip: str, base: Path) -> int:
    drv = VhostUserDeviceDriver(["vhost-device-gpio", "-l", chip], "/tmp/gpio.sock", suffix="0", num_queues=2)
    try:
        ngpio, _pad, names_size = struct.unpack("<HHI", drv.read_config(0, 8))
        check("ngpio", ngpio == NLINES, ngpio)
        resp = request(drv, GET_LINE_NAMES, 0, resp_len=names_size + 1)
        names = resp[1:].split(b"\0")[:NLINES]
        check(
            "line-names",
            resp[0] == STATUS_OK and names == [f"vdev-{i}".encode() for i in range(NLINES)],
            resp,
        )

        # The Linux driver's order: the output value first, then the direction
        # (the daemon, as upstream, refuses output before any value).
        resp = request(drv, SET_VALUE, 3, 1)
        check("set-value-1", resp[0] == STATUS_OK, resp)
        resp = request(drv, SET_DIRECTION, 3, DIR_OUT)
        check("set-direction-out", resp[0] == STATUS_OK, resp)
        check("sysfs-value-1", sysfs(base, 3, "value") == "1", sysfs(base, 3, "value"))
        resp = request(drv, SET_VALUE, 3, 0)
        check(
            "set-value-0",
            resp[0] == STATUS_OK and sysfs(base, 3, "value") == "0",
            (resp, sysfs(base, 3, "value")),
        )
        resp = request(drv, GET_DIRECTION, 3)
        check("get-direction-out", resp == bytes([STATUS_OK, DIR_OUT]), resp)

        echo = sysfs(base, 4, "pull")
        check("line4-pulled-down", echo == "pull-down", echo)
        resp = request(drv, SET_DIRECTION, 4, DIR_IN)
        check("set-direction-in", resp[0] == STATUS_OK, resp)
        resp = request(drv, SET_IRQ_TYPE, 4, IRQ_TYPE_EDGE_RISING)
        check("set-irq-type", resp[0] == STATUS_OK, resp)
        _head, (irq_gpa,) = drv.add_request(EVENTQ, readable=[struct.pack("<H", 4)], writable=[1])
        drv.fe.kick(EVENTQ)
        try:
            early = drv.fe.wait_used(EVENTQ, 1, timeout=0.5)
        except TimeoutError:
            early = []
        check("waiter-pending-before-edge", early == [], early)
        (base / "sim_gpio4" / "pull").write_text("pull-up")
        used = drv.fe.wait_used(EVENTQ, 1, timeout=10.0)
        status = drv.read(irq_gpa, 1)[0]
        check("edge-completes-waiter", len(used) == 1 and status == IRQ_STATUS_VALID, (used, status))
        resp = request(drv, GET_VALUE, 4)
        check("get-value-after-pull-up", resp == bytes([STATUS_OK, 1]), resp)
        resp = request(drv, SET_IRQ_TYPE, 4, IRQ_TYPE_NONE)
        check("irq-type-none", resp[0] == STATUS_OK, resp)
    except Failed as e:
        print(e, flush=True)
        # What the daemon said about it (its stderr is read on demand).
        with contextlib.suppress(TimeoutError, AssertionError):
            drv.daemon.wait_for("\0never\0", 1.0)
        for line in drv.daemon.log[-30:]:
            print(f"daemon: {line}", flush=True)
        return 1
    finally:
        drv.close()
    print("gpio-real-ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2])))
