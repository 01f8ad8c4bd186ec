# cython: language_level=3
"""The queue's calls without the GIL, callable from Python, for tests.

Each ``*_nogil`` function here runs the :class:`~virtio_queue.queue.Queue` call of
the same name with the GIL released, as a nogil pump or ring worker runs it, and
returns what it returned (-1: the call with the GIL must run instead, nothing was
done).  Beside each, the twin with the GIL (``pop_head``, ``add_used_c``, the
``*_notification_c`` calls), which raises where the nogil call answers -1, so a
test can hold the two to one contract: same answer and same ring memory where the
nogil call serves, nothing touched where it declines.  Not used by the package.
"""

from libc.stdint cimport uint16_t, uint32_t

from virtio_queue.queue cimport Queue


def pop_head_nogil(Queue q not None):
    """``(rc, head)``: rc 1 (taken), 0 (none available), -1 (use :func:`pop_head`)."""
    cdef uint16_t head = 0
    cdef int rc
    with nogil:
        rc = q.pop_head_nogil(&head)
    return rc, head


def pop_head(Queue q not None):
    """``(rc, head)`` from the call with the GIL: 1 or 0; raises what it raises."""
    cdef uint16_t head = 0
    cdef int rc = q.pop_head(&head)
    return rc, head


def avail_count_nogil(Queue q not None):
    cdef int rc
    with nogil:
        rc = q.avail_count_nogil()
    return rc


def avail_heads_nogil(Queue q not None, uint16_t n):
    """The next ``n`` heads seen in place by ``avail_head_nogil`` (not taken)."""
    cdef uint16_t k
    cdef list out = []
    cdef uint16_t head
    for k in range(n):
        with nogil:
            head = q.avail_head_nogil(k)
        out.append(head)
    return out


def pop_heads_nogil(Queue q not None, uint16_t n):
    with nogil:
        q.pop_heads_nogil(n)


def add_used_nogil(Queue q not None, uint16_t head, uint32_t length):
    cdef int rc
    with nogil:
        rc = q.add_used_nogil(head, length)
    return rc


def add_used(Queue q not None, uint16_t head, uint32_t length):
    return q.add_used_c(head, length)


def needs_notification_nogil(Queue q not None):
    cdef int rc
    with nogil:
        rc = q.needs_notification_nogil()
    return rc


def needs_notification(Queue q not None):
    return q.needs_notification_c()


def enable_notification_nogil(Queue q not None):
    cdef int rc
    with nogil:
        rc = q.enable_notification_nogil()
    return rc


def enable_notification(Queue q not None):
    return q.enable_notification_c()


def disable_notification_nogil(Queue q not None):
    cdef int rc
    with nogil:
        rc = q.disable_notification_nogil()
    return rc


def disable_notification(Queue q not None):
    return q.disable_notification_c()


def suppress_notification_nogil(Queue q not None):
    cdef int rc
    with nogil:
        rc = q.suppress_notification_nogil()
    return rc


def suppress_notification(Queue q not None):
    return q.suppress_notification_c()


def ensure_ready(Queue q not None):
    """Translate the rings against the current memory, as every call with the GIL does first."""
    q.ensure_ready()


def unpop_nogil(Queue q not None, uint16_t head):
    """0 (``head`` given back, next_avail stepped back), -1 (use :func:`unpop`)."""
    cdef int rc
    with nogil:
        rc = q.unpop_nogil(head)
    return rc


def unpop(Queue q not None, uint16_t head):
    return q.unpop_c(head)
