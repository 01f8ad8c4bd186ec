"""Guest memory and the device side of the split virtqueue (rust-vmm vm-memory + virtio-queue).

The hot paths are compiled with Cython; there is deliberately no pure-Python fallback
(a daemon many times slower is worse than one that does not import).
"""

from __future__ import annotations

try:
    from ._build import BUILT_WITH_DEBUG, BUILT_WITH_XEN
    from .chain import Descriptor, DescriptorChain, Reader, Writer
    from .memory import GuestMemory, GuestRegion
    from .queue import MAX_QUEUE_SIZE, Queue
    from .source import ByteSource
except ImportError as _e:  # pragma: no cover - exercised by test_unbuilt_tree
    if "No module named 'virtio_queue." not in str(_e):
        raise
    raise ImportError(
        f"virtio_queue's compiled extensions are missing ({_e}). Build them first: "
        "`pip install -e .` (or `python setup.py build_ext --inplace`) in the source "
        "tree; add XEN=1 for the Xen build."
    ) from _e

from .errors import (
    DescriptorChainOverflow,
    GuestMemoryError,
    InvalidAvailRingIndex,
    InvalidChain,
    InvalidDescriptorIndex,
    InvalidIndirectDescriptor,
    InvalidQueueConfig,
    QueueError,
    QueueNotReady,
    VirtioError,
)

__version__ = "0.1.0"

__all__ = [
    "BUILT_WITH_DEBUG",
    "BUILT_WITH_XEN",
    "MAX_QUEUE_SIZE",
    "ByteSource",
    "Descriptor",
    "DescriptorChain",
    "DescriptorChainOverflow",
    "GuestMemory",
    "GuestMemoryError",
    "GuestRegion",
    "InvalidAvailRingIndex",
    "InvalidChain",
    "InvalidDescriptorIndex",
    "InvalidIndirectDescriptor",
    "InvalidQueueConfig",
    "Queue",
    "QueueError",
    "QueueNotReady",
    "Reader",
    "VirtioError",
    "Writer",
]
