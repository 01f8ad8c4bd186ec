"""virtio-rng device logic (VIRTIO 1.2 §5.4) driven by MockSplitQueue.

Mirrors the unit tests of rust-vmm's ``vhost-device-rng/src/vhu_rng.rs`` (bytes from
the source, descriptor errors, rate limit), plus what we do differently: bad chains
are returned with length 0 instead of stopping the worker, and the rate limit
waits on the event loop instead of sleeping.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from virtio_devices.base import COMMON_FEATURES
from virtio_devices.hosts.files import BytesEntropySource, FdEntropySource, FileEntropySource
from virtio_devices.rng import MAX_PERIOD_MS, RngDevice
from virtio_devices.testing import DeviceRig, FakeInterrupt, FakeLoop
from virtio_queue.testing import (
    VIRTQ_DESC_F_WRITE,
    VRING_AVAIL_F_NO_INTERRUPT,
    RawDesc,
)

W = VIRTQ_DESC_F_WRITE
# Known "entropy": 4 KiB of a non-repeating pattern, so offsets are recognisable.
DATA = bytes((i * 7 + i // 256) & 0xFF for i in range(4096))


class Rig(DeviceRig):
    """The kit's rig on the test's memory: a 16-entry mock queue, request helpers."""

    def __init__(
        self,
        memory: Any,
        dev: RngDevice,
        loop: FakeLoop,
        interrupt: FakeInterrupt,
        *,
        event_idx: bool = False,
    ) -> None:
        super().__init__(dev, memory=memory, loop=loop, interrupt=interrupt, event_idx=event_idx)
        self.dev = dev
        self.queue = self.queues[0]

    def request(self, length: int) -> tuple[int, int]:
        """Add a one-descriptor writable request; return ``(head, buffer gpa)``."""
        buf = self.alloc(0, max(length, 1))
        head = self.add_chain(0, [RawDesc(buf, length, W, 0)])
        return head, buf

    def kick(self, index: int = 0) -> list[tuple[int, int]]:
        return super().kick(index)


@pytest.fixture
def source() -> Iterator[BytesEntropySource]:
    with BytesEntropySource(DATA) as s:
        yield s


@pytest.fixture
def rig(guest_memory: Any, source: BytesEntropySource, loop: FakeLoop, interrupt: FakeInterrupt) -> Rig:
    return Rig(guest_memory, RngDevice(source, clock=loop.clock), loop, interrupt)


def throttled(dev: RngDevice) -> bool:
    # A function, so that mypy does not narrow the property between asserts.
    return dev.throttled


def limited_rig(
    memory: Any, source: BytesEntropySource, loop: FakeLoop, interrupt: FakeInterrupt, **kw: Any
) -> Rig:
    return Rig(memory, RngDevice(source, clock=loop.clock, **kw), loop, interrupt)


# -- identity -------------------------------------------------------------------------------


def test_rng_identity_matches_upstream(source: BytesEntropySource) -> None:
    dev = RngDevice(source)
    assert dev.device_id == 4
    assert dev.queue_sizes == (1024,)
    assert dev.num_queues == 1
    assert dev.device_features() == COMMON_FEATURES
    assert not dev.has_config
    assert dev.read_config(0, 8) == b""


@pytest.mark.parametrize("period", [0, MAX_PERIOD_MS + 1])
def test_rng_bad_period_raises(source: BytesEntropySource, period: int) -> None:
    with pytest.raises(ValueError, match="period"):
        RngDevice(source, period_ms=period)


def test_rng_negative_max_bytes_raises(source: BytesEntropySource) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        RngDevice(source, max_bytes=-1)


# -- the payload ---------------------------------------------------------------------------


def test_rng_request_filled_from_source(rig: Rig) -> None:
    h1, b1 = rig.request(32)
    h2, b2 = rig.request(100)
    assert rig.kick() == [(h1, 32), (h2, 100)]
    # Reads consume the source in order, like upstream's shared File.
    assert rig.memory.read(b1, 32) == DATA[:32]
    assert rig.memory.read(b2, 100) == DATA[32:132]
    assert rig.interrupt.used == [0]
    assert rig.dev.bytes_served == 132
    assert rig.dev.chains_served == 2


def test_rng_file_source_gives_file_bytes(
    guest_memory: Any, tmp_path: Path, loop: FakeLoop, interrupt: FakeInterrupt
) -> None:
    path = tmp_path / "entropy"
    path.write_bytes(DATA[:256])
    with FileEntropySource(path) as src:
        r = Rig(guest_memory, RngDevice(src), loop, interrupt)
        h, buf = r.request(64)
        assert r.kick() == [(h, 64)]
        assert guest_memory.read(buf, 64) == DATA[:64]


def test_rng_short_read_at_eof_then_zero(guest_memory: Any, loop: FakeLoop, interrupt: FakeInterrupt) -> None:
    # Upstream passes short reads through: used length = bytes read, even 0.
    with BytesEntropySource(DATA[:10]) as src:
        r = Rig(guest_memory, RngDevice(src), loop, interrupt)
        h1, b1 = r.request(32)
        h2, b2 = r.request(32)
        assert r.kick() == [(h1, 10), (h2, 0)]
        assert guest_memory.read(b1, 32) == DATA[:10] + b"\xee" * 22
        assert guest_memory.read(b2, 32) == b"\xee" * 32


def test_rng_zero_length_descriptor_completes_with_zero(rig: Rig) -> None:
    h, _ = rig.request(0)
    assert rig.kick() == [(h, 0)]


def test_rng_indirect_single_writable_descriptor_served(rig: Rig) -> None:
    buf = rig.mock.alloc(16)
    head = rig.mock.add_indirect_chain([RawDesc(buf, 16, W, 0)])
    assert rig.kick() == [(head, 16)]
    assert rig.memory.read(buf, 16) == DATA[:16]


# -- bad chains (VIRTIO 1.2 §5.4.6.1) ---------------------------------------------------------


def test_rng_two_descriptor_chain_dropped_with_zero_and_queue_goes_on(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = rig.mock.alloc(8), rig.mock.alloc(8)
    rig.memory.write(a, b"\xee" * 8)
    bad = rig.mock.add_chain([RawDesc(a, 8, W, 0), RawDesc(b, 8, W, 0)])
    good, gbuf = rig.request(8)
    with caplog.at_level(logging.WARNING, logger="virtio_devices"):
        assert rig.kick() == [(bad, 0), (good, 8)]
    assert rig.memory.read(a, 8) == b"\xee" * 8  # nothing written into the bad chain
    assert rig.memory.read(gbuf, 8) == DATA[:8]
    assert "2 descriptors" in caplog.text


def test_rng_readable_descriptor_dropped_with_zero(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    # VIRTIO 1.2 §5.4.6.1: the driver MUST NOT place driver-readable buffers.
    buf = rig.mock.alloc(8)
    rig.memory.write(buf, b"\x11" * 8)
    bad = rig.mock.add_chain([RawDesc(buf, 8, 0, 0)])
    good, _ = rig.request(4)
    with caplog.at_level(logging.WARNING, logger="virtio_devices"):
        assert rig.kick() == [(bad, 0), (good, 4)]
    assert rig.memory.read(buf, 8) == b"\x11" * 8
    assert "device-readable" in caplog.text
    assert rig.dev.bytes_served == 4  # the source was not read for the bad chain


def test_rng_buffer_outside_guest_memory_dropped_with_zero(rig: Rig) -> None:
    bad = rig.mock.add_chain([RawDesc((1 << 20) - 4, 64, W, 0)])
    good, _ = rig.request(4)
    assert rig.kick() == [(bad, 0), (good, 4)]


def test_rng_bad_chain_warnings_are_rate_limited(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    a = rig.mock.alloc(8)
    with caplog.at_level(logging.WARNING, logger="virtio_devices"):
        for _ in range(3):
            for _ in range(8):
                rig.mock.add_chain([RawDesc(a, 8, 0, 0)])
            assert [ln for _, ln in rig.kick()] == [0] * 8
    assert len(caplog.records) <= 10  # RateLimiter's burst, not 24


# -- rate limit ---------------------------------------------------------------------------


def test_rng_rate_limit_truncates_to_quota_and_arms_timer(
    guest_memory: Any, source: BytesEntropySource, loop: FakeLoop, interrupt: FakeInterrupt
) -> None:
    r = limited_rig(guest_memory, source, loop, interrupt, period_ms=1000, max_bytes=100)
    h1, _ = r.request(64)
    h2, _ = r.request(64)
    h3, b3 = r.request(64)
    loop.clock.advance(0.25)
    assert r.kick() == [(h1, 64), (h2, 36)]  # the second is truncated to the quota
    assert r.dev.quota_remaining == 0
    # The third is left in the avail ring (not popped), and a timer waits for the
    # end of the window instead of a sleep.
    assert r.queue.next_avail() == 2
    assert throttled(r.dev)
    (timer,) = loop.pending_timers()
    assert timer.delay == pytest.approx(0.75)
    # Kicks meanwhile do nothing and arm nothing more.
    assert r.kick() == []
    assert len(loop.pending_timers()) == 1
    loop.clock.advance(0.75)
    assert loop.run_due() == 1
    assert r.mock.used_elems() == [(h3, 64)]
    assert guest_memory.read(b3, 64) == DATA[100:164]
    assert r.dev.quota_remaining == 36
    assert not throttled(r.dev)
    assert interrupt.used == [0, 0]


def test_rng_request_after_window_elapsed_resets_quota_without_timer(
    guest_memory: Any, source: BytesEntropySource, loop: FakeLoop, interrupt: FakeInterrupt
) -> None:
    r = limited_rig(guest_memory, source, loop, interrupt, period_ms=1000, max_bytes=50)
    h1, _ = r.request(50)
    assert r.kick() == [(h1, 50)]
    assert r.dev.quota_remaining == 0
    loop.clock.advance(1.0)
    h2, _ = r.request(80)
    assert r.kick() == [(h2, 50)]
    assert loop.pending_timers() == []


def test_rng_exhausted_quota_leaves_later_kicks_to_the_timer(
    guest_memory: Any, source: BytesEntropySource, loop: FakeLoop, interrupt: FakeInterrupt
) -> None:
    r = limited_rig(guest_memory, source, loop, interrupt, period_ms=2000, max_bytes=8)
    heads = [r.request(8)[0] for _ in range(3)]
    assert r.kick() == [(heads[0], 8)]
    for _ in range(2):
        loop.clock.advance(2.0)
        assert loop.run_due() == 1
    assert r.mock.used_elems() == [(heads[1], 8), (heads[2], 8)]


def test_rng_zero_quota_serves_one_empty_chain_per_window(
    guest_memory: Any, source: BytesEntropySource, loop: FakeLoop, interrupt: FakeInterrupt
) -> None:
    # max_bytes 0 (e.g. -m 1 -c 2): upstream waits a period, then answers with 0 bytes.
    r = limited_rig(guest_memory, source, loop, interrupt, period_ms=500, max_bytes=0)
    h1, _ = r.request(8)
    h2, _ = r.request(8)
    assert r.kick() == []
    loop.clock.advance(0.5)
    loop.run_due()
    assert r.mock.used_elems() == [(h1, 0)]
    loop.clock.advance(0.5)
    loop.run_due()
    assert r.mock.used_elems() == [(h2, 0)]


def test_rng_reset_cancels_window_timer(
    guest_memory: Any, source: BytesEntropySource, loop: FakeLoop, interrupt: FakeInterrupt
) -> None:
    r = limited_rig(guest_memory, source, loop, interrupt, period_ms=1000, max_bytes=4)
    r.request(4)
    r.request(4)
    r.kick()
    (timer,) = loop.pending_timers()
    r.dev.reset()
    assert timer.cancelled
    assert not throttled(r.dev)
    assert not r.dev.active


def test_rng_timer_after_queue_stopped_does_not_pop(
    guest_memory: Any, source: BytesEntropySource, loop: FakeLoop, interrupt: FakeInterrupt
) -> None:
    # GET_VRING_BASE stops the ring: a late timer must not consume chains after that.
    r = limited_rig(guest_memory, source, loop, interrupt, period_ms=1000, max_bytes=4)
    r.request(4)
    r.request(4)
    r.kick()
    r.queue.ready = False
    loop.clock.advance(1.0)
    loop.run_due()
    assert r.queue.next_avail() == 1


# -- a source that would block -------------------------------------------------------------


def test_rng_fifo_source_with_no_data_waits_on_the_loop(
    guest_memory: Any, loop: FakeLoop, interrupt: FakeInterrupt
) -> None:
    rfd, wfd = os.pipe()
    try:
        with FdEntropySource(rfd) as src:
            r = Rig(guest_memory, RngDevice(src), loop, interrupt)
            h1, b1 = r.request(16)
            h2, _ = r.request(16)
            assert r.kick() == []
            assert list(loop.readers) == [rfd]
            assert throttled(r.dev)
            assert r.kick() == []  # a kick while parked does nothing
            os.write(wfd, b"0123456789")
            loop.readers[rfd]()
            # The parked chain gets what the pipe had (short), the next one waits again.
            assert r.mock.used_elems() == [(h1, 10)]
            assert guest_memory.read(b1, 10) == b"0123456789"
            assert list(loop.readers) == [rfd]
            os.write(wfd, b"x" * 32)
            loop.readers[rfd]()
            assert r.mock.used_elems() == [(h2, 16)]
            assert loop.readers == {}
            assert interrupt.used == [0, 0]
            r.dev.reset()
    finally:
        os.close(wfd)


def test_rng_reset_while_parked_unpops_chain_and_stops_watching(
    guest_memory: Any, loop: FakeLoop, interrupt: FakeInterrupt
) -> None:
    rfd, wfd = os.pipe()
    try:
        with FdEntropySource(rfd) as src:
            r = Rig(guest_memory, RngDevice(src), loop, interrupt)
            r.request(16)
            r.kick()
            assert rfd in loop.readers
            assert r.queue.next_avail() == 1
            r.queue.ready = False  # GET_VRING_BASE stops the ring, then the device resets
            r.dev.reset()
            assert loop.readers == {}
            # The parked chain is given back: the ring base reports it as not consumed.
            assert r.queue.next_avail() == 0
            assert r.mock.used_elems() == []
    finally:
        os.close(wfd)


# -- notifications (VIRTIO 1.2 §2.7.10) ------------------------------------------------------------


def test_rng_no_interrupt_flag_suppresses_signal(rig: Rig) -> None:
    rig.mock.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
    rig.request(4)
    assert len(rig.kick()) == 1
    assert rig.interrupt.used == []


def test_rng_event_idx_signals_only_when_used_event_crossed(
    guest_memory: Any, source: BytesEntropySource, loop: FakeLoop, interrupt: FakeInterrupt
) -> None:
    r = Rig(guest_memory, RngDevice(source), loop, interrupt, event_idx=True)
    r.request(4)
    assert len(r.kick()) == 1
    assert interrupt.used == [0]  # the first batch always signals (nothing signalled yet)
    # The driver wants the next interrupt once used->idx passes 2 (used_event = 2).
    r.mock.set_used_event(2)
    r.request(4)
    assert len(r.kick()) == 1  # used->idx 2: not past used_event yet
    assert interrupt.used == [0]
    r.request(4)
    r.request(4)
    assert len(r.kick()) == 2  # used->idx 4: crossed
    assert interrupt.used == [0, 0]
    # With EVENT_IDX the device asks for kicks through avail_event (not used->flags).
    assert r.mock.avail_event() == 4


def test_rng_kick_on_empty_queue_signals_nothing(rig: Rig) -> None:
    assert rig.kick() == []
    assert rig.interrupt.used == []


def test_rng_kick_on_unknown_queue_ignored(rig: Rig) -> None:
    rig.request(4)
    rig.dev.process_queue(3)
    assert rig.mock.used_elems() == []
