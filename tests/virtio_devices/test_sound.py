"""virtio-sound (VIRTIO 1.2 §5.14) on the kit's rig: control requests byte by byte,
the PCM state machine, tx/rx framing and status, events, faults, quiesce and reset.

The backend is :class:`RecordingAudio`, a twin that plays and records at once (no
pacing) and can be told to fail; the null backend's pacing is tested apart with
short buffers, and through the daemon in tests/integration/test_sound_daemon.py.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhost_backends.event_loop import EventLoop
from virtio_devices._pump import Signaller
from virtio_devices.hosts.audio import AudioError, NullAudio, PcmParams
from virtio_devices.sound import (
    CHMAPS,
    DEFAULT_FORMATS,
    DEFAULT_RATES,
    EVT_PCM_PERIOD_ELAPSED,
    EVT_PCM_XRUN,
    PCM_F_EVT_XRUNS,
    R_CHMAP_INFO,
    R_JACK_INFO,
    R_JACK_REMAP,
    R_PCM_INFO,
    R_PCM_PREPARE,
    R_PCM_RELEASE,
    R_PCM_SET_PARAMS,
    R_PCM_START,
    R_PCM_STOP,
    S_BAD_MSG,
    S_IO_ERR,
    S_NOT_SUPP,
    S_OK,
    VIRTIO_ID_SOUND,
    PcmState,
    SoundDevice,
    _TimerStream,
)
from virtio_devices.testing import DeviceRig, FakeLoop
from virtio_queue import Reader, Writer

CTL, EVT, TX, RX = 0, 1, 2, 3
FMT_S16, RATE_48000 = 5, 7


class RecordingPort:
    """A port that takes and gives bytes at once; ``fail`` makes I/O raise."""

    xruns = 0

    def __init__(self, backend: RecordingAudio, direction: int, params: PcmParams) -> None:
        self.backend = backend
        self.direction = direction
        self.params = params
        self.played = bytearray()
        self.started = 0
        self.closed = False
        self.gate = threading.Event()
        self.gate.set()

    def start(self) -> None:
        self.started += 1

    def stop(self) -> None:
        pass

    def play(self, reader: Reader, n: int) -> None:
        self.gate.wait(10)
        if self.backend.fail_io:
            raise AudioError("device unplugged")
        self.played += reader.read(n)

    def capture(self, writer: Writer, n: int) -> int:
        self.gate.wait(10)
        if self.backend.fail_io:
            raise AudioError("device unplugged")
        return writer.write(bytes(i & 0xFF for i in range(n)))

    def latency_bytes(self) -> int:
        return 0

    def abort(self) -> None:
        self.gate.set()

    def close(self) -> None:
        self.closed = True


class RecordingAudio:
    name = "recording"

    def __init__(self) -> None:
        self.ports: dict[int, RecordingPort] = {}
        self.fail_open = False
        self.fail_io = False

    def open(self, stream_id: int, direction: int, params: PcmParams) -> RecordingPort:
        if self.fail_open:
            raise AudioError("no such device")
        port = self.ports[stream_id] = RecordingPort(self, direction, params)
        return port

    def close(self) -> None:
        pass


@pytest.fixture
def audio() -> RecordingAudio:
    return RecordingAudio()


@pytest.fixture
def rig(audio: RecordingAudio) -> Iterator[DeviceRig]:
    with DeviceRig(SoundDevice(audio), queue_size=64, memory_size=4 << 20) as r:
        yield r


def control(rig: DeviceRig, request: bytes, reply: int = 4) -> tuple[int, int, bytes]:
    """Send one control request, wait for its answer; (status, used length, payload)."""
    head, (out,) = rig.add_request(CTL, [request], [reply])
    used = rig.kick(CTL)
    while not used:
        rig.complete_workers()
        used = rig.used(CTL)
    assert used[0][0] == head
    data = rig.read(out, reply)
    return struct.unpack_from("<I", data)[0], used[0][1], data[4 : used[0][1]]


def set_params(sid: int, *, buffer: int = 3840, period: int = 960, features: int = 0, channels: int = 2,
               fmt: int = FMT_S16, rate: int = RATE_48000) -> bytes:  # fmt: skip
    return struct.pack("<IIIIIBBBx", R_PCM_SET_PARAMS, sid, buffer, period, features, channels, fmt, rate)


def pcm(code: int, sid: int) -> bytes:
    return struct.pack("<II", code, sid)


def prepare_and_start(rig: DeviceRig, sid: int, **params: int) -> None:
    assert control(rig, set_params(sid, **params))[0] == S_OK
    assert control(rig, pcm(R_PCM_PREPARE, sid))[0] == S_OK
    assert control(rig, pcm(R_PCM_START, sid))[0] == S_OK


def run_due(rig: DeviceRig, *, pumps: bool = True) -> None:
    """Run what is due at the fake clock's time: the loop's timers, and each
    loop-paced stream's timerfd (armed at the fake clock's deadline, so the test
    fires it as the kernel would: when the clock reaches its wake-up).  ``pumps``:
    the pump runs as the vhost-user loop runs it (``fire_pump``: the callback only
    when it asks); else as any other loop (``fire_reader``: the callback, which
    runs the pump)."""
    rig.loop.run_due()
    dev = rig.device
    assert isinstance(dev, SoundDevice)
    while True:
        due = [
            s.worker.timer
            for s in dev.streams
            if isinstance(s.worker, _TimerStream) and 0 <= s.worker.timer.wakeup <= rig.clock()
        ]
        if not due:
            return
        for timer in due:
            if pumps:
                rig.loop.fire_pump(timer.fileno())
            else:
                rig.loop.fire_reader(timer.fileno())


def wait_used(rig: DeviceRig, index: int, count: int) -> list[tuple[int, int]]:
    got: list[tuple[int, int]] = []
    got += rig.used(index)
    while len(got) < count:
        rig.complete_workers()
        got += rig.used(index)
    return got


# -- identity and config ---------------------------------------------------------------------------


def test_identity_four_queues_of_up_to_1024() -> None:
    dev = SoundDevice(RecordingAudio())
    assert dev.device_id == VIRTIO_ID_SOUND == 25
    # QEMU 10's vhost-user-snd-pci asks for 1024 entries (upstream accepts 64).
    assert dev.queue_sizes == (1024, 1024, 1024, 1024)
    assert dev.has_config


def test_config_advertises_every_chmap() -> None:
    # virtio_snd_config: jacks, streams, chmaps, controls (le32 each).
    assert SoundDevice(RecordingAudio()).config_space() == struct.pack("<IIII", 0, 2, len(CHMAPS), 0)
    assert len(CHMAPS) == 6


# -- info requests ---------------------------------------------------------------------------------


def test_pcm_info_payload_bytes(rig: DeviceRig) -> None:
    status, used, payload = control(rig, struct.pack("<IIII", R_PCM_INFO, 0, 2, 32), 4 + 64)
    assert (status, used) == (S_OK, 68)
    want = b"".join(
        struct.pack(
            "<IIQQBBB5x",
            0,  # hda_fn_nid
            1 << PCM_F_EVT_XRUNS,  # features
            DEFAULT_FORMATS,
            DEFAULT_RATES,
            direction,
            1,  # channels_min
            6,  # channels_max
        )
        for direction in (0, 1)
    )
    assert payload == want


def test_pcm_info_honours_the_drivers_item_size(rig: DeviceRig) -> None:
    # size 40: each item padded with zeros to the driver's stride; size 8: cut.
    status, used, payload = control(rig, struct.pack("<IIII", R_PCM_INFO, 1, 1, 40), 4 + 40)
    assert (status, used) == (S_OK, 44)
    assert payload[32:] == bytes(8) and payload[24] == 1  # direction: input
    status, used, payload = control(rig, struct.pack("<IIII", R_PCM_INFO, 0, 2, 8), 4 + 16)
    assert (status, used, len(payload)) == (S_OK, 20, 16)


def test_chmap_info_every_map_reachable(rig: DeviceRig) -> None:
    status, _used, payload = control(rig, struct.pack("<IIII", R_CHMAP_INFO, 0, len(CHMAPS), 24), 4 + 24 * 6)
    assert status == S_OK
    for i, (direction, positions) in enumerate(CHMAPS):
        item = payload[24 * i : 24 * (i + 1)]
        assert struct.unpack_from("<IBB", item) == (0, direction, len(positions))
        assert item[6 : 6 + len(positions)] == bytes(positions)
        assert item[6 + len(positions) :] == bytes(18 - len(positions))
    # The stereo output map is FL, FR (§5.14.6.7: 3, 4).
    assert payload[24 + 6 : 24 + 8] == bytes([3, 4])


@pytest.mark.parametrize(
    ("start", "count"),
    [(2, 1), (0, 3), (1, 2), (0xFFFFFFFF, 2), (1, 0xFFFFFFFF)],
)
def test_pcm_info_out_of_range_is_bad_msg(rig: DeviceRig, start: int, count: int) -> None:
    # §5.14.6.4.1: a range outside the streams cannot be answered: BAD_MSG.
    assert control(rig, struct.pack("<IIII", R_PCM_INFO, start, count, 32), 4 + 96)[:2] == (S_BAD_MSG, 4)


def test_info_reply_buffer_too_small_is_bad_msg(rig: DeviceRig) -> None:
    assert control(rig, struct.pack("<IIII", R_PCM_INFO, 0, 2, 32), 4 + 63)[:2] == (S_BAD_MSG, 4)


def test_jack_info_without_jacks_is_bad_msg_and_remap_not_supp(rig: DeviceRig) -> None:
    assert control(rig, struct.pack("<IIII", R_JACK_INFO, 0, 1, 24), 28)[0] == S_BAD_MSG
    assert control(rig, struct.pack("<IIII", R_JACK_REMAP, 0, 0, 0))[0] == S_NOT_SUPP


@pytest.mark.parametrize("code", [0, 3, 0x0106, 0x0201, 0x0300, 0x1100, 0xFFFFFFFF])
def test_unknown_code_is_not_supp(rig: DeviceRig, code: int) -> None:
    assert control(rig, struct.pack("<IIII", code, 0, 0, 0)) == (S_NOT_SUPP, 4, b"")


@pytest.mark.parametrize(
    "request_bytes",
    [b"", b"\x00\x01", struct.pack("<II", R_PCM_INFO, 0), set_params(0)[:23], struct.pack("<I", R_PCM_START)],
)
def test_short_request_is_bad_msg(rig: DeviceRig, request_bytes: bytes) -> None:
    assert control(rig, request_bytes)[0] == S_BAD_MSG


def test_control_without_room_for_status_is_returned_unwritten(rig: DeviceRig) -> None:
    # §5.14.6: every request has a device-writable status; with none, used length 0.
    head, (out,) = rig.add_request(CTL, [struct.pack("<IIII", R_PCM_INFO, 0, 1, 32)], [3])
    assert rig.kick(CTL) == [(head, 0)]
    assert rig.read(out, 3) == b"\xee" * 3
    # The queue goes on.
    assert control(rig, pcm(R_PCM_PREPARE, 0))[0] == S_OK


# -- SET_PARAMS ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "status"),
    [
        ({}, S_OK),
        ({"fmt": 3}, S_NOT_SUPP),  # S8: not in PCM_INFO's formats
        ({"fmt": 64}, S_NOT_SUPP),
        ({"rate": 0}, S_NOT_SUPP),  # 5512 Hz not offered
        ({"rate": 200}, S_NOT_SUPP),
        ({"channels": 0}, S_NOT_SUPP),
        ({"channels": 7}, S_NOT_SUPP),
        ({"features": 1 << 0}, S_NOT_SUPP),  # SHMEM_HOST not offered
        ({"features": 1 << PCM_F_EVT_XRUNS}, S_OK),
        ({"period": 0}, S_BAD_MSG),
        ({"buffer": 100, "period": 960}, S_BAD_MSG),
        ({"period": 962}, S_BAD_MSG),  # not a whole number of 4-byte frames
    ],
)
def test_set_params_checks_against_pcm_info(rig: DeviceRig, kw: dict[str, int], status: int) -> None:
    assert control(rig, set_params(0, **kw))[0] == status
    dev = rig.device
    assert isinstance(dev, SoundDevice)
    assert dev.streams[0].state == PcmState.SET_PARAMETERS


def test_set_params_bad_stream_id_is_bad_msg(rig: DeviceRig) -> None:
    assert control(rig, set_params(2))[0] == S_BAD_MSG
    assert control(rig, set_params(0xFFFFFFFF))[0] == S_BAD_MSG


# -- the state machine -----------------------------------------------------------------------------


def state(rig: DeviceRig, sid: int) -> str:
    dev = rig.device
    assert isinstance(dev, SoundDevice)
    return dev.streams[sid].state


def test_full_cycle_and_every_refused_transition(rig: DeviceRig) -> None:
    # §5.14.6.6.1: from the initial state only SET_PARAMS and PREPARE are allowed.
    assert control(rig, pcm(R_PCM_START, 0))[0] == S_BAD_MSG
    assert control(rig, pcm(R_PCM_STOP, 0))[0] == S_BAD_MSG
    assert control(rig, pcm(R_PCM_RELEASE, 0))[0] == S_BAD_MSG
    assert state(rig, 0) == PcmState.SET_PARAMETERS
    assert control(rig, set_params(0))[0] == S_OK
    assert control(rig, pcm(R_PCM_PREPARE, 0))[0] == S_OK
    assert control(rig, pcm(R_PCM_STOP, 0))[0] == S_BAD_MSG
    assert control(rig, pcm(R_PCM_START, 0))[0] == S_OK
    assert state(rig, 0) == PcmState.START
    for code in (R_PCM_START, R_PCM_PREPARE, R_PCM_RELEASE):
        assert control(rig, pcm(code, 0))[0] == S_BAD_MSG
    assert control(rig, set_params(0))[0] == S_BAD_MSG
    assert control(rig, pcm(R_PCM_STOP, 0))[0] == S_OK
    assert control(rig, pcm(R_PCM_START, 0))[0] == S_OK  # STOP -> START (pause release)
    assert control(rig, pcm(R_PCM_STOP, 0))[0] == S_OK
    assert control(rig, pcm(R_PCM_RELEASE, 0))[0] == S_OK
    assert state(rig, 0) == PcmState.RELEASE
    assert control(rig, pcm(R_PCM_PREPARE, 0))[0] == S_OK
    # The other stream was never touched.
    assert state(rig, 1) == PcmState.SET_PARAMETERS


@pytest.mark.parametrize("code", [R_PCM_PREPARE, R_PCM_RELEASE, R_PCM_START, R_PCM_STOP])
def test_pcm_command_bad_stream_id_is_bad_msg(rig: DeviceRig, code: int) -> None:
    assert control(rig, pcm(code, 2))[0] == S_BAD_MSG
    assert control(rig, pcm(code, 0x80000000))[0] == S_BAD_MSG


def test_backend_error_at_prepare_is_io_err_and_state_unchanged(
    rig: DeviceRig, audio: RecordingAudio
) -> None:
    # Upstream unwrap()s PREPARE's backend error (a panic); we answer IO_ERR.
    audio.fail_open = True
    assert control(rig, pcm(R_PCM_PREPARE, 0))[0] == S_IO_ERR
    assert state(rig, 0) == PcmState.SET_PARAMETERS
    assert control(rig, pcm(R_PCM_START, 0))[0] == S_BAD_MSG
    audio.fail_open = False
    assert control(rig, pcm(R_PCM_PREPARE, 0))[0] == S_OK


# -- I/O -------------------------------------------------------------------------------------------


def tx(rig: DeviceRig, sid: int, frames: bytes, status_room: int = 8) -> tuple[int, int]:
    head, (out,) = rig.add_request(TX, [struct.pack("<I", sid) + frames], [status_room])
    return head, out


def test_io_bad_stream_wrong_direction_or_not_prepared_is_bad_msg(rig: DeviceRig) -> None:
    heads = [tx(rig, 0, bytes(16)), tx(rig, 1, bytes(16)), tx(rig, 7, bytes(16))]
    used = rig.kick(TX)
    assert used == [(h, 8) for h, _ in heads]
    for _, out in heads:
        assert struct.unpack("<II", rig.read(out, 8)) == (S_BAD_MSG, 0)
    # rx of the output stream: BAD_MSG too, status after the (unwritten) frames.
    head, (_data, status) = rig.add_request(RX, [struct.pack("<I", 0)], [16, 8])
    assert rig.kick(RX) == [(head, 8)]
    assert struct.unpack("<II", rig.read(status, 8)) == (S_BAD_MSG, 0)


def test_io_without_room_for_status_is_dropped_and_queue_goes_on(rig: DeviceRig) -> None:
    head, _ = tx(rig, 0, bytes(16), status_room=7)
    assert rig.kick(TX) == [(head, 0)]
    head2, _out = tx(rig, 0, bytes(16))
    assert rig.kick(TX) == [(head2, 8)]


def test_io_header_short_is_bad_msg(rig: DeviceRig) -> None:
    head, (out,) = rig.add_request(TX, [b"\x00\x00"], [8])
    assert rig.kick(TX) == [(head, 8)]
    assert struct.unpack("<I", rig.read(out, 4))[0] == S_BAD_MSG


def test_playback_reaches_the_backend_in_order(rig: DeviceRig, audio: RecordingAudio) -> None:
    assert control(rig, set_params(0))[0] == S_OK
    assert control(rig, pcm(R_PCM_PREPARE, 0))[0] == S_OK
    # Buffers queued while PREPAREd (the Linux driver sends them before START)
    # wait for START.
    chunks = [bytes([i]) * 960 for i in range(4)]
    outs = [tx(rig, 0, c) for c in chunks]
    assert rig.kick(TX) == []
    assert control(rig, pcm(R_PCM_START, 0))[0] == S_OK
    used = wait_used(rig, TX, 4)
    assert used == [(h, 8) for h, _ in outs]
    assert bytes(audio.ports[0].played) == b"".join(chunks)
    for _, out in outs:
        assert struct.unpack("<I", rig.read(out, 4))[0] == S_OK


def test_capture_fills_frames_then_status(rig: DeviceRig) -> None:
    prepare_and_start(rig, 1)
    head, (data, status) = rig.add_request(RX, [struct.pack("<I", 1)], [960, 8])
    rig.kick(RX)
    assert wait_used(rig, RX, 1) == [(head, 968)]
    assert rig.read(data, 960) == bytes(i & 0xFF for i in range(960))
    assert struct.unpack("<I", rig.read(status, 4))[0] == S_OK


def test_period_elapsed_events(rig: DeviceRig) -> None:
    events = [rig.add_request(EVT, [], [8]) for _ in range(4)]
    assert rig.kick(EVT) == []  # held until there is something to say
    prepare_and_start(rig, 0, period=960)
    for _ in range(3):
        tx(rig, 0, bytes(960))
    rig.kick(TX)
    wait_used(rig, TX, 3)
    used = rig.used(EVT)
    assert [u[1] for u in used] == [8, 8, 8]
    for (head, (out,)), (uhead, _) in zip(events, used, strict=False):
        assert head == uhead
        assert struct.unpack("<II", rig.read(out, 8)) == (EVT_PCM_PERIOD_ELAPSED, 0)


def test_xrun_event_when_a_started_stream_runs_dry(rig: DeviceRig) -> None:
    rig.add_request(EVT, [], [8])
    rig.kick(EVT)
    # A 1-frame period (48 kHz): the stream is dry after a few microseconds.
    prepare_and_start(rig, 0, period=4, buffer=8, features=1 << PCM_F_EVT_XRUNS)
    tx(rig, 0, bytes(4))
    rig.kick(TX)
    wait_used(rig, TX, 1)
    # The period event came with the completion; wait for the xrun.
    dev = rig.device
    assert isinstance(dev, SoundDevice)
    while dev.events_sent[EVT_PCM_XRUN] == 0:
        rig.add_request(EVT, [], [8])
        rig.kick(EVT)
        rig.complete_workers()
    assert dev.events_sent[EVT_PCM_XRUN] == 1


def test_release_completes_pending_io_before_its_answer(rig: DeviceRig, audio: RecordingAudio) -> None:
    assert control(rig, set_params(0))[0] == S_OK
    assert control(rig, pcm(R_PCM_PREPARE, 0))[0] == S_OK
    outs = [tx(rig, 0, bytes(960)) for _ in range(3)]
    rig.kick(TX)
    head, (out,) = rig.add_request(CTL, [pcm(R_PCM_RELEASE, 0)], [4])
    rig.kick(CTL)
    rig.complete_workers()
    # §5.14.6.6.5.1: every pending I/O message completed; then RELEASE answered.
    assert rig.used(TX) == [(h, 8) for h, _ in outs]
    assert rig.used(CTL) == [(head, 4)]
    assert struct.unpack("<I", rig.read(out, 4))[0] == S_OK
    assert audio.ports[0].closed


def test_backend_io_error_is_io_err_and_other_stream_goes_on(rig: DeviceRig, audio: RecordingAudio) -> None:
    prepare_and_start(rig, 0)
    prepare_and_start(rig, 1)
    audio.fail_io = True
    head, out = tx(rig, 0, bytes(960))
    rig.kick(TX)
    assert wait_used(rig, TX, 1) == [(head, 8)]
    assert struct.unpack("<I", rig.read(out, 4))[0] == S_IO_ERR
    audio.fail_io = False
    head, (_data, _status) = rig.add_request(RX, [struct.pack("<I", 1)], [64, 8])
    rig.kick(RX)
    assert wait_used(rig, RX, 1) == [(head, 72)]
    head, out = tx(rig, 0, bytes(960))
    rig.kick(TX)
    assert wait_used(rig, TX, 1) == [(head, 8)]
    assert struct.unpack("<I", rig.read(out, 4))[0] == S_OK


# -- quiesce and reset -----------------------------------------------------------------------------


def test_quiesce_answers_waiting_io_and_returns_event_buffers(rig: DeviceRig) -> None:
    dev = rig.device
    assert isinstance(dev, SoundDevice)
    for _ in range(3):
        rig.add_request(EVT, [], [8])
    rig.kick(EVT)
    assert rig.queues[EVT].next_avail() == 3
    dev.quiesce(EVT)
    # The held event buffers go back to the avail ring, not consumed.
    assert rig.queues[EVT].next_avail() == 0
    assert rig.used(EVT) == []
    assert control(rig, set_params(0))[0] == S_OK
    assert control(rig, pcm(R_PCM_PREPARE, 0))[0] == S_OK
    outs = [tx(rig, 0, bytes(960)) for _ in range(2)]
    rig.kick(TX)
    dev.quiesce(TX)
    assert rig.used(TX) == [(h, 8) for h, _ in outs]
    for _, out in outs:
        assert struct.unpack("<I", rig.read(out, 4))[0] == S_IO_ERR


def test_quiesce_gives_back_resubmitted_event_buffers_not_the_entry_behind(rig: DeviceRig) -> None:
    """After a reconnect the event buffers in flight are resubmitted (their pops do
    not advance next_avail): held and given back at quiesce, they carry the next
    events, and the buffer the previous back-end already used (the avail entry
    behind next_avail) is not written again (VIRTIO 1.2 §2.7.13)."""
    (a, (out_a,)), (b, (out_b,)), (_, (out_x,)) = [rig.add_request(EVT, [], [8]) for _ in range(3)]
    rig.reconnect(EVT, in_flight=[a, b])  # the third was used before the reconnect
    rig.memory.write(out_x, b"\xee" * 8)
    assert rig.kick(EVT) == []
    dev = rig.device
    assert isinstance(dev, SoundDevice)
    dev.quiesce(EVT)
    assert rig.queues[EVT].next_avail() == 3
    assert rig.kick(EVT) == []
    prepare_and_start(rig, 0, period=960)
    for _ in range(2):
        tx(rig, 0, bytes(960))
    rig.kick(TX)
    wait_used(rig, TX, 2)
    assert rig.used(EVT) == [(a, 8), (b, 8)]
    for out in (out_a, out_b):
        assert struct.unpack("<II", rig.read(out, 8)) == (EVT_PCM_PERIOD_ELAPSED, 0)
    assert rig.read(out_x, 8) == b"\xee" * 8


def test_reset_stops_workers_and_closes_ports(audio: RecordingAudio) -> None:
    rig = DeviceRig(SoundDevice(audio), queue_size=64, memory_size=4 << 20)
    prepare_and_start(rig, 0)
    prepare_and_start(rig, 1)
    dev = rig.device
    assert isinstance(dev, SoundDevice)
    threads = [s.worker.thread for s in dev.streams if s.worker is not None]
    assert len(threads) == 2
    rig.close()
    assert not any(t.is_alive() for t in threads)
    assert audio.ports[0].closed and audio.ports[1].closed
    assert [s.state for s in dev.streams] == [PcmState.SET_PARAMETERS] * 2


def test_reset_with_a_blocked_port_aborts_it(audio: RecordingAudio) -> None:
    rig = DeviceRig(SoundDevice(audio), queue_size=64, memory_size=4 << 20)
    prepare_and_start(rig, 0)
    audio.ports[0].gate.clear()  # the next play blocks until aborted
    tx(rig, 0, bytes(960))
    rig.kick(TX)
    rig.close()  # must not hang: settle aborts the port
    assert audio.ports[0].closed


# -- the null backend ------------------------------------------------------------------------------


@pytest.mark.parametrize("pumps", [True, False], ids=["compiled-poll", "callback"])
def test_null_backend_paces_playback_and_records_silence(pumps: bool) -> None:
    # The null backend's ports never block: the device paces them with a timerfd
    # per stream (no thread), served in compiled code by a loop that runs pumps
    # and through the reader callback by any other; the fake clock shows the
    # pacing exactly.
    loop = FakeLoop()
    audio = NullAudio(clock=loop.clock)
    dev = SoundDevice(audio, clock=loop.clock)
    with DeviceRig(dev, queue_size=64, memory_size=4 << 20, loop=loop) as rig:
        # 8 kHz mono S16: 16000 bytes/s; buffers of 160 bytes last 10 ms.
        prepare_and_start(rig, 0, buffer=640, period=160, channels=1, rate=1)
        prepare_and_start(rig, 1, buffer=640, period=160, channels=1, rate=1)
        outs = [tx(rig, 0, b"\x55" * 160) for _ in range(3)]
        assert rig.kick(TX) == []
        heads = [rig.add_request(RX, [struct.pack("<I", 1)], [160, 8]) for _ in range(2)]
        assert rig.kick(RX) == []
        done_tx: list[tuple[int, int]] = []
        done_rx: list[tuple[int, int]] = []
        for step in range(3):
            rig.clock.advance(0.0099)
            run_due(rig, pumps=pumps)
            # Not a buffer completes before its 10 ms are over...
            assert rig.used(TX) == [] and rig.used(RX) == []
            rig.clock.advance(0.0001)
            run_due(rig, pumps=pumps)
            # ...and each completes when they are, one per stream per 10 ms.
            done_tx += rig.used(TX)
            done_rx += rig.used(RX)
            assert len(done_tx) == step + 1
            assert len(done_rx) == min(step + 1, 2)
        assert done_tx == [(h, 8) for h, _ in outs]
        assert done_rx == [(h, 168) for h, _ in heads]
        for _, (data, status) in heads:
            assert rig.read(data, 160) == bytes(160)
            assert struct.unpack("<I", rig.read(status, 4))[0] == S_OK
        # latency_bytes: the bytes queued behind each buffer when it completed.
        assert [struct.unpack("<II", rig.read(out, 8))[1] for _, out in outs] == [320, 160, 0]
        # Every completion counted, as the Python path counts its own.
        assert dev.chains_served >= 5
        # Stopped and released: the timer is disarmed.
        assert control(rig, pcm(R_PCM_STOP, 0))[0] == S_OK
        assert control(rig, pcm(R_PCM_RELEASE, 0))[0] == S_OK
        worker = dev.streams[0].worker
        assert isinstance(worker, _TimerStream)
        assert worker.timer.wakeup < 0
        # Every period was served by the compiled path: Python never had to go on.
        assert worker.timer.pumped >= 3 and worker.timer.handed_over == 0
    audio.close()


def test_null_backend_xrun_after_a_dry_period() -> None:
    loop = FakeLoop()
    dev = SoundDevice(NullAudio(clock=loop.clock), clock=loop.clock)
    with DeviceRig(dev, queue_size=64, memory_size=4 << 20, loop=loop) as rig:
        head, (ev,) = rig.add_request(EVT, [], [8])
        rig.kick(EVT)
        prepare_and_start(rig, 0, buffer=640, period=320, channels=1, rate=1, features=1 << PCM_F_EVT_XRUNS)
        tx(rig, 0, bytes(160))
        rig.kick(TX)
        rig.clock.advance(0.010)
        run_due(rig)
        assert len(rig.used(TX)) == 1
        # Dry for less than a period (20 ms): nothing; for a period: XRUN.
        rig.clock.advance(0.019)
        run_due(rig)
        assert rig.used(EVT) == []
        rig.clock.advance(0.001)
        run_due(rig)
        ((got, used),) = rig.used(EVT)
        assert (got, used) == (head, 8)
        assert struct.unpack("<II", rig.read(ev, 8)) == (EVT_PCM_XRUN, 0)
        # The completion before it was on time: the driver's refill was late.
        worker = dev.streams[0].worker
        assert isinstance(worker, _TimerStream)
        assert worker.timer.lateness()[2:] == (0, 1)
        # A completion that comes a period late (the device's wake-up late) and
        # then a dry period: the device's lateness held the refill back.
        tx(rig, 0, bytes(160))
        rig.kick(TX)
        rig.clock.advance(0.010 + 0.030)
        run_due(rig)
        rig.add_request(EVT, [], [8])
        rig.clock.advance(0.020)
        run_due(rig)
        assert worker.timer.lateness()[2:] == (1, 1)


# -- property tests --------------------------------------------------------------------------------

_CODES = [R_PCM_SET_PARAMS, R_PCM_PREPARE, R_PCM_START, R_PCM_STOP, R_PCM_RELEASE]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(_CODES), st.integers(0, 2)), max_size=25))
def test_random_control_sequences_follow_the_state_machine(ops: list[tuple[int, int]]) -> None:
    # Every request is answered; OK exactly when the model allows the transition,
    # BAD_MSG otherwise; the device's state always equals the model's.
    with DeviceRig(SoundDevice(RecordingAudio()), queue_size=64, memory_size=4 << 20) as rig:
        model = [PcmState.SET_PARAMETERS, PcmState.SET_PARAMETERS]
        for code, sid in ops:
            request = set_params(sid) if code == R_PCM_SET_PARAMS else pcm(code, sid)
            status = control(rig, request)[0]
            if sid >= 2:
                assert status == S_BAD_MSG
                continue
            allowed, new = PcmState.TRANSITIONS[code]
            if model[sid] in allowed:
                assert status == S_OK
                model[sid] = new
            else:
                assert status == S_BAD_MSG
            assert [state(rig, 0), state(rig, 1)] == model


@settings(max_examples=60, deadline=None)
@given(
    st.binary(max_size=40),
    st.integers(1, 300),
    st.binary(max_size=24),
    st.integers(1, 32),
    st.sampled_from([TX, RX]),
)
def test_random_control_and_io_headers_never_break_the_device(
    ctl_bytes: bytes, reply: int, io_bytes: bytes, room: int, io_queue: int
) -> None:
    with DeviceRig(SoundDevice(RecordingAudio()), queue_size=64, memory_size=4 << 20) as rig:
        head, _ = rig.add_request(CTL, [ctl_bytes] if ctl_bytes else [], [reply])
        used = rig.kick(CTL)
        while not used:
            rig.complete_workers()
            used = rig.used(CTL)
        assert used[0][0] == head
        assert used[0][1] <= reply
        assert used[0][1] == 0 or used[0][1] >= 4
        head, _ = rig.add_request(io_queue, [io_bytes] if io_bytes else [], [room])
        used = rig.kick(io_queue)
        dev = rig.device
        assert isinstance(dev, SoundDevice)
        if all(s.state not in PcmState.IO_STATES for s in dev.streams):
            # Nothing prepared: answered at once (BAD_MSG, or 0 without room).
            assert used == [(head, 8 if room >= 8 else 0)]
        assert dev.broken is None
        # And the device still answers.
        assert control(rig, struct.pack("<IIII", R_PCM_INFO, 0, 1, 32), 36)[0] == S_OK


def test_null_backend_quiesce_answers_or_resumes_the_buffer_in_progress() -> None:
    loop = FakeLoop()
    dev = SoundDevice(NullAudio(clock=loop.clock), clock=loop.clock)
    with DeviceRig(dev, queue_size=64, memory_size=4 << 20, loop=loop) as rig:
        prepare_and_start(rig, 0, buffer=640, period=160, channels=1, rate=1)
        first, _ = tx(rig, 0, bytes(160))
        rig.kick(TX)
        rig.clock.advance(0.005)
        # The control queue taken back: the buffer in progress waits and then
        # plays in full (10 ms from when it resumes).
        dev.quiesce(CTL)
        run_due(rig)
        assert rig.used(TX) == []
        rig.clock.advance(0.0099)
        run_due(rig)
        assert rig.used(TX) == []
        rig.clock.advance(0.0001)
        run_due(rig)
        assert rig.used(TX) == [(first, 8)]
        # The tx queue taken back: its buffer in progress is answered IO_ERR now.
        second, out2 = tx(rig, 0, bytes(160))
        rig.kick(TX)
        dev.quiesce(TX)
        assert rig.used(TX) == [(second, 8)]
        assert struct.unpack("<I", rig.read(out2, 4))[0] == S_IO_ERR
        # Nothing of it is left to complete later.
        rig.clock.advance(1)
        run_due(rig)
        assert rig.used(TX) == []


# -- the compiled path of a loop-paced stream ---------------------------------------------------------


def _driver_would_kick(rig: DeviceRig, index: int, event_idx: bool) -> bool:
    """Whether a driver adding one buffer now kicks (VIRTIO 1.2 §2.7.10)."""
    mock = rig.mocks[index]
    old = mock.avail_idx()
    if event_idx:
        # vring_need_event(avail_event, new, old) with new = old + 1
        return (old + 1 - mock.avail_event() - 1) & 0xFFFF < 1
    return not mock.used_flags() & 1


@pytest.mark.parametrize("event_idx", [False, True])
def test_null_stream_suppresses_kicks_only_while_a_buffer_plays(event_idx: bool) -> None:
    # While a buffer plays, the timer at its end looks at the ring: a kick would
    # be a wasted wake-up.  Once the stream ran dry, the driver must kick again
    # (VIRTIO 1.2 §2.7.10), or a buffer it adds then would never be played.
    loop = FakeLoop()
    dev = SoundDevice(NullAudio(clock=loop.clock), clock=loop.clock)
    with DeviceRig(dev, queue_size=64, memory_size=4 << 20, loop=loop, event_idx=event_idx) as rig:
        prepare_and_start(rig, 0, buffer=640, period=160, channels=1, rate=1)
        assert _driver_would_kick(rig, TX, event_idx)
        first, _ = tx(rig, 0, bytes(160))
        rig.kick(TX)
        assert not _driver_would_kick(rig, TX, event_idx)
        # Added without a kick while the first plays: taken at its end, played next.
        second, _ = tx(rig, 0, bytes(160))
        rig.clock.advance(0.010)
        run_due(rig)
        assert rig.used(TX) == [(first, 8)]
        assert not _driver_would_kick(rig, TX, event_idx)
        rig.clock.advance(0.010)
        run_due(rig)
        assert rig.used(TX) == [(second, 8)]
        # Dry: the driver is asked to kick for the next one.
        assert _driver_would_kick(rig, TX, event_idx)


def test_null_stream_keeps_the_rate_when_its_timer_is_late() -> None:
    # Each buffer held when the one before ended starts at that end, not when the
    # (late) timer ran: 10 buffers of 10 ms end at 100 ms whatever the lateness.
    loop = FakeLoop()
    dev = SoundDevice(NullAudio(clock=loop.clock), clock=loop.clock)
    with DeviceRig(dev, queue_size=64, memory_size=4 << 20, loop=loop) as rig:
        prepare_and_start(rig, 0, buffer=640, period=160, channels=1, rate=1)
        t0 = rig.clock()
        for _ in range(4):
            tx(rig, 0, bytes(160))
        rig.kick(TX)
        done = 0
        while done < 10:
            rig.clock.advance(0.0103)  # each wake-up 0.3 ms after its deadline, or more
            run_due(rig)
            got = rig.used(TX)
            for _ in got:
                if done + 4 < 10:
                    tx(rig, 0, bytes(160))
            done += len(got)
        worker = dev.streams[0].worker
        assert worker is not None
        # Completed no later than the wake-up after the 100 ms of audio.
        assert rig.clock() - t0 < 0.100 + 0.0103


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([0, 1, 7]), st.integers(0, 64), st.integers(0, 24), st.booleans()),
        min_size=1,
        max_size=6,
    )
)
def test_compiled_and_python_paths_answer_the_same(messages: list[tuple[int, int, int, bool]]) -> None:
    # The same I/O messages (stream id, frame bytes, writable room, header cut
    # short) through the null backend paced by the loop (the compiled path) and
    # through a worker thread (the Python path): the same used lengths and status
    # words, in the same order; and silence in every recorded frame.
    results = []
    for loop_paced in (True, False):
        loop = FakeLoop()
        audio = NullAudio(clock=loop.clock, loop_paced=loop_paced)
        dev = SoundDevice(audio, clock=loop.clock)
        with DeviceRig(dev, queue_size=64, memory_size=4 << 20, loop=loop) as rig:
            # 8 kHz mono S16: 4 frame bytes last 0.25 ms.
            prepare_and_start(rig, 0, buffer=640, period=160, channels=1, rate=1)
            prepare_and_start(rig, 1, buffer=640, period=160, channels=1, rate=1)
            out = []
            for sid, frames, room, short in messages:
                for q in (TX, RX):
                    hdr = struct.pack("<I", sid)[: 2 if short else 4]
                    if q == TX:
                        head, outs = rig.add_request(TX, [hdr + bytes(frames)], [room] if room else [])
                    else:
                        head, outs = rig.add_request(RX, [hdr], [frames, room] if room else [frames])
                    got = rig.kick(q)
                    if loop_paced:
                        while not got:
                            rig.clock.advance(0.001)
                            run_due(rig)
                            got = rig.used(q)
                    elif not got:
                        got = wait_used(rig, q, 1)
                    ((h, used),) = got
                    status = rig.read(outs[-1] + room - 8, 8) if room >= 8 else b""
                    if q == RX and room >= 8 and used > 8:
                        assert rig.read(outs[0], frames) == bytes(frames)
                    out.append((h == head, used, status[:4]))
            results.append(out)
        audio.close()
    assert results[0] == results[1]


@pytest.mark.parametrize("event_idx", [False, True])
def test_event_buffers_added_without_a_kick_are_taken_when_needed(event_idx: bool) -> None:
    # While the device holds event buffers the driver need not kick for more
    # (VIRTIO 1.2 §2.7.10); the device takes them from the ring when an event
    # finds none held, and asks for kicks only when an event finds none at all.
    loop = FakeLoop()
    dev = SoundDevice(NullAudio(clock=loop.clock), clock=loop.clock)
    with DeviceRig(dev, queue_size=64, memory_size=4 << 20, loop=loop, event_idx=event_idx) as rig:
        first, _ = rig.add_request(EVT, [], [8])
        rig.kick(EVT)
        assert not _driver_would_kick(rig, EVT, event_idx)
        later = [rig.add_request(EVT, [], [8])[0] for _ in range(2)]  # no kick
        prepare_and_start(rig, 0, buffer=640, period=160, channels=1, rate=1)
        for _ in range(5):
            tx(rig, 0, bytes(160))
        rig.kick(TX)
        for _ in range(3):
            rig.clock.advance(0.010)
            run_due(rig)
        assert [h for h, _ in rig.used(EVT)] == [first, *later]
        assert dev.events_sent[EVT_PCM_PERIOD_ELAPSED] == 3
        assert not _driver_would_kick(rig, EVT, event_idx)
        fourth, _ = rig.add_request(EVT, [], [8])  # no kick
        rig.clock.advance(0.010)
        run_due(rig)
        assert [h for h, _ in rig.used(EVT)] == [fourth]
        # An event that finds no buffer waits, and the driver is asked to kick.
        rig.clock.advance(0.010)
        run_due(rig)
        assert rig.used(EVT) == []
        assert _driver_would_kick(rig, EVT, event_idx)
        fifth, (ev,) = rig.add_request(EVT, [], [8])
        assert rig.kick(EVT) == [(fifth, 8)]
        assert struct.unpack("<II", rig.read(ev, 8)) == (EVT_PCM_PERIOD_ELAPSED, 0)


# -- the compiled kick, event queue and timer ---------------------------------------------------------


def _null_rig(event_idx: bool = False) -> tuple[DeviceRig, SoundDevice]:
    loop = FakeLoop()
    dev = SoundDevice(NullAudio(clock=loop.clock), clock=loop.clock)
    return DeviceRig(dev, queue_size=64, memory_size=4 << 20, loop=loop, event_idx=event_idx), dev


def test_kicks_of_a_paced_stream_are_served_without_process_queue() -> None:
    rig, dev = _null_rig()
    with rig:
        kick = dev.kick_pump(TX)
        assert kick is not None and dev.kick_pump(CTL) is None
        # No stream yet: the kick goes to process_queue (answer 1).
        assert kick.pump() is True
        prepare_and_start(rig, 0, buffer=640, period=160, channels=1, rate=1)
        head, _ = tx(rig, 0, bytes(160))
        # The stream serves its queue: the kick is taken in compiled code (0)
        # and the message plays; its end completes it.
        assert kick.pump() is False
        assert rig.used(TX) == []
        rig.clock.advance(0.010)
        run_due(rig)
        assert rig.used(TX) == [(head, 8)]
        # A message it does not serve (a stream id out of range) is left for the
        # Python path: the kick answers 1 and process_queue answers BAD_MSG.
        bad, out = tx(rig, 9, bytes(16))
        assert kick.pump() is True
        dev.process_queue(TX)
        assert rig.used(TX) == [(bad, 8)]
        assert struct.unpack("<II", rig.read(out, 8)) == (S_BAD_MSG, 0)


def test_a_bad_event_buffer_is_a_guest_fault_and_events_go_on() -> None:
    # VIRTIO 1.2 §5.14.6.9: an event buffer is 8 device-writable bytes; one with
    # a device-readable part is returned unused (used length 0) by the Python
    # path, and the next buffer gets the event.
    rig, dev = _null_rig()
    with rig:
        prepare_and_start(rig, 0, buffer=640, period=160, channels=1, rate=1)
        bad, _ = rig.add_request(EVT, [b"x"], [8])
        good, (ev,) = rig.add_request(EVT, [], [8])
        # Added without a kick: the first event takes them from the ring.
        tx(rig, 0, bytes(160))
        rig.kick(TX)
        rig.clock.advance(0.010)
        run_due(rig)
        assert rig.used(EVT) == [(bad, 0), (good, 8)]
        assert struct.unpack("<II", rig.read(ev, 8)) == (EVT_PCM_PERIOD_ELAPSED, 0)
        assert dev.events_sent[EVT_PCM_PERIOD_ELAPSED] == 1
        assert dev.broken is None


def test_events_without_buffers_wait_and_the_oldest_are_dropped() -> None:
    rig, dev = _null_rig()
    with rig:
        events = dev.events
        assert events is not None
        for i in range(70):
            assert events.send(EVT_PCM_PERIOD_ELAPSED, i) is False
        assert events.pending == 64
        head, (ev,) = rig.add_request(EVT, [], [8])
        # The oldest 6 were dropped: the first buffer gets the 7th.
        assert rig.kick(EVT) == [(head, 8)]
        assert struct.unpack("<II", rig.read(ev, 8)) == (EVT_PCM_PERIOD_ELAPSED, 6)
        assert events.pending == 63


def test_stream_timer_lateness_counts_start_empty() -> None:
    rig, dev = _null_rig()
    with rig:
        prepare_and_start(rig, 0, buffer=640, period=160, channels=1, rate=1)
        worker = dev.streams[0].worker
        assert isinstance(worker, _TimerStream)
        # A fake clock: nothing is counted (the wake-ups are the test's).
        assert worker.timer.lateness() == ([0, 0, 0, 0, 0], 0.0, 0, 0)
        assert worker.timer.fileno() >= 0
    # Reset closed the timerfd.
    assert worker.timer.fileno() == -1


# -- the null stream's periods without the GIL ---------------------------------------------------


class _SignallerInterrupt:
    """An interrupt whose queues have compiled signallers (as vhost-user's rings):
    one call eventfd per queue."""

    def __init__(self) -> None:
        self.sigs = [Signaller() for _ in range(4)]
        for sig in self.sigs:
            sig.set_fd(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))

    def signal_used(self, queue_index: int) -> None:
        self.sigs[queue_index]()

    def signaller(self, queue_index: int) -> Signaller:
        return self.sigs[queue_index]

    def signal_config_change(self) -> None:
        raise AssertionError("not used")


class _RealLoop(EventLoop):
    """The vhost-user loop, with the clock DeviceRig asks a loop for."""

    clock = staticmethod(time.monotonic)


def test_null_stream_periods_served_by_the_nogil_pump() -> None:
    """Under the vhost-user loop with compiled signallers, a null stream's periods
    (the completion, the status, the used ring, the driver's call, PERIOD_ELAPSED,
    taking what the driver added meanwhile) run in the timer's nogil pump; a
    message whose status lies across two buffers goes to the GIL path, which
    answers it as before (VIRTIO 1.2 §5.14.6.8)."""
    intr = _SignallerInterrupt()
    with _RealLoop() as loop:
        dev = SoundDevice(NullAudio())
        rig = DeviceRig(dev, queue_size=64, memory_size=4 << 20, loop=loop, interrupt=intr)  # type: ignore[arg-type]
        with rig:
            events = [rig.add_request(EVT, [], [8]) for _ in range(8)]
            rig.kick(EVT)
            # 8 kHz mono S16: buffers of 160 bytes (one period) last 10 ms.
            prepare_and_start(rig, 0, buffer=640, period=160, channels=1, rate=1)
            prepare_and_start(rig, 1, buffer=640, period=160, channels=1, rate=1)
            outs = [tx(rig, 0, b"\x55" * 160)]
            rig.kick(TX)
            ins = [rig.add_request(RX, [struct.pack("<I", 1)], [160, 8])]
            rig.kick(RX)
            # Added without a kick (the device suppressed them while one plays):
            # the timer takes them at the first period's end.
            outs += [tx(rig, 0, b"\x55" * 160) for _ in range(2)]
            split = rig.add_request(TX, [struct.pack("<I", 0) + bytes(160)], [4, 4])
            ins += [rig.add_request(RX, [struct.pack("<I", 1)], [160, 8]) for _ in range(3)]
            done: dict[int, list[tuple[int, int]]] = {TX: [], RX: []}

            def on_call(q: int) -> Callable[[], None]:
                def cb() -> None:
                    os.eventfd_read(intr.sigs[q].call_fd)
                    done[q] += rig.used(q)
                    if len(done[TX]) == 4 and len(done[RX]) == 4:
                        loop.stop()

                return cb

            loop.add_reader(intr.sigs[TX].call_fd, on_call(TX))
            loop.add_reader(intr.sigs[RX].call_fd, on_call(RX))
            loop.run(timeout=30)
            loop.remove_reader(intr.sigs[TX].call_fd)
            loop.remove_reader(intr.sigs[RX].call_fd)
            assert [h for h, _ in done[TX]] == [h for h, _ in outs[:3]] + [split[0]]
            assert done[TX] == [(h, 8) for h, _ in done[TX]]
            assert done[RX] == [(h, 168) for h, _ in ins]
            for _, out in outs:
                assert struct.unpack("<I", rig.read(out, 4))[0] == S_OK
            lo, hi = split[1]
            assert rig.read(lo, 4) + rig.read(hi, 4) == struct.pack("<I", S_OK) + struct.pack("<I", 0)
            for _, (data, status) in ins:
                assert rig.read(data, 160) == bytes(160)
                assert struct.unpack("<I", rig.read(status, 4))[0] == S_OK
            # One PERIOD_ELAPSED per message, each in a buffer of the driver's.
            evq = dev.events
            assert evq is not None and evq.period_elapsed_sent == 8
            sent = rig.used(EVT)
            assert [h for h, _ in sent] == [h for h, _ in events]
            codes = {struct.unpack("<I", rig.read(out, 4))[0] for _, (out,) in events}
            assert codes == {EVT_PCM_PERIOD_ELAPSED}
            timers = []
            for stream in dev.streams[:2]:
                assert isinstance(stream.worker, _TimerStream)
                timers.append(stream.worker.timer)
            assert all(t.offers_nogil for t in timers)
            # Python never had to go on.  How many wake-ups served the periods is
            # the scheduler's: a wake-up that comes late (the loop started after
            # the first period ended, or was kept from the CPU) serves every
            # period due at once.  What does not depend on it: every wake-up of
            # the capture stream's timer went through the nogil pump, and the
            # playback stream's took the GIL (pump_c) only for its first take and
            # the split message.
            assert all(t.handed_over == 0 for t in timers)
            assert timers[1].pumped == timers[1].pumped_nogil >= 1
            assert 1 <= timers[0].pumped - timers[0].pumped_nogil <= 2
    for sig in intr.sigs:
        sig.set_fd(-1)


def test_timer_without_a_compiled_signaller_offers_no_nogil_path() -> None:
    with _RealLoop() as loop:
        dev = SoundDevice(NullAudio())
        with DeviceRig(dev, queue_size=64, memory_size=4 << 20, loop=loop) as rig:  # type: ignore[arg-type]
            prepare_and_start(rig, 0)
            worker = dev.streams[0].worker
            assert isinstance(worker, _TimerStream)
            assert not worker.timer.offers_nogil


def test_rt_priority_gives_the_activating_thread_sched_fifo() -> None:
    """rt_priority (our addition): activate, on the loop's thread, asks for SCHED_FIFO
    for that thread alone; a host that refuses it leaves the device working."""
    got: list[tuple[int, int]] = []

    def activate() -> None:
        dev = SoundDevice(NullAudio(), rt_priority=5)
        with DeviceRig(dev, queue_size=64, memory_size=4 << 20) as rig:
            got.append((os.sched_getscheduler(0), os.sched_getparam(0).sched_priority))
            assert control(rig, pcm(R_PCM_PREPARE, 0))[0] == S_OK

    thread = threading.Thread(target=activate)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    if got[0][0] != os.SCHED_FIFO:
        pytest.skip("this host refuses SCHED_FIFO (no CAP_SYS_NICE): the device went on without it")
    assert got == [(os.SCHED_FIFO, 5)]
    assert os.sched_getscheduler(0) != os.SCHED_FIFO  # the test's own thread untouched
