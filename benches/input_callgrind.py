"""Instructions per event group of virtio-input's event path, compiled against Python.

    .venv/bin/python benches/input_callgrind.py [--groups 200,600] [--wakeups | --full-ring]

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

The per-wake-up case (``--wakeups`` alone, and first in the full table): one group
and one kick per wake-up, through the vhost-user loop's compiled epoll and a
``KickRing``, each wake-up entering Python (``callbacks``) or served by the device's
pumps (``pumps``: :mod:`virtio_devices._pump`); see :func:`wakeups`.

The whole-ring case (``--full-ring``): the driver posts every entry of the
1024-entry eventq once, as Linux's virtio_input does, then each tablet group (4
events) is delivered by the pumps and its buffers are posted again, with a kick
after every repost (``always``) or only when ``avail_event`` asks (``event-idx``,
as Linux's driver); it prints the instructions and the kicks per group (the
driver's and the host's work included: a kick is the driver's cost too); see
:func:`full_ring`.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: sim:keyboard (compiled keep, events handed over as tuples), the pipe twin with
#: both compiled paths off ("python") and on ("compiled").
HOWS = ("sim", "python", "compiled")
#: The per-wake-up case (see wakeups()): each kick and readable fd entering Python,
#: or served by the device's pumps.
WAKEUP_MODES = ("callbacks", "pumps")
#: The whole-ring case (see full_ring()): the driver kicks after every repost, or
#: when avail_event asks (VIRTIO 1.2 §2.7.10), as Linux's driver does.
FULL_RING_KICKS = ("always", "event-idx")


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


def _serve_in_epoll(ep: Any, efd: int, rig: Any, device: Any, host: Any, *, pumps: bool) -> Any:
    """Register the eventq's kick fd ``efd`` (a ``KickRing`` on ``device``) and the
    host's fd in ``ep``, as the vhost-user loop does; with ``pumps`` their compiled
    pumps too.  Returns the ring (the caller closes it)."""
    import select  # noqa: PLC0415

    from vhost_backends._fastpath import KickRing  # noqa: PLC0415

    ring = KickRing(rig.queues[0], 0, device.process_queue, kick_fd=efd)
    ep.register(efd, select.EPOLLIN)
    ep.set_ring(efd, select.EPOLLIN, ring)
    hfd = host.fileno()
    ep.register(hfd, select.EPOLLIN)
    if pumps:
        ring.pump = device.kick_pump(0)
        ep.set_pump(hfd, select.EPOLLIN, device._pump)
    return ring


def wakeups(mode: str, groups: int, stage: str) -> None:
    """One run of the per-wake-up case: for each group the driver posts 2 buffers
    and kicks, and the host makes the group; the vhost-user loop's compiled epoll
    (:class:`vhost_backends._fastpath.Epoll`, a :class:`KickRing` on the eventq)
    serves the kick and the readable fd, as in the daemon.  ``mode`` "callbacks":
    each wake-up enters Python (``process_queue``, the fd's callback), as before
    the pumps; "pumps": the device's pumps (``kick_pump``, the fd's
    :class:`~virtio_devices._pump.FdPump`).  ``stage`` "driver": the driver's and
    the host's work alone (nothing polled); "all": also served."""

    from vhost_backends._fastpath import Epoll  # noqa: PLC0415
    from virtio_devices.hosts.input import EV_KEY, EV_SYN, KEY_A, SYN_REPORT, PipeInputHost  # noqa: PLC0415
    from virtio_devices.input import InputDevice  # noqa: PLC0415
    from virtio_devices.testing import DeviceRig  # noqa: PLC0415

    host = PipeInputHost("keyboard")
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    ep = Epoll(0)
    try:
        device = InputDevice(host)
        with DeviceRig(device, queue_size=1024, event_idx=True, memory_size=8 << 20) as rig:
            ring = _serve_in_epoll(ep, efd, rig, device, host, pumps=mode == "pumps")
            callback = device._on_host_readable
            served = stage == "all"
            for i in range(groups):
                rig.add_request(0, writable=[8])
                rig.add_request(0, writable=[8])
                os.eventfd_write(efd, 1)
                if served:
                    for _fd in ep.poll(0):
                        callback()
                host.inject([(EV_KEY, KEY_A, (i + 1) & 1), (EV_SYN, SYN_REPORT, 0)])
                if served:
                    for _fd in ep.poll(0):
                        callback()
            if served and device.events_delivered != 2 * groups:
                raise AssertionError(f"{mode}: {device.events_delivered} events used, want {2 * groups}")
            ring.close()
    finally:
        ep.close()
        os.close(efd)
        host.close()


def full_ring(kicks: str, groups: int) -> None:
    """One run of the whole-ring case: the driver posts all 1024 eventq entries and
    kicks once; then for each group the host makes a tablet group (ABS_X, ABS_Y,
    BTN_TOUCH, SYN_REPORT), the vhost-user loop's compiled epoll serves the readable
    fd with the device's pump, and the driver posts the 4 used buffers again,
    kicking after every repost (``kicks`` "always") or when ``avail_event`` asks
    ("event-idx"); the loop serves the kicks (the ``KickRing``'s pump).  Prints
    ``kicks N``: the kicks the driver sent after the first."""

    from vhost_backends._fastpath import Epoll  # noqa: PLC0415
    from virtio_devices.hosts.input import (  # noqa: PLC0415
        ABS_X,
        ABS_Y,
        BTN_TOUCH,
        EV_ABS,
        EV_KEY,
        EV_SYN,
        SYN_REPORT,
        PipeInputHost,
    )
    from virtio_devices.input import InputDevice  # noqa: PLC0415
    from virtio_devices.testing import DeviceRig  # noqa: PLC0415
    from virtio_queue.testing import VIRTQ_DESC_F_WRITE, RawDesc, vring_need_event  # noqa: PLC0415

    host = PipeInputHost("tablet")
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    ep = Epoll(0)
    sent = 0
    try:
        device = InputDevice(host)
        with DeviceRig(device, queue_size=1024, event_idx=True, memory_size=8 << 20) as rig:
            ring = _serve_in_epoll(ep, efd, rig, device, host, pumps=True)
            callback = device._on_host_readable
            mock = rig.mocks[0]
            for i in range(1024):
                mock.build_desc_chain([RawDesc(mock.alloc(8), 8, VIRTQ_DESC_F_WRITE, 0)], start=i)
            mock.publish(list(range(1024)))
            os.eventfd_write(efd, 1)
            for _fd in ep.poll(0):
                callback()
            for i in range(groups):
                v = 1 + i % 30000
                host.inject(
                    [
                        (EV_ABS, ABS_X, v),
                        (EV_ABS, ABS_Y, v + 1),
                        (EV_KEY, BTN_TOUCH, (i + 1) & 1),
                        (EV_SYN, SYN_REPORT, 0),
                    ]
                )
                for _fd in ep.poll(0):
                    callback()
                used = mock.used_elems()
                if len(used) != 4:
                    raise AssertionError(f"group {i}: {len(used)} buffers used, want 4")
                old = mock.avail_idx()
                mock.publish([head for head, _ in used])
                if kicks == "always" or vring_need_event(mock.avail_event(), mock.avail_idx(), old):
                    sent += 1
                    os.eventfd_write(efd, 1)
                    for _fd in ep.poll(0):
                        callback()
            if device.events_delivered != 4 * groups:
                raise AssertionError(f"{kicks}: {device.events_delivered} events used, want {4 * groups}")
            ring.close()
    finally:
        ep.close()
        os.close(efd)
        host.close()
    print(f"kicks {sent}")


def instructions(how: str, groups: int, stage: str) -> int:
    """Total instructions (Ir) of one run under callgrind."""
    return run_counted(how, groups, stage)[0]


def run_counted(how: str, groups: int, stage: str) -> tuple[int, str]:
    """Total instructions (Ir) of one run under callgrind, and what it printed."""
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
    return int(m.group(1)), out.stdout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", default="100,500", help="two run sizes, in key groups")
    p.add_argument("--inner", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--wakeups", action="store_true", help="the per-wake-up case only")
    p.add_argument("--full-ring", action="store_true", help="the whole-ring case only (tablet groups)")
    a = p.parse_args()
    if a.inner:
        how, groups, stage = a.inner
        if how in FULL_RING_KICKS:
            full_ring(how, int(groups))
        elif how in WAKEUP_MODES:
            wakeups(how, int(groups), stage)
        else:
            workload(how, int(groups), stage)
        return 0
    small, large = (int(x) for x in a.groups.split(","))
    if a.full_ring:
        head = f"whole 1024-entry ring posted, tablet groups (4 events), callgrind, runs of {small}, {large}"
        print(f"| {head} | Ir per group | kicks per group |")
        print("|---|---|---|")
        for kicks in FULL_RING_KICKS:
            (ir_s, out_s), (ir_l, out_l) = run_counted(kicks, small, "all"), run_counted(kicks, large, "all")
            k_s, k_l = (int(re.search(r"kicks (\d+)", o).group(1)) for o in (out_s, out_l))  # type: ignore[union-attr]
            ir, kicked = (ir_l - ir_s) / (large - small), (k_l - k_s) / (large - small)
            print(f"| kicks {kicks} | {ir:,.0f} | {kicked:.2f} |")
        return 0
    if 2 * large > 1024:
        p.error("at most 512 groups (one 1024-entry ring)")
    head = f"device instructions per key group (2 events), callgrind, runs of {small} and {large} groups"
    print(f"| {head} | Ir |")
    print("|---|---|")

    def per_group(how: str, stage: str) -> float:
        return (instructions(how, large, stage) - instructions(how, small, stage)) / (large - small)

    wake: dict[str, float] = {}
    for mode in WAKEUP_MODES:
        wake[mode] = per_group(mode, "all") - per_group(mode, "driver")
        print(f"| a kick + a readable fd per group, vhost-user epoll, {mode} | {wake[mode]:,.0f} |")
    print(f"| per wake-up, callbacks / pumps | {wake['callbacks'] / wake['pumps']:.2f}x |")
    if a.wakeups:
        return 0
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
