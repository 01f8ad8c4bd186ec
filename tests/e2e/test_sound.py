"""vhost-device-sound proven by a Linux guest's virtio_snd (QEMU >= 10: vhost-user-snd-pci).

One boot (CI budget) runs every check of the guest's driver against ``--backend
null``:

- the card appears (``/proc/asound/cards``, ``aplay -l``: one PCM, playback and
  capture on ``hw:0,0``);
- ``aplay -D hw:0,0`` plays one second of a 1 kHz sine (8 kHz mono S16, made in
  the guest) and exits 0, taking at least the sound's length (the null backend
  consumes it in real time; upstream's completes at once);
- ``arecord -D hw:0,0 -d 2`` records two seconds: exactly 2 s of frames, all
  silence, again taking at least their length.

A second boot, a guest that plays the host (``hostplay_sound.py``), runs the ALSA
backend on snd-aloop: a sine the device plays is recorded at the loopback's other
end, and one played there is captured by the device, both with their peak at 1 kHz.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import harness
import pytest

if TYPE_CHECKING:
    from conftest import Daemons

pytestmark = pytest.mark.qemu

HERE = Path(__file__).resolve().parent
GUEST_TIMEOUT = 300.0
RATE = 8000

# One 1 kHz cycle at 8 kHz, S16LE mono: 0, 0.707, 1, 0.707, 0, -0.707, -1, -0.707
# of 16000, as octal escapes for busybox printf.
_CYCLE = [0, 11314, 16000, 11314, 0, -11314, -16000, -11314]
CYCLE = "".join(f"\\{b:03o}" for v in _CYCLE for b in (v & 0xFFFF).to_bytes(2, "little"))

GUEST_SCRIPT = f"""\
set -e
waitfor /dev/snd/pcmC0D0p 60
echo "cards: $(cat /proc/asound/cards | head -1)"
aplay -l | sed 's/^/list: /'
c='{CYCLE}'
c4="$c$c$c$c"; c8="$c4$c4"; c40="$c8$c8$c8$c8$c8"
i=0
while [ $i -lt 25 ]; do printf "$c40"; i=$((i + 1)); done > /tmp/tone.raw
echo "tone-bytes: $(wc -c < /tmp/tone.raw)"
t0=$(cut -d' ' -f1 /proc/uptime)
aplay -D hw:0,0 -t raw -f S16_LE -r {RATE} -c 1 /tmp/tone.raw && rc=0 || rc=$?
t1=$(cut -d' ' -f1 /proc/uptime)
echo "aplay-exit=$rc start=$t0 end=$t1"
t0=$(cut -d' ' -f1 /proc/uptime)
arecord -D hw:0,0 -t raw -f S16_LE -r {RATE} -c 1 -d 2 /tmp/rec.raw && rc=0 || rc=$?
t1=$(cut -d' ' -f1 /proc/uptime)
echo "arecord-exit=$rc start=$t0 end=$t1"
echo "rec-bytes: $(wc -c < /tmp/rec.raw)"
echo "rec-nonzero: $(tr -d '\\000' < /tmp/rec.raw | wc -c)"
"""


def _span(out: str, what: str) -> tuple[int, float]:
    m = re.search(rf"{what}-exit=(\d+) start=([\d.]+) end=([\d.]+)", out)
    assert m, out
    return int(m.group(1)), float(m.group(3)) - float(m.group(2))


def test_guest_plays_and_records_through_null_backend(
    qemu_at_least: Callable[[tuple[int, ...]], str], daemon: Daemons, sockdir: Path
) -> None:
    qemu = qemu_at_least((10,))  # vhost-user-snd-pci
    sock = sockdir / "snd.sock"
    daemon("sound", "--socket", str(sock), "--backend", "null", socket=sock)
    with harness.start_guest(GUEST_SCRIPT, [(str(sock), "vhost-user-snd-pci")], qemu=qemu) as g:
        res = g.wait(GUEST_TIMEOUT)
    out = res.output
    print(f"sound e2e: script at uptime {res.uptime_at_start}s, wall {res.wall_time:.1f}s")
    assert res.exit_status == 0, str(res)
    assert "cards:" in out and "VirtIO" in out.split("cards:", 1)[1].splitlines()[0], str(res)
    assert re.search(r"list: card 0: .*device 0:", out), str(res)
    assert f"tone-bytes: {RATE * 2}" in out, str(res)
    rc, played = _span(out, "aplay")
    assert rc == 0, str(res)
    assert played >= 0.95, f"1 s of sound played in {played:.2f} s: {res}"
    rc, recorded = _span(out, "arecord")
    print(f"sound e2e: aplay of 1 s took {played:.2f} s, arecord of 2 s took {recorded:.2f} s")
    assert rc == 0, str(res)
    assert f"rec-bytes: {2 * RATE * 2}" in out, str(res)
    assert "rec-nonzero: 0" in out, str(res)
    assert recorded >= 1.9, f"2 s recorded in {recorded:.2f} s: {res}"


HOSTPLAY_SCRIPT = """\
modprobe snd-aloop && grep -q Loopback /proc/asound/cards && echo "snd-aloop=ok"
inhost python /tmp/hostplay_sound.py
"""


def test_alsa_backend_on_snd_aloop(guest: harness.Guest) -> None:
    # A guest that plays the host: the daemon runs the ALSA backend on a real
    # ALSA card (snd-aloop), which these machines' kernels lack.
    files = {"hostplay_sound.py": (HERE / "hostplay_sound.py").read_text()}
    res = harness.run_as_host(HOSTPLAY_SCRIPT, files=files, timeout=GUEST_TIMEOUT)
    print(f"sound ALSA on snd-aloop: script at uptime {res.uptime_at_start}s, wall {res.wall_time:.1f}s")
    if "No module named 'alsaaudio'" in res.output:
        pytest.skip("pyalsaaudio is not installed in the venv (the test extra)")
    assert res.exit_status == 0, str(res)
    assert "snd-aloop=ok" in res.output, str(res)
    assert "check alsa-playback-peak ok" in res.output, str(res)
    assert "check alsa-capture-peak ok" in res.output, str(res)
    assert "sound-alsa-ok" in res.output, str(res)
