# cython: language_level=3, embedsignature=True
"""Host fds served in compiled code: :class:`FdPump`.

A device that reads a host fd (an evdev node, a socket) on every readable event
can serve the common case in compiled code, without a Python frame, the way
``KickRing`` serves kicks: it registers the fd with ``loop.add_reader(fd,
callback, pump=pump)``, where ``pump`` is an instance of a ``cdef`` subclass of
:class:`FdPump` that overrides ``cdef int pump_c(self) except -1``:

* 0: the readiness was served (the fd read, the ring written, the driver
  notified); nothing else runs;
* 1: Python must go on: the loop calls ``callback()``.

A loop that knows pumps (the vhost-user loop) calls ``pump_c`` itself when the fd
is readable and ``callback`` only when asked; an exception from ``pump_c`` is kept
in :attr:`error` and ``callback`` is called.  Any other loop (virtio-mmio,
asyncio) just calls ``callback``.  So ``callback`` is written the same for both:
it first calls :meth:`FdPump.pump` (which raises a kept error, then runs
``pump_c`` once more) and does the Python path only when that returns true.  For
that, ``pump_c`` must leave what it cannot serve where the Python path finds it
(unread on the fd, or kept on the pump) and answer 1 again while it is there.

A pump may also offer ``cdef int pump_nogil(self) noexcept nogil`` (and set
``offers_nogil`` in ``__cinit__``): the vhost-user loop then runs it for the ready
fd right after ``epoll_wait``, with the GIL still released, and goes back to
sleep without taking the GIL when every ready fd was served so (0).  It answers 1
when the GIL is needed (anything it cannot do in C, an error: kept in C fields
of the pump), and the loop then calls ``pump_c`` with the GIL, exactly as a pump
without a nogil path, so ``pump_c`` must take over from where ``pump_nogil``
stopped.  The rule of the nogil path: it touches no Python object (only C fields
and memory it owns or that the objects it keeps alive keep mapped), and every C
field it reads or writes is changed only on the loop's thread (by ``pump_c``,
the device's callbacks, the transport's messages), never by another thread: an
adapter or worker thread, a test driving the daemon in-process, hands its
changes to the loop with ``call_soon_threadsafe``.  The loop thread runs either
the nogil pumps or Python, never both at once, so such fields need no lock.
"""

from virtio_queue._linux cimport EPOLL_CTL_MOD, epoll_ctl, epoll_event


cdef class FdPump:
    """Base of the compiled servers of a host fd (see the module docstring).

    ``error``: what ``pump_c`` raised when the loop called it, until :meth:`pump`
    raises it.  ``pumped`` / ``handed_over``: readinesses served in compiled code /
    handed to Python (by :meth:`pump` returning true).
    """

    # (error starts as None and the counts as 0: Cython's defaults.)

    def __cinit__(self, *args, **kwargs):
        self.loop_fd = -1
        self.loop_epfd = -1

    cdef int pump_c(self) except -1:
        """Serve the fd's readiness: 0 when done, 1 when Python must go on.  The base
        class serves nothing."""
        return 1

    cdef int pump_nogil(self) noexcept nogil:
        """Serve the fd's readiness without the GIL (the module docstring's rule): 0
        when done, 1 when ``pump_c`` must run with the GIL.  The base class asks for
        ``pump_c`` (it is not called unless ``offers_nogil`` is set)."""
        return 1

    cdef int run_nogil(self) noexcept nogil:
        """What the loop calls: ``pump_nogil``, counted (not to be overridden)."""
        if self.pump_nogil() == 0:
            self.pumped += 1
            self.pumped_nogil += 1
            return 0
        return 1

    cdef int mute_nogil(self) noexcept nogil:
        """Stop the loop's wake-ups for this pump's fd (also without the GIL, on the
        loop's thread): its events in the loop's epoll set become none but those
        the kernel always reports (a hang-up, an error), the loop's tables left as
        they are; 0, or -1 when it serves no loop's fd or the change failed.  The
        loop's ``add_reader`` of the fd sets its events again, as does
        :meth:`unmute_nogil`; ``remove_reader`` forgets it."""
        return self._events_nogil(0)

    cdef int unmute_nogil(self) noexcept nogil:
        """Undo :meth:`mute_nogil`: the fd's events in the loop's epoll set are those
        the loop registered again; 0, or -1 as there."""
        return self._events_nogil(self.loop_events)

    cdef int _events_nogil(self, unsigned int events) noexcept nogil:
        cdef epoll_event ev
        if self.loop_fd < 0 or self.loop_epfd < 0:
            return -1
        ev.events = events
        ev.data.u64 = self.loop_data
        return 0 if epoll_ctl(self.loop_epfd, EPOLL_CTL_MOD, self.loop_fd, &ev) == 0 else -1

    def mute(self, bint on=True):
        """:meth:`mute_nogil` (``on``) or :meth:`unmute_nogil` from Python; whether
        the change was made."""
        return (self.mute_nogil() if on else self.unmute_nogil()) == 0

    def pump(self):
        """Serve the fd's readiness as the loop would; return whether the Python path
        must go on.

        Raises:
            Exception: what ``pump_c`` raised, now or when the loop last called it.
        """
        err = self.error
        if err is not None:
            self.error = None
            raise err
        if self.pump_c():
            self.handed_over += 1
            return True
        self.pumped += 1
        return False


from libc.errno cimport EAGAIN, errno
from libc.stdint cimport uint64_t
from posix.unistd cimport close, read, write


cdef class EventfdPump(FdPump):
    """The smallest pump, an example and the tests' probe: reads a nonblocking
    eventfd's count in C and adds it to :attr:`total`; answers 1 (Python goes on,
    the count kept in :attr:`pending`) for a count of at least ``hand_over_at``,
    and raises ``RuntimeError`` for one of at least ``raise_at`` (0: never).

    ``nogil``: it also offers the nogil path, which reads the count the same way
    and leaves a count it must hand over or raise for (or a failed read's errno)
    to ``pump_c``; ``notify_fd`` (an eventfd, -1: none) is written after every
    count the nogil path served itself."""

    cdef public int fd
    cdef public unsigned long long total
    cdef public unsigned long long pending
    cdef public unsigned long long hand_over_at
    cdef public unsigned long long raise_at
    cdef public int notify_fd
    # What the nogil path left for pump_c: a count read, a read's errno.
    cdef uint64_t _stashed
    cdef int _stashed_errno

    def __init__(self, int fd, *, unsigned long long hand_over_at=0, unsigned long long raise_at=0,
                 bint nogil=False, int notify_fd=-1):
        self.fd = fd
        self.total = self.pending = 0
        self.hand_over_at = hand_over_at
        self.raise_at = raise_at
        self.offers_nogil = nogil
        self.notify_fd = notify_fd

    cdef int pump_nogil(self) noexcept nogil:
        cdef uint64_t value = 0, one = 1
        if self.pending or self._stashed or self._stashed_errno:
            return 1
        if read(self.fd, &value, 8) != 8:
            if errno == EAGAIN:
                return 0
            self._stashed_errno = errno
            return 1
        self.total += value
        if (self.raise_at and value >= self.raise_at) or (self.hand_over_at and value >= self.hand_over_at):
            self._stashed = value
            return 1
        if self.notify_fd >= 0:
            write(self.notify_fd, &one, 8)
        return 0

    cdef int pump_c(self) except -1:
        cdef uint64_t value = 0
        cdef int err = self._stashed_errno
        if self.pending:
            return 1    # the Python path has not taken the last one yet
        if err:
            self._stashed_errno = 0
            raise OSError(err, f"reading eventfd {self.fd} failed")
        if self._stashed:
            value = self._stashed   # read (and counted) by the nogil path
            self._stashed = 0
        else:
            if read(self.fd, &value, 8) != 8:
                if errno == EAGAIN:
                    return 0
                raise OSError(errno, f"reading eventfd {self.fd} failed")
            self.total += value
        if self.raise_at and value >= self.raise_at:
            raise RuntimeError(f"count {value} reached raise_at {self.raise_at}")
        if self.hand_over_at and value >= self.hand_over_at:
            self.pending = value
            return 1
        return 0


# -- the driver's interrupt ----------------------------------------------------------------


cdef class Signaller:
    """One queue's interrupt to the driver as a compiled object: the call eventfd
    it owns, written by calling it (or by ``signal_nogil`` from compiled code,
    without the GIL: a nogil pump's notification).  The transport that gives
    one out (vhost-user's ``KickRing.signaller``, ``Interrupt.signaller(i)``)
    replaces the fd in place (SET_VRING_CALL), on the loop's thread, so every
    holder signals the current one; a replaced fd is closed at once.  A
    saturated counter (EAGAIN) means a call is pending anyway."""

    def __cinit__(self, *args, **kwargs):
        self.fd = -1

    def __dealloc__(self):
        if self.fd >= 0:
            close(self.fd)

    @property
    def call_fd(self):
        """The call eventfd (-1: none)."""
        return self.fd

    def set_fd(self, int fd):
        """Own ``fd`` (-1: none) from now on; the previous one is closed.

        Raises:
            ValueError: ``fd`` is below -1.
        """
        if fd < -1:
            raise ValueError(f"bad file descriptor {fd}")
        old = self.fd
        self.fd = fd
        if old >= 0 and old != fd:
            close(old)

    cdef void signal_nogil(self) noexcept nogil:
        cdef uint64_t one = 1
        if self.fd >= 0:
            write(self.fd, &one, 8)

    def __call__(self):
        """Interrupt the driver (no call fd: nothing)."""
        self.signal_nogil()


# -- ring workers ------------------------------------------------------------------------

from libc.errno cimport EINTR
from virtio_queue._linux cimport (eventfd, EFD_CLOEXEC, EFD_NONBLOCK, pollfd, poll, POLLIN,
                                  epoll_event, epoll_create1, epoll_ctl, epoll_wait, EPOLL_CLOEXEC,
                                  EPOLL_CTL_ADD, EPOLLIN)

import threading


cdef class RingWorker:
    """Base of the compiled servers of a ring on a thread of its own: the ring's kick
    fd is waited for there, with the GIL released, and each kick served by
    ``serve_c`` on that thread, as rust-vmm's vring worker threads serve theirs:
    no hop through the event loop for a device whose requests block (a bus
    transfer) and are short to parse.

    A device offers one from ``VirtioDevice.ring_worker(index)``; the transport
    that supports it (vhost-user) then does not watch the kick fd itself but calls
    :meth:`start` when the ring starts, :meth:`stop` before it takes the queue back
    (the device's ``quiesce`` comes after), and :meth:`wake` where it would call
    ``process_queue`` without a kick.  A subclass overrides ``cdef int
    serve_c(self) except -1``: called on the worker thread with the GIL held after
    each kick (the kick's count read already) or :meth:`wake`; it serves the ring
    as ``process_queue`` would (pop, answer, notify), and releases the GIL itself
    around what blocks; between requests it returns once ``_stopping`` is set (a
    driver that adds requests as fast as they are answered would keep it going,
    and :meth:`stop` waits for it).  Only the worker touches the device's state
    for that ring while it runs: the transport's other uses of the queue come
    after :meth:`stop`.

    What ``serve_c`` raises ends the thread (the ring is not served any more) and
    goes, as :attr:`error`, to ``fail(exc)``, posted to the loop thread with
    ``post(callback)`` (the loop's ``call_soon_threadsafe``; None: ``fail`` is
    called on the worker thread).  Each failure reaches ``fail`` exactly once,
    restarts or not, unless the loop thread took it first with
    :meth:`take_failure`: a transport that takes the ring back (:meth:`stop`)
    while the report is on its way takes the failure there and handles it
    itself, before it starts the worker again; the report then does nothing.
    ``kicks`` and ``services`` count what it served; ``notify_fd``, when not -1,
    is an eventfd written after every service (tests wait on it).

    A subclass whose common requests need no Python object also overrides ``cdef
    int serve_nogil(self) noexcept nogil``: called first after each kick, on the
    worker thread with the GIL still released, it answers 0 when it served the
    kick (the GIL is not taken at all: ``nogil_services`` counts those) or 1 when
    Python must go on, and ``serve_c`` then runs as above.  So it must leave what
    it cannot serve (a request of an odd shape, an error to raise or log) where
    ``serve_c`` finds it, and answer 1; it reads no Python object, only C fields
    that Python does not change while the worker runs (the transport's changes
    to the ring and guest memory come after :meth:`stop`).  A :meth:`wake`, a
    stop and a failed wait always take the GIL.  The base class answers 1.

    Raises:
        OSError: the worker's wake-up eventfd cannot be made.
    """

    def __cinit__(self, *args, **kwargs):
        self._kick_fd = -1
        self._epfd = -1
        self.notify_fd = -1
        self._wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
        if self._wake_fd < 0:
            raise OSError(errno, "eventfd for a ring worker")

    def __dealloc__(self):
        if self._wake_fd >= 0:
            close(self._wake_fd)
        if self._epfd >= 0:
            close(self._epfd)

    cdef int serve_nogil(self) noexcept nogil:
        """Serve a kick without the GIL: 0 when done, 1 when ``serve_c`` must run
        (see the class docstring).  The base class always asks for ``serve_c``."""
        return 1

    cdef int serve_c(self) except -1:
        """Serve the ring once (see the class docstring).  The base class serves
        nothing."""
        return 0

    @property
    def running(self):
        """Whether the thread was started and not yet stopped."""
        return self._thread is not None

    def start(self, int kick_fd, fail=None, post=None):
        """Serve the ring whose kicks are counted on ``kick_fd`` (non-blocking, not
        owned) on a new thread, until :meth:`stop`.

        Raises:
            RuntimeError: the worker runs already.
            ValueError: ``kick_fd`` is not a file descriptor.
        """
        cdef uint64_t value
        if self._thread is not None:
            raise RuntimeError(f"ring worker started twice (kick fd {self._kick_fd})")
        if kick_fd < 0:
            raise ValueError(f"ring worker kick fd {kick_fd} is not a file descriptor")
        cdef epoll_event ev
        cdef int epfd
        read(self._wake_fd, &value, 8)  # a wake-up left from a stop
        # An epoll set of the two fds (they stay registered, unlike poll's): the
        # thread's one wait per kick.
        epfd = epoll_create1(EPOLL_CLOEXEC)
        if epfd < 0:
            raise OSError(errno, "epoll set for a ring worker")
        ev.events = EPOLLIN
        ev.data.u64 = 0
        if epoll_ctl(epfd, EPOLL_CTL_ADD, kick_fd, &ev) < 0:
            e = OSError(errno, f"ring worker cannot watch kick fd {kick_fd}")
            close(epfd)
            raise e
        ev.data.u64 = 1
        epoll_ctl(epfd, EPOLL_CTL_ADD, self._wake_fd, &ev)
        self._epfd = epfd
        self._kick_fd = kick_fd
        self._fail = fail
        self._post = post
        self._stopping = False
        # (A failure of the last run not yet reported stays so: its report still
        # runs, against this run.)
        self.error = None
        thread = threading.Thread(target=self._run, name=f"ring-worker-fd{kick_fd}", daemon=True)
        self._thread = thread
        thread.start()

    def wake(self):
        """Serve the ring once soon, as a kick would (nothing if it is not running)."""
        cdef uint64_t one = 1
        if self._thread is not None:
            write(self._wake_fd, &one, 8)

    def stop(self):
        """Stop the thread and wait for it, GIL released: a service under way ends
        first (what it popped is answered), none starts after.  Idempotent.

        Raises:
            RuntimeError: called from the worker's own thread.
        """
        cdef uint64_t one = 1
        thread = self._thread
        if thread is None:
            return
        if thread is threading.current_thread():
            raise RuntimeError("a ring worker cannot stop itself; it stops when serve_c raises")
        self._stopping = True
        write(self._wake_fd, &one, 8)
        thread.join()
        self._thread = None
        close(self._epfd)
        self._epfd = -1

    def take_failure(self):
        """Take the failure whose report has not run yet: the exception ``serve_c``
        (or the wait) ended the thread with, or None; its posted report then does
        nothing, so the caller handles it, once.  Call it on the loop thread
        (where reports run), after :meth:`stop`."""
        err = self._unreported
        self._unreported = None
        return err

    def _run(self):
        """The worker's thread (see the class docstring)."""
        cdef epoll_event evs[2]
        cdef int rc, i, err = 0, python, epfd = self._epfd
        cdef uint64_t value, one = 1
        while True:
            with nogil:
                # Kicks that serve_nogil serves never take the GIL: the loop
                # leaves only for the Python path, a wake-up, a stop or an error.
                while True:
                    rc = epoll_wait(epfd, evs, 2, -1)
                    if self._stopping:
                        break
                    if rc < 0:
                        err = errno
                        if err == EINTR:
                            continue
                        break
                    python = 0
                    for i in range(rc):
                        if evs[i].data.u64:
                            read(self._wake_fd, &value, 8)
                            python = 1
                        else:
                            # Non-blocking: EAGAIN only means the count was taken already.
                            read(self._kick_fd, &value, 8)
                            self.kicks += 1
                    if python or self.serve_nogil():
                        break
                    self.services += 1
                    self.nogil_services += 1
                    if self.notify_fd >= 0:
                        write(self.notify_fd, &one, 8)
            if self._stopping:
                return
            if rc < 0:
                self._failed(OSError(err, f"ring worker wait on kick fd {self._kick_fd}"))
                return
            try:
                self.serve_c()
            except BaseException as e:
                self._failed(e)
                return
            self.services += 1
            if self.notify_fd >= 0:
                write(self.notify_fd, &one, 8)

    cdef void _failed(self, object err):
        self.error = err
        fail = self._fail
        if fail is None:
            return
        if self._post is None:
            fail(err)
            return
        # Unreported until the report runs or the loop thread takes it: never
        # dropped for a restart (the failure is the device's, not the run's).
        self._unreported = err

        def report():
            if self._unreported is err:
                self._unreported = None
                fail(err)

        try:
            self._post(report)
        except Exception:  # the loop is gone: take_failure still finds it
            pass


cdef class EventfdRingWorker(RingWorker):
    """The smallest ring worker, an example and the tests' probe: each service
    counts itself in :attr:`served` and raises ``RuntimeError`` on service number
    ``raise_at`` (0: never); else writes ``entered_fd`` (an eventfd, -1: none),
    then, when ``gate_fd`` is not -1, waits (GIL released) until that eventfd is
    readable and reads it (a service that blocks, as a bus transfer does), then
    calls ``serve()`` when given (a test device serves its ring there).

    With ``nogil`` true it serves kicks without the GIL (``serve_nogil``): each
    call counts itself in :attr:`nogil_calls`, and call number ``hand_over_at``
    (0: never) answers 1 at once, so that ``serve_c`` serves that kick; the others
    write ``entered_fd`` and wait at ``gate_fd`` as above, and answer 0."""

    cdef public unsigned long long served
    cdef public int gate_fd
    cdef public unsigned long long raise_at
    cdef public int entered_fd
    cdef public object serve
    cdef public bint nogil
    cdef public unsigned long long hand_over_at
    cdef public unsigned long long nogil_calls

    def __init__(self, int gate_fd=-1, unsigned long long raise_at=0, int entered_fd=-1, serve=None, *,
                 bint nogil=False, unsigned long long hand_over_at=0):
        self.gate_fd = gate_fd
        self.raise_at = raise_at
        self.entered_fd = entered_fd
        self.serve = serve
        self.nogil = nogil
        self.hand_over_at = hand_over_at

    cdef int serve_nogil(self) noexcept nogil:
        if not self.nogil:
            return 1
        self.nogil_calls += 1
        if self.hand_over_at and self.nogil_calls == self.hand_over_at:
            return 1
        self._enter_and_gate()
        return 0

    cdef void _enter_and_gate(self) noexcept nogil:
        cdef pollfd p
        cdef uint64_t value, one = 1
        if self.entered_fd >= 0:
            write(self.entered_fd, &one, 8)
        if self.gate_fd >= 0:
            p.fd = self.gate_fd
            p.events = POLLIN
            poll(&p, 1, -1)
            read(self.gate_fd, &value, 8)

    cdef int serve_c(self) except -1:
        self.served += 1
        if self.raise_at and self.served == self.raise_at:
            raise RuntimeError(f"service {self.served} reached raise_at")
        with nogil:
            self._enter_and_gate()
        if self.serve is not None:
            self.serve()
        return 0
