# cython: language_level=3, embedsignature=True
"""virtio-i2c's compiled request path: a queue served without per-request Python.

:class:`I2cEngine` serves one :class:`~virtio_devices.i2c.I2cDevice` queue whose
bus is ``/dev/i2c-N`` adapters with a compiled port
(:class:`~virtio_devices.hosts._i2c_dev.I2cDevPort`).  It does what the device's
Python path does (the behaviour is the module docstring of
:mod:`virtio_devices.i2c`, VIRTIO 1.2 §5.19), in C:

* on a kick (:meth:`I2cEngine.kick`, the device's ``process_queue``) it pops every
  available chain, parses its ``virtio_i2c_out_hdr`` and buffer (the same checks,
  in the same order, with the same outcome), collects ``FAIL_NEXT`` groups (an open
  group waits across kicks; a group that fills the ring runs as it is), checks
  each complete group whole (a bad request, an address with no device, two
  adapters: the group fails before the bus);
* groups run in ring order, one batch at a time per queue: the consecutive groups
  waiting for the same adapter go to that adapter's thread as one batch
  (:c:type:`I2cJob`), which runs them with the GIL released and writes this
  engine's eventfd once; the device's loop then calls :meth:`I2cEngine.on_done`,
  which writes every status (and the data read), adds the chains to the used ring
  and notifies the driver once, then starts the next batch;
* a group that fails before the bus is answered in its turn without the thread;
* on a ring worker (:class:`I2cRingWorker`, the vhost-user transport) the batches
  run on the worker's own thread instead, GIL released, and are answered and
  notified there: no adapter thread, no eventfd, no wake-up of the loop;
* and there, for a bus of one adapter, the common requests (complete groups of
  well-formed requests for an address on the bus) are served without the GIL at
  all (:meth:`I2cEngine.serve_nogil_c`, the worker's ``serve_nogil``): each group
  is parsed in place in the avail ring before it is taken, and anything else (a
  guest error to log, an address with no device, a group still open, a chain of
  an odd shape) is left in the ring for the path above, which takes it then.

Only the thread serving the queue (the loop's, or the ring worker's) touches the
queue and guest memory; the adapter's thread touches only the batch's own buffers
(copies of the requests' data).
"""

from libc.errno cimport EIO, ENXIO, EREMOTEIO, errno
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from posix.unistd cimport close, read

from virtio_queue._linux cimport (sched_yield, eventfd, EFD_CLOEXEC, EFD_NONBLOCK, pollfd, poll,
                                  POLLIN)
from virtio_queue.chain cimport (ChainCursor, DescriptorChain, Writer, Reader, chain_next,
                                 chain_start, desc_load, make_chain, make_reader, make_writer)
from virtio_queue.includes.virtio_ring cimport VRING_DESC_F_INDIRECT, VRING_DESC_F_WRITE, vring_desc
from virtio_queue.memory cimport snap_ptr, snap_ptr_w
from virtio_queue.queue cimport Queue
from virtio_devices._pump cimport RingWorker, Signaller
from virtio_devices.hosts._i2c_dev cimport I2cCMsg, I2cDevPort, I2cJob

import errno as _errno
import logging

from virtio_devices.errors import DeviceNeedsReset
from virtio_queue.errors import GuestMemoryError, InvalidAvailRingIndex, InvalidDescriptorIndex, QueueError

log = logging.getLogger("virtio_devices.i2c")


def process_queue(object device, int index):
    """``I2cDevice.process_queue``: the driver kicked the requestq.  With an engine
    (every address on a compiled adapter port) :meth:`I2cEngine.kick` serves it,
    under the framework's error policy (a broken device refuses, a kick gives the
    queue back to the device, a broken ring stops the queue, a device bug breaks the
    device); without one, ``VirtioDevice.process_chains`` (the Python path).

    Raises:
        DeviceNeedsReset: the device is broken, or serving hit a bug.
        InvalidAvailRingIndex, QueueError, GuestMemoryError: the ring is unusable.
    """
    e = device.engine
    if e is None:
        device.process_chains(index)
        return
    _serve(device, <I2cEngine?>e, index, None)


cdef int _serve(object device, I2cEngine engine, int index, RingWorker worker) except -1:
    """A kick served by ``engine`` under the framework's error policy (see
    :func:`process_queue`); ``worker``: the ring worker whose thread this is (None:
    the loop's)."""
    if device.broken is not None:
        raise DeviceNeedsReset(f"{device.name}: device is broken ({device.broken!r}) until it is reset")
    device._quiesced[index] = False  # a kick: the queue is the device's again
    try:
        engine.kick_c(worker is not None, worker)
    except (InvalidAvailRingIndex, QueueError, GuestMemoryError):
        raise
    except Exception as exc:
        raise device._break(index, exc) from exc
    return 0


cdef class I2cRingWorker(RingWorker):
    """The requestq served on a thread of its own (``I2cDevice.ring_worker``, the
    vhost-user transport): on each kick, in C, the engine pops and parses, runs
    the transfers on this thread with the GIL released (holding only this ring,
    as upstream's vring worker does; never the event loop), answers and notifies.
    No adapter thread, no eventfd back to the loop.  What the engine raises, as
    :func:`process_queue` raises it, stops the worker and reaches the transport."""

    cdef object device
    cdef I2cEngine engine
    cdef int index
    # The ring's compiled Signaller for this run, when the transport gives one
    # (``interrupt.signaller``) and the bus is one adapter: serve_nogil may serve.
    cdef Signaller signaller
    cdef bint nogil_ok
    # A service of this run under the GIL found the device whole and took the
    # queue back for it (_serve's checks): only then does serve_nogil serve.
    cdef bint primed

    def __init__(self, device, I2cEngine engine not None, int index):
        self.device = device
        self.engine = engine
        self.index = index

    def start(self, int kick_fd, fail=None, post=None):
        """``RingWorker.start``; the ring's Signaller is taken for this run (the
        transport stops the worker while it replaces the Signaller's fd).

        Raises:
            RuntimeError: the worker runs already.
            ValueError: ``kick_fd`` is not a file descriptor.
        """
        get = getattr(self.engine.interrupt, "signaller", None)
        sig = get(self.index) if get is not None else None
        if self.running:
            raise RuntimeError(f"ring worker started twice (kick fd {kick_fd})")
        self.primed = False
        self.nogil_ok = isinstance(sig, Signaller) and self.engine.port0 is not None
        self.signaller = sig if self.nogil_ok else None
        RingWorker.start(self, kick_fd, fail, post)

    cdef int serve_nogil(self) noexcept nogil:
        if not self.primed:
            return 1
        return self.engine.serve_nogil_c(self, self.signaller)

    cdef int serve_c(self) except -1:
        self.engine.log_pending()
        _serve(self.device, self.engine, self.index, self)
        self.primed = self.nogil_ok
        return 0


cdef enum:
    FLAG_FAIL_NEXT = 1
    FLAG_M_RD = 2
    KNOWN_FLAGS = 3
    MAX_MSG_LEN = 8192
    INLINE = 40
    MAX_SEGS = 4            # buffers per direction the nogil parse keeps

# Why a request cannot run (E_TEXT: the text the Python path logs).
cdef enum:
    E_NONE = 0
    E_CHAIN           # the chain's buffers (text kept in _errtext)
    E_SHORT_HDR
    E_NO_STATUS
    E_FLAGS
    E_ADDR
    E_READ_READABLE
    E_WRITE_WRITABLE
    E_TOO_LONG

_NAK_ERRNOS = frozenset({_errno.ENXIO, _errno.EREMOTEIO, _errno.EIO})


cdef struct Req:
    uint16_t head
    uint16_t addr           # 7-bit
    uint16_t entries        # descriptor-table entries of the chain (FAIL_NEXT only)
    uint8_t ok              # a message that can run
    uint8_t fail_next
    uint8_t read
    uint8_t has_writer      # 1: a Writer in writers[slot]; 2: wptr/wseg (nogil parse)
    uint8_t nw
    int err
    uint32_t raw_addr       # for the error text
    uint32_t raw_flags
    uint32_t rlen           # device-readable bytes after out_hdr
    uint32_t len            # the message's length
    uint32_t wlen           # device-writable bytes (status included)
    unsigned char *buf
    unsigned char inline_buf[INLINE]
    unsigned char *wptr[MAX_SEGS]   # the device-writable buffers (has_writer 2)
    uint32_t wseg[MAX_SEGS]


cdef inline void _gather(unsigned char **ptr, uint32_t *seg, int nseg, uint32_t off,
                         unsigned char *dst, uint32_t n) noexcept nogil:
    """Copy ``n`` bytes from offset ``off`` of the buffers ``ptr``/``seg`` (they
    hold at least off + n bytes) to ``dst``."""
    cdef int k
    cdef uint32_t take
    for k in range(nseg):
        if n == 0:
            return
        if off >= seg[k]:
            off -= seg[k]
            continue
        take = seg[k] - off
        if take > n:
            take = n
        memcpy(dst, ptr[k] + off, take)
        dst += take
        n -= take
        off = 0


cdef class I2cEngine:
    """The compiled request path of one queue (see the module docstring).

    ``device`` is the :class:`~virtio_devices.i2c.I2cDevice` (counters, logging,
    notification); ``ports`` maps each 7-bit address served to its adapter's
    :class:`~virtio_devices.hosts._i2c_dev.I2cDevPort` (a dict).

    Raises:
        OSError: the engine's eventfd cannot be made.
    """

    cdef object device
    cdef list ports
    cdef int slot_port[128]
    cdef Queue queue
    cdef int index
    cdef object interrupt
    cdef object signal              # the ring's own signaller, when the transport has one
    cdef uint32_t cap
    cdef Req *reqs
    cdef list writers
    cdef dict errtext
    cdef uint32_t r_first
    cdef uint32_t r_count
    # Complete groups waiting or in the adapter's thread, in ring order (a FIFO).
    cdef uint32_t *g_len
    cdef int *g_port
    cdef uint32_t g_first
    cdef uint32_t g_count
    cdef uint32_t inflight          # groups at the FIFO's front in the adapter's thread
    cdef uint32_t open_len
    cdef uint32_t open_entries
    cdef I2cJob job
    # The bus's one adapter (the nogil path serves only such a bus), or None.
    cdef readonly I2cDevPort port0
    # A transfer error the nogil path could not log (log_pending logs it).
    cdef int pending_errno
    cdef readonly unsigned long long nogil_chains
    cdef readonly unsigned long long nogil_bytes
    cdef readonly int fd
    cdef readonly unsigned long long groups
    cdef readonly unsigned long long failed
    cdef readonly unsigned long long jobs

    def __cinit__(self, *args, **kwargs):
        self.fd = -1
        self.reqs = NULL

    def __init__(self, device, dict ports):
        cdef int a
        self.device = device
        self.ports = []
        for a in range(128):
            self.slot_port[a] = -1
        for addr, port in ports.items():
            if not isinstance(port, I2cDevPort):
                raise TypeError(f"address {addr}: {type(port).__name__} is not an I2cDevPort")
            if port not in self.ports:
                self.ports.append(port)
            self.slot_port[<int>addr] = self.ports.index(port)
        self.port0 = self.ports[0] if len(self.ports) == 1 else None
        self.errtext = {}
        self.fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
        if self.fd < 0:
            raise OSError(errno, "eventfd for i2c completions")
        self.job.notify_fd = self.fd

    def __dealloc__(self):
        cdef pollfd p
        # A batch still in an adapter's thread writes into our buffers and eventfd:
        # wait for it (a device is normally quiesced before it goes).
        if self.inflight and self.fd >= 0:
            p.fd = self.fd
            p.events = POLLIN
            while not self.job.finished:
                with nogil:
                    poll(&p, 1, 10)
        self._free()
        if self.fd >= 0:
            close(self.fd)

    cdef void _free(self) noexcept:
        if self.reqs != NULL:
            self._drop_bufs()
            free(self.reqs)
            free(self.g_len)
            free(self.g_port)
            free(self.job.msgs)
            free(self.job.group_len)
            free(self.job.group_done)
            free(self.job.group_errno)
            self.reqs = NULL

    cdef void _drop_bufs(self) noexcept:
        cdef uint32_t k
        cdef Req *r
        for k in range(self.r_count):
            r = &self.reqs[(self.r_first + k) % self.cap]
            if r.buf != r.inline_buf and r.buf != NULL:
                free(r.buf)
            r.buf = NULL

    def bind(self, Queue queue not None, int index, interrupt):
        """Serve ``queue`` (the device was activated); nothing may be held."""
        cdef uint32_t cap = queue.size + 1
        if self.r_count or self.inflight:
            raise RuntimeError(f"i2c engine bound with {self.r_count} requests held")
        self._free()
        self.queue = queue
        self.index = index
        self.interrupt = interrupt
        # A transport that hands out a queue's signaller (vhost-user: the ring's
        # compiled KickRing.signal_used) is called directly, without a Python frame.
        signaller = getattr(interrupt, "signaller", None)
        self.signal = signaller(index) if signaller is not None else None
        self.cap = cap
        self.reqs = <Req *>malloc(sizeof(Req) * cap)
        self.g_len = <uint32_t *>malloc(sizeof(uint32_t) * cap)
        self.g_port = <int *>malloc(sizeof(int) * cap)
        self.job.msgs = <I2cCMsg *>malloc(sizeof(I2cCMsg) * cap)
        self.job.group_len = <int *>malloc(sizeof(int) * cap)
        self.job.group_done = <int *>malloc(sizeof(int) * cap)
        self.job.group_errno = <int *>malloc(sizeof(int) * cap)
        if (self.reqs == NULL or self.g_len == NULL or self.g_port == NULL or self.job.msgs == NULL
                or self.job.group_len == NULL or self.job.group_done == NULL
                or self.job.group_errno == NULL):
            self._free()
            raise MemoryError()
        self.writers = [None] * cap
        self.errtext.clear()
        self.r_first = self.r_count = 0
        self.g_first = self.g_count = 0
        self.inflight = 0
        self.open_len = self.open_entries = 0

    def held(self):
        """Chains popped and not yet answered."""
        return self.r_count

    # -- parsing ---------------------------------------------------------------------
    cdef uint16_t _entries(self, DescriptorChain ch):
        """Descriptor-table entries ``ch`` holds: 1 if its head is indirect."""
        cdef vring_desc d
        cdef ChainCursor c
        cdef int n = 0
        if ch.table == NULL:
            return <uint16_t>self.device._table_entries(self.index, ch)
        desc_load(ch.table + 16 * <size_t>ch.head_index, &d)
        if d.flags & VRING_DESC_F_INDIRECT:
            return 1
        chain_start(&c, ch.table, ch.table_gpa, ch.queue_size, ch.head_index)
        while chain_next(ch.snap, &c, &d) > 0:
            n += 1
        return <uint16_t>(n if n > 0 else 1)

    cdef int _parse(self, Req *r, uint32_t slot, DescriptorChain ch) except -1:
        """As the device's ``_parse``: never raises for the guest's errors."""
        cdef Writer w
        cdef Reader rd
        cdef unsigned char hdr[8]
        cdef uint32_t rlen, wlen, n, flags
        cdef uint16_t addr
        r.head = ch.head_index
        r.ok = r.fail_next = r.read = r.has_writer = 0
        r.entries = 1
        r.err = E_NONE
        r.len = 0
        r.buf = r.inline_buf
        try:
            w = make_writer(ch)
        except (QueueError, GuestMemoryError) as e:
            r.err = E_CHAIN
            self.errtext[slot] = str(e)
            return 0
        self.writers[slot] = w
        r.has_writer = 1
        r.wlen = wlen = <uint32_t>w.avail
        try:
            rd = make_reader(ch)
        except (QueueError, GuestMemoryError) as e:
            r.err = E_CHAIN
            self.errtext[slot] = str(e)
            return 0
        rlen = <uint32_t>rd.avail
        if rlen < 8:
            r.err = E_SHORT_HDR
            r.rlen = rlen
            return 0
        rd.copy_out(hdr, 8)
        addr = <uint16_t>(hdr[0] | (<uint16_t>hdr[1] << 8))
        flags = hdr[4] | (<uint32_t>hdr[5] << 8) | (<uint32_t>hdr[6] << 16) | (<uint32_t>hdr[7] << 24)
        r.raw_addr = addr
        r.raw_flags = flags
        if flags & FLAG_FAIL_NEXT:
            r.fail_next = 1
            r.entries = self._entries(ch)
        rlen -= 8
        r.rlen = rlen
        r.read = (flags & FLAG_M_RD) != 0
        if wlen < 1:
            r.err = E_NO_STATUS
        elif flags & ~(<uint32_t>KNOWN_FLAGS):
            r.err = E_FLAGS
        elif addr & 0xFF01:
            r.err = E_ADDR
        elif r.read and rlen:
            r.err = E_READ_READABLE
        elif not r.read and wlen > 1:
            r.err = E_WRITE_WRITABLE
        else:
            n = wlen - 1 if r.read else rlen
            r.len = n
            if n > MAX_MSG_LEN:
                r.err = E_TOO_LONG
                return 0
            if n > INLINE:
                r.buf = <unsigned char *>malloc(n)
                if r.buf == NULL:
                    raise MemoryError()
            if r.read:
                memset(r.buf, 0, n)
            else:
                rd.copy_out(r.buf, n)
            r.addr = addr >> 1
            r.ok = 1
        return 0

    cdef str _error_text(self, Req *r, uint32_t slot):
        cdef int e = r.err
        if e == E_CHAIN:
            return self.errtext.get(slot, "bad chain")
        if e == E_SHORT_HDR:
            return f"out_hdr is {r.rlen} device-readable bytes, needs 8"
        if e == E_NO_STATUS:
            return "no device-writable byte for in_hdr.status"
        if e == E_FLAGS:
            return f"reserved flags bits {r.raw_flags & ~(<uint32_t>KNOWN_FLAGS):#x} set"
        if e == E_ADDR:
            return f"addr {r.raw_addr:#06x} is not a 7-bit address (10-bit addresses are not supported)"
        if e == E_READ_READABLE:
            return f"read request with {r.rlen} device-readable bytes after out_hdr"
        if e == E_WRITE_WRITABLE:
            return f"write request with {r.wlen - 1} device-writable bytes before in_hdr.status"
        return f"buffer of {r.len} bytes is beyond {MAX_MSG_LEN}"

    # -- groups --------------------------------------------------------------------------
    cdef int _plan(self, uint32_t start, uint32_t n) except -2:
        """The port index of a complete group, or -1: it fails before the bus."""
        cdef uint32_t k, slot
        cdef Req *r
        cdef int port = -1, here
        for k in range(n):
            slot = (start + k) % self.cap
            r = &self.reqs[slot]
            if not r.ok:
                dev = self.device
                dev._ratelimit.log(log, logging.WARNING, self.index, "%s q%d: request failed: %s",
                                   dev.name, self.index, self._error_text(r, slot))
                return -1
            here = self.slot_port[r.addr]
            if here < 0:
                log.debug("i2c q%d: no device at address %#04x", self.index, r.addr)
                return -1
            if port < 0:
                port = here
            elif here != port:
                dev = self.device
                dev._ratelimit.log(log, logging.WARNING, self.index,
                                   "%s q%d: group spans adapters %s and %s: failed", dev.name, self.index,
                                   self.ports[port], self.ports[here])
                return -1
        return port

    cdef int _add(self, DescriptorChain ch) except -1:
        cdef uint32_t slot = (self.r_first + self.r_count) % self.cap
        cdef Req *r = &self.reqs[slot]
        cdef uint32_t need, start
        self._parse(r, slot, ch)
        self.r_count += 1
        self.open_len += 1
        if r.fail_next:
            self.open_entries += r.entries
            need = 1 if r.entries == 1 else 2
            if self.open_entries + need <= self.queue._size:
                return 0
            log.debug("i2c q%d: group of %d fills the ring: run as it is", self.index, self.open_len)
        start = (self.r_first + self.r_count - self.open_len) % self.cap
        slot = (self.g_first + self.g_count) % self.cap
        self.g_len[slot] = self.open_len
        self.g_port[slot] = self._plan(start, self.open_len)
        self.g_count += 1
        self.open_len = 0
        self.open_entries = 0
        return 0

    # -- answering -------------------------------------------------------------------------
    cdef uint32_t _status(self, Req *r, uint32_t slot, bint ok) except? 0xFFFFFFFF:
        """Write a request's status (and its data when a read succeeded); its used length."""
        cdef Writer w
        cdef unsigned char st
        if not r.has_writer or r.wlen < 1:
            self.failed += 1
            return 0
        w = <Writer>self.writers[slot]
        if ok and r.ok:
            st = 0
            if r.read:
                w.copy_in(r.buf, r.len)
            w.copy_in(&st, 1)
            return r.wlen
        self.failed += 1
        st = 1
        if r.wlen > 1:
            w._advance(r.wlen - 1)
        w.copy_in(&st, 1)
        return 1 if r.wlen == 1 else 0

    cdef int _answer_front(self, int done, int err) except -1:
        """Answer the group at the FIFO's front, ``done`` of its messages completed."""
        cdef uint32_t n = self.g_len[self.g_first]
        cdef uint32_t k, slot, used
        cdef unsigned long long served = 0, nbytes = 0
        cdef Req *r
        cdef Queue q = self.queue
        if err and err not in _NAK_ERRNOS:
            self._log_transfer_error(err)
        self.groups += 1
        for k in range(n):
            slot = self.r_first
            r = &self.reqs[slot]
            used = self._status(r, slot, <int>k < done)
            if r.buf != r.inline_buf and r.buf != NULL:
                free(r.buf)
            r.buf = NULL
            self.writers[slot] = None
            if r.err == E_CHAIN:
                self.errtext.pop(slot, None)
            self.r_first = (self.r_first + 1) % self.cap
            self.r_count -= 1
            try:
                q.add_used_c(r.head, used)
            except (QueueError, GuestMemoryError) as e:
                log.warning("i2c q%d: completion dropped: %s", self.index, e)
                continue
            served += 1
            nbytes += used
        self.g_first = (self.g_first + 1) % self.cap
        self.g_count -= 1
        if served:
            dev = self.device
            dev.chains_served += served
            dev.bytes_served += nbytes
        return 0

    cdef int _log_transfer_error(self, int err) except -1:
        dev = self.device
        dev._ratelimit.log(log, logging.WARNING, ("bus", self.index), "%s q%d: transfer failed: %s",
                           dev.name, self.index, _errno.errorcode.get(err, err))
        return 0

    cdef int log_pending(self) except -1:
        """Log the transfer error the nogil path kept (none: nothing)."""
        cdef int err = self.pending_errno
        if err:
            self.pending_errno = 0
            self._log_transfer_error(err)
        return 0

    # -- the path without the GIL (a ring worker's serve_nogil) ---------------------------
    cdef int _parse_nogil(self, Req *r, uint16_t head) noexcept nogil:
        """Parse the chain at ``head`` (below the queue size) into ``r`` as _parse
        would, for a request that can run: 0; 1 for anything else (a guest error,
        a chain over more than MAX_SEGS buffers a direction or over regions, no
        memory), which the GIL path parses and reports.  ``r.buf`` is set only on 0."""
        cdef ChainCursor c
        cdef vring_desc d
        cdef int rc, nr = 0, nd = 0
        cdef unsigned char *rptr[MAX_SEGS]
        cdef uint32_t rseg[MAX_SEGS]
        cdef unsigned char *p
        cdef unsigned char hdr[8]
        cdef uint32_t rlen = 0, wlen = 0, n, flags
        cdef uint16_t addr, entries
        desc_load(self.queue._desc + 16 * <size_t>head, &d)
        entries = 1 if d.flags & VRING_DESC_F_INDIRECT else 0
        chain_start(&c, self.queue._desc, self.queue._desc_gpa, self.queue._size, head)
        r.nw = 0
        while True:
            rc = chain_next(self.queue._snap, &c, &d)
            if rc == 0:
                break
            if rc < 0:
                return 1
            nd += 1
            if d.len == 0:
                continue
            if d.flags & VRING_DESC_F_WRITE:
                p = snap_ptr_w(self.queue._snap, d.addr, d.len)
                if p == NULL or r.nw == MAX_SEGS:
                    return 1
                r.wptr[r.nw] = p
                r.wseg[r.nw] = d.len
                r.nw += 1
                wlen += d.len
            else:
                p = snap_ptr(self.queue._snap, d.addr, d.len)
                if p == NULL or r.nw or nr == MAX_SEGS:
                    return 1    # (readable after writable: the GIL path's to judge)
                rptr[nr] = p
                rseg[nr] = d.len
                nr += 1
                rlen += d.len
        if rlen < 8 or wlen < 1:
            return 1
        _gather(rptr, rseg, nr, 0, hdr, 8)
        addr = <uint16_t>(hdr[0] | (<uint16_t>hdr[1] << 8))
        flags = hdr[4] | (<uint32_t>hdr[5] << 8) | (<uint32_t>hdr[6] << 16) | (<uint32_t>hdr[7] << 24)
        if flags & ~(<uint32_t>KNOWN_FLAGS) or addr & 0xFF01:
            return 1
        rlen -= 8
        r.read = (flags & FLAG_M_RD) != 0
        if (r.read and rlen) or (not r.read and wlen > 1):
            return 1
        n = wlen - 1 if r.read else rlen
        if n > MAX_MSG_LEN:
            return 1
        r.buf = r.inline_buf
        if n > INLINE:
            r.buf = <unsigned char *>malloc(n)
            if r.buf == NULL:
                return 1
        if r.read:
            memset(r.buf, 0, n)
        else:
            _gather(rptr, rseg, nr, 8, r.buf, n)
        r.head = head
        r.addr = addr >> 1
        r.entries = entries if entries else <uint16_t>(nd if nd < 0xFFFF else 0xFFFF)
        r.ok = 1
        r.fail_next = (flags & FLAG_FAIL_NEXT) != 0
        r.has_writer = 2
        r.err = E_NONE
        r.raw_addr = addr
        r.raw_flags = flags
        r.rlen = rlen
        r.len = n
        r.wlen = wlen
        return 0

    cdef void _scatter(self, Req *r, uint32_t off, const unsigned char *src, uint32_t n) noexcept nogil:
        """Copy ``n`` bytes into ``r``'s device-writable buffers from offset ``off``."""
        cdef uint32_t k, take
        for k in range(r.nw):
            if n == 0:
                return
            if off >= r.wseg[k]:
                off -= r.wseg[k]
                continue
            take = r.wseg[k] - off
            if take > n:
                take = n
            memcpy(r.wptr[k] + off, src, take)
            src += take
            n -= take
            off = 0

    cdef uint32_t _status_nogil(self, Req *r, bint ok) noexcept nogil:
        """_status for a request of the nogil parse."""
        cdef unsigned char st
        if ok:
            st = 0
            if r.read:
                self._scatter(r, 0, r.buf, r.len)
            self._scatter(r, r.wlen - 1, &st, 1)
            return r.wlen
        self.failed += 1
        st = 1
        self._scatter(r, r.wlen - 1, &st, 1)
        return 1 if r.wlen == 1 else 0

    cdef void _drop_nogil(self, uint32_t k) noexcept nogil:
        """Free the buffers of the first ``k`` requests the nogil path parsed."""
        cdef uint32_t i
        cdef Req *r
        for i in range(k):
            r = &self.reqs[(self.r_first + i) % self.cap]
            if r.buf != r.inline_buf and r.buf != NULL:
                free(r.buf)
            r.buf = NULL

    cdef int _notify_nogil(self, Signaller signaller) noexcept nogil:
        if signaller is not None and self.queue.needs_notification_nogil():
            signaller.signal_nogil()
        return 0

    cdef int serve_nogil_c(self, RingWorker worker, Signaller signaller) noexcept nogil:
        """A kick of ``worker``'s ring served without the GIL, as ``kick_c(True,
        worker)`` serves it, notifying through ``signaller``: 0 when
        served; 1 when the GIL path must go on (see the module docstring), after
        answering and notifying what was served.  Only with nothing held (no open
        group) and on a bus of one adapter."""
        cdef int n, python = 0, answered = 0, err
        cdef uint32_t k, i, entries, used, done
        cdef uint16_t head, size
        cdef Req *r
        cdef I2cJob *job = &self.job
        if (self.r_count or self.inflight or self.reqs == NULL or self.port0 is None
                or self.queue is None):
            return 1
        if self.queue.avail_count_nogil() < 0 or self.queue._desc == NULL:
            return 1
        size = self.queue._size
        while True:
            self.queue.disable_notification_nogil()
            while not worker._stopping:
                n = self.queue.avail_count_nogil()
                if n <= 0:
                    python = n < 0
                    break
                # One group, parsed where it is in the avail ring, taken only whole.
                k = 0
                entries = 0
                while True:
                    if k >= <uint32_t>n:
                        python = 1  # a group still open: the GIL path holds it
                        break
                    head = self.queue.avail_head_nogil(<uint16_t>k)
                    r = &self.reqs[(self.r_first + k) % self.cap]
                    if head >= size or self._parse_nogil(r, head):
                        python = 1
                        break
                    k += 1
                    if self.slot_port[r.addr] != 0:
                        python = 1  # no device there: the GIL path logs it
                        break
                    if not r.fail_next:
                        break
                    entries += r.entries
                    if entries + (1 if r.entries == 1 else 2) > size:
                        python = 1  # a group that fills the ring
                        break
                if python:
                    self._drop_nogil(k)
                    break
                self.queue.pop_heads_nogil(<uint16_t>k)
                for i in range(k):
                    r = &self.reqs[(self.r_first + i) % self.cap]
                    job.msgs[i].addr = r.addr
                    job.msgs[i].read = r.read
                    job.msgs[i].len = r.len
                    job.msgs[i].buf = r.buf
                job.group_len[0] = <int>k
                job.ngroups = 1
                self.jobs += 1
                self.port0.run_job(job)
                done = <uint32_t>job.group_done[0]
                err = job.group_errno[0]
                self.groups += 1
                for i in range(k):
                    r = &self.reqs[(self.r_first + i) % self.cap]
                    used = self._status_nogil(r, i < done)
                    if r.buf != r.inline_buf and r.buf != NULL:
                        free(r.buf)
                    r.buf = NULL
                    self.queue.add_used_nogil(r.head, used)
                    self.nogil_chains += 1
                    self.nogil_bytes += used
                answered = 1
                if err and err != ENXIO and err != EREMOTEIO and err != EIO:
                    self.pending_errno = err
                    python = 1  # the GIL path logs it
                    break
            if answered:
                # Before notifications are on again, as kick_c does.
                self._notify_nogil(signaller)
                answered = 0
            if python:
                return 1
            if worker._stopping:
                self.queue.enable_notification_nogil()
                return 0
            if not self.queue.enable_notification_nogil():
                return 0

    cdef int _pump(self, bint inline) except -1:
        """Answer or start the groups waiting, in order, up to a batch in a thread
        (``inline``: run every batch here, GIL released, as a ring worker does);
        1 if a chain was answered here."""
        cdef int answered = 0, port
        cdef uint32_t k, _j, slot, m
        cdef Req *r
        cdef I2cJob *job = &self.job
        cdef I2cDevPort dev_port
        while self.g_count and not self.inflight:
            port = self.g_port[self.g_first]
            if port < 0:
                self._answer_front(0, 0)
                answered = 1
                continue
            # The consecutive groups for this port: one batch.
            k = 0
            m = 0
            slot = self.r_first
            while k < self.g_count and self.g_port[(self.g_first + k) % self.cap] == port:
                job.group_len[k] = self.g_len[(self.g_first + k) % self.cap]
                for _j in range(<uint32_t>job.group_len[k]):
                    r = &self.reqs[slot]
                    job.msgs[m].addr = r.addr
                    job.msgs[m].read = r.read
                    job.msgs[m].len = r.len
                    job.msgs[m].buf = r.buf
                    m += 1
                    slot = (slot + 1) % self.cap
                k += 1
            job.ngroups = <int>k
            self.jobs += 1
            self.inflight = k
            if inline:
                dev_port = <I2cDevPort>self.ports[port]
                with nogil:
                    dev_port.run_job(job)
                self._complete()
                answered = 1
            else:
                (<I2cDevPort>self.ports[port]).submit(job)
        return answered

    cdef int _complete(self) except -1:
        """The batch in the thread is done: answer its groups."""
        cdef uint32_t k, n = self.inflight
        self.inflight = 0
        for k in range(n):
            self._answer_front(self.job.group_done[k], self.job.group_errno[k])
        return 0

    cdef int _notify(self) except -1:
        if self.interrupt is not None and self.queue.needs_notification_c():
            if self.signal is not None:
                self.signal()
            else:
                self.interrupt.signal_used(self.index)
        return 0

    # -- the loop's calls ----------------------------------------------------------------
    def kick(self):
        """Pop and parse every available chain, run or start what is complete.

        Raises:
            InvalidAvailRingIndex: the avail ring is broken (the queue is stopped).
            QueueError, GuestMemoryError: the ring itself is unusable.
        """
        self.kick_c(False)

    cdef int kick_c(self, bint inline, RingWorker worker=None) except -1:
        """:meth:`kick`; ``inline``: the batches run on this thread (a ring
        worker's, ``worker``), GIL released, instead of the adapter's thread.  A
        driver that adds requests as fast as they are answered keeps this loop
        going; once ``worker`` is being stopped it ends after the requests it
        popped (the rest stay available for the ring's next owner), so that
        ``stop()``, which waits for it, returns."""
        cdef Queue q = self.queue
        cdef uint16_t head
        cdef DescriptorChain ch
        cdef int answered
        cdef uint64_t value
        if q is None:
            raise RuntimeError("i2c engine kicked before it was bound to a queue")
        if self.inflight and inline:
            self._wait_batch()
        try:
            while True:
                q.disable_notification_c()
                while True:
                    if not q.pop_head(&head):
                        break
                    if head >= q._size:
                        self.device._log_guest_fault(self.index, InvalidDescriptorIndex(
                            f"head descriptor index {head} out of range (queue size {q._size})"))
                        continue
                    ch = make_chain(q._snap, q._memory, q._desc, q._desc_gpa, q._size, head)
                    self._add(ch)
                if inline and self.g_count:
                    # Answer and notify before notifications are enabled again (as
                    # upstream's vring worker does): a driver that sends its next
                    # request as soon as it sees this answer adds it while they are
                    # still off, without a kick, and the check below serves it.
                    if self._pump(True):
                        self._notify()
                if worker is not None and worker._stopping:
                    # Notifications back on, as the ring's next owner expects.
                    q.enable_notification_c()
                    break
                if not q.enable_notification_c():
                    break
        except InvalidAvailRingIndex:
            q.ready = False
            raise
        finally:
            answered = self._pump(inline)
            if self.inflight:
                # Let the adapter's thread run now if it shares our CPU: an adapter
                # that answers at once (i2c-stub, a fast controller) is then done
                # when the yield returns and its batch is answered here, without a
                # wake-up of the loop.  A transfer that sleeps (a real bus) does not
                # hold us: the yield returns as soon as the thread waits.
                with nogil:
                    sched_yield()
                if self.job.finished:
                    read(self.fd, &value, 8)
                    self._complete()
                    self._pump(False)
                    answered = 1
            if answered:
                self._notify()
        return 0

    cdef int _wait_batch(self) except -1:
        """Wait (GIL released) for the batch in the adapter's thread and answer it."""
        cdef pollfd p
        cdef uint64_t value
        p.fd = self.fd
        p.events = POLLIN
        while not self.job.finished:
            with nogil:
                poll(&p, 1, -1)
        read(self.fd, &value, 8)
        self._complete()
        return 0

    def on_done(self):
        """The loop saw the eventfd: answer the finished batch, start the next."""
        cdef uint64_t value
        read(self.fd, &value, 8)
        if self.queue is None or not self.inflight or not self.job.finished:
            return
        self._complete()
        self._pump(False)
        self._notify()

    def quiesce(self):
        """Finish the batch in the thread and answer it, give every other held chain
        back (they are the last popped: ``Queue.unpop``, the newest first, so the
        next pops return them in order, whether they came from the avail ring or
        were resubmitted after a reconnect); the count given back."""
        cdef uint32_t back, k
        cdef Queue q = self.queue
        if q is None:
            return 0
        if self.inflight:
            self._wait_batch()
            self._notify()
        back = self.r_count
        for k in range(back, 0, -1):
            q.unpop_c(self.reqs[(self.r_first + k - 1) % self.cap].head)
        self._drop_bufs()
        for k in range(self.cap):
            self.writers[k] = None
        self.errtext.clear()
        self.r_first = self.r_count = 0
        self.g_first = self.g_count = 0
        self.open_len = self.open_entries = 0
        return back
