"""Errors of the Xen guest-memory layer (STYLE.md §4).

Both sit under :class:`virtio_queue.errors.GuestMemoryError`: to the queue and the
vhost-user handler a Xen region that cannot be mapped is one more guest-memory
fault, handled where SET_MEM_TABLE / ADD_MEM_REG is handled.
"""

from __future__ import annotations

from virtio_queue.errors import GuestMemoryError

__all__ = ["InvalidXenFlags", "XenMapError"]


class XenMapError(GuestMemoryError):
    """A Xen memory region could not be mapped (or this is not a ``XEN=1`` build).

    Raised by :func:`xen.map_region` and the Xen region types when the front-end's
    region description cannot be honoured: a missing ``/dev/xen/privcmd`` or
    ``/dev/xen/gntdev``, a failed ioctl or mmap, a pfn the hypervisor refused, a
    range that does not fit Xen's limits.  The handler refuses the memory-table
    message (and closes the connection); nothing is retried.
    """


class InvalidXenFlags(XenMapError, ValueError):
    """The ``xen mmap flags`` of a memory region description break rust-vmm's rules:
    unknown bits, both FOREIGN and GRANT, or FOREIGN / UNIX without advance mapping.

    The front-end is at fault: refuse the message that carried the region.
    """
