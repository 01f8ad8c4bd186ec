"""vhost-device-sound figures: CPU per second of 48 kHz stereo S16 audio, and the
time from a tx buffer's arrival to its completion against the period length.

Run by hand (not by CI; ``bench_sound.py`` is its smoke test)::

    python benches/sound_table.py [--secs 3] [--reps 3] [--period-ms 5]

Every row drives the daemon (``--backend null``) through our Python front-end
(:class:`vhost_backends.frontend.Frontend`) with the stream set up as the Linux
driver does it (SET_PARAMS, PREPARE, START; S16 stereo 48 kHz, a buffer of 4
periods), keeping 4 periods in flight; the front-end kicks as Linux's
``virtqueue_kick_prepare`` does, only when the device asks for it (VIRTIO 1.2
§2.7.10).  Two kinds of front-end:

* **flat out**: each buffer is refilled as soon as it comes back.  Upstream's null
  backend completes a playback buffer the moment it is kicked, so its front-end
  runs as fast as the two processes can hand buffers back and forth: "CPU per
  second of playback" is then CPU per burst of buffers, a few wake-ups for many
  buffers.  Ours plays each buffer for its duration, so this row is not like for
  like; it is kept because it was the first comparison;
* **real time**: a guest whose source is real time: 4 buffers at START, then one
  each period on the front-end's clock (absolute deadlines), whenever a slot is
  free, interrupts on.  Both daemons then wake once per period (upstream on the
  buffer's kick, ours at the end of the buffer in progress, which takes the new
  one), so "CPU per second of playback" means the same for both: this is the
  comparison row.

* **CPU per stream second**: the daemon's CPU time (every thread's ``schedstat``)
  over the run, divided by the audio seconds served (periods x period length, the
  same count of buffers of the same size for both daemons), for playback (tx) and
  capture (rx) apart; beside it the same for upstream's daemon from
  ``$VHOST_DEVICE_RUST_BIN`` with ``--backend null`` when it is there (built
  without its default features, its null backend only: the default build needs
  PipeWire's library at run time), and their ratio.  Upstream's null backend never
  completes capture (n/a), never writes the event queue, and is given no event
  buffers (see :func:`run_once`).  So the like-for-like rows are ours with no
  event buffers and no XRUN feature; the rows after them add what the Linux driver
  asks for (event buffers, ``PCM_PERIOD_ELAPSED`` each period, ``EVT_XRUNS``);
* **arrival -> completion / period**: with one buffer in flight, the time from the
  kick that brings a buffer to its completion, as a multiple of the buffer's
  duration (1.0 is the floor: the null backend plays it in real time); and with
  the real-time source and 4 in flight, the same for every buffer after the first
  4: a buffer that found the stream playing waits for the ones before it (about
  3.5 periods: it comes half a period after a completion, 3 buffers ahead of it),
  one that found it dry (an underrun) completes 1 period after it arrived, so the
  smallest value shows whether any did;
* **xruns**: ``PCM_XRUN`` events seen with the real-time source (the goal: none at
  5 ms periods).

Figures are medians (min..max) over ``--reps`` runs, ours and upstream's runs
interleaved.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vhost_backends.frontend import Frontend  # noqa: E402
from virtio_queue.testing import VIRTQ_DESC_F_WRITE, RawDesc  # noqa: E402

RUST_ENV = "VHOST_DEVICE_RUST_BIN"
NAME = "vhost-device-sound"
RATE, FRAME = 48000, 4
CTL, EVT, TX, RX = 0, 1, 2, 3
S_OK, EVT_XRUN = 0x8000, 0x1101
VIRTIO_RING_F_EVENT_IDX, VRING_USED_F_NO_NOTIFY = 29, 1
DEADLINE = 10.0


def rust_daemon() -> str | None:
    d = os.environ.get(RUST_ENV)
    if not d:
        return None
    p = Path(d) / NAME
    return str(p) if p.is_file() and os.access(p, os.X_OK) else None


def _cpu_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid`` so far, in ns resolution (schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile
    return total / 1e9


class TaskClock:
    """The time every thread of ``pid`` ran on a CPU during a ``with`` block, by
    ``perf stat``'s task-clock (from each switch-in on; ``schedstat`` also charges
    a task the time from its wake-up to its switch-in).  ``seconds`` stays None
    when ``perf`` is missing or refused."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.seconds: float | None = None
        self._perf: subprocess.Popen[str] | None = None

    def __enter__(self) -> TaskClock:
        try:
            self._perf = subprocess.Popen(
                ["perf", "stat", "-x,", "-e", "task-clock", "-p", str(self.pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        except OSError:
            return self
        # perf attaches within milliseconds; the daemon is idle meanwhile, so the
        # settling time adds next to nothing to what it counts.
        time.sleep(0.2)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._perf is None:
            return
        self._perf.send_signal(signal.SIGINT)
        _, err = self._perf.communicate(timeout=DEADLINE)
        for line in err.splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[2] == "task-clock" and fields[1] == "msec":
                with contextlib.suppress(ValueError):
                    self.seconds = float(fields[0]) / 1000


class Session:
    """A daemon (ours, or upstream's) with the four rings set up."""

    def __init__(self, kind: str, tmp: str, log: str | None = None) -> None:
        """``log``: a file for the daemon's stderr, with our sound device's debug
        log on (its timer's lateness at each STOP)."""
        self.sock = os.path.join(tmp, f"{kind}.sock")
        if kind == "ours":
            cmd = [sys.executable, "-m", "vhost_backends.cli.sound"]
        else:
            path = rust_daemon()
            assert path is not None
            cmd = [path]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        if log is not None:
            env["RUST_LOG"] = "virtio_devices.sound=debug"
        with open(log or os.devnull, "wb") as err:
            self.proc = subprocess.Popen(
                [*cmd, "--socket", self.sock, "--backend", "null"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
            )
        deadline = time.monotonic() + DEADLINE
        while True:
            try:
                self.fe = Frontend.connect(self.sock, timeout=DEADLINE)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.01)  # the daemon starting up: not a test, a bench
        feats, _ = self.fe.negotiate()
        self.event_idx = bool(feats >> VIRTIO_RING_F_EVENT_IDX & 1)
        self.fe.add_memory(8 << 20)
        self.fe.set_mem_table()
        self.rings = [self.fe.setup_ring(i, 64, gpa=i << 20) for i in range(4)]
        self.xruns = self.stream_xruns = 0
        self.xrun_times: list[float] = []
        self.event_bufs: dict[int, int] = {}

    def kick(self, index: int, old: int) -> None:
        """Kick ring ``index`` as a Linux driver does (``virtqueue_kick_prepare``):
        only when the device asks for it (VIRTIO 1.2 §2.7.10), ``old`` being
        ``avail->idx`` before the buffers just added."""
        mock = self.rings[index].mock
        new = mock.avail_idx()
        if self.event_idx:
            if (new - mock.avail_event() - 1) & 0xFFFF < (new - old) & 0xFFFF:
                self.fe.kick(index)
        elif not mock.used_flags() & VRING_USED_F_NO_NOTIFY:
            self.fe.kick(index)

    def control(self, request: bytes) -> int:
        mock = self.rings[CTL].mock
        req, out = mock.alloc(len(request)), mock.alloc(4)
        self.fe.memory.write(req, request)
        mock.add_chain([RawDesc(req, len(request), 0, 0), RawDesc(out, 4, VIRTQ_DESC_F_WRITE, 0)])
        self.fe.kick(CTL)
        self.fe.wait_used(CTL, 1, DEADLINE)
        return int(struct.unpack("<I", self.fe.memory.read(out, 4))[0])

    def start(self, sid: int, period: int, features: int = 1 << 4) -> None:
        # S16 (5), 48 kHz (7), stereo, EVT_XRUNS (bit 4) selected, 4 periods of buffer.
        params = struct.pack("<IIIIIBBBx", 0x0101, sid, 4 * period, period, features, 2, 5, 7)
        for request in (params, struct.pack("<II", 0x0102, sid), struct.pack("<II", 0x0104, sid)):
            status = self.control(request)
            assert status == S_OK, f"control request answered {status:#x}"

    def events(self, n: int) -> None:
        """Give the device ``n`` event buffers (recycled by :meth:`reap_events`)."""
        mock = self.rings[EVT].mock
        for _ in range(n):
            out = mock.alloc(8)
            self.event_bufs[mock.add_chain([RawDesc(out, 8, VIRTQ_DESC_F_WRITE, 0)])] = out
        self.fe.kick(EVT)

    def reap_events(self) -> None:
        """Count the XRUNs among the events sent so far and give the buffers back."""
        mock = self.rings[EVT].mock
        used = mock.used_elems()
        old = mock.avail_idx()
        for head, _ in used:
            out = self.event_bufs.pop(head)
            if struct.unpack("<I", self.fe.memory.read(out, 4))[0] == EVT_XRUN:
                self.xruns += 1
                self.xrun_times.append(time.monotonic())
            self.event_bufs[mock.add_chain([RawDesc(out, 8, VIRTQ_DESC_F_WRITE, 0)])] = out
        if used:
            self.kick(EVT, old)
        # Interrupts on for the next event, as Linux's virtio_snd keeps them.
        mock.set_used_event(mock.used_idx())

    def stream(self, index: int, sid: int, period: int, periods: int, depth: int) -> list[float]:
        """Serve ``periods`` buffers keeping ``depth`` in flight; return each one's
        arrival -> completion time."""
        mock = self.rings[index].mock
        slots = [(mock.alloc(4), mock.alloc(period), mock.alloc(8)) for _ in range(depth)]
        flag = 0 if index == TX else VIRTQ_DESC_F_WRITE
        for hdr, _, _ in slots:
            self.fe.memory.write(hdr, struct.pack("<I", sid))
        free = list(range(depth))
        sent_at: dict[int, tuple[int, float]] = {}
        times: list[float] = []
        sent = 0
        while len(times) < periods:
            old = mock.avail_idx()
            while free and sent < periods:
                slot = free.pop()
                hdr, buf, status = slots[slot]
                head = mock.add_chain(
                    [
                        RawDesc(hdr, 4, 0, 0),
                        RawDesc(buf, period, flag, 0),
                        RawDesc(status, 8, VIRTQ_DESC_F_WRITE, 0),
                    ]
                )
                sent_at[head] = (slot, time.monotonic())
                sent += 1
            self.kick(index, old)
            for head, _ in self.fe.wait_used(index, 1, DEADLINE):
                slot, t = sent_at.pop(head)
                times.append(time.monotonic() - t)
                free.append(slot)
            if len(times) < periods:
                self.reap_events()
        # XRUNs before the last completion: the stream running dry after it is ours.
        self.stream_xruns = self.xruns
        return times

    def stream_realtime(
        self, index: int, sid: int, period: int, periods: int, depth: int, *, ticks: list[float] | None = None
    ) -> tuple[list[float], list[float], int]:
        """Serve ``periods`` buffers as a guest whose source is real time: ``depth``
        buffers at the start, then one each period on the front-end's own clock
        (absolute deadlines every period from half a period after the first
        completion: the device's period boundaries fall between them),
        whenever a slot is free; completions are taken as their interrupts come
        (interrupts stay enabled, ``used_event`` following the ring, as Linux's
        virtio_snd keeps them).  Returns each buffer's arrival -> completion time,
        each tick's lateness (when the buffer went in, after its deadline or after
        a slot came free, whichever was later), and
        the ticks that found no free slot (the device behind the clock).
        ``ticks``, when given, gets each tick's time, when its buffer went in."""
        mock = self.rings[index].mock
        slots = [(mock.alloc(4), mock.alloc(period), mock.alloc(8)) for _ in range(depth)]
        flag = 0 if index == TX else VIRTQ_DESC_F_WRITE
        for hdr, _, _ in slots:
            self.fe.memory.write(hdr, struct.pack("<I", sid))
        call_fd = self.fe.rings[index].call_fd
        secs = period / (RATE * FRAME)
        free = list(range(depth))
        sent_at: dict[int, tuple[int, float]] = {}
        times: list[float] = []
        late: list[float] = []
        blocked = 0
        sent = 0

        def submit(n: int) -> None:
            nonlocal sent
            old = mock.avail_idx()
            now = time.monotonic()
            for _ in range(n):
                slot = free.pop()
                hdr, buf, status = slots[slot]
                head = mock.add_chain(
                    [
                        RawDesc(hdr, 4, 0, 0),
                        RawDesc(buf, period, flag, 0),
                        RawDesc(status, 8, VIRTQ_DESC_F_WRITE, 0),
                    ]
                )
                sent_at[head] = (slot, now)
                sent += 1
            self.kick(index, old)

        freed_at = 0.0

        def reap() -> None:
            nonlocal freed_at
            now = time.monotonic()
            for head, _ in mock.used_elems():
                slot, t = sent_at.pop(head)
                times.append(now - t)
                if not free:
                    freed_at = now
                free.append(slot)

        submit(min(depth, periods))
        # The clock starts with the stream: the first period is due when the
        # first buffer completes, a new one each period after that.
        tick = -1.0
        end = time.monotonic() + DEADLINE + periods * secs
        while len(times) < periods:
            now = time.monotonic()
            if now > end:
                raise TimeoutError(f"ring {index}: {len(times)} of {periods} buffers completed")
            reap()
            if len(times) >= periods:
                break
            if tick < 0 and times:
                tick = now + 0.5 * secs
            if 0 <= tick <= now and sent < periods:
                if free:
                    # Late by what is the front-end's own: from its deadline, or
                    # from when a slot came free if the ring was full then (a
                    # source ahead of the device waits for it, as a blocking
                    # write does).
                    late.append(now - max(tick, freed_at))
                    if ticks is not None:
                        ticks.append(now)
                    submit(1)
                    tick += secs
                    continue
                blocked += 1
            # Interrupts on: the device signals the next completion (§2.7.10).
            seen = mock.used_idx()
            mock.set_used_event(seen)
            if mock.used_idx() != seen:
                continue
            wait = DEADLINE if sent >= periods or not free or tick < 0 else max(tick - time.monotonic(), 0.0)
            if select.select([call_fd], [], [], wait)[0]:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(call_fd)
            if self.event_bufs:
                self.reap_events()
        self.stream_xruns = self.xruns
        return times, late, blocked

    def stop(self, sid: int) -> None:
        """STOP the stream and forget the events so far (its tail ran dry)."""
        assert self.control(struct.pack("<II", 0x0105, sid)) == S_OK
        self.reap_events()
        self.xruns = 0

    def close(self) -> None:
        self.fe.close()
        self.proc.terminate()
        try:
            self.proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_once(kind: str, secs: float, period_ms: float) -> dict[str, float]:
    """One session of ``kind``: its figures (upstream's: playback CPU only, see below)."""
    period = int(RATE * period_ms / 1000) * FRAME
    periods = max(int(secs * 1000 / period_ms), 4)
    audio_secs = periods * period_ms / 1000
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        s = Session(kind, tmp)

        def play(key: str, realtime: bool, index: int = TX, sid: int = 0) -> list[float]:
            with TaskClock(s.proc.pid) as on_cpu:
                cpu0 = _cpu_seconds(s.proc.pid)
                fe0 = _cpu_seconds(os.getpid())
                if realtime:
                    times, late, blocked = s.stream_realtime(index, sid, period, periods, 4)
                    out[f"{key}_late_p99"] = sorted(late)[len(late) * 99 // 100] / (period_ms / 1000)
                    out[f"{key}_blocked"] = blocked
                else:
                    times = s.stream(index, sid, period, periods, 4)
                out[key] = (_cpu_seconds(s.proc.pid) - cpu0) / audio_secs
            if on_cpu.seconds is not None:
                out[f"{key}_oncpu"] = on_cpu.seconds / audio_secs
            out[f"{key}_fe"] = (_cpu_seconds(os.getpid()) - fe0) / audio_secs
            return times

        def release(sid: int) -> None:
            s.stop(sid)
            assert s.control(struct.pack("<II", 0x0103, sid)) == S_OK  # RELEASE

        try:
            # Like upstream's run: no event buffers, no XRUN notifications (upstream
            # never completes capture and makes its vring worker spin on event
            # buffers, which it never pops: it gets none).  Flat out: each buffer
            # refilled when it comes back; real time: one buffer each period.
            s.start(0, period, features=0)
            play("cpu_tx_flat", False)
            release(0)
            s.start(0, period, features=0)
            play("cpu_tx_rt", True)
            if kind == "rust":
                return out
            release(0)
            # As the Linux driver runs it: event buffers, PERIOD_ELAPSED and XRUNs,
            # the guest's source in real time.
            s.events(32)
            xruns = 0
            secs_ = period_ms / 1000
            for name, index, sid in (("tx", TX, 0), ("rx", RX, 1)):
                s.start(sid, period)
                times = play(f"cpu_{name}_ev", True, index, sid)
                if name == "tx":
                    # A buffer that found the stream playing completes after the
                    # ones before it: about 3.5 periods after its arrival (it
                    # arrives half a period after a completion, with 3 ahead of
                    # it).  One that found it dry (an underrun) would complete 1
                    # period after it arrived.  The first 4 start the stream.
                    q = sorted(t / secs_ for t in times[4:])
                    out["tx4_min"] = q[0]
                    out["tx4_p01"] = q[len(q) // 100]
                    out["tx4_p50"] = q[len(q) // 2]
                    out["tx4_max"] = q[-1]
                xruns += s.stream_xruns
                s.stop(sid)
            out["xruns"] = xruns
            # One buffer in flight: arrival -> completion against the period.
            assert s.control(struct.pack("<II", 0x0104, 0)) == S_OK
            lat = sorted(t / secs_ for t in s.stream(TX, 0, period, max(periods // 5, 20), 1))
            out["latency"] = lat[len(lat) // 2]
            out["latency_p99"] = lat[len(lat) * 99 // 100]
            out["latency_max"] = lat[-1]
        finally:
            s.close()
    return out


def build_floor(tmp: str) -> str | None:
    """``benches/wake_floor.c`` built with ``$CC`` (default ``cc``) in ``tmp``; None
    when there is no compiler."""
    exe = os.path.join(tmp, "wake_floor")
    try:
        subprocess.run(
            [os.environ.get("CC", "cc"), "-O2", "-o", exe, str(REPO / "benches" / "wake_floor.c")],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return exe


def floor_once(exe: str, period_ms: float, periods: int) -> dict[str, float]:
    """One run of each mode of ``wake_floor``: CPU per second of each process, for a
    device that keeps time (``device_*``, our null backend's shape) and one woken by
    the driver's kick (``driver_*``, upstream's null backend under a real-time
    source)."""
    out: dict[str, float] = {}
    for mode in ("device", "driver"):
        res = subprocess.run(
            [exe, mode, str(int(period_ms * 1000)), str(periods)], check=True, capture_output=True, text=True
        )
        dev_ns, drv_ns, _slices, dev_on, drv_on = (float(x) for x in res.stdout.split())
        out[f"{mode}_dev"] = dev_ns / (period_ms * 1e6)
        out[f"{mode}_drv"] = drv_ns / (period_ms * 1e6)
        if dev_on >= 0 and drv_on >= 0:
            out[f"{mode}_dev_oncpu"] = dev_on / (period_ms * 1e6)
            out[f"{mode}_drv_oncpu"] = drv_on / (period_ms * 1e6)
    return out


def long_run(secs: float, period_ms: float) -> None:
    """One long real-time playback run of ours (event buffers, XRUN notifications):
    the distribution of tx arrival -> completion against the period, the XRUN
    events, and whose lateness caused them: the front-end's ticks (when a buffer
    went in, after its deadline) and the device's timer wake-ups (after their
    expiries, from the daemon's debug log at STOP)."""
    period = int(RATE * period_ms / 1000) * FRAME
    periods = int(secs * 1000 / period_ms)
    p_s = period_ms / 1000
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "daemon.log")
        s = Session("ours", tmp, log=log)
        try:
            s.events(32)
            s.start(0, period)
            ticks: list[float] = []
            cpu0 = _cpu_seconds(s.proc.pid)
            times, late, blocked = s.stream_realtime(TX, 0, period, periods, 4, ticks=ticks)
            cpu = (_cpu_seconds(s.proc.pid) - cpu0) / (periods * p_s)
            s.stop(0)
        finally:
            s.close()
        with open(log) as f:
            timer = [line.strip() for line in f if "timer wake-ups late" in line]
    q = sorted(t / p_s for t in times[4:])
    pct = [0, 1, 5, 50, 95, 99, 100]
    title = f"long run: {periods} periods of {period_ms:g} ms ({secs:g} s), 4 in flight, real-time source"
    print(f"| {title} | |")
    print("| --- | --- |")
    print(f"| daemon CPU per second of playback | {100 * cpu:.3g} % |")
    cells = ", ".join(f"p{p}: {q[min(len(q) - 1, len(q) * p // 100)]:.2f}" for p in pct)
    print(f"| tx arrival -> completion (periods) | {cells} |")
    hist = [0] * 6
    for t in q:
        hist[min(int(t), 5)] += 1
    print(
        "| the same, buffers by whole periods 0-1/1-2/2-3/3-4/4-5/5+ | "
        + "/".join(str(h) for h in hist)
        + " |"
    )
    print(f"| PCM_XRUN events | {s.stream_xruns} |")
    fl = sorted(x / p_s for x in late)
    print(
        "| front-end ticks late by >1 / >2 / >3 periods; largest | "
        f"{sum(x > 1 for x in fl)} / {sum(x > 2 for x in fl)} / {sum(x > 3 for x in fl)}; {fl[-1]:.2f} |"
    )
    print(f"| front-end ticks that found no free slot | {blocked} |")
    print(f"| device timer (daemon log) | {'; '.join(timer) or 'n/a'} |")
    # Each XRUN against the front-end's lateness just before it: the stream runs
    # dry when a buffer comes later than the 3 periods queued before it last.
    for x in s.xrun_times:
        before = [(t, lt) for t, lt in zip(ticks, late, strict=True) if x - 0.1 < t <= x]
        worst = max((lt for _, lt in before), default=0.0) / p_s
        print(f"| an XRUN: the front-end's latest tick within 100 ms before it | {worst:.2f} periods late |")


def _fmt(values: list[float], scale: float = 1.0, unit: str = "") -> str:
    v = [x * scale for x in values]
    return f"{statistics.median(v):.3g}{unit} ({min(v):.3g}..{max(v):.3g})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--secs", type=float, default=3.0, help="audio seconds per stream per run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--period-ms", type=float, default=5.0)
    ap.add_argument("--long", type=float, default=0.0, help="instead: one long real-time run of this many s")
    args = ap.parse_args(argv)
    if args.long:
        long_run(args.long, args.period_ms)
        return 0
    kinds = ["ours"] + (["rust"] if rust_daemon() else [])
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    floors: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        floor = build_floor(tmp)
        for _ in range(args.reps):
            for k in kinds:
                runs[k].append(run_once(k, args.secs, args.period_ms))
            if floor:
                periods = max(int(args.secs * 1000 / args.period_ms), 4)
                floors.append(floor_once(floor, args.period_ms, periods))
    title = f"vhost-device-sound, null backend, 48 kHz stereo S16, {args.period_ms:g} ms periods"
    print(f"| {title} | ours | Rust | ours/Rust |")
    print("| --- | --- | --- | --- |")

    def compare(label: str, ours: list[float], rust: list[float] | None) -> None:
        if rust:
            ratio = f"{statistics.median(ours) / max(statistics.median(rust), 1e-9):.2f}x"
            print(f"| {label} | {_fmt(ours, 100, ' %')} | {_fmt(rust, 100, ' %')} | {ratio} |")
        else:
            print(f"| {label} | {_fmt(ours, 100, ' %')} | n/a | n/a |")

    def column(kind: str, key: str) -> list[float] | None:
        got = [r[key] for r in runs.get(kind, []) if key in r]
        return got if got and len(got) == len(runs[kind]) else None

    for key, label in (
        ("cpu_tx_flat", "CPU per second of playback, flat out (a buffer refilled as it returns), no events"),
        ("cpu_tx_rt", "CPU per second of playback, real-time source (a buffer each period), no events"),
        ("cpu_tx_rt_oncpu", "the same row, time on a CPU (perf task-clock: from each switch-in)"),
        ("cpu_tx_ev", "the same with event buffers, PERIOD_ELAPSED + XRUN"),
        ("cpu_rx_ev", "CPU per second of capture, real-time, the same"),
    ):
        ours = column("ours", key)
        if ours is not None:
            compare(label, ours, column("rust", key))
    if "rust" in runs:
        pair = {k: [r["cpu_tx_rt"] + r["cpu_tx_rt_fe"] for r in runs[k]] for k in ("ours", "rust")}
        label = "the real-time row, daemon + front-end (the Python front-end's CPU added)"
        compare(label, pair["ours"], pair["rust"])
    if floors:
        # The same wake-ups with no Python and no virtqueue (benches/wake_floor.c),
        # beside the daemons in the same run: a device woken by a timer of its own
        # (ours) against one woken by the driver's kick (Rust under a real-time source).
        def measured(key: str) -> list[float]:
            return [f[key] for f in floors]

        compare(
            "floor (C, one wake-up and 2 system calls per period): the device's CPU, "
            "woken by its own timer (ours) / by the driver's kick (Rust)",
            measured("device_dev"),
            measured("driver_dev"),
        )
        if all("device_dev_oncpu" in f for f in floors):
            compare("floor, time on a CPU", measured("device_dev_oncpu"), measured("driver_dev_oncpu"))
        compare(
            "floor, device + driver",
            [f["device_dev"] + f["device_drv"] for f in floors],
            [f["driver_dev"] + f["driver_drv"] for f in floors],
        )
    for key, label in (
        ("cpu_tx_rt_late_p99", "real-time front-end: its tick's lateness, 99th percentile (periods)"),
        ("cpu_tx_rt_blocked", "real-time front-end: ticks that found no free slot"),
    ):
        cells = [_fmt([r[key] for r in runs[k]]) for k in ("ours", "rust") if k in runs]
        print(f"| {label} | {' | '.join(cells)} | |")
    for key, label in (
        ("latency", "tx arrival -> completion, 1 in flight, median"),
        ("latency_p99", "the same, 99th percentile"),
        ("latency_max", "the same, largest"),
        ("tx4_p50", "tx arrival -> completion, real-time source, 4 in flight, median"),
        ("tx4_p01", "the same, 1st percentile"),
        ("tx4_min", "the same, smallest (1.0 would be an underrun)"),
        ("tx4_max", "the same, largest"),
    ):
        v = [r[key] for r in runs["ours"]]
        print(f"| {label} | {_fmt(v, 1, 'x')} the period | | |")
    xr = [r["xruns"] for r in runs["ours"]]
    print(f"| PCM_XRUN events, real-time source, 4 periods in flight | {int(max(xr))} (max over runs) | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
