# cython: language_level=3
# Positioned scatter-gather I/O (Cython's posix.uio has readv/writev only).
from posix.types cimport off_t
from posix.uio cimport iovec

cdef extern from "<sys/uio.h>" nogil:
    ssize_t preadv(int fd, const iovec *iov, int iovcnt, off_t offset)
    ssize_t pwritev(int fd, const iovec *iov, int iovcnt, off_t offset)
    # Linux 4.6+, glibc 2.26+: with per-call flags (RWF_NOWAIT, RWF_DSYNC...).
    ssize_t preadv2(int fd, const iovec *iov, int iovcnt, off_t offset, int flags)
    ssize_t pwritev2(int fd, const iovec *iov, int iovcnt, off_t offset, int flags)
