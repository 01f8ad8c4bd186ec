# cython: language_level=3
# Guest rings are little-endian (VIRTIO 1.2 §2.7, VERSION_1): convert at every access.
from libc.stdint cimport uint16_t, uint32_t, uint64_t

cdef extern from "<endian.h>" nogil:
    uint16_t le16toh(uint16_t)
    uint32_t le32toh(uint32_t)
    uint64_t le64toh(uint64_t)
    uint16_t htole16(uint16_t)
    uint32_t htole32(uint32_t)
    uint64_t htole64(uint64_t)
