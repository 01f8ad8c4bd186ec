# cython: language_level=3
"""The Linux calls the compiled paths wait and wake with, declared once.

Every ``.pyx`` of the stack that polls an fd, runs an epoll set, makes an eventfd or
yields its CPU cimports them from here (``from virtio_queue._linux cimport poll,
pollfd, POLLIN``) instead of declaring its own copy.  Declarations only: there is no
module behind this file.
"""

from libc.stdint cimport uint32_t, uint64_t
from posix.time cimport timespec


cdef extern from "<sched.h>" nogil:
    int sched_yield()


cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_CLOEXEC
        EFD_NONBLOCK


cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    # _GNU_SOURCE: the timeout in nanoseconds (a wait shorter than poll's millisecond).
    int ppoll(pollfd *fds, unsigned long nfds, const timespec *tmo, const void *sigmask)
    enum:
        POLLIN
        POLLHUP


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
        EPOLLIN
