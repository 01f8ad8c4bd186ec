"""Audio host backends of virtio-sound: the Protocol, and the ``null`` backend.

A backend opens one *port* per PCM stream when the driver prepares it
(``VIRTIO_SND_R_PCM_PREPARE``, VIRTIO 1.2 §5.14.6.6.4) and closes it when the driver
releases it.  A port is used from one thread only, the stream's worker thread of
:class:`virtio_devices.sound.SoundDevice`, never from the event loop: its calls may
block (an ALSA period, a PulseAudio server round trip), which is how playback and
capture are paced at the stream's rate.

* :class:`AudioBackend`: ``open(stream_id, direction, params) -> AudioPort``;
* :class:`AudioPort`: ``start``, ``stop``, ``play(reader, n)``, ``capture(writer, n)``,
  ``latency_bytes``, ``abort``, ``close``;
* :class:`NullAudio`: upstream's ``null`` backend, except that time passes: a
  playback buffer is consumed at the real-time rate of the stream's parameters
  (its duration is ``n / (rate * frame size)``) and capture gives silence at that
  rate.  Upstream completes playback at once and never fills capture buffers.

The ALSA (:mod:`virtio_devices.hosts.alsa`) and PulseAudio
(:mod:`virtio_devices.hosts.pulse`) backends live in their own modules, so that
their libraries are needed only when selected.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import NamedTuple, Protocol

from virtio_queue import ByteSource, Reader, Writer

from ..errors import HostFault

__all__ = [
    "FORMAT_SAMPLE_BYTES",
    "RATE_HZ",
    "AudioBackend",
    "AudioError",
    "AudioPort",
    "NullAudio",
    "NullPort",
    "PcmParams",
]

# VIRTIO 1.2 §5.14.6.6.2: VIRTIO_SND_PCM_FMT_* -> bytes per sample as stored.
FORMAT_SAMPLE_BYTES: dict[int, int] = {
    0: 1,  # IMA_ADPCM (4 bits, counted as a byte per sample pair: unused here)
    1: 1, 2: 1, 3: 1, 4: 1,  # MU_LAW, A_LAW, S8, U8
    5: 2, 6: 2,  # S16, U16
    7: 3, 8: 3, 9: 3, 10: 3, 11: 3, 12: 3,  # S18_3 .. U24_3
    13: 4, 14: 4, 15: 4, 16: 4, 17: 4, 18: 4, 19: 4,  # S20 .. U32, FLOAT
    20: 8,  # FLOAT64
    21: 1, 22: 2, 23: 4, 24: 4,  # DSD_U8, DSD_U16, DSD_U32, IEC958_SUBFRAME
}  # fmt: skip

# VIRTIO 1.2 §5.14.6.6.2: VIRTIO_SND_PCM_RATE_* -> frames per second.
RATE_HZ: tuple[int, ...] = (
    5512, 8000, 11025, 16000, 22050, 32000, 44100, 48000, 64000, 88200, 96000, 176400, 192000, 384000,
)  # fmt: skip


class AudioError(HostFault):
    """An audio backend failed: a device that cannot be opened, a stream that broke.

    Raised by ports and backends.  The sound device answers the request that hit it
    with ``VIRTIO_SND_S_IO_ERR`` (VIRTIO 1.2 §5.14.6.1) and goes on; the CLI turns
    one raised at start-up into ``error: ...`` and exit status 1.
    """


class PcmParams(NamedTuple):
    """The parameters of a PCM stream (``virtio_snd_pcm_set_params``, §5.14.6.6.3).

    ``format`` and ``rate`` are the spec's enum values; :attr:`rate_hz`,
    :attr:`frame_bytes` and :attr:`byte_rate` are derived from them.
    """

    buffer_bytes: int
    period_bytes: int
    features: int
    channels: int
    format: int
    rate: int

    @property
    def rate_hz(self) -> int:
        """Frames per second."""
        return RATE_HZ[self.rate]

    @property
    def frame_bytes(self) -> int:
        """Bytes of one frame (a sample of every channel)."""
        return FORMAT_SAMPLE_BYTES[self.format] * self.channels

    @property
    def byte_rate(self) -> int:
        """Bytes per second at this rate, format and channel count."""
        return self.rate_hz * self.frame_bytes


class AudioPort(Protocol):
    """One open PCM stream of a backend, used from its stream's worker thread only
    (:meth:`abort` excepted)."""

    #: Host xruns the port recovered from without failing a message (frames lost,
    #: e.g. an ALSA capture overrun); the stream reports each with PCM_XRUN.
    xruns: int

    def start(self) -> None:
        """The stream starts (``PCM_START``): capture begins afresh, playback may run."""

    def stop(self) -> None:
        """The stream stops (``PCM_STOP``); it may be started again."""

    def play(self, reader: Reader, n: int) -> None:
        """Consume ``n`` bytes of ``reader`` (a playback buffer in guest memory),
        returning when the host has taken them, at the stream's rate.

        Raises:
            AudioError, OSError: the host failed; the buffer is answered IO_ERR.
        """

    def capture(self, writer: Writer, n: int) -> int:
        """Fill ``n`` bytes of ``writer`` (a capture buffer) with recorded frames, at
        the stream's rate; return the bytes written.

        Raises:
            AudioError, OSError: the host failed; the buffer is answered IO_ERR.
        """

    def latency_bytes(self) -> int:
        """Bytes the host still holds on their way out (playback) or in (capture)."""

    def abort(self) -> None:
        """Make a blocked :meth:`play` or :meth:`capture` return soon (any thread)."""

    def close(self) -> None:
        """Release the host stream; the port is not used again."""


class AudioBackend(Protocol):
    """An audio host: opens a port per prepared stream (upstream's ``AudioBackend``)."""

    #: The name given to ``--backend``.
    name: str

    def open(self, stream_id: int, direction: int, params: PcmParams) -> AudioPort:
        """Open the host stream for ``stream_id`` (direction 0 output, 1 input).

        Raises:
            AudioError: the host cannot open such a stream (the driver gets IO_ERR).
        """

    def close(self) -> None:
        """Release what the backend holds (the daemon is stopping)."""


class NullPort:
    """A port of :class:`NullAudio`: discards playback, records silence, in real time.

    The port keeps a clock of where the stream is: each buffer of ``n`` bytes lasts
    ``n / byte_rate`` seconds after the previous one ends (or after now, when the
    stream ran dry), and :meth:`play` / :meth:`capture` return at its end.

    Args:
        params: the stream's parameters.
        clock: monotonic clock in seconds (tests pass a fake one).
        zero: ``/dev/zero`` as a byte source, where silence is read from (None: a
            Python buffer of zeros per call).
        pace: False when the caller paces the stream itself (the sound device on
            its event loop: :attr:`NullAudio.loop_paced`); the calls then return
            at once.
    """

    xruns = 0  # its clock never loses frames

    def __init__(
        self,
        params: PcmParams,
        *,
        clock: Callable[[], float] = time.monotonic,
        zero: ByteSource | None = None,
        pace: bool = True,
    ) -> None:
        self.params = params
        self._clock = clock
        self._byte_rate = params.byte_rate
        self._end = 0.0
        self._aborted = threading.Event()
        self._zero = zero
        self._paced = pace
        self.played = 0
        self.captured = 0

    def _pace(self, n: int) -> None:
        if not self._paced:
            return
        now = self._clock()
        # A stream that ran dry starts its next buffer now, not in the past.
        self._end = max(self._end, now) + n / self._byte_rate
        delay = self._end - now
        # An abort cuts one wait short (and is used up by it).
        if delay > 0 and self._aborted.wait(delay):
            self._aborted.clear()

    def start(self) -> None:
        self._end = 0.0

    def stop(self) -> None:
        self._end = 0.0

    def play(self, reader: Reader, n: int) -> None:
        """Discard ``n`` bytes (not even read: nothing is copied) at the stream's rate."""
        self._pace(n)
        self.played += n

    def capture(self, writer: Writer, n: int) -> int:
        """Silence: ``n`` zero bytes, written from ``/dev/zero`` straight into the
        guest buffer, at the stream's rate."""
        self._pace(n)
        # The kernel clears the guest buffer: no Python buffer per period.
        got = writer.read_from(self._zero, n) if self._zero is not None else writer.write(bytes(n))
        self.captured += got
        return got

    def latency_bytes(self) -> int:
        return 0

    def abort(self) -> None:
        self._aborted.set()

    def close(self) -> None:
        self._aborted.set()


class NullAudio:
    """The ``null`` backend: no host audio, real-time pacing (see :class:`NullPort`).

    Silence for capture is read from ``/dev/zero`` straight into guest buffers (the
    kernel clears them; no Python buffer per period).
    """

    name = "null"

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, loop_paced: bool = True) -> None:
        self._clock = clock
        #: The ports never block, so the sound device paces them on its event
        #: loop, with a timer per stream (no worker thread); False: each call
        #: sleeps its duration.
        self.loop_paced = loop_paced
        self._zero_fd = os.open("/dev/zero", os.O_RDONLY | os.O_CLOEXEC)
        self._zero = ByteSource(self._zero_fd)
        self.opened: list[NullPort] = []

    def open(self, stream_id: int, direction: int, params: PcmParams) -> NullPort:
        port = NullPort(params, clock=self._clock, zero=self._zero, pace=not self.loop_paced)
        self.opened.append(port)
        del self.opened[:-4]  # tests look at the last ports; keep no more
        return port

    def close(self) -> None:
        if self._zero_fd >= 0:
            os.close(self._zero_fd)
            self._zero_fd = -1
