"""The asyncio adapter for the device EventLoop protocol (virtio_devices.aio).

Each protocol method against a real asyncio loop, then devices living inside an
asyncio program behind the mmio transport: rng parked on an empty pipe and resumed
by the loop's reader, and a device completing from worker threads through
``call_soon_threadsafe``.  Waits are on events with timeouts, never sleeps.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from virtio_devices.aio import AsyncioLoop
from virtio_devices.base import EventLoop, VirtioDevice
from virtio_devices.hosts.files import FdEntropySource
from virtio_devices.mmio import MmioTransport
from virtio_devices.rng import RngDevice
from virtio_devices.testing import IrqLine, MmioDriver
from virtio_queue import DescriptorChain, GuestMemory

TIMEOUT = 10.0


def run_async(fn: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run the coroutine test on a fresh asyncio loop (no pytest plugin needed)."""

    @functools.wraps(fn)
    def test() -> None:
        asyncio.run(fn())

    return test


def test_adapter_is_an_event_loop() -> None:
    loop = asyncio.new_event_loop()
    try:
        adapted: EventLoop = AsyncioLoop(loop)  # mypy checks the protocol here
        assert isinstance(adapted, AsyncioLoop)
    finally:
        loop.close()


def test_no_running_loop_raises() -> None:
    with pytest.raises(RuntimeError):
        AsyncioLoop()


@run_async
async def test_reader_fires_until_removed() -> None:
    loop = AsyncioLoop()
    r, w = os.pipe()
    fired = asyncio.Event()
    calls: list[bytes] = []

    def on_readable() -> None:
        calls.append(os.read(r, 10))
        fired.set()

    try:
        loop.add_reader(r, on_readable)
        os.write(w, b"x")
        await asyncio.wait_for(fired.wait(), TIMEOUT)
        loop.remove_reader(r)
        loop.remove_reader(r)  # not watched any more: ignored
        loop.remove_reader(w)  # never watched: ignored
        assert calls == [b"x"]
        assert not loop.loop.remove_reader(r)
    finally:
        os.close(r)
        os.close(w)


@run_async
async def test_call_later_fires_and_cancel_prevents() -> None:
    loop = AsyncioLoop()
    ran: list[str] = []
    done = asyncio.Event()
    cancelled = loop.call_later(0.0, lambda: ran.append("cancelled"))
    cancelled.cancel()
    cancelled.cancel()  # twice is harmless

    def fire() -> None:
        ran.append("fired")
        done.set()

    loop.call_later(0.001, fire)
    await asyncio.wait_for(done.wait(), TIMEOUT)
    # The cancelled timer was due first: had it run, it would be in the list.
    assert ran == ["fired"]


@run_async
async def test_call_soon_threadsafe_in_order_on_the_loop_thread() -> None:
    loop = AsyncioLoop()
    seen: list[tuple[int, int]] = []
    done = asyncio.Event()
    n = 50

    def post(i: int) -> Callable[[], None]:
        def cb() -> None:
            seen.append((i, threading.get_ident()))
            if i == n - 1:
                done.set()

        return cb

    def worker() -> None:
        for i in range(n):
            loop.call_soon_threadsafe(post(i))

    t = threading.Thread(target=worker)
    t.start()
    await asyncio.wait_for(done.wait(), TIMEOUT)
    t.join(TIMEOUT)
    assert [i for i, _ in seen] == list(range(n))
    assert {tid for _, tid in seen} == {threading.get_ident()}


def test_closed_loop_drops_callbacks() -> None:
    """The protocol: a loop that is closed drops callbacks posted to it."""
    raw = asyncio.new_event_loop()
    loop = AsyncioLoop(raw)
    raw.close()
    loop.call_soon_threadsafe(lambda: None)  # no exception


class _Vmm:
    """Guest memory, a transport on the running asyncio loop and a driver; the IRQ
    line sets an asyncio event."""

    def __init__(self, device: VirtioDevice) -> None:
        self.memory, self._fd = GuestMemory.memfd(1 << 20)
        self.irq_event = asyncio.Event()
        self.irq = IrqLine(on_raise=self.irq_event.set)
        self.transport = MmioTransport(device, self.memory, AsyncioLoop(), self.irq)
        self.driver = MmioDriver(self.transport, self.memory, irq=self.irq)
        self.driver.init(queue_size=8)

    async def wait_used(self, index: int = 0) -> list[tuple[int, int]]:
        while True:
            self.driver.interrupt()
            used = self.driver.used(index)
            if used:
                return used
            self.irq_event.clear()
            await asyncio.wait_for(self.irq_event.wait(), TIMEOUT)

    def close(self) -> None:
        self.transport.close()
        os.close(self._fd)


@run_async
async def test_rng_parked_on_empty_pipe_resumes_from_asyncio_reader() -> None:
    """rng's PARK path under asyncio: the source has nothing, the chain waits on the
    loop's reader; bytes arrive, the reader resumes the queue, the IRQ line rises."""
    r, w = os.pipe()
    source = FdEntropySource(r)
    vmm = _Vmm(RngDevice(source))
    try:
        head, (out,) = vmm.driver.add_request(0, [], [4])
        vmm.driver.notify(0)
        assert vmm.driver.used(0) == [] and vmm.transport.device.parked(0) is not None
        os.write(w, b"\x01\x02\x03\x04")
        assert await vmm.wait_used() == [(head, 4)]
        assert vmm.memory.read(out, 4) == b"\x01\x02\x03\x04"
    finally:
        vmm.close()
        source.close()
        os.close(w)


class _WorkerEcho(VirtioDevice):
    """The template's echo, done on a worker thread."""

    name = "worker-echo"
    device_id = 0xB0
    queue_sizes = (8,)

    def handle_chain(self, index: int, chain: DescriptorChain) -> None:
        def echo() -> int:
            reader, writer = chain.reader(), chain.writer()
            return writer.write(reader.read(min(reader.available_bytes(), writer.available_bytes())))

        self.run_in_worker(index, chain, echo)


@run_async
async def test_worker_completions_come_back_through_asyncio() -> None:
    vmm = _Vmm(_WorkerEcho())
    try:
        heads = [vmm.driver.add_request(0, [bytes([i]) * 3], [3])[0] for i in range(3)]
        vmm.driver.notify(0)
        got: list[tuple[int, int]] = []
        while len(got) < 3:
            got += await vmm.wait_used()
        assert sorted(got) == sorted((h, 3) for h in heads)
    finally:
        vmm.close()
