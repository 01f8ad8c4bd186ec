"""A test device whose chains wait: parked until a worker thread resumes them, or
completed by a worker thread (the framework's PARK/resume and worker pool end to end).

Queue 0 ("echo"), each chain's readable bytes are echoed into its writable buffers,
by one of two routes chosen by the chain's head index:

* even head: ``handle_chain`` hands the copy to :meth:`VirtioDevice.run_in_worker`
  and returns None; the worker's completion is applied on the loop thread;
* odd head: ``handle_chain`` returns PARK and asks a worker thread to call
  ``resume`` back on the loop (``call_soon_threadsafe``); ``retry_chain`` echoes.

Run it as a daemon with ``python parking_device.py SOCKET``.
"""

from __future__ import annotations

import logging
import os
import sys

from vhost_backends.daemon import run_daemons
from virtio_devices.base import COMMON_FEATURES, PARK, Park, VirtioDevice
from virtio_devices.workers import WorkerPool
from virtio_queue import DescriptorChain

POOL = WorkerPool(2, name="parking")


def echo(chain: DescriptorChain) -> int:
    data = chain.reader().read()
    w = chain.writer()
    return w.write(data[: w.available_bytes()])


class ParkingDevice(VirtioDevice):
    device_id = 0
    name = "parking"
    queue_sizes = (256,)
    features = COMMON_FEATURES
    worker_pool = POOL

    def handle_chain(self, index: int, chain: DescriptorChain) -> int | Park | None:
        if chain.head_index % 2 == 0:
            self.run_in_worker(index, chain, lambda: echo(chain))
            return None
        loop = self.loop
        assert loop is not None
        # A worker thread tells the loop to go on, as a host event would.
        POOL.submit(lambda: loop.call_soon_threadsafe(lambda: self.resume(index)))
        return PARK

    def retry_chain(self, index: int, chain: DescriptorChain) -> int:
        return echo(chain)


def main(argv: list[str]) -> int:
    level = os.environ.get("RUST_LOG")
    if level:
        logging.basicConfig(
            level={"trace": 5, "debug": 10, "info": 20, "warn": 30}.get(level, 40), stream=sys.stderr
        )
    return run_daemons("parking", argv, lambda _i: ParkingDevice())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
