# cython: language_level=3

cdef class FdPump:
    # What pump_c raised when the loop called it: pump() raises it (under the guard).
    cdef public object error
    cdef public unsigned long long pumped
    cdef public unsigned long long handed_over
    # Readinesses pump_nogil served (counted in pumped too).
    cdef public unsigned long long pumped_nogil
    # Whether pump_nogil is offered (a subclass sets it): the vhost-user loop then
    # runs it with the GIL released (the module docstring's rule).
    cdef readonly bint offers_nogil
    # The fd the loop serves with this pump (set by Epoll.set_pump; -1: none), the
    # loop's epoll fd, the fd's epoll data and events there (for mute_nogil).
    cdef int loop_fd
    cdef int loop_epfd
    cdef unsigned long long loop_data
    cdef unsigned int loop_events
    cdef int pump_c(self) except -1
    cdef int pump_nogil(self) noexcept nogil
    cdef int run_nogil(self) noexcept nogil
    cdef int mute_nogil(self) noexcept nogil
    cdef int unmute_nogil(self) noexcept nogil
    cdef int _events_nogil(self, unsigned int events) noexcept nogil


cdef class Signaller:
    # The call eventfd (-1: none), owned: closed when replaced, by close() or
    # when the last holder lets go.
    cdef int fd
    cdef void signal_nogil(self) noexcept nogil


cdef class RingWorker:
    cdef int _kick_fd
    cdef int _wake_fd
    cdef int _epfd
    cdef bint _stopping
    # The failure whose posted report has not run yet (see take_failure).
    cdef object _unreported
    cdef object _thread
    cdef object _fail
    cdef object _post
    # What serve_c raised (it ended the thread), until the next start.
    cdef public object error
    cdef public int notify_fd
    cdef readonly unsigned long long kicks
    cdef readonly unsigned long long services
    # Services done by serve_nogil alone (the GIL not taken).
    cdef readonly unsigned long long nogil_services
    cdef int serve_nogil(self) noexcept nogil
    cdef int serve_c(self) except -1
    cdef void _failed(self, object err)
