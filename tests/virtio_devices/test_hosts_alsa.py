"""The ALSA port's recovery from capture overruns, against a stand-in for the PCM
(the real one is driven in tests/integration and on snd-aloop in tests/e2e)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

pytest.importorskip("alsaaudio", reason="pyalsaaudio (the hosts extra) is not installed")

from virtio_devices.hosts.alsa import MAX_OVERRUNS, AlsaPort
from virtio_devices.hosts.audio import AudioError
from virtio_queue import GuestMemory, Writer
from virtio_queue.mock import MockSplitQueue
from virtio_queue.testing import RawDesc

PERIOD = 16
WRITE = 2


class ScriptedPcm:
    """Answers ``read()`` from a script: a negative length is an ALSA error."""

    def __init__(self, script: list[int]) -> None:
        self.script = list(script)
        self.reads = 0

    def read(self) -> tuple[int, bytes]:
        self.reads += 1
        length = self.script.pop(0)
        if length < 0:
            return length, b""
        return length, bytes([self.reads]) * PERIOD


def _port(script: list[int]) -> AlsaPort:
    port = AlsaPort.__new__(AlsaPort)  # no ALSA device: the PCM is the stand-in
    port._leftover = b""
    port.xruns = 0
    port.pcm = ScriptedPcm(script)
    return port


@pytest.fixture
def writer() -> Iterator[tuple[Writer, GuestMemory]]:
    mem, fd = GuestMemory.memfd(1 << 16)
    mock = MockSplitQueue(mem, 8)
    q = mock.create_queue()
    mock.add_chain([RawDesc(0x4000, 2 * PERIOD, WRITE, 0)])
    chain = q.pop_chain()
    assert chain is not None
    yield chain.writer(), mem
    os.close(fd)


def test_an_overrun_is_recovered_and_counted(writer: tuple[Writer, GuestMemory]) -> None:
    w, mem = writer
    port = _port([4, -errno.EPIPE, 4])
    assert port.capture(w, 2 * PERIOD) == 2 * PERIOD
    assert port.xruns == 1 and port.pcm.reads == 3
    assert mem.read(0x4000, 2 * PERIOD) == bytes([1]) * PERIOD + bytes([3]) * PERIOD


def test_overruns_without_end_fail_the_message(writer: tuple[Writer, GuestMemory]) -> None:
    w, _mem = writer
    port = _port([-errno.EPIPE] * (MAX_OVERRUNS + 1))
    with pytest.raises(AudioError, match=f"ALSA read failed: error {-errno.EPIPE}"):
        port.capture(w, PERIOD)
    assert port.xruns == MAX_OVERRUNS


def test_another_alsa_error_fails_the_message_at_once(writer: tuple[Writer, GuestMemory]) -> None:
    w, _mem = writer
    port = _port([-errno.EIO])
    with pytest.raises(AudioError, match=f"error {-errno.EIO}"):
        port.capture(w, PERIOD)
    assert port.xruns == 0
