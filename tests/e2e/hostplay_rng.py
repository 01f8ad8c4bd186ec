"""Run inside a guest that plays the host (``inhost python /tmp/hostplay_rng.py SRC``).

Starts vhost-device-rng on the entropy file SRC and drives it with our
front-end (the shared suite's vhost-user driver): two requests of 64 bytes
must come back as the first 128 bytes of SRC, in order. Prints ``rng-ok``
and the Python that ran, exits non-zero with the reason otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

import device_drivers
from device_drivers import VhostUserDeviceDriver  # tests/integration, on PYTHONPATH in the guest

# Python starts slowly over 9p under TCG on a shared machine: give the daemon
# (and each ring) far longer than the integration tests' 10 s.
device_drivers.TIMEOUT = 120.0


def main(source: str) -> int:
    want = Path(source).read_bytes()[:128]
    drv = VhostUserDeviceDriver(["vhost-device-rng", "-f", source], "/tmp/rng.sock", suffix="0")
    try:
        got = b""
        for _ in range(2):
            _head, (gpa,) = drv.add_request(0, writable=[64])
            used = drv.kick(0)
            if [length for _id, length in used] != [64]:
                print(f"rng: used lengths {used}, want one of 64")
                return 1
            got += drv.read(gpa, 64)
    finally:
        drv.close()
    if got != want:
        print(f"rng: got {got.hex()} want {want.hex()}")
        return 1
    print(f"rng-ok python={sys.version.split()[0]} prefix={sys.prefix}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
