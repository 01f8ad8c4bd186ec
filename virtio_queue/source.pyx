# cython: language_level=3, embedsignature=True
"""Where the bytes of a fill come from: :class:`ByteSource`.

The compiled fill paths (``Queue.fill_from``, ``Writer.read_from``, the daemon's fill
rings) move bytes from a host source straight into guest buffers with the GIL
released.  A source is an object with a C-level ``readv``: the base class reads its
file descriptor; a subclass may produce the bytes another way (the kernel's random
generator through the vDSO, ``virtio_devices.hosts.getrandom``) and is used by the
same paths unchanged.
"""

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.errno cimport EAGAIN, EINTR, errno
from posix.uio cimport iovec

import os


cdef class ByteSource:
    """Bytes read from file descriptor ``fd`` (not owned: the caller closes it).

    ``fd`` is also what an event loop watches when the source has nothing to give
    (``EAGAIN``): it turns readable when it has.  Subclasses that make bytes without
    reading may keep ``fd`` for that purpose only, or pass -1.
    """

    def __init__(self, int fd):
        self.fd = fd

    cdef ssize_t readv(self, const iovec *iov, int n) noexcept nogil:
        """Fill ``iov[0..n)`` in order, as ``readv(2)`` (one call: short counts
        allowed): the bytes written, or -1 with ``errno`` set."""
        return fd_iov(self.fd, iov, n, -1, True)

    def fileno(self):
        """The fd to wait on for readability (-1: none)."""
        return self.fd

    def readinto(self, buffer):
        """Fill ``buffer`` (writable) as the compiled paths would: one ``readv``,
        EINTR retried.  Returns the bytes written, None on ``EAGAIN``.

        Raises:
            OSError: the source failed.
        """
        cdef Py_buffer view
        cdef iovec iov
        cdef ssize_t r
        cdef int err = 0
        PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE)
        try:
            iov.iov_base = view.buf
            iov.iov_len = <size_t>view.len
            with nogil:
                while True:
                    r = self.readv(&iov, 1)
                    if r >= 0 or errno != EINTR:
                        break
                if r < 0:
                    err = errno
        finally:
            PyBuffer_Release(&view)
        if r < 0:
            if err == EAGAIN:
                return None
            raise OSError(err, os.strerror(err))
        return r

    def __repr__(self):
        return f"{type(self).__name__}(fd={self.fd})"
