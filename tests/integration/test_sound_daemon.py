"""vhost-device-sound as a process, driven by our front-end over a real socket.

* ``--backend null``: playback is consumed at the stream's rate (a 1 kHz sine, 48 kHz
  stereo S16, cannot complete faster than it lasts), capture gives silence at that
  rate, PERIOD_ELAPSED events arrive, ``--socket-fd`` serves an inherited socket,
  SIGTERM exits 0.
* ``--backend pulseaudio`` against a real PulseAudio server started here (null
  sinks, no sound card): the guest's sine reaches the sink (recorded from its
  monitor with ``parec``, peak at 1 kHz), and a sine played into a sink with
  ``pacat`` is captured by the guest from its monitor (peak at 1 kHz).

Timing assertions are lower bounds only (real time passed), which a loaded
machine cannot break.
"""

from __future__ import annotations

import math
import os
import select
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_process import DaemonProcess
from device_drivers import console_script

from vhost_backends.frontend import Frontend
from virtio_queue.testing import VIRTQ_DESC_F_WRITE, RawDesc

pytestmark = pytest.mark.slow

TIMEOUT = 10.0
CTL, EVT, TX, RX = 0, 1, 2, 3
RATE, CHANNELS = 48000, 2
FRAME = 2 * CHANNELS  # S16 stereo
PERIOD = 1920  # 10 ms
# set_params enums: S16 = 5, 48 kHz = 7.
FMT_S16, RATE_48000 = 5, 7
S_OK, S_BAD_MSG = 0x8000, 0x8001
EVT_PERIOD_ELAPSED = 0x1100


def sine(frames: int, freq: float = 1000.0, start: int = 0) -> bytes:
    """Stereo S16 frames of a sine at ``freq`` (half scale)."""
    out = bytearray()
    for i in range(start, start + frames):
        v = int(16000 * math.sin(2 * math.pi * freq * i / RATE))
        out += struct.pack("<hh", v, v)
    return bytes(out)


def peak_frequency(pcm: bytes, lo: int = 200, hi: int = 4000, step: int = 50) -> int:
    """The frequency (a multiple of ``step`` Hz) with the most power in the left
    channel of stereo S16 ``pcm`` (Goertzel over a 0.2 s window from its middle)."""
    samples = struct.unpack(f"<{len(pcm) // 2}h", pcm[: len(pcm) // 4 * 4])[::2]
    n = min(len(samples), RATE // 5)
    mid = (len(samples) - n) // 2
    window = samples[mid : mid + n]
    best, best_power = 0, -1.0
    for f in range(lo, hi + 1, step):
        coeff = 2 * math.cos(2 * math.pi * f / RATE)
        s1 = s2 = 0.0
        for x in window:
            s1, s2 = x + coeff * s1 - s2, s1
        power = s1 * s1 + s2 * s2 - coeff * s1 * s2
        if power > best_power:
            best, best_power = f, power
    return best


def from_first_sound(pcm: bytes) -> bytes:
    """``pcm`` (stereo S16) from its first frame louder than silence on."""
    for i in range(0, len(pcm) - FRAME + 1, FRAME):
        if abs(struct.unpack_from("<h", pcm, i)[0]) > 1000:
            return pcm[i:]
    return b""


class SoundSession:
    """A daemon and a front-end with the four rings set up (each ring 1 MiB apart,
    its buffers after it)."""

    def __init__(self, tmp: Path, backend: str, env: dict[str, str] | None = None) -> None:
        self.sock = str(tmp / "snd.sock")
        cmd = [*console_script("vhost-device-sound", "vhost_backends.cli.sound"), "--socket", self.sock]
        self.daemon = DaemonProcess(self.sock, [*cmd, "--backend", backend], env=env)
        self.fe: Frontend | None = None
        try:
            self.daemon.wait_for("listening", TIMEOUT)
            self.fe = Frontend.connect(self.sock, timeout=TIMEOUT)
            self.fe.negotiate()
            self.fe.add_memory(8 << 20)
            self.fe.set_mem_table()
            self.rings = [self.fe.setup_ring(i, 64, gpa=i << 20) for i in range(4)]
        except BaseException:
            self.close()
            raise

    def chain(
        self, index: int, readable: list[bytes], writable: list[int], fill: int | None = None
    ) -> tuple[int, list[int]]:
        assert self.fe is not None
        return self.fe.add_request(index, readable, writable, fill)

    def control(self, request: bytes, reply: int = 4) -> int:
        assert self.fe is not None
        head, (out,) = self.chain(CTL, [request], [reply])
        self.fe.kick(CTL)
        ((got, _used),) = self.fe.wait_used(CTL, 1, TIMEOUT)
        assert got == head
        return int(struct.unpack("<I", self.fe.memory.read(out, 4))[0])

    def start_stream(self, sid: int) -> None:
        params = struct.pack("<IIIIIBBBx", 0x0101, sid, 4 * PERIOD, PERIOD, 0, CHANNELS, FMT_S16, RATE_48000)
        assert self.control(params) == S_OK
        assert self.control(struct.pack("<II", 0x0102, sid)) == S_OK  # PREPARE

    def close(self) -> None:
        if self.fe is not None:
            self.fe.close()
        if self.daemon.alive():
            assert self.daemon.terminate() == 0, self.daemon.log[-5:]


@pytest.fixture
def null_session(tmp_path: Path) -> Iterator[SoundSession]:
    s = SoundSession(tmp_path, "null")
    try:
        yield s
    finally:
        s.close()


def test_null_playback_is_paced_at_the_stream_rate(null_session: SoundSession) -> None:
    s = null_session
    fe = s.fe
    assert fe is not None
    events = [s.chain(EVT, [], [8]) for _ in range(16)]
    fe.kick(EVT)
    s.start_stream(0)
    n = 20  # 20 periods of 10 ms: 0.2 s of a 1 kHz sine
    tone = sine(n * PERIOD // FRAME)
    bufs = [s.chain(TX, [struct.pack("<I", 0) + tone[i * PERIOD : (i + 1) * PERIOD]], [8]) for i in range(n)]
    fe.kick(TX)
    t0 = time.monotonic()
    assert s.control(struct.pack("<II", 0x0104, 0)) == S_OK  # START
    used: list[tuple[int, int]] = []
    while len(used) < n:
        used += fe.wait_used(TX, 1, TIMEOUT)
    elapsed = time.monotonic() - t0
    assert used == [(head, 8) for head, _ in bufs]
    # Not consumed faster than it lasts (upstream's null completes at once).
    assert elapsed >= n * PERIOD / (RATE * FRAME)
    statuses = [struct.unpack("<II", fe.memory.read(out, 8)) for _, (out,) in bufs]
    assert all(status == S_OK for status, _ in statuses)
    # latency_bytes: what was queued behind each buffer; the last one had none.
    assert statuses[0][1] > 0 and statuses[-1][1] == 0
    # PERIOD_ELAPSED for stream 0, one per period consumed (16 buffers given).
    got = fe.wait_used(EVT, 16, TIMEOUT)
    assert [u for u in got] == [(head, 8) for head, _ in events]
    assert all(
        struct.unpack("<II", fe.memory.read(out, 8)) == (EVT_PERIOD_ELAPSED, 0) for _, (out,) in events
    )


def test_null_capture_gives_silence_at_the_stream_rate(null_session: SoundSession) -> None:
    s = null_session
    fe = s.fe
    assert fe is not None
    s.start_stream(1)
    n = 10
    # Filled before they are made available: the driver does not touch a buffer
    # the device may already hold (the device may take it before the kick).
    bufs = [s.chain(RX, [struct.pack("<I", 1)], [PERIOD, 8], fill=0xEE) for _ in range(n)]
    fe.kick(RX)
    t0 = time.monotonic()
    assert s.control(struct.pack("<II", 0x0104, 1)) == S_OK  # START
    used: list[tuple[int, int]] = []
    while len(used) < n:
        used += fe.wait_used(RX, 1, TIMEOUT)
    assert time.monotonic() - t0 >= n * PERIOD / (RATE * FRAME)
    assert used == [(head, PERIOD + 8) for head, _ in bufs]
    for _, (data, status) in bufs:
        assert fe.memory.read(data, PERIOD) == bytes(PERIOD)
        assert struct.unpack("<I", fe.memory.read(status, 4))[0] == S_OK
    # STOP then RELEASE with nothing pending; the stream can be prepared again.
    assert s.control(struct.pack("<II", 0x0105, 1)) == S_OK
    assert s.control(struct.pack("<II", 0x0103, 1)) == S_OK
    assert s.control(struct.pack("<II", 0x0102, 1)) == S_OK


def test_bad_stream_id_in_io_does_not_stop_the_other_stream(null_session: SoundSession) -> None:
    s = null_session
    fe = s.fe
    assert fe is not None
    s.start_stream(1)
    assert s.control(struct.pack("<II", 0x0104, 1)) == S_OK
    bad, (bad_out,) = s.chain(TX, [struct.pack("<I", 0xFFFFFFFF) + bytes(64)], [8])
    fe.kick(TX)
    assert fe.wait_used(TX, 1, TIMEOUT) == [(bad, 8)]
    assert struct.unpack("<I", fe.memory.read(bad_out, 4))[0] == S_BAD_MSG
    head, _ = s.chain(RX, [struct.pack("<I", 1)], [PERIOD, 8])
    fe.kick(RX)
    assert fe.wait_used(RX, 1, TIMEOUT) == [(head, PERIOD + 8)]


def test_socket_fd_serves_an_inherited_listening_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "inherited.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    fd = listener.fileno()
    os.set_inheritable(fd, True)
    cmd = console_script("vhost-device-sound", "vhost_backends.cli.sound")
    env = dict(os.environ, RUST_LOG="info")
    proc = subprocess.Popen(
        [*cmd, "--socket-fd", str(fd), "--backend", "null"], pass_fds=[fd], stderr=subprocess.PIPE, env=env
    )
    listener.close()
    try:
        with Frontend.connect(path, timeout=TIMEOUT) as fe:
            fe.negotiate()
            assert fe.get_config(0, 16) == struct.pack("<IIII", 0, 2, 6, 0)
    finally:
        proc.terminate()
        assert proc.wait(TIMEOUT) == 0
        assert proc.stderr is not None
        log = proc.stderr.read().decode()
        proc.stderr.close()
    assert f"fd {fd}: listening" in log
    assert os.path.exists(path)  # an inherited socket's path is not the daemon's


# -- PulseAudio ------------------------------------------------------------------------------------


class PulseServer:
    """A PulseAudio server of its own (user mode, no sound card): a native socket
    with anonymous access and two null sinks, ``vsink`` (the guest plays into it)
    and ``vsrc`` (the test plays into it; the guest records its monitor)."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp
        self.socket = str(tmp / "native")
        self.env = dict(
            os.environ, HOME=str(tmp), XDG_RUNTIME_DIR=str(tmp), PULSE_SERVER=f"unix:{self.socket}"
        )
        self.env.pop("PULSE_SINK", None)
        self.env.pop("PULSE_SOURCE", None)
        self.proc = subprocess.Popen(
            [
                "pulseaudio", "--daemonize=no", "-n", "--exit-idle-time=-1", "--disable-shm=yes",
                "--log-target=stderr", "-v",
                "-L", f"module-native-protocol-unix socket={self.socket} auth-anonymous=1",
                "-L", "module-null-sink sink_name=vsink rate=48000 channels=2",
                "-L", "module-null-sink sink_name=vsrc rate=48000 channels=2",
            ],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=self.env,
        )  # fmt: skip
        self._wait_started()

    def _wait_started(self) -> None:
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        p = select.poll()
        p.register(fd, select.POLLIN)
        buf = b""
        deadline = time.monotonic() + TIMEOUT
        while b"Daemon startup complete" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not p.poll(int(left * 1000)):
                self.close()
                pytest.skip(f"pulseaudio did not start: {buf[-400:]!r}")
            chunk = os.read(fd, 65536)
            if not chunk:
                self.close()
                pytest.skip(f"pulseaudio exited: {buf[-400:]!r}")
            buf += chunk
        # From now on nobody reads its log: send it nowhere.
        self.proc.stderr.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None and not self.proc.stderr.closed:
            self.proc.stderr.close()


@pytest.fixture(scope="module")
def pulse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PulseServer]:
    if shutil.which("pulseaudio") is None or shutil.which("parec") is None:
        pytest.skip("pulseaudio and pulseaudio-utils are not installed (scripts/install-system-deps)")
    server = PulseServer(tmp_path_factory.mktemp("pulse"))
    try:
        yield server
    finally:
        server.close()


def stream_periods(s: SoundSession, index: int, sid: int, periods: int, data: bytes | None) -> list[bytes]:
    """Keep up to 16 messages in flight until ``periods`` were served; return what
    capture recorded (``data`` None) in order."""
    fe = s.fe
    assert fe is not None
    slots = [
        (
            s.rings[index].mock.alloc(4),
            s.rings[index].mock.alloc(PERIOD),
            s.rings[index].mock.alloc(8),
        )
        for _ in range(16)
    ]
    for hdr, _, _ in slots:
        fe.memory.write(hdr, struct.pack("<I", sid))
    free = list(range(16))
    inflight: dict[int, int] = {}
    sent = done = 0
    recorded: list[bytes] = []
    order: list[int] = []
    while done < periods:
        while free and sent < periods:
            slot = free.pop()
            hdr, buf, status = slots[slot]
            if data is not None:
                fe.memory.write(buf, data[sent * PERIOD : (sent + 1) * PERIOD])
                descs = [
                    RawDesc(hdr, 4, 0, 0),
                    RawDesc(buf, PERIOD, 0, 0),
                    RawDesc(status, 8, VIRTQ_DESC_F_WRITE, 0),
                ]
            else:
                descs = [
                    RawDesc(hdr, 4, 0, 0),
                    RawDesc(buf, PERIOD, VIRTQ_DESC_F_WRITE, 0),
                    RawDesc(status, 8, VIRTQ_DESC_F_WRITE, 0),
                ]
            inflight[s.rings[index].mock.add_chain(descs)] = slot
            order.append(slot)
            sent += 1
        fe.kick(index)
        for head, _used in fe.wait_used(index, 1, TIMEOUT):
            slot = inflight.pop(head)
            _, buf, status = slots[slot]
            assert struct.unpack("<I", fe.memory.read(status, 4))[0] == S_OK
            if data is None:
                recorded.append(fe.memory.read(buf, PERIOD))
            free.append(slot)
            done += 1
    return recorded


def test_pulseaudio_playback_reaches_the_server(pulse: PulseServer, tmp_path: Path) -> None:
    env = {**pulse.env, "PULSE_SINK": "vsink"}
    rec_path = tmp_path / "rec.raw"
    with open(rec_path, "wb") as out:
        parec = subprocess.Popen(
            ["parec", "-d", "vsink.monitor", "--raw", "--format=s16le", "--rate=48000", "--channels=2"],
            stdout=out, stderr=subprocess.DEVNULL, env=pulse.env,
        )  # fmt: skip
    s = SoundSession(tmp_path, "pulseaudio", env=env)
    try:
        s.start_stream(0)
        assert s.control(struct.pack("<II", 0x0104, 0)) == S_OK
        n = 60  # 0.6 s
        stream_periods(s, TX, 0, n, sine(n * PERIOD // FRAME))
        assert s.control(struct.pack("<II", 0x0105, 0)) == S_OK
        assert s.control(struct.pack("<II", 0x0103, 0)) == S_OK  # RELEASE: the server drains
    finally:
        s.close()
        parec.terminate()
        parec.wait(TIMEOUT)
    # The monitor saw the guest's tone (silence before it is fine).
    loud = from_first_sound(rec_path.read_bytes())
    assert len(loud) >= RATE * FRAME // 5, f"only {len(loud)} bytes of the tone reached vsink"
    assert peak_frequency(loud[: RATE * FRAME // 2]) == 1000


def test_pulseaudio_capture_records_the_server(pulse: PulseServer, tmp_path: Path) -> None:
    env = {**pulse.env, "PULSE_SOURCE": "vsrc.monitor"}
    tone = tmp_path / "tone.raw"
    tone.write_bytes(sine(5 * RATE))
    # pacat plays the file into vsrc in real time (a short latency, so it starts at once).
    pacat = subprocess.Popen(
        ["pacat", "-p", "-d", "vsrc", "--raw", "--format=s16le", "--rate=48000", "--channels=2",
         "--latency-msec=50", str(tone)],
        stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=pulse.env,
    )  # fmt: skip
    s = SoundSession(tmp_path, "pulseaudio", env=env)
    try:
        s.start_stream(1)
        assert s.control(struct.pack("<II", 0x0104, 1)) == S_OK
        recorded = b"".join(stream_periods(s, RX, 1, 100, None))
        assert s.control(struct.pack("<II", 0x0105, 1)) == S_OK
    finally:
        s.close()
        pacat.terminate()
        pacat.wait(TIMEOUT)
    assert len(recorded) == 100 * PERIOD
    # pacat may start after the capture did: from the tone's first frame on.
    loud = from_first_sound(recorded)
    assert len(loud) >= RATE * FRAME // 5, f"only {len(loud)} bytes of the tone were captured"
    assert peak_frequency(loud[: RATE * FRAME // 2]) == 1000


# -- ALSA ---------------------------------------------------------------------------------------------


def test_alsa_playback_reaches_the_pcm_device(tmp_path: Path) -> None:
    # ALSA's "file" plugin (over its null PCM) stands for a card: what the guest
    # plays lands in a file, byte for byte.  The device is our addition,
    # VHD_SOUND_ALSA_DEVICE (upstream always opens "default").
    pytest.importorskip("alsaaudio", reason="pyalsaaudio (the hosts extra) is not installed")
    out = tmp_path / "alsa.raw"
    env = {"VHD_SOUND_ALSA_DEVICE": f"file:FILE={out},FORMAT=raw"}
    s = SoundSession(tmp_path, "alsa", env=env)
    n = 10
    tone = sine(n * PERIOD // FRAME)
    try:
        s.start_stream(0)
        assert s.control(struct.pack("<II", 0x0104, 0)) == S_OK
        stream_periods(s, TX, 0, n, tone)
        assert s.control(struct.pack("<II", 0x0105, 0)) == S_OK
        assert s.control(struct.pack("<II", 0x0103, 0)) == S_OK  # RELEASE closes the PCM
    finally:
        s.close()
    assert out.read_bytes() == tone


def test_alsa_device_that_cannot_open_is_io_err_and_daemon_goes_on(tmp_path: Path) -> None:
    pytest.importorskip("alsaaudio", reason="pyalsaaudio (the hosts extra) is not installed")
    s = SoundSession(tmp_path, "alsa", env={"VHD_SOUND_ALSA_DEVICE": "hw:99,0"})
    try:
        params = struct.pack("<IIIIIBBBx", 0x0101, 0, 4 * PERIOD, PERIOD, 0, CHANNELS, FMT_S16, RATE_48000)
        assert s.control(params) == S_OK
        assert s.control(struct.pack("<II", 0x0102, 0)) == 0x8003  # PREPARE: IO_ERR (upstream panics)
        assert s.control(struct.pack("<II", 0x0104, 0)) == S_BAD_MSG  # still not prepared
        assert s.control(struct.pack("<IIII", 0x0100, 0, 2, 32), 68) == S_OK
    finally:
        s.close()


def test_disconnect_mid_stream_then_a_new_front_end_is_served(tmp_path: Path) -> None:
    s = SoundSession(tmp_path, "null")
    try:
        fe = s.fe
        assert fe is not None
        s.start_stream(0)
        assert s.control(struct.pack("<II", 0x0104, 0)) == S_OK
        for _ in range(8):  # 80 ms of sound in flight when the front-end leaves
            s.chain(TX, [struct.pack("<I", 0) + bytes(PERIOD)], [8])
        fe.kick(TX)
        fe.close()
        s.fe = None
        s.daemon.wait_for("front-end session ended", TIMEOUT)
        # A fresh device for the next front-end: its streams start over.
        s.fe = Frontend.connect(s.sock, timeout=TIMEOUT)
        s.fe.negotiate()
        s.fe.add_memory(8 << 20)
        s.fe.set_mem_table()
        s.rings = [s.fe.setup_ring(i, 64, gpa=i << 20) for i in range(4)]
        assert s.control(struct.pack("<II", 0x0104, 0)) == S_BAD_MSG  # START: not prepared
        s.start_stream(0)
        assert s.control(struct.pack("<II", 0x0104, 0)) == S_OK
        head, _ = s.chain(TX, [struct.pack("<I", 0) + bytes(PERIOD)], [8])
        s.fe.kick(TX)
        assert s.fe.wait_used(TX, 1, TIMEOUT) == [(head, 8)]
    finally:
        s.close()


def test_pulseaudio_server_away_is_io_err_and_daemon_goes_on(tmp_path: Path) -> None:
    import ctypes.util  # noqa: PLC0415 - only this test asks

    if ctypes.util.find_library("pulse-simple") is None:
        pytest.skip("libpulse-simple is not installed (Debian: libpulse0)")
    # No server at that address: PREPARE (which opens the host stream) gets IO_ERR
    # (upstream panics on a backend error there) and the device goes on.
    env = {
        "PULSE_SERVER": f"unix:{tmp_path / 'nobody-here'}",
        "HOME": str(tmp_path),
        "XDG_RUNTIME_DIR": str(tmp_path),
    }
    s = SoundSession(tmp_path, "pulseaudio", env=env)
    try:
        params = struct.pack("<IIIIIBBBx", 0x0101, 0, 4 * PERIOD, PERIOD, 0, CHANNELS, FMT_S16, RATE_48000)
        assert s.control(params) == S_OK
        assert s.control(struct.pack("<II", 0x0102, 0)) == 0x8003
        assert s.control(struct.pack("<II", 0x0104, 0)) == S_BAD_MSG  # still not prepared
        assert s.control(struct.pack("<IIII", 0x0100, 0, 2, 32), 68) == S_OK
    finally:
        s.close()
