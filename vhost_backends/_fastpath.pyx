# cython: language_level=3, embedsignature=True
"""The compiled part of the daemon's event loop (DESIGN.md "Concurrency and I/O").

:class:`Epoll` is the loop's epoll set.  Its :meth:`Epoll.poll` hands the ready fds
back to Python, except the kick fds of :class:`FillRing` rings: a device whose
requests on a queue need nothing but bytes from a host source (virtio-rng; see
``VirtioDevice.fill_source``) lets the transport serve that queue's kicks here,
without a Python call per kick: read the kick eventfd, fill every available
single-buffer request with ``Queue.fill_c`` (one read of the device's
``ByteSource`` per run of them, the GIL released), write the call eventfd if the
driver wants an interrupt.  Anything else (another shape of request, a read that
gave nothing, an error) leaves the ring to the Python reader callback of the kick
fd, which the poll returns as ready: the device's ``process_queue`` sees it
exactly as it would have.

Adaptive polling (``Epoll(poll_max_us=...)``, as QEMU's event loop polls its
handlers): after a fill ring was served, the poll watches the ring's avail index
for a while before sleeping in ``epoll_wait``, with the driver's kicks suppressed
(VIRTIO 1.2 §2.7.10), so that a driver that sends its next request soon after its
last one is answered without a kick and a wake-up on either side.  How long is
learnt per ring: the window grows (4 µs, doubling, up to the maximum) while the
next kick keeps coming within the maximum after a service, and drops to 0 as soon
as one comes later, so an idle or slow driver costs no polling.  The spin releases
the GIL and returns to ``epoll_wait`` whenever any other fd is ready.
"""

cimport cython
from cpython.exc cimport PyErr_CheckSignals, PyErr_SetFromErrno
from cpython.ref cimport PyObject
from libc.errno cimport EINTR, errno
from libc.stdint cimport uint32_t, uint64_t
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.unistd cimport close, read, write

from virtio_queue.queue cimport Queue
from virtio_queue.source cimport ByteSource


cdef extern from *:
    """
    #if defined(__x86_64__) || defined(__i386__)
    #include <immintrin.h>
    static inline void vhd_cpu_relax(void) { _mm_pause(); }
    #else
    static inline void vhd_cpu_relax(void) { }
    #endif
    """
    void vhd_cpu_relax() noexcept nogil


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

cdef enum:
    # Adaptive polling: the first window, and how often the spin looks at the
    # other fds (one epoll_wait(0)).
    POLL_START_NS = 4000
    POLL_CHECK_NS = 5000
    MAX_POLLED = 16


cdef inline long long _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <long long>ts.tv_sec * 1000000000 + ts.tv_nsec


@cython.final
cdef class FillRing:
    """Queue ``index`` of a device whose requests there are each one
    device-writable buffer filled from a host source (VIRTIO 1.2 §5.4 for
    virtio-rng), served when ``kick_fd`` fires.

    ``fill_source(index)`` is the device's ``VirtioDevice.fill_source``, asked on
    every kick: the ``ByteSource`` to fill from, or None when the device must see the kick
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
    # Adaptive polling: the ring's current window and when its last service ended.
    cdef public long long poll_ns
    cdef long long last_end_ns
    cdef readonly unsigned long long poll_hits

    def __init__(self, Queue queue not None, int kick_fd, fill_source, int index, int call_fd=-1):
        self.queue = queue
        self.kick_fd = kick_fd
        self.fill_source = fill_source
        self.index = index
        self.call_fd = call_fd

    cdef int fill(self, bint suppress, bint kicked=False) except -1:
        """Serve what the ring holds, on a kick (``kicked``: the kick's count is read
        here) or while polling: ``Queue.fill_c`` from the device's source, then
        notify the driver if it wants.  0 when it is handled, 1 when the Python path
        must see the ring."""
        cdef uint64_t value
        cdef Py_ssize_t served = 0
        cdef unsigned long long total = 0
        cdef int status
        source = self.fill_source(self.index)
        if source is None:
            return 1    # a kick is left for the Python callback to read
        if kicked:
            # The kick fds are non-blocking (the handler makes them so): EAGAIN here
            # only means another reader took the count.
            read(self.kick_fd, &value, 8)
        status = self.queue.fill_c(<ByteSource?>source, -1, suppress, &served, &total)
        if served:
            self.chains += <unsigned long long>served
            self.bytes += total
            if self.call_fd >= 0 and self.queue.needs_notification_c():
                value = 1
                # EAGAIN: the counter is saturated, a call is pending anyway.
                write(self.call_fd, &value, 8)
        return status

    cdef int try_fill(self, bint suppress, bint kicked=False) noexcept:
        """:meth:`fill` for the poll: an error leaves the ring to the Python path
        (returns 1), which meets and reports it there."""
        try:
            return self.fill(suppress, kicked)
        except Exception:
            return 1

    cdef void adapt(self, long long now, long long max_ns) noexcept:
        """A kick woke the loop at ``now``: learn from the time since the last service
        whether polling would have caught it (QEMU's aio poll adaptation)."""
        cdef long long gap
        if self.last_end_ns:
            gap = now - self.last_end_ns
            if gap > max_ns:
                self.poll_ns = 0
            elif gap > self.poll_ns:
                self.poll_ns = self.poll_ns * 2 if self.poll_ns else POLL_START_NS
                if self.poll_ns > max_ns:
                    self.poll_ns = max_ns

    def serve_kick(self):
        """:meth:`fill` on a kick, for tests: True when handled, False when the
        Python path must see the ring."""
        return self.fill(True, True) == 0


@cython.final
cdef class Epoll:
    """An epoll set (level-triggered) whose :meth:`poll` returns the ready fds, less
    the kicks that :class:`FillRing` rings handled."""

    cdef int epfd
    cdef dict _rings        # fd -> FillRing
    cdef readonly long long poll_max_ns

    def __cinit__(self, *args, **kwargs):
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            PyErr_SetFromErrno(OSError)
        self._rings = {}

    def __init__(self, long long poll_max_us=0):
        """``poll_max_us``: the longest adaptive polling window of a fill ring
        (0: never poll), at most 1 s."""
        if not 0 <= poll_max_us <= 1000000:
            raise ValueError(f"poll_max_us must be from 0 to 1000000, not {poll_max_us}")
        self.poll_max_ns = poll_max_us * 1000

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
        cdef int n, i, fd, ms
        cdef uint64_t data
        cdef long long now_ns = 0, left
        # < 0: no deadline (a timeout beyond ~11 days counts as none)
        cdef long long deadline = -1
        cdef list polled
        cdef list out = []
        if self.epfd < 0:
            raise ValueError("I/O operation on closed epoll object")
        if 0 <= timeout <= 1e6:
            deadline = _now_ns() + <long long>(timeout * 1e9)
        while True:
            ms = -1
            if deadline >= 0:
                left = deadline - _now_ns()
                ms = 0 if left <= 0 else <int>((left + 999999) // 1000000)
            with nogil:
                n = epoll_wait(self.epfd, evs, MAX_EVENTS, ms)
            if n < 0:
                if errno == EINTR:
                    PyErr_CheckSignals()
                    return out
                PyErr_SetFromErrno(OSError)
            polled = None
            if n > 0 and self.poll_max_ns:
                now_ns = _now_ns()
            for i in range(n):
                data = evs[i].data.u64
                fd = <int>(data & 0xFFFFFFFF)
                if data & FILL_BIT:
                    ring = self._rings.get(fd)
                    if ring is not None:
                        if self.poll_max_ns:
                            (<FillRing>ring).adapt(now_ns, self.poll_max_ns)
                        if (<FillRing>ring).try_fill(True, True) == 0:
                            if self.poll_max_ns:
                                (<FillRing>ring).last_end_ns = _now_ns()
                                if (<FillRing>ring).poll_ns:
                                    if polled is None:
                                        polled = []
                                    polled.append(ring)
                            continue
                out.append(fd)
            if polled is not None and not out and ms != 0:
                self._poll_rings(polled, deadline, out)
            if out or ms == 0:
                return out

    cdef int _poll_rings(self, list rings, long long deadline_ns, list out) except -1:
        """Adaptive polling (see the module docstring) of fill ``rings``, which were
        just served, until their longest window passes without a request, another
        fd is ready, ``deadline_ns`` (< 0: none) comes, or a ring needs Python (its
        kick fd is added to ``out``).  Leaves every ring with notifications on and
        nothing available that it could serve."""
        cdef PyObject *queues[MAX_POLLED]
        cdef int kick_fds[MAX_POLLED]
        cdef epoll_event evs[MAX_EVENTS]
        cdef int nr = 0, j, i, m, found, status, other = 0
        cdef long long window = 0, now, stop, check
        cdef uint64_t value
        cdef FillRing r
        cdef list polled = []
        for ring in rings:
            r = <FillRing>ring
            if nr == MAX_POLLED:
                break
            try:
                r.queue.suppress_notification_c()
            except Exception:
                continue    # not polled: its next kick meets the error on its path
            queues[nr] = <PyObject *>r.queue
            kick_fds[nr] = r.kick_fd
            if r.poll_ns > window:
                window = r.poll_ns
            polled.append(r)
            nr += 1
        rings = polled
        if nr == 0:
            return 0
        check = _now_ns() + POLL_CHECK_NS
        while True:
            found = -1
            with nogil:
                stop = _now_ns() + window
                if deadline_ns >= 0 and deadline_ns < stop:
                    stop = deadline_ns
                while True:
                    # The other fds first, also while requests keep coming: a guest
                    # must not be able to starve the socket or the stop fd.
                    now = _now_ns()
                    if now >= check:
                        check = now + POLL_CHECK_NS
                        m = epoll_wait(self.epfd, evs, MAX_EVENTS, 0)
                        for i in range(m):
                            for j in range(nr):
                                if kick_fds[j] == <int><uint32_t>evs[i].data.u64:
                                    # A kick sent before the driver saw the
                                    # suppression: the spin serves it.
                                    read(kick_fds[j], &value, 8)
                                    break
                            else:
                                other = 1
                        if other:
                            break
                    for j in range(nr):
                        if (<Queue>queues[j]).work_pending_c():
                            found = j
                            break
                    if found >= 0 or now >= stop:
                        break
                    vhd_cpu_relax()
            if found >= 0:
                r = <FillRing>rings[found]
                status = r.try_fill(False)
                r.poll_hits += 1
                r.last_end_ns = _now_ns()
                if status != 0:
                    out.append(r.kick_fd)   # Python must see this ring: leave
                    other = 1
                elif PyErr_CheckSignals() < 0:
                    self._unpoll(rings, out)
                    return -1
                else:
                    continue
            # Leaving, or the window passed: notifications on, serving what came
            # meanwhile; polling goes on if anything did.
            if (self._unpoll(rings, out) == 0 or other or out
                    or (deadline_ns >= 0 and _now_ns() >= deadline_ns)):
                return 0
            try:
                for ring in rings:
                    (<FillRing>ring).queue.suppress_notification_c()
            except Exception:
                self._unpoll(rings, out)    # the broken ring goes to Python from there
                return 0

    cdef unsigned long long _unpoll(self, list rings, list out) noexcept:
        """Turn the driver's notifications back on for polled ``rings`` and serve what
        they hold (a ring already in ``out`` is Python's to drain; one that needs
        Python now is added to it); returns the chains served."""
        cdef FillRing r
        cdef unsigned long long before, served = 0
        for ring in rings:
            r = <FillRing>ring
            if r.kick_fd in out:
                try:
                    r.queue.enable_notification_c()
                except Exception:
                    pass
                continue
            before = r.chains
            if r.try_fill(True) != 0:
                out.append(r.kick_fd)
            served += r.chains - before
        return served
