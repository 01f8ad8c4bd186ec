"""The device drain loop (virtio_devices.base) per chain, beside the bare queue loop.

Workload: 256 one-descriptor chains of 64 device-writable bytes, published by a
``MockSplitQueue`` and drained by one ``process_queue`` call (EVENT_IDX on), both
sides timed.  Rows:

* ``drain-ref``: the bare Python loop over the same queue (``pop_chain`` +
  ``add_used`` per chain, one ``needs_notification``): the reference;
* ``drain-template``: ``TemplateDevice`` (per chain: ``handle_chain``, echo of 0
  readable bytes), the plain drain loop;
* ``drain-rng-limited``: ``RngDevice`` with a rate limit that never runs out (per
  chain: ``admit`` + ``handle_chain``, a read of ``/dev/zero``);
* ``drain-rng-fill``: ``RngDevice`` without a limit: the compiled fill path
  (``Queue.fill_from``) from ``/dev/zero``.

The ratios to ``drain-ref`` show what the framework costs per chain.
"""

from __future__ import annotations

import os
from typing import Any

import vq_workloads as W

from virtio_devices.base import VirtioDevice
from virtio_devices.hosts.files import FileEntropySource
from virtio_devices.rng import RngDevice
from virtio_devices.template import TemplateDevice
from virtio_devices.testing import FakeInterrupt, FakeLoop
from virtio_queue import GuestMemory
from virtio_queue.testing import VIRTQ_DESC_F_WRITE, MockSplitQueue, RawDesc

N = 256
ROUNDS = 4


def _ring() -> tuple[GuestMemory, int, MockSplitQueue, list[int]]:
    mem, fd = GuestMemory.memfd(1 << 22)
    mock = MockSplitQueue(mem, N)
    heads = [mock.build_desc_chain([RawDesc(mock.alloc(64), 64, VIRTQ_DESC_F_WRITE, 0)]) for _ in range(N)]
    return mem, fd, mock, heads


def _device_workload(name: str, what: str, dev: VirtioDevice, close: Any = None) -> W.Workload:
    mem, fd, mock, heads = _ring()
    q = mock.create_queue(event_idx=True, max_size=1024)
    dev.ack_features(dev.device_features())
    dev.activate(mem, [q], FakeInterrupt(), FakeLoop())

    def run(n: int) -> int:
        for _ in range(n):
            mock.publish(heads)
            dev.process_queue(0)
            mock.set_used_event(mock.used_idx())
        return n * N

    def check() -> None:
        mock.publish(heads)
        dev.process_queue(0)
        assert len(mock.used_elems()) == N

    def done() -> None:
        dev.reset()
        os.close(fd)
        if close is not None:
            close()

    return W.Workload(name, what, "chains", run, check, [mem, mock, q], done)


def _ref_workload() -> W.Workload:
    mem, fd, mock, heads = _ring()
    q = mock.create_queue(event_idx=True, max_size=1024)

    def run(n: int) -> int:
        pop, add = q.pop_chain, q.add_used
        for _ in range(n):
            mock.publish(heads)
            while (c := pop()) is not None:
                add(c.head_index, 0)
            q.needs_notification()
            mock.set_used_event(mock.used_idx())
        return n * N

    def check() -> None:
        assert run(1) == N and len(mock.used_elems()) == N

    return W.Workload(
        "drain-ref",
        "bare pop_chain + add_used loop",
        "chains",
        run,
        check,
        [mem, mock, q],
        lambda: os.close(fd),
    )


def test_drain_ref(figure: Any) -> None:
    figure(_ref_workload(), ROUNDS, group="drain")


def test_drain_template(figure: Any) -> None:
    figure(
        _device_workload("drain-template", "TemplateDevice drain loop", TemplateDevice()),
        ROUNDS,
        ref="drain-ref",
        group="drain",
    )


def test_drain_rng_limited(figure: Any) -> None:
    src = FileEntropySource("/dev/zero")
    dev = RngDevice(src, max_bytes=1 << 60)
    figure(
        _device_workload("drain-rng-limited", "RngDevice, admit + handle_chain", dev, src.close),
        ROUNDS,
        ref="drain-ref",
        group="drain",
    )


def test_drain_rng_fill(figure: Any) -> None:
    src = FileEntropySource("/dev/zero")
    dev = RngDevice(src)
    figure(
        _device_workload("drain-rng-fill", "RngDevice, compiled fill path", dev, src.close),
        ROUNDS,
        ref="drain-ref",
        group="drain",
    )
