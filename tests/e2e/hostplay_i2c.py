"""Run inside a guest that plays the host: vhost-device-i2c on a real i2c-stub adapter.

``inhost python /tmp/hostplay_i2c.py N NAME`` where ``/dev/i2c-N`` is the adapter
``modprobe i2c-stub chip_addr=0x50`` made (sysfs name NAME, "SMBus stub driver")
and word 0x20 of its chip was set to 0x1234 beforehand with ``i2cset``.  The daemon
opens it by its name (``-l "NAME:80:81"``): i2c-stub has no I2C_FUNC_I2C, so every
request goes through smbus2's I2C_SMBUS ioctls, from the daemon's worker threads.
Our front-end drives it with VIRTIO 1.2 §5.19 requests shaped as Linux's
virtio_i2c sends them, and i2c-stub's registers are the other side:

- word data read of 0x20 gives what i2cset wrote (0x1234, little-endian);
- byte data write 0x10 = 0xab and word data write 0x30 = 0xbeef, read back through
  the daemon (the shell reads them again with i2cget after the daemon exits);
- an I2C block write of 4 bytes at 0x40 read back as an I2C block;
- a quick write to 0x50 succeeds, one to 0x51 (no chip there) fails, and a group
  naming 0x51 fails without failing the group after it.

Prints ``check <name> ok`` lines and ``i2c-real-ok``; exits 1 at the first failure.
"""

from __future__ import annotations

import sys

from device_drivers import VhostUserDeviceDriver  # tests/integration, on PYTHONPATH in the guest

from virtio_devices.i2c import VIRTIO_I2C_FLAGS_FAIL_NEXT, VIRTIO_I2C_FLAGS_M_RD, out_hdr

FN, RD = VIRTIO_I2C_FLAGS_FAIL_NEXT, VIRTIO_I2C_FLAGS_M_RD
OK, ERR = 0, 1


class Failed(Exception):
    pass


def check(name: str, cond: bool, detail: object) -> None:
    if not cond:
        raise Failed(f"check {name} failed: {detail}")
    print(f"check {name} ok", flush=True)


class Requests:
    """Queue requests, kick once, read the statuses and data back."""

    def __init__(self, drv: VhostUserDeviceDriver) -> None:
        self.drv = drv
        self.pending: list[tuple[int, int, int]] = []  # (read length, buffer gpa, status gpa)

    def write(self, addr: int, data: bytes, flags: int = 0) -> None:
        _, (status,) = self.drv.add_request(0, [out_hdr(addr, flags), *([data] if data else [])], [1])
        self.pending.append((0, -1, status))

    def read(self, addr: int, n: int, flags: int = 0) -> None:
        _, (buf, status) = self.drv.add_request(0, [out_hdr(addr, flags | RD)], [n, 1])
        self.pending.append((n, buf, status))

    def run(self) -> list[tuple[int, bytes]]:
        """Kick; for each request its status and the bytes it read."""
        used = self.drv.kick(0, count=len(self.pending))
        assert len(used) == len(self.pending), used
        out = []
        for n, buf, status in self.pending:
            out.append((self.drv.read(status, 1)[0], self.drv.read(buf, n) if n else b""))
        self.pending = []
        return out


def main(number: str, name: str) -> int:
    drv = VhostUserDeviceDriver(["vhost-device-i2c", "-l", f"{name}:80:81"], "/tmp/i2c.sock", suffix="0")
    try:
        q = Requests(drv)
        q.write(0x50, b"\x20", FN)
        q.read(0x50, 2)
        got = q.run()
        check("word-read-i2cset-value", got == [(OK, b""), (OK, b"\x34\x12")], got)

        q.write(0x50, b"\x10\xab")  # SMBus write byte data
        q.write(0x50, b"\x30\xef\xbe")  # SMBus write word data
        q.write(0x50, b"\x10", FN)
        q.read(0x50, 1)  # SMBus read byte data
        q.write(0x50, b"\x30", FN)
        q.read(0x50, 2)  # SMBus read word data
        got = q.run()
        check("byte-and-word-data", [s for s, _ in got] == [OK] * 6, got)
        check("byte-data-value", got[3][1] == b"\xab", got[3])
        check("word-data-value", got[5][1] == b"\xef\xbe", got[5])

        q.write(0x50, b"\x40\x01\x02\x03\x04")  # SMBus write I2C block
        q.write(0x50, b"\x40", FN)
        q.read(0x50, 4)  # SMBus read I2C block
        got = q.run()
        check("i2c-block", got == [(OK, b""), (OK, b""), (OK, b"\x01\x02\x03\x04")], got)

        q.write(0x50, b"")  # SMBus quick: the chip answers
        q.write(0x51, b"")  # nobody at 0x51
        got = q.run()
        check("quick", [s for s, _ in got] == [OK, ERR], got)

        q.write(0x51, b"\x00", FN)  # a group naming 0x51 fails...
        q.read(0x51, 1)
        q.write(0x50, b"\x10", FN)  # ...the next group does not
        q.read(0x50, 1)
        got = q.run()
        check("fail-next-group", [s for s, _ in got] == [ERR, ERR, OK, OK] and got[3][1] == b"\xab", got)
    except Failed as e:
        print(e, flush=True)
        return 1
    finally:
        drv.close()
    print(f"i2c-real-ok adapter={number}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
