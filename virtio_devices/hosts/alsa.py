"""The ALSA audio backend of virtio-sound, through pyalsaaudio (the ``hosts`` extra).

Upstream's ``alsa`` backend opens the PCM ``default`` for every stream; ours opens
the PCM device it is given (``default`` unless the daemon's
``VHD_SOUND_ALSA_DEVICE`` names another: ``hw:1,0``, ``plughw:Loopback,0``,
``null``...).  A port is a blocking ``alsaaudio.PCM`` with the stream's
parameters (period ``period_bytes``, as many periods as fit ``buffer_bytes``, at
least 2), used from the stream's worker thread only: ``write`` blocks until ALSA
has room, which paces playback at the device's clock, and ``read`` returns one
period of recorded frames.  Playback hands ALSA the guest's buffers themselves (one
memoryview per guest memory region, no copy in Python).
"""

from __future__ import annotations

import errno
from typing import Any

from virtio_queue import Reader, Writer

from .audio import AudioError, PcmParams

try:
    import alsaaudio
except ImportError as e:  # pragma: no cover - depends on the host
    raise AudioError(f"the alsa backend needs pyalsaaudio (pip install 'vhost-device-py[hosts]'): {e}") from e

__all__ = ["AlsaAudio", "AlsaPort"]

#: Overruns in a row that one capture message may recover from before it fails: a
#: capture that overruns at once again is not being read in time at all.
MAX_OVERRUNS = 4

# VIRTIO_SND_PCM_FMT_* -> ALSA format, for the formats the device offers.
_FORMATS = {
    4: alsaaudio.PCM_FORMAT_U8,
    5: alsaaudio.PCM_FORMAT_S16_LE,
    15: alsaaudio.PCM_FORMAT_S24_LE,  # 24 bits in the low bytes of 32, as virtio's S24
    17: alsaaudio.PCM_FORMAT_S32_LE,
    19: alsaaudio.PCM_FORMAT_FLOAT_LE,
}


class AlsaPort:
    """One ALSA PCM opened for a stream (see the module docstring).

    Raises:
        AudioError: ALSA refused the device or the parameters.
    """

    def __init__(self, device: str, direction: int, params: PcmParams) -> None:
        self.params = params
        self.direction = direction
        frame = params.frame_bytes
        self._period_frames = max(params.period_bytes // frame, 1)
        periods = max(params.buffer_bytes // max(params.period_bytes, 1), 2)
        self._buffer_frames = self._period_frames * periods
        self._leftover = b""
        #: Capture overruns recovered from (ALSA's xruns: the host side was not read
        #: in time); the stream reports each with PCM_XRUN when the driver asked.
        self.xruns = 0
        try:
            self.pcm: Any = alsaaudio.PCM(
                alsaaudio.PCM_PLAYBACK if direction == 0 else alsaaudio.PCM_CAPTURE,
                alsaaudio.PCM_NORMAL,
                rate=params.rate_hz,
                channels=params.channels,
                format=_FORMATS[params.format],
                periodsize=self._period_frames,
                periods=periods,
                device=device,
            )
        except (alsaaudio.ALSAAudioError, KeyError) as e:
            raise AudioError(f"ALSA PCM {device!r} refused {params}: {e}") from e

    def start(self) -> None:
        self._leftover = b""

    def stop(self) -> None:
        """Nothing: the guest stops sending; ALSA plays out what it has."""

    def play(self, reader: Reader, n: int) -> None:
        try:
            for view in reader.buffers(n):
                self.pcm.write(view)
        except alsaaudio.ALSAAudioError as e:
            raise AudioError(f"ALSA write failed: {e}") from e

    def capture(self, writer: Writer, n: int) -> int:
        """Fill ``n`` bytes of ``writer`` with recorded frames, one ALSA period at a time.

        An overrun (``-EPIPE``: the frames came faster than they were read, a loaded
        host) loses frames, not the message: pyalsaaudio has prepared the PCM again,
        so the read is repeated and ``xruns`` counted, up to ``MAX_OVERRUNS`` in a row.

        Raises:
            AudioError: ALSA failed, or overran ``MAX_OVERRUNS`` times in a row.
        """
        got = 0
        overruns = 0
        try:
            while got < n:
                data = self._leftover
                if not data:
                    length, data = self.pcm.read()
                    if length == -errno.EPIPE and overruns < MAX_OVERRUNS:
                        overruns += 1
                        self.xruns += 1
                        continue
                    if length < 0:
                        raise AudioError(f"ALSA read failed: error {length}")
                    overruns = 0
                take = min(len(data), n - got)
                writer.write(data[:take])
                self._leftover = data[take:]
                got += take
        except alsaaudio.ALSAAudioError as e:
            raise AudioError(f"ALSA read failed: {e}") from e
        return got

    def latency_bytes(self) -> int:
        try:
            avail = int(self.pcm.avail())
        except (alsaaudio.ALSAAudioError, AttributeError):
            return 0
        frames = self._buffer_frames - avail if self.direction == 0 else avail
        return max(frames, 0) * self.params.frame_bytes

    def abort(self) -> None:
        """Nothing: a blocked ALSA call ends within a period."""

    def close(self) -> None:
        self.pcm.close()


class AlsaAudio:
    """The ``alsa`` backend: every stream opens ``device`` (default ``default``)."""

    name = "alsa"
    formats = sum(1 << f for f in _FORMATS)

    def __init__(self, device: str = "default") -> None:
        self.device = device

    def open(self, stream_id: int, direction: int, params: PcmParams) -> AlsaPort:
        return AlsaPort(self.device, direction, params)

    def close(self) -> None:
        pass
