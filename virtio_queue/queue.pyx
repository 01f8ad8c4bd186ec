# cython: language_level=3, embedsignature=True
"""The device side of a split virtqueue (VIRTIO 1.2 §2.7), like rust-vmm's ``Queue``.

Layout of the three parts in guest memory (§2.7): the descriptor table (16 bytes per
entry, 16-byte aligned), the available ring (flags, idx, ring[size], used_event;
2-byte aligned) and the used ring (flags, idx, ring[size] of {id, len}, avail_event;
4-byte aligned).  All fields are little-endian.

The queue is bound to a :class:`~virtio_queue.GuestMemory`; its ring addresses are
translated once and re-translated only when the memory's generation changes.
"""

from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.errno cimport EINTR, errno
from posix.uio cimport iovec

from virtio_queue.chain cimport ChainCursor, chain_next, chain_start, make_chain
from virtio_queue.includes.atomics cimport (vq_fence_seqcst, vq_load_acquire16,
                                            vq_store_release16)
from virtio_queue.includes.endian cimport htole16, htole32, htole64, le16toh
from virtio_queue.includes.virtio_ring cimport (VRING_AVAIL_F_NO_INTERRUPT,
                                                VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
                                                vring_desc)
from virtio_queue.layouts cimport DescStateSplit, QueueRegionSplit, inflight_desc
from virtio_queue.memory cimport (GM_OK, GuestMemory, MemorySnapshot, gm_text, snap_check,
                                  snap_ptr, snap_ptr_w)
from virtio_queue.source cimport ByteSource

# The hot paths' "rings not current" branch (ensure_ready, split mode) is rare: told
# so, the compiler keeps the one-region path a straight fall-through.
cdef extern from *:
    """
    #define vq_unlikely(x) __builtin_expect(!!(x), 0)
    """
    bint vq_unlikely(bint x) noexcept nogil

from virtio_queue.errors import (InvalidAvailRingIndex, InvalidDescriptorIndex,
                                 InvalidQueueConfig, QueueNotReady)

#: The largest split queue (VIRTIO 1.2 §2.7: Queue Size is at most 32768).
MAX_QUEUE_SIZE = 32768

cdef enum:
    # Requests that Queue.fill_from fills with one read of the source.
    FILL_BATCH = 64


cdef inline uint16_t _rd16(const unsigned char *p) noexcept nogil:
    cdef uint16_t v
    memcpy(&v, p, 2)
    return le16toh(v)


cdef inline void _wr16(unsigned char *p, uint16_t v) noexcept nogil:
    v = htole16(v)
    memcpy(p, &v, 2)


cdef inline unsigned char *_field(Queue q, uint64_t gpa, uint64_t size) noexcept nogil:
    """Host address of a ring field of a split queue (q._split).  _map checked that
    the ring is mapped and that no region boundary falls inside a field, so this
    finds the field in one region of the queue's snapshot."""
    return snap_ptr(q._snap, gpa, size)


cdef inline uint16_t _avail_rd16(Queue q, size_t off) noexcept nogil:
    """avail ring u16 at ``off`` (not the per-chain hot path: see pop_head)."""
    if q._avail != NULL:
        return _rd16(q._avail + off)
    return _rd16(_field(q, q._avail_gpa + off, 2))


cdef inline uint16_t _avail_idx_acquire(Queue q) noexcept nogil:
    """avail->idx, loaded with acquire ordering (VIRTIO 1.2 §2.7.13.3)."""
    if q._avail != NULL:
        return le16toh(vq_load_acquire16(q._avail + 2))
    return le16toh(vq_load_acquire16(_field(q, q._avail_gpa + 2, 2)))


cdef inline uint16_t _used_rd16(Queue q, size_t off) noexcept nogil:
    if q._used != NULL:
        return _rd16(q._used + off)
    return _rd16(_field(q, q._used_gpa + off, 2))


cdef inline void _used_wr16(Queue q, size_t off, uint16_t v) noexcept nogil:
    if q._used != NULL:
        _wr16(q._used + off, v)
    else:
        _wr16(_field(q, q._used_gpa + off, 2), v)


cdef inline bint _rings_current(Queue q) noexcept nogil:
    """The queue is ready and its ring pointers were translated against the current
    memory (the hot paths' check; ``ensure_ready`` redoes the translation)."""
    return q._ready and q._mapped and q._gen == q._memory._generation


cdef inline int _known_avail(Queue q) noexcept nogil:
    """How many chains from next_avail on are known to be available.  avail->idx is
    re-read (acquire) only once those known are used up, so a batch costs one
    atomic load.  -1: avail->idx is more than a queue ahead (nothing is recorded;
    the caller reports it with :func:`_raise_ahead` or leaves it to pop_head)."""
    cdef uint16_t idx, n
    if q._next_avail == q._avail_seen:
        idx = _avail_idx_acquire(q)
        n = idx - q._next_avail
        if n > q._size:
            return -1
        q._avail_seen = idx
    return <uint16_t>(q._avail_seen - q._next_avail)


cdef int _raise_ahead(Queue q, uint16_t idx) except -1:
    # rust-vmm's InvalidAvailRingIndex: the driver can never have more than a
    # queue's worth of chains outstanding.
    raise InvalidAvailRingIndex(
        f"avail index {idx} is {<uint16_t>(idx - q._next_avail)} ahead of next_avail "
        f"{q._next_avail} (queue size {q._size})")


cdef inline size_t _avail_off(Queue q, uint16_t idx) noexcept nogil:
    """Offset in the avail ring of its entry for the free-running index ``idx``."""
    return 4 + 2 * <size_t>(idx & (q._size - 1))


cdef inline uint16_t _avail_entry(Queue q, uint16_t idx) noexcept nogil:
    """The avail ring's entry for ``idx`` when the ring is in one region (not split)."""
    return _rd16(q._avail + _avail_off(q, idx))


cdef inline void _took_avail(Queue q, uint16_t head) noexcept nogil:
    """``head``, the avail entry at next_avail, was taken: next_avail passes it and
    the inflight area (if any) marks it in flight."""
    q._next_avail += 1
    if q._inflight != NULL:
        q._inflight_popped(head)


cdef inline int _pop_avail(Queue q, uint16_t *head, bint split) noexcept nogil:
    """Take the next head from the avail ring: 1, 0 when none is available, -1 when
    avail->idx is more than a queue ahead (nothing taken; see :func:`_known_avail`).
    ``split`` (a constant at each call) reads the entry by translating its field."""
    cdef int n = _known_avail(q)
    if n <= 0:
        return n
    if split:
        head[0] = _avail_rd16(q, _avail_off(q, q._next_avail))
    else:
        head[0] = _avail_entry(q, q._next_avail)
    _took_avail(q, head[0])
    return 1


cdef int _pop_resubmitted(Queue q, uint16_t *head) except -1:
    """Take the next head of the resubmit list (not empty) and mark it in flight.
    Out of line: the list is used only after a reconnect."""
    q._n_resubmit -= 1
    head[0] = <uint16_t>q._resubmit.pop()
    if q._inflight != NULL:
        q._inflight_popped(head[0])
    return 1


cdef inline int _pop_gil(Queue q, uint16_t *head, bint split) except -1:
    """pop_head's work once the rings are current (``split``: see _pop_avail): the
    resubmit list first, then the avail ring; a broken avail index raises."""
    cdef int n
    if q._n_resubmit:
        return _pop_resubmitted(q, head)
    n = _pop_avail(q, head, split)
    if n < 0:
        _raise_ahead(q, _avail_idx_acquire(q))
    return n


cdef class Queue:
    """Device side of one split virtqueue.

    Configure it (``size``, ``desc_table``, ``avail_ring``, ``used_ring``,
    ``event_idx``, ``memory``), set ``ready``, then :meth:`pop_chain` /
    :meth:`add_used`.  ``next_avail``/``set_next_avail`` are what vhost-user's
    GET/SET_VRING_BASE transfer.
    """

    def __cinit__(self):
        self._max_size = 1
        self._size = 1
        self._inflight = NULL
        self._has_inflight_view = False
        self._reset_state()

    def __dealloc__(self):
        self._inflight_release()

    def __init__(self, max_size, GuestMemory memory=None):
        if not isinstance(max_size, int) or not 1 <= max_size <= MAX_QUEUE_SIZE \
                or max_size & (max_size - 1):
            raise InvalidQueueConfig(
                f"maximum queue size {max_size!r} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        self._max_size = max_size
        self._size = <uint16_t>(max_size if max_size < 32768 else 32768)
        self._memory = memory
        self._reset_state()

    cdef void _reset_state(self):
        self._ready = False
        self._event_idx = False
        self._desc_gpa = 0
        self._avail_gpa = 0
        self._used_gpa = 0
        self._next_avail = 0
        self._next_used = 0
        self._avail_seen = 0
        self._signalled_used = 0
        self._signalled_valid = False
        self._resubmit = None
        self._n_resubmit = 0
        self._mapped = self._split = False
        self._snap = None
        self._desc = self._avail = self._used = NULL

    def reset(self):
        """Back to the state after construction (VIRTIO 1.2 §2.4: device reset):
        not ready, size = max size, addresses and indexes 0.  Memory stays bound."""
        self._reset_state()
        self._size = <uint16_t>self._max_size

    # ------------------------------------------------------------ configuration
    @property
    def max_size(self):
        return self._max_size

    @property
    def size(self):
        return self._size

    @size.setter
    def size(self, value):
        """VIRTIO 1.2 §2.7: a power of two, at most the maximum the device offers."""
        if not isinstance(value, int) or not 1 <= value <= self._max_size or value & (value - 1):
            raise InvalidQueueConfig(
                f"queue size {value!r} is not a power of two in 1..{self._max_size}")
        self._size = <uint16_t>value
        self._mapped = self._split = False

    @property
    def ready(self):
        return self._ready

    @ready.setter
    def ready(self, bint value):
        self._ready = value

    @property
    def event_idx(self):
        return self._event_idx

    @event_idx.setter
    def event_idx(self, bint value):
        self._event_idx = value
        self._signalled_valid = False

    @property
    def desc_table(self):
        return self._desc_gpa

    @desc_table.setter
    def desc_table(self, uint64_t gpa):
        if gpa & 15:
            raise InvalidQueueConfig(f"descriptor table address {gpa:#x} is not 16-byte aligned")
        self._desc_gpa = gpa
        self._mapped = self._split = False

    @property
    def avail_ring(self):
        return self._avail_gpa

    @avail_ring.setter
    def avail_ring(self, uint64_t gpa):
        if gpa & 1:
            raise InvalidQueueConfig(f"available ring address {gpa:#x} is not 2-byte aligned")
        self._avail_gpa = gpa
        self._mapped = self._split = False

    @property
    def used_ring(self):
        return self._used_gpa

    @used_ring.setter
    def used_ring(self, uint64_t gpa):
        if gpa & 3:
            raise InvalidQueueConfig(f"used ring address {gpa:#x} is not 4-byte aligned")
        self._used_gpa = gpa
        self._mapped = self._split = False

    @property
    def memory(self):
        return self._memory

    @memory.setter
    def memory(self, GuestMemory memory):
        self._memory = memory
        self._mapped = self._split = False
        self._snap = None

    cdef int _map(self) except -1:
        """Translate the three rings against the memory's current snapshot.

        A part may run over regions that follow each other in guest-physical memory
        (VIRTIO 1.2 §2.7 gives the driver guest-physical addresses only): a
        descriptor table then has no host pointer and chains read it through the
        snapshot; an avail or used ring puts the queue in split mode (every ring
        access translates its field), as long as no region boundary falls inside
        a u16/u32 field, which is loaded or stored in one access."""
        cdef MemorySnapshot snap
        cdef uint64_t n = self._size
        cdef unsigned char *desc
        cdef unsigned char *avail
        cdef unsigned char *used
        cdef uint64_t bad
        cdef int rc
        if self._memory is None:
            raise QueueNotReady("queue has no guest memory")
        snap = self._memory.snap
        if self._split and self._snap is snap:
            return 0                    # split mode, still current
        desc = snap_ptr(snap, self._desc_gpa, 16 * n)
        avail = snap_ptr(snap, self._avail_gpa, 6 + 2 * n)
        used = snap_ptr_w(snap, self._used_gpa, 6 + 8 * n)
        if desc == NULL:
            rc = snap_check(snap, self._desc_gpa, 16 * n, False, 1, &bad)
            if rc != GM_OK:
                raise InvalidQueueConfig(
                    f"descriptor table [{self._desc_gpa:#x}, +{16 * n:#x}) {gm_text(rc, bad)}")
        if avail == NULL:
            rc = snap_check(snap, self._avail_gpa, 6 + 2 * n, False, 2, &bad)
            if rc != GM_OK:
                raise InvalidQueueConfig(
                    f"available ring [{self._avail_gpa:#x}, +{6 + 2 * n:#x}) {gm_text(rc, bad)}")
        if used == NULL:
            rc = snap_check(snap, self._used_gpa, 6 + 8 * n, True, 4, &bad)
            if rc != GM_OK:
                raise InvalidQueueConfig(
                    f"used ring [{self._used_gpa:#x}, +{6 + 8 * n:#x}) {gm_text(rc, bad)}")
        self._split = avail == NULL or used == NULL
        if self._split:
            avail = used = NULL
        self._desc, self._avail, self._used = desc, avail, used
        self._snap = snap
        self._gen = self._memory._generation
        self._mapped = not self._split
        return 0

    cdef inline int ensure_ready(self) except -1:
        if not self._ready:
            raise QueueNotReady("queue is not ready")
        if not self._mapped or self._gen != self._memory._generation:
            self._map()
        return 0

    def validate(self):
        """Check that the queue could run: memory bound, rings aligned and mapped.

        Raises:
            QueueNotReady, InvalidQueueConfig: what is wrong.
        """
        self._map()

    def is_valid(self):
        """Whether :meth:`validate` would pass."""
        try:
            self._map()
        except (QueueNotReady, InvalidQueueConfig):
            return False
        return True

    # ------------------------------------------------------------ indexes
    def next_avail(self):
        return self._next_avail

    def pop_index(self):
        """How many pops were made, modulo 2**16: ``next_avail`` less the heads
        waiting in the resubmit list.  One more per pop and one less per
        :meth:`unpop`, whether the head came from the avail ring or the resubmit
        list (those pops leave ``next_avail`` alone); :meth:`resubmit` and
        :meth:`set_next_avail` start it afresh.  A caller that notes it after each
        pop tells the chains popped last."""
        return pop_index_c(self)

    def set_next_avail(self, uint16_t value):
        """Where the device resumes popping (vhost-user SET_VRING_BASE)."""
        self._next_avail = value
        self._avail_seen = value

    def next_used(self):
        return self._next_used

    def set_next_used(self, uint16_t value):
        self._next_used = value
        self._signalled_valid = False

    def avail_idx(self):
        """The driver's avail->idx, read with acquire ordering."""
        self.ensure_ready()
        return _avail_idx_acquire(self)

    def used_idx(self):
        """used->idx as published."""
        self.ensure_ready()
        if self._used == NULL:
            return le16toh(vq_load_acquire16(_field(self, self._used_gpa + 2, 2)))
        return le16toh(vq_load_acquire16(self._used + 2))

    def pending(self):
        """Chains the driver made available that the device has not popped yet.

        Raises:
            InvalidAvailRingIndex: avail->idx is more than the queue size ahead.
        """
        self.ensure_ready()
        cdef uint16_t idx = _avail_idx_acquire(self)
        cdef uint16_t n = idx - self._next_avail
        if n > self._size:
            _raise_ahead(self, idx)
        return n

    # ------------------------------------------------------------ hot path
    cdef int pop_head(self, uint16_t *head) except -1:
        """Take the next available head index: 1 if there was one, 0 if not
        (:func:`_known_avail`: one atomic load per batch).  The head itself is not
        range-checked here (see pop_chain)."""
        if vq_unlikely(not _rings_current(self)):
            self.ensure_ready()
            if self._split:
                return self._pop_head_split(head)
        return _pop_gil(self, head, False)

    cdef int pop_head_nogil(self, uint16_t *head) noexcept nogil:
        """pop_head without the GIL, for the common case alone: 1 (a head taken), 0
        (none available), or -1 when pop_head must run with the GIL instead
        (nothing was taken: the rings are not current for the memory, run over
        regions, requests wait to be resubmitted, or avail->idx is more than a
        queue ahead, which pop_head reports)."""
        if vq_unlikely(not _rings_current(self) or self._n_resubmit):
            return -1
        return _pop_avail(self, head, False)

    cdef int _pop_head_split(self, uint16_t *head) except -1:
        """pop_head for a queue in split mode: the same steps, each ring field
        translated on its own (out of line: pop_head's common path stays short)."""
        return _pop_gil(self, head, True)

    # -- the hot path without the GIL (a nogil pump's or a ring worker's common
    # case).  Each *_nogil call returns -1 when the call with the GIL must run
    # instead, nothing done; the caller owns the queue meanwhile (the loop thread
    # for a pump, the worker between start and stop), so the memory table and the
    # ring cannot change under it.
    cdef int avail_count_nogil(self) noexcept nogil:
        """How many chains from next_avail on are available (avail->idx re-read
        once those known are used up), or -1 when the GIL path must serve the
        queue: not ready, its rings not translated against the current memory, in
        split mode, resubmitted heads pending, or avail->idx more than a queue
        ahead (pop_head raises for it).  avail_head_nogil and pop_heads_nogil are
        valid for the chains it counted."""
        cdef int n
        if not _rings_current(self) or self._n_resubmit:
            return -1
        n = _known_avail(self)
        return n

    cdef uint16_t avail_head_nogil(self, uint16_t k) noexcept nogil:
        """The head index ``k`` entries after next_avail (k below
        avail_count_nogil's answer), without taking it; not range-checked."""
        return _avail_entry(self, self._next_avail + k)

    cdef void pop_heads_nogil(self, uint16_t n) noexcept nogil:
        """Take the next ``n`` heads (n at most avail_count_nogil's answer), as
        ``n`` pop_head calls would."""
        cdef uint16_t k
        if self._inflight != NULL:
            for k in range(n):
                self._inflight_popped(self.avail_head_nogil(k))
        self._next_avail += n

    # vhost-user "Inflight I/O tracking", split rings: a QueueRegionSplit head, then
    # desc_num DescStateSplit (layouts.pxd).  The fields are little-endian.
    cdef void _inflight_popped(self, uint16_t head) noexcept nogil:
        """A head was taken (step 1): inflight = 1 with the next counter value."""
        cdef DescStateSplit *d
        if head >= self._inflight_descs:
            return      # an out-of-range head is refused by the caller
        d = inflight_desc(self._inflight, head)
        self._inflight_counter += 1
        d.counter = htole64(self._inflight_counter)
        d.inflight = 1

    cdef int add_used_c(self, uint16_t head, uint32_t length) except -1:
        """Put {head, length} in the used ring and publish used->idx (release)."""
        cdef bint split = False
        if head >= self._size:
            raise InvalidDescriptorIndex(
                f"used head index {head} out of range (queue size {self._size})")
        if vq_unlikely(not _rings_current(self)):
            self.ensure_ready()
            split = self._split
        self._add_used_body(head, length, split)
        return 0

    cdef int add_used_nogil(self, uint16_t head, uint32_t length) noexcept nogil:
        """add_used_c without the GIL: 0, or -1 when add_used_c must run with the
        GIL instead (nothing was done: the head is out of range or the rings are
        not current, see pop_head_nogil)."""
        if vq_unlikely(head >= self._size or not _rings_current(self)):
            return -1
        self._add_used_body(head, length, False)
        return 0

    cdef void _add_used_body(self, uint16_t head, uint32_t length, bint split) noexcept nogil:
        """add_used_c's work once the head is checked and the rings current."""
        cdef unsigned char *elem
        cdef DescStateSplit *d = NULL
        cdef uint32_t v[2]
        v[0] = htole32(head)
        v[1] = htole32(length)
        if self._inflight != NULL and head < self._inflight_descs:
            # Before publishing: link the head into the last batch (next =
            # last_batch_head, last_batch_head = head), so that a back-end dying
            # between publishing and clearing can be recovered from the used ring.
            d = inflight_desc(self._inflight, head)
            d.next = self._inflight.last_batch_head
            self._inflight.last_batch_head = htole16(head)
            vq_fence_seqcst()
        if not split:
            elem = self._used + 4 + 8 * <size_t>(self._next_used & (self._size - 1))
            memcpy(elem, v, 8)
            self._next_used += 1
            vq_store_release16(self._used + 2, htole16(self._next_used))
        else:
            self._publish_used_split(v[0], v[1])
        if self._inflight != NULL and head < self._inflight_descs:
            # After publishing: no longer in flight, and the used index reached.
            vq_fence_seqcst()
            d.inflight = 0
            self._inflight.used_idx = htole16(self._next_used)

    cdef void _publish_used_split(self, uint32_t id_le, uint32_t len_le) noexcept nogil:
        """add_used's element store and used->idx publication (release) in split
        mode: id and len each in one region (_map's check), then the index.  The
        two words come by value: taking the address of add_used's element would
        put it in memory on the one-region path too, written as two 4-byte stores
        and read back as one 8-byte load, which the CPU cannot forward."""
        cdef uint64_t elem = self._used_gpa + 4 + 8 * <uint64_t>(self._next_used & (self._size - 1))
        memcpy(_field(self, elem, 4), &id_le, 4)
        memcpy(_field(self, elem + 4, 4), &len_le, 4)
        self._next_used += 1
        vq_store_release16(_field(self, self._used_gpa + 2, 2), htole16(self._next_used))

    cdef int needs_notification_c(self) except -1:
        """VIRTIO 1.2 §2.7.10: whether the driver wants an interrupt now."""
        self.ensure_ready()
        return self._needs_notification_body()

    cdef int needs_notification_nogil(self) noexcept nogil:
        """needs_notification_c without the GIL: 0 or 1, or -1 when the rings are
        not current (see pop_head_nogil; nothing was done)."""
        if vq_unlikely(not _rings_current(self)):
            return -1
        return self._needs_notification_body()

    cdef int _needs_notification_body(self) noexcept nogil:
        cdef uint16_t used_event, old, new
        if not self._event_idx:
            return (_avail_rd16(self, 0) & VRING_AVAIL_F_NO_INTERRUPT) == 0
        # Order our used->idx store before the used_event load (Linux: virtio_mb()).
        vq_fence_seqcst()
        used_event = _avail_rd16(self, 4 + 2 * <size_t>self._size)
        new = self._next_used
        old = self._signalled_used
        self._signalled_used = new
        if not self._signalled_valid:
            self._signalled_valid = True
            return 1
        # vring_need_event() of linux/virtio_ring.h.
        return <uint16_t>(new - used_event - 1) < <uint16_t>(new - old)

    def resubmit(self, heads):
        """Serve the chains ``heads`` again, in this order, before anything new from
        the avail ring: the requests a previous back-end left in flight (vhost-user
        "Inflight I/O tracking", which libvhost-user calls the resubmit list).  The
        avail index is not touched; the caller sets it past these heads.

        Raises:
            InvalidDescriptorIndex: a head is not below the queue size.
        """
        heads = self._checked_heads(heads, "resubmitted")
        heads.reverse()
        self._resubmit = heads
        self._n_resubmit = len(heads)

    def unpop(self, uint16_t head):
        """Give back ``head``, the chain just popped and left unused: the next pop
        returns it again, before the rest of the resubmit list and the avail ring.

        This is right whichever way ``head`` came (VIRTIO 1.2 §2.7.13: each buffer
        is used once).  When the avail entry just behind ``next_avail`` holds
        ``head`` and nothing waits in the resubmit list, ``next_avail`` steps back
        over it: the entry is not consumed (vhost-user GET_VRING_BASE reports it so,
        and whoever serves the ring next serves it) and the pops without the GIL
        keep their route.  Otherwise (a head resubmitted after a reconnect: moving
        the avail index back would serve an avail entry twice and this head never)
        ``head`` goes first in the resubmit list.  When the avail ring cannot be
        read (a stopped queue whose memory table changed), an untracked queue (no
        inflight area, so nothing was resubmitted) steps back and a tracked one
        (the inflight area keeps the head for the next back-end) uses the list.

        Several chains go back by unpopping them in the reverse of the order they
        were popped (the last popped first), or with :meth:`unpop_many`: the next
        pops then return them in their original order.

        Raises:
            InvalidDescriptorIndex: ``head`` is not below the queue size.
        """
        self.unpop_c(head)

    def unpop_many(self, heads):
        """:meth:`unpop` every head of ``heads``, given in the order they were
        popped (the last one is given back first): the next pops return them in
        that order.  All are checked before any is given back.

        Raises:
            InvalidDescriptorIndex: a head is not below the queue size.
        """
        for x in reversed(self._checked_heads(heads, "unpopped")):
            self.unpop_c(x)

    cdef list _checked_heads(self, heads, str what):
        """``heads`` as a list of ints, each checked to be below the queue size.

        Raises:
            InvalidDescriptorIndex: one is not (``what`` names the heads).
        """
        hs = [int(h) for h in heads]
        for h in hs:
            if not 0 <= h < self._size:
                raise InvalidDescriptorIndex(
                    f"{what} head index {h} out of range (queue size {self._size})")
        return hs

    cdef int unpop_c(self, uint16_t head) except -1:
        """:meth:`unpop` for compiled callers."""
        cdef int r
        if head >= self._size:
            raise InvalidDescriptorIndex(
                f"unpopped head index {head} out of range (queue size {self._size})")
        if self._n_resubmit == 0:
            r = self._ring_last_is(head)
            if r == 1 or (r < 0 and self._inflight == NULL):
                self._next_avail -= 1
                return 0
        if self._resubmit is None:
            self._resubmit = []
        self._resubmit.append(head)
        self._n_resubmit += 1
        return 0

    cdef int _ring_last_is(self, uint16_t head) except -2:
        """Whether the avail entry behind next_avail holds ``head``: 1 or 0, -1 when
        the avail ring cannot be read now.  A stopped queue (not ready) whose rings
        were translated against the current memory is read as it is: the transport
        stops a ring before the device gives its chains back."""
        cdef size_t off = _avail_off(self, self._next_avail - 1)
        if vq_unlikely(not _rings_current(self)):
            if (self._memory is None or not (self._mapped or self._split)
                    or self._snap is not self._memory.snap):
                if not self._ready:
                    return -1
                try:
                    self._map()
                except (QueueNotReady, InvalidQueueConfig):
                    return -1
            return _avail_rd16(self, off) == head
        return _rd16(self._avail + off) == head

    cdef int unpop_nogil(self, uint16_t head) noexcept nogil:
        """unpop_c without the GIL, for the common case alone: 0 (``head`` was the
        avail entry behind next_avail, which steps back over it), or -1 when
        unpop_c must run with the GIL instead (nothing was done: the head is out of
        range, the resubmit list is in use, the rings are not current, or the entry
        holds another head)."""
        if vq_unlikely(head >= self._size or self._n_resubmit or not _rings_current(self)):
            return -1
        if _avail_entry(self, self._next_avail - 1) != head:
            return -1
        self._next_avail -= 1
        return 0

    cdef void _inflight_release(self):
        if self._has_inflight_view:
            PyBuffer_Release(&self._inflight_view)
            self._has_inflight_view = False
        self._inflight = NULL
        self._inflight_descs = 0

    def set_inflight(self, area, counter=0):
        """Keep vhost-user's inflight area for this queue current ("Inflight I/O
        tracking", split rings): every popped head is marked in flight with a
        rising counter, every used one cleared after its used index is published,
        with the last batch linked so a crash in between can be repaired.
        ``area`` is a writable buffer over this queue's part of the shared region
        (header already set; heads at or above its desc_num are not tracked);
        None stops tracking.  ``counter`` is where the counter resumes (after recovery).

        Raises:
            InvalidQueueConfig: the area is too small for its desc_num.
        """
        cdef Py_buffer view
        cdef uint16_t descs
        self._inflight_release()
        if area is None:
            return
        PyObject_GetBuffer(area, &view, PyBUF_WRITABLE)
        if view.len < <Py_ssize_t>sizeof(QueueRegionSplit):
            PyBuffer_Release(&view)
            raise InvalidQueueConfig(f"inflight area of {view.len} bytes has no header")
        descs = le16toh((<QueueRegionSplit *>view.buf).desc_num)
        if view.len < <Py_ssize_t>(sizeof(QueueRegionSplit) + sizeof(DescStateSplit) * <size_t>descs):
            PyBuffer_Release(&view)
            raise InvalidQueueConfig(
                f"inflight area of {view.len} bytes is too small for its desc_num {descs}")
        self._inflight_view = view
        self._has_inflight_view = True
        self._inflight = <QueueRegionSplit *>view.buf
        self._inflight_descs = descs
        self._inflight_counter = counter

    @property
    def inflight_counter(self):
        """The counter of the last head marked in flight."""
        return self._inflight_counter

    def chain_at(self, uint16_t head_index):
        """The descriptor chain that starts at ``head_index`` (rust-vmm's
        ``DescriptorChain::new``), without touching the avail ring.

        Raises:
            QueueNotReady: not ready, or no memory.
            InvalidDescriptorIndex: head_index is not below the queue size.
        """
        self.ensure_ready()
        if head_index >= self._size:
            raise InvalidDescriptorIndex(
                f"head descriptor index {head_index} out of range (queue size {self._size})")
        return make_chain(self._snap, self._memory, self._desc, self._desc_gpa, self._size, head_index)

    cdef bint work_pending_c(self) noexcept nogil:
        """Whether the driver made chains available past next_avail (or requests
        wait to be resubmitted), for a device that polls the ring instead of
        waiting for a kick: one acquire load of avail->idx, no Python.  Only
        meaningful on a ready queue whose rings are mapped for the current memory
        (``ensure_ready`` since the memory last changed); otherwise False."""
        if not _rings_current(self) and not (self._split and self._ready
                                             and self._gen == self._memory._generation):
            return False
        return self._n_resubmit != 0 or _avail_idx_acquire(self) != self._next_avail

    cdef int _peek_fill(self, iovec *iov, uint16_t *heads, int limit) except -2:
        """Look at (without taking) up to ``limit`` available chains from the next
        one on that are each one device-writable buffer in writable guest memory;
        describe their buffers in ``iov`` and their heads in ``heads``; return how
        many, stopping at the first other chain (or a bad head, or a broken avail
        index: ``pop_head`` reports those), or -1 when none is available."""
        cdef uint16_t head
        cdef int n, k = 0
        cdef ChainCursor c
        cdef vring_desc d
        cdef unsigned char *p
        if not _rings_current(self):
            self.ensure_ready()
            if self._split:
                # Rings over regions: every chain takes the general path.
                n = _known_avail(self)
                return -1 if n == 0 else 0
        n = _known_avail(self)
        if n == 0:
            return -1
        if n < 0:
            return 0
        if n < limit:
            limit = n
        while k < limit:
            head = _avail_entry(self, self._next_avail + k)
            if head >= self._size:
                break
            chain_start(&c, self._desc, self._desc_gpa, self._size, head)
            if chain_next(self._snap, &c, &d) != 1 or c.has_next or not d.flags & VRING_DESC_F_WRITE:
                break
            p = snap_ptr_w(self._snap, d.addr, d.len)
            if p == NULL:
                break
            iov[k].iov_base = p
            iov[k].iov_len = d.len
            heads[k] = head
            k += 1
        return k

    cdef int fill_c(self, ByteSource source, Py_ssize_t max_chains, bint suppress,
                    Py_ssize_t *served, unsigned long long *total) except -1:
        """The core of :meth:`fill_from`, for compiled callers: fill the available
        single-buffer requests from ``source`` and add them to ``served``/``total``.
        Returns 0 when the ring ran dry (notifications re-enabled with ``suppress``)
        or ``max_chains`` were served, 1 when the next chain is not for this path
        (another shape, a bad head or avail index, a resubmitted request, or a read
        that gave nothing): it is left in the ring, notifications stay disabled."""
        cdef iovec iov[FILL_BATCH]
        cdef uint16_t heads[FILL_BATCH]
        cdef int k, j, limit
        cdef size_t want, left, take
        cdef ssize_t r
        cdef Py_ssize_t done = 0
        while True:
            if suppress:
                self.disable_notification_c()
            while max_chains < 0 or done < max_chains:
                if self._n_resubmit:
                    return 1
                limit = FILL_BATCH
                if max_chains >= 0 and max_chains - done < limit:
                    limit = <int>(max_chains - done)
                k = self._peek_fill(iov, heads, limit)
                if k < 0:
                    break       # dry
                if k == 0:
                    return 1
                want = 0
                for j in range(k):
                    want += iov[j].iov_len
                r = 0
                if want:
                    with nogil:
                        while True:
                            r = source.readv(iov, k)
                            if r >= 0 or errno != EINTR:
                                break
                if r <= 0 and want:
                    return 1    # end of file, EAGAIN or an error: the caller's
                # Take the chains the bytes reached (zero-length ones too).
                left = <size_t>r
                for j in range(k):
                    if iov[j].iov_len == 0:
                        take = 0
                    elif left == 0:
                        break
                    else:
                        take = iov[j].iov_len if iov[j].iov_len < left else left
                        left -= take
                    _took_avail(self, heads[j])
                    self.add_used_c(heads[j], <uint32_t>take)
                    done += 1
                    served[0] += 1
                    total[0] += take
            else:
                return 0        # max_chains served
            if not suppress or not self.enable_notification_c():
                return 0

    def fill_from_fd(self, int fd, Py_ssize_t max_chains=-1, bint suppress=False):
        """:meth:`fill_from` a :class:`~virtio_queue.source.ByteSource` reading ``fd``."""
        return self.fill_from(ByteSource(fd), max_chains, suppress)

    def fill_from(self, ByteSource source not None, Py_ssize_t max_chains=-1,
                  bint suppress=False):
        """Serve chains that are one device-writable buffer each straight from ``source``.

        The compiled fast path of devices like virtio-rng (VIRTIO 1.2 §5.4): the
        available chains made of exactly one device-writable descriptor in writable
        guest memory are filled by one read of ``source`` (``read(2)``/``readv(2)``
        for an fd) per run of up to 64 of them (GIL released), in ring order, each
        ``add_used(head, bytes it got)``; a short read serves the chains it reached
        (the last one partly) and leaves the others available.  It stops at the
        first chain it does not serve and returns it, popped, for the caller's
        general path: a chain of another shape, a buffer outside guest memory, a
        request resubmitted after a reconnect, or a read that gave 0 bytes or
        failed (end of file, EAGAIN, an error: the caller decides what that
        means).  A head index out of range is left in the ring for
        :meth:`pop_chain` to report.

        With ``suppress``, the whole drain follows VIRTIO 1.2 §2.7.10 as well:
        notifications are disabled while draining and re-enabled once the ring is
        empty, draining again if chains arrived meanwhile (they stay disabled when
        a chain is returned: the caller is still draining).

        Returns ``(chains served, bytes, chain or None)``; None when the ring ran
        dry, ``max_chains`` were served, or a bad head index is next.  Notifying
        the driver stays the caller's (one check per batch).

        Raises:
            QueueNotReady, InvalidAvailRingIndex: as :meth:`pop_chain`.
        """
        cdef uint16_t head
        cdef Py_ssize_t served = 0
        cdef unsigned long long total = 0
        if self.fill_c(source, max_chains, suppress, &served, &total) == 0:
            return served, total, None
        if not self.pop_head(&head):
            return served, total, None      # not reached: fill_c saw a chain
        if head >= self._size:
            self._next_avail -= 1           # not consumed: pop_chain reports it
            return served, total, None
        return served, total, make_chain(self._snap, self._memory, self._desc, self._desc_gpa,
                                         self._size, head)

    def pop_chain(self):
        """The next available descriptor chain, or None.

        Raises:
            QueueNotReady: not ready, or no memory.
            InvalidAvailRingIndex: avail->idx is more than the queue size ahead.
            InvalidDescriptorIndex: the head index is out of range; the entry is
                consumed, so the next call goes on with the next one.
        """
        cdef uint16_t head
        if not self.pop_head(&head):
            return None
        if head >= self._size:
            raise InvalidDescriptorIndex(
                f"head descriptor index {head} out of range (queue size {self._size})")
        return make_chain(self._snap, self._memory, self._desc, self._desc_gpa, self._size, head)

    def __iter__(self):
        """Pop every available chain (see :meth:`pop_chain`)."""
        while True:
            chain = self.pop_chain()
            if chain is None:
                return
            yield chain

    def add_used(self, uint16_t head_index, uint32_t length):
        """Return chain ``head_index`` to the driver with ``length`` bytes written.

        Raises:
            InvalidDescriptorIndex: head_index is not below the queue size.
        """
        self.add_used_c(head_index, length)

    def needs_notification(self):
        """Whether to notify the driver now: once per batch of add_used calls.
        With EVENT_IDX this compares used_event (VIRTIO 1.2 §2.7.10), otherwise it
        honours VRING_AVAIL_F_NO_INTERRUPT."""
        return self.needs_notification_c() != 0

    cdef int enable_notification_c(self) except -1:
        self.ensure_ready()
        return self._enable_notification_body()

    cdef int enable_notification_nogil(self) noexcept nogil:
        """enable_notification_c without the GIL: 0 or 1, or -1 when the rings are
        not current (see pop_head_nogil; nothing was done)."""
        if vq_unlikely(not _rings_current(self)):
            return -1
        return self._enable_notification_body()

    cdef int _enable_notification_body(self) noexcept nogil:
        cdef uint16_t flags
        if self._event_idx:
            _used_wr16(self, 4 + 8 * <size_t>self._size, self._next_avail)
        else:
            flags = _used_rd16(self, 0) & ~VRING_USED_F_NO_NOTIFY
            _used_wr16(self, 0, flags)
        # Our store must be visible before we look at avail->idx again, or a kick
        # sent in between could be lost.
        vq_fence_seqcst()
        return _avail_idx_acquire(self) != self._next_avail

    cdef int disable_notification_c(self) except -1:
        self.ensure_ready()
        self._disable_notification_body()
        return 0

    cdef int disable_notification_nogil(self) noexcept nogil:
        """disable_notification_c without the GIL: 0, or -1 when the rings are not
        current (see pop_head_nogil; nothing was done)."""
        if vq_unlikely(not _rings_current(self)):
            return -1
        self._disable_notification_body()
        return 0

    cdef void _disable_notification_body(self) noexcept nogil:
        if not self._event_idx:
            _used_wr16(self, 0, _used_rd16(self, 0) | VRING_USED_F_NO_NOTIFY)

    cdef int suppress_notification_c(self) except -1:
        """Disable notifications so that not even the driver's next request kicks,
        for a device that polls the ring: with EVENT_IDX, avail_event is set to the
        index before next_avail, one the driver has already passed (VIRTIO 1.2
        §2.7.10), where :meth:`disable_notification` leaves it where it was."""
        if not self._event_idx:
            return self.disable_notification_c()
        self.ensure_ready()
        _used_wr16(self, 4 + 8 * <size_t>self._size, <uint16_t>(self._next_avail - 1))
        return 0

    cdef int suppress_notification_nogil(self) noexcept nogil:
        """suppress_notification_c without the GIL: 0, or -1 when the rings are not
        current (see pop_head_nogil; nothing was done)."""
        if vq_unlikely(not _rings_current(self)):
            return -1
        if not self._event_idx:
            self._disable_notification_body()
        else:
            _used_wr16(self, 4 + 8 * <size_t>self._size, <uint16_t>(self._next_avail - 1))
        return 0

    def enable_notification(self):
        """Ask the driver to kick again (VIRTIO 1.2 §2.7.10); returns True if chains
        are already available, so the caller must drain again instead of waiting."""
        return self.enable_notification_c() != 0

    def disable_notification(self):
        """Tell the driver not to kick while we drain (no-op with EVENT_IDX, where
        not updating avail_event has that effect)."""
        self.disable_notification_c()

    def __repr__(self):
        return (f"<Queue size={self._size}/{self._max_size} ready={self._ready} "
                f"next_avail={self._next_avail} next_used={self._next_used}>")
