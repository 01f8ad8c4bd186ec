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
"""


cdef class FdPump:
    """Base of the compiled servers of a host fd (see the module docstring).

    ``error``: what ``pump_c`` raised when the loop called it, until :meth:`pump`
    raises it.  ``pumped`` / ``handed_over``: readinesses served in compiled code /
    handed to Python (by :meth:`pump` returning true).
    """

    # (error starts as None and the counts as 0: Cython's defaults.)

    cdef int pump_c(self) except -1:
        """Serve the fd's readiness: 0 when done, 1 when Python must go on.  The base
        class serves nothing."""
        return 1

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
from posix.unistd cimport read


cdef class EventfdPump(FdPump):
    """The smallest pump, an example and the tests' probe: reads a nonblocking
    eventfd's count in C and adds it to :attr:`total`; answers 1 (Python goes on,
    the count kept in :attr:`pending`) for a count of at least ``hand_over_at``,
    and raises ``RuntimeError`` for one of at least ``raise_at`` (0: never)."""

    cdef public int fd
    cdef public unsigned long long total
    cdef public unsigned long long pending
    cdef public unsigned long long hand_over_at
    cdef public unsigned long long raise_at

    def __init__(self, int fd, *, unsigned long long hand_over_at=0, unsigned long long raise_at=0):
        self.fd = fd
        self.total = self.pending = 0
        self.hand_over_at = hand_over_at
        self.raise_at = raise_at

    cdef int pump_c(self) except -1:
        cdef uint64_t value = 0
        if self.pending:
            return 1    # the Python path has not taken the last one yet
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
