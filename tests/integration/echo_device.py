"""A tiny test device for the vhost-user tests: echoes readable bytes into writable ones.

Queue 0 ("echo"): each chain's device-readable bytes are copied, in order, into its
device-writable buffers; the used length is what was written.  Queue 1 exists so
that tests can address a second ring.  Its 8-byte config space is
``b"ECHO" + u32 generation``; writes at offset 4 set the generation and trigger a
config-change notification.

Run it as a daemon with ``python echo_device.py SOCKET [SOCKET...]`` (logs to stderr
when ``RUST_LOG`` is set).
"""

from __future__ import annotations

import logging
import os
import struct
import sys

from vhost_backends.daemon import ListenError, run_daemons
from virtio_devices.base import COMMON_FEATURES, VirtioDevice
from virtio_queue import DescriptorChain


class EchoDevice(VirtioDevice):
    device_id = 0
    name = "echo"
    queue_sizes = (256, 64)
    features = COMMON_FEATURES
    has_config = True

    def __init__(self) -> None:
        super().__init__()
        self.generation = 0
        self.activations = 0
        self.resets = 0

    def config_space(self) -> bytes:
        return b"ECHO" + struct.pack("<I", self.generation)

    def write_config(self, offset: int, data: bytes) -> None:
        if offset == 4 and len(data) == 4:
            self.generation = struct.unpack("<I", data)[0]
            if self.interrupt is not None:
                self.interrupt.signal_config_change()

    def activate(self, memory, queues, interrupt, loop) -> None:  # type: ignore[no-untyped-def]
        super().activate(memory, queues, interrupt, loop)
        self.activations += 1

    def reset(self) -> None:
        super().reset()
        self.resets += 1

    def process_queue(self, index: int) -> None:
        self.process_chains(index)

    def handle_chain(self, index: int, chain: DescriptorChain) -> int | None:
        data = chain.reader().read()
        w = chain.writer()
        n = min(len(data), w.available_bytes())
        w.write(data[:n])
        return n


def main(argv: list[str]) -> int:
    level = os.environ.get("RUST_LOG")
    if level:
        logging.basicConfig(
            level={"trace": 5, "debug": 10, "info": 20, "warn": 30}.get(level, 40), stream=sys.stderr
        )
    poll = os.environ.get("VHD_POLL_US")
    try:
        poll_max_us = None if poll is None else int(poll)
        return run_daemons("echo", argv, lambda _i: EchoDevice(), poll_max_us=poll_max_us)
    except ListenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
