# cython: language_level=3
# The build flags, from the header that setup.py generates (STYLE.md §3): a C macro,
# not a Cython DEF, so the generated C is the same for every flag value.
cdef extern from "virtio_queue/_build_config.h":
    enum:
        VHD_XEN
        VHD_DEBUG
