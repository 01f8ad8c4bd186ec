"""A test device that raises what its requests ask for: the fault policy end to end.

Queue 0: each chain's readable bytes choose; ``guest`` raises MalformedRequest (the
guest's fault), ``host`` raises HostFault (the host's), ``bug`` raises RuntimeError
(a device bug); anything else is echoed into the writable buffers.

Run it as a daemon with ``python fault_device.py SOCKET``.
"""

from __future__ import annotations

import logging
import os
import sys

from vhost_backends.daemon import run_daemons
from virtio_devices.base import COMMON_FEATURES, VirtioDevice
from virtio_devices.errors import HostFault, MalformedRequest
from virtio_queue import DescriptorChain


class FaultDevice(VirtioDevice):
    device_id = 0
    name = "fault"
    queue_sizes = (256,)
    features = COMMON_FEATURES

    def handle_chain(self, index: int, chain: DescriptorChain) -> int:
        data = chain.reader().read()
        if data == b"guest":
            raise MalformedRequest("request 'guest' is malformed on purpose")
        if data == b"host":
            raise HostFault("the host failed request 'host' on purpose")
        if data == b"bug":
            raise RuntimeError("a bug on purpose")
        w = chain.writer()
        return w.write(data[: w.available_bytes()])


def main(argv: list[str]) -> int:
    level = os.environ.get("RUST_LOG")
    if level:
        logging.basicConfig(
            level={"trace": 5, "debug": 10, "info": 20, "warn": 30}.get(level, 40), stream=sys.stderr
        )
    return run_daemons("fault", argv, lambda _i: FaultDevice())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
