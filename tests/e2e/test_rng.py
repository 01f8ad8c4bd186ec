"""vhost-device-rng under QEMU's vhost-user-rng-pci, proven by a Linux guest.

The guest's virtio-rng driver feeds ``/dev/hwrng``; the proof is what the
guest reads from it. The read and rate-limit scenarios also run against
QEMU's built-in virtio-rng-pci (which has the same ``max-bytes``/``period``
limiter), as an oracle for the guest-side scripts: if the built-in device
fails a scenario, the scenario is wrong, not the daemon.

Times are measured inside the guest (``/proc/uptime``): the host's two
cores are shared by QEMU's TCG, the daemon and other work.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import harness
import pytest

if TYPE_CHECKING:
    from conftest import Daemons

pytestmark = pytest.mark.qemu

GUEST_TIMEOUT = 120.0

# Fails early, with the registered generators, if virtio-rng did not bind.
CHECK_DRIVER = """\
grep -q virtio_rng /sys/class/misc/hw_random/rng_current || {
    echo "virtio_rng is not the current hwrng: $(cat /sys/class/misc/hw_random/rng_available)"
    exit 10
}
"""


def read_script(nbytes: int, sample: int = 65536) -> str:
    """Read ``nbytes`` from /dev/hwrng, then two ``sample``-byte reads.

    Prints key=value lines: bytes, t0/t1 (uptime around the big read),
    distinct (distinct byte values in its first 4 KiB), sha_b/sha_c (the two
    samples), and a hexdump of the first 64 bytes.
    """
    return f"""\
set -e
{CHECK_DRIVER}
t0=$(cut -d' ' -f1 /proc/uptime)
head -c {nbytes} /dev/hwrng > /tmp/a
t1=$(cut -d' ' -f1 /proc/uptime)
echo "bytes=$(wc -c < /tmp/a)"
echo "t0=$t0"
echo "t1=$t1"
echo "distinct=$(head -c 4096 /tmp/a | hexdump -v -e '1/1 "%02x\\n"' | sort -u | wc -l)"
head -c {sample} /dev/hwrng > /tmp/b
head -c {sample} /dev/hwrng > /tmp/c
echo "sample_bytes=$(cat /tmp/b /tmp/c | wc -c)"
echo "sha_b=$(sha256sum < /tmp/b | cut -d' ' -f1)"
echo "sha_c=$(sha256sum < /tmp/c | cut -d' ' -f1)"
head -c 64 /tmp/a | hexdump -C
"""


def timed_read_script(nbytes: int) -> str:
    """Read exactly ``nbytes`` and print bytes, t0 and t1 (guest uptime)."""
    return f"""\
set -e
{CHECK_DRIVER}
t0=$(cut -d' ' -f1 /proc/uptime)
head -c {nbytes} /dev/hwrng > /tmp/a
t1=$(cut -d' ' -f1 /proc/uptime)
echo "bytes=$(wc -c < /tmp/a)"
echo "t0=$t0"
echo "t1=$t1"
"""


# Reads forever, announcing each 16 KiB, so the host can kill QEMU mid-read.
ENDLESS_READ_SCRIPT = f"""\
{CHECK_DRIVER}
i=0
while head -c 16384 /dev/hwrng > /dev/null; do
    i=$((i + 1))
    echo "CHUNK $i"
done
echo "read failed"
exit 1
"""


def parse_kv(output: str) -> dict[str, str]:
    kv = {}
    for line in output.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.isidentifier():
            kv[key] = value.strip()
    return kv


@dataclass
class RngFrontend:
    """How to give the guest an rng device: vhost-user devices plus extra QEMU args."""

    name: str
    devices: list[tuple[str, str]] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)
    daemon: harness.Daemon | None = None

    def run(self, script: str) -> harness.GuestResult:
        res = harness.run_guest(script, self.devices, extra_args=self.extra_args, timeout=GUEST_TIMEOUT)
        print(
            f"{self.name}: script started at guest uptime {res.uptime_at_start}s, wall {res.wall_time:.1f}s"
        )
        return res


MakeRng = Callable[..., RngFrontend]


def _need_daemon() -> None:
    if shutil.which("vhost-device-rng") is None:
        pytest.skip("vhost-device-rng is not installed (the daemon is not built yet)")


@pytest.fixture(params=["vhost-device-rng", "qemu-builtin"])
def make_rng(request: pytest.FixtureRequest, guest: harness.Guest, daemon: Daemons, sockdir: Path) -> MakeRng:
    """Return ``make(period_ms=None, max_bytes=None) -> RngFrontend``.

    ``vhost-device-rng`` starts our daemon; ``qemu-builtin`` is the oracle.
    """

    def make(period_ms: int | None = None, max_bytes: int | None = None) -> RngFrontend:
        if request.param == "qemu-builtin":
            props = ""
            if period_ms is not None:
                props += f",period={period_ms}"
            if max_bytes is not None:
                props += f",max-bytes={max_bytes}"
            return RngFrontend(
                request.param,
                extra_args=[
                    "-object",
                    "rng-random,filename=/dev/urandom,id=rng0",
                    "-device",
                    f"virtio-rng-pci,rng=rng0{props}",
                ],
            )
        _need_daemon()
        args = ["-s", str(sockdir / "rng.sock")]
        if period_ms is not None:
            args += ["-p", str(period_ms)]
        if max_bytes is not None:
            args += ["-m", str(max_bytes)]
        d = daemon("rng", *args, socket=sockdir / "rng.sock0")
        return RngFrontend(request.param, [(str(d.socket), "vhost-user-rng-pci")], daemon=d)

    return make


def test_rng_guest_reads_1mib_of_varied_bytes(make_rng: MakeRng) -> None:
    rng = make_rng()
    res = rng.run(read_script(1 << 20))
    assert res.exit_status == 0, res
    kv = parse_kv(res.output)
    assert int(kv["bytes"]) == 1 << 20, res
    assert int(kv["sample_bytes"]) == 2 * 65536, res
    # 4096 random bytes show nearly all 256 values; constant or short-period
    # data shows a handful.
    assert int(kv["distinct"]) >= 200, res
    assert kv["sha_b"] != kv["sha_c"], f"two reads returned the same bytes\n{res}"
    elapsed = float(kv["t1"]) - float(kv["t0"])
    print(
        f"{rng.name}: 1 MiB in {elapsed:.2f}s guest time ({(1 << 20) / max(elapsed, 0.01) / 1024:.0f} KiB/s)"
    )


def test_rng_with_rate_limit_guest_read_is_throttled(make_rng: MakeRng) -> None:
    """``-p 1000 -m 4096``: at most 4 KiB per second reach the guest.

    20 KiB are five periods' quota. Whatever the boot-time reads of the
    hw_random core left in the current period, the last 4 KiB cannot arrive
    before three more periods have started, so the read takes over 3 s;
    without a limit it takes a few tens of milliseconds. The upper bound
    only catches a stall: the guest's own hwrng thread may share the quota.
    """
    rng = make_rng(period_ms=1000, max_bytes=4096)
    res = rng.run(timed_read_script(5 * 4096))
    assert res.exit_status == 0, res
    kv = parse_kv(res.output)
    assert int(kv["bytes"]) == 5 * 4096, res
    elapsed = float(kv["t1"]) - float(kv["t0"])
    print(f"{rng.name}: 20 KiB at 4 KiB/s in {elapsed:.2f}s guest time")
    # /proc/uptime has 10 ms resolution; allow for it and for clock skew.
    assert elapsed >= 2.8, f"20 KiB took only {elapsed:.2f}s at 4096 B/s\n{res}"
    assert elapsed <= 30, f"20 KiB took {elapsed:.2f}s at 4096 B/s\n{res}"


def test_rng_guest_killed_mid_read_next_guest_is_served(
    guest: harness.Guest, daemon: Daemons, sockdir: Path
) -> None:
    """QEMU dies while the guest reads; a new QEMU on the same socket gets entropy."""
    _need_daemon()
    d = daemon("rng", "-s", str(sockdir / "rng.sock"), socket=sockdir / "rng.sock0")
    devices = [(str(d.socket), "vhost-user-rng-pci")]
    with harness.start_guest(ENDLESS_READ_SCRIPT, devices) as g:
        seen = g.wait_for("CHUNK 3\n", timeout=GUEST_TIMEOUT)
        g.kill()
        assert seen, f"the first guest never read 48 KiB\n{g.result().console}\n{g.qemu_log()}"
    assert d.alive(), f"the daemon died with its front-end\n{d.log()}"

    res = harness.run_guest(read_script(65536, sample=4096), devices, timeout=GUEST_TIMEOUT)
    assert res.exit_status == 0, f"{res}\n--- daemon ---\n{d.log()}"
    kv = parse_kv(res.output)
    assert int(kv["bytes"]) == 65536, res
    assert int(kv["distinct"]) >= 200, res
    assert d.alive(), d.log()
    assert "Traceback" not in d.log(), d.log()
