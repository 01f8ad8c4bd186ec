# cython: language_level=3
# Positioned scatter-gather I/O (Cython's posix.uio has readv/writev only).
from posix.types cimport off_t
from posix.uio cimport iovec

cdef extern from "<sys/uio.h>" nogil:
    ssize_t preadv(int fd, const iovec *iov, int iovcnt, off_t offset)
    ssize_t pwritev(int fd, const iovec *iov, int iovcnt, off_t offset)
