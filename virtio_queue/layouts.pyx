# cython: language_level=3, embedsignature=True
"""The packed structs of layouts.pxd, described for Python code.

Each :class:`Layout` is computed from the compiled declaration (``sizeof`` and field
offsets as the C compiler lays them out), so Python code that packs or parses the same
bytes (vhost_backends.protocol.messages, xen.flags, vhost_backends.inflight) takes its
:class:`struct.Struct` from here instead of writing the format a second time.
"""

import struct as _struct

from virtio_queue.layouts cimport (DescStateSplit, MemoryRegionDesc, QueueRegionSplit,
                                   XenMemoryRegionDesc)

__all__ = ["INFLIGHT_DESC_SPLIT", "INFLIGHT_QUEUE_REGION_SPLIT", "MEMORY_REGION",
           "XEN_MEMORY_REGION", "Field", "Layout"]

# struct module codes of the unsigned little-endian integer fields, by width.
_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}


class Field(tuple):
    """``(name, offset, size)`` of one field."""

    __slots__ = ()

    def __new__(cls, name, offset, size):
        return tuple.__new__(cls, (name, offset, size))

    @property
    def name(self):
        return self[0]

    @property
    def offset(self):
        return self[1]

    @property
    def size(self):
        return self[2]


class Layout:
    """A packed struct of layouts.pxd: its C name, ``size`` (the C ``sizeof``), its
    ``fields`` in order, and :attr:`struct`, the little-endian :class:`struct.Struct`
    of its value fields (``padding`` fields become pad bytes and are not values)."""

    def __init__(self, name, size, fields):
        self.name = name
        self.size = size
        self.fields = tuple(fields)
        fmt = "<"
        end = 0
        for f in self.fields:
            if f.offset != end:
                raise AssertionError(f"{name}.{f.name} at {f.offset}, not packed after {end}")
            fmt += f"{f.size}x" if f.name == "padding" else _CODES[f.size]
            end = f.offset + f.size
        if end != size:
            raise AssertionError(f"{name} fields end at {end}, sizeof is {size}")
        self.struct = _struct.Struct(fmt)
        #: Names of the values :attr:`struct` packs and unpacks, in order.
        self.names = tuple(f.name for f in self.fields if f.name != "padding")

    def offset(self, name):
        """Byte offset of field ``name``.  Raises KeyError for an unknown name."""
        for f in self.fields:
            if f.name == name:
                return f.offset
        raise KeyError(f"{self.name} has no field {name!r}")

    def __repr__(self):
        return f"Layout({self.name!r}, size={self.size})"


cdef MemoryRegionDesc _mr
cdef XenMemoryRegionDesc _xr
cdef DescStateSplit _ds
cdef QueueRegionSplit _qr


cdef size_t _off(const void *field, const void *base):
    return <size_t>(<const char *>field - <const char *>base)


MEMORY_REGION = Layout("MemoryRegionDesc", sizeof(MemoryRegionDesc), [
    Field("guest_addr", _off(&_mr.guest_addr, &_mr), sizeof(_mr.guest_addr)),
    Field("size", _off(&_mr.size, &_mr), sizeof(_mr.size)),
    Field("user_addr", _off(&_mr.user_addr, &_mr), sizeof(_mr.user_addr)),
    Field("mmap_offset", _off(&_mr.mmap_offset, &_mr), sizeof(_mr.mmap_offset)),
])
XEN_MEMORY_REGION = Layout("XenMemoryRegionDesc", sizeof(XenMemoryRegionDesc), [
    Field("guest_addr", _off(&_xr.guest_addr, &_xr), sizeof(_xr.guest_addr)),
    Field("size", _off(&_xr.size, &_xr), sizeof(_xr.size)),
    Field("user_addr", _off(&_xr.user_addr, &_xr), sizeof(_xr.user_addr)),
    Field("mmap_offset", _off(&_xr.mmap_offset, &_xr), sizeof(_xr.mmap_offset)),
    Field("xen_mmap_flags", _off(&_xr.xen_mmap_flags, &_xr), sizeof(_xr.xen_mmap_flags)),
    Field("domid", _off(&_xr.domid, &_xr), sizeof(_xr.domid)),
])
INFLIGHT_DESC_SPLIT = Layout("DescStateSplit", sizeof(DescStateSplit), [
    Field("inflight", _off(&_ds.inflight, &_ds), sizeof(_ds.inflight)),
    Field("padding", _off(&_ds.padding[0], &_ds), sizeof(_ds.padding)),
    Field("next", _off(&_ds.next, &_ds), sizeof(_ds.next)),
    Field("counter", _off(&_ds.counter, &_ds), sizeof(_ds.counter)),
])
INFLIGHT_QUEUE_REGION_SPLIT = Layout("QueueRegionSplit", sizeof(QueueRegionSplit), [
    Field("features", _off(&_qr.features, &_qr), sizeof(_qr.features)),
    Field("version", _off(&_qr.version, &_qr), sizeof(_qr.version)),
    Field("desc_num", _off(&_qr.desc_num, &_qr), sizeof(_qr.desc_num)),
    Field("last_batch_head", _off(&_qr.last_batch_head, &_qr), sizeof(_qr.last_batch_head)),
    Field("used_idx", _off(&_qr.used_idx, &_qr), sizeof(_qr.used_idx)),
])
