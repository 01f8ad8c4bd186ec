#!/usr/bin/env python3
"""A tiny Python "VMM" that embeds a virtio-rng device over virtio-mmio, no vhost-user.

What a VMM does, in a few lines each:

1. own the guest's memory (here 1 MiB of memfd RAM at guest address 0);
2. map a device on its MMIO bus: a :class:`~virtio_devices.mmio.MmioTransport` over
   :class:`~virtio_devices.rng.RngDevice`, at ``0xd000_0000`` with an interrupt line;
3. forward the guest's loads and stores in that window to the transport (a real VMM
   does it from its KVM_EXIT_MMIO handler; here the "guest" is the kit's
   :class:`~virtio_devices.testing.MmioDriver`, which probes and initialises the device
   the way Linux's virtio_mmio does);
4. run the device on the VMM's asyncio loop (:class:`~virtio_devices.aio.AsyncioLoop`).

Then the "guest" asks for entropy and the script prints the bytes it got::

    python examples/embed_rng.py                 # 16 bytes from /dev/urandom
    python examples/embed_rng.py -n 32 -f FILE   # the first 32 bytes of FILE
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from virtio_devices.aio import AsyncioLoop
from virtio_devices.hosts.files import FileEntropySource
from virtio_devices.mmio import MMIO_SIZE, MmioTransport
from virtio_devices.rng import RngDevice
from virtio_devices.testing import IrqLine, MmioDriver
from virtio_queue import GuestMemory

RNG_BASE = 0xD000_0000  # where the VMM maps the device's register window
RNG_IRQ = 5  # the interrupt line it wires up (for the "device tree" line below)


class MmioBus:
    """The VMM's MMIO bus: guest-physical windows mapped to devices."""

    def __init__(self) -> None:
        self.windows: list[tuple[int, int, MmioTransport]] = []

    def map(self, base: int, size: int, device: MmioTransport) -> None:
        self.windows.append((base, size, device))

    def _find(self, addr: int) -> tuple[int, MmioTransport] | None:
        for base, size, device in self.windows:
            if base <= addr < base + size:
                return base, device
        return None

    def load(self, addr: int, size: int) -> int:
        """A guest load (KVM_EXIT_MMIO, is_write=0); unmapped addresses read as all ones."""
        hit = self._find(addr)
        return hit[1].read(addr - hit[0], size) if hit else (1 << (8 * size)) - 1

    def store(self, addr: int, size: int, value: int) -> None:
        """A guest store (KVM_EXIT_MMIO, is_write=1); unmapped addresses ignore it."""
        hit = self._find(addr)
        if hit:
            hit[1].write(addr - hit[0], size, value)


class Window:
    """The guest's view of one device: its register window on the bus."""

    def __init__(self, bus: MmioBus, base: int) -> None:
        self.bus, self.base = bus, base

    def read(self, offset: int, size: int) -> int:
        return self.bus.load(self.base + offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.bus.store(self.base + offset, size, value)


async def run(source_path: str, nbytes: int) -> bytes:
    memory, memfd = GuestMemory.memfd(1 << 20)  # 1. guest RAM
    irq_seen = asyncio.Event()
    line = IrqLine(on_raise=irq_seen.set)  # the interrupt controller's input
    source = FileEntropySource(source_path)
    bus = MmioBus()
    rng = MmioTransport(RngDevice(source), memory, AsyncioLoop(), line)  # 2. and 4.
    bus.map(RNG_BASE, MMIO_SIZE, rng)
    print(f"virtio_mmio.device={MMIO_SIZE:#x}@{RNG_BASE:#x}:{RNG_IRQ}", file=sys.stderr)
    try:
        guest = MmioDriver(Window(bus, RNG_BASE), memory, irq=line)  # 3. the guest's driver
        guest.init(queue_size=16)
        head, (buf,) = guest.add_request(0, writable=[nbytes])
        guest.notify(0)
        while True:  # the guest waits for its interrupt, then reads the used ring
            await asyncio.wait_for(irq_seen.wait(), 10.0)
            irq_seen.clear()
            guest.interrupt()
            used = dict(guest.used(0))
            if head in used:
                return memory.read(buf, used[head])
    finally:
        rng.close()
        source.close()
        os.close(memfd)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", "--bytes", type=int, default=16, help="how many bytes to ask for [16]")
    p.add_argument("-f", "--source", default="/dev/urandom", help="entropy file [/dev/urandom]")
    ns = p.parse_args(argv)
    data = asyncio.run(run(ns.source, ns.bytes))
    print(data.hex())
    return 0


if __name__ == "__main__":
    sys.exit(main())
