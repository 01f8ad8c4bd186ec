"""Xen guest memory for vhost-device-py: foreign (privcmd) and grant (gntdev) regions.

:mod:`xen.flags` and :mod:`xen.errors` are pure Python and present in every
build.  The region types, ``xen._foreign.XenForeignRegion`` and
``xen._grant.XenGrantRegion``, are compiled only by a ``XEN=1`` build; they
subclass :class:`virtio_queue.GuestRegion`, so the queue never asks whether a
region is Xen's.  A build is either Unix or Xen, never both, as rust-vmm decided.
"""

from __future__ import annotations

from xen.errors import InvalidXenFlags, XenMapError
from xen.flags import (
    VHOST_USER_PROTOCOL_F_XEN_MMAP,
    XenMemoryRegion,
    XenMmapFlags,
    XenSys,
    map_region,
    mapping_kind,
    validate_flags,
)

__all__ = [
    "VHOST_USER_PROTOCOL_F_XEN_MMAP",
    "InvalidXenFlags",
    "XenMapError",
    "XenMemoryRegion",
    "XenMmapFlags",
    "XenSys",
    "map_region",
    "mapping_kind",
    "validate_flags",
]
