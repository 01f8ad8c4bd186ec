"""The template device: the smallest complete device, and the worked example for new ones.

It stands for upstream's ``vhost-device-template`` ("Foo" device,
rust-vmm/vhost-device ``vhost-device-template/src/backend.rs``): one queue of at
most 1024 entries, the common transport features, no device features, no config
space.  Like upstream it logs every request: its number and, for each descriptor,
whether it is device-readable or device-writable and its length.

Upstream never returns its chains to the driver, so a driver using it stalls once
the ring is full.  Ours completes each chain so that it is usable as a loopback
test device (a difference listed in README): the bytes of the device-readable
buffers are copied into the device-writable buffers, as far as they fit, and the
used length is the number of bytes written (VIRTIO 1.2 §2.7.8: "the total length
of the descriptor chain which was written to").  A chain with only readable
buffers completes with 0, one with only writable buffers comes back untouched with
0 as well.

Device id: upstream has none (vhost-user never tells the front-end a device id).
We use :data:`VIRTIO_ID_TEMPLATE` = 0xB0 (176): QEMU's generic
``vhost-user-test-device-pci`` computes its PCI device id as ``0x1040 + virtio-id``,
so 176 gives 1af4:10f0, the start of the range QEMU's ``docs/specs/pci-ids.rst``
keeps for experimental devices; no guest driver binds to it by accident::

    -chardev socket,id=foo,path=/tmp/foo.sock
    -device vhost-user-test-device-pci,chardev=foo,virtio-id=176,num_vqs=1,config_size=0

To write a new device, copy this module (see ``docs/adding-a-device.md``).
"""

from __future__ import annotations

import logging

from virtio_queue import DescriptorChain

from .base import COMMON_FEATURES, VirtioDevice

__all__ = ["QUEUE_SIZE", "VIRTIO_ID_TEMPLATE", "TemplateDevice"]

log = logging.getLogger(__name__)

#: Virtio device id of the template device (see the module docstring for why).
VIRTIO_ID_TEMPLATE = 0xB0
#: Upstream's ``QUEUE_SIZE``.
QUEUE_SIZE = 1024


class TemplateDevice(VirtioDevice):
    """The "Foo" device: logs each request's descriptors and echoes readable bytes back.

    Everything a device needs is here: identity (:attr:`device_id`, :attr:`name`),
    queues (:attr:`queue_sizes`), features (:attr:`features`), and the work:
    :meth:`handle_chain`, which the drain loop of :class:`VirtioDevice` calls for each
    chain (it pops them, follows notification suppression, and turns the guest's
    errors into used length 0; the transport calls its ``process_queue`` on each kick).
    """

    device_id = VIRTIO_ID_TEMPLATE
    name = "template"
    queue_sizes = (QUEUE_SIZE,)
    features = COMMON_FEATURES
    has_config = False

    def __init__(self) -> None:
        super().__init__()
        #: Requests seen so far on this device (upstream's ``FooInfo::counter``).
        self.requests = 0

    def handle_chain(self, index: int, chain: DescriptorChain) -> int:
        """Log the request's descriptors, copy readable bytes into writable ones.

        Returns the used length: the number of bytes written.

        Raises:
            QueueError: the chain is malformed (a loop, a bad indirect table...);
                the drain loop returns it with length 0 (:meth:`guest_fault`).
            GuestMemoryError: a buffer lies outside guest memory; same handling.
        """
        self.requests += 1
        if log.isEnabledFor(logging.INFO):
            # Upstream logs every descriptor at info level; one line per request
            # keeps the log readable and costs nothing when info is off.
            descs = chain.descriptors()
            layout = ", ".join(f"{'write only' if d.is_write_only() else 'read only'} {d.len}" for d in descs)
            log.info(
                "%s q%d: request %d has %d descriptors: %s",
                self.name,
                index,
                self.requests,
                len(descs),
                layout,
            )
        reader = chain.reader()
        writer = chain.writer()
        n = min(reader.available_bytes(), writer.available_bytes())
        if n == 0:
            return 0
        return writer.write(reader.read(n))
