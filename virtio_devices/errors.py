"""Errors raised by the device layer (:mod:`virtio_devices`).

They hang under :class:`virtio_queue.errors.VirtioError` (STYLE.md §4).  A guest that
sends a request the device cannot parse gets :class:`MalformedRequest`; each device
adds its own subclass of :class:`DeviceError` for host-side failures (``RngError``
for the entropy source, later ``ScsiError``, ...).
"""

from __future__ import annotations

from virtio_queue.errors import VirtioError

__all__ = ["DeviceError", "MalformedRequest", "RngError"]


class DeviceError(VirtioError):
    """A device cannot serve a request or cannot be set up.

    Raised by device logic and host backends.  A transport that sees one while
    serving a queue logs it and keeps the daemon running; the CLI turns one raised
    while building a device into ``error: ...`` and exit status 1.
    """


class MalformedRequest(DeviceError, ValueError):
    """A request breaks the layout its device specification requires.

    Examples: a virtio-rng chain that is not exactly one device-writable descriptor
    (VIRTIO 1.2 §5.4.6), a request header too short for its fields.  The guest is at
    fault: drop the chain (used length 0), log it rate-limited, go on.
    """


class RngError(DeviceError):
    """The entropy source of virtio-rng cannot be opened or read.

    Raised by :mod:`virtio_devices.hosts.files` when the source file is missing,
    unreadable or a directory (upstream: "RNG source file doesn't exists or can't be
    accessed").  At startup the CLI exits 1 with the message.
    """
