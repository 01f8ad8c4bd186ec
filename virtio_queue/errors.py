"""The error tree shared by every layer of vhost-device for Python.

Class names follow the rust-vmm variants (``vm-memory``'s ``GuestMemoryError``,
``virtio-queue``'s ``Error`` enum, ``vhost``'s ``vhost_user::Error``) so that logs and
bug reports line up with the Rust daemons.  Errors caused by bad input also
subclass :class:`ValueError`.
"""

from __future__ import annotations

__all__ = [
    "DescriptorChainOverflow",
    "GuestMemoryError",
    "InvalidAvailRingIndex",
    "InvalidChain",
    "InvalidDescriptorIndex",
    "InvalidIndirectDescriptor",
    "InvalidQueueConfig",
    "QueueError",
    "QueueNotReady",
    "VirtioError",
]


class VirtioError(Exception):
    """Root of every error raised by this project for a guest, front-end or config fault."""


class GuestMemoryError(VirtioError, ValueError):
    """A guest physical address range is unmapped, overflows, or crosses regions.

    Raised by address translation.  The caller treats the request that named the
    address as malformed: drop the chain (or mark the queue broken), never retry.
    """


class QueueError(VirtioError):
    """A virtqueue or one of its descriptor chains breaks the VIRTIO 1.2 §2.7 rules."""


class InvalidChain(QueueError, ValueError):
    """A descriptor chain is malformed (a cycle, a zero-length indirect table, a write
    through a device-readable buffer...).  Drop the chain; the queue stays usable."""


class InvalidDescriptorIndex(QueueError, ValueError):
    """A head or ``next`` index is not below the queue size (VIRTIO 1.2 §2.7.5)."""


class InvalidIndirectDescriptor(InvalidChain):
    """An indirect descriptor breaks VIRTIO 1.2 §2.7.5.3: nested, combined with NEXT,
    or with a table length that is zero or not a multiple of 16."""


class DescriptorChainOverflow(InvalidChain):
    """The total length of a chain exceeds 2^32 bytes (VIRTIO 1.2 §2.7.5.2), or a
    Reader/Writer was asked for more bytes than its buffers hold."""


class InvalidAvailRingIndex(QueueError, ValueError):
    """``avail->idx`` is more than the queue size ahead of the device's next index.

    The driver is broken or hostile: the queue needs a reset (set NEEDS_RESET)."""


class QueueNotReady(QueueError):
    """The queue is used before it is ready (size, addresses, memory, ``ready``)."""


class InvalidQueueConfig(QueueError, ValueError):
    """A queue size or ring address breaks VIRTIO 1.2 §2.7 (power of two, alignment,
    inside guest memory)."""
