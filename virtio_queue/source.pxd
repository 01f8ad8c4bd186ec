# cython: language_level=3
from posix.uio cimport iovec


cdef class ByteSource:
    cdef readonly int fd
    cdef ssize_t readv(self, const iovec *iov, int n) noexcept nogil
