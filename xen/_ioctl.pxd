# cython: language_level=3
# The Linux uapi Xen ioctls (include/uapi/xen/privcmd.h, gntdev.h), cdef extern
# only (STYLE.md §2).  xen/_uapi.h makes the headers includable from user space.
from libc.stdint cimport uint16_t, uint32_t, uint64_t


cdef extern from "<sys/ioctl.h>" nogil:
    # glibc's prototype: the request is an unsigned long (Cython's posix.ioctl
    # declares an int, which the _IOC values with a size field would overflow on
    # other architectures).
    int ioctl(int fd, unsigned long request, ...)


cdef extern from "xen/_uapi.h":
    ctypedef uint16_t domid_t
    ctypedef unsigned long xen_pfn_t

    # IOCTL_PRIVCMD_MMAPBATCH_V2: map guest frames `arr[0..num)` of domain `dom`
    # into the privcmd VMA at `addr`; per-frame errors come back in `err`.
    struct privcmd_mmapbatch_v2:
        unsigned int num
        domid_t dom
        uint64_t addr
        const xen_pfn_t *arr
        int *err

    struct ioctl_gntdev_grant_ref:
        uint32_t domid
        uint32_t ref

    # IOCTL_GNTDEV_MAP_GRANT_REF: `count` references (a flexible array declared
    # refs[1]); the driver returns the mmap offset of the mapping in `index`.
    struct ioctl_gntdev_map_grant_ref:
        uint32_t count
        uint32_t pad
        uint64_t index
        ioctl_gntdev_grant_ref refs[1]

    struct ioctl_gntdev_unmap_grant_ref:
        uint64_t index
        uint32_t count
        uint32_t pad

    unsigned long IOCTL_PRIVCMD_MMAPBATCH_V2
    unsigned long IOCTL_GNTDEV_MAP_GRANT_REF
    unsigned long IOCTL_GNTDEV_UNMAP_GRANT_REF
