# cython: language_level=3, embedsignature=True
"""The kernel's random generator as a :class:`~virtio_queue.source.ByteSource`.

:class:`GetrandomSource` fills guest buffers with ``getrandom(2)`` bytes through the
vDSO (Linux >= 6.11; ``vdso_getrandom.h``), without a system call per request:
the same generator, the same guarantees, and more bytes per second than ``read(2)``
on ``/dev/urandom`` (whose kernel side runs the portable ChaCha20 code; the vDSO's is
vectorised; docs/performance.md has the figures).  Where the vDSO lacks the
function it uses the system call.
"""

from posix.uio cimport iovec

from virtio_queue.source cimport ByteSource


cdef extern from "virtio_devices/hosts/vdso_getrandom.h" nogil:
    int vq_getrandom_vdso()
    void vq_getrandom_disable_vdso(int disabled)
    ssize_t vq_getrandom(void *buf, size_t length, unsigned int flags)
    enum:
        GRND_NONBLOCK
        GRND_INSECURE

NONBLOCK = GRND_NONBLOCK
INSECURE = GRND_INSECURE


def vdso_available():
    """Whether this kernel's vDSO offers getrandom (and it is not disabled)."""
    return bool(vq_getrandom_vdso())


def _disable_vdso(bint disabled):
    """Tests: use the system call even where the vDSO has the function."""
    vq_getrandom_disable_vdso(disabled)


cdef class GetrandomSource(ByteSource):
    """``getrandom(2)`` bytes with ``flags`` (``INSECURE``: what ``/dev/urandom``
    gives; ``NONBLOCK``: what ``/dev/random`` opened non-blocking gives, ``EAGAIN``
    until the generator is seeded).  ``fd`` is the device file to wait on for that
    (-1: none); the bytes never come from it."""

    cdef readonly unsigned int flags

    def __init__(self, int fd=-1, unsigned int flags=GRND_INSECURE):
        if flags & ~(GRND_NONBLOCK | GRND_INSECURE):
            raise ValueError(f"unsupported getrandom flags {flags:#x}")
        ByteSource.__init__(self, fd)
        self.flags = flags

    cdef ssize_t readv(self, const iovec *iov, int n) noexcept nogil:
        """Fill the iovecs in order; a short count or an error ends it (the bytes
        so far, or -1 with ``errno`` when there are none; callers retry EINTR)."""
        cdef ssize_t total = 0, r
        cdef int i
        for i in range(n):
            if iov[i].iov_len == 0:
                continue
            r = vq_getrandom(iov[i].iov_base, iov[i].iov_len, self.flags)
            if r < 0:
                return total if total else -1
            total += r
            if <size_t>r < iov[i].iov_len:
                break
        return total

    def __repr__(self):
        return f"GetrandomSource(fd={self.fd}, flags={self.flags:#x})"
