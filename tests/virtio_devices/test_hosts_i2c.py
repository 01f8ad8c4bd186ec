"""I2C host backends: the SMBus translation, /dev/i2c-N through smbus2, adapter lookup.

There is no /dev/i2c-* here.  The real backend's logic runs against a simulated
kernel instead: ``smbus2``'s own ``ioctl`` is replaced by :class:`FakeKernel`, which
answers ``I2C_FUNCS``, ``I2C_SLAVE``, ``I2C_SMBUS`` and ``I2C_RDWR`` from the ctypes
structures smbus2 builds, with a simulated 24C02 behind them, the way i2c-stub would.
What needs real hardware (a real adapter's timing and NAKs) is the e2e test inside a
guest with i2c-stub.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import logging
import os
import select
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_devices._pump import Signaller
from virtio_devices.hosts.i2c import (
    I2C_FUNC_I2C,
    I2C_FUNC_SMBUS_QUICK,
    I2C_FUNC_SMBUS_READ_BYTE,
    I2C_FUNC_SMBUS_READ_BYTE_DATA,
    I2C_FUNC_SMBUS_READ_I2C_BLOCK,
    I2C_FUNC_SMBUS_READ_WORD_DATA,
    I2C_FUNC_SMBUS_WRITE_BYTE,
    I2C_FUNC_SMBUS_WRITE_BYTE_DATA,
    I2C_FUNC_SMBUS_WRITE_I2C_BLOCK,
    I2C_FUNC_SMBUS_WRITE_WORD_DATA,
    SMBUS_FUNCS,
    HostAdapter,
    I2cBus,
    I2cError,
    I2cMsg,
    SimAdapter,
    SimSmbus,
    find_adapter,
    run_smbus_plan,
    smbus_plan,
)
from virtio_devices.i2c import VIRTIO_I2C_FLAGS_FAIL_NEXT, VIRTIO_I2C_FLAGS_M_RD, I2cDevice, out_hdr
from virtio_devices.testing import DeviceRig, FakeInterrupt
from virtio_devices.workers import WorkerPool

ALL_SMBUS = (
    SMBUS_FUNCS | I2C_FUNC_SMBUS_QUICK | I2C_FUNC_SMBUS_READ_I2C_BLOCK | I2C_FUNC_SMBUS_WRITE_I2C_BLOCK
)


def w(addr: int, data: bytes) -> I2cMsg:
    return I2cMsg(addr, False, bytearray(data))


def r(addr: int, n: int) -> I2cMsg:
    return I2cMsg(addr, True, bytearray(n))


# -- the SMBus translation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("msgs", "kinds"),
    [
        ([w(80, b"")], ["quick"]),
        ([r(80, 0)], ["quick"]),
        ([w(80, b"\x01")], ["write_byte"]),
        ([r(80, 1)], ["read_byte"]),
        ([w(80, b"\x01\x02")], ["write_byte_data"]),
        ([w(80, b"\x01\x02\x03")], ["write_word_data"]),
        ([w(80, b"\x01" + bytes(8))], ["write_i2c_block_data"]),
        ([w(80, b"\x10"), r(80, 1)], ["read_byte_data"]),
        ([w(80, b"\x10"), r(80, 2)], ["read_word_data"]),
        ([w(80, b"\x10"), r(80, 16)], ["read_i2c_block_data"]),
        # Two commands in one group, and a pair to another address taken apart.
        ([w(80, b"\x00\x01"), w(80, b"\x10"), r(80, 1)], ["write_byte_data", "read_byte_data"]),
        ([w(80, b"\x10"), r(81, 1)], ["write_byte", "read_byte"]),
    ],
)
def test_smbus_plan_reverses_linux_emulation(msgs: list[I2cMsg], kinds: list[str]) -> None:
    ops = smbus_plan(msgs, ALL_SMBUS)
    assert ops is not None
    assert [op.kind for op in ops] == kinds
    assert sum(op.nmsgs for op in ops) == len(msgs)


@pytest.mark.parametrize(
    ("msgs", "funcs"),
    [
        ([r(80, 2)], ALL_SMBUS),  # a read of 2 without a command: no SMBus command
        ([w(80, bytes(40))], ALL_SMBUS),  # longer than a block
        ([w(80, b"\x10"), r(80, 40)], ALL_SMBUS),
        ([w(80, b"")], SMBUS_FUNCS),  # no quick
        ([w(80, b"\x01\x02\x03")], I2C_FUNC_SMBUS_WRITE_BYTE_DATA),  # no word data, no block
    ],
)
def test_smbus_plan_refuses_what_no_command_covers(msgs: list[I2cMsg], funcs: int) -> None:
    assert smbus_plan(msgs, funcs) is None


def test_smbus_plan_falls_back_to_two_commands() -> None:
    funcs = I2C_FUNC_SMBUS_READ_BYTE | I2C_FUNC_SMBUS_WRITE_BYTE
    ops = smbus_plan([w(80, b"\x10"), r(80, 1)], funcs)
    assert ops is not None and [op.kind for op in ops] == ["write_byte", "read_byte"]


def test_word_data_is_little_endian() -> None:
    sim = SimAdapter([80])
    sim.devices[80].memory[0x20:0x22] = b"\x34\x12"
    port = SimSmbus(sim)
    assert port.read_word_data(80, 0x20) == 0x1234
    port.write_word_data(80, 0x30, 0xBEEF)
    assert sim.devices[80].memory[0x30:0x32] == b"\xef\xbe"


def _msg_strategy() -> st.SearchStrategy[I2cMsg]:
    addr = st.sampled_from([80, 81])
    return st.one_of(
        st.builds(w, addr, st.binary(max_size=36)),
        st.builds(r, addr, st.integers(0, 34)),
    )


@settings(max_examples=300, deadline=None)
@given(
    msgs=st.lists(_msg_strategy(), min_size=1, max_size=6),
    funcs=st.sampled_from(
        [
            ALL_SMBUS,
            SMBUS_FUNCS,
            I2C_FUNC_SMBUS_READ_BYTE | I2C_FUNC_SMBUS_WRITE_BYTE | I2C_FUNC_SMBUS_QUICK,
            I2C_FUNC_SMBUS_READ_BYTE_DATA | I2C_FUNC_SMBUS_WRITE_BYTE_DATA | I2C_FUNC_SMBUS_WRITE_WORD_DATA,
        ]
    ),
    seed=st.binary(min_size=256, max_size=256),
)
def test_smbus_path_matches_raw_i2c_on_the_simulated_eeprom(
    msgs: list[I2cMsg], funcs: int, seed: bytes
) -> None:
    """Property: a group the SMBus path can run leaves the EEPROM, the read data and
    the completed count exactly as the raw I2C transaction does (the translation is
    the inverse of Linux's emulation on a 24C02)."""
    raw_sim, smb_sim = SimAdapter([80]), SimAdapter([80])
    for s in (raw_sim, smb_sim):
        s.devices[80].memory[:] = seed
    raw_msgs = [I2cMsg(m.addr, m.read, bytearray(m.buf)) for m in msgs]
    smb_msgs = [I2cMsg(m.addr, m.read, bytearray(m.buf)) for m in msgs]
    ops = smbus_plan(smb_msgs, funcs)
    if ops is None:
        return
    for op in ops:
        need = {
            "quick": I2C_FUNC_SMBUS_QUICK,
            "read_byte": I2C_FUNC_SMBUS_READ_BYTE,
            "write_byte": I2C_FUNC_SMBUS_WRITE_BYTE,
            "read_byte_data": I2C_FUNC_SMBUS_READ_BYTE_DATA,
            "write_byte_data": I2C_FUNC_SMBUS_WRITE_BYTE_DATA,
            "read_word_data": I2C_FUNC_SMBUS_READ_WORD_DATA,
            "write_word_data": I2C_FUNC_SMBUS_WRITE_WORD_DATA,
            "read_i2c_block_data": I2C_FUNC_SMBUS_READ_I2C_BLOCK,
            "write_i2c_block_data": I2C_FUNC_SMBUS_WRITE_I2C_BLOCK,
        }[op.kind]
        assert funcs & need, f"{op.kind} planned without its function"
    done_smb = run_smbus_plan(SimSmbus(smb_sim), ops, smb_msgs)
    done_raw = raw_sim.transfer(raw_msgs)
    assert done_smb == done_raw
    assert smb_sim.devices[80].memory == raw_sim.devices[80].memory
    assert smb_sim.devices[80].pointer == raw_sim.devices[80].pointer
    for a, b in zip(smb_msgs[:done_smb], raw_msgs[:done_raw], strict=True):
        assert a.buf == b.buf


# -- /dev/i2c-N through smbus2, with a simulated kernel ------------------------------------------

try:
    impl: Any = importlib.import_module("smbus2.smbus2")
except ImportError:
    impl = None
needs_smbus2 = pytest.mark.skipif(impl is None, reason="smbus2 (the 'hosts' extra) is not installed")


class FakeKernel:
    """i2c-dev's ioctls over a :class:`SimAdapter`, for the structures smbus2 passes.

    ``gone``: every ioctl fails with ENODEV (the adapter was unbound).  ``busy``:
    addresses that I2C_SLAVE refuses with EBUSY (a kernel driver owns them).
    """

    def __init__(self, funcs: int, addrs: tuple[int, ...] = (80,)) -> None:
        self.funcs = funcs
        self.sim = SimAdapter(addrs)
        self.port = SimSmbus(self.sim)
        self.addr = -1
        self.gone = False
        self.busy: set[int] = set()
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def ioctl(self, fd: int, request: int, arg: Any = 0, *rest: Any) -> int:
        with self.lock:
            return self._ioctl(request, arg)

    def c_ioctl(self, request: int, arg: int) -> int:
        """The compiled port's hook: ``arg`` is the structure's address (the value
        for I2C_SLAVE); the kernel's structures are smbus2's ctypes ones."""
        with self.lock:
            if request == impl.I2C_SMBUS:
                return self._ioctl(request, impl.i2c_smbus_ioctl_data.from_address(arg))
            if request == impl.I2C_RDWR:
                return self._ioctl(request, impl.i2c_rdwr_ioctl_data.from_address(arg))
            return self._ioctl(request, arg)

    def _ioctl(self, request: int, arg: Any) -> int:
        if self.gone:
            raise OSError(errno.ENODEV, "No such device")
        if request == impl.I2C_FUNCS:
            self.calls.append("FUNCS")
            arg.value = self.funcs
            return 0
        if request in (impl.I2C_SLAVE, impl.I2C_SLAVE_FORCE):
            self.calls.append("SLAVE")
            if arg in self.busy:
                raise OSError(errno.EBUSY, "Device or resource busy")
            self.addr = arg
            return 0
        if request == impl.I2C_SMBUS:
            self.calls.append("SMBUS")
            return self._smbus(arg)
        if request == impl.I2C_RDWR:
            self.calls.append("RDWR")
            if not self.funcs & I2C_FUNC_I2C:
                raise OSError(errno.EOPNOTSUPP, "Operation not supported")
            msgs = []
            for i in range(arg.nmsgs):
                m = arg.msgs[i]
                data = ctypes.string_at(m.buf, m.len) if m.len else b""
                msgs.append(
                    I2cMsg(m.addr, bool(m.flags & 1), bytearray(m.len) if m.flags & 1 else bytearray(data))
                )
            if self.sim.transfer(msgs) != len(msgs):
                raise OSError(errno.ENXIO, "No such device or address")
            for i, msg in enumerate(msgs):
                if msg.read and msg.buf:
                    ctypes.memmove(arg.msgs[i].buf, bytes(msg.buf), len(msg.buf))
            return arg.nmsgs
        raise OSError(errno.ENOTTY, f"ioctl {request:#x}")

    def _smbus(self, arg: Any) -> int:
        port, a, cmd, size = self.port, self.addr, arg.command, arg.size
        data = arg.data.contents if arg.data else None  # quick and write byte pass none
        reading = arg.read_write == impl.I2C_SMBUS_READ
        if size == impl.I2C_SMBUS_QUICK:
            port.quick(a, reading)
        elif size == impl.I2C_SMBUS_BYTE:
            if reading:
                data.byte = port.read_byte(a)
            else:
                port.write_byte(a, cmd)
        elif size == impl.I2C_SMBUS_BYTE_DATA:
            if reading:
                data.byte = port.read_byte_data(a, cmd)
            else:
                port.write_byte_data(a, cmd, data.byte)
        elif size == impl.I2C_SMBUS_WORD_DATA:
            if reading:
                data.word = port.read_word_data(a, cmd)
            else:
                port.write_word_data(a, cmd, data.word)
        elif size == impl.I2C_SMBUS_I2C_BLOCK_DATA:
            n = data.block[0]
            if reading:
                got = port.read_i2c_block_data(a, cmd, n)
                for i, b in enumerate(got):
                    data.block[i + 1] = b
            else:
                port.write_i2c_block_data(a, cmd, list(data.block[1 : n + 1]))
        else:
            raise OSError(errno.EOPNOTSUPP, f"SMBus size {size}")
        return 0


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKernel]:
    if impl is None:
        pytest.skip("smbus2 (the 'hosts' extra) is not installed")
    k = FakeKernel(I2C_FUNC_I2C | ALL_SMBUS)
    monkeypatch.setattr(impl, "ioctl", k.ioctl)
    yield k


@pytest.fixture(params=[True, False], ids=["compiled", "smbus2"])
def compiled(request: pytest.FixtureRequest) -> bool:
    """Both ways to a host adapter: the compiled ioctls (and the device's compiled
    request path) and smbus2 (with the device's Python path)."""
    return bool(request.param)


def _host(kernel: FakeKernel, node: str, compiled: bool) -> HostAdapter:
    host = HostAdapter(7, path=node, compiled=compiled)
    assert (host.dev_port is not None) == compiled
    if host.dev_port is not None:
        host.dev_port.set_hook(kernel.c_ioctl)
    return host


def _complete(rig: DeviceRig, count: int = 1) -> None:
    """Apply ``count`` completions: worker jobs (Python path) or batches of the
    compiled path (its eventfd, as the loop sees it)."""
    engine = rig.device.engine  # type: ignore[attr-defined]
    if engine is None:
        rig.complete_workers(count)
        return
    for _ in range(count):
        if not engine.held():
            return  # answered at the kick already (the adapter's thread ran in its yield)
        ready, _, _ = select.select([engine.fd], [], [], 10)
        assert ready, "no batch completed within 10 s"
        rig.loop.fire_reader(engine.fd)


@pytest.fixture
def node(tmp_path: Path) -> str:
    path = tmp_path / "i2c-7"
    path.write_bytes(b"")
    return str(path)


@pytest.fixture
def pool() -> Iterator[WorkerPool]:
    p = WorkerPool(2, name="i2c-host-test")
    yield p
    p.close()


def _device(adapter: HostAdapter, pool: WorkerPool) -> I2cDevice:
    dev = I2cDevice(I2cBus([(adapter, [80])]))
    assert (dev.engine is not None) == (adapter.dev_port is not None)
    dev.worker_pool = pool
    return dev


def _request(rig: DeviceRig, flags: int, data: bytes = b"", rlen: int = 0) -> tuple[int, list[int]]:
    readable = [out_hdr(80, flags)] + ([data] if data else [])
    return rig.add_request(0, readable, [rlen, 1] if rlen else [1])


FN, RD = VIRTIO_I2C_FLAGS_FAIL_NEXT, VIRTIO_I2C_FLAGS_M_RD


def test_host_adapter_raw_mode_uses_one_i2c_rdwr_per_group(
    kernel: FakeKernel, node: str, pool: WorkerPool, compiled: bool
) -> None:
    host = _host(kernel, node, compiled)
    assert not host.smbus
    with DeviceRig(_device(host, pool), queue_size=64) as rig:
        a = _request(rig, FN, b"\x40\x01\x02\x03")
        b = _request(rig, FN, b"\x40")
        c = _request(rig, RD, rlen=3)
        used = rig.kick()
        _complete(rig)
        assert used + rig.used() == [(a[0], 1), (b[0], 1), (c[0], 4)]
        assert rig.read(c[1][0], 4) == b"\x01\x02\x03\x00"
    assert kernel.calls.count("RDWR") == 1
    host.close()


def test_quiesce_gives_back_a_resubmitted_open_group(
    kernel: FakeKernel, node: str, pool: WorkerPool, compiled: bool
) -> None:
    """After a reconnect the open group's first request is resubmitted (it does not
    advance next_avail); given back at quiesce it comes again with its end, and the
    write the previous back-end already did (the avail entry behind next_avail) is
    not done again (VIRTIO 1.2 §2.7.13: each buffer is used once)."""
    host = _host(kernel, node, compiled)
    kernel.sim.devices[80].memory[0] = 0x42
    with DeviceRig(_device(host, pool), queue_size=64) as rig:
        dev = rig.device
        a = _request(rig, FN, b"\x00")  # an open group: the pointer to 0, then...
        _request(rig, 0, b"\x00\x09")  # answered before the reconnect
        rig.reconnect(0, in_flight=[a[0]])
        assert rig.kick() == []
        assert dev.held() == 1  # type: ignore[attr-defined]
        dev.quiesce(0)
        assert rig.queues[0].next_avail() == 2 and dev.held() == 0  # type: ignore[attr-defined]
        r = _request(rig, RD, rlen=1)  # ...its end
        used = rig.kick()
        _complete(rig)
        assert used + rig.used() == [(a[0], 1), (r[0], 2)]
        assert rig.read(r[1][0], 1) == b"\x42"
    assert kernel.sim.devices[80].memory[0] == 0x42
    host.close()


@needs_smbus2
def test_host_adapter_smbus_mode_byte_and_word_data(
    monkeypatch: pytest.MonkeyPatch, node: str, pool: WorkerPool, compiled: bool
) -> None:
    """An adapter without I2C_FUNC_I2C: byte-data and word-data round trips as
    I2C_SMBUS ioctls, compiled or built by smbus2 (what i2c-stub offers)."""
    kernel = FakeKernel(SMBUS_FUNCS | I2C_FUNC_SMBUS_QUICK)
    monkeypatch.setattr(impl, "ioctl", kernel.ioctl)
    host = _host(kernel, node, compiled)
    assert host.smbus
    with DeviceRig(_device(host, pool), queue_size=64) as rig:
        _request(rig, 0, b"\x10\xab")  # write byte data
        _request(rig, 0, b"\x20\x34\x12")  # write word data
        _request(rig, FN, b"\x10")
        rb = _request(rig, RD, rlen=1)  # read byte data
        _request(rig, FN, b"\x20")
        rw = _request(rig, RD, rlen=2)  # read word data
        qk = _request(rig, 0)  # quick write
        bad = _request(rig, RD, rlen=5)  # a plain 5-byte read: no SMBus command
        got = rig.kick()
        while len(got) < 8:
            _complete(rig)
            got += rig.used()
        assert rig.read(rb[1][0], 2) == b"\xab\x00"
        assert rig.read(rw[1][0], 3) == b"\x34\x12\x00"
        assert rig.read(qk[1][0], 1) == b"\x00"
        assert rig.read(bad[1][1], 1) == b"\x01"
    assert kernel.sim.devices[80].memory[0x10] == 0xAB
    assert "RDWR" not in kernel.calls
    host.close()


def test_host_adapter_that_disappears_fails_requests_not_the_device(
    kernel: FakeKernel, node: str, pool: WorkerPool, compiled: bool
) -> None:
    host = _host(kernel, node, compiled)
    with DeviceRig(_device(host, pool), queue_size=64) as rig:
        kernel.gone = True
        h, (s,) = _request(rig, 0, b"\x00\x01")
        used = rig.kick()
        _complete(rig)
        assert used + rig.used() == [(h, 1)] and rig.read(s, 1) == b"\x01"
        kernel.gone = False
        h, (s,) = _request(rig, 0, b"\x00\x01")
        used = rig.kick()
        _complete(rig)
        assert used + rig.used() == [(h, 1)] and rig.read(s, 1) == b"\x00"
    host.close()


@needs_smbus2
def test_host_adapter_without_i2c_or_smbus_is_refused(monkeypatch: pytest.MonkeyPatch, node: str) -> None:
    kernel = FakeKernel(I2C_FUNC_SMBUS_QUICK)
    monkeypatch.setattr(impl, "ioctl", kernel.ioctl)
    with pytest.raises(I2cError, match="Invalid Adapter function: 0x10000"):
        HostAdapter(7, path=node)


def test_host_adapter_address_owned_by_a_driver_is_refused(
    kernel: FakeKernel, node: str, compiled: bool
) -> None:
    kernel.busy.add(80)
    host = _host(kernel, node, compiled)
    with pytest.raises(I2cError, match="address 80: I2C_SLAVE failed"):
        host.check_address(80)
    host.check_address(81)
    host.close()


@needs_smbus2
def test_host_adapter_missing_node() -> None:
    with pytest.raises(I2cError, match="Failed to open adapter at /nonexistent/i2c-3"):
        HostAdapter(3, path="/nonexistent/i2c-3")


@pytest.mark.skipif(not list(Path("/dev").glob("i2c-*")), reason="no /dev/i2c-* adapter on this host")
def test_real_adapter_opens() -> None:
    number = int(sorted(Path("/dev").glob("i2c-*"))[0].name.split("-")[1])
    try:
        host = HostAdapter(number)
    except I2cError as e:
        pytest.skip(f"cannot use /dev/i2c-{number}: {e}")
    assert host.funcs
    host.close()


# -- adapters by name -------------------------------------------------------------------------


def _sysfs(tmp: Path, names: dict[str, str]) -> Path:
    root = tmp / "devices"
    for entry, name in names.items():
        (root / entry).mkdir(parents=True)
        (root / entry / "name").write_text(name + "\n")
    return root


def test_find_adapter_by_trimmed_name_ignores_clients(tmp_path: Path) -> None:
    root = _sysfs(
        tmp_path, {"i2c-0": "SMBus I801 adapter", "i2c-3": " i915 gmbus dpd ", "0-0050": "i915 gmbus dpd"}
    )
    assert find_adapter("i915 gmbus dpd", root) == 3


def test_find_adapter_not_found_and_ambiguous(tmp_path: Path) -> None:
    root = _sysfs(tmp_path, {"i2c-1": "dup", "i2c-2": "dup"})
    with pytest.raises(I2cError, match="Adapter not found: no I2C adapter named 'x'"):
        find_adapter("x", root)
    with pytest.raises(I2cError, match=r"Multiple adapters share the same name 'dup' \(i2c-1, i2c-2\)"):
        find_adapter("dup", root)


def test_host_adapter_raw_mode_passes_zero_length_messages(
    kernel: FakeKernel, node: str, compiled: bool
) -> None:
    """Raw mode sends SMBus quick as a zero-length I2C_RDWR message (upstream
    refuses zero-length messages there); a NAK fails the whole transfer."""
    host = _host(kernel, node, compiled)
    assert host.transfer([I2cMsg(80, False)]) == 1
    assert host.transfer([I2cMsg(80, True)]) == 1
    assert host.transfer([I2cMsg(80, False, bytearray(b"\x00\x01")), I2cMsg(81, False)]) == 0
    assert kernel.calls.count("RDWR") == 3
    host.close()


# -- the compiled request path answers as the Python path --------------------------------------

_REQ = st.tuples(
    st.sampled_from([80, 80, 80, 81, 0x60]),  # 81: on the bus, nobody answers; 0x60: not on the bus
    st.booleans(),  # read
    st.integers(0, 36),  # length
    st.booleans(),  # FAIL_NEXT
    st.sampled_from(["ok"] * 6 + ["wrong-direction", "reserved-flag", "no-status"]),
)


def _send(rig: DeviceRig, reqs: list[tuple[int, bool, int, bool, str]]) -> list[tuple[int, int]]:
    """Add the requests as a driver would; the writable buffers to compare (gpa, len)."""
    outs: list[tuple[int, int]] = []
    for addr, rd, n, fn, shape in reqs:
        flags = (FN if fn else 0) | (RD if rd else 0) | (0x80 if shape == "reserved-flag" else 0)
        readable = [out_hdr(addr, flags)]
        writable = [1]
        if rd:
            writable = [n, 1] if n else [1]
            if shape == "wrong-direction":
                readable.append(b"\x00")
        else:
            if n:
                readable.append(bytes((addr + i * 7) & 0xFF for i in range(n)))
            if shape == "wrong-direction":
                writable = [2, 1]
        if shape == "no-status":
            writable = []
        _, gpas = rig.add_request(0, readable, writable)
        outs += list(zip(gpas, writable, strict=True))
    return outs


class CallFdInterrupt(FakeInterrupt):
    """A transport that gives a ring worker the queue's compiled Signaller over a
    call eventfd (as vhost-user does): the worker's nogil path notifies through it."""

    def __init__(self) -> None:
        super().__init__()
        self.sig = Signaller()
        self.sig.set_fd(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))

    def signaller(self, queue_index: int) -> Signaller:
        return self.sig

    def calls(self) -> int:
        try:
            return os.eventfd_read(self.sig.call_fd)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        self.sig.set_fd(-1)


class WorkerKicks:
    """The device's ring worker (``I2cDevice.ring_worker``) serving the rig's queue 0
    on its own thread, as the vhost-user transport runs it: :meth:`kick` writes the
    kick eventfd and waits for the service to end.  ``prime``: one kick with nothing
    to serve first (the first service of a run takes the GIL; with a transport that
    gives the call fd, the later ones may be served without it)."""

    def __init__(self, rig: DeviceRig, prime: bool = False) -> None:
        self.rig = rig
        worker = rig.device.ring_worker(0)
        assert worker is not None
        self.worker = worker
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.done_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        worker.notify_fd = self.done_fd
        worker.start(self.kick_fd)
        if prime:
            try:
                assert self.kick() == []
            except BaseException:
                self.close()
                raise

    def kick(self) -> list[tuple[int, int]]:
        os.eventfd_write(self.kick_fd, 1)
        p = select.poll()  # (not select: an fd number may be above FD_SETSIZE)
        p.register(self.done_fd, select.POLLIN)
        assert p.poll(10_000), "the ring worker did not serve the kick within 10 s"
        os.eventfd_read(self.done_fd)
        assert self.worker.error is None, self.worker.error
        return self.rig.used()

    def close(self) -> None:
        self.worker.stop()
        self.worker.notify_fd = -1
        os.close(self.kick_fd)
        os.close(self.done_fd)


def _run(
    rig: DeviceRig, reqs: list[tuple[int, bool, int, bool, str]], worker: bool = False, prime: bool = False
) -> tuple[list[tuple[int, int]], list[bytes]]:
    if worker:
        kicks = WorkerKicks(rig, prime)
        try:
            outs = _send(rig, reqs)
            used = kicks.kick()
        finally:
            kicks.close()
        assert rig.device.held() == 0  # type: ignore[attr-defined]
        return used, [rig.read(gpa, n) for gpa, n in outs]
    outs = _send(rig, reqs)
    used = rig.kick()
    dev = rig.device
    while dev.held():  # type: ignore[attr-defined]
        _complete(rig)
        used += rig.used()
    return used, [rig.read(gpa, n) for gpa, n in outs]


@needs_smbus2
@settings(max_examples=150, deadline=None)
@given(
    reqs=st.lists(_REQ, min_size=1, max_size=12),
    funcs=st.sampled_from(
        [
            I2C_FUNC_I2C | ALL_SMBUS,
            ALL_SMBUS,
            SMBUS_FUNCS,
            I2C_FUNC_SMBUS_READ_BYTE_DATA | I2C_FUNC_SMBUS_QUICK,
        ]
    ),
    seed=st.binary(min_size=256, max_size=256),
)
def test_compiled_path_answers_as_the_python_path(
    tmp_path_factory: pytest.TempPathFactory,
    reqs: list[tuple[int, bool, int, bool, str]],
    funcs: int,
    seed: bytes,
) -> None:
    """Property: the same requests (any shapes, groups, malformed ones, addresses
    with no device) through the compiled request path and compiled ioctls (served
    by the ring worker, without the GIL where it can, or with it, or on kicks with
    the adapter's thread), and through the Python path and smbus2, give the same
    used entries, the same bytes in every writable buffer, and the same EEPROM
    afterwards."""
    reqs[-1] = (*reqs[-1][:3], False, reqs[-1][4])  # the last group is complete
    first = reqs[: next(i for i, r in enumerate(reqs) if not r[3]) + 1]
    first_ok = sum(1 for addr, _, _, _, shape in first if shape == "ok" and addr in (80, 81))
    node = str(tmp_path_factory.mktemp("i2c") / "i2c-7")
    Path(node).write_bytes(b"")
    results = []
    kernels = []
    pool = WorkerPool(1, name="i2c-prop")
    try:
        for mode in ("worker-nogil", "worker", "compiled", "python"):
            compiled = mode != "python"
            kernel = FakeKernel(funcs, addrs=(80,))
            kernel.sim.devices[80].memory[:] = seed
            kernels.append(kernel)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(impl, "ioctl", kernel.ioctl)
                host = _host(kernel, node, compiled)
                dev = I2cDevice(I2cBus([(host, [80, 81])]))
                assert (dev.engine is not None) == compiled
                dev.worker_pool = pool
                interrupt = CallFdInterrupt()
                try:
                    with DeviceRig(dev, queue_size=64, interrupt=interrupt) as rig:
                        results.append(
                            _run(rig, reqs, worker=mode.startswith("worker"), prime=mode == "worker-nogil")
                        )
                    if mode == "worker-nogil" and len(first) == first_ok:
                        # A first group the nogil path can serve was served there.
                        assert dev.engine is not None and dev.engine.nogil_chains >= first_ok
                finally:
                    interrupt.close()
                host.close()
    finally:
        pool.close()
    assert results[0] == results[1] == results[2] == results[3]
    for k in kernels[:3]:
        assert k.sim.devices[80].memory == kernels[3].sim.devices[80].memory
        assert k.sim.devices[80].pointer == kernels[3].sim.devices[80].pointer


class GatedKernel(FakeKernel):
    """A fake kernel whose transfers wait until the test opens the gate; it notes
    the threads they ran on."""

    def __init__(self, funcs: int) -> None:
        super().__init__(funcs)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.threads: set[str] = set()

    def c_ioctl(self, request: int, arg: int) -> int:
        if request in (impl.I2C_SMBUS, impl.I2C_RDWR):
            self.threads.add(threading.current_thread().name)
            self.entered.set()
            assert self.gate.wait(10)
        return super().c_ioctl(request, arg)


@needs_smbus2
def test_compiled_path_runs_off_the_loop_in_order_and_quiesce_finishes_the_batch(
    monkeypatch: pytest.MonkeyPatch, node: str
) -> None:
    """The batch runs on the adapter's thread, never the loop's (the transfer may
    take milliseconds); quiesce waits for it and answers it, and gives the groups
    not started back to the avail ring, whole: the next kick serves them."""
    kernel = GatedKernel(I2C_FUNC_I2C | ALL_SMBUS)
    monkeypatch.setattr(impl, "ioctl", kernel.ioctl)
    host = _host(kernel, node, True)
    dev = I2cDevice(I2cBus([(host, [80])]))
    assert dev.engine is not None
    with DeviceRig(dev, queue_size=64) as rig:
        a = _request(rig, FN, b"\x00")
        b = _request(rig, RD, rlen=2)  # a write-then-read group: in the thread
        _request(rig, 0, b"\x00\x05")  # same adapter: the same batch
        rig.add_request(0, [out_hdr(0x60)], [1])  # no device: fails before the bus, waits its turn
        _request(rig, FN, b"\x00\x07")  # an open group
        assert rig.kick() == []
        assert kernel.entered.wait(10)
        assert dev.held() == 5
        opener = threading.Thread(target=kernel.gate.set)  # while quiesce waits, GIL released
        opener.start()
        dev.quiesce(0)
        opener.join()
        used = rig.used()
        assert [h for h, _ in used] == [a[0], b[0], used[2][0]] and [n for _, n in used] == [1, 3, 1]
        assert rig.read(b[1][0], 3) == b"\xff\xff\x00"
        # The failed request and the open group are back in the avail ring.
        assert rig.queues[0].next_avail() == 3
        assert dev.held() == 0
        # The 0x60 request fails at once now; the open group waits for its end.
        assert [n for _, n in rig.kick()] == [1]
        assert dev.held() == 1
    assert threading.current_thread().name not in kernel.threads
    assert kernel.sim.devices[80].memory[0] == 5
    host.close()
    assert host.dev_port is None


@needs_smbus2
def test_ring_worker_runs_transfers_on_its_thread_and_stop_finishes_them(
    monkeypatch: pytest.MonkeyPatch, node: str
) -> None:
    """The ring worker runs the transfers itself, GIL released (the loop thread
    stays free, no adapter thread starts), in ring order; stopping it with a
    transfer in flight waits for the kick's service to end: every complete group
    popped is answered, and the device's quiesce then gives the open group back to
    the avail ring, whole; a new start serves what comes next."""
    kernel = GatedKernel(I2C_FUNC_I2C | ALL_SMBUS)
    monkeypatch.setattr(impl, "ioctl", kernel.ioctl)
    host = _host(kernel, node, True)
    dev = I2cDevice(I2cBus([(host, [80])]))
    assert dev.engine is not None
    with DeviceRig(dev, queue_size=64) as rig:
        kicks = WorkerKicks(rig)
        try:
            a = _request(rig, FN, b"\x00")
            b = _request(rig, RD, rlen=2)  # a write-then-read group
            c = _request(rig, 0, b"\x00\x05")  # the next group, same adapter
            d = rig.add_request(0, [out_hdr(0x60)], [1])  # no device: fails before the bus
            _request(rig, FN, b"\x00")  # an open group: the pointer to 0, then...
            os.eventfd_write(kicks.kick_fd, 1)
            assert kernel.entered.wait(10)
            opener = threading.Thread(target=kernel.gate.set)  # while stop waits, GIL released
            opener.start()
            kicks.worker.stop()
            opener.join()
            assert os.eventfd_read(kicks.done_fd) == 1  # the service ended before stop returned
            used = rig.used()
            assert [h for h, _ in used] == [a[0], b[0], c[0], d[0]]
            assert [n for _, n in used] == [1, 3, 1, 1]
            assert rig.read(b[1][0], 3) == b"\xff\xff\x00"
            assert dev.held() == 1  # the open group
            dev.quiesce(0)
            assert rig.queues[0].next_avail() == 4 and dev.held() == 0
            # Started again (a restarted ring): the open group comes back with its end.
            kicks.worker.start(kicks.kick_fd)
            r = _request(rig, RD, rlen=1)  # ...its end: read what c wrote there
            assert [n for _, n in kicks.kick()] == [1, 2]
            assert rig.read(r[1][0], 1) == b"\x05"
        finally:
            kicks.close()
    assert kernel.threads == {f"ring-worker-fd{kicks.kick_fd}"}
    assert host.dev_port is not None and not host.dev_port.thread_running
    assert kernel.sim.devices[80].memory[0] == 5
    host.close()


@needs_smbus2
def test_ring_worker_serves_common_groups_without_the_gil_and_hands_the_rest_over(
    monkeypatch: pytest.MonkeyPatch, node: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With a transport that gives the call fd, the ring worker serves complete
    groups of well-formed requests for the bus without the GIL (serve_nogil: the
    engine's nogil counters, one call per kick); a request for an address with no
    device and a malformed one (VIRTIO 1.2 §5.19.2: the device MUST set the status
    of a request it cannot run to VIRTIO_I2C_MSG_ERR) go to the GIL path, which
    answers and logs them as before; a transfer error is answered without the GIL
    and logged by the GIL path."""
    caplog.set_level(logging.WARNING, logger="virtio_devices.i2c")
    kernel = FakeKernel(SMBUS_FUNCS | I2C_FUNC_SMBUS_QUICK)
    monkeypatch.setattr(impl, "ioctl", kernel.ioctl)
    host = _host(kernel, node, True)
    dev = I2cDevice(I2cBus([(host, [80])]))
    engine = dev.engine
    assert engine is not None and engine.port0 is host.dev_port
    interrupt = CallFdInterrupt()
    try:
        with DeviceRig(dev, queue_size=64, interrupt=interrupt) as rig:
            kicks = WorkerKicks(rig, prime=True)  # the first service of a run takes the GIL
            w = kicks.worker
            try:
                assert (w.services, w.nogil_services) == (1, 0)
                _request(rig, 0, b"\x20\x11")  # write byte data 0x20 = 0x11
                assert [n for _, n in kicks.kick()] == [1]
                _request(rig, FN, b"\x20")
                r = _request(rig, RD, rlen=1)  # read byte data 0x20: a group of two
                assert [n for _, n in kicks.kick()] == [1, 2]
                assert rig.read(r[1][0], 2) == b"\x11\x00"
                assert (w.services, w.nogil_services, engine.nogil_chains) == (3, 2, 3)
                assert interrupt.calls() == 2 and interrupt.used == []
                assert dev.chains_served == 3 and dev.bytes_served == 4
                bad = rig.add_request(0, [out_hdr(0x60)], [1])  # no device there
                assert kicks.kick() == [(bad[0], 1)]
                assert rig.read(bad[1][0], 1) == b"\x01"
                nostatus = rig.add_request(0, [out_hdr(80)], [])  # no status byte
                assert kicks.kick() == [(nostatus[0], 0)]
                assert (w.services, w.nogil_services) == (5, 2)
                assert "no device-writable byte for in_hdr.status" in caplog.text
                kernel.gone = True  # ENODEV: answered nogil, logged with the GIL
                g = _request(rig, 0, b"\x20\x12")
                assert kicks.kick() == [(g[0], 1)]
                assert rig.read(g[1][0], 1) == b"\x01"
                # (answered without the GIL, then handed over for the log)
                assert (w.services, w.nogil_services, engine.nogil_chains) == (6, 2, 4)
                assert "transfer failed: ENODEV" in caplog.text
                kernel.gone = False
                _request(rig, 0, b"\x21\x13")
                assert [n for _, n in kicks.kick()] == [1]
                assert (w.services, w.nogil_services, engine.nogil_chains) == (7, 3, 5)
                assert dev.chains_served == 7 and dev.failed == 3
            finally:
                kicks.close()
    finally:
        interrupt.close()
    assert kernel.sim.devices[80].memory[0x20:0x22] == b"\x11\x13"
    host.close()


class RefillingKernel(FakeKernel):
    """A driver that makes the other of two requests available again during every
    transfer (it was answered before this one was popped), as a driver that sends
    its next request as soon as it sees an answer, at most ``cap`` times."""

    def __init__(self, funcs: int, cap: int) -> None:
        super().__init__(funcs)
        self.cap = cap
        self.added = 0
        self.heads: list[int] = []
        self.rig: DeviceRig | None = None
        self.running = threading.Event()

    def c_ioctl(self, request: int, arg: int) -> int:
        if request in (impl.I2C_SMBUS, impl.I2C_RDWR) and self.rig is not None and self.added < self.cap:
            self.rig.mock.add_avail(self.heads[self.added % 2])
            self.added += 1
            if self.added == 10:
                self.running.set()
        return super().c_ioctl(request, arg)


@needs_smbus2
@pytest.mark.parametrize("nogil", [False, True], ids=["gil", "nogil"])
def test_ring_worker_stop_ends_a_drain_the_driver_keeps_feeding(
    monkeypatch: pytest.MonkeyPatch, node: str, nogil: bool
) -> None:
    """stop() waits for the service under way, and a driver that adds a request for
    every answer would keep that service going: a stopping worker ends it after
    what it popped, so stop() returns; what the driver added since is still
    available, and the next start serves it.  The same for a service without the
    GIL (a transport that gives the call fd)."""
    cap = 100_000
    kernel = RefillingKernel(I2C_FUNC_I2C | ALL_SMBUS, cap)
    monkeypatch.setattr(impl, "ioctl", kernel.ioctl)
    host = _host(kernel, node, True)
    dev = I2cDevice(I2cBus([(host, [80])]))
    interrupt = CallFdInterrupt()
    with DeviceRig(dev, queue_size=64, interrupt=interrupt if nogil else None) as rig:
        kicks = WorkerKicks(rig, prime=nogil)
        try:
            a = _request(rig, 0, b"\x00")
            b = _request(rig, 0, b"\x01")
            rig.mock.set_avail_idx(rig.mock.avail_idx() - 1)  # b: made available by the refills
            kernel.heads = [b[0], a[0]]
            kernel.rig = rig
            os.eventfd_write(kicks.kick_fd, 1)
            assert kernel.running.wait(10)
            kicks.worker.stop()
            assert kernel.added < cap, "stop() waited for the driver to stop adding requests"
            assert kicks.worker.error is None
            assert os.eventfd_read(kicks.done_fd) == 1  # the service ended before stop returned
            served = rig.mock.used_idx()
            assert rig.queues[0].next_avail() == served  # every request popped was answered
            assert rig.mock.avail_idx() - served in (0, 1)
            kernel.rig = None
            rig.mock.last_used = served  # the driver saw those answers
            kicks.worker.start(kicks.kick_fd)
            kicks.kick()
            assert rig.mock.used_idx() == rig.mock.avail_idx() == 1 + kernel.added
            assert (kicks.worker.nogil_services > 0) == nogil
        finally:
            kicks.close()
    interrupt.close()
    host.close()


@needs_smbus2
def test_compiled_path_two_devices_share_the_adapter_and_its_thread(
    monkeypatch: pytest.MonkeyPatch, node: str
) -> None:
    """Every socket of a daemon has its own device over the same adapters (as
    upstream's one I2cMap): both queues' batches run on the adapter's one thread,
    each answered on its own queue."""
    kernel = GatedKernel(SMBUS_FUNCS | I2C_FUNC_SMBUS_QUICK)
    monkeypatch.setattr(impl, "ioctl", kernel.ioctl)
    host = _host(kernel, node, True)
    bus = I2cBus([(host, [80])])
    devs = [I2cDevice(bus), I2cDevice(bus)]
    with DeviceRig(devs[0], queue_size=64) as rig0, DeviceRig(devs[1], queue_size=64) as rig1:
        w0 = _request(rig0, 0, b"\x20\x11")  # write byte data 0x20 = 0x11
        assert rig0.kick() == []
        assert kernel.entered.wait(10)
        _request(rig1, FN, b"\x20")
        r1 = _request(rig1, RD, rlen=1)  # read byte data 0x20: after the write, same thread
        assert rig1.kick() == []
        kernel.gate.set()
        _complete(rig0)
        _complete(rig1)
        assert rig0.used() == [(w0[0], 1)]
        assert [n for _, n in rig1.used()] == [1, 2]
        assert rig1.read(r1[1][0], 2) == b"\x11\x00"
    assert len(kernel.threads) == 1 and host.dev_port is not None
    assert host.dev_port.batches == 2
    host.close()


class _SignallerInterrupt(FakeInterrupt):
    """A transport that hands out a queue's signaller (as vhost-user does)."""

    def __init__(self) -> None:
        super().__init__()
        self.signalled: list[int] = []

    def signaller(self, queue_index: int) -> Any:
        return lambda: self.signalled.append(queue_index)


@needs_smbus2
def test_compiled_path_notifies_through_the_transports_signaller(
    monkeypatch: pytest.MonkeyPatch, node: str
) -> None:
    """With a transport that hands out the queue's signaller, the compiled path
    notifies the driver through it (VIRTIO 1.2 §2.7.10: once per batch answered),
    not through ``signal_used``; the Python path keeps ``signal_used``."""
    kernel = FakeKernel(I2C_FUNC_I2C | ALL_SMBUS)
    monkeypatch.setattr(impl, "ioctl", kernel.ioctl)
    for compiled in (True, False):
        host = _host(kernel, node, compiled)
        dev = I2cDevice(I2cBus([(host, [80])]))
        pool = WorkerPool(1, name="i2c-signal-test")
        dev.worker_pool = pool
        interrupt = _SignallerInterrupt()
        with DeviceRig(dev, queue_size=16, interrupt=interrupt) as rig:
            w = _request(rig, FN, b"\x00")
            r = _request(rig, RD, rlen=1)
            got = rig.kick()
            while not got:
                _complete(rig)
                got += rig.used()
            assert [h for h, _ in got] == [w[0], r[0]]
            if compiled:
                assert interrupt.signalled and set(interrupt.signalled) == {0} and interrupt.used == []
            else:
                assert interrupt.used and interrupt.signalled == []
        pool.close()
        host.close()
