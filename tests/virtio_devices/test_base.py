"""The drain loop of VirtioDevice: admit, PARK/resume, quiesce, and the error policy.

Test devices here are a few lines each, driven by the kit's DeviceRig (memfd guest
memory, MockSplitQueue drivers, fake loop and interrupt).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator

import pytest

from virtio_devices.base import COMMON_FEATURES, PARK, Park, VirtioDevice
from virtio_devices.errors import DeviceNeedsReset, HostFault, MalformedRequest
from virtio_devices.testing import DeviceRig
from virtio_queue import ByteSource, DescriptorChain
from virtio_queue.errors import GuestMemoryError, InvalidAvailRingIndex, InvalidChain
from virtio_queue.testing import VIRTQ_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY

W = VIRTQ_DESC_F_WRITE
Result = int | None | Park


class ScriptDevice(VirtioDevice):
    """Two queues; each chain's first readable byte says what handle_chain does."""

    name = "script"
    queue_sizes = (64, 64)
    features = COMMON_FEATURES

    def __init__(self) -> None:
        super().__init__()
        self.admitting = True
        self.admit_calls = 0
        self.retries: list[int] = []
        self.kept: list[DescriptorChain] = []
        self.raise_next: BaseException | None = None

    def admit(self, index: int) -> bool:
        self.admit_calls += 1
        return self.admitting

    def handle_chain(self, index: int, chain: DescriptorChain) -> Result:
        if self.raise_next is not None:
            err, self.raise_next = self.raise_next, None
            raise err
        op = chain.reader().read(1)
        if op == b"p":
            return PARK
        if op == b"k":
            self.kept.append(chain)
            return None
        return 3

    def retry_chain(self, index: int, chain: DescriptorChain) -> Result:
        self.retries.append(chain.head_index)
        return 5


@pytest.fixture
def rig() -> Iterator[DeviceRig]:
    with DeviceRig(ScriptDevice()) as r:
        yield r


def dev_of(rig: DeviceRig) -> ScriptDevice:
    assert isinstance(rig.device, ScriptDevice)
    return rig.device


def broken(dev: VirtioDevice) -> BaseException | None:
    # A function, so that mypy does not narrow the attribute between asserts.
    return dev.broken


def req(rig: DeviceRig, op: bytes, index: int = 0) -> int:
    return rig.add_request(index, readable=[op], writable=[8])[0]


# -- the plain drain ---------------------------------------------------------------------------


def test_drain_serves_every_chain_with_one_interrupt(rig: DeviceRig) -> None:
    heads = [req(rig, b"x") for _ in range(3)]
    assert rig.kick(0) == [(h, 3) for h in heads]
    assert rig.interrupt.used == [0]
    assert rig.device.chains_served == 3 and rig.device.bytes_served == 9


def test_drain_queues_are_independent(rig: DeviceRig) -> None:
    h0, h1 = req(rig, b"x", 0), req(rig, b"x", 1)
    assert rig.kick(1) == [(h1, 3)]
    assert rig.used(0) == []
    assert rig.kick(0) == [(h0, 3)]
    assert rig.interrupt.used == [1, 0]


def test_kick_on_unknown_queue_is_ignored(rig: DeviceRig, caplog: pytest.LogCaptureFixture) -> None:
    req(rig, b"x")
    with caplog.at_level(logging.WARNING, logger="virtio_devices"):
        rig.device.process_queue(5)
    assert rig.used(0) == []
    assert "unknown queue 5" in caplog.text


def test_bad_head_index_is_consumed_and_queue_goes_on(rig: DeviceRig) -> None:
    """VIRTIO 1.2 §2.7.13: a head index must be below the queue size; the entry is dropped."""
    rig.mock.add_avail(40)  # the rig's ring has 16 entries
    good = req(rig, b"x")
    assert rig.kick(0) == [(good, 3)]


def test_limit_stops_with_notifications_still_disabled(rig: DeviceRig) -> None:
    heads = [req(rig, b"x") for _ in range(3)]
    assert rig.device.process_chains(0, limit=2) == 2
    assert rig.used(0) == [(heads[0], 3), (heads[1], 3)]
    assert rig.mock.used_flags() & VRING_USED_F_NO_NOTIFY


# -- admit -------------------------------------------------------------------------------------


def test_admit_false_leaves_chains_in_avail_ring(rig: DeviceRig) -> None:
    dev = dev_of(rig)
    dev.admitting = False
    h = req(rig, b"x")
    assert rig.kick(0) == []
    assert rig.queues[0].next_avail() == 0  # not popped: GET_VRING_BASE sees it as pending
    assert rig.mock.used_flags() & VRING_USED_F_NO_NOTIFY  # the device resumes, not a kick
    dev.admitting = True
    dev.resume(0)
    assert rig.used(0) == [(h, 3)]
    assert rig.interrupt.used == [0]
    assert not rig.mock.used_flags() & VRING_USED_F_NO_NOTIFY


def test_admit_is_asked_only_when_a_chain_is_there(rig: DeviceRig) -> None:
    assert rig.kick(0) == []
    assert dev_of(rig).admit_calls == 0
    req(rig, b"x")
    req(rig, b"x")
    rig.kick(0)
    assert dev_of(rig).admit_calls == 2


# -- PARK and resume -----------------------------------------------------------------------------


def test_park_holds_the_chain_and_kicks_pop_nothing_more(rig: DeviceRig) -> None:
    dev = dev_of(rig)
    parked = req(rig, b"p")
    after = req(rig, b"x")
    assert rig.kick(0) == []
    chain = dev.parked(0)
    assert chain is not None and chain.head_index == parked
    assert rig.kick(0) == []
    assert rig.queues[0].next_avail() == 1
    dev.resume(0)
    assert dev.retries == [parked]
    assert rig.used(0) == [(parked, 5), (after, 3)]
    assert rig.interrupt.used == [0]
    assert dev.parked(0) is None


def test_retry_that_parks_again_keeps_the_chain(rig: DeviceRig) -> None:
    class Stubborn(ScriptDevice):
        def retry_chain(self, index: int, chain: DescriptorChain) -> Result:
            return PARK

    with DeviceRig(Stubborn()) as r:
        h = req(r, b"p")
        r.kick(0)
        r.device.resume(0)
        chain = r.device.parked(0)
        assert chain is not None and chain.head_index == h
        assert r.used(0) == []


def test_none_then_complete_returns_the_chain_later(rig: DeviceRig) -> None:
    dev = dev_of(rig)
    kept = req(rig, b"k")
    nxt = req(rig, b"x")
    assert rig.kick(0) == [(nxt, 3)]
    (chain,) = dev.kept
    dev.complete(0, chain.head_index, 2)
    assert rig.used(0) == [(kept, 2)]
    assert rig.interrupt.used == [0, 0]


# -- quiesce -----------------------------------------------------------------------------------------


def test_quiesce_returns_the_parked_chain_and_resume_does_nothing(rig: DeviceRig) -> None:
    dev = dev_of(rig)
    h = req(rig, b"p")
    rig.kick(0)
    assert rig.queues[0].next_avail() == 1
    dev.quiesce(0)
    assert rig.queues[0].next_avail() == 0  # GET_VRING_BASE reports it as not consumed
    assert dev.parked(0) is None
    dev.resume(0)  # a late timer or fd callback
    assert rig.queues[0].next_avail() == 0
    assert rig.used(0) == []
    dev.quiesce(0)  # idempotent
    assert rig.queues[0].next_avail() == 0
    # The next kick is the device's again: the chain is handled afresh (and parks).
    rig.kick(0)
    chain = dev.parked(0)
    assert chain is not None and chain.head_index == h


def test_reset_quiesces_every_queue(rig: DeviceRig) -> None:
    req(rig, b"p", 0)
    req(rig, b"p", 1)
    rig.kick(0)
    rig.kick(1)
    q0, q1 = rig.queues
    rig.device.reset()
    assert (q0.next_avail(), q1.next_avail()) == (0, 0)
    assert not rig.device.active


# -- chains resubmitted after a reconnect (vhost-user inflight tracking) ----------------------------


def test_quiesce_gives_back_a_parked_resubmitted_chain_not_the_avail_entry_before(rig: DeviceRig) -> None:
    """A resubmitted chain does not advance next_avail when popped: parked and given
    back at quiesce, it is served next, and the avail entry behind next_avail (a
    chain the previous back-end already used) is not served again (VIRTIO 1.2
    §2.7.13: each buffer is used once)."""
    dev = dev_of(rig)
    a = req(rig, b"p")
    b = req(rig, b"x")
    rig.reconnect(0, in_flight=[a])  # b was used before the reconnect
    c = req(rig, b"x")
    assert rig.kick(0) == []
    assert dev.parked(0) is not None and dev.parked(0).head_index == a  # type: ignore[union-attr]
    dev.quiesce(0)
    assert rig.queues[0].next_avail() == 2  # b's entry stays consumed
    assert rig.kick(0) == []  # the queue is the device's again: a first, parked again
    assert dev.parked(0).head_index == a  # type: ignore[union-attr]
    dev.resume(0)
    assert rig.used(0) == [(a, 5), (c, 3)]
    assert b not in dev.retries


def test_quiesce_gives_back_a_parked_avail_chain_by_next_avail(rig: DeviceRig) -> None:
    """A parked chain popped from the avail ring while resubmitted ones were served
    before it goes back by stepping next_avail back: GET_VRING_BASE reports it as not
    consumed, and the resubmitted chain served before it is not served again."""
    dev = dev_of(rig)
    a = req(rig, b"x")
    rig.reconnect(0, in_flight=[a])
    c = req(rig, b"p")
    assert rig.kick(0) == [(a, 3)]
    dev.quiesce(0)
    assert rig.queues[0].next_avail() == 1
    assert rig.kick(0) == []
    dev.resume(0)
    assert rig.used(0) == [(c, 5)]


def test_fill_path_hands_back_a_resubmitted_chain_of_another_shape(fill_rig: tuple[DeviceRig, int]) -> None:
    """The fill path returns a resubmitted chain it does not serve; the drain loop
    puts it back for handle_chain, which serves it, and the fill path goes on after
    it: the request the previous back-end used is not filled again (§2.7.13)."""
    rig, w = fill_rig
    os.write(w, b"abcdefgh")
    a = req(rig, b"x")
    fill_req(rig)  # used before the reconnect
    rig.reconnect(0, in_flight=[a])
    c, gc = fill_req(rig)
    assert rig.kick(0) == [(a, 3), (c, 4)]
    assert rig.read(gc, 4) == b"abcd"
    assert dev_of(rig).handled == [a]


def test_fill_path_serves_resubmitted_fill_requests_through_handle_chain(
    fill_rig: tuple[DeviceRig, int],
) -> None:
    """Resubmitted requests of the fill path's own shape are given to handle_chain
    one by one (the fill path serves only the avail ring), each once, in order."""
    rig, w = fill_rig
    os.write(w, b"abcdefgh")
    a, _ = fill_req(rig)
    b, _ = fill_req(rig)
    d, _ = fill_req(rig)
    rig.reconnect(0, in_flight=[d, a])
    c, gc = fill_req(rig)
    assert rig.kick(0) == [(d, 3), (a, 3), (c, 4)]
    assert rig.read(gc, 4) == b"abcd"
    assert b not in dev_of(rig).handled


# -- the error policy (one test per class of error raised from handle_chain) --------------------------


@pytest.mark.parametrize(
    "err",
    [
        MalformedRequest("request header is 3 bytes, needs 8"),
        InvalidChain("descriptor chain loops"),
        GuestMemoryError("address 0x100000 outside guest memory"),
    ],
    ids=["malformed", "queue", "memory"],
)
def test_guest_fault_returns_the_chain_with_zero(
    rig: DeviceRig, caplog: pytest.LogCaptureFixture, err: Exception
) -> None:
    dev = dev_of(rig)
    bad, good = req(rig, b"x"), req(rig, b"x")
    dev.raise_next = err
    with caplog.at_level(logging.WARNING, logger="virtio_devices"):
        assert rig.kick(0) == [(bad, 0), (good, 3)]
    assert str(err) in caplog.text
    assert dev.broken is None


@pytest.mark.parametrize(
    "err",
    [HostFault("image read failed: EIO"), OSError(5, "Input/output error")],
    ids=["hostfault", "oserror"],
)
def test_host_fault_answers_and_logs_rate_limited(
    rig: DeviceRig, caplog: pytest.LogCaptureFixture, err: Exception
) -> None:
    dev = dev_of(rig)
    with caplog.at_level(logging.ERROR, logger="virtio_devices"):
        for _ in range(12):
            h = req(rig, b"x")
            dev.raise_next = err
            assert rig.kick(0) == [(h, 0)]
    lines = [r for r in caplog.records if "host fault" in r.getMessage()]
    assert 1 <= len(lines) <= 10  # RateLimiter's burst, not 12
    assert dev.broken is None


def test_fault_hooks_write_the_device_status() -> None:
    """A device with a status byte answers faults with it (VIRTIO 1.2 §5.2.6: IOERR 1)."""

    class WithStatus(ScriptDevice):
        def host_fault(self, index: int, chain: DescriptorChain, err: Exception) -> int:
            return chain.writer().write(b"\x01")

        def guest_fault(self, index: int, chain: DescriptorChain, err: Exception) -> int:
            return chain.writer().write(b"\x02")

    with DeviceRig(WithStatus()) as r:
        h1, (out1,) = r.add_request(0, readable=[b"x"], writable=[1])
        h2, _ = r.add_request(0, readable=[b"x"], writable=[1])
        dev = r.device
        assert isinstance(dev, WithStatus)
        dev.raise_next = HostFault("EIO")
        assert r.kick(0) == [(h1, 1), (h2, 3)]
        dev.raise_next = MalformedRequest("bad")
        h3, (out3,) = r.add_request(0, readable=[b"x"], writable=[1])
        assert r.kick(0) == [(h3, 1)]
        assert (r.read(out1, 1), r.read(out3, 1)) == (b"\x01", b"\x02")


def test_device_bug_raises_needs_reset_and_device_refuses_work_until_reset(rig: DeviceRig) -> None:
    dev = dev_of(rig)
    before = req(rig, b"x")
    req(rig, b"x")
    bug = KeyError("oops")

    def raise_on_second(orig: Callable[[int, DescriptorChain], Result] = dev.handle_chain) -> None:
        calls = iter([None, bug])

        def handle(index: int, chain: DescriptorChain) -> Result:
            err = next(calls)
            if err is not None:
                raise err
            return orig(index, chain)

        dev.handle_chain = handle  # type: ignore[method-assign]

    raise_on_second()
    with pytest.raises(DeviceNeedsReset, match="device bug: KeyError") as exc:
        rig.kick(0)
    assert exc.value.__cause__ is bug
    assert dev.broken is bug
    # The chain served before the bug was completed and signalled.
    assert rig.used(0) == [(before, 3)]
    assert rig.interrupt.used == [0]
    with pytest.raises(DeviceNeedsReset, match="broken"):
        rig.kick(0)
    dev.resume(0)  # a callback of a broken device does nothing
    # The transport resets the device; it works again.
    del dev.handle_chain
    queues = rig.queues
    dev.reset()
    assert broken(dev) is None
    dev.activate(rig.memory, queues, rig.interrupt, rig.loop)
    h = req(rig, b"x")
    assert (h, 3) in rig.kick(0)


def test_bug_in_a_hook_also_breaks_the_device(rig: DeviceRig) -> None:
    class BadHook(ScriptDevice):
        def guest_fault(self, index: int, chain: DescriptorChain, err: Exception) -> int:
            raise AttributeError("no status byte")

    with DeviceRig(BadHook()) as r:
        req(r, b"x")
        assert isinstance(r.device, BadHook)
        r.device.raise_next = MalformedRequest("bad")
        with pytest.raises(DeviceNeedsReset, match="AttributeError"):
            r.kick(0)
        assert r.device.broken is not None


def test_broken_avail_ring_stops_the_queue_and_is_raised(rig: DeviceRig) -> None:
    """VIRTIO 1.2 §2.7.13.3 / rust-vmm InvalidAvailRingIndex: more pending than the size."""
    rig.mock.set_avail_idx(100)
    with pytest.raises(InvalidAvailRingIndex):
        rig.kick(0)
    assert not rig.queues[0].ready
    assert rig.device.broken is None


def test_reset_completes_even_if_a_quiesce_fails(rig: DeviceRig) -> None:
    class FailingQuiesce(ScriptDevice):
        def quiesce(self, index: int) -> None:
            super().quiesce(index)
            if index == 0:
                raise GuestMemoryError("used ring at 0x100000 outside guest memory")

    with DeviceRig(FailingQuiesce()) as r:
        req(r, b"p", 1)
        r.kick(1)
        q1 = r.queues[1]
        with pytest.raises(GuestMemoryError):
            r.device.reset()
        assert not r.device.active
        assert q1.next_avail() == 0  # queue 1 was quiesced after queue 0 failed


# -- the compiled fill path inside the drain -----------------------------------------------------


class FillDevice(ScriptDevice):
    """ScriptDevice whose one-writable-buffer requests are filled from a pipe."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.source = ByteSource(fd)
        self.handled: list[int] = []

    def fill_source(self, index: int) -> ByteSource | None:
        return self.source

    def handle_chain(self, index: int, chain: DescriptorChain) -> Result:
        self.handled.append(chain.head_index)
        return super().handle_chain(index, chain)


@pytest.fixture
def fill_rig() -> Iterator[tuple[DeviceRig, int]]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        with DeviceRig(FillDevice(r)) as rig:
            yield rig, w
    finally:
        os.close(r)
        os.close(w)


def fill_req(rig: DeviceRig, size: int = 4) -> tuple[int, int]:
    head, (gpa,) = rig.add_request(0, writable=[size])
    return head, gpa


def test_fill_path_serves_the_ring_and_interrupts_once(fill_rig: tuple[DeviceRig, int]) -> None:
    rig, w = fill_rig
    os.write(w, b"abcdefgh")
    (h1, g1), (h2, g2) = fill_req(rig), fill_req(rig)
    assert rig.kick(0) == [(h1, 4), (h2, 4)]
    assert rig.read(g1, 4) + rig.read(g2, 4) == b"abcdefgh"
    assert dev_of(rig).handled == [] and rig.interrupt.used == [0]
    assert rig.device.chains_served == 2 and rig.device.bytes_served == 8
    assert not rig.mock.used_flags() & VRING_USED_F_NO_NOTIFY  # VIRTIO 1.2 §2.7.10: on again


def test_fill_path_gives_other_requests_to_handle_chain_in_order(fill_rig: tuple[DeviceRig, int]) -> None:
    """A request of another shape after filled ones goes to handle_chain, and the ones
    after it are filled again: every chain is used once, in ring order."""
    rig, w = fill_rig
    os.write(w, b"12345678")
    h1, _ = fill_req(rig)
    other = req(rig, b"x")
    h3, g3 = fill_req(rig)
    assert rig.kick(0) == [(h1, 4), (other, 3), (h3, 4)]
    assert rig.read(g3, 4) == b"5678"
    assert dev_of(rig).handled == [other] and rig.interrupt.used == [0]
    assert rig.device.chains_served == 3 and rig.device.bytes_served == 11


def test_fill_path_first_request_of_another_shape(fill_rig: tuple[DeviceRig, int]) -> None:
    rig, w = fill_rig
    os.write(w, b"zzzz")
    other = req(rig, b"x")
    h2, _ = fill_req(rig)
    assert rig.kick(0) == [(other, 3), (h2, 4)]


def test_fill_path_empty_source_leaves_the_request_to_the_device(fill_rig: tuple[DeviceRig, int]) -> None:
    """A read that gives nothing (EAGAIN) is the device's to decide: here it parks."""
    rig, _ = fill_rig
    head, _ = rig.add_request(0, writable=[4])
    dev = dev_of(rig)
    dev.handle_chain = lambda index, chain: PARK  # type: ignore[method-assign]
    assert rig.kick(0) == []
    assert dev.parked(0) is not None and dev.parked(0).head_index == head  # type: ignore[union-attr]


def test_fill_path_bad_head_after_filled_requests(fill_rig: tuple[DeviceRig, int]) -> None:
    """VIRTIO 1.2 §2.7.13: a head index must be below the queue size; the entry is
    dropped and the queue goes on, the filled request before it still used once."""
    rig, w = fill_rig
    os.write(w, b"abcdefgh")
    h1, _ = fill_req(rig)
    rig.mock.add_avail(40)
    h3, _ = fill_req(rig)
    assert rig.kick(0) == [(h1, 4), (h3, 4)]
    assert rig.interrupt.used == [0]
