"""virtio-input (VIRTIO 1.2 §5.8) over the simulated host devices, driven by MockSplitQueue.

Config selects, event grouping up to SYN_REPORT, the bounded hold queue and its
SYN_DROPPED, the statusq back to the host, bad buffers, an unplugged host, and
hypothesis over statusq buffers.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtio_devices.base import VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_RING_F_EVENT_IDX
from virtio_devices.hosts.input import (
    ABS_X,
    ABS_Y,
    BTN_TOUCH,
    EV_ABS,
    EV_KEY,
    EV_LED,
    EV_MSC,
    EV_REL,
    EV_REP,
    EV_SND,
    EV_SYN,
    INPUT_PROP_DIRECT,
    KEY_A,
    LED_CAPSL,
    REP_DELAY,
    SYN_DROPPED,
    SYN_REPORT,
    PipeInputHost,
    SimInputHost,
    bitmap,
)
from virtio_devices.input import (
    CONFIG_SIZE,
    VIRTIO_ID_INPUT,
    VIRTIO_INPUT_CFG_ABS_INFO,
    VIRTIO_INPUT_CFG_EV_BITS,
    VIRTIO_INPUT_CFG_ID_DEVIDS,
    VIRTIO_INPUT_CFG_ID_NAME,
    VIRTIO_INPUT_CFG_ID_SERIAL,
    VIRTIO_INPUT_CFG_PROP_BITS,
    VIRTIO_INPUT_CFG_UNSET,
    InputDevice,
    pack_event,
)
from virtio_devices.testing import DeviceRig, FakeInterrupt
from virtio_queue.testing import vring_need_event

EVENTQ, STATUSQ = 0, 1
SYN = (EV_SYN, SYN_REPORT, 0)


def key(code: int, value: int) -> list[tuple[int, int, int]]:
    return [(EV_KEY, code, value), SYN]


def select(dev: InputDevice, sel: int, subsel: int = 0) -> tuple[int, bytes]:
    """Write select/subsel as Linux does (two one-byte writes); return (size, union)."""
    dev.write_config(0, bytes([sel]))
    dev.write_config(1, bytes([subsel]))
    cfg = dev.read_config(0, CONFIG_SIZE)
    assert len(cfg) == CONFIG_SIZE
    assert cfg[0] == sel and cfg[1] == subsel and cfg[3:8] == bytes(5)
    return cfg[2], cfg[8:]


#: Every test runs on the three ways events reach the device: the simulated device
#: (events as Python tuples), and the pipe twin of an evdev node served by the
#: compiled paths (``raw_input_events``) and by the Python path alone (the flag
#: cleared on the instance: the Rig then turns the compiled paths off).
HOSTS = ["sim", "pipe-compiled", "pipe-python"]


def make_host(kind: str, how: str) -> SimInputHost:
    if how == "sim":
        return SimInputHost(kind)
    host = PipeInputHost(kind)
    if how == "pipe-python":
        host.raw_input_events = False
    return host


@pytest.fixture(params=HOSTS)
def kbd(request: pytest.FixtureRequest) -> Iterator[SimInputHost]:
    host = make_host("keyboard", request.param)
    yield host
    host.close()


@pytest.fixture(params=HOSTS)
def tablet(request: pytest.FixtureRequest) -> Iterator[SimInputHost]:
    host = make_host("tablet", request.param)
    yield host
    host.close()


class Rig(DeviceRig):
    """The kit's rig on an InputDevice: eventq buffers, host events, used events."""

    device: InputDevice

    def __init__(
        self, host: SimInputHost, *, event_idx: bool = True, max_pending: int = 1024, **kw: object
    ) -> None:
        # The pipe twin with raw_input_events cleared: the whole Python path.
        compiled = getattr(host, "raw_input_events", True)
        device = InputDevice(host, max_pending=max_pending, compiled=compiled)
        super().__init__(device, event_idx=event_idx, **kw)  # type: ignore[arg-type]
        self.host = host
        self.bufs: dict[int, int] = {}

    def post(self, n: int, size: int = 8) -> list[int]:
        """Post ``n`` eventq buffers and kick; return their heads."""
        heads = []
        for _ in range(n):
            head, (gpa,) = self.add_request(EVENTQ, writable=[size])
            self.bufs[head] = gpa
            heads.append(head)
        return heads

    def fire(self) -> None:
        self.loop.fire_reader(self.host.fileno())

    def events(self, used: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
        out = []
        for head, length in used:
            assert length == 8, (head, length)
            out.append(struct.unpack("<HHi", self.read(self.bufs[head], 8)))
        return out


# -- identity -----------------------------------------------------------------------------------


def test_input_identity(kbd: SimInputHost) -> None:
    dev = InputDevice(kbd)
    assert dev.device_id == VIRTIO_ID_INPUT == 18
    assert dev.queue_sizes == (1024, 1024)
    assert dev.has_config
    # Upstream offers VERSION_1, INDIRECT_DESC and EVENT_IDX, not NOTIFY_ON_EMPTY.
    assert not dev.device_features() & VIRTIO_F_NOTIFY_ON_EMPTY
    assert dev.device_features() & VIRTIO_RING_F_EVENT_IDX


def test_input_max_pending_below_two_refused(kbd: SimInputHost) -> None:
    with pytest.raises(ValueError, match="max_pending 1 is below 2"):
        InputDevice(kbd, max_pending=1)


# -- config space (§5.8.4) ----------------------------------------------------------------------


def test_config_id_name_is_the_name_without_padding(kbd: SimInputHost) -> None:
    size, union = select(InputDevice(kbd), VIRTIO_INPUT_CFG_ID_NAME)
    assert union[:size] == b"vhost-device-input simulated keyboard"
    assert union[size:] == bytes(128 - size)


def test_config_id_serial(kbd: SimInputHost) -> None:
    size, union = select(InputDevice(kbd), VIRTIO_INPUT_CFG_ID_SERIAL)
    assert union[:size] == b"sim-keyboard-0"


def test_config_id_devids_size_is_eight(kbd: SimInputHost) -> None:
    """struct virtio_input_devids is 8 bytes; upstream reports 128."""
    size, union = select(InputDevice(kbd), VIRTIO_INPUT_CFG_ID_DEVIDS)
    assert size == 8
    assert struct.unpack("<HHHH", union[:8]) == (0x06, 0x0001, 0x0001, 0x0001)
    assert union[8:] == bytes(120)


def test_config_prop_bits_tablet_is_direct(tablet: SimInputHost) -> None:
    size, union = select(InputDevice(tablet), VIRTIO_INPUT_CFG_PROP_BITS)
    assert union[:size] == bitmap([INPUT_PROP_DIRECT])


def test_config_prop_bits_keyboard_has_none(kbd: SimInputHost) -> None:
    """§5.8.5.2: size 0 where the device has nothing for the select."""
    assert select(InputDevice(kbd), VIRTIO_INPUT_CFG_PROP_BITS) == (0, bytes(128))


@pytest.mark.parametrize(
    ("ev_type", "codes"),
    [(EV_KEY, range(1, 249)), (EV_MSC, [4]), (EV_LED, [0, 1, 2]), (EV_REP, [0, 1])],
)
def test_config_ev_bits_keyboard(kbd: SimInputHost, ev_type: int, codes: range | list[int]) -> None:
    """EV_LED and EV_REP too (upstream answers KEY, REL, ABS, MSC, SW only)."""
    size, union = select(InputDevice(kbd), VIRTIO_INPUT_CFG_EV_BITS, ev_type)
    want = bitmap(codes)
    assert size == len(want)
    assert union[:size] == want and union[size:] == bytes(128 - size)


@pytest.mark.parametrize("ev_type", [EV_REL, EV_ABS, EV_SND, 0x1F])
def test_config_ev_bits_type_the_keyboard_lacks_is_size_zero(kbd: SimInputHost, ev_type: int) -> None:
    assert select(InputDevice(kbd), VIRTIO_INPUT_CFG_EV_BITS, ev_type) == (0, bytes(128))


def test_config_ev_bits_tablet(tablet: SimInputHost) -> None:
    dev = InputDevice(tablet)
    size, union = select(dev, VIRTIO_INPUT_CFG_EV_BITS, EV_ABS)
    assert union[:size] == bitmap([ABS_X, ABS_Y])
    size, union = select(dev, VIRTIO_INPUT_CFG_EV_BITS, EV_KEY)
    assert union[:size] == bitmap([0x140, BTN_TOUCH])


@pytest.mark.parametrize("axis", [ABS_X, ABS_Y])
def test_config_abs_info_per_axis(tablet: SimInputHost, axis: int) -> None:
    size, union = select(InputDevice(tablet), VIRTIO_INPUT_CFG_ABS_INFO, axis)
    assert size == 20
    assert struct.unpack("<iiiii", union[:20]) == (0, 32767, 0, 0, 100)


def test_config_abs_info_unknown_axis_is_size_zero(tablet: SimInputHost) -> None:
    assert select(InputDevice(tablet), VIRTIO_INPUT_CFG_ABS_INFO, 0x35) == (0, bytes(128))


@pytest.mark.parametrize(
    ("sel", "subsel"),
    [(VIRTIO_INPUT_CFG_UNSET, 0), (0x04, 0), (0x13, 0), (0xFF, 0xFF), (VIRTIO_INPUT_CFG_ID_NAME, 1)],
)
def test_config_unknown_select_reads_zero(kbd: SimInputHost, sel: int, subsel: int) -> None:
    """§5.8.5.2: the device MUST set size to zero for an unsupported select/subsel."""
    assert select(InputDevice(kbd), sel, subsel) == (0, bytes(128))


def test_config_write_of_both_fields_at_once_and_beyond_is_ignored_there(kbd: SimInputHost) -> None:
    dev = InputDevice(kbd)
    dev.write_config(0, bytes([VIRTIO_INPUT_CFG_EV_BITS, EV_LED, 99, 1, 2, 3]))
    cfg = dev.read_config(0, CONFIG_SIZE)
    assert cfg[:3] == bytes([VIRTIO_INPUT_CFG_EV_BITS, EV_LED, 1]) and cfg[8] == 0b111
    dev.write_config(50, b"\xff" * 10)
    assert dev.read_config(0, CONFIG_SIZE) == cfg


def test_config_partial_reads(kbd: SimInputHost) -> None:
    dev = InputDevice(kbd)
    dev.write_config(0, bytes([VIRTIO_INPUT_CFG_ID_NAME, 0]))
    assert dev.read_config(2, 1) == bytes([37])
    assert dev.read_config(8, 5) == b"vhost"
    assert dev.read_config(CONFIG_SIZE, 4) == b""


# -- events: host -> eventq -----------------------------------------------------------------------


@pytest.mark.parametrize("event_idx", [True, False])
def test_events_group_delivered_on_host_readable(kbd: SimInputHost, event_idx: bool) -> None:
    """Works without EVENT_IDX too (upstream discards every event then)."""
    with Rig(kbd, event_idx=event_idx) as rig:
        rig.post(4)
        assert rig.kick(EVENTQ) == []
        kbd.inject(key(KEY_A, 1))
        rig.fire()
        used = rig.used(EVENTQ)
        assert rig.events(used) == key(KEY_A, 1)
        assert rig.interrupt.used == [EVENTQ]


def test_events_partial_group_waits_for_syn_report(kbd: SimInputHost) -> None:
    with Rig(kbd) as rig:
        rig.post(4)
        rig.kick(EVENTQ)
        kbd.inject([(EV_MSC, 4, 30), (EV_KEY, KEY_A, 1)])
        rig.fire()
        assert rig.used(EVENTQ) == []
        kbd.inject([SYN])
        rig.fire()
        assert rig.events(rig.used(EVENTQ)) == [(EV_MSC, 4, 30), (EV_KEY, KEY_A, 1), SYN]


def test_events_group_waits_for_a_buffer_per_event(kbd: SimInputHost) -> None:
    """§5.8.6.2: never a half-delivered group: two buffers for a three-event group wait."""
    with Rig(kbd) as rig:
        rig.post(2)
        rig.kick(EVENTQ)
        kbd.inject([(EV_MSC, 4, 30), (EV_KEY, KEY_A, 1), SYN])
        rig.fire()
        assert rig.used(EVENTQ) == []
        rig.post(1)
        assert rig.events(rig.kick(EVENTQ)) == [(EV_MSC, 4, 30), (EV_KEY, KEY_A, 1), SYN]


def test_events_held_without_buffers_then_kick_delivers_in_order(kbd: SimInputHost) -> None:
    with Rig(kbd) as rig:
        for code in (KEY_A, KEY_A + 1, KEY_A + 2):
            kbd.inject(key(code, 1))
            rig.fire()
        assert rig.device._held == 6
        rig.post(6)
        got = rig.events(rig.kick(EVENTQ))
        assert got == key(KEY_A, 1) + key(KEY_A + 1, 1) + key(KEY_A + 2, 1)


def test_events_kick_reads_host_without_fd_callback(kbd: SimInputHost) -> None:
    """A kick pulls what the host has (the mmio transport polls no fd)."""
    with Rig(kbd) as rig:
        kbd.inject(key(KEY_A, 0))
        rig.post(2)
        assert rig.events(rig.kick(EVENTQ)) == key(KEY_A, 0)


def test_events_negative_value_round_trips(tablet: SimInputHost) -> None:
    with Rig(tablet) as rig:
        rig.post(2)
        rig.kick(EVENTQ)
        tablet.inject([(EV_REL, 0, -5), SYN])
        rig.fire()
        assert rig.events(rig.used(EVENTQ)) == [(EV_REL, 0, -5), SYN]


def test_events_overflow_replaced_by_syn_dropped(kbd: SimInputHost) -> None:
    """A guest that never posts buffers: memory stays bounded, the lost groups are
    reported by one SYN_DROPPED and what came after it is delivered."""
    with Rig(kbd, max_pending=8) as rig:
        for i in range(100):
            kbd.inject(key(KEY_A, i & 1))
            rig.fire()
            assert rig.device._held <= 8
        rig.post(16)
        got = rig.events(rig.kick(EVENTQ))
        assert got[0] == (EV_SYN, SYN_DROPPED, 0)
        assert len(got) <= 8
        assert rig.device.dropped_groups > 0
        # Groups after the marker are whole.
        rest = got[1:]
        assert len(rest) % 2 == 0 and all(rest[i + 1] == SYN for i in range(0, len(rest), 2))


def test_events_overflow_exact_contents(kbd: SimInputHost) -> None:
    with Rig(kbd, max_pending=5) as rig:
        for code in (1, 2, 3):  # 6 events: the third group does not fit
            kbd.inject(key(code, 1))
            rig.fire()
        rig.post(8)
        assert rig.events(rig.kick(EVENTQ)) == [(EV_SYN, SYN_DROPPED, 0), *key(3, 1)]
        assert rig.device.dropped_groups == 2


def test_events_group_longer_than_max_pending_dropped(kbd: SimInputHost) -> None:
    with Rig(kbd, max_pending=4) as rig:
        kbd.inject([(EV_KEY, c, 1) for c in range(1, 10)] + [SYN])
        rig.fire()
        kbd.inject(key(KEY_A, 1))
        rig.fire()
        rig.post(8)
        assert rig.events(rig.kick(EVENTQ)) == [(EV_SYN, SYN_DROPPED, 0), *key(KEY_A, 1)]


def test_events_host_syn_dropped_skips_to_next_report(kbd: SimInputHost) -> None:
    """evdev's rule: after SYN_DROPPED, events up to the next SYN_REPORT are stale."""
    with Rig(kbd) as rig:
        rig.post(8)
        rig.kick(EVENTQ)
        kbd.inject([(EV_KEY, 5, 1), (EV_SYN, SYN_DROPPED, 0), (EV_KEY, 6, 1), SYN, *key(7, 1)])
        rig.fire()
        assert rig.events(rig.used(EVENTQ)) == [(EV_SYN, SYN_DROPPED, 0), *key(7, 1)]


def test_events_group_longer_than_ring_goes_in_parts(kbd: SimInputHost) -> None:
    with Rig(kbd, queue_size=4) as rig:
        group = [(EV_KEY, c, 1) for c in range(1, 6)] + [SYN]
        kbd.inject(group)
        rig.post(4)
        first = rig.events(rig.kick(EVENTQ))
        assert first == group[:4]
        rig.post(2)
        assert rig.events(rig.kick(EVENTQ)) == group[4:]


def test_events_stale_host_events_dropped_at_activate(kbd: SimInputHost) -> None:
    kbd.inject(key(KEY_A, 1))
    with Rig(kbd) as rig:
        rig.post(2)
        assert rig.kick(EVENTQ) == []


# -- bad eventq buffers (§5.8.6.1) -------------------------------------------------------------------


def test_eventq_short_buffer_returned_empty(kbd: SimInputHost) -> None:
    """§5.8.6.1: eventq buffers MUST be at least sizeof(virtio_input_event)."""
    with Rig(kbd) as rig:
        (bad,) = rig.post(1, size=4)
        assert rig.kick(EVENTQ) == [(bad, 0)]


def test_eventq_readable_buffer_returned_empty(kbd: SimInputHost) -> None:
    """§5.8.6.1: eventq buffers MUST be device-writable."""
    with Rig(kbd) as rig:
        bad, _ = rig.add_request(EVENTQ, readable=[b"x" * 8])
        assert rig.kick(EVENTQ) == [(bad, 0)]


def test_eventq_bad_buffer_behind_good_ones_completes_in_order(kbd: SimInputHost) -> None:
    with Rig(kbd) as rig:
        (good,) = rig.post(1)
        (bad,) = rig.post(1, size=2)
        (good2,) = rig.post(1)
        assert rig.kick(EVENTQ) == []
        kbd.inject(key(KEY_A, 1))
        rig.fire()
        assert rig.used(EVENTQ) == [(good, 8), (bad, 0), (good2, 8)]


# -- quiesce and reset ------------------------------------------------------------------------------


def test_quiesce_gives_kept_buffers_back(kbd: SimInputHost) -> None:
    with Rig(kbd) as rig:
        rig.post(3)
        rig.kick(EVENTQ)
        q = rig.queues[EVENTQ]
        assert q.next_avail() == 3
        rig.device.quiesce(EVENTQ)
        assert q.next_avail() == 0
        kbd.inject(key(KEY_A, 1))
        rig.fire()
        assert rig.used(EVENTQ) == []
        # Kicks are asked for again (VIRTIO 1.2 §2.7.10), even though nothing is held.
        assert rig.mocks[EVENTQ].avail_event() == 0
        # The next kick pops them again and delivers.
        assert len(rig.events(rig.kick(EVENTQ))) == 2


def test_quiesce_gives_back_resubmitted_buffers_not_the_entry_behind(kbd: SimInputHost) -> None:
    """After a reconnect the eventq buffers in flight are resubmitted (their pops do
    not advance next_avail): kept and given back at quiesce, they take the next
    events, and the buffer the previous back-end already used (the avail entry
    behind next_avail) is not written again (VIRTIO 1.2 §2.7.13)."""
    with Rig(kbd) as rig:
        a, b, _used_before = rig.post(3)
        rig.reconnect(EVENTQ, in_flight=[a, b])
        assert rig.kick(EVENTQ) == []
        q = rig.queues[EVENTQ]
        rig.device.quiesce(EVENTQ)
        assert q.next_avail() == 3
        assert rig.kick(EVENTQ) == []
        kbd.inject(key(KEY_A, 1))
        rig.fire()
        used = rig.used(EVENTQ)
        assert [head for head, _ in used] == [a, b]
        assert rig.events(used) == key(KEY_A, 1)


def test_reset_stops_watching_and_ungrabs(kbd: SimInputHost) -> None:
    rig = DeviceRig(InputDevice(kbd, grab=True))
    assert kbd.grabbed
    assert kbd.fileno() in rig.loop.readers
    rig.close()
    assert not kbd.grabbed
    assert kbd.fileno() not in rig.loop.readers


# -- statusq: guest -> host ------------------------------------------------------------------------


def test_statusq_led_reaches_host(kbd: SimInputHost) -> None:
    with Rig(kbd) as rig:
        head, _ = rig.add_request(STATUSQ, readable=[pack_event(EV_LED, LED_CAPSL, 1)])
        assert rig.kick(STATUSQ) == [(head, 0)]
        assert kbd.status(EV_LED, LED_CAPSL) == 1
        assert kbd.status_log == [(EV_LED, LED_CAPSL, 1)]


def test_statusq_repeat_and_several_events_in_one_buffer(kbd: SimInputHost) -> None:
    with Rig(kbd) as rig:
        data = pack_event(EV_REP, REP_DELAY, 250) + pack_event(EV_LED, 0, 1)
        head, _ = rig.add_request(STATUSQ, readable=[data])
        assert rig.kick(STATUSQ) == [(head, 0)]
        assert kbd.status_log == [(EV_REP, REP_DELAY, 250), (EV_LED, 0, 1)]


@pytest.mark.parametrize("event", [(EV_LED, 7, 1), (EV_KEY, KEY_A, 1), (EV_SND, 1, 1)])
def test_statusq_code_host_lacks_ignored(kbd: SimInputHost, event: tuple[int, int, int]) -> None:
    with Rig(kbd) as rig:
        head, _ = rig.add_request(STATUSQ, readable=[pack_event(*event)])
        assert rig.kick(STATUSQ) == [(head, 0)]
        assert kbd.status_log == []


@pytest.mark.parametrize("size", [0, 4, 7, 9, 15])
def test_statusq_wrong_size_returned_empty(kbd: SimInputHost, size: int) -> None:
    """§5.8.6.1: statusq buffers MUST be at least sizeof(virtio_input_event)."""
    with Rig(kbd) as rig:
        bad, _ = rig.add_request(
            STATUSQ, readable=[b"\x11" * size] if size else [], writable=[] if size else [8]
        )
        good, _ = rig.add_request(STATUSQ, readable=[pack_event(EV_LED, 0, 1)])
        assert rig.kick(STATUSQ) == [(bad, 0), (good, 0)]
        assert kbd.status_log == [(EV_LED, 0, 1)]


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    chunks=st.lists(st.binary(max_size=40), min_size=1, max_size=4),
    writable=st.lists(st.integers(1, 16), max_size=2),
)
def test_statusq_any_bytes_never_break_the_device(chunks: list[bytes], writable: list[int]) -> None:
    """Whatever a statusq chain holds: it is completed with length 0, the device stays
    usable, and only whole events of status types the host has reach it."""
    host = SimInputHost("keyboard")
    try:
        with Rig(host) as rig:
            head, outs = rig.add_request(STATUSQ, readable=chunks, writable=writable)
            assert rig.kick(STATUSQ) == [(head, 0)]
            for gpa, n in zip(outs, writable, strict=True):
                assert rig.read(gpa, n) == b"\xee" * n
            data = b"".join(chunks)
            if len(data) % 8 or not data:
                assert host.status_log == []
            else:
                for ev in host.status_log:
                    assert ev[0] in (EV_LED, EV_REP)
                    assert pack_event(*ev) in [data[i : i + 8] for i in range(0, len(data), 8)]
            assert rig.device.broken is None
            # Still serves an LED afterwards.
            ok, _ = rig.add_request(STATUSQ, readable=[pack_event(EV_LED, 2, 1)])
            assert rig.kick(STATUSQ) == [(ok, 0)]
            assert host.status(EV_LED, 2) == 1
    finally:
        host.close()


# -- an unplugged host ------------------------------------------------------------------------------


def test_unplugged_host_device_stays_up(kbd: SimInputHost, caplog: pytest.LogCaptureFixture) -> None:
    with Rig(kbd) as rig:
        rig.post(2)
        rig.kick(EVENTQ)
        kbd.unplugged = True
        rig.fire()
        assert rig.device.host_gone
        assert kbd.fileno() not in rig.loop.readers
        assert "is gone" in caplog.text
        # Config still answers; statusq still completes (nothing reaches the host).
        assert select(rig.device, VIRTIO_INPUT_CFG_ID_NAME)[0] > 0
        head, _ = rig.add_request(STATUSQ, readable=[pack_event(EV_LED, 0, 1)])
        assert rig.kick(STATUSQ) == [(head, 0)]
        assert rig.device.broken is None


def test_statusq_host_write_failure_is_host_fault(
    kbd: SimInputHost, caplog: pytest.LogCaptureFixture
) -> None:
    with Rig(kbd) as rig:
        kbd.unplugged = True  # reads not yet tried: the write finds it gone
        head, _ = rig.add_request(STATUSQ, readable=[pack_event(EV_LED, 0, 1)])
        assert rig.kick(STATUSQ) == [(head, 0)]
        assert "host fault" in caplog.text


# -- the compiled event path against the Python path ---------------------------------------------


def test_compiled_path_delivers_the_common_case() -> None:
    """An evdev-like host (records on its fd) with buffers posted: every event goes
    through the compiled path, grouped as the Python path groups them."""
    host = PipeInputHost("keyboard")
    try:
        with Rig(host) as rig:
            rig.post(8)
            rig.kick(EVENTQ)
            host.inject([*key(KEY_A, 1), (EV_MSC, 4, 30), (EV_KEY, KEY_A, 0), SYN])
            rig.fire()
            assert rig.events(rig.used(EVENTQ)) == [*key(KEY_A, 1), (EV_MSC, 4, 30), (EV_KEY, KEY_A, 0), SYN]
            assert rig.device.events_compiled == 5
            assert rig.interrupt.used == [EVENTQ]
    finally:
        host.close()


def test_compiled_path_unplugged_pipe_twin_is_end_of_file() -> None:
    host = PipeInputHost("keyboard")
    try:
        with Rig(host) as rig:
            rig.post(2)
            rig.kick(EVENTQ)
            host.unplugged = True
            rig.fire()
            assert rig.device.host_gone
            assert rig.device.broken is None
    finally:
        host.close()


_EVENT_ST = st.one_of(
    st.just(SYN),
    st.just((EV_SYN, SYN_DROPPED, 0)),
    st.tuples(
        st.sampled_from([EV_KEY, EV_MSC, EV_REL]), st.integers(0, 0x2FF), st.integers(-(2**31), 2**31 - 1)
    ),
)
# Rounds of: host events, eventq buffers posted before or after them, kicked or not.
_ROUNDS_ST = st.lists(
    st.tuples(st.lists(_EVENT_ST, max_size=40), st.integers(0, 24), st.booleans(), st.booleans()),
    min_size=1,
    max_size=8,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rounds=_ROUNDS_ST, max_pending=st.integers(2, 16), short=st.booleans(), ring=st.sampled_from([16, 256])
)
def test_compiled_and_python_paths_give_the_same_bytes(
    rounds: list[tuple[list[tuple[int, int, int]], int, bool, bool]], max_pending: int, short: bool, ring: int
) -> None:
    """Any host events, any buffer schedule (kicked or not: the events take what was
    posted; a small ring often posted whole), small hold queues (SYN_DROPPED), a
    short buffer now and then: the used ring and every buffer's bytes are the same
    whether the compiled path or the Python path delivered them, and so are the
    interrupts (one per batch)."""
    results = []
    for compiled in (True, False):
        host = PipeInputHost("keyboard")
        host.raw_input_events = compiled
        try:
            # The driver posts at most what the ring has room for (outstanding:
            # posted and not yet used), so a 16-entry ring is often posted whole.
            with Rig(host, max_pending=max_pending, queue_size=ring) as rig:
                seen: list[tuple[int, int, bytes]] = []
                outstanding = 0
                for n, (events, buffers, kick_first, kicked) in enumerate(rounds):
                    if kick_first and min(buffers, ring - outstanding):
                        outstanding += len(
                            rig.post(min(buffers, ring - outstanding), size=4 if short and n == 1 else 8)
                        )
                        if kicked:
                            rig.kick(EVENTQ)
                    host.inject(events)
                    rig.fire()
                    if not kick_first and min(buffers, ring - outstanding):
                        outstanding += len(rig.post(min(buffers, ring - outstanding)))
                        if kicked:
                            rig.kick(EVENTQ)
                    for head, length in rig.used(EVENTQ):
                        outstanding -= 1
                        seen.append((head, length, rig.read(rig.bufs[head], 8)))
                    seen.append((-1, rig.device.dropped_groups, b""))
                device = rig.device
                results.append((seen, device.events_delivered, device.chains_served, rig.interrupt.used))
                if compiled and any(buffers for _, buffers, _, _ in rounds):
                    assert rig.device.events_compiled <= rig.device.events_delivered
        finally:
            host.close()
    assert results[0] == results[1]


@pytest.mark.parametrize("event_idx", [True, False])
def test_compiled_keep_asks_for_kicks_only_while_groups_are_held(event_idx: bool) -> None:
    """The compiled keep takes every good buffer of a kick.  With nothing held it
    leaves kicks suppressed (VIRTIO 1.2 §2.7.10: with EVENT_IDX avail_event behind
    next_avail, else VRING_USED_F_NO_NOTIFY): the next events pop what the driver
    posts.  With groups held for want of buffers it turns them on, so the driver's
    next buffer kicks and the groups go."""
    host = SimInputHost("keyboard")
    try:
        with Rig(host, event_idx=event_idx) as rig:
            mock = rig.mocks[EVENTQ]
            rig.post(2)
            assert rig.kick(EVENTQ) == []
            assert rig.device._st.good == 2
            if event_idx:
                assert mock.avail_event() == 1  # next_avail 2: the driver never crosses it
            else:
                assert mock.used_flags() & 1  # VRING_USED_F_NO_NOTIFY
            host.inject(key(KEY_A, 1) + key(KEY_A, 0))
            rig.fire()
            assert rig.events(rig.used(EVENTQ)) == key(KEY_A, 1)
            assert rig.device._held == 2
            # Held: the ring looked at and found empty, kicks are on again.
            rig.kick(EVENTQ)
            if event_idx:
                assert mock.avail_event() == 2
            else:
                assert mock.used_flags() & 1 == 0
            rig.post(2)
            assert rig.events(rig.kick(EVENTQ)) == key(KEY_A, 0)
    finally:
        host.close()


@pytest.mark.parametrize("event_idx", [True, False])
def test_compiled_keep_of_the_whole_ring_leaves_kicks_suppressed(event_idx: bool) -> None:
    """A driver that posts every ring entry (as Linux's virtio_input fills the
    eventq): the kick that makes every entry kept finds the ring empty, which is
    done in compiled code with kicks suppressed (VIRTIO 1.2 §2.7.10), as for a
    partly posted ring; so reposts after each group do not kick, and a kick that
    comes anyway is served by the compiled kick pump, not the Python drain loop."""
    host = PipeInputHost("tablet")
    try:
        with Rig(host, event_idx=event_idx, queue_size=16) as rig:
            mock = rig.mocks[EVENTQ]
            rig.post(16)
            assert rig.kick(EVENTQ) == []
            assert rig.device._st.kept == 16
            pump = rig.device.kick_pump(EVENTQ)
            assert pump is not None
            for i in range(40):  # past the ring's size: every entry reposted twice
                group = [(EV_ABS, ABS_X, i + 1), (EV_ABS, ABS_Y, i + 2), (EV_KEY, BTN_TOUCH, i & 1), SYN]
                host.inject(group)
                assert not rig.loop.fire_pump(host.fileno())
                used = rig.used(EVENTQ)
                assert rig.events(used) == group
                old = mock.avail_idx()
                mock.publish([head for head, _ in used])
                if event_idx:
                    assert not vring_need_event(mock.avail_event(), mock.avail_idx(), old), mock.avail_event()
                else:
                    assert mock.used_flags() & 1  # VRING_USED_F_NO_NOTIFY
                if i % 2:
                    assert pump.pump() == 0  # a kick anyway: kept in compiled code, done
                    assert rig.device._st.kept == 16
            assert rig.device.events_compiled == 160
    finally:
        host.close()


@pytest.mark.parametrize("event_idx", [True, False])
def test_buffers_posted_without_a_kick_are_taken_when_events_come(kbd: SimInputHost, event_idx: bool) -> None:
    """Kicks are suppressed while nothing is held: the events pop what the driver
    posted since (as upstream pops buffers only when events come)."""
    with Rig(kbd, event_idx=event_idx) as rig:
        rig.post(1)
        rig.kick(EVENTQ)
        rig.post(3)  # no kick
        kbd.inject(key(KEY_A, 1) + key(KEY_A, 0))
        rig.fire()
        assert rig.events(rig.used(EVENTQ)) == key(KEY_A, 1) + key(KEY_A, 0)
        assert rig.interrupt.used == [EVENTQ]
        if isinstance(kbd, PipeInputHost) and kbd.raw_input_events:
            assert rig.device.events_compiled == 4


def test_bad_buffer_posted_without_a_kick_completes_in_order(kbd: SimInputHost) -> None:
    """§5.8.6.1 (eventq buffers MUST be device-writable, at least one event): a
    short buffer the events meet among the posted ones goes back empty, in order."""
    with Rig(kbd) as rig:
        (good,) = rig.post(1)
        rig.kick(EVENTQ)
        (bad,) = rig.post(1, size=4)
        (good2,) = rig.post(1)
        kbd.inject(key(KEY_A, 1))
        rig.fire()
        assert rig.used(EVENTQ) == [(good, 8), (bad, 0), (good2, 8)]


# -- the host fd served by the compiled pump (virtio_devices._pump) -------------------------------


def test_pump_serves_a_whole_group_without_the_callback(kbd: SimInputHost) -> None:
    """A loop that serves pumps (vhost-user) delivers the common case without calling
    the Python callback; the sim host and the Python path hand over to it."""
    with Rig(kbd) as rig:
        rig.post(4)
        rig.kick(EVENTQ)
        kbd.inject(key(KEY_A, 1))
        ran = rig.loop.fire_pump(kbd.fileno())
        assert rig.events(rig.used(EVENTQ)) == key(KEY_A, 1)
        assert rig.interrupt.used == [EVENTQ]
        assert ran == (rig.device.events_compiled == 0)
        if isinstance(kbd, PipeInputHost) and kbd.raw_input_events:
            assert rig.device.events_compiled == 2


def test_pump_leaves_what_does_not_fit_to_python_in_order(kbd: SimInputHost) -> None:
    """Two buffers, two groups of two: the first goes at once, the second is held
    (§5.8.6.2: a group whole or not yet) and follows the next buffers in order."""
    with Rig(kbd) as rig:
        rig.post(2)
        rig.kick(EVENTQ)
        kbd.inject(key(KEY_A, 1) + key(KEY_A, 0))
        rig.loop.fire_pump(kbd.fileno())
        assert rig.events(rig.used(EVENTQ)) == key(KEY_A, 1)
        kbd.inject(key(KEY_A + 1, 1))
        rig.loop.fire_pump(kbd.fileno())
        assert rig.used(EVENTQ) == []
        rig.post(4)
        assert rig.events(rig.kick(EVENTQ)) == key(KEY_A, 0) + key(KEY_A + 1, 1)


def test_pump_read_error_reaches_the_python_path(kbd: SimInputHost, caplog: pytest.LogCaptureFixture) -> None:
    """The host going away while the pump serves: the Python path meets the error
    and says the device is gone, as with the callback alone."""
    with Rig(kbd) as rig:
        rig.post(2)
        rig.kick(EVENTQ)
        fd = kbd.fileno()
        kbd.unplugged = True
        rig.loop.fire_pump(fd)
        assert rig.device.host_gone
        assert fd not in rig.loop.readers and fd not in rig.loop.pumps
        assert "is gone" in caplog.text


def test_events_more_than_one_read_chunk_in_order(kbd: SimInputHost) -> None:
    """A burst longer than one read of the compiled path (256 records): every group
    arrives, in the host's order."""
    groups = [key(KEY_A, i & 1) for i in range(200)]
    with Rig(kbd, queue_size=512) as rig:
        rig.post(400)
        rig.kick(EVENTQ)
        kbd.inject([ev for g in groups for ev in g])
        rig.fire()
        assert rig.events(rig.used(EVENTQ)) == [ev for g in groups for ev in g]


class _SignallerInterrupt(FakeInterrupt):
    """A transport that hands out a queue's signaller (as vhost-user does)."""

    def __init__(self) -> None:
        super().__init__()
        self.signalled: list[int] = []

    def signaller(self, queue_index: int) -> Callable[[], None]:
        return lambda: self.signalled.append(queue_index)


def test_pump_notifies_through_the_transports_signaller() -> None:
    """With a transport that hands out the eventq's signaller, the compiled pump
    notifies the driver through it (VIRTIO 1.2 §2.7.10: once per batch), not
    through ``signal_used``; the Python path keeps ``signal_used``."""
    for compiled in (True, False):
        host = PipeInputHost("keyboard")
        host.raw_input_events = compiled
        interrupt = _SignallerInterrupt()
        try:
            with Rig(host, interrupt=interrupt) as rig:
                rig.post(2)
                rig.kick(EVENTQ)
                host.inject(key(KEY_A, 1))
                rig.loop.fire_pump(host.fileno())
                assert rig.events(rig.used(EVENTQ)) == key(KEY_A, 1)
                if compiled:
                    assert interrupt.signalled == [EVENTQ] and interrupt.used == []
                else:
                    assert interrupt.used == [EVENTQ] and interrupt.signalled == []
        finally:
            host.close()


def test_eventq_head_made_available_twice_is_a_guest_fault(kbd: SimInputHost) -> None:
    """§2.7.13: the driver makes a buffer available once until it is used; a head
    offered again while kept comes back empty, and the device goes on."""
    with Rig(kbd, queue_size=4) as rig:
        heads = rig.post(4)
        rig.kick(EVENTQ)
        # add_avail: publish refuses to leave more than the ring outstanding.
        rig.mocks[EVENTQ].add_avail(heads[0])
        assert rig.kick(EVENTQ) == [(heads[0], 0)]
        assert rig.device.broken is None
        kbd.inject(key(KEY_A, 1))
        rig.fire()
        assert rig.events(rig.used(EVENTQ)) == key(KEY_A, 1)
