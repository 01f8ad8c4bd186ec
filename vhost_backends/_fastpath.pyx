# cython: language_level=3, embedsignature=True
"""The compiled part of the daemon's event loop (DESIGN.md "Concurrency and I/O").

:class:`Epoll` is the loop's epoll set.  Its :meth:`Epoll.poll` hands the ready fds
back to Python, except the kick fds of :class:`FillRing` rings: a device whose
requests on a queue need nothing but bytes from a host fd (virtio-rng; see
``VirtioDevice.fill_source``) lets the transport serve that queue's kicks here,
without a Python call per kick: read the kick eventfd, fill every available
single-buffer request with ``Queue.fill_c`` (one ``readv`` per run of them, the
GIL released), write the call eventfd if the driver wants an interrupt.  Anything
else (another shape of request, a read that gave nothing, an error) leaves the
ring to the Python reader callback of the kick fd, which the poll returns as
ready: the device's ``process_queue`` sees it exactly as it would have.
"""

cimport cython
from cpython.exc cimport PyErr_CheckSignals, PyErr_SetFromErrno
from libc.errno cimport EINTR, errno
from libc.stdint cimport uint32_t, uint64_t
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.unistd cimport close, read, write

from virtio_queue.queue cimport Queue


cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64

    struct epoll_event:
        uint32_t events
        epoll_data_t data

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    enum:
        EPOLL_CLOEXEC
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL


cdef enum:
    MAX_EVENTS = 64

# epoll_data.u64 of a registered fd: the fd in the low 32 bits, this bit for a fill ring.
cdef uint64_t FILL_BIT = (<uint64_t>1) << 32


@cython.final
cdef class FillRing:
    """Queue ``index`` of a device whose requests there are each one
    device-writable buffer filled from a host fd (VIRTIO 1.2 §5.4 for virtio-rng),
    served when ``kick_fd`` fires.

    ``fill_source(index)`` is the device's ``VirtioDevice.fill_source``, asked on
    every kick: the fd to fill from, or None when the device must see the kick
    (it waits for the source, say).  ``call_fd`` is the ring's call eventfd (-1:
    none; the owner keeps it current).  ``chains``/``bytes`` count what this path
    served."""

    cdef Queue queue
    cdef object fill_source
    cdef readonly int index
    cdef readonly int kick_fd
    cdef public int call_fd
    cdef readonly unsigned long long chains
    cdef readonly unsigned long long bytes

    def __init__(self, Queue queue not None, int kick_fd, fill_source, int index, int call_fd=-1):
        self.queue = queue
        self.kick_fd = kick_fd
        self.fill_source = fill_source
        self.index = index
        self.call_fd = call_fd

    cdef int serve(self) except -1:
        """One kick: 0 when it is handled, 1 when the Python path must see the ring."""
        cdef uint64_t value
        cdef Py_ssize_t served = 0
        cdef unsigned long long total = 0
        cdef int status
        source = self.fill_source(self.index)
        if source is None:
            return 1
        # The kick fds are non-blocking (the handler makes them so): EAGAIN here
        # only means another reader took the count.
        read(self.kick_fd, &value, 8)
        status = self.queue.fill_c(<int>source, -1, True, &served, &total)
        if served:
            self.chains += <unsigned long long>served
            self.bytes += total
            if self.call_fd >= 0 and self.queue.needs_notification_c():
                value = 1
                # EAGAIN: the counter is saturated, a call is pending anyway.
                write(self.call_fd, &value, 8)
        return status

    def serve_kick(self):
        """:meth:`serve` for tests: True when handled, False when the Python path
        must see the ring."""
        return self.serve() == 0


@cython.final
cdef class Epoll:
    """An epoll set (level-triggered) whose :meth:`poll` returns the ready fds, less
    the kicks that :class:`FillRing` rings handled."""

    cdef int epfd
    cdef dict _rings        # fd -> FillRing

    def __cinit__(self):
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            PyErr_SetFromErrno(OSError)
        self._rings = {}

    def __dealloc__(self):
        if self.epfd >= 0:
            close(self.epfd)

    def fileno(self):
        return self.epfd

    def close(self):
        """Close the epoll fd (the registered fds are not closed); idempotent."""
        self._rings.clear()
        if self.epfd >= 0:
            close(self.epfd)
            self.epfd = -1

    cdef int _ctl(self, int op, int fd, uint32_t events, uint64_t data) except -1:
        cdef epoll_event ev
        if self.epfd < 0:
            raise ValueError("I/O operation on closed epoll object")
        ev.events = events
        ev.data.u64 = data
        if epoll_ctl(self.epfd, op, fd, &ev) < 0:
            PyErr_SetFromErrno(OSError)
        return 0

    def register(self, int fd, unsigned int events):
        """Watch ``fd`` for ``events`` (select.EPOLL* bits)."""
        if fd < 0:
            raise ValueError(f"bad file descriptor {fd}")
        self._ctl(EPOLL_CTL_ADD, fd, events, <uint32_t>fd)

    def unregister(self, int fd):
        """Stop watching ``fd`` (and serving it as a fill ring)."""
        self._rings.pop(fd, None)
        self._ctl(EPOLL_CTL_DEL, fd, 0, 0)

    def set_fill_ring(self, int fd, unsigned int events, FillRing ring):
        """Serve the kicks of registered ``fd`` with ``ring`` (None: hand them to
        Python again)."""
        if ring is not None and ring.kick_fd != fd:
            raise ValueError(f"ring kick fd {ring.kick_fd} is not fd {fd}")
        self._ctl(EPOLL_CTL_MOD, fd, events, <uint32_t>fd | (FILL_BIT if ring is not None else 0))
        if ring is None:
            self._rings.pop(fd, None)
        else:
            self._rings[fd] = ring

    def poll(self, double timeout=-1.0):
        """Wait up to ``timeout`` seconds (< 0: forever) for fds that need Python;
        return them (a list, possibly empty when the time ran out or a signal came).

        Kicks of fill rings are served here meanwhile, the wait going on for what
        is left of the timeout.  An error in a ring's fast path is not raised: the
        ring goes to Python, whose path meets the same condition and reports it."""
        cdef epoll_event evs[MAX_EVENTS]
        cdef int n, i, fd, ms, status
        cdef uint64_t data
        cdef timespec ts
        cdef double now, deadline = 0.0
        cdef list out = []
        if self.epfd < 0:
            raise ValueError("I/O operation on closed epoll object")
        if timeout >= 0:
            clock_gettime(CLOCK_MONOTONIC, &ts)
            deadline = ts.tv_sec + ts.tv_nsec * 1e-9 + timeout
        while True:
            ms = -1
            if timeout >= 0:
                clock_gettime(CLOCK_MONOTONIC, &ts)
                now = ts.tv_sec + ts.tv_nsec * 1e-9
                if now >= deadline:
                    ms = 0
                elif deadline - now > 1e6:
                    ms = 1000000000     # ~11 days; the loop waits again after it
                else:
                    ms = <int>((deadline - now) * 1000.0 + 0.999)
            with nogil:
                n = epoll_wait(self.epfd, evs, MAX_EVENTS, ms)
            if n < 0:
                if errno == EINTR:
                    PyErr_CheckSignals()
                    return out
                PyErr_SetFromErrno(OSError)
            for i in range(n):
                data = evs[i].data.u64
                fd = <int>(data & 0xFFFFFFFF)
                if data & FILL_BIT:
                    ring = self._rings.get(fd)
                    if ring is not None:
                        try:
                            status = (<FillRing>ring).serve()
                        except Exception:
                            status = 1
                        if status == 0:
                            continue
                out.append(fd)
            if out or ms == 0:
                return out
