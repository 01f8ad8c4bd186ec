# cython: language_level=3, embedsignature=True
"""The compiled event path of virtio-input (VIRTIO 1.2 §5.8.6.2), for its common case.

:class:`InputState` holds the device's hot state in C, shared by the device's
Python code and its two compiled servers (:mod:`virtio_devices._pump`), so that
neither reads a Python attribute per wake-up:

* :class:`InputPump`, the host fd's: reads every Linux ``struct input_event``
  record the fd has (an evdev node, or a twin of one) and writes each whole group
  of events (up to and including ``EV_SYN``/``SYN_REPORT``) into eventq buffers,
  one buffer per event, as ``struct virtio_input_event`` (``type le16, code
  le16, value le32``), one ``add_used`` each, then notifies the driver once for
  the batch through the transport's compiled signaller when it has one;
* :class:`InputKickPump`, the eventq kick's: keeps the buffers the driver posted.

Buffers are kept as head indexes (no chain, reader or writer object): a buffer
is checked by walking its descriptors in place (:func:`_head_ok`), and an event
is written straight into its first descriptor when that one is writable and
holds it; anything else goes to the general writer or to the Python path.  When
the kept buffers are too few for a group, the pump pops more from the avail
ring itself: eventq kicks are asked for (VIRTIO 1.2 §2.7.10) only while groups
are held for want of buffers, and a kick that finds nothing held does not read
the host fd (its own readiness delivers).

It serves the state where nothing is held: no group waiting, no partial group,
no malformed kept buffer, the device running.  It stops at the first group it
cannot deliver whole at once and gives that group and everything after it back,
unconverted, as ``(type, code, value)`` tuples, for the Python path
(:meth:`virtio_devices.input.InputDevice._group`) to hold or drop with
``SYN_DROPPED`` exactly as it does for any host: a group that needs more buffers
than there are or more than ``max_pending`` events, a group with the host's own
``SYN_DROPPED``, the trailing events of a group not yet ended, and a group whose
buffer is not one writable descriptor in one memory region.  So the bytes the
guest sees are the ones the Python path gives.
"""

from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport int32_t, uint16_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy
from posix.unistd cimport read

from virtio_devices._pump cimport FdPump
from virtio_queue.chain cimport (ChainCursor, DescriptorChain, Reader, Writer, chain_next,
                                 chain_start, desc_load, make_chain, make_reader, make_writer)
from virtio_queue.includes.virtio_ring cimport VRING_DESC_F_INDIRECT, VRING_DESC_F_WRITE, vring_desc
from virtio_queue.memory cimport snap_ptr_w
from virtio_queue.queue cimport Queue

from collections import deque


cdef extern from "<linux/input.h>":
    struct input_event:
        uint16_t type
        uint16_t code
        int32_t value


cdef extern from *:
    """
    #include <endian.h>
    #include <string.h>
    /* struct virtio_input_event (VIRTIO 1.2 5.8.6): type le16, code le16, value le32. */
    static inline void vdev_input_pack(unsigned char *out, const struct input_event *ev) {
        uint16_t t = htole16(ev->type), c = htole16(ev->code);
        uint32_t v = htole32((uint32_t)ev->value);
        memcpy(out, &t, 2);
        memcpy(out + 2, &c, 2);
        memcpy(out + 4, &v, 4);
    }
    """
    void vdev_input_pack(unsigned char *out, const input_event *ev) nogil


cdef enum:
    EV_SYN = 0
    SYN_REPORT = 0
    SYN_DROPPED = 3
    # Records read per read(2); the buffer grows while the fd has more.
    CHUNK = 256
    # At most this many records per call (the rest waits for the next readable).
    MAX_RECORDS = 65536
    ENODEV = 19

#: Size of the host's records (``sizeof(struct input_event)``).
INPUT_EVENT_SIZE = sizeof(input_event)


cdef Py_ssize_t _read_all(int fd, input_event **buf, Py_ssize_t *cap, bint *heap) except -1:
    """Read every whole record the fd has now (nonblocking fd) into *buf, which starts
    as the caller's (``*heap`` false) and moves to the heap when it must grow."""
    cdef Py_ssize_t n = 0
    cdef ssize_t got
    cdef input_event *grown
    while n < MAX_RECORDS:
        if cap[0] - n < CHUNK:
            if heap[0]:
                grown = <input_event *>realloc(buf[0], (cap[0] * 2) * sizeof(input_event))
            else:
                grown = <input_event *>malloc((cap[0] * 2) * sizeof(input_event))
                if grown != NULL:
                    memcpy(grown, buf[0], n * sizeof(input_event))
            if grown == NULL:
                raise MemoryError()
            buf[0] = grown
            heap[0] = True
            cap[0] *= 2
        # The fd is nonblocking: the read never waits, so the GIL is kept.
        got = read(fd, <void *>(buf[0] + n), CHUNK * sizeof(input_event))
        if got < 0:
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                break
            if n:
                break  # deliver what was read; the next read reports the error
            raise OSError(errno, "reading input events failed")
        if got == 0:
            if n:
                break
            # End of file: an evdev node never gives it; a twin whose device went away does.
            raise OSError(ENODEV, "the input device is gone (end of file)")
        # evdev returns whole records only (EINVAL for a shorter buffer).
        n += got // <ssize_t>sizeof(input_event)
        if got < <ssize_t>(CHUNK * sizeof(input_event)):
            break
    return n


cdef bint _head_ok(Queue q, uint16_t head) noexcept:
    """Whether the chain at ``head`` is a good event buffer for certain, from its
    descriptors in place: device-writable only (zero-length ones aside), each
    buffer in one writable region, room for one event (VIRTIO 1.2 §5.8.6.1).
    False: the Python path decides (:func:`event_buffer_ok` on a chain object,
    which also takes buffers over adjacent regions, and reports what is wrong)."""
    cdef ChainCursor c
    cdef vring_desc d
    cdef int rc
    cdef uint64_t room = 0
    if head >= q._size:
        return False
    chain_start(&c, q._desc, q._desc_gpa, q._size, head)
    while True:
        rc = chain_next(q._snap, &c, &d)
        if rc == 0:
            return room >= 8
        if rc < 0:
            return False
        if d.len == 0:
            continue
        if not (d.flags & VRING_DESC_F_WRITE) or snap_ptr_w(q._snap, d.addr, d.len) == NULL:
            return False
        room += d.len


cdef unsigned char *_event_ptr(Queue q, uint16_t head) noexcept:
    """Where an event goes in the chain at ``head`` when its first descriptor is a
    direct, device-writable buffer of at least one event in one region (what a
    driver posts); NULL: the general writer's case."""
    cdef vring_desc d
    if q._desc == NULL or head >= q._size:
        return NULL
    desc_load(q._desc + 16 * <size_t>head, &d)
    if (d.flags & VRING_DESC_F_INDIRECT) or not (d.flags & VRING_DESC_F_WRITE) or d.len < 8:
        return NULL
    return snap_ptr_w(q._snap, d.addr, 8)


cdef class InputState:
    """The input device's hot state, in C (see the module docstring).

    The device (:class:`virtio_devices.input.InputDevice`) keeps its lifecycle
    here (``active``, ``broken``, ``quiesced``), what it holds for the Python path
    (``groups``, ``partial``, ``skip_to_report``, ``host_gone``, ``rest``) and the
    eventq buffers it popped and keeps, in pop order (:meth:`keep_head`,
    :meth:`take_head`: head indexes, each good or not); the counters of events
    and chains are kept here for both paths.  ``records``: the host fd yields
    ``struct input_event`` records (the compiled delivery may read it);
    ``compiled_keep``: kicks keep buffers in compiled code.

    Raises:
        ValueError: ``max_pending`` below 2.
    """

    cdef Queue _queue
    cdef uint16_t *_heads
    cdef unsigned char *_oks
    cdef unsigned char **_ptrs
    cdef Py_ssize_t _cap
    cdef Py_ssize_t _first
    cdef Py_ssize_t _count
    cdef object _signal
    cdef object _interrupt
    cdef readonly Py_ssize_t good
    cdef public bint active
    cdef public bint broken
    cdef public bint quiesced
    cdef public bint records
    cdef public bint compiled_keep
    cdef public bint host_gone
    cdef public bint skip_to_report
    cdef public bint unnotified
    cdef public object groups
    cdef public list partial
    cdef public list rest
    cdef public Py_ssize_t max_pending
    cdef public int fd
    cdef public unsigned long long delivered
    cdef public unsigned long long compiled
    cdef public unsigned long long chains
    cdef public unsigned long long nbytes

    def __cinit__(self, *args, **kwargs):
        self._heads = NULL
        self._oks = NULL
        self._ptrs = NULL
        self.fd = -1

    def __init__(self, Py_ssize_t max_pending, *, bint records, bint compiled_keep):
        if max_pending < 2:
            raise ValueError(f"input: max_pending {max_pending} is below 2")
        self.max_pending = max_pending
        self.records = records
        self.compiled_keep = compiled_keep
        self.groups = deque()
        self.partial = []
        self.rest = []

    def __dealloc__(self):
        self._free()

    cdef void _free(self) noexcept:
        free(self._heads)
        free(self._oks)
        free(self._ptrs)
        self._heads = NULL
        self._oks = NULL
        self._ptrs = NULL
        self._cap = self._first = self._count = self.good = 0

    def bind(self, Queue queue not None, interrupt):
        """Serve ``queue`` (the eventq, the device activated), notifying through
        ``interrupt``: its compiled ``signaller(0)`` when the transport has one
        (``virtio_devices.base.Interrupt``), else its ``signal_used(0)``.  No
        buffer is kept afterwards.

        Raises:
            MemoryError: the table of kept buffers cannot be made.
        """
        cdef Py_ssize_t cap = max(<Py_ssize_t>queue._max_size, <Py_ssize_t>queue._size, 1)
        self._free()
        self._heads = <uint16_t *>malloc(cap * sizeof(uint16_t))
        self._oks = <unsigned char *>malloc(cap)
        self._ptrs = <unsigned char **>malloc(cap * sizeof(unsigned char *))
        if self._heads == NULL or self._oks == NULL or self._ptrs == NULL:
            self._free()
            raise MemoryError()
        self._cap = cap
        self._queue = queue
        self._interrupt = interrupt
        signaller = getattr(interrupt, "signaller", None)
        self._signal = signaller(0) if signaller is not None else None

    def unbind(self):
        """Forget the queue, the interrupt and the kept buffers (the device reset)."""
        self._free()
        self._queue = None
        self._signal = self._interrupt = None

    @property
    def kept(self):
        """Eventq buffers kept, good or not."""
        return self._count

    def keep_head(self, uint16_t head, bint ok):
        """Keep the buffer at ``head`` (popped last), good (``ok``) or not.

        Raises:
            RuntimeError: more buffers kept than the queue has entries (a bug).
        """
        if self._count >= self._cap:
            raise RuntimeError(f"input: eventq buffer {head} kept beyond the {self._cap} the queue has")
        cdef Py_ssize_t i = (self._first + self._count) % self._cap
        self._heads[i] = head
        self._oks[i] = ok
        self._count += 1
        self.good += ok

    def take_head(self):
        """The oldest kept buffer, taken: ``(head, ok)``.

        Raises:
            IndexError: no buffer is kept.
        """
        if not self._count:
            raise IndexError("input: no eventq buffer is kept")
        head = self._heads[self._first]
        ok = self._oks[self._first] != 0
        self._drop_first()
        return head, ok

    cdef inline void _drop_first(self) noexcept:
        self.good -= self._oks[self._first]
        self._first += 1
        if self._first == self._cap:
            self._first = 0
        self._count -= 1

    def first_ok(self):
        """Whether the oldest kept buffer is good (False: none is kept)."""
        return self._count > 0 and self._oks[self._first] != 0

    def forget(self):
        """Drop every kept buffer; returns their heads, oldest first (the order they
        were popped), for the caller to give back (``Queue.unpop_many``)."""
        cdef Py_ssize_t k
        heads = [self._heads[(self._first + k) % self._cap] for k in range(self._count)]
        self._first = self._count = self.good = 0
        return heads

    def write_event(self, uint16_t head, bytes event not None):
        """Write ``event`` into the buffer at ``head``; returns the bytes written.

        Raises:
            QueueError, GuestMemoryError: the chain is malformed or its buffers are
                not writable guest memory (the guest's fault).
        """
        cdef Queue q = self._queue
        cdef Py_ssize_t n = len(event)
        cdef unsigned char *p
        cdef Writer w
        q.ensure_ready()
        p = _event_ptr(q, head)
        if p != NULL and n == 8:
            memcpy(p, <const char *>event, 8)
            return 8
        w = make_writer(make_chain(q._snap, q._memory, q._desc, q._desc_gpa, q._size, head))
        return w.copy_in(<const unsigned char *><const char *>event, n)

    cdef int _fast(self) except -1:
        """Whether the compiled delivery knows the state (see the module docstring)."""
        cdef Queue q = self._queue
        if q is None or not q._ready or not self.active or self.broken or self.quiesced:
            return 0
        if self.host_gone or self.skip_to_report or self.rest or self.partial or len(self.groups):
            return 0
        return self.good == self._count

    def fast(self):
        """Whether the compiled delivery (:meth:`deliver_records`) knows the state:
        records on the host fd, nothing held, every kept buffer good, the device
        running."""
        return self.records and self._fast() != 0

    cdef inline bint _full(self, Queue q):
        """Whether no buffer more can be kept: more kept than the ring has entries
        means a head made available twice, which the Python path reports."""
        return q._n_resubmit or self._count >= self._cap or self._count >= q._size

    cdef int _keep_head(self, Queue q, uint16_t head) except -1:
        """Keep the buffer ``head`` just popped: 1; or give it back (``unpop``: it
        was the last popped) for the Python path, which must see it: 0."""
        cdef Py_ssize_t i
        if not _head_ok(q, head):
            q.unpop_c(head)
            return 0
        i = (self._first + self._count) % self._cap
        self._heads[i] = head
        self._oks[i] = 1
        self._count += 1
        self.good += 1
        return 1

    cdef int _take_avail(self, Py_ssize_t need) except -1:
        """Pop available buffers while fewer than ``need`` good ones are kept; stop
        before one the Python path must see (put back: it was the last popped)."""
        cdef Queue q = self._queue
        cdef uint16_t head
        while self.good < need:
            if self._full(q):
                return 0
            try:
                if not q.pop_head(&head):
                    return 0
            except Exception:
                return 0    # raised again for the Python path (nothing was taken)
            if not self._keep_head(q, head):
                return 0
        return 0

    cdef list _deliver_records(self, Py_ssize_t *out_delivered):
        """Read the host's records and deliver the whole groups that fit; returns the
        events from the first group not delivered on (``rest``; None: there are
        none).  Call only when :meth:`_fast`."""
        # The first CHUNK records on the stack: most wake-ups bring a few.
        cdef input_event first[CHUNK]
        cdef Py_ssize_t cap = CHUNK
        cdef input_event *evs = first
        cdef bint heap = False
        cdef Py_ssize_t n, i, j, k, glen, slot, start = 0, delivered = 0
        cdef Queue q = self._queue
        cdef bint whole, ok
        q.ensure_ready()
        try:
            n = _read_all(self.fd, &evs, &cap, &heap)
            while start < n:
                # The next group: up to its SYN_REPORT; stop at anything the Python path owns.
                whole = False
                j = start
                while j < n:
                    if evs[j].type == EV_SYN and evs[j].code == SYN_DROPPED:
                        break
                    if evs[j].type == EV_SYN and evs[j].code == SYN_REPORT:
                        whole = True
                        break
                    j += 1
                if not whole:
                    break
                glen = j - start + 1
                if glen > self.max_pending:
                    break
                if self.good < glen:
                    self._take_avail(glen)
                    if self.good < glen:
                        break
                ok = True
                for k in range(glen):
                    slot = (self._first + k) % self._cap
                    self._ptrs[k] = _event_ptr(q, self._heads[slot])
                    if self._ptrs[k] == NULL:
                        ok = False
                        break
                if not ok:
                    break   # the Python path writes it with the general writer
                for k in range(glen):
                    vdev_input_pack(self._ptrs[k], &evs[start + k])
                    q.add_used_c(self._heads[self._first], 8)
                    self._drop_first()
                delivered += glen
                start = j + 1
            # None, not an empty list, when all went: no allocation per wake-up.
            rest = [(evs[i].type, evs[i].code, evs[i].value) for i in range(start, n)] if start < n else None
        finally:
            if heap:
                free(evs)
        out_delivered[0] = delivered
        return rest

    def deliver_records(self):
        """Read the host fd's records and deliver the whole groups that fit (call
        only when :meth:`fast`).  Returns ``(delivered, rest)``: events delivered
        (one ``add_used`` each, length 8, VIRTIO 1.2 §5.8.6.2; counted; the driver
        not yet notified: ``unnotified``), and the events from the first group not
        delivered on, as ``(type, code, value)`` tuples, for the Python path.

        Raises:
            OSError: reading the fd failed before any record was read (the device is
                gone: ``ENODEV``, or end of file for a twin).
        """
        cdef Py_ssize_t delivered = 0
        rest = self._deliver_records(&delivered)
        self._count_delivered(delivered)
        return delivered, rest if rest is not None else []

    cdef inline void _count_delivered(self, Py_ssize_t delivered) noexcept:
        if delivered:
            self.delivered += delivered
            self.compiled += delivered
            self.chains += delivered
            self.nbytes += 8 * delivered
            self.unnotified = True

    cdef int _notify(self) except -1:
        """Notify the driver of the used buffers if it asked (EVENT_IDX aware)."""
        self.unnotified = False
        if self._signal is not None:
            if self._queue.needs_notification_c():
                self._signal()
        elif self._interrupt is not None and self._queue.needs_notification_c():
            self._interrupt.signal_used(0)
        return 0

    cdef int _keep(self) except -1:
        """:meth:`keep`'s work: 1 done, 0 the Python drain loop goes on."""
        cdef Queue q = self._queue
        cdef uint16_t head
        cdef int got
        if q is None:
            return 0
        while True:
            try:
                if self._full(q):
                    # Every ring entry is kept (a driver that posts the whole ring):
                    # the ring is empty unless a head was made available twice or a
                    # resubmission waits, both the Python path's.  An empty ring is
                    # done as below, or every later kick would take the Python path
                    # and, with kicks left on by it, the driver would kick each repost.
                    q.ensure_ready()
                    if q._n_resubmit or q.work_pending_c():
                        return 0
                    got = 0
                else:
                    got = q.pop_head(&head)
                if not got:
                    if not len(self.groups):
                        # Nothing waits for buffers: no kick wanted (the host fd's
                        # pump pops what the driver posts when events come).
                        q.suppress_notification_c()
                        return 1
                    # Held groups wait: a kick is wanted for the next buffer, and
                    # one posted before the driver could see that is looked for.
                    if q.enable_notification_c():
                        continue
                    return 1
            except Exception:
                return 0    # raised again for the Python path (nothing was taken)
            if not self._keep_head(q, head):
                return 0

    def keep(self):
        """Pop the eventq's available chains and keep the good ones, as
        ``handle_chain`` keeps them, without a Python call per chain.  Returns
        ``done``: the ring was left empty, with kicks asked for (VIRTIO 1.2
        §2.7.10: notifications on and the ring looked at again) while groups are
        held, and suppressed otherwise (with EVENT_IDX ``avail_event`` left behind
        ``next_avail``), so the Python drain loop has nothing to add.

        Stops (``done`` false) before the first chain the Python drain loop must
        see: one that is not surely a good event buffer (:func:`_head_ok`),
        malformed, or with a head index out of range (it is put back: it was the
        last one popped), an avail index the queue refuses, any inflight
        resubmission (served by the Python path alone), and a chain made available
        while every ring entry is kept already (a head made available twice).
        Every entry kept and nothing new (a driver that posts the whole ring) is
        an empty ring: done.
        """
        return self._keep() != 0


cdef bint _buffer_ok(DescriptorChain chain) except -1:
    cdef Reader r = make_reader(chain)
    if r.avail != 0:
        return False
    cdef Writer w = make_writer(chain)
    return w.avail >= 8


def event_buffer_ok(DescriptorChain chain not None):
    """Whether an eventq chain is what §5.8.6.1 asks: device-writable only, with room
    for one ``struct virtio_input_event`` (8 bytes).  Same answer as
    ``chain.reader().available_bytes() == 0 and chain.writer().available_bytes() >= 8``.

    Raises:
        QueueError: the chain is malformed (as :meth:`DescriptorChain.reader` raises).
    """
    return _buffer_ok(chain)


cdef class InputPump(FdPump):
    """The device's host fd served in compiled code (:class:`virtio_devices._pump.FdPump`):
    when the state is the one :meth:`InputState.deliver_records` knows, reads and
    delivers as it does, and notifies the driver once for the batch if it asked: 0,
    done.  Anything else is the Python path's (1): another state (nothing is read),
    a read error (nothing was read: the Python path reads again and meets it), or
    events given back, kept in the state's ``rest`` (the Python path takes them
    before reading again: the order stays the host's)."""

    cdef readonly InputState state

    def __init__(self, InputState state not None):
        self.state = state

    cdef int pump_c(self) except -1:
        cdef Py_ssize_t delivered = 0
        cdef InputState st = self.state
        if not st.records or not st._fast():
            return 1
        try:
            rest = st._deliver_records(&delivered)
        except OSError:
            return 1
        st._count_delivered(delivered)
        if rest:
            st.rest = rest
            return 1
        if st.unnotified:
            st._notify()
        return 0


cdef class InputKickPump(FdPump):
    """The eventq's kicks served in compiled code (``VirtioDevice.kick_pump``): when
    the device is running, keeps the new buffers as :meth:`InputState.keep` does.
    Done (0) when that left the ring empty and nothing is held for the Python path
    to deliver into them (events still on the host fd come with its own
    readiness).  Anything else answers 1: ``process_queue`` runs and finds the ring
    as this left it (the buffers kept so far are the device's).  The device never
    parks an eventq chain, so there is no parked chain to look for."""

    cdef readonly InputState state

    def __init__(self, InputState state not None):
        self.state = state

    cdef int pump_c(self) except -1:
        cdef InputState st = self.state
        cdef Queue q = st._queue
        if q is None or not q._ready or not st.active or st.broken or not st.compiled_keep:
            return 1
        st.quiesced = False
        if not st._keep():
            return 1
        if st.rest or len(st.groups):
            return 1
        return 0
