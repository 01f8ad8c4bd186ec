# cython: language_level=3
"""The compiled request path of virtio-vsock (``virtio_devices.vsock``).

:class:`Conn` is a connection's state (the device's ``_Conn``) with C fields, which
both paths read and write.  Two loops serve the common packet shapes without a
Python call per packet and hand every other one to the device's Python:

* :func:`drain_tx` drains the tx queue (VIRTIO 1.2 §5.10.6.4).  A stream's
  ``CREDIT_UPDATE`` and ``RST`` are taken here, its ``RESPONSE`` to a
  host-initiated connection, its ``REQUEST`` to a Unix host (socket and connect in
  C, see :meth:`State.set_connect_prefix`), and so is an ``RW`` packet of an established
  stream to the host, within its buffers and the credit we gave (§5.10.6.3),
  whose host socket took everything so far: header parsed from the guest
  buffers, payload written to the host socket with one ``writev`` straight from
  them (consecutive packets of one connection in one ``writev``), credit counters
  updated, a ``CREDIT_UPDATE`` scheduled
  when the guest's view of our free space falls below half.  Every other packet
  goes through ``device.handle_chain`` under the device framework's error policy
  (``device._call``), exactly as the drain loop of ``VirtioDevice.process_chains``
  would send it.
* :func:`fill_rx` fills the rx queue with what the device owes the guest.  A
  connection whose next packet is stream data (no RST, REQUEST or RESPONSE
  pending, the guest has credit for it) gets its headers and payload here: one
  ``readv`` from the host socket straight into a run of rx buffers, after the
  room for each one's header (:func:`_rx_batch`), or into the one buffer of
  another shape; so do a REQUEST or RESPONSE, and a CREDIT_UPDATE or
  CREDIT_REQUEST when nothing else is pending.  Everything else (RST, SHUTDOWN,
  seqpacket records, a sibling's packets) is ``device._produce(writer)``.

After a pass over tx that took stream data, :func:`drain_tx` may nap (a few
microseconds, cut short by any work of the loop) and drain again before it asks
the driver to kick again: the tx nap, see there.

The vhost-user loop runs both inside its compiled poll: a kick of rx or tx through
:class:`KickPump`, a readable host socket through the connection's
:class:`InputPump`.  Both pumps also have a nogil path, which the loop runs right
after its wait with the GIL released (virtio_devices._pump's rule), for the steady
state of a host-to-guest stream (:func:`_fill_rx_nogil`, :func:`_drain_tx_nogil`,
:func:`_input_nogil`) and of a guest-to-host one (its RW packets and the tx nap in
:func:`_drain_tx_nogil`, the CREDIT_UPDATEs they owe in :func:`_credit_only_nogil`):
what they may rely on is settled by every pass with the GIL at its end
(:class:`State`), and whatever else comes is handed to that pass (a packet the
host socket took in part too: :func:`_unpart`).
A batch's ``readv``/``writev`` of 32 KiB or more releases the GIL; smaller socket
calls keep it (see :func:`_sock_io`).  Both paths keep the
Python path's order and state changes; the unit tests run the same packets
through both and compare.
"""

cimport cython
from cpython.dict cimport PyDict_GetItem
from cpython.ref cimport PyObject
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdio cimport snprintf
from libc.string cimport memcpy, memset
from posix.time cimport timespec
from posix.uio cimport iovec, readv, writev

from virtio_queue._linux cimport pollfd, poll, ppoll, POLLIN, POLLHUP
from virtio_queue.chain cimport (ChainCursor, DescriptorChain, Reader, Writer, _Stream, chain_next,
                                 chain_start, make_chain, make_reader, make_writer)
from virtio_queue.includes.virtio_ring cimport VRING_DESC_F_WRITE, vring_desc
from virtio_queue.memory cimport snap_ptr, snap_ptr_w
from virtio_queue.includes.endian cimport htole16, htole32, htole64, le16toh, le32toh, le64toh
from virtio_queue.queue cimport Queue
from virtio_devices._pump cimport FdPump, Signaller

import os
import _socket as _socket_c
import socket as _socket_mod
from collections import deque as _deque

# The socket object of a connection the compiled path makes, as UnixHost.connect's.
_socket_cls = _socket_mod.socket
_AF_UNIX = int(_socket_mod.AF_UNIX)
_SOCK_STREAM_NB = int(_socket_mod.SOCK_STREAM | _socket_mod.SOCK_NONBLOCK | _socket_mod.SOCK_CLOEXEC)
# The C close of a socket object (socket.socket.close without its Python frames:
# a connection's socket is never shared with a file object of makefile()).
_sock_close = _socket_c.socket.close

from virtio_queue.errors import GuestMemoryError, InvalidAvailRingIndex, InvalidDescriptorIndex, QueueError

from .errors import DeviceNeedsReset

# §5.10.6: the header, its types and ops; the pending rx operations of a
# connection (the Python module's constants and _P_* bits); the queues.
cdef enum:
    HDR_SIZE = 44
    HOST_CID = 2
    TYPE_STREAM = 1
    TYPE_SEQPACKET = 2
    OP_REQUEST = 1
    OP_RESPONSE = 2
    OP_RST = 3
    OP_SHUTDOWN = 4
    OP_RW = 5
    OP_CREDIT_UPDATE = 6
    OP_CREDIT_REQUEST = 7
    SHUTDOWN_RCV = 1
    SHUTDOWN_SEND = 2
    SHUTDOWN_BOTH = 3
    # The guest's SHUTDOWN SEND shut our writing side (the device's host_shut bit).
    HOST_SHUT_BY_US = 0x100
    P_RST = 1
    P_REQUEST = 2
    P_RESPONSE = 4
    P_SHUTDOWN = 8
    P_CREDIT_UPDATE = 16
    P_CREDIT_REQUEST = 32
    P_BEFORE_DATA = P_RST | P_REQUEST | P_RESPONSE
    P_CREDIT = P_CREDIT_UPDATE | P_CREDIT_REQUEST
    RX = 0
    TX = 1
    # RW packets of one connection gathered into one writev (see _Batch).
    BATCH_MAX = 32
    BATCH_IOV = 128
    # Socket I/O of at least this many bytes releases the GIL (see _sock_io).
    NOGIL_IO_MIN = 262144
    # Stream data for up to this many rx buffers in one readv (see _rx_batch), and
    # from how many bytes that readv (and a tx batch's writev) releases the GIL.
    RX_BATCH = 64
    NOGIL_BATCH_MIN = 32768
    # The tx nap (see drain_tx): a pass that took at least NAP_MIN stream RW
    # packets (and less than half the credit we give) naps; at most NAP_MAX naps
    # per drain, so that the loop's timers wait for no more than that.
    NAP_MIN = 1
    NAP_MAX = 32
    NAP_BACKOFF_MAX = 64
    # Connections the nogil paths can look up (see State.cand).
    NCAND = 16
    # The most payload buffers of a guest -> host RW packet the nogil path writes
    # (see _rw_add_nogil).
    RW_IOV = 16


@cython.final
cdef inline int64_t _credit_left(uint32_t tx_cnt, uint32_t buf_alloc, uint32_t fwd_cnt) noexcept nogil:
    """Bytes the guest can take (§5.10.6.3): its ``buf_alloc`` less what was sent
    and it has not forwarded yet (``tx_cnt - fwd_cnt``, modulo 2**32); 0 at least."""
    cdef int64_t free = <int64_t>buf_alloc - <uint32_t>(tx_cnt - fwd_cnt)
    return free if free > 0 else 0


cdef class Conn:
    """One connection (§5.10.6.5): its host socket, credit counters and pending rx
    work.  Counters are u32, as on the wire (§5.10.6.3: all modulo 2^32)."""

    cdef public tuple key
    # key's two ports as C fields (the nogil paths read them).
    cdef readonly uint32_t lport
    cdef readonly uint32_t pport
    cdef public object sock
    cdef public int fd
    cdef public bint seq
    cdef public bint est          # RESPONSE exchanged
    cdef public bint dead
    cdef public int ops           # pending rx operations (_P_* bits)
    cdef public bint in_ready     # in the device's ready queue
    cdef public bint armed        # host socket watched for input
    # Not watched, but still registered with the loop, its wake-ups muted by the
    # nogil path (FdPump.mute_nogil): armed again by add_reader, forgotten by
    # remove_reader (which dropping it must call).
    cdef public bint muted
    # The pump whose wake-ups are muted (borrowed: the loop keeps it while it is
    # registered, which it is while ``muted``; meaningful only then).
    cdef PyObject *mpump
    cdef public bint readable     # host socket has input waiting for rx buffers
    cdef public bint host_eof
    cdef public bint want_write
    cdef public bint connecting   # the host's connect is in progress
    cdef public bint local_alloc  # the local port came from the allocator
    cdef public bint ok_reply     # hybrid: write "OK <port>" on RESPONSE
    cdef public bint credit_asked
    # Guest -> host: rx_cnt counts payload received, fwd_cnt payload written to the
    # host socket, last_fwd_sent the fwd_cnt the guest last heard.  Host -> guest:
    # tx_cnt counts payload sent; the guest's buf_alloc and fwd_cnt as it last said.
    cdef public uint32_t rx_cnt
    cdef public uint32_t fwd_cnt
    cdef public uint32_t last_fwd_sent
    cdef public uint32_t tx_cnt
    cdef public uint32_t peer_buf_alloc
    cdef public uint32_t peer_fwd_cnt
    cdef public int guest_shut
    cdef public int host_shut
    cdef public bytearray txbuf
    cdef public bytearray seq_msg   # guest message being assembled (seqpacket)
    cdef public object seq_out      # deque of host-bound messages (seqpacket)
    cdef public object seq_in       # host record being sent to the guest, or None

    def __init__(self, tuple key not None, sock, bint seq):
        self.key = key
        self.lport = key[0]
        self.pport = key[1]
        self.sock = sock
        self.fd = sock.fileno()
        self.seq = seq
        self.txbuf = bytearray()
        self.seq_msg = bytearray()
        self.seq_out = _deque()
        self.seq_in = None

    cpdef long peer_free(self):
        """Bytes the guest can take now: its buf_alloc minus what it has not forwarded."""
        return _credit_left(self.tx_cnt, self.peer_buf_alloc, self.peer_fwd_cnt)

    cpdef long pending_tx(self):
        """Guest payload received and not yet written to the host socket."""
        return <uint32_t>(self.rx_cnt - self.fwd_cnt)


@cython.final
cdef class _Batch:
    """Consecutive RW packets of one connection in one tx drain, written to its host
    socket with one ``writev`` (one system call and one wake-up of the host program
    instead of one per packet).  Their chains are completed once the bytes are out
    (or buffered); the packets' credit was counted as each was taken."""

    cdef Conn conn
    cdef list readers
    cdef uint16_t heads[BATCH_MAX]
    cdef uint32_t lens[BATCH_MAX]
    cdef int n
    cdef iovec iov[BATCH_IOV]
    cdef int niov
    cdef size_t total

    def __cinit__(self):
        self.readers = []


cdef bint _batch_add(_Batch b, Conn conn, Reader r, uint16_t head, uint32_t length):
    """Take the packet (its ``length`` payload bytes after the header) into the
    batch of ``conn``; False if its buffers do not fit the batch's iovecs."""
    cdef size_t got = 0
    cdef int k = 0
    if length:
        k = r._iov(&b.iov[b.niov], BATCH_IOV - b.niov, length, &got)
        if got < length:
            return False
    b.niov += k
    b.conn = conn
    b.readers.append(r)
    b.heads[b.n] = head
    b.lens[b.n] = length
    b.n += 1
    b.total += length
    return True


cdef int _batch_flush(object device, _Batch b, Queue queue, uint32_t buf_alloc, object ready,
                      Py_ssize_t *served) except -1:
    """Write the batch to its connection's host socket, buffer what the socket did not
    take (in order), count what went out (the device's ``_forwarded``), and complete
    the batch's chains."""
    cdef Conn conn = b.conn
    cdef ssize_t r
    cdef size_t wrote = 0, rem
    cdef int i, err = 0
    cdef Reader rd
    if b.n == 0:
        return 0
    try:
        if b.total:
            while True:
                if b.total >= NOGIL_BATCH_MIN:
                    with nogil:
                        r = writev(conn.fd, b.iov, b.niov)
                else:
                    r = writev(conn.fd, b.iov, b.niov)
                if r < 0 and errno == EINTR:
                    continue
                break
            if r < 0:
                if errno != EAGAIN:
                    err = errno
            else:
                wrote = <size_t>r
        if err:
            device._host_broke(conn, OSError(err, os.strerror(err)))
        else:
            if wrote < b.total:
                # A full host socket: the rest waits in the connection's buffer.
                rem = wrote
                for i in range(b.n):
                    if rem >= b.lens[i]:
                        rem -= b.lens[i]
                        continue
                    rd = <Reader>b.readers[i]
                    rd._advance(rem)
                    device._tx_buffer(conn, rd, b.lens[i] - rem)
                    rem = 0
            _forwarded(conn, <uint32_t>wrote, buf_alloc, ready)
            if (conn.credit_asked or (conn.readable and not conn.in_ready)
                    or (not conn.armed and not conn.readable)):
                # The guest's credit in these packets may let host data flow again.
                _credit_changed(device, conn, ready)
        for i in range(b.n):
            queue.add_used_c(b.heads[i], 0)
        served[0] += b.n
    finally:
        b.n = 0
        b.niov = 0
        b.total = 0
        b.conn = None
        b.readers.clear()
    return 0


@cython.final
cdef class State:
    """What the compiled paths read of one device, as C fields: its connection
    table and rx work queues (the device's own objects, shared) and its constants;
    ``compiled`` and ``rx_live`` are the device's ``_compiled`` and ``_rx_live``."""

    cdef public bint compiled
    cdef public bint rx_live
    cdef dict conns
    cdef object ready
    cdef object loose
    cdef uint64_t guest_cid
    cdef uint32_t buf_alloc
    cdef _Batch batch
    # The transport's compiled signallers of rx and tx, and the interrupt they are of.
    cdef object sig_owner
    cdef object sig_rx
    cdef object sig_tx
    # The device's connections by host fd; the path of the host ends of guest
    # connections up to the port number (``<uds_path>_``), or None: the host is
    # not one whose connect the compiled path makes (see set_connect_prefix).
    cdef dict by_fd
    cdef bytes connect_prefix
    # The tx nap (see drain_tx): a fd readable whenever the device's loop has an fd
    # ready (its epoll fd; -1: no nap), how long one nap lasts (0: no nap), and
    # the naps that ran their length / were cut short by the loop's work.
    cdef public int wait_fd
    cdef public long long nap_ns
    cdef readonly unsigned long long naps
    cdef readonly unsigned long long naps_cut
    # A first nap that found no data makes the next nap_skip drains that could nap
    # not nap; nap_backoff doubles at each such nap (up to NAP_BACKOFF_MAX) and is 0
    # again once a nap finds two packets or more: a guest slower than a nap costs
    # few wake-ups.
    cdef readonly int nap_skip
    cdef readonly int nap_backoff
    # The nogil paths (KickPump.pump_nogil, see there).  ``nogil``: offer them at
    # all.  What they may rely on, set by _settle at the end of every pass with the
    # GIL (which clears ``live`` first) and cleared by the device's lifecycle
    # (activate, reset, quiesce, broken) and by every change of the Python path to
    # the ready queue or the loose packets (touch): ``live``, the device is
    # active, not broken, compiled, rx is its own and both rings signal through
    # compiled signallers; ``tx_live``, tx is its own too; ``idle``, nothing is
    # owed to rx; ``head_ok``, the ready queue is ``head`` alone, no loose packet.
    cdef public bint nogil
    cdef public bint live
    cdef bint tx_live
    cdef readonly bint idle
    cdef readonly bint head_ok
    cdef Conn head
    # A connection a nogil path put in the ready queue, which was empty (borrowed:
    # the device's tables keep it; every pass with the GIL, and dropping it, puts
    # it in the deque first, see _unpend), so that the ready queue is this one.
    cdef PyObject *pend
    # The device's connections as the last pass with the GIL saw them (when at most
    # NCAND): borrowed from cand_refs, which keeps them alive; the nogil paths look
    # a packet's connection up here (a dead one is no match).
    cdef PyObject *cand[NCAND]
    cdef int ncand
    # A nogil path looked for a connection not in the table: the next pass with the
    # GIL takes the table afresh (only then, or when one in it died: connections
    # that come and go cost no rebuild per pass).
    cdef bint cand_miss
    cdef list cand_refs
    cdef Queue rxq
    cdef Queue txq
    cdef Signaller sig_rx_c
    cdef Signaller sig_tx_c
    # A used notification the nogil path could not decide (the rings not current):
    # the next pass with the GIL sends it if the driver wants it.
    cdef bint owed_rx
    cdef bint owed_tx
    # Chains the nogil paths completed (the device's compiled_served); their passes,
    # and those that handed over to the GIL.
    cdef readonly unsigned long long nogil_chains
    # Chains the compiled paths with the GIL completed (the rest of compiled_served:
    # counted here, not through the device's chains_served property per pass).
    cdef readonly unsigned long long chains
    cdef readonly unsigned long long nogil_passes
    cdef readonly unsigned long long nogil_handed
    # The device (its _tx_buffer): set by it, for _unpart.
    cdef public object owner
    # A guest -> host RW packet whose payload the host socket took only in part
    # without the GIL (_tx_rw_nogil): its chain (popped, not used yet), the bytes
    # the socket took, the payload's length and its connection (borrowed: the
    # connection table of the last pass with the GIL, cand_refs, keeps it alive
    # until _unpart, which every pass with the GIL runs first).  See _unpart.
    cdef readonly bint part
    cdef uint16_t part_head
    cdef uint32_t part_off
    cdef uint32_t part_len
    cdef PyObject *part_conn

    def __init__(self, dict conns not None, ready, loose, uint64_t guest_cid, uint32_t buf_alloc,
                 dict by_fd=None):
        self.by_fd = by_fd if by_fd is not None else {}
        self.connect_prefix = None
        self.wait_fd = -1
        self.nap_ns = 0
        self.batch = _Batch()
        self.nogil = True
        self.compiled = True
        self.rx_live = False
        self.conns = conns
        self.ready = ready
        self.loose = loose
        self.guest_cid = guest_cid
        self.buf_alloc = buf_alloc

    def unpend(self):
        """Put the connection a nogil path scheduled in the ready queue itself (the
        Python path's changes to a connection or to the ready queue come after)."""
        _unpend(self)

    def touch(self):
        """The Python path changed the ready queue or the loose packets: the nogil
        paths hand over until the next pass with the GIL looks again."""
        self.idle = False
        self.head_ok = False

    def set_connect_prefix(self, prefix):
        """Make a guest's stream REQUEST's Unix connect in compiled code, to
        ``prefix`` followed by the port in decimal (hybrid vsock's
        ``<uds_path>_<port>``, as ``UnixHost.connect``); None: every REQUEST goes
        through the device's Python.  An abstract-namespace prefix (a NUL first)
        is refused: its length rules differ."""
        if prefix is not None:
            prefix = bytes(prefix)
            if not prefix or prefix[0] == 0 or b"\0" in prefix:
                raise ValueError(f"connect prefix must be a non-empty filesystem path, not {prefix!r}")
        self.connect_prefix = prefix


cdef inline size_t _sock_io(_Stream s, int fd, size_t n, bint reading) except? 0:
    """Move up to ``n`` bytes between the buffers of ``s`` and the non-blocking
    socket ``fd``, as ``Writer.read_from_fd``/``Reader.write_to_fd`` do, with the
    GIL held below ``NOGIL_IO_MIN`` bytes: a non-blocking socket never waits, so the
    call lasts as long as its copy, and a thread that gives the GIL up for a short
    copy may wait far longer to get it back while another VM's thread runs Python
    (one switch interval), which is what one process serving many VMs must avoid.

    Raises:
        OSError: the system call failed before moving anything.
    """
    return s._fd_io(fd, <Py_ssize_t>n, -1, reading, None, 0, NOGIL_IO_MIN)


cdef inline uint32_t _u32(const unsigned char *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return le32toh(v)


cdef inline uint16_t _u16(const unsigned char *p) noexcept nogil:
    cdef uint16_t v
    memcpy(&v, p, 2)
    return le16toh(v)


cdef inline uint64_t _u64(const unsigned char *p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return le64toh(v)


cdef int _notify(object device, State st, Queue queue, int index) except -1:
    """Signal the driver for queue ``index`` if it asked for it, EVENT_IDX aware
    (``VirtioDevice.notify``), through the transport's compiled signaller of the
    queue when it has one (``Interrupt.signaller``: no Python frame)."""
    interrupt = device.interrupt
    if interrupt is None or not queue.needs_notification_c():
        return 0
    if interrupt is not st.sig_owner:
        _signallers(st, interrupt)
    sig = st.sig_rx if index == RX else st.sig_tx
    if type(sig) is Signaller:
        (<Signaller>sig).signal_nogil()
    elif sig is not None:
        sig()
    else:
        interrupt.signal_used(index)
    return 0


cdef int _signallers(State st, object interrupt) except -1:
    """Take the compiled signallers of rx and tx from ``interrupt``
    (``Interrupt.signaller``), None where it has none."""
    signaller = getattr(interrupt, "signaller", None)
    st.sig_rx = signaller(RX) if signaller is not None else None
    st.sig_tx = signaller(TX) if signaller is not None else None
    st.sig_owner = interrupt
    return 0


cdef int _unpend(State st) except -1:
    """The connection a nogil path scheduled (``st.pend``) into the ready queue, first
    (it was empty then; the Python path's appends came after), where the paths
    with the GIL find it; a dropped one just leaves."""
    cdef Conn conn
    if st.pend != NULL:
        conn = <Conn>st.pend
        st.pend = NULL
        st.head_ok = False
        if conn.dead:
            conn.in_ready = False
        else:
            st.ready.appendleft(conn)
    if st.part:
        _unpart(st)
    return 0


cdef int _unpart(State st) except -1:
    """The RW packet a nogil pass wrote in part (``st.part``, see
    :func:`_tx_rw_nogil`), finished as the tx drain with the GIL finishes one whose
    payload the host socket took in part: the whole payload counted received, the
    bytes the socket took forwarded, the rest kept in the connection's buffer
    until the socket is writable (``_tx_buffer``), and the chain used.  So no
    byte is lost or sent twice.  A connection dropped meanwhile takes no bytes;
    the chain is used all the same."""
    cdef Conn conn = <Conn>st.part_conn
    cdef Queue queue = st.txq
    cdef DescriptorChain chain
    cdef Reader r
    device = st.owner
    st.part = False
    st.part_conn = NULL
    conn.rx_cnt += st.part_len
    if not conn.dead:
        chain = make_chain(queue._snap, queue._memory, queue._desc, queue._desc_gpa, queue._size,
                           st.part_head)
        r = make_reader(chain)
        r._advance(HDR_SIZE + st.part_off)
        device._tx_buffer(conn, r, st.part_len - st.part_off)
        _forwarded(conn, st.part_off, st.buf_alloc, st.ready)
    queue.add_used_c(st.part_head, 0)
    st.chains += 1
    _notify(device, st, queue, TX)
    return 0


cdef int _settle(object device, State st) except -1:
    """The end of a pass with the GIL: what the nogil paths may rely on until the
    next one (see State)."""
    st.live = False
    st.idle = False
    st.head_ok = False
    st.head = None
    # (device._broken: the broken property's field, read without its Python frame.)
    if not (st.nogil and st.compiled and st.rx_live) or device._broken is not None or not device.active:
        return 0
    interrupt = device.interrupt
    if interrupt is None:
        return 0
    if interrupt is not st.sig_owner:
        _signallers(st, interrupt)
    if not isinstance(st.sig_rx, Signaller) or not isinstance(st.sig_tx, Signaller):
        return 0
    st.sig_rx_c = <Signaller>st.sig_rx
    st.sig_tx_c = <Signaller>st.sig_tx
    queues = device.queues
    st.rxq = <Queue?>queues[RX]
    st.txq = <Queue?>queues[TX]
    st.tx_live = not device._quiesced[TX]
    ready = st.ready
    if not st.loose:
        if not ready:
            st.idle = True
        elif len(ready) == 1:
            st.head = <Conn?>ready[0]
            st.head_ok = True
    if st.cand_miss or _cand_dead(st):
        _cands(st)
    st.live = True
    return 0


cdef bint _cand_dead(State st) noexcept:
    cdef int i
    for i in range(st.ncand):
        if (<Conn>st.cand[i]).dead:
            return True
    return False


cdef int _cands(State st) except -1:
    """Take the device's connections into ``st.cand`` (none beyond NCAND)."""
    cdef int i = 0
    cdef Py_ssize_t n = len(st.conns)
    if st.part:
        _unpart(st)  # (its connection is one of cand_refs)
    st.ncand = 0
    st.cand_refs = None
    st.cand_miss = False
    if n == 0 or n > NCAND:
        return 0
    refs = list(st.conns.values())
    for c in refs:
        st.cand[i] = <PyObject *>(<Conn?>c)
        i += 1
    st.cand_refs = refs
    st.ncand = i
    return 0


cdef inline int _schedule(Conn conn, object ready) except -1:
    if not conn.in_ready and not conn.dead:
        conn.in_ready = True
        ready.append(conn)
    return 0


cdef inline int64_t _free(Conn c) noexcept nogil:
    """``Conn.peer_free`` for compiled callers (also without the GIL)."""
    return _credit_left(c.tx_cnt, c.peer_buf_alloc, c.peer_fwd_cnt)


cdef inline bint _wants_input(Conn c) noexcept nogil:
    """Whether the host socket is to be watched for input: the guest can take some
    (the device's ``_watch_input`` decides the same)."""
    return _wants_input_with(c, _free(c))


cdef inline bint _wants_input_with(Conn c, int64_t free) noexcept nogil:
    """:func:`_wants_input` were the guest's credit ``free``."""
    return (c.est and not c.dead and not c.readable and not c.host_eof
            and not c.guest_shut & SHUTDOWN_RCV and free > 0)


cdef inline int _forwarded(Conn conn, uint32_t wrote, uint32_t buf_alloc, object ready) except -1:
    """``wrote`` more guest bytes reached the host (``VsockDevice._forwarded``): a
    CREDIT_UPDATE is owed when the guest's view of our free space falls below half
    (§5.10.6.3)."""
    conn.fwd_cnt += wrote
    if conn.fwd_cnt != conn.last_fwd_sent and (
            <int64_t>buf_alloc - <uint32_t>(conn.rx_cnt - conn.last_fwd_sent)
            < <int64_t>(buf_alloc // 2) + 1):
        conn.ops |= P_CREDIT_UPDATE
        _schedule(conn, ready)
    return 0


cdef int _credit_changed(object device, Conn conn, object ready) except -1:
    """The guest's credit in its last packet may let host data flow again (the
    device's ``_credit_changed``; the loop is asked only when the watch changes)."""
    if conn.peer_free() > 0:
        conn.credit_asked = False
    if _wants_input(conn) != conn.armed:
        device._watch_input(conn)
    if conn.readable and conn.peer_free() > 0:
        _schedule(conn, ready)
    return 0


cdef inline void _hdr_at(unsigned char *hdr, Conn conn, uint16_t op, uint32_t length,
                         uint64_t guest_cid, uint32_t buf_alloc, uint32_t fwd_cnt,
                         uint32_t flags=0) noexcept nogil:
    """Our header for ``conn`` (§5.10.6) into the 44 bytes at ``hdr``."""
    cdef uint64_t v64
    cdef uint32_t v32
    cdef uint16_t v16
    v64 = htole64(HOST_CID)
    memcpy(hdr, &v64, 8)
    v64 = htole64(guest_cid)
    memcpy(hdr + 8, &v64, 8)
    v32 = htole32(conn.lport)
    memcpy(hdr + 16, &v32, 4)
    v32 = htole32(conn.pport)
    memcpy(hdr + 20, &v32, 4)
    v32 = htole32(length)
    memcpy(hdr + 24, &v32, 4)
    v16 = htole16(TYPE_SEQPACKET if conn.seq else TYPE_STREAM)
    memcpy(hdr + 28, &v16, 2)
    v16 = htole16(op)
    memcpy(hdr + 30, &v16, 2)
    v32 = htole32(flags)
    memcpy(hdr + 32, &v32, 4)
    v32 = htole32(buf_alloc)
    memcpy(hdr + 36, &v32, 4)
    v32 = htole32(fwd_cnt)
    memcpy(hdr + 40, &v32, 4)


cdef int _put_hdr(Writer w, Conn conn, uint16_t op, uint32_t length, uint64_t guest_cid,
                  uint32_t buf_alloc, uint32_t flags=0) except -1:
    """Our header for ``conn`` (§5.10.6) into the first 44 bytes of ``w``; it carries
    our credit, so no CREDIT_UPDATE is owed after it (the device's ``_header``)."""
    cdef unsigned char hdr[HDR_SIZE]
    _hdr_at(hdr, conn, op, length, guest_cid, buf_alloc, conn.fwd_cnt, flags)
    w.copy_in(hdr, HDR_SIZE)
    conn.last_fwd_sent = conn.fwd_cnt
    conn.ops &= ~P_CREDIT_UPDATE
    return 0


cdef int _tx_rw(object device, Conn conn, Reader r, uint32_t n, uint32_t buf_alloc,
                object ready) except -1:
    """``n`` payload bytes of an open stream, within credit: to the host socket
    (the device's ``_guest_stream_data`` for a connection with nothing buffered)."""
    cdef size_t wrote = 0
    conn.rx_cnt += n
    if n:
        try:
            wrote = _sock_io(r, conn.fd, n, False)
        except OSError as e:
            device._host_broke(conn, e)
            return 0
    if wrote < n:
        # A full host socket: the rest waits in the connection's buffer.
        device._tx_buffer(conn, r, n - wrote)
    _forwarded(conn, <uint32_t>wrote, buf_alloc, ready)
    if conn.credit_asked or (conn.readable and not conn.in_ready) or (not conn.armed and not conn.readable):
        # The guest's credit in this packet may let host data flow again.
        _credit_changed(device, conn, ready)
    return 0


cdef bint _connect_unix(State st, int fd, uint32_t port) except -1:
    """Connect the non-blocking stream socket ``fd`` to ``connect_prefix`` +
    ``port`` (``UnixHost.connect``: a Unix connect completes at once or fails);
    False when it was not made (the path is too long, connect failed: the caller
    hands the packet to the Python path, which meets the same condition, logs it
    and answers RST)."""
    cdef sockaddr_un addr
    cdef bytes prefix = st.connect_prefix
    cdef Py_ssize_t plen = len(prefix)
    cdef char digits[16]
    cdef int n = snprintf(digits, 16, "%u", port)
    cdef socklen_t alen
    if n <= 0 or plen + n >= <Py_ssize_t>sizeof(addr.sun_path):
        return False
    memset(&addr, 0, sizeof(addr))
    addr.sun_family = AF_UNIX
    memcpy(addr.sun_path, <const char *>prefix, plen)
    memcpy(addr.sun_path + plen, digits, n)
    alen = <socklen_t>(<size_t>(&addr.sun_path[0] - <char *>&addr) + plen + n)
    return connect(fd, <sockaddr *>&addr, alen) == 0


cdef bint _guest_connect(object device, State st, uint32_t dst_port, uint32_t src_port,
                         const unsigned char *hdr) except -1:
    """A guest's stream REQUEST to host port ``dst_port`` (§5.10.6.5) for no open
    connection, to a Unix host: connect, the connection in the tables with the
    guest's credit, RESPONSE owed, the host socket watched (the device's
    ``_guest_connect`` and ``_established``).  False when the connect was not
    made: the packet goes to the Python path."""
    cdef Conn conn
    # The socket object makes the socket itself (one made from an fd costs a
    # getsockname to validate it).
    sock = _socket_cls(_AF_UNIX, _SOCK_STREAM_NB)
    if not _connect_unix(st, sock.fileno(), dst_port):
        _sock_close(sock)
        return False
    conn = Conn((dst_port, src_port), sock, False)
    st.conns[conn.key] = conn
    st.by_fd[conn.fd] = conn
    # Every packet carries the sender's credit (§5.10.6.3).
    conn.peer_buf_alloc = _u32(hdr + 36)
    conn.peer_fwd_cnt = _u32(hdr + 40)
    conn.ops |= P_RESPONSE
    _schedule(conn, st.ready)
    conn.est = True
    if _wants_input(conn):
        _arm_input(device, conn)
    return True


cdef int _established(object device, Conn conn, object ready) except -1:
    """The guest's RESPONSE to our REQUEST (the device's ``_established`` and what
    ``_on_packet`` does after it): the connection is open; a hybrid host client
    gets its ``OK <host port>`` line (a fresh socket's buffer always takes it; if
    not, the connection is reset); the host socket is watched."""
    cdef char line[32]
    cdef int n
    cdef ssize_t sent
    conn.est = True
    if conn.ok_reply:
        conn.ok_reply = False
        n = snprintf(line, 32, "OK %u\n", <unsigned int><uint32_t>conn.key[0])
        sent = send(conn.fd, line, n, MSG_NOSIGNAL | MSG_DONTWAIT)
        if sent != n:
            device._reset(conn)
    if conn.dead:
        return 0
    # Every packet carries the sender's credit (§5.10.6.3): as the device's tail.
    if conn.peer_free() > 0:
        conn.credit_asked = False
    if _wants_input(conn) and not conn.armed:
        _arm_input(device, conn)
    elif _wants_input(conn) != conn.armed:
        device._watch_input(conn)
    if conn.readable and conn.peer_free() > 0:
        _schedule(conn, ready)
    return 0


cdef int _arm_input(object device, Conn conn) except -1:
    """Watch the host socket of ``conn`` for input with its pump (the device's
    ``_watch_input`` when the watch is to start)."""
    loop = device.loop
    if loop is None:
        return 0
    conn.armed = True
    conn.muted = False
    pump = InputPump(device, conn)
    loop.add_reader(conn.fd, pump, pump=pump)
    return 0


cdef int _disarm_input(object device, Conn conn) except -1:
    """Stop watching the host socket of ``conn`` for input (the device's
    ``_watch_input`` when the watch is to end)."""
    loop = device.loop
    if loop is None:
        return 0
    conn.armed = False
    conn.muted = False
    loop.remove_reader(conn.fd)
    return 0


cdef int _drop(object device, State st, Conn conn) except -1:
    """Forget ``conn`` and close its host socket, no packet sent (the device's
    ``_drop``), in compiled code unless its socket waits to be writable or its
    port is the allocator's.  The caller holds a reference to ``conn`` of its own:
    the tables' and its pump's go here."""
    cdef PyObject *p
    if conn.dead:
        return 0
    if st.pend == <PyObject *>conn or st.part:
        _unpend(st)
    if conn.want_write or conn.local_alloc:
        device._drop(conn)
        return 0
    conn.dead = True
    if conn.armed or conn.muted:
        _disarm_input(device, conn)
    conn.armed = False
    p = PyDict_GetItem(st.conns, conn.key)
    if p != NULL and <object>p is conn:
        del st.conns[conn.key]
    p = PyDict_GetItem(st.by_fd, conn.fd)
    if p != NULL and <object>p is conn:
        del st.by_fd[conn.fd]
    _sock_close(conn.sock)
    return 0


def process_queue(object device, int index):
    """``VsockDevice.process_queue``: rx: fill the posted buffers with pending
    packets; tx: serve the guest's packets, then send what they produced; event:
    nothing (upstream neither).  The tx drain follows ``VirtioDevice.process_chains``
    (a broken device refuses, a kick gives the queue back to the device) and its
    error policy (a broken avail ring stops the queue, a device bug breaks the
    device); ``device._compiled`` False sends everything through the Python path.

    Raises:
        DeviceNeedsReset: the device is broken, or a packet's handling hit a bug.
        InvalidAvailRingIndex, QueueError, GuestMemoryError: the ring is unusable.
    """
    cdef State st = <State?>device._fast
    st.live = False
    _unpend(st)
    _process(device, st, index)
    _settle(device, st)


cdef int _process(object device, State st, int index) except -1:
    if index == TX:
        if st.compiled:
            _serve_tx(device, st)
        else:
            device.process_chains(TX)
        if st.ready or st.loose:
            _fill_rx_c(device, st)
    elif index == RX:
        st.rx_live = True
        _fill_rx_c(device, st)
    return 0


@cython.final
cdef class KickPump(FdPump):
    """The kicks of rx or tx served in compiled code (``VirtioDevice.kick_pump``):
    exactly :func:`process_queue`, run by the vhost-user loop inside its poll, so a
    kick costs neither a Python call nor a return to the loop's Python; with
    ``device._compiled`` off it answers 1 (``process_queue`` runs).

    It offers a nogil path (virtio_devices._pump's rule), run by the loop right
    after its wait without the GIL, for the steady state of a stream: a kick of
    rx fills the posted buffers with the one ready connection's data
    (:func:`_fill_rx_nogil`), a kick of tx takes the guest's CREDIT_UPDATEs and
    its RW packets to the host (:func:`_drain_tx_nogil`), each with its used
    notification through the compiled signaller; nothing owed to rx makes an rx
    kick a no-op.  Anything
    else (another packet, another shape of buffer, a connection to watch again, a
    second connection ready, the Python path's packets) is left where
    :meth:`pump_c` finds it, with the GIL, which then settles what the nogil path
    may rely on for the next kick (see State)."""

    cdef object device
    cdef State st
    cdef int index

    def __init__(self, device, int index):
        self.device = device
        self.st = <State?>device._fast
        self.index = index
        # (Without: the ring is served as before, adaptive polling included.)
        self.offers_nogil = self.st.nogil and (index == RX or index == TX)

    cdef int pump_nogil(self) noexcept nogil:
        cdef int rc
        self.st.nogil_passes += 1
        rc = _fill_rx_nogil(self.st) if self.index == RX else _drain_tx_nogil(self.st)
        if rc:
            self.st.nogil_handed += 1
        return rc

    cdef int pump_c(self) except -1:
        cdef State st = self.st
        st.live = False
        _unpend(st)
        if st.owed_rx:
            st.owed_rx = False
            _notify(self.device, st, self.device.queues[RX], RX)
        if st.owed_tx:
            st.owed_tx = False
            _notify(self.device, st, self.device.queues[TX], TX)
        if not st.compiled:
            return 1
        _process(self.device, st, self.index)
        _settle(self.device, st)
        return 0

    def serve_nogil(self):
        """Serve a kick as the vhost-user loop's nogil phase does (the GIL released);
        True when :meth:`pump_c` must go on (``pump()`` runs it), as the loop would."""
        cdef int rc
        with nogil:
            rc = self.run_nogil()
        return rc != 0


cdef int _fill_rx_nogil(State st) noexcept nogil:
    """:func:`fill_rx` without the GIL, for its steady state (see KickPump): 0 when
    done, 1 when the pass with the GIL must go on.  Nothing owed to rx: nothing to
    do.  The ready queue's one connection, a stream whose next packet is data the
    guest has credit for: its data into the posted buffers (:func:`_rx_conn_nogil`),
    the connection left first in line, as ``_fill_rx`` would put it back.  Handed
    over: the socket drained (its watch changes) and whatever that function hands
    over."""
    cdef Py_ssize_t added = 0
    cdef int rc
    if not st.live:
        return 1
    if st.pend != NULL:
        if not (<Conn>st.pend).readable:
            return _credit_only_nogil(st, <Conn>st.pend)
        return _pend_nogil(st, <Conn>st.pend)
    if st.idle:
        return 0
    if not st.head_ok or not st.head.readable or not st.head.in_ready:
        return 1
    rc = _rx_conn_nogil(st, st.head, True, &added)
    if rc == 2:
        rc = 1  # probably drained: the GIL path watches the socket again
    elif rc == 3:
        rc = 0
    if _signal_nogil(st, RX, added):
        rc = 1
    return rc


cdef int _pend_nogil(State st, Conn c) noexcept nogil:
    """:func:`_fill_rx_nogil` for the connection a nogil path scheduled (``st.pend``:
    readable, its socket muted, the ready queue's one): its data into the posted
    buffers (:func:`_rx_conn_nogil`).  It leaves the ready queue when the credit
    ran out (its packet sent; the socket stays muted, as the GIL path leaves it
    unwatched) or the socket was drained (watched again, unmuted, when the guest
    can take more: ``_watch_input``'s rule); it stays there when no buffer is left;
    1 hands it over, still scheduled."""
    cdef Py_ssize_t added = 0
    cdef int rc
    if c.dead or not c.readable or not c.muted:
        return 1
    rc = _rx_conn_nogil(st, c, True, &added)
    if rc == 2 and not c.ops:
        c.readable = False
        if not _wants_input(c):
            _leave_nogil(st, c)
            rc = 0
        elif (<FdPump>c.mpump).unmute_nogil() == 0:
            c.armed = True
            c.muted = False
            _leave_nogil(st, c)
            rc = 0
        else:
            c.readable = True  # the GIL path finds the socket drained and watches it
            rc = 1
    elif rc == 3:
        _leave_nogil(st, c)
        rc = 0
    elif rc == 2:
        rc = 1
    if _signal_nogil(st, RX, added):
        rc = 1
    return rc


cdef inline void _leave_nogil(State st, Conn c) noexcept nogil:
    """The scheduled connection leaves the ready queue, empty again."""
    st.pend = NULL
    c.in_ready = False
    st.idle = True


cdef int _signal_nogil(State st, int index, Py_ssize_t added) noexcept nogil:
    """The used notification of ring ``index`` (RX or TX) after ``added`` chains
    (§2.7.10, EVENT_IDX aware), through the compiled signaller; 1 when the rings
    were not current (owed to the pass with the GIL)."""
    cdef int e
    if not added:
        return 0
    st.nogil_chains += <unsigned long long>added
    e = st.rxq.needs_notification_nogil() if index == RX else st.txq.needs_notification_nogil()
    if e < 0:
        if index == RX:
            st.owed_rx = True
        else:
            st.owed_tx = True
        return 1
    if e:
        if index == RX:
            st.sig_rx_c.signal_nogil()
        else:
            st.sig_tx_c.signal_nogil()
    return 0


cdef int _rx_conn_nogil(State st, Conn c, bint is_head, Py_ssize_t *added) noexcept nogil:
    """Stream data of ``c`` (nothing before data owed, the guest has credit) into
    runs of the posted rx buffers, one ``readv`` from the host socket straight into
    each run, after the room for each header, as :func:`_rx_batch` does (the same
    packets and state changes), until a read leaves the socket drained (2), no
    buffer is left (0, notifications on again as ``_fill_rx`` leaves them), the
    guest's credit is used up (3), or the GIL path must go on (1, nothing of the
    current step taken): another chain shape first, the read failing or at the
    end of file, another packet owed, the rings not current.

    When the credit runs out, the credit packet owed goes into the next buffer (a
    CREDIT_UPDATE if owed, else the one CREDIT_REQUEST, §5.10.6.3), as the
    device's ``_produce_ops`` writes it, before 3.  ``is_head``: ``c`` is the
    ready queue's one connection; it is left there, where the pass with the GIL
    would take it out and find nothing to send."""
    cdef iovec iov[RX_BATCH]
    cdef uint16_t heads[RX_BATCH]
    cdef unsigned char *hdrs[RX_BATCH]
    cdef uint32_t lens[RX_BATCH]
    cdef ChainCursor cur
    cdef vring_desc d
    cdef unsigned char *p
    cdef uint16_t head
    cdef int k, j, n, avail, e
    cdef size_t want, left, take
    cdef ssize_t r
    cdef int64_t credit
    if not st.rxq._ready:
        return 1
    while True:
        if c.dead or c.seq or c.ops & P_BEFORE_DATA:
            return 1
        credit = _free(c)
        if credit == 0:
            if c.ops & ~P_CREDIT:
                return 1
            if not c.ops:
                return 3  # waiting for the guest's credit
        avail = st.rxq.avail_count_nogil()
        if avail < 0:
            return 1
        if avail == 0:
            # Wait for the driver's kick (§2.7.10), unless buffers came meanwhile.
            e = st.rxq.enable_notification_nogil()
            if e < 0:
                return 1
            if e:
                continue
            return 0
        if credit == 0:
            # The credit packet owed, into the next buffer (one of at least a header).
            if _credit_packet_nogil(st, c):
                return 1
            added[0] += 1
            continue
        if avail > RX_BATCH:
            avail = RX_BATCH
        n = 0
        want = 0
        for k in range(avail):
            if want >= <size_t>credit:
                break
            head = st.rxq.avail_head_nogil(<uint16_t>k)
            if head >= st.rxq._size:
                break
            chain_start(&cur, st.rxq._desc, st.rxq._desc_gpa, st.rxq._size, head)
            if (chain_next(st.rxq._snap, &cur, &d) != 1 or cur.has_next
                    or not d.flags & VRING_DESC_F_WRITE or d.len <= HDR_SIZE):
                break
            p = snap_ptr_w(st.rxq._snap, d.addr, d.len)
            if p == NULL:
                break
            hdrs[k] = p
            heads[k] = head
            iov[k].iov_base = p + HDR_SIZE
            iov[k].iov_len = d.len - HDR_SIZE
            if want + iov[k].iov_len > <size_t>credit:
                iov[k].iov_len = <size_t>credit - want
            want += iov[k].iov_len
            n = k + 1
        if n == 0:
            return 1  # another shape first: the one-chain path with the GIL
        while True:
            r = readv(c.fd, iov, n)
            if r >= 0 or errno != EINTR:
                break
        if r <= 0:
            return 1  # nothing now, the end of file or an error: the GIL path meets it
        left = <size_t>r
        j = 0
        while left:
            take = iov[j].iov_len if iov[j].iov_len < left else left
            left -= take
            _hdr_at(hdrs[j], c, OP_RW, <uint32_t>take, st.guest_cid, st.buf_alloc, c.fwd_cnt)
            c.tx_cnt += <uint32_t>take
            lens[j] = <uint32_t>(HDR_SIZE + take)
            j += 1
        # The chains were only looked at: take them as pop_head would, then use them
        # (a head below the queue size, the rings current: add_used_nogil serves).
        st.rxq.pop_heads_nogil(<uint16_t>j)
        for k in range(j):
            st.rxq.add_used_nogil(heads[k], lens[k])
        added[0] += j
        # Every header carried our credit (the device's _header).
        c.last_fwd_sent = c.fwd_cnt
        c.ops &= ~P_CREDIT_UPDATE
        if _free(c) == 0 and not c.credit_asked:
            # §5.10.6.3: ask once for the guest's credit while it has none for us.
            c.credit_asked = True
            c.ops |= P_CREDIT_REQUEST
        if <size_t>r < want:
            return 2


cdef PyObject *_cand_find(State st, uint32_t lport, uint32_t pport) noexcept nogil:
    """The live connection keyed (``lport``, ``pport``) among ``st.cand``, or NULL."""
    cdef int i
    for i in range(st.ncand):
        if ((<Conn>st.cand[i]).lport == lport and (<Conn>st.cand[i]).pport == pport
                and not (<Conn>st.cand[i]).dead):
            return st.cand[i]
    return NULL


cdef int _credit_nogil(State st, Conn c, uint32_t buf_alloc, uint32_t fwd_cnt) noexcept nogil:
    """The guest's credit in a CREDIT_UPDATE for ``c`` (§5.10.6.3), as
    :func:`_credit_changed` takes it, when that needs no Python: the socket's watch
    stays as it is, and a readable connection that can send again is scheduled
    only into an empty ready queue with its socket muted (``st.pend``); 1 (nothing
    changed) otherwise, or for a seqpacket connection."""
    cdef int64_t free = _credit_left(c.tx_cnt, buf_alloc, fwd_cnt)
    cdef bint wants = _wants_input_with(c, free)
    cdef bint schedule = c.readable and free > 0 and not c.in_ready
    if c.seq or wants != c.armed:
        return 1
    if schedule and not (c.muted and st.idle and st.pend == NULL):
        return 1
    c.peer_buf_alloc = buf_alloc
    c.peer_fwd_cnt = fwd_cnt
    if free > 0:
        c.credit_asked = False
    if schedule:
        st.pend = <PyObject *>c
        c.in_ready = True
        st.idle = False
    return 0


cdef int _credit_packet_nogil(State st, Conn c) noexcept nogil:
    """The credit packet ``c`` owes (its CREDIT_UPDATE, else its CREDIT_REQUEST:
    §5.10.6.3) into the next available rx buffer (at least one known available), one
    header in one device-writable descriptor, as ``_fill_rx`` writes it: 0 when it is
    written and the buffer used, 1 (nothing done) when the buffer has another shape or
    lies outside the memory."""
    cdef ChainCursor cur
    cdef vring_desc d
    cdef unsigned char *p
    cdef uint16_t head_i, op
    head_i = st.rxq.avail_head_nogil(0)
    if head_i >= st.rxq._size:
        return 1
    chain_start(&cur, st.rxq._desc, st.rxq._desc_gpa, st.rxq._size, head_i)
    if (chain_next(st.rxq._snap, &cur, &d) != 1 or cur.has_next
            or not d.flags & VRING_DESC_F_WRITE or d.len < HDR_SIZE):
        return 1
    p = snap_ptr_w(st.rxq._snap, d.addr, HDR_SIZE)
    if p == NULL:
        return 1
    op = OP_CREDIT_UPDATE if c.ops & P_CREDIT_UPDATE else OP_CREDIT_REQUEST
    _hdr_at(p, c, op, 0, st.guest_cid, st.buf_alloc, c.fwd_cnt)
    c.last_fwd_sent = c.fwd_cnt
    c.ops &= ~P_CREDIT_UPDATE
    if op == OP_CREDIT_REQUEST:
        c.ops &= ~P_CREDIT_REQUEST
    st.rxq.pop_heads_nogil(1)
    st.rxq.add_used_nogil(head_i, HDR_SIZE)
    return 0


cdef int _credit_only_nogil(State st, Conn c) noexcept nogil:
    """:func:`_fill_rx_nogil` for the connection a nogil path scheduled with only credit
    to say and no host data waiting (the guest -> host stream's CREDIT_UPDATE, see
    :func:`_tx_rw_nogil`): a CREDIT_UPDATE if owed, else the CREDIT_REQUEST, one
    header per buffer (§5.10.6.3), as ``_fill_rx`` writes them; the connection
    leaves the ready queue when nothing is owed any more, and stays scheduled while
    no buffer is left (notifications on: the driver's kick comes here again).  1
    hands it over, still scheduled: another owed packet, another buffer shape, the
    rings not current."""
    cdef int avail, e, rc = 0
    cdef Py_ssize_t added = 0
    if c.dead or c.seq or not c.ops or c.ops & ~P_CREDIT or not st.rxq._ready:
        return 1
    while c.ops:
        avail = st.rxq.avail_count_nogil()
        if avail < 0:
            rc = 1
            break
        if avail == 0:
            e = st.rxq.enable_notification_nogil()
            if e < 0:
                rc = 1
            elif e:
                continue
            break
        if _credit_packet_nogil(st, c):
            rc = 1
            break
        added += 1
    if not c.ops:
        _leave_nogil(st, c)
    if _signal_nogil(st, RX, added):
        rc = 1
    return rc


cdef int _rw_add_nogil(State st, Conn c, ChainCursor *cur, vring_desc *d, const unsigned char *h,
                       uint32_t length, size_t queued, iovec *iov, int room) noexcept nogil:
    """Take the guest -> host RW packet (first descriptor ``d``, header ``h``, type,
    op and CIDs checked; ``length`` payload bytes) of connection ``c`` into a nogil
    tx batch, as the drain with the GIL takes one (§5.10.6.3): a stream that is
    established, has nothing buffered and was not shut by the guest, the payload
    within its buffers and, with the ``queued`` bytes of the batch before it, the
    credit we gave, and its CREDIT_UPDATE schedulable here (``c`` already in the
    ready queue, or the queue empty); then its payload's buffers into ``iov`` (at
    most ``room``) and the packet's credit taken (:func:`_credit_nogil`).  The
    number of iovecs, or -1 (nothing taken, the packet's credit not either) for
    anything else."""
    cdef int k = 0
    cdef size_t got = 0, take
    cdef unsigned char *p
    if length == 0:
        return -1
    if (not c.est or c.seq or c.guest_shut or c.want_write or c.connecting
            or <int64_t>length + <int64_t>queued
            > <int64_t>st.buf_alloc - <uint32_t>(c.rx_cnt - c.fwd_cnt)):
        return -1
    if not c.in_ready and not (st.idle and st.pend == NULL):
        return -1  # its CREDIT_UPDATE could not be scheduled here
    # The payload: after the header in its descriptor, then the next ones (readable).
    if d.len > HDR_SIZE:
        take = d.len - HDR_SIZE
        if take > length:
            take = length
        p = <unsigned char *>snap_ptr(st.txq._snap, d.addr + HDR_SIZE, take)
        if p == NULL:
            return -1
        iov[0].iov_base = p
        iov[0].iov_len = take
        got = take
        k = 1
    while got < length:
        if k == room or chain_next(st.txq._snap, cur, d) != 1 or d.flags & VRING_DESC_F_WRITE:
            return -1
        if d.len == 0:
            continue
        take = d.len
        if take > length - got:
            take = length - got
        p = <unsigned char *>snap_ptr(st.txq._snap, d.addr, take)
        if p == NULL:
            return -1
        iov[k].iov_base = p
        iov[k].iov_len = take
        got += take
        k += 1
    if _credit_nogil(st, c, _u32(h + 36), _u32(h + 40)):
        return -1
    return k


cdef inline void _forwarded_nogil(State st, Conn c, uint32_t n) noexcept nogil:
    """``n`` guest bytes of ``c`` received and written to the host (the GIL path's
    ``rx_cnt`` and :func:`_forwarded`): a CREDIT_UPDATE scheduled when the guest's
    view of our free space falls below half (§5.10.6.3); :func:`_rw_add_nogil`
    made sure it can be."""
    c.rx_cnt += n
    c.fwd_cnt += n
    if (c.fwd_cnt != c.last_fwd_sent
            and <int64_t>st.buf_alloc - <uint32_t>(c.rx_cnt - c.last_fwd_sent)
            < <int64_t>(st.buf_alloc // 2) + 1):
        c.ops |= P_CREDIT_UPDATE
        if not c.in_ready:
            st.pend = <PyObject *>c
            c.in_ready = True
            st.idle = False


cdef int _rw_flush_nogil(State st, Conn c, iovec *iov, int niov, uint16_t *heads,
                         uint32_t *lens, int n, Py_ssize_t *served) noexcept nogil:
    """Write a nogil tx batch (the first ``n`` available chains, RW packets of ``c``,
    looked at and not taken yet) to the host socket with one ``writev``: 0 when the
    socket took it all (the chains taken and used, the bytes counted).  1 hands
    over: the socket took nothing (full, EAGAIN, or failing: the path with the GIL
    meets it again), the chains left where they are; or it took part: the chains
    it took whole are used, the one it took in part is taken and recorded
    (``st.part``, finished by the pass with the GIL, :func:`_unpart`), the rest
    left where they are (the pass with the GIL buffers them after it)."""
    cdef ssize_t r
    cdef size_t left
    cdef int k = 0, j
    while True:
        r = writev(c.fd, iov, niov)
        if r >= 0 or errno != EINTR:
            break
    if r <= 0:
        return 1
    left = <size_t>r
    while k < n and left >= lens[k]:
        left -= lens[k]
        k += 1
    if k:
        st.txq.pop_heads_nogil(<uint16_t>k)
        for j in range(k):
            st.txq.add_used_nogil(heads[j], 0)
        served[0] += k
        _forwarded_nogil(st, c, <uint32_t>(<size_t>r - left))
    if k == n:
        return 0
    if left:
        st.txq.pop_heads_nogil(1)
        st.part = True
        st.part_head = heads[k]
        st.part_off = <uint32_t>left
        st.part_len = lens[k]
        st.part_conn = <PyObject *>c
    return 1


cdef bint _tx_nap_nogil(int wait_fd, long long nap_ns) noexcept nogil:
    """Sleep ``nap_ns`` unless the loop has an fd ready first (``wait_fd``, its epoll
    fd, turns readable: ``ppoll`` on it consumes nothing); True when the whole nap
    passed, False when it was cut short (or failed: a signal, say).  The nogil tx
    drain calls it as it is; :func:`_tx_nap` releases the GIL around it."""
    cdef pollfd p
    cdef timespec t
    p.fd = wait_fd
    p.events = POLLIN
    p.revents = 0
    t.tv_sec = nap_ns // 1000000000
    t.tv_nsec = nap_ns % 1000000000
    return ppoll(&p, 1, &t, NULL) == 0


cdef inline void _nap_learn(State st, Py_ssize_t pass_rw, int naps) noexcept nogil:
    """After the pass that followed a tx nap: two packets or more for one wake-up
    mean the nap paid (one it caught alone traded a kick's wake-up for a timer's,
    which costs more here), so the back-off ends; a first nap that found one
    packet or none means the guest is about as slow as a nap or slower, so the
    next ``nap_backoff`` drains that could nap do not (doubling up to
    ``NAP_BACKOFF_MAX``)."""
    if pass_rw >= 2:
        st.nap_backoff = 0
    elif naps == 1:
        st.nap_backoff = 1 if st.nap_backoff == 0 else min(st.nap_backoff * 2, NAP_BACKOFF_MAX)
        st.nap_skip = st.nap_backoff


cdef inline int _nap_due(State st, Py_ssize_t pass_rw, uint64_t pass_bytes,
                         uint32_t buf_alloc) noexcept nogil:
    """Whether a tx drain naps after this pass: 1 yes (at least ``NAP_MIN`` RW
    packets came in it and less than half the buffer's worth), 0 not now, -1 not in
    this drain (one of the drains the back-off skips, counted down here)."""
    if pass_rw < NAP_MIN or pass_bytes >= buf_alloc // 2:
        return 0
    if st.nap_skip:
        st.nap_skip -= 1
        return -1
    return 1


cdef int _drain_tx_nogil(State st) noexcept nogil:
    """The tx drain (:func:`drain_tx`) without the GIL, for the steady state of a
    stream (see KickPump): 0 when done, 1 when the pass with the GIL must go on.
    The available chains, with notifications off while draining and on again at
    the end (§2.7.10): the guest's CREDIT_UPDATEs for a stream connection (one
    readable buffer holding the header, no payload, §5.10.6.3) update its credit
    (:func:`_credit_nogil`) and are used; a stream's RW packets to the host
    (:func:`_rw_add_nogil`), consecutive ones of one connection in one
    ``writev`` (:func:`_rw_flush_nogil`), as the drain with the GIL batches them.
    A pass that took stream data naps and drains again as :func:`drain_tx` does
    (the same rule, back-off and counters; the wait is ``ppoll`` on the loop's
    epoll fd), rx getting what it is owed (a CREDIT_UPDATE) and tx its used
    notification first.  At the end rx gets what it is owed
    (:func:`_fill_rx_nogil`), as after the drain with the GIL.  Any other chain is
    left first in the ring for the pass with the GIL, as is one whose credit
    would change the socket's watch, and the RW packets not written yet."""
    cdef ChainCursor cur
    cdef vring_desc d
    cdef const unsigned char *h
    cdef PyObject *c
    cdef PyObject *bc = NULL
    cdef iovec iov[BATCH_IOV]
    cdef uint16_t heads[BATCH_MAX]
    cdef uint32_t lens[BATCH_MAX]
    cdef int n = 0, niov = 0, k, avail, e, rc = 0
    cdef size_t total = 0
    cdef uint16_t head, op
    cdef uint32_t length
    cdef Py_ssize_t served = 0, pass_rw
    cdef uint64_t pass_bytes
    cdef int naps = 0
    cdef bint may_nap = st.wait_fd >= 0 and st.nap_ns > 0
    cdef bint after_nap = False
    cdef int due
    if not st.live or not st.tx_live or not st.txq._ready:
        return 1
    while True:
        if st.txq.disable_notification_nogil() < 0:
            rc = 1
            break
        pass_rw = 0
        pass_bytes = 0
        while True:
            avail = st.txq.avail_count_nogil()
            if avail < 0:
                rc = 1
                break
            if avail <= n:
                break
            head = st.txq.avail_head_nogil(<uint16_t>n)
            if head >= st.txq._size:
                rc = 1
                break
            chain_start(&cur, st.txq._desc, st.txq._desc_gpa, st.txq._size, head)
            if (chain_next(st.txq._snap, &cur, &d) != 1
                    or d.flags & VRING_DESC_F_WRITE or d.len < HDR_SIZE):
                rc = 1
                break
            h = snap_ptr(st.txq._snap, d.addr, HDR_SIZE)
            if (h == NULL or _u16(h + 28) != TYPE_STREAM
                    or _u64(h) != st.guest_cid or _u64(h + 8) != HOST_CID):
                rc = 1
                break
            op = _u16(h + 30)
            length = _u32(h + 24)
            if op != OP_RW:
                if n:
                    # Anything else comes after the batch's bytes.
                    if _rw_flush_nogil(st, <Conn>bc, iov, niov, heads, lens, n, &served):
                        rc = 1
                        break
                    n = niov = 0
                    total = 0
                    continue
                if cur.has_next or op != OP_CREDIT_UPDATE or length != 0:
                    rc = 1
                    break
            c = _cand_find(st, _u32(h + 20), _u32(h + 16))
            if c == NULL:
                st.cand_miss = True
                rc = 1
                break
            if op == OP_RW:
                if n and (c != bc or n == BATCH_MAX or niov + RW_IOV > BATCH_IOV):
                    if _rw_flush_nogil(st, <Conn>bc, iov, niov, heads, lens, n, &served):
                        rc = 1
                        break
                    n = niov = 0
                    total = 0
                    continue  # (the chain is looked at again, first now)
                k = _rw_add_nogil(st, <Conn>c, &cur, &d, h, length, total, &iov[niov], RW_IOV)
                if k < 0:
                    rc = 1
                    break
                bc = c
                heads[n] = head
                lens[n] = length
                n += 1
                niov += k
                total += length
                pass_rw += 1
                pass_bytes += length
                continue
            if _credit_nogil(st, <Conn>c, _u32(h + 36), _u32(h + 40)):
                rc = 1
                break
            st.txq.pop_heads_nogil(1)
            st.txq.add_used_nogil(head, 0)
            served += 1
        if not rc and n:
            rc = _rw_flush_nogil(st, <Conn>bc, iov, niov, heads, lens, n, &served)
            n = niov = 0
            total = 0
        if rc:
            break
        if after_nap:
            after_nap = False
            _nap_learn(st, pass_rw, naps)
        if may_nap and naps < NAP_MAX:
            due = _nap_due(st, pass_rw, pass_bytes, st.buf_alloc)
            if due < 0:
                may_nap = False
            elif due:
                naps += 1
                if not st.idle and _fill_rx_nogil(st):
                    rc = 1
                    break
                if _signal_nogil(st, TX, served):
                    served = 0
                    rc = 1
                    break
                served = 0
                if _tx_nap_nogil(st.wait_fd, st.nap_ns):
                    st.naps += 1
                    after_nap = True
                    continue
                st.naps_cut += 1
                may_nap = False
        e = st.txq.enable_notification_nogil()
        if e < 0:
            rc = 1
            break
        if not e:
            break
    if _signal_nogil(st, TX, served):
        rc = 1
    if rc:
        return 1
    return _fill_rx_nogil(st)


cdef int _serve_tx(object device, State st) except -1:
    cdef Queue queue
    if device._broken is not None:
        raise DeviceNeedsReset(f"{device.name}: device is broken ({device.broken!r}) until it is reset")
    device._quiesced[TX] = False  # a kick: the queue is the device's again
    queue = device.queues[TX]
    try:
        _drain_tx_c(device, st, queue)
    except InvalidAvailRingIndex:
        queue.ready = False
        raise
    except (QueueError, GuestMemoryError):
        raise  # the ring itself is unusable: the transport stops it
    except DeviceNeedsReset as e:
        if device.broken is None:
            device.broken = e
        raise
    except Exception as e:
        raise device._break(TX, e) from e
    return 0


def drain_tx(object device, State st, Queue queue):
    """Serve every available chain of the tx queue (see the module docstring), with
    the notification protocol of VIRTIO 1.2 §2.7.10 (notifications off while
    draining, on again, drain again if chains came meanwhile).  Returns the number
    of chains completed (counted in ``device.chains_served``; the driver notified
    once, if it wants it).

    The tx nap (``st.nap_ns`` and ``st.wait_fd`` set): a pass that took stream
    data (at least ``NAP_MIN`` RW packets, less than half the credit we give, so a
    guest that can fill its credit meanwhile is never made to wait for us) does not
    turn notifications back on at once.  Its rx answers go out (CREDIT_UPDATE) and
    the driver gets its used notification, then the loop thread sleeps up to
    ``nap_ns`` with the GIL released and drains again without a kick, for as long
    as each pass takes stream data, nothing the loop watches turns ready (which
    ends a nap at once: a host socket, the vhost-user socket, another ring's kick)
    and at most ``NAP_MAX`` naps.  A driver that streams then posts its packets
    without kicking (§2.7.10 with EVENT_IDX: ``avail_event`` stays behind), and
    each wake-up of the device and of the host program takes more of them; the
    last packets of a burst wait one nap at most.  A first nap that finds no data
    (a guest slower than a nap) makes the next drains that could nap skip it, 1,
    2, 4... up to ``NAP_BACKOFF_MAX`` of them, until a nap finds two packets or
    more (one caught alone traded a kick's wake-up for a timer's, which costs more
    on this kind of machine): a slow stream costs a wasted wake-up only now and
    then.  Notifications are on again,
    and the ring looked at once more, before this returns, as without the nap.

    Raises:
        InvalidAvailRingIndex, QueueError, GuestMemoryError: from the ring, as
            ``Queue.pop_chain``/``add_used`` raise them.
        Exception: what ``device._call`` lets through (DeviceNeedsReset, a bug).
    """
    return _drain_tx_c(device, st, queue)


cdef Py_ssize_t _drain_tx_c(object device, State st, Queue queue) except -1:
    """:func:`drain_tx` for compiled callers (no Python call)."""
    cdef Py_ssize_t served = 0
    st.live = False
    _unpend(st)
    try:
        _drain_tx_loop(device, st, queue, &served)
    finally:
        if served:
            st.chains += <unsigned long long>served
            _notify(device, st, queue, TX)
    return served


cdef int _drain_tx_loop(object device, State st, Queue queue, Py_ssize_t *served) except -1:
    cdef _Batch batch = st.batch
    try:
        _drain_tx_chains(device, st, queue, batch, served)
    finally:
        # Chains taken into the batch are completed whatever stopped the drain.
        _batch_flush(device, batch, queue, st.buf_alloc, st.ready, served)
    return 0


cdef int _drain_tx_chains(object device, State st, Queue queue, _Batch batch,
                          Py_ssize_t *served) except -1:
    cdef uint16_t head
    cdef DescriptorChain chain
    cdef Reader r
    cdef unsigned char hdr[HDR_SIZE]
    cdef PyObject *p
    cdef Conn conn
    cdef uint32_t length, src_port, dst_port
    cdef uint16_t type_, op
    cdef int64_t room
    cdef dict conns = st.conns
    cdef uint64_t guest_cid = st.guest_cid
    cdef uint32_t buf_alloc = st.buf_alloc
    cdef Py_ssize_t pass_rw
    cdef uint64_t pass_bytes
    cdef int naps = 0
    cdef bint may_nap = st.wait_fd >= 0 and st.nap_ns > 0
    cdef bint after_nap = False
    cdef int due
    ready = st.ready
    while True:
        queue.disable_notification_c()
        pass_rw = 0
        pass_bytes = 0
        while True:
            if not queue.pop_head(&head):
                break
            if head >= queue._size:
                _batch_flush(device, batch, queue, buf_alloc, ready, served)
                device._log_guest_fault(TX, InvalidDescriptorIndex(
                    f"head descriptor index {head} out of range (queue size {queue._size})"))
                continue
            chain = make_chain(queue._snap, queue._memory, queue._desc, queue._desc_gpa, queue._size, head)
            r = None
            try:
                r = make_reader(chain)
            except (QueueError, GuestMemoryError):
                pass  # a broken chain: handle_chain meets the same error under the policy
            if r is not None and r.avail >= HDR_SIZE:
                r.copy_out(hdr, HDR_SIZE)
                length = _u32(hdr + 24)
                type_ = _u16(hdr + 28)
                op = _u16(hdr + 30)
                if (op == OP_RW and type_ == TYPE_STREAM and _u64(hdr) == guest_cid
                        and _u64(hdr + 8) == HOST_CID):
                    src_port = _u32(hdr + 16)
                    dst_port = _u32(hdr + 20)
                    p = PyDict_GetItem(conns, (dst_port, src_port))
                    if p != NULL:
                        conn = <Conn>p
                        if batch.n and (batch.conn is not conn or batch.n == BATCH_MAX):
                            _batch_flush(device, batch, queue, buf_alloc, ready, served)
                        room = <int64_t>buf_alloc - <uint32_t>(conn.rx_cnt - conn.fwd_cnt)
                        if (conn.est and not conn.txbuf and not conn.guest_shut and not conn.seq
                                and length <= r.avail and length <= room):
                            # Every packet carries the sender's credit (§5.10.6.3).
                            conn.peer_buf_alloc = _u32(hdr + 36)
                            conn.peer_fwd_cnt = _u32(hdr + 40)
                            if not _batch_add(batch, conn, r, head, length):
                                _batch_flush(device, batch, queue, buf_alloc, ready, served)
                                if not _batch_add(batch, conn, r, head, length):
                                    # More buffers than a batch holds: on its own.
                                    _tx_rw(device, conn, r, length, buf_alloc, ready)
                                    queue.add_used_c(head, 0)
                                    served[0] += 1
                                    continue
                            conn.rx_cnt += length
                            pass_bytes += length
                            pass_rw += 1
                            continue
                # Anything else comes after the batch's bytes.
                _batch_flush(device, batch, queue, buf_alloc, ready, served)
                if (op == OP_CREDIT_UPDATE and type_ == TYPE_STREAM and _u64(hdr) == guest_cid
                        and _u64(hdr + 8) == HOST_CID and length <= r.avail):
                    p = PyDict_GetItem(conns, (_u32(hdr + 20), _u32(hdr + 16)))
                    if p != NULL and not (<Conn>p).seq:
                        # The credit fields are all it has (§5.10.6.3).
                        conn = <Conn>p
                        conn.peer_buf_alloc = _u32(hdr + 36)
                        conn.peer_fwd_cnt = _u32(hdr + 40)
                        _credit_changed(device, conn, ready)
                        queue.add_used_c(head, 0)
                        served[0] += 1
                        continue
                elif (op == OP_RST and type_ == TYPE_STREAM and _u64(hdr) == guest_cid
                        and _u64(hdr + 8) == HOST_CID and length <= r.avail):
                    p = PyDict_GetItem(conns, (_u32(hdr + 20), _u32(hdr + 16)))
                    if p != NULL and not (<Conn>p).seq:
                        # §5.10.6.5: the guest aborted the connection; nothing is answered.
                        # (A reference of our own: dropping it takes the tables' away.)
                        conn = <Conn>p
                        conn.peer_buf_alloc = _u32(hdr + 36)
                        conn.peer_fwd_cnt = _u32(hdr + 40)
                        _drop(device, st, conn)
                        queue.add_used_c(head, 0)
                        served[0] += 1
                        continue
                elif (op == OP_RESPONSE and type_ == TYPE_STREAM and _u64(hdr) == guest_cid
                        and _u64(hdr + 8) == HOST_CID and length <= r.avail):
                    p = PyDict_GetItem(conns, (_u32(hdr + 20), _u32(hdr + 16)))
                    if p != NULL and not (<Conn>p).seq and not (<Conn>p).est and not (<Conn>p).dead:
                        # The guest accepted a host-initiated connection (§5.10.6.5).
                        conn = <Conn>p
                        conn.peer_buf_alloc = _u32(hdr + 36)
                        conn.peer_fwd_cnt = _u32(hdr + 40)
                        _established(device, conn, ready)
                        queue.add_used_c(head, 0)
                        served[0] += 1
                        continue
                elif (op == OP_REQUEST and type_ == TYPE_STREAM and st.connect_prefix is not None
                        and _u64(hdr) == guest_cid and _u64(hdr + 8) == HOST_CID and length <= r.avail):
                    src_port = _u32(hdr + 16)
                    dst_port = _u32(hdr + 20)
                    if (PyDict_GetItem(conns, (dst_port, src_port)) == NULL
                            and _guest_connect(device, st, dst_port, src_port, hdr)):
                        queue.add_used_c(head, 0)
                        served[0] += 1
                        continue
            _batch_flush(device, batch, queue, buf_alloc, ready, served)
            used = device._call(device.handle_chain, TX, chain)
            if used is None:
                continue
            queue.add_used_c(head, used)
            served[0] += 1
        # The batch's chains are used before the driver is asked to kick again.
        _batch_flush(device, batch, queue, buf_alloc, ready, served)
        if after_nap:
            after_nap = False
            _nap_learn(st, pass_rw, naps)
        if may_nap and naps < NAP_MAX:
            due = _nap_due(st, pass_rw, pass_bytes, buf_alloc)
            if due < 0:
                may_nap = False
            elif due:
                naps += 1
                if st.ready or st.loose:
                    _fill_rx_c(device, st)
                _notify(device, st, queue, TX)
                if _tx_nap(st.wait_fd, st.nap_ns):
                    st.naps += 1
                    after_nap = True
                    continue
                st.naps_cut += 1
                may_nap = False
        if not queue.enable_notification_c():
            return 0


cdef bint _tx_nap(int wait_fd, long long nap_ns) noexcept:
    """:func:`_tx_nap_nogil` with the GIL released for the nap."""
    cdef bint whole
    with nogil:
        whole = _tx_nap_nogil(wait_fd, nap_ns)
    return whole


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t
    struct sockaddr:
        sa_family_t sa_family
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int connect(int fd, const sockaddr *addr, socklen_t len)
    enum:
        MSG_PEEK
        MSG_DONTWAIT
        MSG_NOSIGNAL
        AF_UNIX


cdef extern from "<sys/un.h>" nogil:
    struct sockaddr_un:
        sa_family_t sun_family
        char sun_path[108]


cdef int _no_input(object device, Conn conn) except -1:
    """A read gave 0 bytes: no data now (EAGAIN), or the host's end of file (the
    device's ``_no_input``, which also handles a socket error)."""
    cdef char c
    cdef ssize_t r
    with nogil:
        r = recv(conn.fd, &c, 1, MSG_PEEK | MSG_DONTWAIT)
    if r > 0:
        return 0  # data arrived meanwhile: the next buffer takes it
    if r == 0:
        device._host_eof(conn)
    elif errno == EAGAIN:  # EWOULDBLOCK on Linux
        conn.readable = False
        if _wants_input(conn) != conn.armed:
            device._watch_input(conn)
    else:
        device._no_input(conn)  # EINTR asks again; an error resets the connection
    return 0


cdef object _rx_data(object device, Conn conn, Writer w, uint64_t guest_cid, uint32_t buf_alloc):
    """Stream data of ``conn`` into ``w`` (header, then payload read from the host
    socket): the used length, or None when there was none (the device's
    ``_produce_data`` for a stream)."""
    cdef long credit = conn.peer_free()
    cdef Writer body
    cdef size_t room, got
    if credit == 0:
        # §5.10.6.3: ask once for the guest's credit while it has none for us.
        if not conn.credit_asked:
            conn.credit_asked = True
            conn.ops |= P_CREDIT_REQUEST
        return None
    body = w.split_at(HDR_SIZE)
    room = body.avail if body.avail < <size_t>credit else <size_t>credit
    if room == 0:
        # A buffer with room for a header only (credit is there): it carries our
        # credit instead (§5.10.6.3), so the data waits for the next buffer and the
        # connection does not come round to this one forever.
        _put_hdr(w, conn, OP_CREDIT_UPDATE, 0, guest_cid, buf_alloc)
        return HDR_SIZE
    try:
        got = _sock_io(body, conn.fd, room, True)
    except OSError as e:
        device._host_broke(conn, e)
        return None
    if got == 0:
        _no_input(device, conn)
        return None
    if got < room:
        # Probably drained: let the loop say when there is more.
        conn.readable = False
        device._watch_input(conn)
    _put_hdr(w, conn, OP_RW, <uint32_t>got, guest_cid, buf_alloc)
    conn.tx_cnt += <uint32_t>got
    if conn.peer_free() == 0 and not conn.credit_asked:
        # §5.10.6.3: ask once for the guest's credit while it has none for us.
        conn.credit_asked = True
        conn.ops |= P_CREDIT_REQUEST
    return HDR_SIZE + got


cdef int _host_eof(object device, Conn conn, object ready) except -1:
    """The host will send no more (§5.10.6.5 SHUTDOWN SEND); RCV too when it closed
    both directions (a Unix socket reports POLLHUP then): the device's
    ``_host_eof``, the SHUTDOWN owed as a pending operation."""
    cdef pollfd p
    cdef uint32_t flags = SHUTDOWN_SEND
    conn.host_eof = True
    conn.readable = False
    if not conn.host_shut & HOST_SHUT_BY_US:
        # A hang-up after we shut our own writing side says nothing of the host's
        # reading side; else it means the host closed both.
        p.fd = conn.fd
        p.events = POLLIN
        p.revents = 0
        if poll(&p, 1, 0) == 1 and p.revents & POLLHUP:
            flags |= SHUTDOWN_RCV
    conn.host_shut |= flags
    if conn.armed and not _wants_input(conn):
        _disarm_input(device, conn)
    elif _wants_input(conn) != conn.armed:
        device._watch_input(conn)
    conn.ops |= P_SHUTDOWN
    _schedule(conn, ready)
    return 0


cdef int _rx_batch(object device, Queue queue, Conn conn, object ready, uint64_t guest_cid,
                   uint32_t buf_alloc, Py_ssize_t *added) except -1:
    """Stream data of ``conn``, the head of the ready queue, into as many of the next
    available rx buffers as its credit and the host socket allow, with one ``readv``
    from the socket straight into them (each buffer after the room for its header;
    the GIL released for a large one), then a header per buffer the bytes reached,
    each a used element.  This is :func:`_rx_data` for a run of buffers: the same
    packets, the same state changes, one system call instead of one per packet.

    Only chains that are one device-writable buffer larger than a header are taken
    (``Queue._peek_fill``: the shape Linux posts); returns 0, having taken nothing,
    when the next chain is another shape, none is available, or the read fails
    (the caller's one-chain path then meets the same condition and handles it:
    EAGAIN, an error, another shape); 1 when it served some, or met the host's end
    of file (the device's ``_host_eof``, the connection left first in line).
    """
    cdef iovec iov[RX_BATCH]
    cdef uint16_t heads[RX_BATCH]
    cdef unsigned char *hdrs[RX_BATCH]
    cdef int k, j, n = 0
    cdef size_t want = 0, left, take
    cdef ssize_t r
    cdef long credit
    if queue._n_resubmit:
        return 0
    k = queue._peek_fill(iov, heads, RX_BATCH)
    if k <= 0:
        return 0
    credit = conn.peer_free()
    for j in range(k):
        if iov[j].iov_len <= HDR_SIZE or want >= <size_t>credit:
            break
        hdrs[j] = <unsigned char *>iov[j].iov_base
        iov[j].iov_base = hdrs[j] + HDR_SIZE
        iov[j].iov_len -= HDR_SIZE
        if want + iov[j].iov_len > <size_t>credit:
            iov[j].iov_len = <size_t>credit - want
        want += iov[j].iov_len
        n = j + 1
    if n == 0:
        return 0
    if want >= NOGIL_BATCH_MIN:
        with nogil:
            while True:
                r = readv(conn.fd, iov, n)
                if r >= 0 or errno != EINTR:
                    break
    else:
        while True:
            r = readv(conn.fd, iov, n)
            if r >= 0 or errno != EINTR:
                break
    if r == 0:
        # The host's end of file (a stream's read gives 0 for nothing else): the
        # connection stays first in the ready queue, so that the next buffer gets
        # the SHUTDOWN it now owes, as the one-chain path would (_no_input).
        _host_eof(device, conn, ready)
        return 1
    if r < 0:
        return 0
    ready.popleft()
    conn.in_ready = False
    left = <size_t>r
    for j in range(n):
        if left == 0:
            break
        take = iov[j].iov_len if iov[j].iov_len < left else left
        left -= take
        _hdr_at(hdrs[j], conn, OP_RW, <uint32_t>take, guest_cid, buf_alloc, conn.fwd_cnt)
        conn.tx_cnt += <uint32_t>take
        # The chain was only peeked at: take it as Queue.pop_head would.
        queue._next_avail += 1
        if queue._inflight != NULL:
            queue._inflight_popped(heads[j])
        queue.add_used_c(heads[j], <uint32_t>(HDR_SIZE + take))
        added[0] += 1
    # Every header carried our credit (the device's _header).
    conn.last_fwd_sent = conn.fwd_cnt
    conn.ops &= ~P_CREDIT_UPDATE
    if <size_t>r < want:
        # Probably drained: let the loop say when there is more.
        conn.readable = False
        device._watch_input(conn)
    if conn.peer_free() == 0 and not conn.credit_asked:
        # §5.10.6.3: ask once for the guest's credit while it has none for us.
        conn.credit_asked = True
        conn.ops |= P_CREDIT_REQUEST
    if not conn.dead and (conn.ops or (conn.readable and conn.peer_free() > 0)):
        _schedule(conn, ready)
    return 1


cdef int _input_nogil(State st, Conn c, FdPump pump) noexcept nogil:
    """InputPump.pump_nogil (see there)."""
    cdef Py_ssize_t added = 0
    cdef int rc
    st.nogil_passes += 1
    if (not st.live or not st.idle or c.dead or c.seq or not c.armed or c.readable
            or not _wants_input(c)):
        st.nogil_handed += 1
        return 1
    rc = _rx_conn_nogil(st, c, False, &added)
    if rc == 2 and not c.ops and _wants_input(c):
        rc = 0  # drained, watched still: as pump_c leaves it
    elif rc == 3 and pump.mute_nogil() == 0:
        # The credit used up, its packet sent: the socket (data waiting, as far as
        # we know) is not watched until the guest's credit comes (pump_c leaves
        # it so, with remove_reader).
        c.readable = True
        c.armed = False
        c.muted = True
        c.mpump = <PyObject *>pump
        rc = 0
    elif rc != 1:
        rc = 1  # no buffer left with data waiting, something owed: pump_c
    if _signal_nogil(st, RX, added):
        rc = 1
    if rc:
        st.nogil_handed += 1
    return rc


@cython.final
cdef class InputPump(FdPump):
    """A connection's host socket turned readable, served in compiled code (the
    device's ``_on_input`` without leaving the loop's poll): the connection is
    scheduled and the rx queue filled at once (:func:`fill_rx`), the socket left
    watched when that drained it, which is the common case, so the watch costs
    nothing per wake-up; else the device's ``_watch_input`` stops watching it (no
    rx buffer or no credit for the rest).  Answers 1 (the Python path) when the
    connection is not one the compiled path serves now (a seqpacket one, the
    compiled path off, rx not the device's, the connection's data already
    waiting)."""

    cdef object device
    cdef State st
    cdef Conn conn

    def __init__(self, device, Conn conn not None):
        self.device = device
        self.st = <State?>device._fast
        self.conn = conn
        self.offers_nogil = self.st.nogil

    cdef int pump_nogil(self) noexcept nogil:
        """:meth:`pump_c` without the GIL, for the steady state (the module
        docstring's rule): nothing else owed to rx, the connection a stream whose
        socket is watched and the guest has credit for.  Its data goes into the
        posted rx buffers (:func:`_rx_conn_nogil`), with the used notification;
        when that leaves the socket drained and nothing owed, the socket stays
        watched and nothing else changes (what ``pump_c`` does then); when the
        guest's credit ran out (its credit packet sent), the connection is
        readable and the socket's wake-ups muted (``muted``: what ``pump_c`` does
        with ``remove_reader``, undone the same way).  Otherwise :meth:`pump_c`
        goes on, from where this left the connection (its socket still watched,
        not marked readable)."""
        return _input_nogil(self.st, self.conn, self)

    def serve_nogil(self):
        """Serve a readiness as the vhost-user loop's nogil phase does (the GIL
        released); True when :meth:`pump_c` must go on, as the loop would."""
        cdef int rc
        with nogil:
            rc = self.run_nogil()
        return rc != 0

    def __call__(self):
        """The loop's callback when :meth:`pump_c` hands over (the device's ``_on_input``)."""
        self.device._on_input(self.conn, self)

    cdef int pump_c(self) except -1:
        cdef Conn conn = self.conn
        cdef State st = self.st
        st.live = False
        _unpend(st)
        if conn.muted and not conn.dead:
            # A hang-up or error on a muted socket (the kernel reports those anyway):
            # not watched, as the GIL path leaves it.
            _disarm_input(self.device, conn)
            return 0
        if conn.dead or conn.seq or not conn.armed or conn.readable or not st.compiled or not st.rx_live:
            return 1
        conn.readable = True
        _schedule(conn, st.ready)
        _fill_rx_c(self.device, st)
        if _wants_input(conn) != conn.armed:
            self.device._watch_input(conn)
        _settle(self.device, st)
        return 0


def fill_rx(object device, State st):
    """Write pending packets into the guest's rx buffers (§5.10.6.4), one per chain
    (see the module docstring), until nothing is pending or no buffer is left, with
    the notification protocol of §2.7.10; nothing while the rx queue is not the
    device's (``rx_live``, an inactive device, a queue not ready).  Returns the
    number of chains completed (counted in ``device.chains_served``; the driver
    notified once, if it wants it).  A chain popped and left unused goes back to
    the avail ring.

    Raises:
        InvalidAvailRingIndex, InvalidDescriptorIndex, QueueError, GuestMemoryError:
            from the ring, as ``Queue.pop_chain``/``add_used`` raise them.
    """
    cdef Py_ssize_t added
    st.live = False
    _unpend(st)
    added = _fill_rx_c(device, st)
    _settle(device, st)
    return added


cdef Py_ssize_t _fill_rx_c(object device, State st) except -1:
    """:func:`fill_rx` within a pass (the caller settles)."""
    cdef Queue queue
    if not st.rx_live or not device.active:
        return 0
    queue = device.queues[RX]
    if not queue._ready:
        return 0
    if not st.compiled:
        device._fill_rx_py()
        return 0
    return _fill_rx(device, st, queue)


cdef Py_ssize_t _fill_rx(object device, State st, Queue queue) except -1:
    cdef uint16_t head = 0
    cdef bint have = False
    cdef DescriptorChain chain = None
    cdef Writer w
    cdef Conn conn
    cdef Py_ssize_t added = 0
    cdef uint64_t guest_cid = st.guest_cid
    cdef uint32_t buf_alloc = st.buf_alloc
    ready = st.ready
    loose = st.loose
    try:
        while loose or ready:
            if not have:
                if not loose:
                    conn = <Conn>ready[0]
                    if (not conn.dead and not conn.seq and conn.readable
                            and not conn.ops & P_BEFORE_DATA and conn.peer_free() > 0
                            and _rx_batch(device, queue, conn, ready, guest_cid, buf_alloc, &added)):
                        continue
                # pop_head serves the resubmit list first (a reconnect's in-flight heads).
                if not queue.pop_head(&head):
                    # Wait for the driver's kick (§2.7.10), unless buffers came meanwhile.
                    if queue.enable_notification_c():
                        continue
                    break
                if head >= queue._size:
                    raise InvalidDescriptorIndex(
                        f"head descriptor index {head} out of range (queue size {queue._size})")
                chain = make_chain(queue._snap, queue._memory, queue._desc, queue._desc_gpa,
                                   queue._size, head)
                have = True
            w = make_writer(chain)
            if w.avail < HDR_SIZE:
                device._warn("rx", "rx buffer of %d bytes cannot hold a header", w.avail)
                queue.add_used_c(head, 0)
                added += 1
                have = False
                continue
            used = None
            if not loose:
                conn = <Conn>ready[0]
                if (not conn.dead and not conn.seq and conn.readable
                        and not conn.ops & P_BEFORE_DATA and conn.peer_free() > 0):
                    ready.popleft()
                    conn.in_ready = False
                    used = _rx_data(device, conn, w, guest_cid, buf_alloc)
                    if used is None and not conn.dead:
                        used = device._produce_ops(conn, w)
                    if not conn.dead and (conn.ops or (conn.readable and conn.peer_free() > 0)):
                        _schedule(conn, ready)
                elif not conn.dead and conn.ops & (P_REQUEST | P_RESPONSE) and not conn.ops & P_RST:
                    # A connection's first packet: REQUEST (host-initiated) or RESPONSE.
                    ready.popleft()
                    conn.in_ready = False
                    if conn.ops & P_REQUEST:
                        conn.ops &= ~P_REQUEST
                        _put_hdr(w, conn, OP_REQUEST, 0, guest_cid, buf_alloc)
                    else:
                        conn.ops &= ~P_RESPONSE
                        _put_hdr(w, conn, OP_RESPONSE, 0, guest_cid, buf_alloc)
                    used = HDR_SIZE
                    if conn.ops or (conn.readable and conn.peer_free() > 0):
                        _schedule(conn, ready)
                elif (not conn.dead and not conn.readable and conn.ops & P_SHUTDOWN
                        and not conn.ops & P_BEFORE_DATA and not conn.seq):
                    # The host's end of file, after its data (§5.10.6.5).
                    ready.popleft()
                    conn.in_ready = False
                    conn.ops &= ~P_SHUTDOWN
                    _put_hdr(w, conn, OP_SHUTDOWN, 0, guest_cid, buf_alloc, conn.host_shut & SHUTDOWN_BOTH)
                    used = HDR_SIZE
                    if conn.ops:
                        _schedule(conn, ready)
                elif (not conn.dead and not conn.readable and conn.ops
                        and not conn.ops & ~P_CREDIT):
                    # Only credit to say: CREDIT_UPDATE, else CREDIT_REQUEST (§5.10.6.3).
                    ready.popleft()
                    conn.in_ready = False
                    if conn.ops & P_CREDIT_UPDATE:
                        _put_hdr(w, conn, OP_CREDIT_UPDATE, 0, guest_cid, buf_alloc)
                    else:
                        conn.ops &= ~P_CREDIT_REQUEST
                        _put_hdr(w, conn, OP_CREDIT_REQUEST, 0, guest_cid, buf_alloc)
                    used = HDR_SIZE
                    if conn.ops:
                        _schedule(conn, ready)
                else:
                    used = device._produce(w)
            else:
                used = device._produce(w)
            if used is None:
                continue
            queue.add_used_c(head, used)
            added += 1
            have = False
    finally:
        if have:
            # Popped and unused: the next pop returns it (a resubmitted head too,
            # which moving next_avail back would lose).
            queue.unpop(head)
        if added:
            st.chains += <unsigned long long>added
            _notify(device, st, queue, RX)
    return added
