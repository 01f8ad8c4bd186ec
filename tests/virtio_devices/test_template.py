"""The template ("Foo") device, driven by MockSplitQueue.

Upstream's template only logs its requests; ours also completes them by echoing the
readable bytes into the writable buffers, so these tests check both.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from virtio_devices.base import COMMON_FEATURES
from virtio_devices.template import VIRTIO_ID_TEMPLATE, TemplateDevice
from virtio_devices.testing import DeviceRig, FakeInterrupt, FakeLoop
from virtio_queue.testing import VIRTQ_DESC_F_WRITE, RawDesc

W = VIRTQ_DESC_F_WRITE


class Rig(DeviceRig):
    """The kit's rig on the test's memory, with a buffer helper."""

    def __init__(self, memory: Any, loop: FakeLoop, interrupt: FakeInterrupt, *, event_idx: bool) -> None:
        super().__init__(TemplateDevice(), memory=memory, loop=loop, interrupt=interrupt, event_idx=event_idx)
        self.dev = self.device
        self.queue = self.queues[0]

    def buf(self, data: bytes | int) -> tuple[int, int]:
        """A buffer holding ``data`` (or ``data`` bytes of 0xee); returns ``(gpa, len)``."""
        gpa = self.alloc(0, data)
        return gpa, len(data) if isinstance(data, bytes) else data

    def kick(self, index: int = 0) -> list[tuple[int, int]]:
        return super().kick(index)


@pytest.fixture
def rig(guest_memory: Any, loop: FakeLoop, interrupt: FakeInterrupt) -> Rig:
    return Rig(guest_memory, loop, interrupt, event_idx=False)


def test_template_identity() -> None:
    dev = TemplateDevice()
    assert dev.device_id == VIRTIO_ID_TEMPLATE == 0xB0
    assert dev.queue_sizes == (1024,)
    assert dev.device_features() == COMMON_FEATURES
    assert not dev.has_config
    assert dev.read_config(0, 4) == b""


def test_template_echoes_readable_into_writable(rig: Rig) -> None:
    r, rlen = rig.buf(b"hello, foo")
    w, wlen = rig.buf(16)
    head = rig.mock.add_chain([RawDesc(r, rlen, 0, 0), RawDesc(w, wlen, W, 0)])
    assert rig.kick() == [(head, 10)]
    assert rig.memory.read(w, 16) == b"hello, foo" + b"\xee" * 6
    assert rig.interrupt.used == [0]


def test_template_echo_spans_descriptors_and_truncates(rig: Rig) -> None:
    r1, _ = rig.buf(b"abcd")
    r2, _ = rig.buf(b"efghij")
    w1, _ = rig.buf(3)
    w2, _ = rig.buf(4)
    head = rig.mock.add_chain(
        [RawDesc(r1, 4, 0, 0), RawDesc(r2, 6, 0, 0), RawDesc(w1, 3, W, 0), RawDesc(w2, 4, W, 0)]
    )
    assert rig.kick() == [(head, 7)]
    assert rig.memory.read(w1, 3) == b"abc"
    assert rig.memory.read(w2, 4) == b"defg"


@pytest.mark.parametrize("kind", ["readable only", "writable only"])
def test_template_one_sided_chain_completes_with_zero(rig: Rig, kind: str) -> None:
    gpa, n = rig.buf(8)
    flags = 0 if kind == "readable only" else W
    head = rig.mock.add_chain([RawDesc(gpa, n, flags, 0)])
    assert rig.kick() == [(head, 0)]
    assert rig.memory.read(gpa, 8) == b"\xee" * 8


def test_template_logs_each_request_layout(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    r, _ = rig.buf(b"xy")
    w, _ = rig.buf(5)
    rig.mock.add_chain([RawDesc(r, 2, 0, 0), RawDesc(w, 5, W, 0)])
    rig.mock.add_chain([RawDesc(w, 5, W, 0)])
    with caplog.at_level(logging.INFO, logger="virtio_devices.template"):
        rig.kick()
    msgs = [rec.getMessage() for rec in caplog.records if rec.name == "virtio_devices.template"]
    assert msgs[0] == "template q0: request 1 has 2 descriptors: read only 2, write only 5"
    assert msgs[1] == "template q0: request 2 has 1 descriptors: write only 5"
    assert rig.dev.requests == 2


def test_template_indirect_chain(rig: Rig) -> None:
    r, _ = rig.buf(b"indirect")
    w, _ = rig.buf(8)
    head = rig.mock.add_indirect_chain([RawDesc(r, 8, 0, 0), RawDesc(w, 8, W, 0)])
    assert rig.kick() == [(head, 8)]
    assert rig.memory.read(w, 8) == b"indirect"


def test_template_bad_buffer_dropped_and_queue_goes_on(rig: Rig) -> None:
    w, _ = rig.buf(4)
    bad = rig.mock.add_chain([RawDesc((1 << 20) - 2, 64, 0, 0), RawDesc(w, 4, W, 0)])
    r, _ = rig.buf(b"ok")
    good = rig.mock.add_chain([RawDesc(r, 2, 0, 0), RawDesc(w, 4, W, 0)])
    assert rig.kick() == [(bad, 0), (good, 2)]


def test_template_event_idx_suppresses_until_used_event(
    guest_memory: Any, loop: FakeLoop, interrupt: FakeInterrupt
) -> None:
    rig = Rig(guest_memory, loop, interrupt, event_idx=True)
    w, _ = rig.buf(4)
    rig.mock.add_chain([RawDesc(w, 4, W, 0)])
    assert len(rig.kick()) == 1
    assert interrupt.used == [0]  # the first batch always signals
    rig.mock.set_used_event(2)  # next interrupt once used->idx passes 2
    rig.mock.add_chain([RawDesc(w, 4, W, 0)])
    assert len(rig.kick()) == 1
    assert interrupt.used == [0]
    rig.mock.add_chain([RawDesc(w, 4, W, 0)])
    assert len(rig.kick()) == 1
    assert interrupt.used == [0, 0]


def test_template_reset_forgets_queues(rig: Rig) -> None:
    rig.dev.reset()
    assert not rig.dev.active
    assert rig.dev.queues == ()
