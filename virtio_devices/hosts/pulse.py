"""The PulseAudio (and PipeWire) audio backend of virtio-sound: libpulse's simple API.

Why this client: ``pulsectl`` only controls a server (sinks, volumes), it cannot
stream; the one PyPI wrapper of the streaming "simple" API (``pasimple``) is a
small unmaintained ctypes layer over the very library used here.  libpulse-simple
is PulseAudio's stable C API for exactly this (one blocking playback or record
stream), shipped by every distribution (Debian: ``libpulse0``), and PipeWire's
``pipewire-pulse`` serves it too.  So we call it through ctypes (no build step, no
extra dependency), from the stream's worker thread only: ctypes releases the GIL
for the blocking ``pa_simple_write`` / ``pa_simple_read``, which pace the stream
at the server's clock.  Buffers go between guest memory and libpulse without a
copy in Python for capture (a ctypes view of each guest memory region) and one
copy for playback (the reader's views of the guest's buffers are read-only).

The server is libpulse's default: ``PULSE_SERVER``, else the user's or the
system's socket.  Stream parameters: the virtio format, rate and channels; the
target latency is the driver's ``buffer_bytes``, the request size its
``period_bytes``.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from virtio_queue import Reader, Writer

from .audio import AudioError, PcmParams

__all__ = ["PulseAudio", "PulsePort"]

# pa_sample_format_t for the virtio formats the device offers.
_FORMATS = {4: 0, 5: 3, 15: 11, 17: 7, 19: 5}  # U8, S16LE, S24_32LE, S32LE, FLOAT32LE
_PA_STREAM_PLAYBACK, _PA_STREAM_RECORD = 1, 2
_DEFAULT = 0xFFFFFFFF  # (uint32_t) -1: the server's choice


class _SampleSpec(ctypes.Structure):
    _fields_ = (("format", ctypes.c_int), ("rate", ctypes.c_uint32), ("channels", ctypes.c_uint8))


class _BufferAttr(ctypes.Structure):
    _fields_ = (
        ("maxlength", ctypes.c_uint32),
        ("tlength", ctypes.c_uint32),
        ("prebuf", ctypes.c_uint32),
        ("minreq", ctypes.c_uint32),
        ("fragsize", ctypes.c_uint32),
    )


def _load() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """libpulse-simple and libpulse, with the prototypes we call.

    Raises:
        AudioError: the libraries are not installed.
    """
    try:
        simple = ctypes.CDLL(ctypes.util.find_library("pulse-simple") or "libpulse-simple.so.0")
        pulse = ctypes.CDLL(ctypes.util.find_library("pulse") or "libpulse.so.0")
    except OSError as e:
        raise AudioError(f"libpulse-simple is not installed (Debian: libpulse0): {e}") from e
    err = ctypes.POINTER(ctypes.c_int)
    simple.pa_simple_new.restype = ctypes.c_void_p
    simple.pa_simple_new.argtypes = (
        ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p,
        ctypes.POINTER(_SampleSpec), ctypes.c_void_p, ctypes.POINTER(_BufferAttr), err,
    )  # fmt: skip
    simple.pa_simple_write.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, err)
    simple.pa_simple_read.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, err)
    simple.pa_simple_flush.argtypes = (ctypes.c_void_p, err)
    simple.pa_simple_drain.argtypes = (ctypes.c_void_p, err)
    simple.pa_simple_get_latency.restype = ctypes.c_uint64
    simple.pa_simple_get_latency.argtypes = (ctypes.c_void_p, err)
    simple.pa_simple_free.restype = None
    simple.pa_simple_free.argtypes = (ctypes.c_void_p,)
    pulse.pa_strerror.restype = ctypes.c_char_p
    pulse.pa_strerror.argtypes = (ctypes.c_int,)
    return simple, pulse


def _address(view: memoryview) -> tuple[int, object]:
    """The address of ``view``'s bytes, and what keeps them alive.  A writable view
    (a capture buffer) is used in place; a read-only one (the reader's views of a
    playback buffer are read-only) is copied once."""
    if view.readonly:
        data = view.tobytes()
        return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0, data
    buf = (ctypes.c_char * len(view)).from_buffer(view)
    return ctypes.addressof(buf), buf


class PulsePort:
    """One ``pa_simple`` stream (see the module docstring).

    Raises:
        AudioError: the server refused the connection or the stream.
    """

    xruns = 0  # pa_simple recovers from under- and overruns itself, unseen

    def __init__(self, backend: PulseAudio, stream_id: int, direction: int, params: PcmParams) -> None:
        self._lib = backend.simple
        self._strerror = backend.pulse.pa_strerror
        self.params = params
        spec = _SampleSpec(_FORMATS[params.format], params.rate_hz, params.channels)
        if direction == 0:
            attr = _BufferAttr(_DEFAULT, params.buffer_bytes, _DEFAULT, params.period_bytes, _DEFAULT)
        else:
            attr = _BufferAttr(_DEFAULT, _DEFAULT, _DEFAULT, _DEFAULT, params.period_bytes)
        err = ctypes.c_int(0)
        name = f"{'playback' if direction == 0 else 'capture'} stream {stream_id}".encode()
        self._s = self._lib.pa_simple_new(
            backend.server,
            backend.client_name,
            _PA_STREAM_PLAYBACK if direction == 0 else _PA_STREAM_RECORD,
            backend.device,
            name,
            ctypes.byref(spec),
            None,
            ctypes.byref(attr),
            ctypes.byref(err),
        )
        if not self._s:
            raise AudioError(f"PulseAudio refused a {name.decode()} ({params}): {self._error(err)}")

    def _error(self, err: ctypes.c_int) -> str:
        text = self._strerror(err.value)
        return text.decode(errors="replace") if text else f"error {err.value}"

    def start(self) -> None:
        """Capture starts afresh: what the server recorded before START is dropped."""
        err = ctypes.c_int(0)
        self._lib.pa_simple_flush(self._s, ctypes.byref(err))

    def stop(self) -> None:
        """Nothing: the server plays out what it has."""

    def play(self, reader: Reader, n: int) -> None:
        err = ctypes.c_int(0)
        for view in reader.buffers(n):
            addr, _keep = _address(view)
            if self._lib.pa_simple_write(self._s, addr, len(view), ctypes.byref(err)) < 0:
                raise AudioError(f"PulseAudio write failed: {self._error(err)}")

    def capture(self, writer: Writer, n: int) -> int:
        err = ctypes.c_int(0)
        got = 0
        for view in writer.buffers(n):
            addr, _keep = _address(view)
            if self._lib.pa_simple_read(self._s, addr, len(view), ctypes.byref(err)) < 0:
                raise AudioError(f"PulseAudio read failed: {self._error(err)}")
            if view.readonly:  # pragma: no cover - guest buffers are writable
                raise AudioError("capture buffer is read-only")
            got += len(view)
        writer.consume(got)
        return got

    def latency_bytes(self) -> int:
        err = ctypes.c_int(0)
        usec = self._lib.pa_simple_get_latency(self._s, ctypes.byref(err))
        if usec == 0xFFFFFFFFFFFFFFFF:
            return 0
        return int(usec * self.params.byte_rate // 1_000_000)

    def abort(self) -> None:
        """Nothing: a blocked call ends within what the server buffers."""

    def close(self) -> None:
        if self._s:
            self._lib.pa_simple_free(self._s)
            self._s = None


class PulseAudio:
    """The ``pulseaudio`` (and ``pipewire``) backend: a ``pa_simple`` stream per
    prepared PCM stream.

    Args:
        client_name: how the server lists the client.
        server: the server address (None: libpulse's default, ``PULSE_SERVER``...).
        device: the sink or source (None: the server's default).

    Raises:
        AudioError: libpulse-simple is not installed.
    """

    name = "pulseaudio"
    formats = sum(1 << f for f in _FORMATS)

    def __init__(self, client_name: str = "vhost-device-sound", server: str | None = None,
                 device: str | None = None) -> None:  # fmt: skip
        self.simple, self.pulse = _load()
        self.client_name = client_name.encode()
        self.server = server.encode() if server else None
        self.device = device.encode() if device else None

    def open(self, stream_id: int, direction: int, params: PcmParams) -> PulsePort:
        return PulsePort(self, stream_id, direction, params)

    def close(self) -> None:
        pass
