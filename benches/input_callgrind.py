"""Instructions per event group of virtio-input's event path, compiled against Python.

    .venv/bin/python benches/input_callgrind.py [--groups 200,600]

Counts with ``valgrind --tool=callgrind`` (deterministic, unlike a clock on a busy
2-core machine) the instructions the device spends on key groups (EV_KEY +
SYN_REPORT) in-process (:class:`virtio_devices.testing.DeviceRig`, no transport):
its eventq buffers posted and kicked (``process_queue``: one kept buffer per
event), the events injected on the host and delivered (the host fd's callback).
Three cases: ``sim:keyboard`` (events handed over as Python tuples), and the
evdev-like pipe twin (:class:`PipeInputHost`: ``struct input_event`` records on a
fd, as an evdev node gives them) served by the Python path alone
(``compiled=False``) and by the compiled paths (``virtio_devices/_input_fast.pyx``:
keeping the buffers, delivering the events).  The driver's own work (laying out the
buffers) and the host's (making the events) are measured alone and taken off;
keeping the buffers (the kick, the same for every host) has its own row.  Each
figure is the difference between two runs of different sizes, divided by the
difference in groups, so that start-up costs cancel.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: sim:keyboard (compiled keep, events handed over as tuples), the pipe twin with
#: both compiled paths off ("python") and on ("compiled").
HOWS = ("sim", "python", "compiled")


def workload(how: str, groups: int, stage: str) -> None:
    """One run: ``stage`` "post" lays out the buffers only, "kick" also has the device
    keep them, "inject" also has the host make the events, "all" also delivers them."""
    from virtio_devices.hosts.input import (  # noqa: PLC0415 - the measured run only
        EV_KEY,
        EV_SYN,
        KEY_A,
        SYN_REPORT,
        PipeInputHost,
        SimInputHost,
    )
    from virtio_devices.input import InputDevice  # noqa: PLC0415
    from virtio_devices.testing import DeviceRig  # noqa: PLC0415

    host = SimInputHost("keyboard") if how == "sim" else PipeInputHost("keyboard")
    events = [ev for i in range(groups) for ev in ((EV_KEY, KEY_A, (i + 1) & 1), (EV_SYN, SYN_REPORT, 0))]
    try:
        device = InputDevice(host, compiled=how != "python")
        with DeviceRig(device, queue_size=1024, event_idx=True, memory_size=8 << 20) as rig:
            for _ in range(2 * groups):
                rig.add_request(0, writable=[8])
            if stage in ("kick", "inject", "all"):
                rig.kick(0)
            if stage in ("inject", "all"):
                host.inject(events)
            if stage == "all":
                rig.loop.fire_reader(host.fileno())
                n = rig.device.events_delivered  # not the used ring: the driver's reading would count
                if n != 2 * groups:
                    raise AssertionError(f"{how}: {n} events used, want {2 * groups}")
    finally:
        host.close()


def instructions(how: str, groups: int, stage: str) -> int:
    """Total instructions (Ir) of one run under callgrind."""
    python = os.path.realpath(sys.executable)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path[1:]])}
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={tmp}/cg.out",
                python,
                __file__,
                "--inner",
                how,
                str(groups),
                stage,
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    m = re.search(r"Collected : (\d+)", out.stderr)
    if m is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{out.stderr[-2000:]}")
    return int(m.group(1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", default="100,500", help="two run sizes, in key groups")
    p.add_argument("--inner", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.inner:
        how, groups, stage = a.inner
        workload(how, int(groups), stage)
        return 0
    small, large = (int(x) for x in a.groups.split(","))
    if 2 * large > 1024:
        p.error("at most 512 groups (one 1024-entry ring)")
    head = f"device instructions per key group (2 events), callgrind, runs of {small} and {large} groups"
    print(f"| {head} | Ir |")
    print("|---|---|")

    def per_group(how: str, stage: str) -> float:
        return (instructions(how, large, stage) - instructions(how, small, stage)) / (large - small)

    post = per_group("sim", "post")
    kick: dict[str, float] = {}
    per: dict[str, float] = {}
    for how in HOWS:
        kick[how] = per_group(how, "kick") - post
        per[how] = per_group(how, "all") - per_group(how, "inject")
        print(f"| {how}: keeping the 2 buffers (kick) | {kick[how]:,.0f} |")
        print(f"| {how}: delivering the group | {per[how]:,.0f} |")
    print(f"| kick, Python / compiled | {kick['python'] / kick['compiled']:.2f}x |")
    print(f"| delivery, Python / compiled (pipe twin) | {per['python'] / per['compiled']:.2f}x |")
    both = (kick["python"] + per["python"]) / (kick["compiled"] + per["compiled"])
    print(f"| kick + delivery, Python / compiled | {both:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
