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
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.string cimport memset

from virtio_queue.chain cimport DescriptorChain, Reader, Writer, make_chain, make_reader, make_writer
from virtio_queue.queue cimport Queue

import collections

from virtio_queue import InvalidDescriptorIndex

cdef enum:
    # §5.14.6.1 / §5.14.6.8
    S_OK = 0x8000
    XFER_SIZE = 4
    STATUS_SIZE = 8
    # The largest ring of the device (sound.QUEUE_SIZE): messages held at once.
    MAX_HELD = 1024
    ZERO_CHUNK = 4096

cdef unsigned char _zeros[ZERO_CHUNK]
memset(_zeros, 0, ZERO_CHUNK)


cdef int _write_status(DescriptorChain ch, uint32_t status, uint32_t latency, size_t written) except -1:
    """Write ``{status, latency}`` little-endian into the last 8 device-writable
    bytes of ``ch`` (after ``written`` frame bytes, which stay as they are)."""
    cdef Writer w = make_writer(ch)
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
    cdef object _chains         # deque of DescriptorChain, in order
    cdef uint32_t _sizes[MAX_HELD]
    cdef Py_ssize_t _first
    cdef Py_ssize_t _count
    #: When the message in progress ends (the clock's seconds; < 0: none).
    cdef readonly double deadline
    cdef double _end
    #: Bytes of the messages held that have not started.
    cdef readonly unsigned long long queued_bytes
    #: Frame bytes played (tx) or recorded (rx) so far.
    cdef readonly unsigned long long frames_bytes
    #: Messages completed and their used bytes, so far.
    cdef readonly unsigned long long completed
    cdef readonly unsigned long long used_bytes

    def __init__(self, Queue queue not None, uint32_t stream_id, bint output, double byte_rate,
                 uint32_t period_bytes):
        if byte_rate <= 0:
            raise ValueError(f"byte rate must be positive, not {byte_rate}")
        self.queue = queue
        self.stream_id = stream_id
        self.output = output
        self.byte_rate = byte_rate
        self.period_bytes = period_bytes
        self._chains = collections.deque()
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

    cdef inline void _start(self, double now, bint follows=False) noexcept:
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

    cdef int _hold(self, DescriptorChain ch, uint32_t nbytes) except -1:
        if self._count >= MAX_HELD:
            raise OverflowError(f"sound stream {self.stream_id}: more than {MAX_HELD} messages held")
        self._sizes[(self._first + self._count) % MAX_HELD] = nbytes
        self._count += 1
        self._chains.append(ch)
        self.queued_bytes += nbytes
        return 0

    def push(self, DescriptorChain chain not None, uint32_t nbytes, double now):
        """Hold ``chain`` (checked by the caller: ``nbytes`` of frames); for the
        device's Python path."""
        self._hold(chain, nbytes)
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
        cdef Queue q = self.queue
        cdef uint16_t head
        cdef DescriptorChain ch
        cdef Reader r
        cdef Writer w
        cdef unsigned char hdr[XFER_SIZE]
        cdef uint32_t sid
        cdef size_t room, nbytes, got
        cdef Py_ssize_t taken = 0
        while True:
            if not q.pop_head(&head):
                self._start(now)
                if self.deadline >= 0:
                    # A message plays: its end looks at the ring anyway, so the
                    # driver need not kick meanwhile (VIRTIO 1.2 §2.7.10).
                    q.suppress_notification_c()
                    return taken, None
                if q.enable_notification_c():
                    continue    # one came before the driver could see the request
                return taken, None
            if head >= q._size:
                self._start(now)
                raise InvalidDescriptorIndex(
                    f"head descriptor index {head} out of range (queue size {q._size})")
            ch = make_chain(q._snap, q._memory, q._desc, q._desc_gpa, q._size, head)
            if not self.accepting:
                self._start(now)
                return taken, ch
            try:
                w = make_writer(ch)
                r = make_reader(ch)
            except Exception:
                # The Python path walks it again and answers the fault.
                self._start(now)
                return taken, ch
            room = w.avail
            if room < STATUS_SIZE or r.avail < XFER_SIZE:
                self._start(now)
                return taken, ch
            r.copy_out(hdr, XFER_SIZE)
            sid = hdr[0] | (<uint32_t>hdr[1] << 8) | (<uint32_t>hdr[2] << 16) | (<uint32_t>hdr[3] << 24)
            if sid != self.stream_id:
                self._start(now)
                return taken, ch
            if self.output:
                nbytes = r.avail
            else:
                nbytes = room - STATUS_SIZE
                got = 0
                while got < nbytes:
                    got += w.copy_in(_zeros, nbytes - got if nbytes - got < ZERO_CHUNK else ZERO_CHUNK)
            if nbytes > 0xFFFFFFFF:
                self._start(now)
                return taken, ch
            self._hold(ch, <uint32_t>nbytes)
            taken += 1

    def due(self, double now):
        """Complete, in order, every message whose time is over at ``now`` (status
        OK, ``latency_bytes``: for tx the bytes held behind it); each next one held
        starts where the one before ended (several complete at once when the timer
        came that late).  Returns the periods (``period_bytes``) that went through."""
        cdef Py_ssize_t periods = 0
        cdef uint32_t n, used
        cdef unsigned long long latency
        cdef DescriptorChain ch
        while self.deadline >= 0 and self.deadline <= now:
            n = self._sizes[self._first]
            ch = <DescriptorChain>self._chains.popleft()
            self._first = (self._first + 1) % MAX_HELD
            self._count -= 1
            self.deadline = -1.0
            latency = self.queued_bytes if self.output else 0
            _write_status(ch, S_OK, <uint32_t>(latency if latency < 0xFFFFFFFF else 0xFFFFFFFF), 0)
            used = STATUS_SIZE if self.output else n + STATUS_SIZE
            self.queue.add_used_c(ch.head_index, used)
            self.completed += 1
            self.used_bytes += used
            self.frames_bytes += n
            if self.period_bytes:
                self.period_pos += n
                periods += <Py_ssize_t>(self.period_pos // self.period_bytes)
                self.period_pos %= self.period_bytes
            self._start(now, True)
        return periods

    def finish_current(self, double now):
        """Complete the message in progress now, whatever its time (before a
        control request, as a worker would have finished it first); returns the
        periods that went through (see :meth:`due`)."""
        if self.deadline < 0:
            return 0
        self.deadline = 0.0
        return self.due(0.0)

    def flush(self, uint32_t status):
        """Complete every message held, in order, with ``status`` and
        ``latency_bytes`` 0 and no frames (RELEASE: OK; a queue taken back:
        IO_ERR), as the Python path answers them.  Returns how many were completed."""
        cdef Py_ssize_t done = 0
        cdef uint32_t used
        cdef DescriptorChain ch
        while self._count:
            ch = <DescriptorChain>self._chains.popleft()
            self._first = (self._first + 1) % MAX_HELD
            self._count -= 1
            _write_status(ch, status, 0, 0)
            used = STATUS_SIZE
            self.queue.add_used_c(ch.head_index, used)
            self.completed += 1
            self.used_bytes += used
            done += 1
        self.deadline = -1.0
        self.queued_bytes = 0
        self._end = 0.0
        return done


def suppress_kicks(Queue queue not None):
    """Ask the driver not to kick ``queue`` even for its next buffer (VIRTIO 1.2
    §2.7.10: with EVENT_IDX, ``avail_event`` one behind the buffers taken; else
    ``VRING_USED_F_NO_NOTIFY``), for a device that will look at the ring itself;
    ``Queue.enable_notification`` asks for kicks again."""
    queue.suppress_notification_c()
