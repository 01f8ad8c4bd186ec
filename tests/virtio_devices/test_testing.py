"""The device author's kit (virtio_devices.testing): the rig and the fakes themselves."""

from __future__ import annotations

import threading

import pytest

from virtio_devices.base import VIRTIO_RING_F_EVENT_IDX
from virtio_devices.template import TemplateDevice
from virtio_devices.testing import DeviceRig, FakeLoop
from virtio_queue.testing import VRING_USED_F_NO_NOTIFY


class TwoQueues(TemplateDevice):
    queue_sizes: tuple[int, ...] = (256, 256)  # type: ignore[assignment]


@pytest.mark.parametrize("event_idx", [False, True])
def test_rig_negotiates_event_idx_as_asked(event_idx: bool) -> None:
    with DeviceRig(TemplateDevice(), event_idx=event_idx) as rig:
        assert rig.device.has_feature(VIRTIO_RING_F_EVENT_IDX) == event_idx
        assert rig.queues[0].event_idx == event_idx
        head, (out,) = rig.add_request(0, readable=[b"ping"], writable=[4])
        assert rig.kick(0) == [(head, 4)]
        assert rig.read(out, 4) == b"ping"
        # With EVENT_IDX the device asks for kicks through avail_event, else used flags.
        assert not rig.mock.used_flags() & VRING_USED_F_NO_NOTIFY
    assert not rig.device.active  # close() reset the device


def test_rig_queues_have_disjoint_areas() -> None:
    with DeviceRig(TwoQueues(), queue_size=64) as rig:
        h0, (o0,) = rig.add_request(0, readable=[b"zero"], writable=[4])
        h1, (o1,) = rig.add_request(1, readable=[b"one!"], writable=[4])
        assert rig.mocks[1].desc_table >= rig.span > o0
        assert o1 >= rig.span
        assert rig.kick(1) == [(h1, 4)]
        assert rig.kick(0) == [(h0, 4)]
        assert (rig.read(o0, 4), rig.read(o1, 4)) == (b"zero", b"one!")


def test_rig_alloc_refuses_to_spill_into_the_next_queue() -> None:
    with DeviceRig(TwoQueues(), memory_size=64 << 10) as rig, pytest.raises(ValueError, match="full"):
        rig.alloc(0, rig.span)


def test_fake_loop_posts_from_threads_and_fires_readers() -> None:
    loop = FakeLoop()
    ran: list[str] = []
    t = threading.Thread(target=lambda: loop.call_soon_threadsafe(lambda: ran.append("soon")))
    t.start()
    assert loop.wait_soon(1, timeout=10)
    t.join()
    assert ran == []  # nothing runs until the test says so
    assert loop.run_soon() == 1 and ran == ["soon"]
    assert not loop.wait_soon(1, timeout=0)
    loop.add_reader(7, lambda: ran.append("fd 7"))
    loop.fire_reader(7)
    assert ran[-1] == "fd 7"
    loop.remove_reader(7)
    with pytest.raises(KeyError):
        loop.fire_reader(7)
