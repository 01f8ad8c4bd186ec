# cython: language_level=3, embedsignature=True
"""The compiled event path of virtio-input (VIRTIO 1.2 §5.8.6.2), for its common case.

:func:`pump` serves one readable host fd that yields Linux's ``struct
input_event`` records (an evdev node, or a twin of one): it reads every record
there is, and delivers each whole group of events (up to and including
``EV_SYN``/``SYN_REPORT``) into the eventq buffers the device keeps, one buffer
per event, as ``struct virtio_input_event`` (``type le16, code le16, value
le32``), with one ``add_used`` per buffer; all in C, in one call per batch.

It knows the case where nothing is held: the device has no group waiting, no
partial group and no malformed kept buffer (the caller checks that).  It stops
at the first group it cannot deliver whole at once and gives that group and
everything after it back, unconverted, as ``(type, code, value)`` tuples, for
the Python path (:meth:`virtio_devices.input.InputDevice._group`) to hold or drop
with ``SYN_DROPPED`` exactly as it does for any host: a group that needs more
buffers than are kept or more than ``max_pending`` events, a group with the
host's own ``SYN_DROPPED``, the trailing events of a group not yet ended, and a
group whose buffer cannot be written (a chain the memory table no longer maps).
So the bytes the guest sees are the ones the Python path gives.
"""

from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport int32_t, uint16_t, uint32_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy
from posix.unistd cimport read

from virtio_devices._pump cimport FdPump
from virtio_queue.chain cimport DescriptorChain, Reader, Writer, make_chain, make_reader, make_writer
from virtio_queue.queue cimport Queue


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


cdef list _pump(int fd, Queue queue, object buffers, Py_ssize_t max_pending,
                Py_ssize_t *out_delivered):
    """:func:`pump`'s work: returns ``rest``, sets ``*out_delivered``."""
    # The first CHUNK records on the stack: most wake-ups bring a few.
    cdef input_event first[CHUNK]
    cdef Py_ssize_t cap = CHUNK
    cdef input_event *evs = first
    cdef bint heap = False
    cdef Py_ssize_t n, i, j, k, glen, start = 0, delivered = 0
    cdef Py_ssize_t kept = len(buffers)
    cdef unsigned char packed[8]
    cdef Writer w
    cdef DescriptorChain ch
    cdef list writers
    cdef size_t wrote
    cdef bint whole
    try:
        n = _read_all(fd, &evs, &cap, &heap)
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
            if glen > kept or glen > max_pending:
                break
            writers = []
            try:
                for k in range(glen):
                    ch = <DescriptorChain>buffers[k][0]
                    writers.append(make_writer(ch))
            except Exception:
                break  # the Python path logs the guest's fault and completes it with 0
            for k in range(glen):
                ch = <DescriptorChain>buffers.popleft()[0]
                w = <Writer>writers[k]
                vdev_input_pack(packed, &evs[start + k])
                wrote = w.copy_in(packed, 8)
                queue.add_used_c(ch.head_index, <uint32_t>wrote)
            kept -= glen
            delivered += glen
            start = j + 1
        rest = [(evs[i].type, evs[i].code, evs[i].value) for i in range(start, n)]
    finally:
        if heap:
            free(evs)
    out_delivered[0] = delivered
    return rest


def pump(int fd, Queue queue not None, object buffers not None, Py_ssize_t max_pending):
    """Read the host's records from ``fd`` and deliver the whole groups that fit.

    ``buffers`` is the device's deque of kept eventq chains ``(chain, ok)``, all
    good, oldest first: delivered ones are taken from its left.  Returns
    ``(delivered, rest)``: how many buffers were used (one ``add_used`` each,
    length 8, VIRTIO 1.2 §5.8.6.2), and the events from the first group not
    delivered on, as ``(type, code, value)`` tuples, for the Python path.

    Raises:
        OSError: reading the fd failed before any record was read (the device is
            gone: ``ENODEV``, or end of file for a twin).
    """
    cdef Py_ssize_t delivered = 0
    rest = _pump(fd, queue, buffers, max_pending, &delivered)
    return delivered, rest


cdef class InputPump(FdPump):
    """The device's host fd served in compiled code (:class:`virtio_devices._pump.FdPump`):
    when the device's state is the one :func:`pump` knows (nothing held, no partial
    group, every kept buffer good, the eventq running, the host not gone), reads
    and delivers as :func:`pump` does, counts, and notifies the driver once for the
    batch if it asked (EVENT_IDX aware, as ``VirtioDevice.notify``): 0, done.
    Anything else is the Python path's (1): another state (nothing is read), a read
    error (nothing was read: the Python path reads again and meets it), or events
    :func:`pump` gives back, kept in :attr:`rest` (the Python path takes them
    before reading again: the order stays the host's).

    The device's attributes are read from C (no Python frame): ``_compiled``,
    ``_groups``, ``_partial``, ``_skip_to_report``, ``host_gone``, ``_good``,
    ``_buffers``, ``active``, ``broken``, ``queues``, ``_quiesced``,
    ``max_pending``, ``interrupt`` and its counters.
    """

    cdef public object device
    cdef public int fd
    cdef public list rest

    def __init__(self, device, int fd):
        self.device = device
        self.fd = fd
        self.rest = []

    cdef int pump_c(self) except -1:
        cdef Py_ssize_t delivered = 0
        cdef Queue queue
        dev = self.device
        if self.rest or not dev._compiled or dev._groups or dev._partial or dev._skip_to_report:
            return 1
        if dev.host_gone or not dev.active or dev.broken is not None:
            return 1
        buffers = dev._buffers
        if dev._good != len(buffers):
            return 1
        queues = dev.queues
        if not queues or dev._quiesced[0]:
            return 1
        queue = <Queue?>queues[0]
        if not queue._ready:
            return 1
        try:
            rest = _pump(self.fd, queue, buffers, dev.max_pending, &delivered)
        except OSError:
            return 1
        if delivered:
            dev._good -= delivered
            dev.events_delivered += delivered
            dev.events_compiled += delivered
            dev.chains_served += delivered
            dev.bytes_served += delivered * 8
        if rest:
            self.rest = rest
            if delivered:
                dev._unnotified = True
            return 1
        if delivered or dev._unnotified:
            dev._unnotified = False
            interrupt = dev.interrupt
            if interrupt is not None and queue.needs_notification_c():
                interrupt.signal_used(0)
        return 0


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


cdef bint _keep(Queue queue, object buffers, Py_ssize_t *out_n) except -1:
    """:func:`keep`'s work: returns ``done``, sets ``*out_n`` to ``kept``."""
    cdef uint16_t head
    cdef Py_ssize_t n = 0
    out_n[0] = 0
    cdef DescriptorChain ch
    cdef bint ok
    while True:
        if queue._n_resubmit:
            out_n[0] = n
            return False
        try:
            if not queue.pop_head(&head):
                # Empty: notifications on again, then look once more (a chain made
                # available before the driver saw avail_event would get no kick).
                if queue.enable_notification_c():
                    continue
                out_n[0] = n
                return True
        except Exception:
            out_n[0] = n
            return False  # raised again for the Python path (nothing was taken)
        ok = head < queue._size
        if ok:
            ch = make_chain(queue._snap, queue._memory, queue._desc, queue._desc_gpa, queue._size, head)
            try:
                ok = _buffer_ok(ch)
            except Exception:
                ok = False
        if not ok:
            queue.set_next_avail(<uint16_t>(queue._next_avail - 1))
            out_n[0] = n
            return False
        buffers.append((ch, True))
        n += 1


def keep(Queue queue not None, object buffers not None):
    """Pop the eventq's available chains and keep the good ones (``(chain, True)``
    appended to ``buffers``), as ``handle_chain`` keeps them, without a Python call
    per chain.  Returns ``(kept, done)``: ``done`` when the ring was left empty
    with notifications enabled again (VIRTIO 1.2 §2.7.10: with EVENT_IDX,
    ``avail_event`` moved to the next index, and looked again after that), so the
    Python drain loop has nothing to add.

    Stops (``done`` false) before the first chain the Python drain loop must see:
    one that is not a good event buffer (:func:`event_buffer_ok`), is malformed or
    has a head index out of range (it is put back: it was the last one popped), an
    avail index the queue refuses, and any inflight resubmission (chains the
    front-end gave back after a reconnection, served by the Python path alone).
    """
    cdef Py_ssize_t n = 0
    done = _keep(queue, buffers, &n)
    return n, done


cdef class InputKickPump(FdPump):
    """The eventq's kicks served in compiled code (``VirtioDevice.kick_pump``): when
    ``process_queue`` would take the compiled branch (the device active, not broken,
    nothing parked, the queue ready), keeps the new buffers as :func:`keep` does;
    when that left the ring empty with notifications on (§2.7.10), goes on as
    ``process_queue`` does with the host fd's :class:`InputPump` (events read now
    reach the new buffers).  Anything else answers 1: ``process_queue`` runs and
    finds the ring as this left it (the buffers kept so far are the device's)."""

    cdef public object device

    def __init__(self, device):
        self.device = device

    cdef int pump_c(self) except -1:
        cdef Py_ssize_t kept = 0
        cdef Queue queue
        dev = self.device
        if not dev._compiled_keep or dev.broken is not None or not dev.active:
            return 1
        if dev._parked[0] is not None:
            return 1
        queues = dev.queues
        if not queues:
            return 1
        queue = <Queue?>queues[0]
        if not queue._ready:
            return 1
        dev._quiesced[0] = False
        try:
            done = _keep(queue, dev._buffers, &kept)
        finally:
            if kept:
                dev._good += kept
        if not done:
            return 1
        host = dev._pump
        if host is None:
            return 1
        return (<InputPump?>host).pump_c()
