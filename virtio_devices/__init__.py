"""Transport-free VIRTIO device logic (the device layer of vhost-device for Python).

Each device lives in its own module (:mod:`virtio_devices.rng`,
:mod:`virtio_devices.template`, ...) and implements the interface of
:mod:`virtio_devices.base`.  Host backends (entropy files, GPIO chips, I2C
adapters...) live in :mod:`virtio_devices.hosts` behind small Protocols.
:mod:`virtio_devices.workers` runs blocking host I/O off the event loop, and
:mod:`virtio_devices.testing` is the device author's test kit.

This package never imports :mod:`vhost_backends`: an embedding VMM can drive the
devices from its own transport (DESIGN.md, "Layers").  Importing the package itself
is cheap; the device modules need the compiled :mod:`virtio_queue`.
"""

from __future__ import annotations

from .errors import DeviceError, DeviceNeedsReset, HostFault, MalformedRequest

__all__ = ["DeviceError", "DeviceNeedsReset", "HostFault", "MalformedRequest"]
