"""virtio-sound (VIRTIO 1.2 §5.14), as vhost-device-sound serves it.

Identity as rust-vmm/vhost-device ``vhost-device-sound``: device id 25, four queues
(control 0, event 1, tx 2, rx 3; VIRTIO 1.2 §5.14.2) of at most 1024 entries
(upstream: 64, which QEMU 10's vhost-user-snd-pci exceeds), no
device feature bits, the common transport features.  Two PCM streams: 0 is output
(playback), 1 is input (capture), both on function group node 0, so a Linux guest
(virtio_snd) sees one PCM device ``hw:0,0`` with a playback and a capture substream.
The config space (§5.14.4) is ``jacks=0, streams=2, chmaps=6, controls=0``.

Control requests (§5.14.6), each answered with a ``virtio_snd_hdr`` status first in
the device-writable part, then its payload:

* ``JACK_INFO``, ``PCM_INFO``, ``CHMAP_INFO`` (§5.14.6.1, .4.1, .6.1, .7.1): items
  ``start_id .. start_id+count-1``, each written as ``size`` bytes (the driver's
  stride: the structure cut or zero-padded); a range outside the items, or a
  response buffer too small for them, is ``BAD_MSG``.  There are no jacks, so every
  ``JACK_INFO`` range is ``BAD_MSG`` (upstream the same).
* ``JACK_REMAP``: ``NOT_SUPP`` (no jack offers ``VIRTIO_SND_JACK_F_REMAP``).
* ``PCM_SET_PARAMS`` (§5.14.6.6.3): a stream id out of range, a request in a state
  that does not allow it, a zero period or a buffer smaller than a period:
  ``BAD_MSG``; a format, rate, channel count or feature bit outside what
  ``PCM_INFO`` offers: ``NOT_SUPP``.
* ``PCM_PREPARE``, ``PCM_START``, ``PCM_STOP``, ``PCM_RELEASE`` (§5.14.6.6.4-7): the
  state machine of §5.14.6.6.1 for every backend (upstream enforces it only in its
  ALSA, PipeWire and GStreamer backends): SET_PARAMETERS and PREPARE from
  {initial/SET_PARAMETERS, PREPARE, RELEASE}, START from {PREPARE, STOP}, STOP from
  {START}, RELEASE from {PREPARE, STOP}; anything else is ``BAD_MSG`` and the state
  does not change.  The backend's part of them (opening the host stream, starting,
  stopping, closing it) runs on the stream's worker thread; a backend error answers
  ``IO_ERR`` and leaves the state as it was (upstream panics).  RELEASE completes
  every pending I/O message of the stream before its own answer (§5.14.6.6.5.1:
  "The device MUST complete all pending I/O messages for the specified stream ID").
* any other code: ``NOT_SUPP``; a request shorter than its structure: ``BAD_MSG``.

I/O (§5.14.6.8): a tx chain is ``virtio_snd_pcm_xfer`` + frames (device-readable)
then ``virtio_snd_pcm_status`` (device-writable); an rx chain is the xfer header,
then the frames and the status (device-writable).  A message for a stream id out of
range, for a stream of the other direction, or for a stream that is not prepared,
started or stopped is answered ``BAD_MSG`` at once.  Others wait in the stream's
queue; while the stream is started, its worker thread hands them to the backend
one by one, which takes (plays) or fills (records) them at the stream's rate (a
backend whose calls never block, ``loop_paced`` like null, has no thread: a
timerfd per stream, served in compiled code inside the loop's poll, paces it and
completes each message when its duration is over), and
completes each with ``OK`` (``IO_ERR`` if the backend failed) and ``latency_bytes``:
the bytes queued before the device's output, or held by the host on input.  Used
length: 8 for tx, frames written + 8 for rx.

Notifications (§5.14.6.9): the driver's event buffers are held; while a stream is
started, ``PCM_PERIOD_ELAPSED`` is sent each time a period's worth of bytes
(``period_bytes``) went through, and ``PCM_XRUN`` when a started stream that
selected ``VIRTIO_SND_PCM_F_EVT_XRUNS`` ran dry for a whole period (an underrun or
an overrun).  Upstream never writes the event queue.  Events that find no buffer
wait (a few) for the next one.  The device takes event buffers from the ring when
an event needs one, so while it holds some the driver's kicks of the event queue
are suppressed (§2.7.10).

Nothing the guest sends can stop the device: a layout it cannot even answer (no
room for the status) is returned with used length 0 and logged, rate-limited.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from virtio_queue import DescriptorChain, GuestMemory, Queue, Reader, Writer
from virtio_queue.errors import GuestMemoryError, InvalidAvailRingIndex, InvalidDescriptorIndex, QueueError

from ._sound_fast import EventQueue, IoPacer, KickPump, StreamTimer
from .base import COMMON_FEATURES, EventLoop, Interrupt, VirtioDevice
from .errors import DeviceNeedsReset, MalformedRequest
from .hosts.audio import FORMAT_SAMPLE_BYTES, AudioBackend, AudioError, AudioPort, PcmParams

if TYPE_CHECKING:
    from ._pump import FdPump

__all__ = [
    "CHMAPS",
    "QUEUE_SIZE",
    "VIRTIO_ID_SOUND",
    "PcmState",
    "SoundDevice",
]

log = logging.getLogger(__name__)

#: VIRTIO 1.2 §5: sound device.
VIRTIO_ID_SOUND: Final = 25
#: The largest ring accepted.  Upstream accepts 64 at most (its comment: the Linux
#: driver drops messages it cannot queue, and 64 was enough), but QEMU 10's
#: vhost-user-snd-pci sets its rings to 1024 entries, which upstream's limit
#: refuses; the ring size is the front-end's choice, not the device's.
QUEUE_SIZE: Final = 1024
CONTROL_Q, EVENT_Q, TX_Q, RX_Q = 0, 1, 2, 3

# §5.14.6: request codes.
R_JACK_INFO, R_JACK_REMAP = 0x0001, 0x0002
R_PCM_INFO, R_PCM_SET_PARAMS, R_PCM_PREPARE, R_PCM_RELEASE, R_PCM_START, R_PCM_STOP = range(0x0100, 0x0106)
R_CHMAP_INFO = 0x0200
# §5.14.6.9: event codes.
EVT_JACK_CONNECTED, EVT_JACK_DISCONNECTED = 0x1000, 0x1001
EVT_PCM_PERIOD_ELAPSED, EVT_PCM_XRUN = 0x1100, 0x1101
# §5.14.6.1: status codes.
S_OK, S_BAD_MSG, S_NOT_SUPP, S_IO_ERR = 0x8000, 0x8001, 0x8002, 0x8003
# §5.14.6.6.1: directions.
D_OUTPUT, D_INPUT = 0, 1
# §5.14.6.6.2: PCM feature bits.
PCM_F_SHMEM_HOST, PCM_F_SHMEM_GUEST, PCM_F_MSG_POLLING, PCM_F_EVT_SHMEM_PERIODS, PCM_F_EVT_XRUNS = range(5)
# §5.14.6.6.2: formats and rates (the enum values; bit n of the PCM_INFO maps).
FMT_U8, FMT_S16, FMT_S24, FMT_S32, FMT_FLOAT = 4, 5, 15, 17, 19
RATE_8000, RATE_11025, RATE_16000, RATE_22050, RATE_32000, RATE_44100, RATE_48000 = range(1, 8)
RATE_88200, RATE_96000 = 9, 10
# §5.14.6.7: channel positions used by our maps.
CHMAP_MONO, CHMAP_FL, CHMAP_FR, CHMAP_RL, CHMAP_RR, CHMAP_FC, CHMAP_LFE = 2, 3, 4, 5, 6, 7, 8
CHMAP_MAX_SIZE = 18

#: Formats every backend offers (upstream: U8, S16, S24, S32; ours adds FLOAT).
DEFAULT_FORMATS = sum(1 << f for f in (FMT_U8, FMT_S16, FMT_S24, FMT_S32, FMT_FLOAT))
#: Rates every backend offers (upstream's seven, and 88.2/96 kHz).
DEFAULT_RATES = sum(
    1 << r
    for r in (
        RATE_8000,
        RATE_11025,
        RATE_16000,
        RATE_22050,
        RATE_32000,
        RATE_44100,
        RATE_48000,
        RATE_88200,
        RATE_96000,
    )
)
CHANNELS_MIN, CHANNELS_MAX = 1, 6
#: Feature bits offered in PCM_INFO: XRUN notifications.
PCM_FEATURES = 1 << PCM_F_EVT_XRUNS

#: The channel maps (direction, positions): mono, stereo and 5.1 for each direction,
#: all advertised in the config space, so every one is reachable by CHMAP_INFO.
CHMAPS: Final[tuple[tuple[int, tuple[int, ...]], ...]] = tuple(
    (d, p)
    for d in (D_OUTPUT, D_INPUT)
    for p in (
        (CHMAP_MONO,),
        (CHMAP_FL, CHMAP_FR),
        (CHMAP_FL, CHMAP_FR, CHMAP_RL, CHMAP_RR, CHMAP_FC, CHMAP_LFE),
    )
)

_HDR = struct.Struct("<I")
_QUERY = struct.Struct("<III")  # start_id, count, size (after the code)
_PCM_HDR = struct.Struct("<I")  # stream_id (after the code)
_SET_PARAMS = struct.Struct("<IIIIBBBx")  # stream_id, buffer, period, features, channels, format, rate
_PCM_INFO = struct.Struct("<IIQQBBB5x")  # hda_fn_nid, features, formats, rates, direction, ch min/max
_CHMAP_INFO_HEAD = struct.Struct("<IBB")  # hda_fn_nid, direction, channels; positions[18] follow
_STATUS = struct.Struct("<II")  # status, latency_bytes
_EVENT = struct.Struct("<II")  # code, data
#: How many events wait for a buffer at most; older ones are dropped first.
EVENT_BACKLOG = 64
#: How long teardown waits for a stream's worker (it aborts what blocks it first).
WORKER_JOIN_TIMEOUT = 5.0


class PcmState:
    """The PCM stream states of VIRTIO 1.2 §5.14.6.6.1 and the transitions allowed.

    ``SET_PARAMETERS`` is also the initial state (the stream has default
    parameters, as upstream's).
    """

    SET_PARAMETERS: Final = "SET_PARAMETERS"
    PREPARE: Final = "PREPARE"
    START: Final = "START"
    STOP: Final = "STOP"
    RELEASE: Final = "RELEASE"

    #: request code -> (states it is allowed from, the state it leads to).
    TRANSITIONS: Final[dict[int, tuple[frozenset[str], str]]] = {
        R_PCM_SET_PARAMS: (frozenset({SET_PARAMETERS, PREPARE, RELEASE}), SET_PARAMETERS),
        R_PCM_PREPARE: (frozenset({SET_PARAMETERS, PREPARE, RELEASE}), PREPARE),
        R_PCM_START: (frozenset({PREPARE, STOP}), START),
        R_PCM_STOP: (frozenset({START}), STOP),
        R_PCM_RELEASE: (frozenset({PREPARE, STOP}), RELEASE),
    }
    #: States in which I/O messages are taken (queued; played only in START).
    IO_STATES: Final = frozenset({PREPARE, START, STOP})


#: Upstream's default parameters (8192-byte buffer, 4096-byte periods, mono S16 44.1 kHz).
DEFAULT_PARAMS = PcmParams(8192, 4096, 0, 1, FMT_S16, RATE_44100)


@dataclass
class _Io:
    """One I/O message waiting for, or in, its stream's worker (``gen``: the
    queue's generation when it was popped; a completion of an older one is dropped)."""

    queue: int
    chain: DescriptorChain
    nbytes: int
    gen: int


@dataclass
class _Stream:
    """A PCM stream as the event loop sees it (the worker owns the port)."""

    id: int
    direction: int
    state: str = PcmState.SET_PARAMETERS
    params: PcmParams = DEFAULT_PARAMS
    worker: _StreamWorker | None = None
    io_queue: int = field(init=False)

    def __post_init__(self) -> None:
        self.io_queue = TX_Q if self.direction == D_OUTPUT else RX_Q


class _StreamWorker:
    """The thread that talks to a stream's backend port, so the loop never blocks.

    It runs, in order, the backend part of control requests (``ops``: open, start,
    stop, close the port) and, while the stream is started, the I/O messages
    (``ios``), each to its end.  Everything it has to tell the loop (a chain to
    complete, a state to commit, an event) is a callback in ``done``, posted with
    one ``call_soon_threadsafe`` per batch.  It touches only the chains it was given
    and its port; the loop touches neither while it has them.
    """

    def __init__(self, device: SoundDevice, stream: _Stream) -> None:
        assert device.loop is not None
        self._loop = device.loop
        self.device = device
        self.stream_id = stream.id
        self.direction = stream.direction
        self.params = stream.params
        self.cond = threading.Condition()
        self.ops: collections.deque[Callable[[], None]] = collections.deque()
        self.ios: collections.deque[_Io] = collections.deque()
        self.queued_bytes = 0
        self.port: AudioPort | None = None
        self.running = False
        self.busy = False
        self.hold = False
        self.stopping = False
        self._done: list[Callable[[], None]] = []
        self._posted = False
        self._period_pos = 0
        self._dry_armed = False
        self.thread = threading.Thread(target=self._run, name=f"snd-stream{stream.id}", daemon=True)
        self._start_thread()

    def _start_thread(self) -> None:
        self.thread.start()

    # -- called on the loop thread -------------------------------------------------------------
    def submit_op(self, op: Callable[[], None]) -> None:
        with self.cond:
            self.ops.append(op)
            self.cond.notify_all()

    def submit_io(self, io: _Io) -> None:
        with self.cond:
            self.ios.append(io)
            self.queued_bytes += io.nbytes
            self._dry_armed = False
            self.cond.notify_all()

    def take_ios(self) -> list[_Io]:
        """Remove and return the I/O messages not yet started."""
        with self.cond:
            taken = list(self.ios)
            self.ios.clear()
            self.queued_bytes = 0
            return taken

    def complete_held(self, status: int) -> None:
        """Complete every message not yet started with ``status`` and no frames
        (RELEASE, on the worker thread: the loop applies them)."""
        for io in self.take_ios():
            used = _write_io_status(io.chain, status, 0, 0)
            self.post(functools.partial(self.device._io_done, io, used, 0, self.stream_id))

    def take_ops(self) -> list[Callable[[], None]]:
        with self.cond:
            taken = list(self.ops)
            self.ops.clear()
            return taken

    def settle(self, timeout: float = WORKER_JOIN_TIMEOUT) -> bool:
        """Stop starting new work, abort the port's blocking call and wait for the
        work in hand to end (``hold`` stays set: :meth:`release_hold` undoes it)."""
        with self.cond:
            self.hold = True
            # Once held, an idle worker starts nothing: only a call in progress
            # needs cutting short (an abort of an idle port would cut the next one).
            port = self.port if self.busy else None
        if port is not None:
            port.abort()
        with self.cond:
            return self.cond.wait_for(lambda: not self.busy, timeout)

    def release_hold(self) -> None:
        with self.cond:
            self.hold = False
            self.cond.notify_all()

    def collect(self) -> list[Callable[[], None]]:
        """The callbacks posted so far (the loop runs them)."""
        with self.cond:
            done, self._done = self._done, []
            self._posted = False
            return done

    def shutdown(self) -> None:
        """End the thread and close the port (loop thread, at reset)."""
        self.settle()
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(WORKER_JOIN_TIMEOUT)
        if self.thread.is_alive():
            log.error("sound stream %d: worker did not stop within %s s", self.stream_id, WORKER_JOIN_TIMEOUT)
            return
        if self.port is not None:
            try:
                self.port.close()
            except Exception as e:  # the daemon goes on; the host keeps what it leaked
                log.error("sound stream %d: closing the backend stream failed: %s", self.stream_id, e)
            self.port = None

    # -- called on the worker thread -------------------------------------------------------------
    def post(self, callback: Callable[[], None]) -> None:
        with self.cond:
            self._done.append(callback)
            if self._posted:
                return
            self._posted = True
        self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        for callback in self.collect():
            callback()

    def _run(self) -> None:
        while True:
            with self.cond:
                item: Callable[[], None] | _Io | None = None
                while item is None:
                    if self.stopping:
                        return
                    if not self.hold:
                        if self.ops:
                            item = self.ops.popleft()
                            break
                        if self.running and self.ios:
                            io = self.ios.popleft()
                            self.queued_bytes -= io.nbytes
                            item = io
                            break
                    timeout = None
                    if self.running and not self.hold and self._dry_armed:
                        # One period of nothing to play or to fill: an xrun.
                        timeout = max(self.params.period_bytes / self.params.byte_rate, 0.001)
                    timed_out = not self.cond.wait(timeout) and timeout is not None
                    if timed_out and self._dry_armed and self.running and not self.ios and not self.hold:
                        self._dry_armed = False
                        if self.params.features & (1 << PCM_F_EVT_XRUNS):
                            self.post(
                                functools.partial(self.device._send_event, EVT_PCM_XRUN, self.stream_id)
                            )
                self.busy = True
            try:
                if isinstance(item, _Io):
                    self._transfer(item)
                else:
                    item()
            except Exception:  # a bug in a backend; the stream goes on
                log.exception("sound stream %d: worker item failed", self.stream_id)
            finally:
                with self.cond:
                    self.busy = False
                    self.cond.notify_all()

    def _transfer(self, io: _Io) -> None:
        """Play or record one message, write its status, post its completion."""
        port = self.port
        status = S_OK
        written = 0
        chain = io.chain
        try:
            if port is None:
                raise AudioError(f"stream {self.stream_id} has no open backend stream")
            if self.direction == D_OUTPUT:
                reader = chain.reader()
                reader.consume(_HDR.size)
                port.play(reader, io.nbytes)
            else:
                writer = chain.writer()
                xruns = port.xruns
                written = port.capture(writer, io.nbytes)
                if port.xruns != xruns and self.params.features & (1 << PCM_F_EVT_XRUNS):
                    # The host lost frames (an ALSA overrun) and recovered: the
                    # message is filled, the driver hears of the gap (§5.14.6.9).
                    self.post(functools.partial(self.device._send_event, EVT_PCM_XRUN, self.stream_id))
        except (AudioError, OSError) as e:
            status = S_IO_ERR
            log.error("sound stream %d: backend I/O failed: %s", self.stream_id, e)
        try:
            latency = self.queued_bytes if self.direction == D_OUTPUT else 0
            if port is not None:
                latency += port.latency_bytes()
        except (AudioError, OSError):
            latency = 0
        used = _write_io_status(chain, status, min(latency, 0xFFFFFFFF), written)
        periods = 0
        if status == S_OK and self.params.period_bytes:
            self._period_pos += io.nbytes
            periods, self._period_pos = divmod(self._period_pos, self.params.period_bytes)
        with self.cond:
            self._dry_armed = True
        self.post(functools.partial(self.device._io_done, io, used, periods, self.stream_id))


class _TimerStream(_StreamWorker):
    """A stream of a backend whose ports never block (``loop_paced``: null): no
    thread; its I/O messages are held and completed in compiled code
    (:class:`virtio_devices._sound_fast.IoPacer`), paced by a timerfd served in
    compiled code too (:class:`~virtio_devices._sound_fast.StreamTimer`: the
    vhost-user loop runs it inside its poll, with no Python frame per period),
    armed for the end of the message in progress.

    Each message lasts ``nbytes / byte_rate`` seconds after the previous one ends
    (or from when it is taken, when the stream ran dry); when it is over, the timer
    completes every message then due (one notification for them, through the
    transport's compiled signaller), sends the period events and takes what the
    driver added meanwhile.  While a message is in progress the driver's kicks of
    the stream's queue are suppressed (VIRTIO 1.2 §2.7.10): the timer looks at the
    ring anyway, so a period costs one wake-up, not two; a kick (when the stream
    ran dry) is served in compiled code too (:class:`~virtio_devices._sound_fast.
    KickPump`).  A message the compiled path does not serve goes through
    :meth:`SoundDevice.handle_chain` as before.  Control operations run at once,
    after the message in progress is completed (as the worker would have finished
    it first).
    """

    def __init__(self, device: SoundDevice, stream: _Stream) -> None:
        super().__init__(device, stream)
        self._clock = device.clock
        self._stream = stream
        self.io_queue = stream.io_queue
        self.pacer = IoPacer(
            device.queues[stream.io_queue],
            stream.id,
            stream.direction == D_OUTPUT,
            self.params.byte_rate,
            self.params.period_bytes,
        )
        self.timer = StreamTimer(
            self.pacer,
            device.events,
            device.interrupt,
            self._period_secs(),
            None if device.clock is time.monotonic else device.clock,
        )
        self._fd = self.timer.fileno()
        self._loop.add_reader(self._fd, self._on_timer, pump=self.timer)
        kick = device.kick_pumps.get(self.io_queue)
        if kick is not None:
            kick.target = self.timer
        self._sync()

    def _period_secs(self) -> float:
        return max(self.params.period_bytes / self.params.byte_rate, 0.001)

    def _start_thread(self) -> None:
        pass  # no thread: see the class docstring

    def _sync(self) -> None:
        """Tell the compiled path what the stream and the device are now."""
        dev = self.device
        state = self._stream.state
        timer = self.timer
        timer.serving = (
            not self.hold and not self.stopping and dev.active and not dev._quiesced[self.io_queue]
        )
        timer.started = state == PcmState.START
        timer.xrun_events = bool(self.params.features & (1 << PCM_F_EVT_XRUNS))
        timer.period_secs = self._period_secs()
        self.pacer.accepting = state in PcmState.IO_STATES

    def post(self, callback: Callable[[], None]) -> None:
        callback()  # already on the loop

    def submit_op(self, op: Callable[[], None]) -> None:
        now = self._clock()
        if self.timer.finish_current(now):
            self._go_on()
        was_running, old_params = self.running, self.params
        op()
        pacer = self.pacer
        if self.params is not old_params:
            pacer.set_params(self.params.byte_rate, self.params.period_bytes)
        if self.running != was_running:
            pacer.set_running(self.running, now)
            self.timer.disarm()
            if not self.running:
                counts, largest, xr_device, xr_driver = self.timer.lateness(reset=True)
                log.debug(
                    "sound stream %d: timer wake-ups late by <0.1/<0.5/<1/<2/>=2 periods: %s, "
                    "largest %.6f s; xruns after a completion a period late or more: %d, "
                    "after one on time: %d",
                    self.stream_id,
                    "/".join(map(str, counts)),
                    largest,
                    xr_device,
                    xr_driver,
                )
        self._sync()
        self.serve()

    def state_changed(self) -> None:
        """The stream's state changed without an operation (SET_PARAMS)."""
        self._sync()

    def submit_io(self, io: _Io) -> None:
        """A message the Python path accepted (``handle_chain``): held with the others."""
        now = self._clock()
        self.pacer.push(io.chain, io.nbytes, now)
        self.timer.dry_armed = False
        if not self.hold and self.timer.rearm(now):
            self._go_on()

    def complete_held(self, status: int) -> None:
        """Complete every message held with ``status`` (RELEASE: OK; the queue
        taken back: IO_ERR) and notify the driver."""
        self.timer.flush(status)

    def settle(self, timeout: float = WORKER_JOIN_TIMEOUT) -> bool:
        """Stop: the message in progress starts over when the stream goes on."""
        self.hold = True
        self._sync()
        self.timer.disarm()
        self.pacer.hold()
        return True

    def release_hold(self) -> None:
        self.hold = False
        self.serve()

    def collect(self) -> list[Callable[[], None]]:
        return []

    def shutdown(self) -> None:
        self.settle()
        self.stopping = True
        self._sync()
        kick = self.device.kick_pumps.get(self.io_queue)
        if kick is not None and kick.target is self.timer:
            kick.target = None
        self._loop.remove_reader(self._fd)
        self.timer.close()
        dev = self.device
        dev._chains_done += self.pacer.completed
        dev._bytes_done += self.pacer.used_bytes
        if self.port is not None:
            try:
                self.port.close()
            except Exception as e:  # the daemon goes on
                log.error("sound stream %d: closing the backend stream failed: %s", self.stream_id, e)
            self.port = None

    # -- the ring and the timer ------------------------------------------------------------------
    def serve(self) -> None:
        """The driver kicked the stream's queue (or the stream changed): take what it
        holds, complete what is due, re-arm the timer."""
        self._sync()
        if self.timer.serving:
            self._go_on(now=self._clock())

    def _on_timer(self) -> None:
        """The timerfd is readable and the compiled path asked for Python (or the
        loop does not serve pumps: run it first)."""
        self._go_on(pump=True)

    def _go_on(self, now: float | None = None, pump: bool = False) -> None:
        """Run the compiled path (``pump``: as the loop does; ``now``: a tick at
        ``now``) and serve in Python what it leaves: a message or an event buffer
        it does not know; until it has nothing left for Python."""
        dev = self.device
        index = self.io_queue
        timer = self.timer
        while True:
            try:
                if pump:
                    go_on = timer.pump()
                elif now is not None:
                    go_on = timer.tick(now)
                else:
                    go_on = True
            except InvalidDescriptorIndex as e:
                dev._log_guest_fault(index, e)
                pump, now = False, self._clock()
                continue
            except InvalidAvailRingIndex:
                dev.queues[index].ready = False
                raise
            if not go_on:
                return
            chain = timer.unserved
            if chain is not None:
                timer.unserved = None
                used = dev._call(dev.handle_chain, index, chain)
                if isinstance(used, int):
                    dev.complete(index, chain.head_index, used)
            elif not dev._serve_event_leftover():
                return
            pump, now = False, self._clock()


def _write_io_status(chain: DescriptorChain, status: int, latency: int, written: int) -> int:
    """Write ``virtio_snd_pcm_status`` into the last 8 device-writable bytes of an
    I/O chain (after ``written`` frame bytes); return the used length."""
    writer = chain.writer()
    room = writer.available_bytes()
    writer.consume(room - _STATUS.size)
    writer.write_obj("II", status, latency)
    return written + _STATUS.size


class SoundDevice(VirtioDevice):
    """The virtio sound device over an :class:`~virtio_devices.hosts.audio.AudioBackend`.

    Control and event queues are served on the loop; each PCM stream has a worker
    thread for its backend, or a compiled timer for a ``loop_paced`` one (see the
    module docstring).

    Args:
        backend: the audio host (``NullAudio``, ``AlsaAudio``, ``PulseAudio``).
        clock: the monotonic clock that paces a ``loop_paced`` backend
            (``time.monotonic``: the kernel's ``CLOCK_MONOTONIC``, which the
            streams' timerfds use; tests pass a fake, and fire the timers).
        rt_priority: 0 (the default, as upstream), or a ``SCHED_FIFO`` priority
            (1-99) that :meth:`activate` gives the thread it runs on, the loop's,
            so that a loaded host does not hold the streams' timers back (our
            addition; a host that refuses it is logged, and the device goes on).

    Raises:
        ValueError: ``rt_priority`` is outside 0-99.
    """

    device_id = VIRTIO_ID_SOUND
    name = "sound"
    queue_sizes = (QUEUE_SIZE,) * 4
    features = COMMON_FEATURES
    has_config = True

    def __init__(
        self, backend: AudioBackend, *, clock: Callable[[], float] = time.monotonic, rt_priority: int = 0
    ) -> None:
        if not 0 <= rt_priority <= 99:
            raise ValueError(f"rt_priority must be from 0 to 99 (SCHED_FIFO), not {rt_priority}")
        #: The SCHED_FIFO priority activate gives the loop's thread (0: none).
        self.rt_priority = rt_priority
        # Read by the served-counts' setters, which VirtioDevice's __init__ calls.
        self.streams: list[_Stream] = []
        self._chains_done = self._bytes_done = 0
        super().__init__()
        self.backend = backend
        #: The clock that paces a ``loop_paced`` backend.
        self.clock = clock
        self._loop_paced = bool(getattr(backend, "loop_paced", False))
        self.formats: int = getattr(backend, "formats", DEFAULT_FORMATS)
        self.rates: int = getattr(backend, "rates", DEFAULT_RATES)
        self.streams = [_Stream(0, D_OUTPUT), _Stream(1, D_INPUT)]
        #: The event queue's buffers and waiting events, in compiled code (while active).
        self.events: EventQueue | None = None
        #: The tx and rx queues' compiled kick servers (while active).
        self.kick_pumps: dict[int, KickPump] = {}
        self._gen = [0] * len(self.queue_sizes)

    @property
    def events_sent(self) -> collections.Counter[int]:
        """Events sent since the device was activated, by code (tests, logs)."""
        ev = self.events
        sent: collections.Counter[int] = collections.Counter()
        if ev is not None:
            sent[EVT_PCM_PERIOD_ELAPSED] = ev.period_elapsed_sent
            sent[EVT_PCM_XRUN] = ev.xrun_sent
        return sent

    def _live_pacers(self) -> list[IoPacer]:
        return [s.worker.pacer for s in self.streams if isinstance(s.worker, _TimerStream)]

    def compiled_served(self) -> tuple[int, int]:
        """The compiled path completes messages without a Python frame: what the
        pacers completed, those of streams gone included."""
        live = self._live_pacers()
        return (
            self._chains_done + sum(p.completed for p in live),
            self._bytes_done + sum(p.used_bytes for p in live),
        )

    # -- config space ------------------------------------------------------------------------------
    def config_space(self) -> bytes:
        """``virtio_snd_config`` (§5.14.4): jacks, streams, chmaps, and controls 0."""
        return struct.pack("<IIII", 0, len(self.streams), len(CHMAPS), 0)

    # -- lifecycle -----------------------------------------------------------------------------------
    def activate(
        self, memory: GuestMemory, queues: Sequence[Queue], interrupt: Interrupt, loop: EventLoop
    ) -> None:
        """Start the device; the event queue and the tx/rx kicks get their compiled
        servers (:class:`~virtio_devices._sound_fast.EventQueue`, ``KickPump``);
        with ``rt_priority``, the calling thread (the loop's) gets ``SCHED_FIFO``."""
        if self.rt_priority:
            try:
                # pid 0: the calling thread alone (Linux schedules threads).
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(self.rt_priority))
            except OSError as e:
                log.warning("sound: SCHED_FIFO priority %d refused: %s", self.rt_priority, e)
        super().activate(memory, queues, interrupt, loop)
        self.events = EventQueue(queues[EVENT_Q], EVENT_Q, interrupt)
        self.kick_pumps = {TX_Q: KickPump(), RX_Q: KickPump()}

    def kick_pump(self, index: int) -> FdPump | None:
        """The tx and rx queues' kicks are served in compiled code while a
        loop-paced stream serves the queue (see :class:`_TimerStream`)."""
        return self.kick_pumps.get(index)

    def reset(self) -> None:
        """Complete or return what the device holds, stop the stream workers and
        close their host streams; the streams return to their initial state."""
        try:
            super().reset()
        finally:
            for s in self.streams:
                if s.worker is not None:
                    s.worker.shutdown()
                    s.worker = None
                s.state, s.params = PcmState.SET_PARAMETERS, DEFAULT_PARAMS
            if self.events is not None:
                self.events.clear()
            self.events = None
            self.kick_pumps = {}

    def quiesce(self, index: int) -> None:
        """Give queue ``index`` back: settle the workers and apply what they
        finished, answer the messages of this queue still waiting (``IO_ERR``, and a
        control request whose backend part did not run gets ``IO_ERR`` too),
        return the held event buffers to the avail ring."""
        if index < len(self._gen) and self.active:
            workers = [s.worker for s in self.streams if s.worker is not None]
            for w in workers:
                if not w.settle():
                    log.error("sound stream %d: worker still busy at quiesce", w.stream_id)
            for w in workers:
                for callback in w.collect():
                    callback()
            if index == EVENT_Q:
                self._return_events()
            for s in self.streams:
                worker = s.worker
                if worker is None:
                    continue
                if index == CONTROL_Q:
                    for op in worker.take_ops():
                        if isinstance(op, _ControlOp):
                            op.abandon()
                if index == s.io_queue:
                    if isinstance(worker, _TimerStream):
                        worker.complete_held(S_IO_ERR)
                    for io in worker.take_ios():
                        self.complete(index, io.chain.head_index, _write_io_status(io.chain, S_IO_ERR, 0, 0))
            self._gen[index] += 1
            super().quiesce(index)
            # Only now: a loop-paced stream that goes on must not take from a
            # queue given back.
            for w in workers:
                w.release_hold()
            return
        super().quiesce(index)

    def _return_events(self) -> None:
        events = self.events
        if events is None:
            return
        events.serving = False
        queue = self.queues[EVENT_Q]
        are_tail = events.are_tail
        held = events.held()
        if held and are_tail:
            # They are the last chains popped, in order: give them back as not
            # consumed (resubmitted ones to the resubmit list: Queue.unpop_many).
            queue.unpop_many(held)
        else:
            for head in held:
                self.complete(EVENT_Q, head, 0)
        events.are_tail = True

    # -- dispatch --------------------------------------------------------------------------------------
    def process_queue(self, index: int) -> None:
        """A kick: a loop-paced stream's queue is taken by its compiled path
        (:class:`_TimerStream`); every other queue is drained chain by chain."""
        if index == EVENT_Q:
            if self.events is not None:
                self.events.serving = True  # a kick: the queue is the device's again
            super().process_queue(index)
            if self.events is not None:
                self.events.quiet()
            return
        if index in (TX_Q, RX_Q):
            for s in self.streams:
                if s.io_queue == index and isinstance(s.worker, _TimerStream):
                    if self.broken is not None:
                        raise DeviceNeedsReset(
                            f"{self.name}: device is broken ({self.broken!r}) until it is reset"
                        )
                    self._quiesced[index] = False  # a kick: the queue is the device's again
                    try:
                        s.worker.serve()
                    except (InvalidAvailRingIndex, QueueError, GuestMemoryError, DeviceNeedsReset):
                        raise
                    except Exception as e:
                        raise self._break(index, e) from e
                    return
        super().process_queue(index)

    def handle_chain(self, index: int, chain: DescriptorChain) -> int | None:
        """Serve one chain of queue ``index`` (control, event, tx or rx).

        Raises:
            MalformedRequest: a chain with no room for its status (§5.14.6: every
                request has a device-writable status), or an event buffer that is
                not 8 device-writable bytes; used length 0.
        """
        if index == CONTROL_Q:
            return self._control(chain)
        if index == EVENT_Q:
            self._event_buffer(chain)
            return None
        return self._io(index, chain)

    def guest_fault(self, index: int, chain: DescriptorChain, err: Exception) -> int:
        if index == EVENT_Q and self.events is not None and len(self.events):
            self.events.are_tail = False
        return super().guest_fault(index, chain, err)

    # -- control queue --------------------------------------------------------------------------------
    def _control(self, chain: DescriptorChain) -> int | None:
        reader = chain.reader()
        writer = chain.writer()
        if writer.available_bytes() < _HDR.size:
            raise MalformedRequest(
                f"control request has {writer.available_bytes()} device-writable bytes, "
                f"needs {_HDR.size} for its status (VIRTIO 1.2 §5.14.6)"
            )
        if reader.available_bytes() < _HDR.size:
            return self._answer(writer, S_BAD_MSG)
        (code,) = _HDR.unpack(reader.read(_HDR.size))
        if code in (R_JACK_INFO, R_PCM_INFO, R_CHMAP_INFO):
            return self._query(code, reader, writer)
        if code == R_JACK_REMAP:
            return self._answer(writer, S_NOT_SUPP)
        if code == R_PCM_SET_PARAMS:
            return self._set_params(reader, writer)
        if code in (R_PCM_PREPARE, R_PCM_RELEASE, R_PCM_START, R_PCM_STOP):
            return self._pcm_command(code, chain, reader, writer)
        self._log_control(code, "unknown request code")
        return self._answer(writer, S_NOT_SUPP)

    @staticmethod
    def _answer(writer: Writer, status: int, payload: bytes = b"") -> int:
        writer.write_obj("I", status)
        if payload:
            writer.write(payload)
        return _HDR.size + len(payload)

    def _log_control(self, code: int, what: str) -> None:
        self._ratelimit.log(log, logging.WARNING, ("ctl", code), "sound: control %#06x: %s", code, what)

    def _items(self, code: int) -> list[bytes]:
        if code == R_PCM_INFO:
            return [
                _PCM_INFO.pack(
                    0, PCM_FEATURES, self.formats, self.rates, s.direction, CHANNELS_MIN, CHANNELS_MAX
                )
                for s in self.streams
            ]
        if code == R_CHMAP_INFO:
            return [
                _CHMAP_INFO_HEAD.pack(0, d, len(p)) + bytes(p) + bytes(CHMAP_MAX_SIZE - len(p))
                for d, p in CHMAPS
            ]
        return []  # no jacks

    def _query(self, code: int, reader: Reader, writer: Writer) -> int:
        if reader.available_bytes() < _QUERY.size:
            self._log_control(code, f"query of {reader.available_bytes() + 4} bytes, needs {_QUERY.size + 4}")
            return self._answer(writer, S_BAD_MSG)
        start, count, size = _QUERY.unpack(reader.read(_QUERY.size))
        items = self._items(code)
        if start >= len(items) or count > len(items) - start:
            self._log_control(code, f"items {start}+{count} out of range (device has {len(items)})")
            return self._answer(writer, S_BAD_MSG)
        if writer.available_bytes() < _HDR.size + count * size:
            self._log_control(code, f"response buffer {writer.available_bytes()} bytes < {4 + count * size}")
            return self._answer(writer, S_BAD_MSG)
        payload = b"".join(
            (item + bytes(max(size - len(item), 0)))[:size] for item in items[start : start + count]
        )
        return self._answer(writer, S_OK, payload)

    def _stream(self, stream_id: int) -> _Stream | None:
        return self.streams[stream_id] if stream_id < len(self.streams) else None

    def _set_params(self, reader: Reader, writer: Writer) -> int:
        if reader.available_bytes() < _SET_PARAMS.size:
            self._log_control(R_PCM_SET_PARAMS, f"request of {reader.available_bytes() + 4} bytes, needs 24")
            return self._answer(writer, S_BAD_MSG)
        sid, buffer_bytes, period_bytes, features, channels, fmt, rate = _SET_PARAMS.unpack(
            reader.read(_SET_PARAMS.size)
        )
        stream = self._stream(sid)
        if stream is None:
            self._log_control(
                R_PCM_SET_PARAMS, f"stream id {sid} out of range (device has {len(self.streams)})"
            )
            return self._answer(writer, S_BAD_MSG)
        allowed, new_state = PcmState.TRANSITIONS[R_PCM_SET_PARAMS]
        if stream.state not in allowed:
            self._log_control(R_PCM_SET_PARAMS, f"stream {sid} is in state {stream.state}")
            return self._answer(writer, S_BAD_MSG)
        if (
            fmt >= 64
            or not self.formats >> fmt & 1
            or rate >= 64
            or not self.rates >> rate & 1
            or not CHANNELS_MIN <= channels <= CHANNELS_MAX
            or features & ~PCM_FEATURES
        ):
            self._log_control(
                R_PCM_SET_PARAMS,
                f"format {fmt}, rate {rate}, {channels} channels or features {features:#x} "
                "not offered by PCM_INFO",
            )
            return self._answer(writer, S_NOT_SUPP)
        frame = FORMAT_SAMPLE_BYTES[fmt] * channels
        if period_bytes == 0 or buffer_bytes < period_bytes or period_bytes % frame:
            self._log_control(
                R_PCM_SET_PARAMS,
                f"period {period_bytes} bytes (frame {frame}), buffer {buffer_bytes} bytes",
            )
            return self._answer(writer, S_BAD_MSG)
        stream.params = PcmParams(buffer_bytes, period_bytes, features, channels, fmt, rate)
        stream.state = new_state
        if isinstance(stream.worker, _TimerStream):
            stream.worker.state_changed()
        return self._answer(writer, S_OK)

    def _pcm_command(self, code: int, chain: DescriptorChain, reader: Reader, writer: Writer) -> int | None:
        if reader.available_bytes() < _PCM_HDR.size:
            self._log_control(code, f"request of {reader.available_bytes() + 4} bytes, needs 8")
            return self._answer(writer, S_BAD_MSG)
        (sid,) = _PCM_HDR.unpack(reader.read(_PCM_HDR.size))
        stream = self._stream(sid)
        if stream is None:
            self._log_control(code, f"stream id {sid} out of range (device has {len(self.streams)})")
            return self._answer(writer, S_BAD_MSG)
        allowed, new_state = PcmState.TRANSITIONS[code]
        if stream.state not in allowed:
            self._log_control(code, f"stream {sid} is in state {stream.state}")
            return self._answer(writer, S_BAD_MSG)
        if stream.worker is None:
            stream.worker = (_TimerStream if self._loop_paced else _StreamWorker)(self, stream)
        if code == R_PCM_PREPARE:
            stream.worker.params = stream.params
        op = _ControlOp(self, stream, code, chain, stream.state, new_state, self._gen[CONTROL_Q])
        # Committed now, so that the next request is checked against it; the
        # worker's answer restores the old state if the backend fails.
        stream.state = new_state
        stream.worker.submit_op(op)
        return None

    # -- event queue ------------------------------------------------------------------------------------
    def _event_buffer(self, chain: DescriptorChain) -> None:
        writer = chain.writer()
        if chain.reader().available_bytes() or writer.available_bytes() < _EVENT.size:
            raise MalformedRequest(
                f"event buffer has {chain.reader().available_bytes()} device-readable and "
                f"{writer.available_bytes()} device-writable bytes, needs 0 and {_EVENT.size} "
                "(VIRTIO 1.2 §5.14.6.9)"
            )
        assert self.events is not None  # handle_chain runs only while active
        self.events.hold(chain)
        if self.events.pending and self.events.flush():
            self._serve_event_leftovers()

    def _send_event(self, code: int, stream_id: int) -> None:
        """Send event ``code`` for ``stream_id`` (loop): delivered as buffers allow
        (:class:`~virtio_devices._sound_fast.EventQueue`, which takes the buffers
        the driver added without a kick when it holds none)."""
        if not self.active or self.events is None:
            return
        if self.events.send(code, stream_id):
            self._serve_event_leftovers()

    def _serve_event_leftover(self) -> bool:
        """Answer the event buffer the compiled path left for Python (a guest fault:
        not 8 device-writable bytes alone), then deliver what waits; returns
        whether there was one."""
        events = self.events
        if events is None or events.unserved is None:
            return False
        chain, events.unserved = events.unserved, None
        used = self._call(self.handle_chain, EVENT_Q, chain)
        if isinstance(used, int):
            self.complete(EVENT_Q, chain.head_index, used)
        events.flush()
        return True

    def _serve_event_leftovers(self) -> None:
        while self._serve_event_leftover():
            pass

    # -- tx / rx ---------------------------------------------------------------------------------------
    def _io(self, index: int, chain: DescriptorChain) -> int | None:
        reader = chain.reader()
        writer = chain.writer()
        room = writer.available_bytes()
        if room < _STATUS.size:
            raise MalformedRequest(
                f"I/O message has {room} device-writable bytes, needs {_STATUS.size} for its status "
                "(VIRTIO 1.2 §5.14.6.8)"
            )
        if reader.available_bytes() < _HDR.size:
            self._log_io(index, f"header of {reader.available_bytes()} bytes, needs {_HDR.size}")
            return _write_io_status(chain, S_BAD_MSG, 0, 0)
        (sid,) = _PCM_HDR.unpack(reader.read(_PCM_HDR.size))
        stream = self._stream(sid)
        want = D_OUTPUT if index == TX_Q else D_INPUT
        if stream is None or stream.direction != want:
            self._log_io(
                index, f"stream id {sid} is not an {'output' if want == D_OUTPUT else 'input'} stream"
            )
            return _write_io_status(chain, S_BAD_MSG, 0, 0)
        if stream.state not in PcmState.IO_STATES or stream.worker is None:
            self._log_io(index, f"stream {sid} is in state {stream.state}")
            return _write_io_status(chain, S_BAD_MSG, 0, 0)
        nbytes = reader.available_bytes() if index == TX_Q else room - _STATUS.size
        stream.worker.submit_io(_Io(index, chain, nbytes, self._gen[index]))
        return None

    def _log_io(self, index: int, what: str) -> None:
        self._ratelimit.log(
            log, logging.WARNING, ("io", index), "sound q%d: I/O message refused: %s", index, what
        )

    def _io_done(self, io: _Io, used: int, periods: int, stream_id: int) -> None:
        """On the loop: a worker finished ``io``; complete it, send period events."""
        if io.gen != self._gen[io.queue] or not self.active:
            return  # the queue was taken back meanwhile
        self.complete(io.queue, io.chain.head_index, used)
        if self.streams[stream_id].state == PcmState.START:
            for _ in range(min(periods, EVENT_BACKLOG)):
                self._send_event(EVT_PCM_PERIOD_ELAPSED, stream_id)


class _ControlOp:
    """The backend part of PREPARE / START / STOP / RELEASE, run by the stream's
    worker; its answer (and, on failure, the old state) is applied on the loop."""

    def __init__(  # noqa: PLR0917 - a record of the request
        self,
        device: SoundDevice,
        stream: _Stream,
        code: int,
        chain: DescriptorChain,
        old_state: str,
        new_state: str,
        gen: int,
    ) -> None:
        self.device = device
        self.stream = stream
        self.code = code
        self.chain = chain
        self.old_state = old_state
        self.new_state = new_state
        self.gen = gen
        self.params = stream.params

    def __call__(self) -> None:
        """On the worker thread."""
        worker = self.stream.worker
        assert worker is not None
        status = S_OK
        try:
            if self.code == R_PCM_PREPARE:
                if worker.port is not None:
                    worker.port.close()
                    worker.port = None
                worker.params = self.params
                worker.port = self.device.backend.open(self.stream.id, self.stream.direction, self.params)
            elif self.code == R_PCM_START:
                if worker.port is None:
                    raise AudioError(f"stream {self.stream.id} has no open backend stream")
                worker.port.start()
                with worker.cond:
                    worker.running = True
                    worker._period_pos = 0
            elif self.code == R_PCM_STOP:
                with worker.cond:
                    worker.running = False
                    worker._dry_armed = False
                if worker.port is not None:
                    worker.port.stop()
            else:  # RELEASE: every pending message completes first (§5.14.6.6.5.1)
                with worker.cond:
                    worker.running = False
                    worker._dry_armed = False
                worker.complete_held(S_OK)
                if worker.port is not None:
                    port, worker.port = worker.port, None
                    port.close()
        except (AudioError, OSError) as e:
            status = S_IO_ERR
            log.error("sound stream %d: backend failed at %s: %s", self.stream.id, self._name(), e)
        self.chain.writer().write_obj("I", status)
        worker.post(lambda: self._apply(status))

    def _name(self) -> str:
        return {R_PCM_PREPARE: "PREPARE", R_PCM_START: "START", R_PCM_STOP: "STOP"}.get(self.code, "RELEASE")

    def _apply(self, status: int) -> None:
        """On the loop: the answer reaches the driver; a failure restores the state."""
        if status != S_OK and self.stream.state == self.new_state:
            self.stream.state = self.old_state
        if self.gen != self.device._gen[CONTROL_Q] or not self.device.active:
            return
        self.device.complete(CONTROL_Q, self.chain.head_index, _HDR.size)

    def abandon(self) -> None:
        """Quiesce of the control queue before the worker ran it: IO_ERR, old state."""
        if self.stream.state == self.new_state:
            self.stream.state = self.old_state
        self.chain.writer().write_obj("I", S_IO_ERR)
        self.device.complete(CONTROL_Q, self.chain.head_index, _HDR.size)
