# cython: language_level=3
from cpython.buffer cimport Py_buffer
from posix.uio cimport iovec
from libc.stdint cimport uint16_t, uint32_t, uint64_t

from virtio_queue.layouts cimport QueueRegionSplit
from virtio_queue.memory cimport GuestMemory, MemorySnapshot
from virtio_queue.source cimport ByteSource


cdef class Queue:
    cdef uint32_t _max_size
    cdef uint16_t _size
    cdef bint _ready
    cdef bint _event_idx
    cdef uint64_t _desc_gpa
    cdef uint64_t _avail_gpa
    cdef uint64_t _used_gpa
    cdef GuestMemory _memory
    # Ring host pointers, valid for the snapshot they were translated against; the
    # snapshot is held so the rings stay mapped while we use them.
    cdef MemorySnapshot _snap
    cdef uint64_t _gen
    cdef bint _mapped
    # The avail or used ring runs over adjacent regions: _avail/_used are NULL and
    # every ring access translates its field (_mapped stays False, so the hot
    # paths' _rings_current check sends them to their out-of-line split branch).
    cdef bint _split
    cdef unsigned char *_desc
    cdef unsigned char *_avail
    cdef unsigned char *_used
    cdef uint16_t _next_avail
    cdef uint16_t _next_used
    cdef uint16_t _avail_seen      # avail->idx as last read: chains up to it are known
    cdef uint16_t _signalled_used  # next_used at the last needs_notification()
    cdef bint _signalled_valid
    cdef list _resubmit            # heads to serve again before the avail ring (reversed)
    cdef Py_ssize_t _n_resubmit
    # vhost-user inflight tracking: this queue's area of the shared inflight region
    # (layouts.pxd), kept exported while set (NULL: not tracked).
    cdef QueueRegionSplit *_inflight
    cdef uint32_t _inflight_descs
    cdef uint64_t _inflight_counter
    cdef Py_buffer _inflight_view
    cdef bint _has_inflight_view

    cdef void _reset_state(self)
    cdef int _map(self) except -1
    cdef int ensure_ready(self) except -1
    cdef int pop_head(self, uint16_t *head) except -1
    cdef int unpop_c(self, uint16_t head) except -1
    cdef list _checked_heads(self, heads, str what)
    cdef int _ring_last_is(self, uint16_t head) except -2
    cdef int _pop_head_split(self, uint16_t *head) except -1
    cdef void _publish_used_split(self, uint32_t id_le, uint32_t len_le) noexcept nogil
    cdef bint work_pending_c(self) noexcept nogil
    cdef int _peek_fill(self, iovec *iov, uint16_t *heads, int limit) except -2
    cdef int fill_c(self, ByteSource source, Py_ssize_t max_chains, bint suppress,
                    Py_ssize_t *served, unsigned long long *total) except -1
    cdef int add_used_c(self, uint16_t head, uint32_t length) except -1
    cdef void _add_used_body(self, uint16_t head, uint32_t length, bint split) noexcept nogil
    cdef int needs_notification_c(self) except -1
    cdef int _needs_notification_body(self) noexcept nogil
    cdef int enable_notification_c(self) except -1
    cdef int _enable_notification_body(self) noexcept nogil
    cdef int disable_notification_c(self) except -1
    cdef int suppress_notification_c(self) except -1
    # The hot path without the GIL (a nogil pump's or ring worker's common case):
    # -1 asks for the _c (or pop_head) call with the GIL instead, nothing done.
    cdef int pop_head_nogil(self, uint16_t *head) noexcept nogil
    cdef int avail_count_nogil(self) noexcept nogil
    cdef uint16_t avail_head_nogil(self, uint16_t k) noexcept nogil
    cdef void pop_heads_nogil(self, uint16_t n) noexcept nogil
    cdef int unpop_nogil(self, uint16_t head) noexcept nogil
    cdef int add_used_nogil(self, uint16_t head, uint32_t length) noexcept nogil
    cdef int needs_notification_nogil(self) noexcept nogil
    cdef int enable_notification_nogil(self) noexcept nogil
    cdef int disable_notification_nogil(self) noexcept nogil
    cdef void _disable_notification_body(self) noexcept nogil
    cdef int suppress_notification_nogil(self) noexcept nogil
    cdef void _inflight_popped(self, uint16_t head) noexcept nogil
    cdef void _inflight_release(self)


cdef inline uint16_t pop_index_c(Queue q) noexcept nogil:
    """:meth:`Queue.pop_index` for compiled callers: how many pops were made, modulo
    2**16 (next_avail less the heads waiting in the resubmit list)."""
    return <uint16_t>(q._next_avail - <uint16_t>q._n_resubmit)
