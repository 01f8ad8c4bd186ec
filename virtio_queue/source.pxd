# cython: language_level=3
from posix.types cimport off_t
from posix.uio cimport iovec, readv, writev
from posix.unistd cimport pread, pwrite, read, write

from virtio_queue.includes.vq_io cimport preadv, pwritev


cdef class ByteSource:
    cdef readonly int fd
    cdef ssize_t readv(self, const iovec *iov, int n) noexcept nogil


cdef inline ssize_t fd_iov(int fd, const iovec *iov, int n, long long offset,
                           bint reading) noexcept nogil:
    """``readv``/``writev`` (``preadv``/``pwritev`` at ``offset`` if >= 0) of ``n``
    iovecs, one system call; one iovec goes through ``read``/``write``
    (``pread``/``pwrite``), which spares the kernel importing the iovec array
    (back-to-back guest buffers are one iovec already).
    errno is left for the caller."""
    if n == 1:
        if reading:
            return (pread(fd, iov[0].iov_base, iov[0].iov_len, <off_t>offset) if offset >= 0
                    else read(fd, iov[0].iov_base, iov[0].iov_len))
        return (pwrite(fd, iov[0].iov_base, iov[0].iov_len, <off_t>offset) if offset >= 0
                else write(fd, iov[0].iov_base, iov[0].iov_len))
    if reading:
        return preadv(fd, iov, n, <off_t>offset) if offset >= 0 else readv(fd, iov, n)
    return pwritev(fd, iov, n, <off_t>offset) if offset >= 0 else writev(fd, iov, n)
