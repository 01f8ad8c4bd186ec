"""vhost-device-gpio proven by a Linux guest's gpio-virtio driver, and on real gpio-sim lines.

Two kinds of boot (each shared by several checks, CI budget):

- ``test_guest_drives_simulated_chip``, once per QEMU the harness has: QEMU's
  vhost-user-gpio-pci on ``vhost-device-gpio -l s8 --sim-control CTL``; the
  guest (gpio-virtio, built out of tree, and libgpiod v2 tools) lists the
  chip and the line names, holds a line high (the host reads it back through
  the control socket), reads an input the host sets, and, where QEMU passes
  VIRTIO_GPIO_F_IRQ (11.x; 7.2 never does), waits for edges with gpiomon and
  sees exactly the ones the host injects.
- ``test_real_gpio_sim_chip``: a guest that plays the host runs the daemon on
  a gpio-sim chip through python gpiod, driven by our front-end
  (``hostplay_gpio.py``), with gpio-sim's sysfs as the other side.

The control socket protocol is the one the gpio branch implements (README,
"vhost-device-gpio"): ``set <dev> <line> <0|1>`` -> ``ok``, ``get <dev>
<line>`` -> ``ok <none|in|out> <value>``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import harness
import pytest

if TYPE_CHECKING:
    from conftest import Daemons

pytestmark = pytest.mark.qemu

HERE = Path(__file__).resolve().parent
NLINES = 8
# Upstream's mock chip names its lines dummy0, dummy1, ...; ours does the same.
SIM_NAMES = [f"dummy{i}" for i in range(NLINES)]
GUEST_TIMEOUT = 240.0
# QEMU 7.2's vhost-user-gpio-pci never passes VIRTIO_GPIO_F_IRQ to the guest;
# 10.0 and 11.1 do (seen here: the guest's features bit 0).
IRQ_MIN_QEMU = (10,)
STEP_TIMEOUT = 90.0
# Edges the guest waits for on line 6 (the line starts low): the level the
# host sets for each and the edge gpiomon must report.
EDGES = [(1, "rising"), (0, "falling"), (1, "rising")]

GUEST_SCRIPT = """\
set -e
waitfor /dev/gpiochip0 30
echo "detect: $(gpiodetect)"
gpioinfo -c gpiochip0 | sed 's/^/info: /'
echo "features: $(cat /sys/bus/virtio/devices/*/features | head -1)"
echo "initial5: $(gpioget -c gpiochip0 --numeric 5)"
gpioset --banner -c gpiochip0 -C vdev-e2e 2=1 > /tmp/set.out 2>&1 &
setpid=$!
i=0
while [ ! -s /tmp/set.out ]; do
    i=$((i + 1)); [ $i -lt 1500 ] || { echo "gpioset never started"; exit 11; }
    usleep 20000
done
echo "STEP set-held"
i=0
while [ "$(gpioget -c gpiochip0 --numeric 5)" != 1 ]; do
    i=$((i + 1)); [ $i -lt 1500 ] || { echo "line 5 never read 1"; exit 12; }
    usleep 20000
done
echo "STEP input-read value=1"
kill $setpid; wait $setpid 2>/dev/null || true
echo "after-release2: $(gpioinfo -c gpiochip0 2)"
if [ "$IRQ" = 1 ]; then
    gpiomon --banner -c gpiochip0 -e both -n @NEDGES@ -F 'EVENT %o %E' 6 > /tmp/mon 2>&1 &
    monpid=$!
    i=0
    while [ ! -s /tmp/mon ]; do
        i=$((i + 1)); [ $i -lt 1500 ] || { echo "gpiomon never started: $(cat /tmp/mon)"; exit 13; }
        usleep 20000
    done
    k=1
    while [ $k -le @NEDGES@ ]; do
        echo "STEP want-edge $k"
        i=0
        while [ "$(grep -c EVENT /tmp/mon)" -lt $k ]; do
            i=$((i + 1)); [ $i -lt 3000 ] || { echo "edge $k never came: $(cat /tmp/mon)"; exit 14; }
            usleep 20000
        done
        echo "STEP got-edge $k $(grep EVENT /tmp/mon | sed -n ${k}p)"
        k=$((k + 1))
    done
    wait $monpid && rc=0 || rc=$?
    echo "mon-exit=$rc"
fi
echo "events-total: $(grep -c EVENT /tmp/mon 2>/dev/null || echo 0)"
"""


class SimControl:
    """A client of the daemon's ``--sim-control`` socket (one reply line per command)."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.rfile = self.sock.makefile("rb")

    def command(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\n")
        reply = self.rfile.readline().decode().strip()
        assert reply, f"sim-control: no reply to {line!r}"
        return reply

    def get(self, line: int, dev: int = 0) -> tuple[str, int]:
        reply = self.command(f"get {dev} {line}")
        m = re.fullmatch(r"ok (none|in|out) ([01])", reply)
        assert m, f"sim-control: get {dev} {line} -> {reply!r}"
        return m.group(1), int(m.group(2))

    def set(self, line: int, value: int, dev: int = 0) -> None:
        reply = self.command(f"set {dev} {line} {value}")
        assert reply == "ok", f"sim-control: set {dev} {line} {value} -> {reply!r}"

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()


def wait_for_socket(path: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(path).st_mode):
                return
        time.sleep(0.02)
    raise AssertionError(f"{path} did not appear within {timeout:.0f}s")


def all_qemus() -> list[object]:
    """One param per QEMU the harness has (issue 18: test against each)."""
    qemus = harness.qemu_binaries()
    if not qemus:
        return [pytest.param(None, id="no-qemu")]
    return [pytest.param(path, id="qemu" + ".".join(map(str, version[:2]))) for version, path in qemus]


@pytest.fixture
def sim_gpio(guest: harness.Guest, daemon: Daemons, sockdir: Path) -> Iterator[tuple[Path, SimControl]]:
    """``vhost-device-gpio -l s8 --sim-control CTL`` and a client of CTL."""
    sock, ctl = sockdir / "gpio.sock", sockdir / "ctl.sock"
    daemon("gpio", "-s", str(sock), "-l", f"s{NLINES}", "--sim-control", str(ctl), socket=f"{sock}0")
    wait_for_socket(ctl)
    client = SimControl(ctl)
    try:
        yield Path(f"{sock}0"), client
    finally:
        client.close()


@pytest.mark.parametrize("qemu", all_qemus())
def test_guest_drives_simulated_chip(qemu: str | None, sim_gpio: tuple[Path, SimControl]) -> None:
    if qemu is None:
        pytest.skip("no QEMU (run scripts/install-system-deps)")
    version = harness.qemu_version(qemu)
    assert version is not None
    irq_expected = version >= IRQ_MIN_QEMU
    sock, ctl = sim_gpio
    script = GUEST_SCRIPT.replace("@NEDGES@", str(len(EDGES)))
    with harness.start_guest(
        f"IRQ={int(irq_expected)}\n" + script, [(str(sock), "vhost-user-gpio-pci")], qemu=qemu
    ) as g:
        assert g.wait_for("STEP set-held", STEP_TIMEOUT), g.console()[-4000:] + g.qemu_log()
        # The guest holds line 2 high: the host sees an output at 1.
        assert ctl.get(2) == ("out", 1)
        assert ctl.get(5)[0] in ("none", "in")
        ctl.set(5, 1)
        assert g.wait_for("STEP input-read", STEP_TIMEOUT), g.console()[-4000:]
        injected = []
        if irq_expected:
            for k, (level, _edge) in enumerate(EDGES, 1):
                assert g.wait_for(f"STEP want-edge {k}\n", STEP_TIMEOUT), g.console()[-4000:]
                ctl.set(6, level)
                injected.append(level)
        res = g.wait(GUEST_TIMEOUT)
    out = res.output
    print(f"gpio e2e QEMU {version}: script at uptime {res.uptime_at_start}s, wall {res.wall_time:.1f}s")
    assert res.exit_status == 0, str(res)
    assert re.search(r"detect: gpiochip0 \[[^\]]*\] \(8 lines\)", out), str(res)
    for i, name in enumerate(SIM_NAMES):
        assert re.search(rf'info:\s+line\s+{i}:\s+"{name}"', out), f"{name}: {res}"
    assert "initial5: 0" in out, str(res)
    # gpio-virtio asks for F_IRQ (bit 0); QEMU 10 and 11 pass it on, 7.2 does not.
    features = re.search(r"features: ([01]+)", out)
    assert features, str(res)
    print(f"gpio e2e QEMU {version}: the guest's virtio features bit 0 (F_IRQ) = {features.group(1)[0]}")
    if irq_expected:
        assert features.group(1)[0] == "1", str(res)
        got = re.findall(r"STEP got-edge (\d+) EVENT 6 (rising|falling)", out)
        assert got == [(str(k), edge) for k, (_level, edge) in enumerate(EDGES, 1)], str(res)
        assert "mon-exit=0" in out, str(res)
        assert f"events-total: {len(EDGES)}" in out, str(res)
        assert ctl.get(6)[1] == injected[-1]
    else:
        assert features.group(1)[0] == "0", str(res)
        assert "STEP want-edge" not in out, str(res)


HOSTPLAY_SCRIPT = """\
set -- $(mkgpiosim vdev 8) || { echo "mkgpiosim failed"; exit 10; }
chip=${1#gpiochip} base=/sys/devices/platform/$2/$1
echo "chip=$1 base=$base"
inhost python /tmp/hostplay_gpio.py $chip $base
"""


def test_real_gpio_sim_chip(guest: harness.Guest) -> None:
    if shutil.which("vhost-device-gpio") is None:
        pytest.skip("vhost-device-gpio is not installed")
    files = {"hostplay_gpio.py": (HERE / "hostplay_gpio.py").read_text()}
    res = harness.run_as_host(HOSTPLAY_SCRIPT, files=files, timeout=GUEST_TIMEOUT)
    print(f"gpio real backend: script at uptime {res.uptime_at_start}s, wall {res.wall_time:.1f}s")
    if "No module named 'gpiod'" in res.output:
        pytest.skip("python gpiod is not installed in the venv (the 'hosts' extra)")
    assert res.exit_status == 0, str(res)
    for name in (
        "ngpio",
        "line-names",
        "sysfs-value-1",
        "set-value-0",
        "get-direction-out",
        "waiter-pending-before-edge",
        "edge-completes-waiter",
        "get-value-after-pull-up",
    ):
        assert f"check {name} ok" in res.output, f"{name}: {res}"
    assert "gpio-real-ok" in res.output, str(res)
