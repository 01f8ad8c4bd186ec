"""virtio-i2c device logic (VIRTIO 1.2 §5.19) against the simulated adapter.

Requests are built as a driver does (out_hdr, optional buffer, status byte) and
driven through :class:`virtio_devices.testing.DeviceRig`; assertions are on the used
ring, the status bytes and the data in guest memory, and on the simulated EEPROM.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtio_devices.hosts.i2c import Eeprom24c02, I2cBus, I2cMsg, SimAdapter
from virtio_devices.i2c import (
    MAX_MSG_LEN,
    VIRTIO_I2C_F_ZERO_LENGTH_REQUEST,
    VIRTIO_I2C_FLAGS_FAIL_NEXT,
    VIRTIO_I2C_FLAGS_M_RD,
    VIRTIO_I2C_MSG_ERR,
    VIRTIO_I2C_MSG_OK,
    VIRTIO_ID_I2C_ADAPTER,
    I2cDevice,
    out_hdr,
)
from virtio_devices.testing import DeviceRig
from virtio_devices.workers import WorkerPool
from virtio_queue.testing import VIRTQ_DESC_F_WRITE, RawDesc

FN = VIRTIO_I2C_FLAGS_FAIL_NEXT
RD = VIRTIO_I2C_FLAGS_M_RD
OK = bytes([VIRTIO_I2C_MSG_OK])
ERR = bytes([VIRTIO_I2C_MSG_ERR])


def sim_bus(*addrs: int) -> tuple[I2cBus, SimAdapter]:
    sim = SimAdapter(addrs or (80,))
    return I2cBus([(sim, sim.devices)]), sim


def write(rig: DeviceRig, addr: int, data: bytes, flags: int = 0) -> tuple[int, int]:
    """A write request; its head and the address of its status byte."""
    readable = [out_hdr(addr, flags)] + ([data] if data else [])
    head, (status,) = rig.add_request(0, readable, [1])
    return head, status


def read(rig: DeviceRig, addr: int, n: int, flags: int = 0) -> tuple[int, int, int]:
    """A read request of ``n`` bytes; head, buffer address (or -1), status address."""
    if n == 0:
        head, (status,) = rig.add_request(0, [out_hdr(addr, flags | RD)], [1])
        return head, -1, status
    head, (buf, status) = rig.add_request(0, [out_hdr(addr, flags | RD)], [n, 1])
    return head, buf, status


# -- identity ------------------------------------------------------------------------------


def test_identity_is_i2c_adapter_with_zero_length_feature() -> None:
    dev = I2cDevice(sim_bus()[0])
    assert dev.device_id == VIRTIO_ID_I2C_ADAPTER == 34
    assert dev.queue_sizes == (1024,)
    # §5.19.3: the device MUST offer VIRTIO_I2C_F_ZERO_LENGTH_REQUEST.
    assert dev.device_features() & 1 << VIRTIO_I2C_F_ZERO_LENGTH_REQUEST
    assert dev.read_config(0, 8) == b""


# -- the simulated 24C02 -------------------------------------------------------------------


def test_eeprom_page_write_wraps_within_its_page() -> None:
    e = Eeprom24c02()
    e.write(bytes([0x06, 1, 2, 3, 4]))  # 0x06, 0x07, then back to 0x00, 0x01
    assert e.memory[6:8] == b"\x01\x02" and e.memory[0:2] == b"\x03\x04"
    assert e.memory[8] == 0xFF
    assert e.pointer == 0x02


def test_eeprom_sequential_read_wraps_at_256() -> None:
    e = Eeprom24c02(bytes(range(256)))
    e.write(b"\xfe")
    buf = bytearray(4)
    e.read(buf)
    assert buf == b"\xfe\xff\x00\x01"
    assert e.pointer == 2


def test_eeprom_refuses_wrong_size() -> None:
    with pytest.raises(ValueError, match="not 256"):
        Eeprom24c02(b"\x00" * 10)


def test_sim_adapter_nak_ends_the_transaction() -> None:
    sim = SimAdapter([80])
    msgs = [I2cMsg(80, False, bytearray(b"\x00\x42")), I2cMsg(81, True, bytearray(1)), I2cMsg(80, False)]
    assert sim.transfer(msgs) == 1
    assert sim.devices[80].memory[0] == 0x42
    assert sim.naks == 1


def test_sim_adapter_refuses_10_bit_address() -> None:
    with pytest.raises(ValueError, match="not a 7-bit"):
        SimAdapter([128])


# -- requests ---------------------------------------------------------------------------------


def test_write_then_read_group_is_a_random_read() -> None:
    bus, sim = sim_bus(80)
    with DeviceRig(I2cDevice(bus)) as rig:
        h1, s1 = write(rig, 80, bytes([0x10, 0xA1, 0xA2]))
        assert rig.kick() == [(h1, 1)]
        assert rig.read(s1, 1) == OK
        h2, s2 = write(rig, 80, b"\x10", FN)
        h3, b3, s3 = read(rig, 80, 2)
        # The read succeeded: its bytes and the status, len + 1 (§2.7.8).
        assert rig.kick() == [(h2, 1), (h3, 3)]
        assert rig.read(s2, 1) == OK and rig.read(s3, 1) == OK
        assert rig.read(b3, 2) == b"\xa1\xa2"
    assert sim.devices[80].memory[0x10:0x12] == b"\xa1\xa2"
    assert sim.transactions == 2


def test_open_group_waits_for_its_final_request_across_kicks() -> None:
    """§5.19.6.1: a group ends at the request without FAIL_NEXT, whenever it comes."""
    bus, sim = sim_bus(80)
    sim.devices[80].memory[0x33] = 0x77
    with DeviceRig(I2cDevice(bus)) as rig:
        h1, _ = write(rig, 80, b"\x33", FN)
        assert rig.kick() == []
        assert rig.device.held() == 1
        assert sim.transactions == 0
        h2, b2, _ = read(rig, 80, 1)
        assert rig.kick() == [(h1, 1), (h2, 2)]
        assert rig.read(b2, 1) == b"\x77"
        assert sim.transactions == 1


def test_zero_length_requests_probe_an_address() -> None:
    """§5.19.3: zero-length requests (SMBus quick), read and write flavours."""
    bus, _ = sim_bus(80)
    with DeviceRig(I2cDevice(bus)) as rig:
        h1, s1 = write(rig, 80, b"")
        h2, _, s2 = read(rig, 80, 0)
        h3, s3 = write(rig, 81, b"")
        h4, _, s4 = read(rig, 81, 0)
        assert rig.kick() == [(h1, 1), (h2, 1), (h3, 1), (h4, 1)]
        assert [rig.read(s, 1) for s in (s1, s2, s3, s4)] == [OK, OK, ERR, ERR]


def test_unknown_address_fails_its_group_not_the_next() -> None:
    """FAIL_NEXT: a failure fails the rest of its group and nothing after it
    (upstream gives every chain of the kick one status)."""
    bus, sim = sim_bus(80)
    with DeviceRig(I2cDevice(bus)) as rig:
        reqs = [
            write(rig, 80, b"\x00\x11", FN),  # group 1: a write to a device that exists...
            write(rig, 81, b"\x00\x22"),  # ...then one to an address with none
            write(rig, 80, b"\x01\x33", FN),  # group 2: fine
            write(rig, 80, b"\x02\x44"),
        ]
        used = rig.kick()
        assert used == [(h, 1) for h, _ in reqs]
        assert [rig.read(s, 1) for _, s in reqs] == [ERR, ERR, OK, OK]
    # Group 1 was refused whole before reaching the bus; group 2 ran.
    assert sim.devices[80].memory[0:3] == b"\xff\x33\x44"


def test_nak_in_the_middle_fails_that_request_and_the_rest_of_its_group() -> None:
    """§5.19.6.4: the first failed request gets ERR, and (MAY) the rest of its group;
    the requests before it ran and get OK."""
    bus, sim = sim_bus(80, 81)
    del sim.devices[81]  # mapped on the bus, but nobody answers: a NAK mid-transaction
    with DeviceRig(I2cDevice(bus)) as rig:
        a = write(rig, 80, b"\x05\x55", FN)
        b = write(rig, 81, b"\x00", FN)
        c = write(rig, 80, b"\x06\x66")
        d = write(rig, 80, b"\x07\x77")
        assert rig.kick() == [(a[0], 1), (b[0], 1), (c[0], 1), (d[0], 1)]
        assert [rig.read(s, 1) for _, s in (a, b, c, d)] == [OK, ERR, ERR, OK]
    assert sim.devices[80].memory[5:8] == b"\x55\xff\x77"


def test_failed_read_reports_no_data_and_writes_status() -> None:
    """A driver MUST NOT use buf of a failed read (§5.19.6.3); the device leaves it
    alone and reports used length 0, the status written after it (§2.7.8.2)."""
    bus, _ = sim_bus(80)
    with DeviceRig(I2cDevice(bus)) as rig:
        h, buf, s = read(rig, 9, 4)
        assert rig.kick() == [(h, 0)]
        assert rig.read(s, 1) == ERR
        assert rig.read(buf, 4) == b"\xee" * 4


def test_group_spanning_two_adapters_fails_whole() -> None:
    a, b = SimAdapter([80], name="a"), SimAdapter([90], name="b")
    bus = I2cBus([(a, [80]), (b, [90])])
    with DeviceRig(I2cDevice(bus)) as rig:
        r1 = write(rig, 80, b"\x00\x01", FN)
        r2 = write(rig, 90, b"\x00\x02")
        r3 = write(rig, 90, b"\x00\x03")
        assert len(rig.kick()) == 3
        assert [rig.read(s, 1) for _, s in (r1, r2, r3)] == [ERR, ERR, OK]
    assert a.transactions == 0 and b.devices[90].memory[0] == 3


def test_descriptor_split_does_not_matter() -> None:
    """§2.6.4: the device MUST NOT assume a descriptor layout: header split in two,
    data and status in one writable descriptor."""
    bus, sim = sim_bus(80)
    sim.devices[80].memory[0:3] = b"abc"
    with DeviceRig(I2cDevice(bus)) as rig:
        hdr = out_hdr(80, RD)
        g1 = rig.alloc(0, hdr[:3])
        g2 = rig.alloc(0, hdr[3:])
        out = rig.alloc(0, 4)
        head = rig.add_chain(
            0, [RawDesc(g1, 3, 0, 0), RawDesc(g2, 5, 0, 0), RawDesc(out, 4, VIRTQ_DESC_F_WRITE, 0)]
        )
        assert rig.kick() == [(head, 4)]
        assert rig.read(out, 4) == b"abc" + OK


# -- bad input: an error status or used length 0, never a crash ---------------------------------


BAD = [
    # (name, readable, writable, expected used, status offset in the writable bytes or None)
    ("short out_hdr", [b"\x00" * 7], [1], 1, 0),
    ("missing status buffer", [out_hdr(80)], [], 0, None),
    ("read with a readable buffer (wrong direction)", [out_hdr(80, RD), b"\x00"], [1], 1, 0),
    ("write with a writable buffer (wrong direction)", [out_hdr(80), b"\x00"], [4, 1], 0, 4),
    ("reserved flags bit", [out_hdr(80, 1 << 5)], [1], 1, 0),
    ("10-bit address", [struct.pack("<HHI", 0xF000 | 80 << 1, 0, 0)], [1], 1, 0),
    ("address bit 0 set", [struct.pack("<HHI", 80 << 1 | 1, 0, 0)], [1], 1, 0),
    ("buffer beyond the limit", [out_hdr(80), b"\x00" * (MAX_MSG_LEN + 1)], [1], 1, 0),
]


@pytest.mark.parametrize(("name", "readable", "writable", "used", "status_at"), BAD, ids=[b[0] for b in BAD])
def test_bad_request_fails_and_the_next_group_still_works(
    name: str, readable: list[bytes], writable: list[int], used: int, status_at: int | None
) -> None:
    """§5.19.6.3's driver MUSTs (header, M_RD matching the buffer's direction,
    reserved bits zero, 7-bit addr) broken one at a time: the request fails, the
    daemon does not, and the request after it is served."""
    bus, _ = sim_bus(80)
    with DeviceRig(I2cDevice(bus), memory_size=1 << 21) as rig:
        head, outs = rig.add_request(0, readable, writable)
        good, s = write(rig, 80, b"\x00\x5a")
        assert rig.kick() == [(head, used), (good, 1)]
        if status_at is not None:
            last = outs[-1]
            assert rig.read(last + (status_at if len(outs) == 1 else 0), 1) == ERR
        assert rig.read(s, 1) == OK
        assert rig.device.failed == 1


def test_bad_request_in_a_group_fails_the_group_before_the_bus() -> None:
    bus, sim = sim_bus(80)
    with DeviceRig(I2cDevice(bus)) as rig:
        a = write(rig, 80, b"\x00\x01", FN)
        _, (sb,) = rig.add_request(0, [out_hdr(80, FN | RD), b"junk"], [1])
        c = write(rig, 80, b"\x01\x02")
        assert len(rig.kick()) == 3
        assert [rig.read(x, 1) for x in (a[1], sb, c[1])] == [ERR, ERR, ERR]
    assert sim.transactions == 0


def test_descriptor_outside_memory_is_answered() -> None:
    bus, _ = sim_bus(80)
    with DeviceRig(I2cDevice(bus)) as rig:
        hdr = rig.alloc(0, out_hdr(80))
        st_ = rig.alloc(0, 1)
        head = rig.add_chain(
            0, [RawDesc(hdr, 8, 0, 0), RawDesc(1 << 40, 4, 0, 0), RawDesc(st_, 1, VIRTQ_DESC_F_WRITE, 0)]
        )
        assert rig.kick() == [(head, 1)]
        assert rig.read(st_, 1) == ERR


def test_group_that_fills_the_ring_runs_as_it_is() -> None:
    """A driver cannot add a group's final request when the ring is full
    (Linux's virtio_i2c_prepare_reqs stops there and kicks): the device runs what it
    holds instead of waiting, and the next request starts a new group."""
    bus, sim = sim_bus(80)
    with DeviceRig(I2cDevice(bus), queue_size=4) as rig:
        a = write(rig, 80, b"\x00\x01", FN)  # 3 descriptors of 4: no room for another
        assert rig.kick() == [(a[0], 1)]
        assert rig.read(a[1], 1) == OK
        b = write(rig, 80, b"\x01\x02")
        assert rig.kick() == [(b[0], 1)]
    assert sim.transactions == 2


def test_ring_filling_request_alone_does_not_shrink_the_next_group() -> None:
    """After a lone FAIL_NEXT request that filled the ring ran by itself, the next
    group starts from an empty count and waits for its final request as usual."""
    bus, sim = sim_bus(80)
    with DeviceRig(I2cDevice(bus), queue_size=4) as rig:
        hdr = rig.alloc(0, out_hdr(80, FN))
        data = rig.alloc(0, b"\x00\x01\x02")
        st1 = rig.alloc(0, 1)
        st2 = rig.alloc(0, 1)
        # 4 descriptors: the ring is full with this one chain.
        head = rig.add_chain(
            0,
            [
                RawDesc(hdr, 8, 0, 0),
                RawDesc(data, 1, 0, 0),
                RawDesc(data + 1, 2, 0, 0),
                RawDesc(st1, 1, VIRTQ_DESC_F_WRITE, 0),
            ],
        )
        assert rig.kick() == [(head, 1)]
        assert rig.read(st1, 1) == OK
        h1 = rig.add_chain(0, [RawDesc(hdr, 8, 0, 0), RawDesc(st2, 1, VIRTQ_DESC_F_WRITE, 0)])
        assert rig.kick() == []  # 2 entries of 4 held: room for the final request
        assert rig.device.held() == 1
        h2, s2 = write(rig, 80, b"")
        assert rig.kick() == [(h1, 1), (h2, 1)]
        assert rig.read(s2, 1) == OK
    assert sim.devices[80].memory[0:2] == b"\x01\x02"


# -- workers (an adapter that may block) -------------------------------------------------------


class GatedAdapter(SimAdapter):
    """A simulated adapter whose transfers block until the test opens the gate."""

    blocking = True

    def __init__(self, addrs: Sequence[int]) -> None:
        super().__init__(addrs, name="gated")
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.threads: set[str] = set()

    def transfer(self, msgs: Sequence[I2cMsg]) -> int:
        self.threads.add(threading.current_thread().name)
        self.entered.set()
        assert self.gate.wait(10)
        return super().transfer(msgs)


@pytest.fixture
def pool() -> WorkerPool:
    p = WorkerPool(2, name="i2c-test")
    yield p  # type: ignore[misc]
    p.close()


def test_blocking_adapter_runs_off_the_loop_in_order(pool: WorkerPool) -> None:
    gated = GatedAdapter([80])
    dev = I2cDevice(I2cBus([(gated, [80])]))
    dev.worker_pool = pool
    with DeviceRig(dev) as rig:
        a = write(rig, 80, b"\x00\x01")
        b = write(rig, 80, b"\x00\x02")  # must run after a: same register
        c = write(rig, 81, b"")  # fails without the bus, but answers in ring order
        assert rig.kick() == []
        assert gated.entered.wait(10)
        assert dev.held() == 3
        gated.gate.set()
        rig.complete_workers(1)
        rig.complete_workers(1)
        assert rig.used() == [(a[0], 1), (b[0], 1), (c[0], 1)]
        assert [rig.read(s, 1) for _, s in (a, b, c)] == [OK, OK, ERR]
        assert rig.interrupt.used
    assert gated.devices[80].memory[0] == 2
    assert gated.threads and threading.current_thread().name not in gated.threads


def test_quiesce_finishes_the_transfer_and_gives_back_the_rest(pool: WorkerPool) -> None:
    gated = GatedAdapter([80])
    dev = I2cDevice(I2cBus([(gated, [80])]))
    dev.worker_pool = pool
    with DeviceRig(dev) as rig:
        a = write(rig, 80, b"\x00\x01")
        write(rig, 80, b"\x00\x02")  # waits behind a
        write(rig, 80, b"\x00\x03", FN)  # open group
        assert rig.kick() == []
        assert gated.entered.wait(10)
        threading.Timer(0.01, gated.gate.set).start()
        dev.quiesce(0)
        assert rig.used() == [(a[0], 1)]
        # The two chains not run are back in the avail ring.
        assert rig.queues[0].next_avail() == 1
        assert dev.held() == 0
        # A late completion (posted by the worker) is dropped.
        rig.loop.run_soon()
        assert rig.used() == []
        # The next kick serves them again, whole.
        assert gated.gate.is_set()
        rig.device.process_queue(0)
        rig.complete_workers(1)
    assert gated.devices[80].memory[0] == 2


def test_quiesce_gives_back_resubmitted_groups_in_order(pool: WorkerPool) -> None:
    """After a reconnect the requests in flight are resubmitted (their pops do not
    advance next_avail): the group waiting for the running one and the open group
    go back in order, and the avail entry behind next_avail (a write the previous
    back-end answered) is not served again (VIRTIO 1.2 §2.7.13)."""
    gated = GatedAdapter([80])
    dev = I2cDevice(I2cBus([(gated, [80])]))
    dev.worker_pool = pool
    with DeviceRig(dev) as rig:
        a = write(rig, 80, b"\x00\x01")
        b = write(rig, 80, b"\x00\x02")  # waits behind a
        c = write(rig, 80, b"\x00", FN)  # open group
        write(rig, 80, b"\x00\x09")  # answered before the reconnect
        rig.reconnect(0, in_flight=[a[0], b[0], c[0]])
        assert rig.kick() == []
        assert gated.entered.wait(10)
        threading.Timer(0.01, gated.gate.set).start()
        dev.quiesce(0)
        assert rig.used() == [(a[0], 1)]
        assert rig.queues[0].next_avail() == 4
        rig.loop.run_soon()  # a's late completion (posted by the worker) is dropped
        d, buf, _ = read(rig, 80, 1)  # the open group's end
        rig.device.process_queue(0)
        rig.complete_workers(1)
        rig.complete_workers(1)
        assert rig.used() == [(b[0], 1), (c[0], 1), (d, 2)]
        assert rig.read(buf, 1) == b"\x02"
    assert gated.devices[80].memory[0] == 2


def test_reset_gives_back_an_open_group() -> None:
    bus, sim = sim_bus(80)
    dev = I2cDevice(bus)
    rig = DeviceRig(dev)
    write(rig, 80, b"\x00", FN)
    assert rig.kick() == []
    queue = rig.queues[0]
    dev.reset()
    assert queue.next_avail() == 0
    assert sim.transactions == 0
    rig.close()


# -- hypothesis: any request bytes ------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    chains=st.lists(
        st.tuples(
            st.binary(min_size=0, max_size=12),  # out_hdr bytes (maybe short or long)
            st.lists(st.integers(0, 40), max_size=3),  # further readable buffers
            st.lists(st.integers(0, 40), max_size=3),  # writable buffers
            st.sampled_from([80, 81, 127]),  # address put in a well-formed header
            st.integers(0, 7),  # flags put in a well-formed header
            st.booleans(),  # use the raw bytes instead of a well-formed header
        ),
        min_size=1,
        max_size=12,
    )
)
def test_any_requests_are_answered_without_writing_outside_writable_buffers(chains: list) -> None:
    """Property: whatever the chains, the device returns each (maybe after the next
    kick completes its group), never raises, writes only device-writable buffers,
    and a status it writes is OK or ERR."""
    bus, _ = sim_bus(80)
    dev = I2cDevice(bus)
    with DeviceRig(dev, queue_size=64, memory_size=1 << 20) as rig:
        writable_spans: list[tuple[int, int]] = []
        readable_spans: list[tuple[int, bytes]] = []
        heads = []
        for raw, rsizes, wsizes, addr, flags, use_raw in chains:
            hdr = raw if use_raw else out_hdr(addr, flags)
            readable = [hdr, *(bytes([i & 0xFF]) * n for i, n in enumerate(rsizes))]
            readable = [r for r in readable if r] or [b""]
            descs = []
            for data in readable:
                gpa = rig.alloc(0, data or 1)
                descs.append(RawDesc(gpa, len(data), 0, 0))
                readable_spans.append((gpa, data))
            for n in wsizes:
                gpa = rig.alloc(0, n or 1)
                descs.append(RawDesc(gpa, n, VIRTQ_DESC_F_WRITE, 0))
                writable_spans.append((gpa, n))
            heads.append((rig.add_chain(0, descs), sum(wsizes)))
        used = rig.kick()
        # Close any group left open so that every chain comes back.
        closer, _ = write(rig, 80, b"")
        used += rig.kick()
        assert sorted(h for h, _ in used) == sorted([h for h, _ in heads] + [closer])
        limits = dict(heads)
        for head, n in used:
            assert n <= limits.get(head, 1)
        # Readable buffers are untouched (a device MUST NOT write them).
        for gpa, data in readable_spans:
            assert rig.read(gpa, len(data)) == data
        assert dev.held() == 0
