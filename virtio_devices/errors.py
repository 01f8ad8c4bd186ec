"""Errors raised by the device layer (:mod:`virtio_devices`), and where each one stops.

They hang under :class:`virtio_queue.errors.VirtioError` (STYLE.md §4).  The drain
loop of :class:`virtio_devices.base.VirtioDevice` sorts what a device's
``handle_chain`` raises into three kinds (issue 12, "host-fault policy"):

* the guest's fault: :class:`MalformedRequest`, and the queue layer's
  ``QueueError`` / ``GuestMemoryError``: the chain goes back to the driver (used
  length 0, or the device's error status) and the queue goes on;
* the host's fault: :class:`HostFault` (and ``OSError`` from a host backend): the
  guest gets the device's error status (IO_ERR, CHECK CONDITION, ...), the host's
  log gets a rate-limited line, the queue goes on;
* anything else is a bug in the device: it raises :class:`DeviceNeedsReset` to the
  transport, which resets that device (vhost-user: its rings stop, the err fds are
  written; virtio-mmio: DEVICE_NEEDS_RESET).  The process keeps running.

Per-device errors live with their device or its host backend (``RngError`` in
:mod:`virtio_devices.hosts.files`), not here.
"""

from __future__ import annotations

from virtio_queue.errors import VirtioError

__all__ = ["DeviceError", "DeviceNeedsReset", "HostFault", "MalformedRequest"]


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
    fault: the drain loop hands it to ``guest_fault`` (default: log it rate-limited,
    used length 0) and goes on.
    """


class HostFault(DeviceError):
    """The host side of a device failed a request that the guest made correctly.

    Examples: a disk image read failed, an ALSA stream broke, an I2C adapter NAKed.
    Raised by ``handle_chain`` or a host backend (which may raise ``OSError``
    instead, treated the same).  The drain loop hands it to the device's
    ``host_fault`` hook, which answers the guest with the device's error status
    and logs rate-limited; the queue and the device go on.  Subclass it for a
    device's own host errors.
    """


class DeviceNeedsReset(DeviceError):
    """The device is broken and refuses work until it is reset.

    Raised by the drain loop (chained from the original exception) when a device's
    own code raised something that is neither a guest nor a host fault: a bug.
    The transport that catches it resets the device (vhost-user: stops its rings
    and writes their err fds; virtio-mmio: sets DEVICE_NEEDS_RESET, VIRTIO 1.2
    §2.1.1) and keeps the process and the connection up.  Until ``reset()`` every
    kick raises it again.
    """
