# cython: language_level=3, embedsignature=True
"""The compiled part of the daemon's event loop (DESIGN.md "Concurrency and I/O").

:class:`Epoll` is the loop's epoll set.  Its :meth:`Epoll.poll` hands the ready fds
back to Python, except the kick fds of :class:`KickRing` rings, which it serves
itself: one compiled object per ring reads the kick eventfd and then either

* fills the ring from the device's host source (``VirtioDevice.fill_source``:
  virtio-rng, whose requests there are each one device-writable buffer) with
  ``Queue.fill_c``, one read of the ``ByteSource`` per run of requests with the
  GIL released, and writes the call eventfd if the driver wants an interrupt; or
* hands the ring to Python with one call, ``serve(index)`` (the device's
  ``process_queue``), also when the fill path cannot finish the ring (another
  shape of request, a read that gave nothing, an error): ``process_queue`` then
  sees the ring exactly as it would have.

An exception raised by ``serve`` goes to the ring's ``fail(exc)`` (the transport's
error policy), never up through the poll unless there is no ``fail`` or it raises.

The ring object is also the one owner of the ring's call eventfd, through its
:class:`~virtio_devices._pump.Signaller` (:attr:`KickRing.signaller`, which compiled
device paths hold and call, also without the GIL): the transport gives it the fd
(:meth:`KickRing.set_call_fd`, which closes the previous one) and the device's
interrupt signals through :meth:`KickRing.signal_used` or the signaller.

Adaptive polling (``Epoll(poll_max_us=...)``, as QEMU's event loop polls its
handlers): after a ring was served, the poll watches the avail index of every ring
just served for a while before sleeping in ``epoll_wait``, with the driver's kicks
suppressed (VIRTIO 1.2 §2.7.10), so that a driver that sends its next request soon
after its last one is answered without a kick and a wake-up on either side.  How
long is learnt per ring: the window grows (4 µs, doubling, up to the maximum)
while the next kick keeps coming within the maximum after a service, and drops to
0 as soon as one comes later, so an idle or slow driver costs no polling.  The
spin releases the GIL and returns to ``epoll_wait`` whenever any other fd is
ready.

Polling must never take the CPU from anyone, above all from the driver: a spin on
the CPU the driver runs on keeps the driver from making the very request it waits
for.  So the spin calls ``sched_yield`` at every turn, and a yield that let another
task run (it took longer than a bare system call can) ends polling: the loop
sleeps in ``epoll_wait`` instead and polls no ring for a while, whatever the
windows learnt: 1 ms, doubling at each such yield up to 128 ms, and back to 1 ms
once a spin finds a request without giving way.  So a driver that shares the CPU
meets a spin only every 128 ms, and a CPU that is free again is polled again soon.
On a CPU of its own the yield returns at once and polling goes on.
"""

cimport cython
from cpython.exc cimport PyErr_CheckSignals, PyErr_SetFromErrno
from cpython.ref cimport PyObject
from libc.errno cimport EINTR, errno
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.unistd cimport close, read

from virtio_queue._linux cimport (sched_yield, epoll_event, epoll_create1, epoll_ctl, epoll_wait,
                                  EPOLL_CLOEXEC, EPOLL_CTL_ADD, EPOLL_CTL_MOD, EPOLL_CTL_DEL)
from virtio_queue.queue cimport Queue, pop_index_c
from virtio_queue.source cimport ByteSource
from virtio_devices._pump cimport FdPump, Signaller


cdef enum:
    MAX_EVENTS = 64
    MAX_POLLED = 16

# epoll_data.u64 of a registered fd: the fd in the low 32 bits, this bit for a ring.
cdef uint64_t RING_BIT = (<uint64_t>1) << 32
# A host fd whose readiness an FdPump serves (virtio_devices._pump).
cdef uint64_t PUMP_BIT = (<uint64_t>1) << 33
# A host fd whose FdPump offers a nogil path: the rest of epoll_data.u64 is the
# pump's address (the pump keeps its fd in loop_fd), so that the nogil phase of
# the poll reaches it without a dict (which needs the GIL).  User-space
# addresses never have the top bit set.
cdef uint64_t NOGIL_BIT = (<uint64_t>1) << 63
# With NOGIL_BIT: the address is a KickRing's whose pump offers a nogil path (see
# KickRing.service_nogil); user-space addresses never have this bit either.
cdef uint64_t NOGIL_RING_BIT = (<uint64_t>1) << 62
cdef uint64_t ADDR_MASK = ~(NOGIL_BIT | NOGIL_RING_BIT)

cdef enum:
    # Adaptive polling: the first window, and how often the spin looks at the
    # other fds (one epoll_wait(0)).
    POLL_START_NS = 4000
    POLL_CHECK_NS = 5000
    # A sched_yield in the spin that took longer than this ran another task on our
    # CPU (a bare yield is a system call, well under it; a switch to another task
    # and back is well above it).
    YIELD_SWITCH_NS = 3000
    # Then no ring is polled for this long, doubling up to the maximum.
    SHARED_BACKOFF_NS = 1000000
    SHARED_BACKOFF_MAX_NS = 128000000


cdef inline long long _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <long long>ts.tv_sec * 1000000000 + ts.tv_nsec


@cython.final
cdef class KickRing:
    """Queue ``index`` served on its kicks in compiled code (see the module docstring).

    ``serve(index)`` serves the ring in Python (the device's ``process_queue``): the
    one place the ring reaches Python code besides ``fill_source``.  ``fail(exc)``,
    when given, gets what ``serve`` raised (None: it propagates out of the poll).
    ``fill_source(index)``, when given, is the device's ``VirtioDevice.fill_source``,
    asked on every service: the ``ByteSource`` to fill single-buffer requests from,
    or None when ``serve`` must see the ring.  ``pump``, when given, is the device's
    compiled server of the ring's kicks (``VirtioDevice.kick_pump``, an
    :class:`~virtio_devices._pump.FdPump`): run on every service, ``serve`` only
    when it answers 1 (what it raises goes to ``fail`` as ``serve``'s).  ``kick_fd`` is watched, not owned
    (it cannot change while an :class:`Epoll` serves the ring); ``call_fd`` is owned
    (:meth:`set_call_fd`, :meth:`close`).  ``kicks``, ``chains``/``bytes`` (filled
    here), ``python_calls`` and ``poll_hits`` count what this ring served."""

    cdef readonly Queue queue
    cdef readonly int index
    cdef public object serve
    cdef public object fail
    cdef public object fill_source
    cdef public FdPump pump
    cdef int _kick_fd
    # The call eventfd's owner, given out to compiled device paths (signaller).
    cdef Signaller _sig
    cdef readonly bint attached
    cdef readonly unsigned long long kicks
    cdef readonly unsigned long long chains
    cdef readonly unsigned long long bytes
    cdef readonly unsigned long long python_calls
    cdef readonly unsigned long long poll_hits
    # Kicks served by the pump's nogil path alone (the GIL not taken).
    cdef readonly unsigned long long nogil_kicks
    # The pump whose nogil path serves the kicks, as set_ring found it (None: none).
    cdef FdPump _nogil_pump
    # Adaptive polling: the ring's current window and when its last service ended.
    cdef public long long poll_ns
    cdef long long last_end_ns

    def __cinit__(self, *args, **kwargs):
        self._kick_fd = -1
        self._sig = Signaller()

    def __init__(self, Queue queue not None, int index, serve, *, fill_source=None, fail=None,
                 int kick_fd=-1, int call_fd=-1):
        if not callable(serve):
            raise TypeError(f"serve must be callable, not {type(serve).__name__}")
        self.queue = queue
        self.index = index
        self.serve = serve
        self.fail = fail
        self.fill_source = fill_source
        self._kick_fd = kick_fd
        self._sig.set_fd(call_fd)

    @property
    def kick_fd(self):
        return self._kick_fd

    @kick_fd.setter
    def kick_fd(self, int fd):
        if self.attached:
            raise ValueError(f"ring {self.index}: kick fd changed while an epoll set serves it")
        self._kick_fd = fd

    @property
    def call_fd(self):
        """The call eventfd this ring owns (-1: none)."""
        return self._sig.fd

    @property
    def signaller(self):
        """The ring's :class:`~virtio_devices._pump.Signaller`: its call eventfd's
        owner, which compiled device paths call (also without the GIL); the fd
        set here later is the one it writes."""
        return self._sig

    def set_call_fd(self, int fd):
        """Own ``fd`` (-1: none) as the ring's call eventfd from now on; the previous
        one is closed (the vhost-user front-end replaces it with SET_VRING_CALL)."""
        self._sig.set_fd(fd)

    def close(self):
        """Close the call eventfd (idempotent)."""
        self.set_call_fd(-1)

    def signal_used(self):
        """Interrupt the driver: write the call eventfd (none: nothing to do).  A
        saturated counter (EAGAIN) means a call is pending anyway."""
        self._signal()

    cdef inline void _signal(self) noexcept:
        self._sig.signal_nogil()

    cdef int service(self, bint kicked, bint suppress) except -1:
        """Serve what the ring holds, on a kick (``kicked``: the kick's count is read
        here) or while polling (``suppress`` false: notifications stay suppressed
        on the fill path): fill it from the device's source if it has one for the
        ring, and hand what is left to ``serve``.  Returns 1 when ``serve`` ran."""
        cdef uint64_t value
        if kicked:
            self.kicks += 1
            # The kick fds are non-blocking (the transport makes them so): EAGAIN
            # only means nothing was counted since the last read.
            read(self._kick_fd, &value, 8)
        try:
            if self.fill_source is not None and self._fill(suppress) == 0:
                return 0
            if self.pump is not None:
                if self.pump.pump_c() == 0:
                    self.pump.pumped += 1
                    return 0
                self.pump.handed_over += 1
            self.python_calls += 1
            self.serve(self.index)
        except Exception as e:
            if self.fail is None:
                raise
            self.fail(e)
        return 1

    cdef int service_nogil(self) noexcept nogil:
        """A kick served without the GIL (the poll's nogil phase, for a ring whose
        pump offers a nogil path and which has no fill source): the kick's count
        read, then the pump's nogil path; 1 when :meth:`service` must go on (with
        the kick read already), as the pump's rule says."""
        cdef uint64_t value
        self.kicks += 1
        read(self._kick_fd, &value, 8)
        if self._nogil_pump.run_nogil() == 0:
            self.nogil_kicks += 1
            return 0
        return 1

    cdef int _fill(self, bint suppress) except -1:
        """``Queue.fill_c`` from the device's source, then notify the driver if it
        wants; 0 when the ring is done, 1 when ``serve`` must see it (an error here
        is left to ``serve``, whose path meets the same condition and reports it)."""
        cdef Py_ssize_t served = 0
        cdef unsigned long long total = 0
        cdef int status
        source = self.fill_source(self.index)
        if source is None:
            return 1
        try:
            status = self.queue.fill_c(<ByteSource?>source, -1, suppress, &served, &total)
        except Exception:
            status = 1
        if served:
            self.chains += <unsigned long long>served
            self.bytes += total
            if self._sig.fd >= 0 and self.queue.needs_notification_c():
                self._signal()
        return status

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
        """Serve a kick as the poll does (read the kick, fill or ``serve``), for tests."""
        self.service(True, True)


@cython.final
cdef class Epoll:
    """An epoll set (level-triggered) whose :meth:`poll` returns the ready fds, less
    the kick fds of the :class:`KickRing` rings, which it serves itself."""

    cdef int epfd
    cdef dict _rings        # fd -> KickRing
    cdef dict _pumps        # fd -> FdPump
    cdef dict _by_addr      # address -> FdPump or KickRing, for those with a nogil path
    # Pumps and rings with a nogil path removed since the last poll began: kept alive until
    # then, in case another thread removed one while the poll's nogil phase may
    # still run it (see :meth:`set_pump`).
    cdef list _retired
    cdef readonly long long poll_max_ns
    # No polling before this (CLOCK_MONOTONIC ns): another task wanted our CPU.
    cdef long long _calm_until_ns
    cdef long long _calm_ns
    cdef readonly bint give_way
    # A ring's serve ran in this poll (Python may have added a timer, stopped a ring).
    cdef bint _py_ran
    cdef readonly unsigned long long gave_way
    #: Wake-ups whose ready fds the nogil pumps served all, the GIL not taken.
    cdef readonly unsigned long long nogil_wakeups
    #: Times the poll took the GIL back after a wait (the caller saw it or not).
    cdef readonly unsigned long long gil_wakeups

    def __cinit__(self, *args, **kwargs):
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            PyErr_SetFromErrno(OSError)
        self._rings = {}
        self._pumps = {}
        self._by_addr = {}
        self._retired = []

    def __init__(self, long long poll_max_us=0, *, bint give_way=True):
        """``poll_max_us``: the longest adaptive polling window of a ring (0: never
        poll), at most 1 s.  ``give_way``: the spin yields the CPU and stops when
        another task wants it (see the module docstring); False only where the CPU
        is known to be the loop's alone (tests of the other polling rules)."""
        if not 0 <= poll_max_us <= 1000000:
            raise ValueError(f"poll_max_us must be from 0 to 1000000, not {poll_max_us}")
        self.poll_max_ns = poll_max_us * 1000
        self.give_way = give_way
        self._calm_ns = SHARED_BACKOFF_NS

    def __dealloc__(self):
        if self.epfd >= 0:
            close(self.epfd)

    def fileno(self):
        return self.epfd

    def close(self):
        """Close the epoll fd (the registered fds are not closed); idempotent."""
        self._detach_all()
        if self.epfd >= 0:
            close(self.epfd)
            self.epfd = -1

    cdef void _detach_all(self):
        for ring in self._rings.values():
            (<KickRing>ring).attached = False
            if (<KickRing>ring)._nogil_pump is not None:
                self._by_addr.pop(<uint64_t><void *>ring, None)
                self._retired.append(ring)
        self._rings.clear()
        for pump in self._pumps.values():
            self._forget(<FdPump>pump)
        self._pumps.clear()

    cdef void _forget(self, FdPump pump):
        """``pump`` no longer serves a fd of this set."""
        pump.loop_fd = -1
        pump.loop_epfd = -1
        if pump.offers_nogil:
            self._by_addr.pop(<uint64_t><void *>pump, None)
            self._retired.append(pump)

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
        """Stop watching ``fd`` (and serving it as a ring's kick fd)."""
        ring = self._rings.pop(fd, None)
        if ring is not None:
            (<KickRing>ring).attached = False
            if (<KickRing>ring)._nogil_pump is not None:
                self._by_addr.pop(<uint64_t><void *>ring, None)
                self._retired.append(ring)
        pump = self._pumps.pop(fd, None)
        if pump is not None:
            self._forget(<FdPump>pump)
        self._ctl(EPOLL_CTL_DEL, fd, 0, 0)

    def set_ring(self, int fd, unsigned int events, KickRing ring):
        """Serve the kicks of registered ``fd`` with ``ring`` (None: return ``fd`` from
        :meth:`poll` again).

        A ring whose ``pump`` offers a nogil path (``pump.offers_nogil``) and that has
        no ``fill_source`` has its kicks served by :meth:`poll` with the GIL
        released first (:meth:`KickRing.service_nogil`: the pump's nogil path, as
        set here), the rest of :meth:`KickRing.service` only when that asks; such a
        ring is not polled.  Call this on the loop's thread."""
        cdef uint64_t data = <uint32_t>fd
        if ring is not None and ring._kick_fd != fd:
            raise ValueError(f"ring kick fd {ring._kick_fd} is not fd {fd}")
        if ring is not None:
            data |= RING_BIT
            if ring.pump is not None and ring.pump.offers_nogil and ring.fill_source is None:
                ring._nogil_pump = ring.pump
                data = NOGIL_BIT | NOGIL_RING_BIT | <uint64_t><void *>ring
            else:
                ring._nogil_pump = None
        self._ctl(EPOLL_CTL_MOD, fd, events, data)
        old = self._rings.pop(fd, None)
        if old is not None:
            (<KickRing>old).attached = False
            if (<KickRing>old)._nogil_pump is not None:
                self._by_addr.pop(<uint64_t><void *>old, None)
                self._retired.append(old)
        if ring is not None:
            self._rings[fd] = ring
            ring.attached = True
            if ring._nogil_pump is not None:
                self._by_addr[<uint64_t><void *>ring] = ring

    def set_pump(self, int fd, unsigned int events, FdPump pump):
        """Serve the readiness of registered ``fd`` with ``pump.pump_c()`` inside
        :meth:`poll`; ``fd`` is returned only when it answers 1 or raises (the
        exception is kept in ``pump.error``).  None: return ``fd`` again.

        A pump that offers a nogil path (``pump.offers_nogil``) is run by
        :meth:`poll` with the GIL released first, ``pump_c`` only when that asks
        (virtio_devices._pump's rule).  This set keeps it alive until the poll
        after it was replaced or removed.  Call this and :meth:`unregister` on the
        loop's thread (as every change to what a nogil pump reads).

        Raises:
            ValueError: ``fd`` is a ring's kick fd, or ``pump`` serves another fd.
        """
        cdef uint64_t data = <uint32_t>fd
        if fd in self._rings:
            raise ValueError(f"fd {fd} is a ring's kick fd")
        if pump is not None and pump.loop_fd >= 0 and pump.loop_fd != fd:
            raise ValueError(f"pump serves fd {pump.loop_fd} already, not fd {fd}")
        if pump is not None:
            data = (NOGIL_BIT | <uint64_t><void *>pump) if pump.offers_nogil else data | PUMP_BIT
        self._ctl(EPOLL_CTL_MOD, fd, events, data)
        old = self._pumps.pop(fd, None)
        if old is not None:
            self._forget(<FdPump>old)
        if pump is not None:
            self._pumps[fd] = pump
            pump.loop_fd = fd
            pump.loop_epfd = self.epfd
            pump.loop_data = data
            pump.loop_events = events
            if pump.offers_nogil:
                self._by_addr[<uint64_t><void *>pump] = pump

    @property
    def polling_paused(self):
        """Whether polling gives way now (another task wanted the CPU lately)."""
        return _now_ns() < self._calm_until_ns

    def poll(self, double timeout=-1.0):
        """Wait up to ``timeout`` seconds (< 0: forever) for fds that need Python;
        return them (a list, possibly empty when the time ran out or a signal came).

        Kicks of rings are served here meanwhile, the wait going on for what is left
        of the timeout, unless a ring's ``serve`` ran: then it returns (possibly an
        empty list), so that the caller sees what that Python code did (a timer
        it added, say).  The pumps that offer a nogil path are run right after
        each wait with the GIL still released (:meth:`_wait`): a wake-up they
        serve entirely goes back to waiting without taking the GIL.

        Raises:
            OSError: epoll_wait failed (not EINTR: a signal just returns).
            Exception: what a ring's ``fail`` raised, or ``serve`` without ``fail``.
        """
        cdef epoll_event evs[MAX_EVENTS]
        cdef int n, i, fd, ms
        cdef uint64_t data
        cdef long long now_ns = 0, left
        # < 0: no deadline (a timeout beyond ~11 days counts as none)
        cdef long long deadline = -1
        cdef bint calm
        cdef KickRing r
        cdef list polled
        cdef list out = []
        if self.epfd < 0:
            raise ValueError("I/O operation on closed epoll object")
        if 0 <= timeout <= 1e6:
            deadline = _now_ns() + <long long>(timeout * 1e9)
        self._py_ran = False
        if self._retired:
            # No nogil phase runs now: the pumps removed since the last poll go.
            self._retired.clear()
        while True:
            ms = -1
            if deadline >= 0:
                left = deadline - _now_ns()
                ms = 0 if left <= 0 else <int>((left + 999999) // 1000000)
            with nogil:
                n = self._wait(evs, ms, deadline)
            self.gil_wakeups += 1
            if n < 0:
                if errno == EINTR:
                    PyErr_CheckSignals()
                    return out
                PyErr_SetFromErrno(OSError)
            polled = None
            calm = True
            if n > 0 and self.poll_max_ns:
                now_ns = _now_ns()
                calm = now_ns < self._calm_until_ns
            for i in range(n):
                data = evs[i].data.u64
                fd = <int><uint32_t>data   # (a literal 0xFFFFFFFF would be a Python int)
                # (NOGIL_BIT first: a pump's address may have the other bits.)
                if data & RING_BIT and not data & NOGIL_BIT:
                    ring = self._rings.get(fd)
                    if ring is None:
                        continue    # stopped by a ring served before it in this batch
                    r = <KickRing>ring
                    if calm:
                        r.poll_ns = 0
                    else:
                        r.adapt(now_ns, self.poll_max_ns)
                    if r.service(True, True):
                        self._py_ran = True
                    # While polling gives way nothing is polled or learnt: no clock
                    # read either (a ring's first kick after the pause finds its
                    # last service long ago and starts learning afresh).
                    if self.poll_max_ns and not calm:
                        r.last_end_ns = _now_ns()
                        # A ring the device left requests in (it stopped draining:
                        # admit, park) is the device's until it resumes.
                        if r.poll_ns and r.attached and not r.queue.work_pending_c():
                            if polled is None:
                                polled = []
                            polled.append(r)
                    continue
                if data & NOGIL_RING_BIT:
                    # Its pump's nogil path asked for service (the kick read already);
                    # such a ring is not polled.  Looked up by address: a ring's
                    # serve earlier in this batch may have removed it.
                    ring = self._by_addr.get(data & ADDR_MASK)
                    if ring is None:
                        continue
                    if (<KickRing>ring).service(False, True):
                        self._py_ran = True
                    continue
                if data & (PUMP_BIT | NOGIL_BIT):
                    if data & NOGIL_BIT:
                        # Its nogil path asked for pump_c.  Looked up by address:
                        # a ring's serve earlier in this batch may have removed it.
                        pump = self._by_addr.get(data & ~NOGIL_BIT)
                        if pump is None:
                            continue
                        fd = (<FdPump>pump).loop_fd
                    else:
                        pump = self._pumps.get(fd)
                        if pump is None:
                            continue    # removed by a callback earlier in this batch
                    # pump_c runs here, within the poll (it adds no timers, stops
                    # no loop: those are the callback's); anything else is Python's.
                    try:
                        if (<FdPump>pump).pump_c() == 0:
                            (<FdPump>pump).pumped += 1
                            continue
                    except Exception as e:
                        (<FdPump>pump).error = e
                out.append(fd)
            if polled is not None and not out and ms != 0:
                self._poll_rings(polled, deadline)
            if out or ms == 0 or self._py_ran:
                # After Python code ran the caller looks at its timers again.
                return out

    cdef int _wait(self, epoll_event *evs, int ms, long long deadline) noexcept nogil:
        """epoll_wait (GIL released by the caller) up to ``ms`` (-1: forever), then
        run the nogil path of every ready pump that offers one; the events left
        (the rest, and the pumps whose nogil path asked for ``pump_c``) are moved
        to the front of ``evs`` and counted in the return.  While nothing is left
        it waits again, for what is left of ``deadline`` (< 0: none), so the GIL
        is not taken.  < 0: epoll_wait failed (errno)."""
        cdef int n, m, i
        cdef uint64_t data
        cdef long long left
        while True:
            n = epoll_wait(self.epfd, evs, MAX_EVENTS, ms)
            if n <= 0:
                return n
            m = 0
            for i in range(n):
                data = evs[i].data.u64
                if data & NOGIL_BIT:
                    # A borrowed reference: _by_addr (or _retired) keeps it alive.
                    if data & NOGIL_RING_BIT:
                        if (<KickRing><PyObject *><void *>(data & ADDR_MASK)).service_nogil() == 0:
                            continue
                    elif (<FdPump><PyObject *><void *>(data & ADDR_MASK)).run_nogil() == 0:
                        continue
                if m != i:
                    evs[m] = evs[i]
                m += 1
            if m:
                return m
            self.nogil_wakeups += 1
            if ms == 0:
                return 0
            if deadline >= 0:
                left = deadline - _now_ns()
                if left <= 0:
                    return 0
                ms = <int>((left + 999999) // 1000000)

    cdef list _arm(self, list rings):
        """The rings of ``rings`` still served here, with the driver's notifications
        suppressed for polling (at most ``MAX_POLLED``; a ring whose queue refuses is
        left out: its next kick meets the error on its path)."""
        cdef list armed = []
        cdef KickRing r
        for ring in rings:
            r = <KickRing>ring
            if len(armed) == MAX_POLLED:
                break
            if not r.attached:
                continue
            try:
                r.queue.suppress_notification_c()
            except Exception:
                continue
            armed.append(r)
        return armed

    cdef int _poll_rings(self, list rings, long long deadline_ns) except -1:
        """Adaptive polling (see the module docstring) of ``rings``, which were just
        served, until their longest window passes without a request, another fd is
        ready, ``deadline_ns`` (< 0: none) comes, or another task wants the CPU.
        Leaves every ring that is still polled with notifications on and nothing
        available; a ring whose device left requests in it (it stopped draining) is
        left as the device left it."""
        cdef PyObject *queues[MAX_POLLED]
        cdef int kick_fds[MAX_POLLED]
        cdef epoll_event evs[MAX_EVENTS]
        cdef int nr, j, i, m, found
        cdef bint other = False, shared = False
        cdef long long window, now, stop, check
        cdef uint64_t value
        cdef unsigned long long calls
        cdef uint16_t popped
        cdef KickRing r
        rings = self._arm(rings)
        check = _now_ns() + POLL_CHECK_NS
        try:
            while rings:
                nr = len(rings)
                window = 0
                for j in range(nr):
                    r = <KickRing>rings[j]
                    queues[j] = <PyObject *>r.queue
                    kick_fds[j] = r._kick_fd
                    if r.poll_ns > window:
                        window = r.poll_ns
                found = -1
                with nogil:
                    stop = _now_ns() + window
                    if deadline_ns >= 0 and deadline_ns < stop:
                        stop = deadline_ns
                    while True:
                        # The other fds first, also while requests keep coming: a
                        # guest must not be able to starve the socket or the stop fd.
                        now = _now_ns()
                        if now >= check:
                            check = now + POLL_CHECK_NS
                            m = epoll_wait(self.epfd, evs, MAX_EVENTS, 0)
                            for i in range(m):
                                for j in range(nr):
                                    if (not evs[i].data.u64 & NOGIL_BIT
                                            and kick_fds[j] == <int><uint32_t>evs[i].data.u64):
                                        # A kick sent before the driver saw the
                                        # suppression: the spin serves it.
                                        read(kick_fds[j], &value, 8)
                                        break
                                else:
                                    other = True
                            if other:
                                break
                        for j in range(nr):
                            if (<Queue>queues[j]).work_pending_c():
                                found = j
                                break
                        if found >= 0 or now >= stop:
                            break
                        # Never keep the CPU from a task that wants it (the driver
                        # above all): a yield that ran one ends polling.
                        if self.give_way:
                            now = _now_ns()
                            sched_yield()
                            if _now_ns() - now > YIELD_SWITCH_NS:
                                shared = True
                                break
                if found >= 0:
                    r = <KickRing>rings[found]
                    r.poll_hits += 1
                    self._calm_ns = SHARED_BACKOFF_NS
                    calls = r.python_calls
                    popped = pop_index_c(r.queue)
                    if r.service(False, False):
                        self._py_ran = True
                    r.last_end_ns = _now_ns()
                    if (r.attached and pop_index_c(r.queue) == popped
                            and r.queue.work_pending_c()):
                        # The device took nothing (admit, park): the ring is the
                        # device's until it resumes, not the spin's.  (The pop
                        # count also counts heads from the resubmit list, which
                        # leave next_avail alone.)  Work that came after the
                        # service took some is the spin's: the ring's kicks are
                        # suppressed, so no one else sees it.
                        rings.remove(r)
                    if r.python_calls != calls or not r.attached:
                        # Python ran: it may have stopped rings or turned
                        # notifications back on.
                        rings = self._arm(rings)
                    if PyErr_CheckSignals() < 0:
                        return -1
                    continue
                # Leaving, or the window passed: notifications on, serving what came
                # meanwhile; polling goes on if anything did.
                if (self._unpoll(rings) == 0 or other or shared
                        or (deadline_ns >= 0 and _now_ns() >= deadline_ns)):
                    rings = []
                    break
                rings = self._arm(rings)
        except BaseException:
            self._unpoll(rings, serve=False)
            raise
        if shared:
            self.gave_way += 1
            self._calm_until_ns = _now_ns() + self._calm_ns
            if self._calm_ns < SHARED_BACKOFF_MAX_NS:
                self._calm_ns *= 2
        return 0

    cdef unsigned long long _unpoll(self, list rings, bint serve=True) except? 0:
        """Turn the driver's notifications back on for polled ``rings`` and serve what
        they hold (``serve`` false: only the former); returns how many were served."""
        cdef KickRing r
        cdef unsigned long long served = 0
        cdef bint pending
        for ring in rings:
            r = <KickRing>ring
            if not r.attached:
                continue
            try:
                pending = r.queue.enable_notification_c() != 0
            except Exception:
                pending = True      # the ring's path meets the error and reports it
            if pending and serve:
                if r.service(False, True):
                    self._py_ran = True
                served += 1
        return served
