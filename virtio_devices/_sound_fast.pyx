# cython: language_level=3, embedsignature=True
"""The compiled I/O path of a loop-paced virtio-sound stream (VIRTIO 1.2 §5.14.6.8).

:class:`IoPacer` holds the I/O messages of one PCM stream whose backend never blocks
(``null``): it pops them off the stream's queue (tx or rx), checks their
``virtio_snd_pcm_xfer`` header, keeps them in order, and completes each when its
duration at the stream's byte rate is over, writing its ``virtio_snd_pcm_status``
and its used element, all without Python code per message.  The sound device
(``virtio_devices.sound``) owns the timer that calls :meth:`IoPacer.due` and the
state machine; this class only knows whether the stream takes I/O messages
(``accepting``) and whether its time runs (``running``).

A message it does not know is handed back, popped, for the device's Python path
(``SoundDevice.handle_chain``), which answers it as it always did: a header that
is too short, a stream id that is not this stream's, a chain without room for its
status, a chain the queue cannot walk, or any message while the stream does not
take them.  Capture (rx) on this path records silence: the frames are zeroed when
the message is taken (the driver does not look at them before their completion).
"""

cimport cython
from libc.errno cimport errno
from libc.stdint cimport UINT32_MAX, uint16_t, uint32_t, uint64_t
from libc.string cimport memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, itimerspec, timespec
from posix.unistd cimport close, read

from virtio_devices._pump cimport FdPump, Signaller

from virtio_queue.chain cimport (ChainCursor, DescriptorChain, Reader, Writer, chain_next, chain_start,
                                 make_chain, make_reader, make_writer)
from virtio_queue.includes.virtio_ring cimport VRING_DESC_F_WRITE, vring_desc
from virtio_queue.memory cimport MemorySnapshot, snap_ptr, snap_ptr_w
from virtio_queue.queue cimport Queue

from virtio_queue import InvalidDescriptorIndex

cdef extern from "<sys/timerfd.h>" nogil:
    int timerfd_create(int clockid, int flags)
    int timerfd_settime(int fd, int flags, const itimerspec *new_value, itimerspec *old_value)
    enum:
        TFD_NONBLOCK
        TFD_CLOEXEC
        TFD_TIMER_ABSTIME

cdef enum:
    # §5.14.6.9: the events this path sends, and how many wait for a buffer.
    EVT_PCM_PERIOD_ELAPSED = 0x1100
    EVT_PCM_XRUN = 0x1101
    EVENT_BACKLOG = 64
    EVENT_SIZE = 8
    # §5.14.6.1 / §5.14.6.8
    S_OK = 0x8000
    XFER_SIZE = 4
    STATUS_SIZE = 8
    # The largest ring of the device (sound.QUEUE_SIZE): messages held at once.
    MAX_HELD = 1024
    ZERO_CHUNK = 4096
    # The buffers of a message the nogil path walks (more: the GIL path).
    MAX_SEGS = 16

cdef unsigned char _zeros[ZERO_CHUNK]
memset(_zeros, 0, ZERO_CHUNK)


cdef int _write_status(Writer w, uint32_t status, uint32_t latency) except -1:
    """Write ``{status, latency}`` little-endian into the last 8 bytes left in
    ``w`` (a message's device-writable part; what is before them stays)."""
    cdef unsigned char buf[STATUS_SIZE]
    cdef size_t room = w.avail
    w._advance(room - STATUS_SIZE)
    buf[0] = status & 0xFF
    buf[1] = (status >> 8) & 0xFF
    buf[2] = (status >> 16) & 0xFF
    buf[3] = (status >> 24) & 0xFF
    buf[4] = latency & 0xFF
    buf[5] = (latency >> 8) & 0xFF
    buf[6] = (latency >> 16) & 0xFF
    buf[7] = (latency >> 24) & 0xFF
    w.copy_in(buf, STATUS_SIZE)
    return 0


cdef inline void _put_le32x2(unsigned char *p, uint32_t a, uint32_t b) noexcept nogil:
    p[0] = a & 0xFF
    p[1] = (a >> 8) & 0xFF
    p[2] = (a >> 16) & 0xFF
    p[3] = (a >> 24) & 0xFF
    p[4] = b & 0xFF
    p[5] = (b >> 8) & 0xFF
    p[6] = (b >> 16) & 0xFF
    p[7] = (b >> 24) & 0xFF


cdef unsigned char *_status_ptr(Writer w) noexcept:
    """The host address of the last 8 bytes of ``w``'s buffers (a message's
    status) when they lie in one buffer, else NULL (then the writer is kept)."""
    cdef size_t n
    if w.nsegs == 0:
        return NULL
    n = w.segs[w.nsegs - 1].iov_len
    if n < STATUS_SIZE:
        return NULL
    return <unsigned char *>w.segs[w.nsegs - 1].iov_base + n - STATUS_SIZE


cdef unsigned char *_event_ptr(Writer w) noexcept:
    """The host address of ``w``'s first 8 bytes (an event) when they lie in one
    buffer, else NULL (then the writer is kept)."""
    if w.nsegs == 0 or w.segs[0].iov_len < EVENT_SIZE:
        return NULL
    return <unsigned char *>w.segs[0].iov_base


cdef struct Walk:
    # A chain walked without the GIL: its device-writable buffers (host
    # addresses, in order), the first device-readable one, and the totals.
    unsigned char *wseg[MAX_SEGS]
    uint32_t wlen[MAX_SEGS]
    int nw
    unsigned char *first_r
    uint32_t first_r_len
    uint64_t rtotal
    uint64_t wtotal


cdef int _walk(Queue q, uint16_t head, Walk *w) noexcept nogil:
    """Walk chain ``head`` of ``q`` (rings current, its snapshot the caller's) with
    a ChainCursor: 0 when every buffer lies in one region of guest memory (a
    writable one for the device-writable part), the readable ones first and the
    writable ones at most MAX_SEGS; 1 otherwise (a malformed chain too): the GIL
    path (make_chain, a Writer) walks it again and answers it."""
    cdef ChainCursor c
    cdef vring_desc d
    cdef int rc
    cdef unsigned char *p
    w.nw = 0
    w.first_r = NULL
    w.first_r_len = 0
    w.rtotal = 0
    w.wtotal = 0
    chain_start(&c, q._desc, q._desc_gpa, q._size, head)
    while True:
        rc = chain_next(q._snap, &c, &d)
        if rc == 0:
            return 0
        if rc < 0:
            return 1
        if d.len == 0:
            continue
        if d.flags & VRING_DESC_F_WRITE:
            p = snap_ptr_w(q._snap, d.addr, d.len)
            if p == NULL or w.nw == MAX_SEGS:
                return 1
            w.wseg[w.nw] = p
            w.wlen[w.nw] = d.len
            w.nw += 1
            w.wtotal += d.len
        else:
            if w.nw:
                return 1    # readable after writable (VIRTIO 1.2 §2.7.4.2)
            p = snap_ptr(q._snap, d.addr, d.len)
            if p == NULL:
                return 1
            if w.first_r == NULL:
                w.first_r = p
                w.first_r_len = d.len
            w.rtotal += d.len


cdef MemorySnapshot _keep_snap(list snaps, MemorySnapshot last, MemorySnapshot snap, Py_ssize_t held):
    """Keep ``snap`` mapped while an address into it is held: added to ``snaps``
    unless it is ``last`` already (``snaps`` cleared first when nothing is held,
    no address into the older ones); returns the new last one."""
    if snap is not last:
        if held == 0:
            snaps.clear()
        snaps.append(snap)
    return snap


@cython.final
cdef class IoPacer:
    """The I/O messages of PCM stream ``stream_id`` on ``queue`` (tx when
    ``output``, else rx), paced at ``byte_rate`` bytes per second.

    Each message lasts ``nbytes / byte_rate`` seconds; the first one starts when it
    is taken (or when the stream starts), each next one when the one before it ends,
    or when it is taken if the stream ran dry meanwhile.  :attr:`deadline` is when
    the message in progress ends (< 0: none is in progress).
    """

    cdef readonly Queue queue
    cdef readonly uint32_t stream_id
    cdef readonly bint output
    #: Whether the stream's state takes I/O messages (PREPARE, START, STOP).
    cdef public bint accepting
    cdef bint _running
    cdef double byte_rate
    cdef uint32_t period_bytes
    cdef uint64_t period_pos
    # The messages held, in order, as a ring of MAX_HELD: each one's writer (its
    # device-writable part, the status last: it keeps the guest memory mapped)
    # and its head index.  A list, not a deque: no method call per message.
    cdef list _writers
    cdef uint16_t _heads[MAX_HELD]
    cdef uint32_t _sizes[MAX_HELD]
    # Each message's status as a host address (NULL: its writer is kept instead);
    # the snapshots in _snaps keep that memory mapped (_snap: the last one).
    cdef unsigned char *_status[MAX_HELD]
    cdef list _snaps
    cdef MemorySnapshot _snap
    # A head the nogil take popped and could not serve: take_c's first.
    cdef uint16_t _left_head
    cdef bint _has_left_head
    cdef Py_ssize_t _first
    cdef Py_ssize_t _count
    #: When the message in progress ends (the clock's seconds; < 0: none).
    cdef readonly double deadline
    #: When the last message completed was due to end.
    cdef readonly double last_end
    cdef double _end
    #: Bytes of the messages held that have not started.
    cdef readonly unsigned long long queued_bytes
    #: Frame bytes played (tx) or recorded (rx) so far.
    cdef readonly unsigned long long frames_bytes
    #: Messages completed and their used bytes, so far.
    cdef readonly unsigned long long completed
    cdef readonly unsigned long long used_bytes
    #: Messages held by the last :meth:`take`.
    cdef readonly Py_ssize_t last_taken
    # The reader of the message being taken: one object for all of them (its
    # header and length are all take needs), walked afresh for each.
    cdef Reader _reader

    def __init__(self, Queue queue not None, uint32_t stream_id, bint output, double byte_rate,
                 uint32_t period_bytes):
        if byte_rate <= 0:
            raise ValueError(f"byte rate must be positive, not {byte_rate}")
        self.queue = queue
        self.stream_id = stream_id
        self.output = output
        self.byte_rate = byte_rate
        self.period_bytes = period_bytes
        self._writers = [None] * MAX_HELD
        self._snaps = []
        self._reader = Reader.__new__(Reader)
        self.deadline = -1.0
        self._end = 0.0

    def set_params(self, double byte_rate, uint32_t period_bytes):
        """New stream parameters (PREPARE); the clock starts afresh."""
        if byte_rate <= 0:
            raise ValueError(f"byte rate must be positive, not {byte_rate}")
        self.byte_rate = byte_rate
        self.period_bytes = period_bytes
        self.period_pos = 0
        self._end = 0.0

    @property
    def running(self):
        """Whether time runs for the stream (START): messages are played or recorded."""
        return self._running

    def set_running(self, bint running, double now):
        """START (True) or STOP (False) at ``now``: the stream's clock starts afresh;
        a message in progress at STOP starts over at the next START."""
        self._running = running
        self._end = 0.0
        self.period_pos = 0 if running else self.period_pos
        if self.deadline >= 0:
            self.deadline = -1.0
            self.queued_bytes += self._sizes[self._first]
        if running:
            self._start(now)

    def hold(self):
        """Stop the message in progress (it starts over later) and the clock."""
        if self.deadline >= 0:
            self.deadline = -1.0
            self.queued_bytes += self._sizes[self._first]
        self._end = 0.0

    def __len__(self):
        return self._count

    cdef inline void _start(self, double now, bint follows=False) noexcept nogil:
        """Start the first message held, if none is in progress and time runs:
        at ``now``, or (``follows``: it was held when the one before it ended) at the
        end of the one before, so that a late timer does not slow the stream."""
        cdef uint32_t n
        if self.deadline >= 0 or not self._running or self._count == 0:
            return
        n = self._sizes[self._first]
        self.queued_bytes -= n
        if self._end < now and not (follows and self._end > 0):
            self._end = now
        self._end += n / self.byte_rate
        self.deadline = self._end

    cdef int _hold(self, Writer w, uint16_t head, uint32_t nbytes) except -1:
        """Hold a message (GIL): its status by address when it lies in one buffer
        (the writer's snapshot kept), else by its writer."""
        cdef Py_ssize_t slot
        cdef unsigned char *status
        if self._count >= MAX_HELD:
            raise OverflowError(f"sound stream {self.stream_id}: more than {MAX_HELD} messages held")
        slot = (self._first + self._count) % MAX_HELD
        status = _status_ptr(w)
        if status != NULL:
            self._snap = _keep_snap(self._snaps, self._snap, w.snap, self._count)
            self._writers[slot] = None
        else:
            self._writers[slot] = w
        self._hold_nogil(head, nbytes, status)
        return 0

    cdef inline void _hold_nogil(self, uint16_t head, uint32_t nbytes, unsigned char *status) noexcept nogil:
        """Hold a message whose room is checked and whose status address (NULL: the
        writer kept in its slot) lies in a snapshot kept (the nogil take's: _snap)."""
        cdef Py_ssize_t slot = (self._first + self._count) % MAX_HELD
        self._status[slot] = status
        self._sizes[slot] = nbytes
        self._heads[slot] = head
        self._count += 1
        self.queued_bytes += nbytes

    cdef Writer _pop(self, uint16_t *head, unsigned char **status):
        """Remove the first message held: its writer or status address (and head)."""
        cdef Writer w = <Writer>self._writers[self._first]
        self._writers[self._first] = None
        status[0] = self._status[self._first]
        head[0] = self._heads[self._first]
        self._first = (self._first + 1) % MAX_HELD
        self._count -= 1
        return w

    def push(self, DescriptorChain chain not None, uint32_t nbytes, double now):
        """Hold ``chain`` (checked by the caller: ``nbytes`` of frames); for the
        device's Python path."""
        self._hold(make_writer(chain), chain.head_index, nbytes)
        self._start(now)

    def take(self, double now):
        """Pop and hold every available message of this stream, in ring order; the
        messages start as time allows.  Returns ``(taken, chain)``: ``chain`` is a
        popped message this path does not serve (for the device's Python path), or
        None when the ring is empty.  The driver's kicks are then suppressed while
        a message plays (the timer at its end calls this again), and asked for
        otherwise (VIRTIO 1.2 §2.7.10).

        Raises:
            InvalidDescriptorIndex: an available head index out of range (consumed,
                as :meth:`Queue.pop_chain` does; the next call goes on).
            QueueNotReady, InvalidAvailRingIndex: as :meth:`Queue.pop_chain`.
        """
        chain = self.take_c(now)
        return self.last_taken, chain

    cdef object take_c(self, double now):
        """:meth:`take`: the chain (or None); how many were held in ``last_taken``."""
        cdef Queue q = self.queue
        cdef uint16_t head
        cdef DescriptorChain ch
        cdef Reader r = self._reader
        cdef Writer w
        cdef unsigned char hdr[XFER_SIZE]
        cdef uint32_t sid
        cdef size_t room, nbytes, got
        cdef Py_ssize_t taken = 0
        self.last_taken = 0
        while True:
            self.last_taken = taken
            if self._has_left_head:
                # Popped by the nogil take, which could not serve it.
                self._has_left_head = False
                head = self._left_head
            elif not q.pop_head(&head):
                self._start(now)
                if self.deadline >= 0:
                    # A message plays: its end looks at the ring anyway, so the
                    # driver need not kick meanwhile (VIRTIO 1.2 §2.7.10).
                    q.suppress_notification_c()
                    return None
                if q.enable_notification_c():
                    continue    # one came before the driver could see the request
                return None
            if head >= q._size:
                self._start(now)
                raise InvalidDescriptorIndex(
                    f"head descriptor index {head} out of range (queue size {q._size})")
            ch = make_chain(q._snap, q._memory, q._desc, q._desc_gpa, q._size, head)
            if not self.accepting:
                self._start(now)
                return ch
            try:
                w = make_writer(ch)
                # make_reader's walk, into the one reader (emptied first).
                r.nsegs = 0
                r.idx = 0
                r.off = 0
                r.avail = 0
                r.done = 0
                r._collect(ch, False)
            except Exception:
                # The Python path walks it again and answers the fault.
                self._start(now)
                return ch
            room = w.avail
            if room < STATUS_SIZE or r.avail < XFER_SIZE:
                self._start(now)
                return ch
            r.copy_out(hdr, XFER_SIZE)
            sid = hdr[0] | (<uint32_t>hdr[1] << 8) | (<uint32_t>hdr[2] << 16) | (<uint32_t>hdr[3] << 24)
            if sid != self.stream_id:
                self._start(now)
                return ch
            if self.output:
                nbytes = r.avail
            else:
                nbytes = room - STATUS_SIZE
                got = 0
                while got < nbytes:
                    got += w.copy_in(_zeros, nbytes - got if nbytes - got < ZERO_CHUNK else ZERO_CHUNK)
            if nbytes > UINT32_MAX:
                self._start(now)
                return ch
            self._hold(w, head, <uint32_t>nbytes)
            taken += 1

    cdef int take_nogil(self, double now) noexcept nogil:
        """:meth:`take_c` without the GIL for the messages it knows in one walk
        (:func:`_walk`): 0 when the ring is done, 1 when ``take_c`` must go on
        with the GIL (a head popped and not served is left for it first)."""
        cdef uint16_t head
        cdef Py_ssize_t taken = 0
        cdef int rc, i
        cdef Walk w
        cdef uint32_t sid
        cdef uint64_t nbytes, left
        cdef unsigned char *status
        cdef unsigned char *p
        self.last_taken = 0
        while True:
            self.last_taken = taken
            rc = self.queue.pop_head_nogil(&head)
            if rc <= 0:
                self._start(now)
                if rc < 0:
                    return 1
                if self.deadline >= 0:
                    self.queue.suppress_notification_nogil()
                    return 0
                rc = self.queue.enable_notification_nogil()
                if rc > 0:
                    continue
                return 1 if rc < 0 else 0
            if (head >= self.queue._size or not self.accepting or self._count >= MAX_HELD
                    or <void *>self.queue._snap != <void *>self._snap or _walk(self.queue, head, &w)
                    or w.wtotal < STATUS_SIZE or w.rtotal < XFER_SIZE or w.first_r_len < XFER_SIZE
                    or w.wlen[w.nw - 1] < STATUS_SIZE):
                self._left_head = head
                self._has_left_head = True
                self._start(now)
                return 1
            p = w.first_r
            sid = p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)
            nbytes = w.rtotal - XFER_SIZE if self.output else w.wtotal - STATUS_SIZE
            if sid != self.stream_id or nbytes > UINT32_MAX:
                self._left_head = head
                self._has_left_head = True
                self._start(now)
                return 1
            if not self.output:
                # Capture records silence: the frames, up to the status.
                left = nbytes
                for i in range(w.nw):
                    if left == 0:
                        break
                    if w.wlen[i] < left:
                        memset(w.wseg[i], 0, w.wlen[i])
                        left -= w.wlen[i]
                    else:
                        memset(w.wseg[i], 0, left)
                        left = 0
            status = w.wseg[w.nw - 1] + w.wlen[w.nw - 1] - STATUS_SIZE
            self._hold_nogil(head, <uint32_t>nbytes, status)
            taken += 1

    def due(self, double now):
        """Complete, in order, every message whose time is over at ``now`` (status
        OK, ``latency_bytes``: for tx the bytes held behind it); each next one held
        starts where the one before ended (several complete at once when the timer
        came that late).  Returns the periods (``period_bytes``) that went through."""
        return self.due_c(now)

    cdef Py_ssize_t due_c(self, double now) except -1:
        cdef Py_ssize_t periods = 0
        cdef uint32_t n, used
        cdef uint16_t head
        cdef unsigned long long latency
        cdef unsigned char *status
        cdef Writer w
        while self.deadline >= 0 and self.deadline <= now:
            n = self._sizes[self._first]
            w = self._pop(&head, &status)
            self.last_end = self.deadline
            self.deadline = -1.0
            latency = self.queued_bytes if self.output else 0
            if status != NULL:
                _put_le32x2(status, S_OK, <uint32_t>(latency if latency < UINT32_MAX else UINT32_MAX))
            else:
                _write_status(w, S_OK, <uint32_t>(latency if latency < UINT32_MAX else UINT32_MAX))
            used = STATUS_SIZE if self.output else n + STATUS_SIZE
            self.queue.add_used_c(head, used)
            self.completed += 1
            self.used_bytes += used
            self.frames_bytes += n
            if self.period_bytes:
                self.period_pos += n
                periods += <Py_ssize_t>(self.period_pos // self.period_bytes)
                self.period_pos %= self.period_bytes
            self._start(now, True)
        return periods

    cdef int due_nogil(self, double now, Py_ssize_t *periods) noexcept nogil:
        """:meth:`due_c` without the GIL, adding the periods to ``*periods``: 0 when
        every message due is completed, 1 when ``due_c`` must go on with the GIL
        (the next one's status is kept by a writer, or the used ring needs it)."""
        cdef uint32_t n, used
        cdef uint16_t head
        cdef unsigned long long latency
        cdef unsigned char *status
        while self.deadline >= 0 and self.deadline <= now:
            status = self._status[self._first]
            if status == NULL:
                return 1
            n = self._sizes[self._first]
            head = self._heads[self._first]
            latency = self.queued_bytes if self.output else 0
            # (Written again by due_c if the used ring asks for the GIL.)
            _put_le32x2(status, S_OK, <uint32_t>(latency if latency < UINT32_MAX else UINT32_MAX))
            used = STATUS_SIZE if self.output else n + STATUS_SIZE
            if self.queue.add_used_nogil(head, used) < 0:
                return 1
            self._first = (self._first + 1) % MAX_HELD
            self._count -= 1
            self.last_end = self.deadline
            self.deadline = -1.0
            self.completed += 1
            self.used_bytes += used
            self.frames_bytes += n
            if self.period_bytes:
                self.period_pos += n
                periods[0] += <Py_ssize_t>(self.period_pos // self.period_bytes)
                self.period_pos %= self.period_bytes
            self._start(now, True)
        return 0

    def finish_current(self, double now):
        """Complete the message in progress now, whatever its time (before a
        control request, as a worker would have finished it first); returns the
        periods that went through (see :meth:`due`)."""
        if self.deadline < 0:
            return 0
        self.deadline = 0.0
        return self.due_c(0.0)

    def flush(self, uint32_t status):
        """Complete every message held, in order, with ``status`` and
        ``latency_bytes`` 0 and no frames (RELEASE: OK; a queue taken back:
        IO_ERR), as the Python path answers them.  Returns how many were completed."""
        cdef Py_ssize_t done = 0
        cdef uint32_t used
        cdef uint16_t head
        cdef unsigned char *where
        cdef Writer w
        while self._count:
            w = self._pop(&head, &where)
            if where != NULL:
                _put_le32x2(where, status, 0)
            else:
                _write_status(w, status, 0)
            used = STATUS_SIZE
            self.queue.add_used_c(head, used)
            self.completed += 1
            self.used_bytes += used
            done += 1
        if self._has_left_head:
            # Popped after those by the nogil take, not served yet: answered too.
            self._has_left_head = False
            head = self._left_head
            used = 0
            try:
                w = make_writer(make_chain(self.queue._snap, self.queue._memory, self.queue._desc,
                                           self.queue._desc_gpa, self.queue._size, head))
                if w.avail >= STATUS_SIZE:
                    _write_status(w, status, 0)
                    used = STATUS_SIZE
            except Exception:
                pass    # a chain the device cannot walk: used, nothing written
            self.queue.add_used_c(head, used)
            done += 1
        self.deadline = -1.0
        self.queued_bytes = 0
        self._end = 0.0
        self._reader.snap = None    # the guest memory it last walked may go
        self._snaps.clear()
        self._snap = None
        return done


cdef inline double _monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline int _notify(Queue q, object signal, object interrupt, int index) except -1:
    """Signal the driver for ``q`` if it asked for it (VIRTIO 1.2 §2.7.10): through
    the transport's signaller (vhost-user: the ring's compiled ``signal_used``,
    no Python frame) or else ``interrupt.signal_used(index)``."""
    if q.needs_notification_c():
        if signal is not None:
            signal()
        elif interrupt is not None:
            interrupt.signal_used(index)
    return 0


@cython.final
cdef class EventQueue:
    """The event queue of a sound device (VIRTIO 1.2 §5.14.6.9) in compiled code:
    the driver's event buffers it holds, and the events waiting for one.

    An event is written into the oldest buffer held (``virtio_snd_event``: code
    and data, little-endian) and completed; with no buffer held, the buffers the
    driver added meanwhile are taken from the ring first (their kicks were not
    asked for: while buffers are held the driver's kicks are suppressed, §2.7.10,
    and asked for again when none is left).  Events that find no buffer wait, at
    most ``EVENT_BACKLOG`` of them, the oldest dropped first.  A buffer that is not
    8 device-writable bytes alone is left in :attr:`unserved` for the device's
    Python path (which answers it as a guest fault); taking stops there.
    """

    cdef readonly Queue queue
    cdef object signal
    # The signal as a Signaller (the nogil path's), or None.
    cdef Signaller _sig
    cdef object interrupt
    cdef int index
    # The buffers held, in ring order, as a ring of MAX_HELD: writers, head indexes,
    # and each one's 8 bytes as a host address (NULL: its writer is kept), whose
    # memory the snapshots in _snaps keep mapped (_snap: the last one).
    cdef list _writers
    cdef uint16_t _heads[MAX_HELD]
    cdef unsigned char *_ptrs[MAX_HELD]
    cdef list _snaps
    cdef MemorySnapshot _snap
    # A head the nogil take popped and could not serve: _take's first.
    cdef uint16_t _left_head
    cdef bint _has_left_head
    # The nogil path completed events without the notification: flush_c owes it.
    cdef bint _notify_owed
    cdef Py_ssize_t _h_first
    cdef Py_ssize_t _h_count
    cdef uint32_t _pending[2 * EVENT_BACKLOG]
    cdef Py_ssize_t _p_first
    cdef Py_ssize_t _p_count
    #: Whether the buffers held are the last ones popped (a quiesce returns them
    #: to the avail ring as not consumed).
    cdef public bint are_tail
    #: Whether buffers may be taken from the ring (the queue is not given back).
    cdef public bint serving
    #: A popped buffer this path does not serve, for the device's Python path.
    cdef public object unserved
    #: Events sent: PCM_PERIOD_ELAPSED, PCM_XRUN.
    cdef readonly unsigned long long period_elapsed_sent
    cdef readonly unsigned long long xrun_sent

    def __init__(self, Queue queue not None, int index, interrupt):
        self.queue = queue
        self.index = index
        self.interrupt = interrupt
        # A transport that hands out a queue's signaller (vhost-user: the ring's
        # compiled KickRing.signal_used) is called without a Python frame.
        signaller = getattr(interrupt, "signaller", None)
        self.signal = signaller(index) if signaller is not None else None
        self._sig = self.signal if isinstance(self.signal, Signaller) else None
        self._writers = [None] * MAX_HELD
        self._snaps = []
        self.are_tail = True
        self.serving = True

    def __len__(self):
        """Buffers held."""
        return self._h_count

    @property
    def pending(self):
        """Events waiting for a buffer."""
        return self._p_count

    def hold(self, DescriptorChain chain not None):
        """Hold an event buffer the device's Python path checked (a kick's drain)."""
        self._hold(make_writer(chain), chain.head_index)

    cdef int _hold(self, Writer w, uint16_t head) except -1:
        cdef Py_ssize_t slot
        cdef unsigned char *ptr
        if self._h_count >= MAX_HELD:
            raise OverflowError(f"more than {MAX_HELD} event buffers held")
        slot = (self._h_first + self._h_count) % MAX_HELD
        ptr = _event_ptr(w)
        if ptr != NULL:
            self._snap = _keep_snap(self._snaps, self._snap, w.snap, self._h_count)
            self._writers[slot] = None
        else:
            self._writers[slot] = w
        self._ptrs[slot] = ptr
        self._heads[slot] = head
        self._h_count += 1
        return 0

    cdef Writer _pop(self, uint16_t *head, unsigned char **ptr=NULL):
        cdef Writer w = <Writer>self._writers[self._h_first]
        self._writers[self._h_first] = None
        if ptr != NULL:
            ptr[0] = self._ptrs[self._h_first]
        head[0] = self._heads[self._h_first]
        self._h_first = (self._h_first + 1) % MAX_HELD
        self._h_count -= 1
        return w

    def held(self):
        """Remove the buffers held and return their head indexes, in order (quiesce)."""
        cdef uint16_t head
        heads = []
        while self._h_count:
            self._pop(&head)
            heads.append(head)
        if self._has_left_head:
            # Popped after those (by the nogil take) and not served yet.
            self._has_left_head = False
            heads.append(self._left_head)
        return heads

    def clear(self):
        """Forget the buffers held and the events waiting (reset)."""
        self.held()
        self._p_count = 0
        self.unserved = None
        self.are_tail = True
        self._has_left_head = False
        self._notify_owed = False
        self._snaps.clear()
        self._snap = None

    def quiet(self):
        """While buffers are held the driver need not kick for the ones it adds
        (VIRTIO 1.2 §2.7.10): :meth:`send` takes them when it finds none held."""
        if self._h_count and self.queue._ready:
            self.queue.suppress_notification_c()

    def send(self, uint32_t code, uint32_t data):
        """Queue event ``code`` with ``data`` (a stream id) and deliver what the
        buffers allow; returns whether :attr:`unserved` holds a buffer for the
        Python path (then call :meth:`flush` after it)."""
        return self.send_c(code, data) != 0

    def flush(self):
        """Deliver the waiting events the buffers allow (taking buffers from the
        ring when none is held); returns as :meth:`send` does."""
        return self.flush_c() != 0

    cdef int send_c(self, uint32_t code, uint32_t data) except -1:
        if not self.queue._ready:
            return 0
        self._queue_event(code, data)
        return self.flush_c()

    cdef inline void _queue_event(self, uint32_t code, uint32_t data) noexcept nogil:
        cdef Py_ssize_t slot
        if self._p_count == EVENT_BACKLOG:
            # The oldest is dropped (a driver that gives no buffers).
            self._p_first = (self._p_first + 1) % EVENT_BACKLOG
            self._p_count -= 1
        slot = (self._p_first + self._p_count) % EVENT_BACKLOG
        self._pending[2 * slot] = code
        self._pending[2 * slot + 1] = data
        self._p_count += 1

    cdef int send_nogil(self, uint32_t code, uint32_t data) noexcept nogil:
        """:meth:`send_c` without the GIL: the event is queued; 1 when delivering
        what waits needs :meth:`flush_c` with the GIL."""
        if not self.queue._ready:
            return 0
        self._queue_event(code, data)
        return self.flush_nogil()

    cdef int flush_nogil(self) noexcept nogil:
        """:meth:`flush_c` without the GIL, for buffers held by address: 0 when done,
        1 when :meth:`flush_c` must go on with the GIL."""
        cdef bint sent = False
        cdef int rc = 0, n
        cdef unsigned char *ptr
        cdef uint32_t code, data
        if self._notify_owed or self.unserved is not None:
            return 1
        if not self._p_count:
            return 0
        if not self._h_count and self.serving:
            rc = self._take_nogil()
        while self._p_count and self._h_count:
            ptr = self._ptrs[self._h_first]
            if ptr == NULL:
                rc = 1
                break
            code = self._pending[2 * self._p_first]
            data = self._pending[2 * self._p_first + 1]
            _put_le32x2(ptr, code, data)
            if self.queue.add_used_nogil(self._heads[self._h_first], EVENT_SIZE) < 0:
                rc = 1    # (written again by flush_c)
                break
            self._p_first = (self._p_first + 1) % EVENT_BACKLOG
            self._p_count -= 1
            self._h_first = (self._h_first + 1) % MAX_HELD
            self._h_count -= 1
            if code == EVT_PCM_PERIOD_ELAPSED:
                self.period_elapsed_sent += 1
            elif code == EVT_PCM_XRUN:
                self.xrun_sent += 1
            sent = True
        if not self._h_count:
            self.are_tail = True
        if sent:
            n = self.queue.needs_notification_nogil()
            if n < 0 or (n and self._sig is None):
                self._notify_owed = True
                return 1
            if n:
                self._sig.signal_nogil()
        return rc

    cdef int _take_nogil(self) noexcept nogil:
        """:meth:`_take` without the GIL for buffers of 8 device-writable bytes in
        one buffer: 0, or 1 when :meth:`_take` must go on with the GIL (a head
        popped and not served is left for it first)."""
        cdef uint16_t head
        cdef int rc
        cdef Walk w
        while True:
            rc = self.queue.pop_head_nogil(&head)
            if rc < 0:
                return 1
            if rc == 0:
                if self._h_count:
                    self.queue.suppress_notification_nogil()
                    return 0
                rc = self.queue.enable_notification_nogil()
                if rc > 0:
                    continue
                return 1 if rc < 0 else 0
            if (head >= self.queue._size or self._h_count >= MAX_HELD
                    or <void *>self.queue._snap != <void *>self._snap or _walk(self.queue, head, &w)
                    or w.rtotal or w.wtotal < EVENT_SIZE or w.wlen[0] < EVENT_SIZE):
                self._left_head = head
                self._has_left_head = True
                return 1
            self._ptrs[(self._h_first + self._h_count) % MAX_HELD] = w.wseg[0]
            self._heads[(self._h_first + self._h_count) % MAX_HELD] = head
            self._h_count += 1

    cdef int flush_c(self) except -1:
        cdef int rc = 0
        cdef bint sent = self._notify_owed
        cdef uint16_t head
        cdef Writer w
        cdef unsigned char *ptr
        cdef unsigned char buf[EVENT_SIZE]
        cdef uint32_t code, data
        self._notify_owed = False
        if not self._p_count:
            if sent:
                _notify(self.queue, self.signal, self.interrupt, self.index)
            return 0
        if not self._h_count and self.serving and self.unserved is None:
            rc = self._take()
        while self._p_count and self._h_count:
            code = self._pending[2 * self._p_first]
            data = self._pending[2 * self._p_first + 1]
            self._p_first = (self._p_first + 1) % EVENT_BACKLOG
            self._p_count -= 1
            w = self._pop(&head, &ptr)
            if ptr != NULL:
                _put_le32x2(ptr, code, data)
            else:
                _put_le32x2(buf, code, data)
                w.copy_in(buf, EVENT_SIZE)
            self.queue.add_used_c(head, EVENT_SIZE)
            if code == EVT_PCM_PERIOD_ELAPSED:
                self.period_elapsed_sent += 1
            elif code == EVT_PCM_XRUN:
                self.xrun_sent += 1
            sent = True
        if not self._h_count:
            self.are_tail = True
        if sent:
            _notify(self.queue, self.signal, self.interrupt, self.index)
        return rc

    cdef int _take(self) except -1:
        """Take the event buffers the ring holds (the drain of a kick: with none
        left, the driver is asked to kick again); 1 when one is left in
        :attr:`unserved`."""
        cdef Queue q = self.queue
        cdef uint16_t head
        cdef DescriptorChain ch
        cdef Writer w
        while True:
            if self._has_left_head:
                # Popped by the nogil take, which could not serve it.
                self._has_left_head = False
                head = self._left_head
            elif not q.pop_head(&head):
                if self._h_count:
                    q.suppress_notification_c()
                    return 0
                if q.enable_notification_c():
                    continue
                return 0
            if head >= q._size:
                raise InvalidDescriptorIndex(
                    f"head descriptor index {head} out of range (queue size {q._size})")
            ch = make_chain(q._snap, q._memory, q._desc, q._desc_gpa, q._size, head)
            try:
                w = make_writer(ch)
                if make_reader(ch).avail or w.avail < EVENT_SIZE:
                    self.unserved = ch
                    return 1
            except Exception:
                # The Python path walks it again and answers the fault.
                self.unserved = ch
                return 1
            self._hold(w, head)


@cython.final
cdef class StreamTimer(FdPump):
    """The timer of a loop-paced PCM stream, served in compiled code: a timerfd
    (``CLOCK_MONOTONIC``, absolute deadlines) armed for the end of the message in
    progress of its :class:`IoPacer`, or, once the stream ran dry, for a period
    later (an xrun).

    :meth:`pump_c`, run by the loop when the timer fires (and by a kick of the
    stream's queue through :class:`KickPump`): take what the driver added
    (its kicks were suppressed meanwhile), complete every message due and signal
    the driver once, send ``PCM_PERIOD_ELAPSED`` for each period that went
    through while the stream is started and ``PCM_XRUN`` for a dry period
    (:class:`EventQueue`), take again, re-arm.  No Python code runs unless a
    message or an event buffer this path does not serve was popped: it is left in
    :attr:`unserved` (or the event queue's) and the pump answers 1.

    ``clock``: None (the kernel's ``CLOCK_MONOTONIC``, as ``time.monotonic``) or
    a callable (tests' fake clocks; the timerfd is still armed, at the fake
    deadline).
    """

    cdef readonly IoPacer pacer
    cdef readonly EventQueue events
    cdef object signal
    # The signal as a Signaller (the nogil path's), or None.
    cdef Signaller _sig
    # What the nogil path left for the GIL's tick_c: a notification to ask for
    # again (the used ring wanted the GIL), events to deliver.
    cdef bint _notify_owed
    cdef bint _events_owed
    cdef object interrupt
    cdef int index
    cdef int _fd
    cdef object clock
    #: Whether the stream may touch its queue (device active, queue not given
    #: back, the stream not held or stopping).
    cdef public bint serving
    #: Whether the stream is started (PCM_PERIOD_ELAPSED is sent).
    cdef public bint started
    #: Whether the driver selected PCM_XRUN notifications.
    cdef public bint xrun_events
    #: The length of a period in seconds (a dry stream's xrun comes after one).
    cdef public double period_secs
    #: A message popped that this path does not serve, for the Python path.
    cdef public object unserved
    #: Whether a completion came with nothing played since (an xrun may follow).
    cdef public bint dry_armed
    cdef double _dry_deadline
    #: When the timerfd fires next (the clock's seconds; < 0: disarmed).
    cdef readonly double wakeup
    # The timerfd's interval (ns; 0: one-shot) and its next expiry (ns; < 0: none).
    cdef long long _interval_ns
    cdef long long _next_ns
    #: Timer expiries read.
    cdef readonly unsigned long long expiries
    # How late the timer's wake-ups were (the real clock only), against the
    # period: < 0.1, < 0.5, < 1, < 2, >= 2 periods; and the largest (ns).
    cdef unsigned long long _late[5]
    cdef long long _late_max_ns
    # How late the last completion came after its message's end (seconds), and
    # the xruns after a completion that late (>= a period: the device's own
    # lateness held the driver's refill back) or not (the driver's refill late).
    cdef double _done_late
    cdef unsigned long long _xruns_device
    cdef unsigned long long _xruns_driver

    def __cinit__(self, *args, **kwargs):
        self._fd = -1

    def __init__(self, IoPacer pacer not None, EventQueue events, interrupt, double period_secs,
                 clock=None):
        self.pacer = pacer
        self.events = events
        self.index = 2 if pacer.output else 3
        self.interrupt = interrupt
        signaller = getattr(interrupt, "signaller", None)
        self.signal = signaller(self.index) if signaller is not None else None
        self._sig = self.signal if isinstance(self.signal, Signaller) else None
        self.period_secs = period_secs
        self.clock = clock
        # The nogil path: on the kernel's clock, with a compiled signaller (the
        # vhost-user transport's); the tests' fake clocks are Python.
        self.offers_nogil = clock is None and self._sig is not None and (
            events is None or events._sig is not None)
        self.wakeup = -1.0
        self._next_ns = -1
        self._dry_deadline = -1.0
        self._fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if self._fd < 0:
            raise OSError(errno, "timerfd_create failed")

    def __dealloc__(self):
        if self._fd >= 0:
            close(self._fd)

    def fileno(self):
        """The timerfd (-1 once closed)."""
        return self._fd

    def close(self):
        """Close the timerfd (idempotent); the loop must not watch it any more."""
        if self._fd >= 0:
            close(self._fd)
            self._fd = -1
        self.wakeup = -1.0
        self._next_ns = -1

    cdef inline double _now(self) except? -1.0:
        if self.clock is None:
            return _monotonic()
        return self.clock()

    cdef int pump_c(self) except -1:
        cdef uint64_t count
        if self.clock is not None:
            # A fake clock: the timerfd's deadlines are not the kernel's time,
            # each call is the expiry (the caller fires it at the fake wake-up).
            read(self._fd, &count, 8)
            self._next_ns = -1
            self.wakeup = -1.0
        elif self._fd >= 0 and read(self._fd, &count, 8) == 8:
            self._expired(count)
        if self.unserved is not None or (self.events is not None and self.events.unserved is not None):
            return 1
        if not self.serving:
            return 0
        return self.tick_c(self._now())

    cdef void _expired(self, uint64_t count) noexcept nogil:
        """``count`` expiries read from the timerfd: counted, their lateness too, and
        the next expected one (periodic: it follows from those read)."""
        self.expiries += count
        if self._next_ns >= 0:
            self._count_lateness()
        if self._interval_ns:
            self._next_ns += <long long>count * self._interval_ns
            self.wakeup = self._next_ns * 1e-9
        else:
            self._next_ns = -1
            self.wakeup = -1.0

    cdef void _count_lateness(self) noexcept nogil:
        """Count how late this wake-up is after the expiry it serves."""
        cdef long long late = <long long>(_monotonic() * 1e9) - self._next_ns
        cdef double periods = late / (self.period_secs * 1e9)
        if late > self._late_max_ns:
            self._late_max_ns = late
        if periods < 0.1:
            self._late[0] += 1
        elif periods < 0.5:
            self._late[1] += 1
        elif periods < 1:
            self._late[2] += 1
        elif periods < 2:
            self._late[3] += 1
        else:
            self._late[4] += 1

    def lateness(self, bint reset=False):
        """How late the timer's wake-ups came after their expiries (the real clock
        only): counts of wake-ups less than 0.1, 0.5, 1, 2 periods late and at
        least 2 periods late, the largest lateness in seconds, and the xruns
        (the stream dry for a period) after a completion that came at least a
        period late (the device's lateness) and after one on time (the driver's
        refill late); ``reset`` starts the counts afresh."""
        out = ([self._late[i] for i in range(5)], self._late_max_ns * 1e-9,
               self._xruns_device, self._xruns_driver)
        if reset:
            memset(self._late, 0, sizeof(self._late))
            self._late_max_ns = 0
            self._xruns_device = self._xruns_driver = 0
        return out

    def tick(self, double now):
        """Serve the stream at ``now`` as :meth:`pump_c` does; returns whether the
        Python path must go on (see :attr:`unserved`)."""
        return self.tick_c(now) != 0

    def rearm(self, double now):
        """Arm the timer for the stream as it is now (a message held by the Python
        path, a state changed); returns as :meth:`tick` does."""
        cdef int rc = self._dry_check(now)
        self._arm()
        return rc != 0

    def finish_current(self, double now):
        """Complete the message in progress now (before a control operation), with
        its notification and events."""
        cdef unsigned long long c0 = self.pacer.completed
        cdef Py_ssize_t periods = self.pacer.finish_current(now)
        return self._account(c0, periods) != 0

    def flush(self, uint32_t status):
        """Complete every message held with ``status`` (RELEASE: OK; the queue
        taken back: IO_ERR), notify the driver and disarm the timer."""
        cdef Py_ssize_t done = self.pacer.flush(status)
        if done:
            _notify(self.pacer.queue, self.signal, self.interrupt, self.index)
        self.dry_armed = False
        self._dry_deadline = -1.0
        self._arm()
        return done

    def disarm(self):
        """Stop the timer and forget a pending xrun (the stream is held or stops)."""
        self.dry_armed = False
        self._dry_deadline = -1.0
        self._set_timer(-1.0, 0)

    cdef int pump_nogil(self) noexcept nogil:
        """:meth:`pump_c` without the GIL (``offers_nogil``: the kernel's clock and
        compiled signallers): the expiry read and counted, the period's work
        done by the nogil paths of the pacer, the event queue and the used
        ring; 1 hands what is left to :meth:`pump_c`."""
        cdef uint64_t count
        if (self.unserved is not None or self.error is not None or self._notify_owed
                or self._events_owed or self._fd < 0):
            return 1
        if self.events is not None and self.events.unserved is not None:
            return 1
        if read(self._fd, &count, 8) == 8:
            self._expired(count)
        if not self.serving:
            return 0
        return self._tick_nogil(_monotonic())

    cdef int _tick_nogil(self, double now) noexcept nogil:
        """:meth:`tick_c` without the GIL: 0, or 1 when tick_c must go on."""
        cdef unsigned long long c0
        cdef Py_ssize_t periods = 0
        cdef int rc
        if self._take_nogil(now):
            return 1
        c0 = self.pacer.completed
        rc = self.pacer.due_nogil(now, &periods)
        if self._account_nogil(c0, periods, now) or rc:
            return 1
        if self._take_nogil(now) or self._dry_check_nogil(now):
            return 1
        return self._arm_nogil()

    cdef int _take_nogil(self, double now) noexcept nogil:
        if not self.pacer.queue._ready:
            return 0
        cdef int rc = self.pacer.take_nogil(now)
        if self.pacer.last_taken:
            self.dry_armed = False
            self._dry_deadline = -1.0
        return rc

    cdef int _account_nogil(self, unsigned long long c0, Py_ssize_t periods, double now) noexcept nogil:
        """:meth:`_account` without the GIL; what it cannot do is owed to tick_c."""
        cdef int n, _
        cdef int rc = 0
        if self.pacer.completed == c0:
            return 0
        self.dry_armed = True
        self._dry_deadline = -1.0
        if self.pacer.last_end > 0:
            self._done_late = now - self.pacer.last_end
        n = self.pacer.queue.needs_notification_nogil()
        if n < 0:
            self._notify_owed = True
            rc = 1
        elif n:
            self._sig.signal_nogil()
        if periods and self.started and self.events is not None:
            for _ in range(periods if periods < EVENT_BACKLOG else EVENT_BACKLOG):
                if self.events.send_nogil(EVT_PCM_PERIOD_ELAPSED, self.pacer.stream_id):
                    self._events_owed = True
                    rc = 1
        return rc

    cdef int _dry_check_nogil(self, double now) noexcept nogil:
        """:meth:`_dry_check` without the GIL: 1 when the XRUN event is owed to the
        GIL path."""
        if self._dry_xrun(now) and self.xrun_events and self.events is not None:
            if self.events.send_nogil(EVT_PCM_XRUN, self.pacer.stream_id):
                self._events_owed = True
                return 1
        return 0

    cdef bint _dry_xrun(self, double now) noexcept nogil:
        """The dry-stream rule of :meth:`_dry_check`: whether an XRUN is due now
        (then counted, as the device's when the completion before it came a
        period late or more, else as the driver's)."""
        if not (self.dry_armed and self.pacer._running and self.pacer.deadline < 0
                and self.pacer._count == 0):
            self._dry_deadline = -1.0
            return False
        if self._dry_deadline < 0:
            self._dry_deadline = now + self.period_secs
            return False
        if now < self._dry_deadline:
            return False
        self.dry_armed = False
        self._dry_deadline = -1.0
        if self._done_late >= self.period_secs:
            self._xruns_device += 1
        else:
            self._xruns_driver += 1
        return True

    cdef int _arm_nogil(self) noexcept nogil:
        """:meth:`_arm` without the GIL (the kernel's clock): 0, or 1 when the
        timer could not be set (``_arm`` sets it again with the GIL, and raises)."""
        cdef double at
        cdef long long interval_ns
        if self._timer_target(&at, &interval_ns) and self._set_timer_nogil(at, interval_ns) < 0:
            return 1
        return 0

    cdef bint _timer_target(self, double *at, long long *interval_ns) noexcept nogil:
        """Where :meth:`_arm` puts the timer: ``at`` the end of the message in
        progress, periodic with its duration in ``interval_ns``, else the dry
        stream's xrun, else nowhere (< 0).  False when the timer is there already."""
        cdef long long at_ns
        at[0] = self.pacer.deadline
        interval_ns[0] = 0
        if at[0] >= 0:
            interval_ns[0] = <long long>(self.pacer._sizes[self.pacer._first] / self.pacer.byte_rate
                                         * 1e9 + 0.5)
        else:
            at[0] = self._dry_deadline
        if at[0] < 0:
            return self._next_ns >= 0
        at_ns = <long long>(at[0] * 1e9 + 0.5)
        # Within a microsecond of the kernel's next expiry: it is that one (the
        # stream's deadlines are sums of doubles, the kernel's of nanoseconds).
        return not (self._next_ns >= 0 and -1000 <= at_ns - self._next_ns <= 1000)

    cdef int _set_timer_nogil(self, double at, long long interval_ns) noexcept nogil:
        """Arm the timerfd at ``at`` (absolute ``CLOCK_MONOTONIC`` seconds: a late
        wake-up does not move the next one), then every ``interval_ns`` (0: once);
        ``at`` < 0 disarms it.  0, or -1 when timerfd_settime failed (errno says
        why, nothing recorded); without a timerfd only the state is kept."""
        cdef itimerspec spec
        cdef long long at_ns = <long long>(at * 1e9 + 0.5) if at >= 0 else -1
        if at_ns < 0:
            interval_ns = 0
            spec.it_value.tv_sec = 0
            spec.it_value.tv_nsec = 0
        else:
            if at_ns == 0:
                at_ns = 1   # zero would disarm it
            spec.it_value.tv_sec = <long>(at_ns // 1000000000)
            spec.it_value.tv_nsec = <long>(at_ns % 1000000000)
        spec.it_interval.tv_sec = <long>(interval_ns // 1000000000)
        spec.it_interval.tv_nsec = <long>(interval_ns % 1000000000)
        if self._fd >= 0 and timerfd_settime(self._fd, TFD_TIMER_ABSTIME, &spec, NULL) < 0:
            return -1
        self._next_ns = at_ns if at_ns >= 0 else -1
        self._interval_ns = interval_ns
        self.wakeup = at if at_ns >= 0 else -1.0
        return 0

    cdef int _settle_owed(self) except -1:
        """Do with the GIL what the nogil path owes: 1 when Python must go on."""
        cdef int rc = 0
        if self._notify_owed:
            self._notify_owed = False
            _notify(self.pacer.queue, self.signal, self.interrupt, self.index)
        if self._events_owed:
            self._events_owed = False
            if self.events is not None:
                rc = self.events.flush_c()
        return rc

    cdef int tick_c(self, double now) except -1:
        cdef IoPacer pacer = self.pacer
        cdef unsigned long long c0
        cdef Py_ssize_t periods
        if self.unserved is not None or (self.events is not None and self.events.unserved is not None):
            return 1
        if not self.serving:
            return 0
        if self._settle_owed():
            return 1
        if self._take(now):
            return 1
        c0 = pacer.completed
        periods = pacer.due_c(now)
        if self._account(c0, periods):
            return 1
        if self._take(now):
            return 1
        if self._dry_check(now):
            return 1
        self._arm()
        return 0

    cdef int _take(self, double now) except -1:
        if not self.pacer.queue._ready:
            return 0
        self.unserved = self.pacer.take_c(now)
        if self.pacer.last_taken:
            self.dry_armed = False
            self._dry_deadline = -1.0
        return self.unserved is not None

    cdef int _account(self, unsigned long long c0, Py_ssize_t periods) except -1:
        """After the pacer completed messages: notification, period events."""
        cdef int rc = 0
        if self.pacer.completed == c0:
            return 0
        self.dry_armed = True
        self._dry_deadline = -1.0
        if self.pacer.last_end > 0:
            self._done_late = self._now() - self.pacer.last_end
        _notify(self.pacer.queue, self.signal, self.interrupt, self.index)
        if periods and self.started and self.events is not None:
            for _ in range(min(periods, EVENT_BACKLOG)):
                rc |= self.events.send_c(EVT_PCM_PERIOD_ELAPSED, self.pacer.stream_id)
        return rc

    cdef int _dry_check(self, double now) except -1:
        """A started stream that stays dry for a whole period after a completion:
        PCM_XRUN (when the driver selected it), once."""
        if self._dry_xrun(now) and self.xrun_events and self.events is not None:
            return self.events.send_c(EVT_PCM_XRUN, self.pacer.stream_id)
        return 0

    cdef int _arm(self) except -1:
        """Arm the timerfd for the end of the message in progress, else for the
        dry stream's xrun, else disarm it.  The timer is periodic with the
        message's duration: while the driver keeps the stream fed with messages
        of one size, each next end is the kernel's next expiry already, and the
        timer is not set again (a system call less per period)."""
        cdef double at
        cdef long long interval_ns
        if self._timer_target(&at, &interval_ns):
            if self.clock is not None:
                interval_ns = 0     # a fake clock: one-shot (see pump_c)
            self._set_timer(at, interval_ns)
        return 0

    cdef int _set_timer(self, double at, long long interval_ns) except -1:
        """:meth:`_set_timer_nogil`, raising its failure.

        Raises:
            OSError: timerfd_settime failed.
        """
        if self._set_timer_nogil(at, interval_ns) < 0:
            raise OSError(errno, f"timerfd_settime({at:.9f} s, every {interval_ns} ns) failed")
        return 0


@cython.final
cdef class KickPump(FdPump):
    """A tx or rx queue's kicks served in compiled code (``VirtioDevice.kick_pump``):
    while :attr:`target` (the stream's :class:`StreamTimer`) serves the queue, a
    kick takes what the driver added and re-arms the timer; otherwise, or when
    that leaves something for Python, the device's ``process_queue`` runs (1).
    What the target raises is kept in its ``error`` for ``process_queue``."""

    #: The stream timer serving the queue, or None.
    cdef public StreamTimer target

    cdef int pump_c(self) except -1:
        cdef StreamTimer t = self.target
        if t is None or not t.serving or t.error is not None:
            return 1
        try:
            return t.tick_c(t._now())
        except Exception as e:
            t.error = e
            return 1
