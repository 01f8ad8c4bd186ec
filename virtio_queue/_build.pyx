# cython: language_level=3, embedsignature=True
"""Which build this is: the flags setup.py compiled in (see includes/build_config.pxd)."""

from virtio_queue.includes.build_config cimport VHD_DEBUG, VHD_XEN

#: True in a ``XEN=1`` build: guest memory is mapped the Xen way (foreign/grant).
BUILT_WITH_XEN = bool(VHD_XEN)
#: True in a ``VHD_DEBUG=1`` build: bounds checks, line tracing, fd/map counters.
BUILT_WITH_DEBUG = bool(VHD_DEBUG)
