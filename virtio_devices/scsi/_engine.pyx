# cython: language_level=3
# distutils: libraries = uring
"""The compiled request path of virtio-scsi: READ/WRITE(10/16) through io_uring.

:class:`Engine` serves the common shape of a request-queue chain without Python:
a well-ordered chain (device-readable buffers, then device-writable ones; VIRTIO
1.2 §2.7.4.2) whose header names LUN k of target 0 in single-level form and whose
CDB is READ(10), WRITE(10), READ(16) or WRITE(16) with no protection field, no
NACA, a non-zero transfer length of at most 0xFFFF blocks inside the LUN, a
writable LUN for a write, and data buffers at least as long as the transfer.  Such
a request becomes one io_uring ``readv``/``writev`` SQE straight between the image
fd and guest memory (a FUA write with ``RWF_DSYNC``: SBC-4 §5.40, on stable storage
before GOOD).  :meth:`Engine.submit` refuses every other chain, which the device's
Python path then serves: that path answers every refusal the way the command set
demands, and every check here is a subset of its checks.

:meth:`Engine.serve` drains a request queue in one call: it pops every chain,
serves those of that shape and hands the others back, in order, for the Python
path.  A read is first tried with ``preadv2(RWF_NOWAIT)``: a page-cache hit is
one system call and completes in the same call (from ``pool_min_cached_read``,
256 KiB, a read goes to the engine's threads instead, below: several large
copies at once).  A buffered write (no FUA) is
done inline too: with ``pwritev2(RWF_NOWAIT)`` where the file system supports
it (XFS, btrfs), else (ext4 and tmpfs refuse it) with a plain ``pwritev2``
that is timed: one slower than :attr:`Engine.slow_ns` (dirty-page throttling, a
journal wait, block allocation) sends the LUN's writes to the ring, and 64 ring
writes in a row that complete faster than that bring them back.  A page-cache
write is what the Rust daemon does in its one thread for every write; the ring
bounds how long such a write can hold the loop to one slow write per episode.

A long drain does not keep its completions from the driver until its end: every
``signal_every`` requests it completed at once it asks whether the driver wants
a notification (VIRTIO 1.2 §2.7.10, with EVENT_IDX only, where the driver names
the entry it waits for) and sends it through the transport's signaller, so that a
driver on another CPU refills its ring while the drain goes on.  Where the driver
shares this thread's CPU, waking it preempts the drain (two context switches for a
few entries): a drain after whose early notification this thread was preempted
(its involuntary context switches, ``getrusage(RUSAGE_THREAD)``) holds the queue's
early notifications back for a while (1 ms, doubling while it repeats up to
16 ms, halving while it does not).

Everything else (a read that would wait, a FUA write, a write that would block)
goes to io_uring: submitted on the loop thread once per drain, the kernel's own
workers run what cannot complete at once, completions are counted on an eventfd
that the device's event loop watches, and :meth:`Engine.reap` writes the
response headers (GOOD, the residual of §5.6.6.1) and puts every finished chain
in its used ring in one call.  A completion that is not the whole transfer (an
error, a short read of an image that shrank, a short write) goes back to Python
with what was moved, which finishes or answers it.

While a queue deep enough is in flight (``spin_min``, 8 requests), the thread
that reaped a completion does not go back to sleep at once: it waits up to
``spin_ns`` (50 µs, about the time a driver takes to refill what it was given)
for the next completion and reaps it too, so the driver hears of each one at once
and neither the next completion nor the driver's next kick has to wake this
thread.  The wait releases the GIL, ends as soon as the event loop has anything
else to do, and gives way to any task that takes this CPU (1 ms without it,
doubling while that repeats).

The ring defers its completions to the thread that submits (the event loop's,
``IORING_SETUP_DEFER_TASKRUN`` where the kernel has it): a disk's completion
then signals the eventfd and nothing else, and the reap asks the kernel for the
completions, rather than the kernel interrupting the loop's ``epoll_wait`` with
task work to post them.

An O_DIRECT transfer makes the kernel pin every page of its buffers for the time
it runs, which for 1 MiB costs more than the rest of the request.  So guest RAM
is registered with the ring once per memory table, once it is allocated
(io_uring's "fixed" buffers, ``fixed_max`` bytes of it at most, in pieces of at
most 1 GiB; pinning would allocate what the guest never touched), and a transfer
whose data lies in one piece goes to the ring as a fixed read or write, whatever
its size: its pages were pinned at registration (in several guest buffers: a
vectored fixed transfer, Linux 6.15).  Other large O_DIRECT transfers
(``pool_min_read``/``pool_min_write``), and all of them where registration was
refused, go to the engine's own threads instead: plain C threads that run a
blocking ``preadv2``/``pwritev2`` without the GIL and touch only their slot (four
of them pin four transfers' pages at once, where the ring would pin them one
after another on the loop's thread); a completion into an empty done list writes
the same eventfd, and :meth:`Engine.reap` finishes ring and thread completions
alike.
"""

import logging
import os

from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.errno cimport E2BIG, EAGAIN, EINTR, EOPNOTSUPP, errno
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from posix.uio cimport iovec
from posix.unistd cimport close, read
from posix.unistd cimport write as fd_write

from virtio_queue._linux cimport eventfd, EFD_CLOEXEC, EFD_NONBLOCK, pollfd, poll, POLLIN
from virtio_queue.chain cimport ChainCursor, DescriptorChain, chain_next, chain_start, make_chain
from virtio_queue.includes.virtio_ring cimport VRING_DESC_F_WRITE, vring_desc
from virtio_queue.memory cimport MemorySnapshot, snap_ptr, snap_ptr_w
from virtio_queue.queue cimport Queue
from virtio_devices._pump cimport FdPump


log = logging.getLogger("virtio_devices.scsi")


cdef extern from "<sys/mman.h>" nogil:
    int mincore(void *addr, size_t length, unsigned char *vec)

cdef extern from "<unistd.h>" nogil:
    long sysconf(int name)
    enum:
        _SC_PAGESIZE


cdef extern from "<linux/fs.h>" nogil:
    enum:
        RWF_DSYNC
        RWF_NOWAIT

cdef extern from "<sys/uio.h>" nogil:
    ssize_t preadv2(int fd, const iovec *iov, int iovcnt, long long offset, int flags)
    ssize_t pwritev2(int fd, const iovec *iov, int iovcnt, long long offset, int flags)

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    pthread_t pthread_self()
    int pthread_equal(pthread_t a, pthread_t b)
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_create(pthread_t *thread, const void *attr, void *(*start)(void *) noexcept nogil,
                       void *arg)
    int pthread_join(pthread_t thread, void **retval)
    int pthread_mutex_init(pthread_mutex_t *mutex, const void *attr)
    int pthread_mutex_lock(pthread_mutex_t *mutex)
    int pthread_mutex_unlock(pthread_mutex_t *mutex)
    int pthread_cond_init(pthread_cond_t *cond, const void *attr)
    int pthread_cond_wait(pthread_cond_t *cond, pthread_mutex_t *mutex)
    int pthread_cond_signal(pthread_cond_t *cond)
    int pthread_cond_broadcast(pthread_cond_t *cond)

cdef extern from "<sys/resource.h>" nogil:
    struct rusage:
        long ru_nivcsw
    enum:
        RUSAGE_THREAD
    int getrusage(int who, rusage *usage)

cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec *ts)
    enum:
        CLOCK_MONOTONIC

cdef extern from "<liburing.h>" nogil:
    struct io_uring_sq:
        unsigned *kflags

    struct io_uring:
        io_uring_sq sq
        int ring_fd

    enum:
        IORING_SETUP_R_DISABLED
        IORING_SETUP_SINGLE_ISSUER
        IORING_SETUP_DEFER_TASKRUN
        IORING_SETUP_TASKRUN_FLAG
        IORING_SQ_TASKRUN
        IORING_REGISTER_ENABLE_RINGS

cdef extern from "<sys/syscall.h>" nogil:
    enum:
        SYS_io_uring_register
    long syscall(long number, ...)

    struct io_uring_sqe:
        int rw_flags
        uint64_t user_data
        uint16_t buf_index

    struct io_uring_probe:
        pass

    struct io_uring_cqe:
        uint64_t user_data
        int res

    struct __kernel_timespec:
        int64_t tv_sec
        long long tv_nsec

    int io_uring_queue_init(unsigned entries, io_uring *ring, unsigned flags)
    void io_uring_queue_exit(io_uring *ring)
    io_uring_sqe *io_uring_get_sqe(io_uring *ring)
    void io_uring_prep_readv(io_uring_sqe *sqe, int fd, const iovec *iovecs, unsigned nr_vecs,
                             uint64_t offset)
    void io_uring_prep_writev(io_uring_sqe *sqe, int fd, const iovec *iovecs, unsigned nr_vecs,
                              uint64_t offset)
    int io_uring_submit(io_uring *ring)
    int io_uring_peek_cqe(io_uring *ring, io_uring_cqe **cqe_ptr)
    void io_uring_cqe_seen(io_uring *ring, io_uring_cqe *cqe)
    int io_uring_wait_cqe_timeout(io_uring *ring, io_uring_cqe **cqe_ptr, __kernel_timespec *ts)
    int io_uring_register_eventfd(io_uring *ring, int fd)
    void io_uring_prep_read_fixed(io_uring_sqe *sqe, int fd, void *buf, unsigned nbytes,
                                  uint64_t offset, int buf_index)
    void io_uring_prep_write_fixed(io_uring_sqe *sqe, int fd, const void *buf, unsigned nbytes,
                                   uint64_t offset, int buf_index)
    int io_uring_register_buffers(io_uring *ring, const iovec *iovecs, unsigned nr_iovecs)
    void io_uring_prep_rw(int op, io_uring_sqe *sqe, int fd, const void *addr, unsigned len,
                          uint64_t offset)
    io_uring_probe *io_uring_get_probe_ring(io_uring *ring)
    void io_uring_free_probe(io_uring_probe *probe)
    int io_uring_opcode_supported(const io_uring_probe *p, int op)
    int io_uring_unregister_buffers(io_uring *ring)
    int io_uring_get_events(io_uring *ring)
    unsigned io_uring_cq_ready(const io_uring *ring)


# virtio_scsi_cmd_req and virtio_scsi_cmd_resp (§5.6.6.1), as in device.py.
DEF REQ_HEADER = 51
DEF RESP_HEADER = 108
DEF CDB_OFFSET = 19
DEF BLOCK_SHIFT = 9
DEF MAX_BLOCKS = 0xFFFF
# Buffers per direction that a request may have for this path (more: Python); the
# config space's seg_max is 126.
DEF MAX_SEGS = 128
DEF RESP_SEGS = 4
DEF MAX_QUEUES = 64
# Threads for large O_DIRECT transfers that are not in a registered buffer (made at
# the first one): on a virtio disk, blocking threads keep more of them at the
# device than io_uring's inline submission, which pins their pages one transfer
# after another, does; small ones cost less through the ring (docs/performance.md).
DEF DIRECT_THREADS = 32
# Registered buffers (io_uring "fixed" buffers) for O_DIRECT transfers: guest RAM
# pinned once per memory table instead of per request; a registered buffer is at
# most 1 GiB (the kernel's limit), a region larger than that is several.
DEF MAX_FIXED = 64
# Vectored transfers through a registered buffer (Linux 6.15; liburing 2.3's
# headers are older than these opcodes).
DEF OP_READV_FIXED = 60
DEF OP_WRITEV_FIXED = 61
DEF FIXED_PIECE = 1 << 30
DEF FIXED_MAX = 16 << 30
# Registering pins, and so allocates, every page: guest RAM with more than this
# not yet allocated is not registered (the loop would stall while the kernel
# allocates it, and the guest's untouched RAM would be spent); it is looked at
# again after FIXED_RETRY_NS, doubling up to 64 times that.
DEF FIXED_POPULATE_MAX = 64 << 20
DEF FIXED_RETRY_NS = 1000000000
DEF MINCORE_CHUNK = 16384
DEF POOL_MIN = 65536
DEF POOL_MIN_CACHED_READ = 256 << 10
DEF POOL_MIN_CACHED_WRITE = 1 << 62
# What O_DIRECT asks of buffer addresses and lengths (the usual logical block size;
# a device with larger sectors answers EINVAL, and Python then uses the page cache).
DEF DIRECT_ALIGN = 512
# Inline buffered writes (see Engine): one slower than Engine.slow_ns (default
# SLOW_NS) sends the LUN's writes to the ring; this many ring writes in a row
# faster than it bring them back.
DEF SLOW_NS = 1000000
DEF FAST_STREAK = 64
# Queued SQEs are handed to the kernel every this many (and at the end of a drain):
# a drain's requests reach the disk in a few groups rather than all at its end,
# which keeps a deep queue of O_DIRECT transfers moving (docs/performance.md).
DEF SUBMIT_BATCH = 4
# ...except while the engine has at most this many requests in flight, the new one
# included: those go to the kernel at once.  When a driver refills its whole queue
# after a burst of completions, the drain finds the disk idle, and the disk then
# starts on its first requests instead of waiting for a group (docs/performance.md).
DEF SUBMIT_LEAD = 2
# A drain asks every this many requests it completed at once (0: only at its
# end) whether the driver wants a notification (EVENT_IDX only: the driver says
# when), so that a driver on another CPU refills while the drain goes on
# (docs/performance.md).
DEF SIGNAL_EVERY = 8
# A drain whose early notification was followed by this thread being preempted
# (the driver woke on this CPU) sends none for the queue's next HOLD_MIN_NS,
# doubling at each such drain in a row up to HOLD_MAX_NS: a time, not a number of
# drains, so that a driver that moved to another CPU is noticed as soon.
DEF HOLD_MIN_NS = 1000000
# The wait for completions while at least SPIN_MIN requests are in flight
# (Engine.spin_ns): up to SPIN_NS after the last completion (about a driver's turn:
# its refill's kick is then seen without a wake-up), SPIN_MAX_NS in all before the
# event loop has its turn, looking at the loop's fds and at this thread's
# preemption every SPIN_CHECK_NS (docs/performance.md).
DEF SPIN_NS = 50000
DEF SPIN_MIN = 8
DEF SPIN_CHECK_NS = 5000
DEF SPIN_MAX_NS = 200000
DEF HOLD_MAX_NS = 16000000
# LUN write modes.
DEF W_NOWAIT = 0    # try pwritev2(RWF_NOWAIT) inline; EAGAIN: the ring
DEF W_INLINE = 1    # the file system refuses RWF_NOWAIT: timed pwritev2 inline
DEF W_RING = 2      # an inline write was slow: the ring, until writes are fast again

cdef struct Slot:
    uint16_t head
    uint8_t queue
    uint8_t write
    uint8_t fua
    uint8_t nresp
    uint32_t nbytes
    uint32_t resid
    int lun
    uint64_t lba
    int64_t t_submit
    int fd          # the fd a pool thread uses
    int res         # a pool thread's result (bytes, or -errno)
    int niov
    iovec resp[RESP_SEGS]
    iovec iov[MAX_SEGS]


cdef struct Pool:
    pthread_mutex_t mu
    pthread_cond_t cv
    bint stop
    int cap            # ring capacity: the engine's slots
    int *jobs          # slots to run
    int jhead
    int jcount
    int *done          # slots run, for reap
    int dhead
    int dcount
    Slot *slots
    int efd            # the engine's eventfd: one write per completion
    int nthreads
    pthread_t threads[DIRECT_THREADS]


cdef void *_pool_worker(void *arg) noexcept nogil:
    """A pool thread: run O_DIRECT transfers until the pool stops.  It touches the
    slot it took and the pool's rings (under the mutex), never a Python object."""
    cdef Pool *p = <Pool *>arg
    cdef int slot
    cdef Slot *s
    cdef ssize_t r
    cdef uint64_t one = 1
    cdef bint first
    while True:
        pthread_mutex_lock(&p.mu)
        while p.jcount == 0 and not p.stop:
            pthread_cond_wait(&p.cv, &p.mu)
        if p.jcount == 0:
            pthread_mutex_unlock(&p.mu)
            return NULL
        slot = p.jobs[p.jhead]
        p.jhead = (p.jhead + 1) % p.cap
        p.jcount -= 1
        pthread_mutex_unlock(&p.mu)
        s = &p.slots[slot]
        if s.write:
            r = pwritev2(s.fd, s.iov, s.niov, <long long>(s.lba << BLOCK_SHIFT), RWF_DSYNC if s.fua else 0)
        else:
            r = preadv2(s.fd, s.iov, s.niov, <long long>(s.lba << BLOCK_SHIFT), 0)
        s.res = <int>r if r >= 0 else -errno
        pthread_mutex_lock(&p.mu)
        p.done[(p.dhead + p.dcount) % p.cap] = slot
        p.dcount += 1
        first = p.dcount == 1
        pthread_mutex_unlock(&p.mu)
        # Only a completion into an empty done ring wakes the loop: reap drains
        # the ring to empty under the mutex after it cleared the eventfd, so every
        # completion it has not taken either finds the ring non-empty (reap takes
        # it) or signals.
        if first:
            fd_write(p.efd, &one, 8)


cdef inline uint32_t _be16(const unsigned char *p) noexcept nogil:
    return (<uint32_t>p[0] << 8) | p[1]


cdef inline uint32_t _be32(const unsigned char *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint64_t _be64(const unsigned char *p) noexcept nogil:
    return (<uint64_t>_be32(p) << 32) | _be32(p + 4)


cdef inline int64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline long long _nivcsw() noexcept nogil:
    """This thread's involuntary context switches so far."""
    cdef rusage ru
    if getrusage(RUSAGE_THREAD, &ru) != 0:
        return 0  # cannot fail for RUSAGE_THREAD on Linux; no preemption seen
    return ru.ru_nivcsw


cdef inline void _claim(Slot *s, uint16_t head, int queue, int lun, uint64_t lba) noexcept nogil:
    """Fill in the request a slot now holds (its buffers are set already), for
    either engine: the pool threads or io_uring."""
    s.head = head
    s.queue = <uint8_t>queue
    s.lun = lun
    s.lba = lba
    s.t_submit = _now_ns()


cdef void _respond_good(Slot *s) noexcept nogil:
    """Write the response header of a whole transfer: GOOD, VIRTIO_SCSI_S_OK, no
    sense, the residual (§5.6.6.1)."""
    cdef unsigned char resp[RESP_HEADER]
    cdef size_t off = 0
    cdef int i
    memset(resp, 0, RESP_HEADER)
    resp[4] = s.resid & 0xFF
    resp[5] = (s.resid >> 8) & 0xFF
    resp[6] = (s.resid >> 16) & 0xFF
    resp[7] = s.resid >> 24
    for i in range(s.nresp):
        memcpy(s.resp[i].iov_base, resp + off, s.resp[i].iov_len)
        off += s.resp[i].iov_len


cdef int _take(const iovec *src, int nsrc, size_t skip, size_t n, iovec *dst, int maxdst) noexcept nogil:
    """Fill ``dst`` with the ``n`` bytes of ``src`` after its first ``skip``; the
    number of segments, or -1 if more than ``maxdst`` are needed."""
    cdef int i, k = 0
    cdef size_t take
    for i in range(nsrc):
        if n == 0:
            break
        if skip >= src[i].iov_len:
            skip -= src[i].iov_len
            continue
        if k == maxdst:
            return -1
        take = src[i].iov_len - skip
        if take > n:
            take = n
        dst[k].iov_base = <unsigned char *>src[i].iov_base + skip
        dst[k].iov_len = take
        k += 1
        n -= take
        skip = 0
    return k


cdef inline bint _seg_add(iovec *v, int *n, unsigned char *p, size_t length) noexcept nogil:
    """Append ``[p, p+length)`` to the ``n`` segments of ``v``, merged into the last
    when it continues it; False when ``p`` is NULL (not in guest memory) or the
    ``MAX_SEGS`` segments are used up (the Python path serves such a chain)."""
    if p == NULL or n[0] == MAX_SEGS:
        return False
    if n[0] and <unsigned char *>v[n[0] - 1].iov_base + v[n[0] - 1].iov_len == p:
        v[n[0] - 1].iov_len += length
        return True
    v[n[0]].iov_base = p
    v[n[0]].iov_len = length
    n[0] += 1
    return True

cdef long long _not_resident(const iovec *v, int n) noexcept nogil:
    """Bytes of the ranges ``v[:n]`` whose pages are not in memory (``mincore``; a
    shared memfd's pages count once allocated, whoever touched them).  A range
    ``mincore`` refuses counts whole."""
    cdef long page = sysconf(_SC_PAGESIZE)
    cdef unsigned char vec[MINCORE_CHUNK]
    cdef long long missing = 0
    cdef uint64_t start, end, at, length
    cdef size_t k, pages
    cdef int i
    if page <= 0:
        page = 4096
    for i in range(n):
        start = <uint64_t>v[i].iov_base & ~(<uint64_t>page - 1)
        end = <uint64_t>v[i].iov_base + v[i].iov_len
        at = start
        while at < end:
            length = end - at
            if length > <uint64_t>MINCORE_CHUNK * page:
                length = <uint64_t>MINCORE_CHUNK * page
            pages = (length + page - 1) // page
            if mincore(<void *>at, length, vec) != 0:
                missing += pages * page
            else:
                for k in range(pages):
                    if not (vec[k] & 1):
                        missing += page
            at += pages * page
    return missing


cdef class Engine:
    """One io_uring for a device's request queues, and the LUNs it may serve.

    ``fds[k]``, ``blocks[k]`` and ``read_only[k]`` describe LUN k.  ``entries`` is
    the ring's size and the most requests in flight at once (a chain beyond it is
    refused to Python).  ``inline_writes=False``: every write through the ring.
    ``direct_fds[k]``: an O_DIRECT fd of LUN k (or -1), for transfers whose buffers
    are 512-byte aligned: never inline; reads of at least ``pool_min_read`` bytes
    and writes of at least ``pool_min_write`` (64 KiB each) run on the engine's
    own threads (``direct_threads``, 32, made at the first; 0: none), smaller ones
    on the ring; page-cache reads of at least ``pool_min_cached_read`` bytes
    (256 KiB: several such copies at once on the threads outrun one after another
    on the loop's thread) and writes of at least ``pool_min_cached_write`` (never
    by default: inline is faster for them) too.  An O_DIRECT transfer in one
    buffer goes to the ring as a fixed (registered) buffer at any size: the
    chain's memory table, if at most ``fixed_max`` bytes (16 GiB; 0: never) of
    writable RAM, is registered at the first such transfer and again when a chain
    of a new table comes with nothing in flight; ``fixed_requests`` and
    ``fixed_registrations`` count them, ``fixed_bytes`` is what is registered now
    (:meth:`release_fixed` gives it back), ``fixed_error`` is the errno of a
    refused registration (E2BIG: too much RAM; EAGAIN: more than
    ``fixed_populate_max``, 64 MiB, of it not allocated yet, looked at again after
    ``fixed_retry_ns``, 1 s, doubling) or 0.  A transfer in several buffers goes
    the same way when they all lie in one registered buffer and the kernel has
    vectored fixed transfers (``vec_fixed``: Linux 6.15; false: the threads).
    ``submit_batch``: queued ring requests are submitted every this many (4), and
    at the end of each drain, but each at once while at most ``submit_lead`` (2)
    are in flight with it; ``submit_calls`` counts the submissions.
    ``signal_every``: a drain asks whether the driver wants a notification every
    this many requests completed at once (8; 0: only at its end);
    ``early_signals`` counts those sent; ``signal_adapt`` (True) holds them back
    for a while after one preempted this thread (:meth:`serve`),
    ``early_preempted`` counts such drains.
    ``spin_ns`` (50 µs; 0: never) and ``spin_min`` (8): after a reap with at least
    ``spin_min`` requests in flight, wait that long for the next completion on this
    thread (:meth:`reap`; ``spin_max_ns`` in all, 200 µs); ``loop_fd`` (-1: none),
    the event loop's epoll fd, ends the wait when readable; ``spin_reaps`` and
    ``spin_preempted`` count the completions it reaped and the waits that gave way;
    ``spin_give_way`` (True) false: the wait goes on when preempted (tests).
    ``reaps_pumped``: completions a :class:`ReapPump` finished without Python.
    ``defer_taskrun`` (True, where the kernel has it: Linux 6.1): the kernel keeps
    a completion until the ring's thread asks for it (``IORING_SETUP_SINGLE_ISSUER
    | IORING_SETUP_DEFER_TASKRUN``) and only signals the eventfd, instead of
    interrupting that thread's wait (``epoll_wait`` returning EINTR) to post it;
    the ring belongs to the first thread that submits, another thread's requests
    take the Python path while that one's are in flight and get a new ring once
    none is (``ring_moves`` counts them).
    ``inline_reads``, ``inline_writes``, ``ring_requests``, ``pool_requests`` and
    ``slow_writes`` count what was done inline, what went to the ring and to the
    threads, and how often an inline write was slow.

    Raises:
        OSError: io_uring is not available (``io_uring_disabled``, a seccomp
            filter, an old kernel) or the eventfd cannot be made.
    """

    cdef io_uring ring
    cdef bint _open
    cdef readonly bint defer_taskrun
    cdef bint _enabled
    cdef pthread_t _owner
    cdef readonly long long ring_moves
    cdef readonly int fd
    cdef Slot *slots
    cdef int nslots
    cdef int *free
    cdef int nfree
    cdef int unsubmitted
    cdef int *fds
    cdef int *dfds
    cdef uint64_t *blocks
    cdef uint8_t *read_only
    cdef uint8_t *wmode
    cdef uint8_t *nowait_read
    cdef int *streak
    cdef bint allow_inline
    cdef public long long slow_ns
    cdef readonly long long inline_reads
    cdef readonly long long ring_requests
    cdef readonly long long pool_requests
    cdef readonly long long inline_writes
    cdef readonly long long slow_writes
    cdef int nluns
    cdef Pool *pool
    cdef public int direct_threads
    cdef public long long pool_min_read
    cdef public long long pool_min_write
    cdef public long long pool_min_cached_read
    cdef public long long pool_min_cached_write
    cdef public int submit_batch
    cdef public int submit_lead
    cdef readonly long long submit_calls
    cdef public long long fixed_max
    cdef readonly long long fixed_requests
    cdef readonly long long fixed_registrations
    cdef readonly int fixed_error
    cdef readonly long long fixed_bytes
    cdef public long long fixed_populate_max
    cdef public long long fixed_retry_ns
    cdef int64_t _fixed_retry_at
    cdef int64_t _fixed_backoff
    cdef public bint vec_fixed
    cdef object _fixed_snap
    cdef int _nfixed
    cdef uint64_t _fixed_lo[MAX_FIXED]
    cdef uint64_t _fixed_hi[MAX_FIXED]
    cdef public int signal_every
    cdef readonly long long early_signals
    cdef public bint signal_adapt
    cdef public object switch_counter
    cdef readonly long long early_preempted
    cdef public long long hold_min_ns
    cdef public long long hold_max_ns
    cdef public long long spin_ns
    cdef public int spin_min
    cdef readonly long long spin_reaps
    cdef readonly long long spin_preempted
    cdef int64_t spin_until
    cdef public long long spin_max_ns
    cdef public bint spin_give_way
    cdef public int loop_fd
    cdef int64_t spin_backoff
    cdef int64_t es_until[MAX_QUEUES]
    cdef int64_t es_backoff[MAX_QUEUES]
    cdef list _chains
    cdef list _queues
    cdef list _signallers
    cdef int in_flight_q[MAX_QUEUES]
    cdef list _held
    cdef object _held_reap
    cdef readonly long long reaps_pumped
    cdef readonly long long pumped_chains
    cdef readonly unsigned long long pumped_bytes

    def __cinit__(self, *args, **kwargs):
        # Every C pointer starts NULL (the object's memory is zeroed); nothing to
        # close until __init__ opened it.
        self.fd = -1
        self._open = False

    def __init__(self, fds, blocks, read_only, int entries=256, bint inline_writes=True,
                 direct_fds=None, bint defer_taskrun=True):
        cdef int i
        if self._open or self.slots != NULL:
            raise RuntimeError("engine: initialised twice")
        self.nluns = len(fds)
        if len(blocks) != self.nluns or len(read_only) != self.nluns:
            raise ValueError(f"engine: {self.nluns} fds, {len(blocks)} sizes, {len(read_only)} modes")
        if direct_fds is not None and len(direct_fds) != self.nluns:
            raise ValueError(f"engine: {self.nluns} fds, {len(direct_fds)} O_DIRECT fds")
        if entries < 1 or entries > 4096:
            raise ValueError(f"engine: ring of {entries} entries, 1..4096 allowed")
        self.fds = <int *>PyMem_Malloc(sizeof(int) * (self.nluns + 1))
        self.dfds = <int *>PyMem_Malloc(sizeof(int) * (self.nluns + 1))
        self.blocks = <uint64_t *>PyMem_Malloc(sizeof(uint64_t) * (self.nluns + 1))
        self.read_only = <uint8_t *>PyMem_Malloc(self.nluns + 1)
        self.wmode = <uint8_t *>PyMem_Malloc(self.nluns + 1)
        self.nowait_read = <uint8_t *>PyMem_Malloc(self.nluns + 1)
        self.streak = <int *>PyMem_Malloc(sizeof(int) * (self.nluns + 1))
        self.slots = <Slot *>PyMem_Malloc(sizeof(Slot) * entries)
        self.free = <int *>PyMem_Malloc(sizeof(int) * entries)
        if not (self.fds and self.dfds and self.blocks and self.read_only and self.wmode and self.nowait_read
                and self.streak and self.slots and self.free):
            raise MemoryError()
        for i in range(self.nluns):
            self.fds[i] = fds[i]
            self.dfds[i] = direct_fds[i] if direct_fds is not None else -1
            self.blocks[i] = blocks[i]
            self.read_only[i] = bool(read_only[i])
            self.wmode[i] = W_RING if inline_writes == 0 else W_NOWAIT
            self.streak[i] = 0
            self.nowait_read[i] = True
        self.nslots = entries
        self.allow_inline = inline_writes
        self.direct_threads = DIRECT_THREADS
        self.fixed_max = FIXED_MAX
        self.fixed_populate_max = FIXED_POPULATE_MAX
        self.fixed_retry_ns = FIXED_RETRY_NS
        self.pool_min_read = POOL_MIN
        self.pool_min_write = POOL_MIN
        self.pool_min_cached_read = POOL_MIN_CACHED_READ
        self.pool_min_cached_write = POOL_MIN_CACHED_WRITE
        self.submit_batch = SUBMIT_BATCH
        self.submit_lead = SUBMIT_LEAD
        self.signal_every = SIGNAL_EVERY
        self.signal_adapt = True
        self.hold_min_ns = HOLD_MIN_NS
        self.hold_max_ns = HOLD_MAX_NS
        self.spin_ns = SPIN_NS
        self.spin_min = SPIN_MIN
        self.spin_max_ns = SPIN_MAX_NS
        self.spin_give_way = True
        self.loop_fd = -1
        self.switch_counter = None
        for i in range(MAX_QUEUES):
            self.es_until[i] = 0
            self.es_backoff[i] = 0
        self.slow_ns = SLOW_NS
        for i in range(entries):
            self.free[i] = entries - 1 - i
        self.nfree = entries
        self._chains = [None] * entries
        self._held = [None] * MAX_QUEUES
        self._held_reap = None
        self._queues = []
        self._signallers = []
        memset(self.in_flight_q, 0, sizeof(self.in_flight_q))
        self.fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
        if self.fd < 0:
            raise OSError(errno, "eventfd failed")
        self._ring_init(defer_taskrun)

    cdef int _ring_init(self, bint defer) except -1:
        """Make the ring and register the eventfd on it.  ``defer``: a ring whose
        completions are posted only when its one submitting thread asks
        (``IORING_SETUP_DEFER_TASKRUN``, Linux 6.1), made disabled and enabled by
        the first thread that uses it (:meth:`_own`); a kernel without it gets a
        plain ring."""
        cdef int rc = -22
        cdef io_uring_probe *probe
        cdef unsigned flags = (IORING_SETUP_R_DISABLED | IORING_SETUP_SINGLE_ISSUER
                               | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG)
        if defer:
            rc = io_uring_queue_init(self.nslots, &self.ring, flags)
        if rc == -22:  # EINVAL: not asked for, or a kernel before 6.1
            defer = False
            rc = io_uring_queue_init(self.nslots, &self.ring, 0)
        if rc < 0:
            raise OSError(-rc, f"io_uring_queue_init({self.nslots}) failed")
        self._open = True
        self._fixed_snap = None  # a new ring has no registered buffers
        self._nfixed = 0
        self.fixed_bytes = 0
        probe = io_uring_get_probe_ring(&self.ring)
        self.vec_fixed = probe != NULL and io_uring_opcode_supported(probe, OP_READV_FIXED) != 0 \
            and io_uring_opcode_supported(probe, OP_WRITEV_FIXED) != 0
        if probe != NULL:
            io_uring_free_probe(probe)
        self.defer_taskrun = defer
        self._enabled = not defer
        rc = io_uring_register_eventfd(&self.ring, self.fd)
        if rc < 0:
            raise OSError(-rc, "io_uring_register_eventfd failed")
        return 0

    cdef int _own(self) except -1:
        """Whether this thread may submit to the ring and ask for its completions
        (1) or not now (0).  A deferred ring (``defer_taskrun``) belongs to the
        thread that first used it (the event loop's); another thread gets a new
        ring when nothing is in flight (a device served by a new loop thread,
        ``ring_moves`` counts them) and none while something is (0)."""
        if not self.defer_taskrun:
            return 1
        if self._enabled:
            if pthread_equal(self._owner, pthread_self()):
                return 1
            if self.nfree != self.nslots or self.unsubmitted:
                return 0
            io_uring_queue_exit(&self.ring)
            self._open = False
            self._ring_init(True)
            self.ring_moves += 1
            if not self.defer_taskrun:
                return 1
        # (liburing 2.3 as Debian builds it lacks io_uring_enable_rings.)
        if syscall(SYS_io_uring_register, self.ring.ring_fd, IORING_REGISTER_ENABLE_RINGS, NULL, 0) < 0:
            raise OSError(errno, "io_uring_register(IORING_REGISTER_ENABLE_RINGS) failed")
        self._enabled = True
        self._owner = pthread_self()
        return 1

    cdef inline bint _work_pending(self) noexcept nogil:
        """A deferred ring has completions the kernel holds until asked."""
        return self.defer_taskrun and (self.ring.sq.kflags[0] & IORING_SQ_TASKRUN) != 0

    def __dealloc__(self):
        cdef int i
        cdef Pool *p = self.pool
        if p != NULL:
            # Jobs still queued run first (the chains they write to are alive
            # until this returns).
            with nogil:
                pthread_mutex_lock(&p.mu)
                p.stop = True
                pthread_cond_broadcast(&p.cv)
                pthread_mutex_unlock(&p.mu)
                for i in range(p.nthreads):
                    pthread_join(p.threads[i], NULL)
            PyMem_Free(p.jobs)
            PyMem_Free(p.done)
            PyMem_Free(p)
            self.pool = NULL
        if self._open:
            io_uring_queue_exit(&self.ring)
        if self.fd >= 0:
            close(self.fd)
        PyMem_Free(self.fds)
        PyMem_Free(self.dfds)
        PyMem_Free(self.blocks)
        PyMem_Free(self.read_only)
        PyMem_Free(self.wmode)
        PyMem_Free(self.nowait_read)
        PyMem_Free(self.streak)
        PyMem_Free(self.slots)
        PyMem_Free(self.free)

    def attach(self, queues, signallers=None):
        """Serve these queues (the device's, by index) from now on.  ``signallers``:
        a callable of no argument per queue that notifies its driver (the
        transport's compiled ``signaller``), for the notifications :meth:`serve`
        sends partway through a drain (``signal_every``) and those it and
        :meth:`reap` send when they are done; None: it sends none (the caller
        sends what they return).
        Holds on those notifications (``signal_adapt``) and on the wait for
        completions start over."""
        cdef int i
        if len(queues) > MAX_QUEUES:
            raise ValueError(f"engine: {len(queues)} queues, at most {MAX_QUEUES}")
        if signallers is not None and len(signallers) != len(queues):
            raise ValueError(f"engine: {len(queues)} queues, {len(signallers)} signallers")
        self._queues = list(queues)
        self._signallers = list(signallers) if signallers is not None else []
        self._held = [None] * MAX_QUEUES
        self._held_reap = None
        for i in range(MAX_QUEUES):
            self.es_until[i] = 0
            self.es_backoff[i] = 0
        self.spin_until = 0
        self.spin_backoff = 0

    def in_flight(self, int index=-1):
        """Requests of queue ``index`` (every queue: -1) submitted and not reaped."""
        if index < 0:
            return self.nslots - self.nfree
        if index >= MAX_QUEUES:
            return 0
        return self.in_flight_q[index]

    def submit(self, int index, DescriptorChain chain not None):
        """Serve ``chain`` of request queue ``index`` if it has the shape this path
        serves (module docstring): 0 when it is queued for the ring or the threads
        (the ring's last ``submit_batch`` may wait for :meth:`flush`), the used length when it was
        completed at once (an inline write: the caller puts it in the used ring),
        -1 when the Python path must serve it (the chain is untouched then, or
        holds a write that may be written again)."""
        if index >= MAX_QUEUES or index >= len(self._queues):
            return -1
        return self._serve_chain(index, chain)

    def serve(self, int index):
        """Drain request queue ``index`` (notification suppression as VIRTIO 1.2
        §2.7.10 asks), submit what it queued and finish what completed at once.

        Every ``signal_every`` chains completed at once, the driver is notified
        through the queue's signaller (:meth:`attach`) if it asked (EVENT_IDX),
        unless the queue's early notifications are held back: ``signal_adapt``
        (True) counts this thread's involuntary context switches from a drain's
        first early notification to its end, and a drain that was preempted
        (``early_preempted`` counts them) holds the queue's back for
        ``hold_min_ns`` (1 ms), twice as long each time it repeats (up to
        ``hold_max_ns``, 16 ms), half as long again after each probe that was
        not.  ``switch_counter``: a callable that returns the count instead of
        ``getrusage`` (tests).

        Returns ``(served, bytes, signal, rest, refused, bad_heads)``: :meth:`reap`'s
        four (this queue's chains completed here included), then the chains this
        path does not serve (for the Python path, in order) and how many head
        indexes were out of range (consumed, dropped).

        A drain that a :class:`RequestPump` ran and handed over (it had something
        for Python) is returned, or what it raised raised, before a new one.

        Raises:
            InvalidAvailRingIndex: the avail ring is broken.
            QueueNotReady, GuestMemoryError: the ring is unusable.
        """
        if 0 <= index < MAX_QUEUES:
            held = self._held[index]
            if held is not None:
                self._held[index] = None
                if isinstance(held, BaseException):
                    raise held
                return held
        return self._serve(index)

    cdef int _pump(self, int index) except -1:
        """A kick of request queue ``index`` (:class:`RequestPump`): drain it; 0 when
        that is all (counted in ``pumped_chains``, ``pumped_bytes``), 1 when the
        drain has something for Python (a chain refused or that failed, a queue to
        notify without a signaller) or raised: it is held for :meth:`serve`."""
        cdef long served
        try:
            r = self._serve(index)
        except Exception as e:
            self._held[index] = e
            return 1
        served, nbytes, mask, rest, refused, bad = r
        if mask or bad or rest or refused:
            self._held[index] = r
            return 1
        self.pumped_chains += served
        self.pumped_bytes += nbytes
        return 0

    cdef tuple _serve(self, int index):
        """serve() without the held drain."""
        cdef Queue q
        cdef uint16_t head
        cdef DescriptorChain ch
        cdef int used
        cdef long served = 0
        cdef long bad = 0
        cdef unsigned long long nbytes = 0
        cdef list refused = None
        cdef int every = self.signal_every
        cdef int since = 0
        cdef bint probe = False
        cdef long long switches = 0
        if index >= MAX_QUEUES or index >= len(self._queues):
            raise ValueError(f"engine: no queue {index}")
        q = <Queue>self._queues[index]
        if every > 0 and (index >= len(self._signallers) or not q._event_idx):
            every = 0
        if every > 0 and self.signal_adapt and self.es_until[index]:
            if _now_ns() < self.es_until[index]:
                every = 0
            else:
                self.es_until[index] = 0
        while True:
            q.disable_notification_c()
            while q.pop_head(&head):
                if head >= q._size:
                    bad += 1
                    continue
                ch = make_chain(q._snap, q._memory, q._desc, q._desc_gpa, q._size, head)
                used = self._serve_chain(index, ch)
                if used > 0:
                    q.add_used_c(head, used)
                    served += 1
                    nbytes += used
                    if every:
                        since += 1
                        if since >= every:
                            # Partway through a long drain: the driver may refill
                            # what is done while the rest is served (§2.7.10 decides
                            # whether it wants to hear now; the end of the drain
                            # asks again for what follows).  Not when fewer than
                            # ``every`` chains are known to be left: the drain's
                            # end notifies soon, and a driver woken now takes a
                            # few entries and makes every later drain as short.
                            since = 0
                            if (<uint16_t>(q._avail_seen - q._next_avail) >= every
                                    and q.needs_notification_c()):
                                if self.signal_adapt and not probe:
                                    probe = True
                                    switches = self._switches()
                                self.early_signals += 1
                                self._signallers[index]()
                elif used < 0:
                    if refused is None:
                        refused = []
                    refused.append(ch)
            if not q.enable_notification_c():
                break
        if probe:
            self._adapt(index, self._switches() != switches)
        if self.unsubmitted:
            self._submit()
        if self.nfree < self.nslots:
            r_served, r_bytes, mask, rest = self._reap_spin(served != 0, index, False)
        else:
            r_served, r_bytes, rest = 0, 0, []
            mask = self._to_signal(((<uint64_t>1) << index) if served else 0)
        return (served + r_served, nbytes + r_bytes, mask, rest,
                refused if refused is not None else [], bad)

    cdef long long _switches(self) except? -1:
        """This thread's involuntary context switches so far (``switch_counter``'s
        answer when one is set): a driver woken on this CPU preempts it.  Not the
        voluntary ones: waiting for the GIL or a lock is one, wherever the driver
        runs."""
        if self.switch_counter is not None:
            return self.switch_counter()
        return _nivcsw()

    cdef void _adapt(self, int index, bint preempted) noexcept:
        """After a drain that sent early notifications: a preempted one holds the
        queue's next ones back (doubling while it repeats), any other halves the
        next hold."""
        cdef int64_t b
        if preempted:
            self.early_preempted += 1
            b = self.es_backoff[index] * 2
            if b < self.hold_min_ns:
                b = self.hold_min_ns
            if b > self.hold_max_ns:
                b = self.hold_max_ns
            self.es_backoff[index] = b
            self.es_until[index] = _now_ns() + b
        else:
            # Not every wake-up preempts at once (the scheduler may let the
            # drain finish its slice): back off as fast as it grew, not at once.
            self.es_backoff[index] //= 2

    cdef uint64_t _to_signal(self, uint64_t touched) except? 0xFFFFFFFFFFFFFFFF:
        """Notify the queues in ``touched`` whose driver wants a notification now
        (VIRTIO 1.2 §2.7.10, EVENT_IDX honoured) through their signallers
        (:meth:`attach`); returns those that have none: the caller signals them."""
        cdef uint64_t out = 0
        cdef int i = 0
        cdef int nsig = len(self._signallers)
        cdef Queue q
        while touched:
            if touched & 1:
                q = <Queue>self._queues[i]
                if q.needs_notification_c():
                    if i < nsig:
                        # The compiled signaller: no Python frame per drain.
                        self._signallers[i]()
                    else:
                        out |= (<uint64_t>1) << i
            touched >>= 1
            i += 1
        return out

    cdef int _serve_chain(self, int index, DescriptorChain chain) except -2:
        cdef ChainCursor c
        cdef vring_desc d
        cdef iovec rd[MAX_SEGS]
        cdef iovec wr[MAX_SEGS]
        cdef int nr = 0, nw = 0, rc, n, slot
        cdef size_t rtotal = 0, wtotal = 0, have_out, room_in
        cdef unsigned char hdr[REQ_HEADER]
        cdef const unsigned char *cdb
        cdef int lun, k
        cdef uint8_t op
        cdef bint write
        cdef uint64_t lba
        cdef uint32_t nblocks
        cdef size_t nbytes
        cdef Slot *s
        cdef ssize_t r
        cdef int fd
        cdef bint direct, threads
        cdef int fixed
        cdef io_uring_sqe *sqe
        if self.nfree == 0:
            return -1
        chain_start(&c, chain.table, chain.table_gpa, chain.queue_size, chain.head_index)
        while True:
            rc = chain_next(chain.snap, &c, &d)
            if rc == 0:
                break
            if rc < 0:
                return -1  # malformed: Python reports it
            if d.len == 0:
                continue
            if d.flags & VRING_DESC_F_WRITE:
                if not _seg_add(wr, &nw, snap_ptr_w(chain.snap, d.addr, d.len), d.len):
                    return -1
                wtotal += d.len
            else:
                if nw:
                    return -1  # readable after writable: Python's rule applies
                if not _seg_add(rd, &nr, snap_ptr(chain.snap, d.addr, d.len), d.len):
                    return -1
                rtotal += d.len
        if rtotal < REQ_HEADER or wtotal < RESP_HEADER:
            return -1
        # The header, gathered from the readable buffers.
        n = 0
        k = 0
        while n < REQ_HEADER:
            rc = <int>rd[k].iov_len
            if rc > REQ_HEADER - n:
                rc = REQ_HEADER - n
            memcpy(hdr + n, rd[k].iov_base, rc)
            n += rc
            k += 1
        # LUN (§5.6.6.1): 01 00 <single-level LUN, flat or peripheral> 00 00 00 00.
        if hdr[0] != 1 or hdr[1] != 0 or hdr[4] or hdr[5] or hdr[6] or hdr[7]:
            return -1
        if hdr[2] >> 6 == 1:
            lun = ((hdr[2] & 0x3F) << 8) | hdr[3]
        elif hdr[2] == 0:
            lun = hdr[3]
        else:
            return -1
        if lun >= self.nluns:
            return -1
        cdb = hdr + CDB_OFFSET
        op = cdb[0]
        if op == 0x28 or op == 0x2A:  # READ(10), WRITE(10)
            if cdb[9] & 0x04:
                return -1
            lba = _be32(cdb + 2)
            nblocks = _be16(cdb + 7)
        elif op == 0x88 or op == 0x8A:  # READ(16), WRITE(16)
            if cdb[15] & 0x04:
                return -1
            lba = _be64(cdb + 2)
            nblocks = _be32(cdb + 10)
        else:
            return -1
        write = op == 0x2A or op == 0x8A
        if cdb[1] & 0xE0 or nblocks == 0 or nblocks > MAX_BLOCKS:
            return -1
        if write and self.read_only[lun]:
            return -1
        if lba > self.blocks[lun] or nblocks > self.blocks[lun] - lba:
            return -1
        nbytes = <size_t>nblocks << BLOCK_SHIFT
        have_out = rtotal - REQ_HEADER
        room_in = wtotal - RESP_HEADER
        if (write and nbytes > have_out) or (not write and nbytes > room_in):
            return -1
        slot = self.free[self.nfree - 1]
        s = &self.slots[slot]
        rc = _take(wr, nw, 0, RESP_HEADER, s.resp, RESP_SEGS)
        if rc < 0:
            return -1
        s.nresp = rc
        if write:
            rc = _take(rd, nr, REQ_HEADER, nbytes, s.iov, MAX_SEGS)
        else:
            rc = _take(wr, nw, RESP_HEADER, nbytes, s.iov, MAX_SEGS)
        if rc < 0:
            return -1
        s.niov = rc
        s.write = write
        s.fua = (cdb[1] & 0x08) != 0
        s.nbytes = nbytes
        s.resid = have_out + room_in - nbytes
        fd = self.fds[lun]
        direct = False
        if self.dfds[lun] >= 0:
            # O_DIRECT wants sector-aligned buffers; others use the page cache.
            direct = True
            for k in range(s.niov):
                if (<size_t>s.iov[k].iov_base | s.iov[k].iov_len) & (DIRECT_ALIGN - 1):
                    direct = False
                    break
            if direct:
                fd = self.dfds[lun]
        fixed = -1
        if direct and (s.niov == 1 or self.vec_fixed) and self.fixed_max > 0 and self._own() == 1:
            fixed = self._fixed_index(chain.snap, s.iov, s.niov)
        # A registered buffer makes the ring's inline submission cheap at any
        # size: the threads are for transfers whose pages would be pinned.
        threads = fixed < 0 and self.direct_threads > 0 and <long long>nbytes >= (
            (self.pool_min_write if write else self.pool_min_read) if direct
            else (self.pool_min_cached_write if write else self.pool_min_cached_read))
        if direct or threads:
            pass  # not inline: the disk itself is the wait, or a thread copies
        elif not write and self.nowait_read[lun]:
            # A page-cache hit is one system call here; anything else the ring.
            r = preadv2(self.fds[lun], s.iov, s.niov, lba << BLOCK_SHIFT, RWF_NOWAIT)
            if r == <ssize_t>nbytes:
                _respond_good(s)
                self.inline_reads += 1
                return RESP_HEADER + nbytes
            if r < 0 and errno == EOPNOTSUPP:
                self.nowait_read[lun] = False
        if write and not direct and not threads and not s.fua and self.wmode[lun] != W_RING:
            rc = self._write_inline(s, lun, lba << BLOCK_SHIFT)
            if rc > 0:
                _respond_good(s)
                self.inline_writes += 1
                return RESP_HEADER
            if rc < 0:
                return -1
            # EAGAIN: the write would block; the ring's workers do it.
        if threads:
            if self.pool == NULL:
                self._start_pool()
            self.nfree -= 1
            _claim(s, chain.head_index, index, lun, lba)
            s.fd = fd
            self._chains[slot] = chain
            self.pool_requests += 1
            self.in_flight_q[index] += 1
            pthread_mutex_lock(&self.pool.mu)
            self.pool.jobs[(self.pool.jhead + self.pool.jcount) % self.pool.cap] = slot
            self.pool.jcount += 1
            pthread_cond_signal(&self.pool.cv)
            pthread_mutex_unlock(&self.pool.mu)
            return 0
        if not self._own():
            return -1  # the ring is another thread's while its requests run
        sqe = io_uring_get_sqe(&self.ring)
        if sqe == NULL:
            # The submission ring is full of unsubmitted entries: hand them over.
            self._submit()
            sqe = io_uring_get_sqe(&self.ring)
            if sqe == NULL:
                return -1
        self.nfree -= 1
        _claim(s, chain.head_index, index, lun, lba)
        if write:
            io_uring_prep_writev(sqe, fd, s.iov, s.niov, lba << BLOCK_SHIFT)
            if s.fua:
                sqe.rw_flags = RWF_DSYNC
        else:
            io_uring_prep_readv(sqe, fd, s.iov, s.niov, lba << BLOCK_SHIFT)
        if fixed >= 0:
            # Buffers inside a registered one: no pinning of their pages here.
            if s.niov == 1 and write:
                io_uring_prep_write_fixed(sqe, fd, s.iov[0].iov_base, s.iov[0].iov_len,
                                          lba << BLOCK_SHIFT, fixed)
            elif s.niov == 1:
                io_uring_prep_read_fixed(sqe, fd, s.iov[0].iov_base, s.iov[0].iov_len,
                                         lba << BLOCK_SHIFT, fixed)
            else:
                io_uring_prep_rw(OP_WRITEV_FIXED if write else OP_READV_FIXED, sqe, fd, s.iov, s.niov,
                                 lba << BLOCK_SHIFT)
                sqe.buf_index = fixed
            if write and s.fua:
                sqe.rw_flags = RWF_DSYNC
            self.fixed_requests += 1
        sqe.user_data = slot
        self._chains[slot] = chain
        self.ring_requests += 1
        self.in_flight_q[index] += 1
        self.unsubmitted += 1
        if self.unsubmitted >= self.submit_batch or self.nslots - self.nfree <= self.submit_lead:
            self._submit()
        return 0

    cdef int _fixed_index(self, MemorySnapshot snap, const iovec *iov, int niov) except -2:
        """The registered buffer holding all of ``iov`` (``snap``'s RAM), or -1.  A
        chain of another memory table than the one registered registers its table
        first, when nothing is in flight (until then: -1)."""
        cdef int i, k
        cdef uint64_t p
        if snap is not self._fixed_snap:
            if self.nfree != self.nslots or self.unsubmitted:
                return -1
            self._fixed_backoff = self.fixed_retry_ns
            self.fixed_error = 0  # a new table: its own log line if it is refused
            self._fixed_register(snap)
        elif (self.fixed_error == EAGAIN and _now_ns() >= self._fixed_retry_at
              and self.nfree == self.nslots and not self.unsubmitted):
            self._fixed_register(snap)  # more of the RAM may be allocated by now
        p = <uint64_t>iov[0].iov_base
        for i in range(self._nfixed):
            if self._fixed_lo[i] <= p and p + iov[0].iov_len <= self._fixed_hi[i]:
                for k in range(1, niov):
                    p = <uint64_t>iov[k].iov_base
                    if p < self._fixed_lo[i] or p + iov[k].iov_len > self._fixed_hi[i]:
                        return -1
                return i
        return -1

    cdef void _fixed_drop(self) noexcept:
        """Unregister the buffers (their pages unpinned) and forget their table."""
        if self._nfixed:
            io_uring_unregister_buffers(&self.ring)
            self._nfixed = 0
        self.fixed_bytes = 0
        self._fixed_snap = None

    def release_fixed(self):
        """Give back the registered guest RAM (unpinned; the memory table it came
        from is no longer held) when nothing is in flight, as a device does when a
        queue is taken back: a memory table that removes regions, a reset, a
        disconnect.  The next O_DIRECT transfer registers its table again.
        Returns whether nothing is registered now."""
        if self.nfree != self.nslots or self.unsubmitted:
            return self._nfixed == 0
        self._fixed_drop()
        return True

    cdef int _fixed_register(self, MemorySnapshot snap) except -1:
        """Register ``snap``'s writable regions with the ring, in pieces of at most
        ``FIXED_PIECE``, in place of what was: the kernel pins (and so populates)
        every page of them now, for as long as they stay registered.  Refused when
        they come to more than ``fixed_max`` bytes or ``MAX_FIXED`` pieces
        (``fixed_error`` E2BIG) or when the kernel refuses them (its errno: ENOMEM
        over ``RLIMIT_MEMLOCK`` without CAP_IPC_LOCK, EFAULT for memory it cannot
        pin): then every transfer pins its own pages, as without registration."""
        cdef iovec v[MAX_FIXED]
        cdef int i, n = 0, rc
        cdef uint64_t base, size, total = 0, piece
        cdef long long missing
        self._fixed_drop()
        self._fixed_snap = snap
        for i in range(snap.n):
            if not snap.entries[i].writable:
                continue
            base = <uint64_t>snap.entries[i].hva
            size = snap.entries[i].last - snap.entries[i].gpa + 1
            total += size
            while size:
                if n == MAX_FIXED or total > <uint64_t>self.fixed_max:
                    self.fixed_error = E2BIG
                    log.warning("scsi: guest RAM not registered with io_uring (more than %d MiB or %d "
                                "pieces): O_DIRECT transfers pin their own pages", self.fixed_max >> 20,
                                MAX_FIXED)
                    return 0
                piece = size if size < FIXED_PIECE else FIXED_PIECE
                v[n].iov_base = <void *>base
                v[n].iov_len = piece
                self._fixed_lo[n] = base
                self._fixed_hi[n] = base + piece
                n += 1
                base += piece
                size -= piece
        if n == 0:
            return 0
        missing = _not_resident(v, n)
        if missing > self.fixed_populate_max:
            if self.fixed_error != EAGAIN:
                log.info("scsi: guest RAM not registered with io_uring yet: %d MiB of its %d MiB not "
                         "allocated (more than %d MiB); looked at again later", missing >> 20, total >> 20,
                         self.fixed_populate_max >> 20)
            self.fixed_error = EAGAIN
            self._fixed_retry_at = _now_ns() + self._fixed_backoff
            if self._fixed_backoff < 64 * self.fixed_retry_ns:
                self._fixed_backoff *= 2
            return 0
        rc = io_uring_register_buffers(&self.ring, v, n)
        if rc < 0:
            self.fixed_error = -rc
            log.warning("scsi: io_uring refused to register %d MiB of guest RAM (%s): O_DIRECT "
                        "transfers pin their own pages", total >> 20, os.strerror(-rc))
            return 0
        self._nfixed = n
        self.fixed_bytes = total
        self.fixed_error = 0
        self.fixed_registrations += 1
        log.info("scsi: %d MiB of guest RAM registered with io_uring for O_DIRECT (%d pieces)",
                 total >> 20, n)
        return 0

    cdef int _write_inline(self, Slot *s, int lun, uint64_t offset) noexcept:
        """A buffered write on the loop thread: 1 done, 0 it would block (the ring
        then), -1 an error or a short write (the Python path does it again and
        answers; a write may be repeated).  Under W_INLINE a write slower than
        ``slow_ns`` (dirty-page throttling, block allocation, a journal wait) sends the
        LUN's writes to the ring, which :meth:`reap` watches to bring them back."""
        cdef ssize_t r
        cdef int64_t t0
        if self.wmode[lun] == W_NOWAIT:
            r = pwritev2(self.fds[lun], s.iov, s.niov, offset, RWF_NOWAIT)
            if r == <ssize_t>s.nbytes:
                return 1
            if r >= 0:
                return -1
            if errno == EAGAIN:
                return 0
            if errno != EOPNOTSUPP:
                return -1
            self.wmode[lun] = W_INLINE  # ext4, tmpfs: no nowait buffered writes
        t0 = _now_ns()
        r = pwritev2(self.fds[lun], s.iov, s.niov, offset, 0)
        if _now_ns() - t0 > self.slow_ns:
            self.wmode[lun] = W_RING
            self.streak[lun] = 0
            self.slow_writes += 1
        return 1 if r == <ssize_t>s.nbytes else -1

    cdef int _start_pool(self) except -1:
        """Make the O_DIRECT threads (``direct_threads`` of them, at most 32).

        Raises:
            OSError: not one thread could be made.
        """
        cdef Pool *p = <Pool *>PyMem_Malloc(sizeof(Pool))
        cdef int i, n = self.direct_threads
        if p == NULL:
            raise MemoryError()
        memset(p, 0, sizeof(Pool))
        p.cap = self.nslots
        p.jobs = <int *>PyMem_Malloc(sizeof(int) * self.nslots)
        p.done = <int *>PyMem_Malloc(sizeof(int) * self.nslots)
        if p.jobs == NULL or p.done == NULL:
            PyMem_Free(p.jobs)
            PyMem_Free(p.done)
            PyMem_Free(p)
            raise MemoryError()
        p.slots = self.slots
        p.efd = self.fd
        pthread_mutex_init(&p.mu, NULL)
        pthread_cond_init(&p.cv, NULL)
        if n > DIRECT_THREADS:
            n = DIRECT_THREADS
        for i in range(n):
            if pthread_create(&p.threads[i], NULL, _pool_worker, p) != 0:
                break
            p.nthreads += 1
        if p.nthreads == 0:
            PyMem_Free(p.jobs)
            PyMem_Free(p.done)
            PyMem_Free(p)
            raise OSError(11, "engine: no O_DIRECT thread could be made")
        self.pool = p
        return 0

    cdef int _submit(self) except -1:
        cdef int rc
        while self.unsubmitted:
            rc = io_uring_submit(&self.ring)
            self.submit_calls += 1
            if rc < 0:
                if rc == -4:  # EINTR
                    continue
                raise OSError(-rc, "io_uring_submit failed")
            self.unsubmitted -= rc
            if rc == 0:
                break
        return 0

    def flush(self):
        """Hand the queued requests to the kernel (one system call)."""
        if self.unsubmitted:
            self._submit()

    def wait(self, double timeout):
        """Block until a completion is there or ``timeout`` seconds pass (quiesce);
        True if one is there (:meth:`reap` takes it).  Ring and threads both count
        their completions on the eventfd."""
        cdef pollfd pfd
        cdef int rc
        cdef int64_t deadline = _now_ns() + <int64_t>(timeout * 1e9 if timeout > 0 else 0)
        cdef int64_t left
        self.flush()
        pfd.fd = self.fd
        pfd.events = POLLIN
        while True:
            pfd.revents = 0
            left = deadline - _now_ns()
            with nogil:
                rc = poll(&pfd, 1, <int>((left + 999999) // 1000000) if left > 0 else 0)
            # EINTR: io_uring runs a completion's task work on this thread by
            # interrupting its wait; the completion is then on the eventfd.
            if rc >= 0 or errno != EINTR:
                return rc > 0

    def reap(self):
        """Finish every request the kernel completed: ``(served, bytes, signal, rest)``.

        A whole transfer gets GOOD with its residual and goes into its used ring
        (``served`` chains, ``bytes`` used bytes); a queue whose driver wants a
        notification now gets it through its signaller (:meth:`attach`), and
        ``signal`` has a bit per such queue that has none, which the caller
        notifies.  ``rest``
        lists the others as ``(index, chain, write, fua, lun, lba, blocks, moved,
        error)``: ``moved`` bytes went through, ``error`` is the errno (0: a short
        transfer).

        With at least ``spin_min`` requests still in flight it then waits for the
        next completions on this thread (``spin_ns``, module docstring) and
        finishes them as well.

        A reap that a :class:`ReapPump` made and handed over (it had something for
        Python) is returned, or what it raised raised, before a new one.
        """
        held = self._held_reap
        if held is not None:
            self._held_reap = None
            if isinstance(held, BaseException):
                raise held
            return held
        return self._reap_spin(False, 0, True)

    cdef int _reap_pump(self) except -1:
        """The eventfd is readable (:class:`ReapPump`): finish what completed; 0 when
        that is all (counted in ``reaps_pumped``, ``pumped_chains``,
        ``pumped_bytes``), 1 when the reap has something for Python (a request that
        did not move its whole transfer, a queue to notify without a signaller) or
        raised: it is held for :meth:`reap`, and none is made until it is taken."""
        cdef long served
        if self._held_reap is not None:
            return 1
        try:
            r = self._reap_spin(False, 0, True)
        except Exception as e:
            self._held_reap = e
            return 1
        served, nbytes, mask, rest = r
        if mask or rest:
            self._held_reap = r
            return 1
        self.reaps_pumped += 1
        self.pumped_chains += served
        self.pumped_bytes += nbytes
        return 0

    cdef int _spin_wait(self) noexcept nogil:
        """Wait on this thread for the next completion (:meth:`_reap_spin`): 1 one
        is there, 0 none came within ``spin_ns`` or the event loop has something
        else (a kick, a message: its epoll fd ``loop_fd`` is readable), -1 another
        task took this CPU meanwhile (this thread was preempted)."""
        cdef int64_t t0 = _now_ns()
        cdef int64_t t, t_check = t0
        cdef pollfd pfd
        cdef Pool *p = self.pool
        cdef long long sw = _nivcsw()
        while True:
            if io_uring_cq_ready(&self.ring) or self._work_pending() or (p != NULL and p.dcount):
                return 1
            t = _now_ns()
            if t - t0 >= self.spin_ns:
                return 0
            if t - t_check >= SPIN_CHECK_NS:
                t_check = t
                if self.spin_give_way and _nivcsw() != sw:
                    return -1
                if self.loop_fd >= 0:
                    pfd.fd = self.loop_fd
                    pfd.events = POLLIN
                    pfd.revents = 0
                    if poll(&pfd, 1, 0) > 0:
                        # Our own eventfd is in that set: a completion first.
                        if io_uring_cq_ready(&self.ring) or self._work_pending() or (p != NULL and p.dcount):
                            return 1
                        return 0

    cdef tuple _reap_spin(self, bint also, int index, bint woken):
        """_reap, then, while at least ``spin_min`` requests are in flight, wait on
        this thread for the next completion (up to ``spin_ns`` after the last one,
        ``spin_max_ns`` in all) and reap it too, instead of sleeping until the
        eventfd wakes this thread: the driver hears of each completion at once and
        refills while the rest are at the disk, and neither a completion nor the
        driver's next kick has to wake this thread.  The wait ends for anything else
        the event loop has (its epoll fd, ``loop_fd``), and gives way to any task
        that wants this CPU: then no wait for 1 ms, doubling while it repeats (up to
        ``hold_max_ns``)."""
        cdef int64_t start, b
        cdef int rc
        r_served, r_bytes, mask, rest = self._reap(also, index, woken)
        if self.spin_ns <= 0 or self.nslots - self.nfree < self.spin_min or not self._signallers:
            # No compiled signallers: the caller notifies, which a wait would delay.
            return r_served, r_bytes, mask, rest
        start = _now_ns()
        if self.spin_until:
            if start < self.spin_until:
                return r_served, r_bytes, mask, rest
            self.spin_until = 0
        while self.nslots - self.nfree >= self.spin_min and _now_ns() - start < self.spin_max_ns:
            with nogil:
                rc = self._spin_wait()
            if rc < 0:
                self.spin_preempted += 1
                b = self.spin_backoff * 2
                if b < self.hold_min_ns:
                    b = self.hold_min_ns
                if b > self.hold_max_ns:
                    b = self.hold_max_ns
                self.spin_backoff = b
                self.spin_until = _now_ns() + b
                return r_served, r_bytes, mask, rest
            if rc == 0:
                break
            s2, b2, m2, rest2 = self._reap(False, 0, True)
            self.spin_reaps += s2
            r_served += s2
            r_bytes += b2
            mask |= m2
            if rest2:
                rest = rest + rest2
        self.spin_backoff //= 2
        return r_served, r_bytes, mask, rest

    cdef uint32_t _finish_slot(self, int slot, int res, int64_t *now, list rest) except? 0xFFFFFFFF:
        """One transfer done with ``res`` (bytes or -errno): free its slot; a whole
        one gets GOOD and its used entry (returns the used length), any other goes
        to ``rest`` for Python (returns 0)."""
        cdef Slot *s = &self.slots[slot]
        cdef uint32_t used
        cdef Queue q
        chain = self._chains[slot]
        self._chains[slot] = None
        self.free[self.nfree] = slot
        self.nfree += 1
        self.in_flight_q[s.queue] -= 1
        if res != <int>s.nbytes:
            rest.append((s.queue, chain, bool(s.write), bool(s.fua), s.lun, s.lba,
                         s.nbytes >> BLOCK_SHIFT, res if res > 0 else 0, -res if res < 0 else 0))
            return 0
        _respond_good(s)
        if s.write and not s.fua and self.allow_inline and self.wmode[s.lun] == W_RING:
            if now[0] == 0:
                now[0] = _now_ns()
            if now[0] - s.t_submit < self.slow_ns:
                self.streak[s.lun] += 1
                if self.streak[s.lun] >= FAST_STREAK:
                    self.wmode[s.lun] = W_NOWAIT
            else:
                self.streak[s.lun] = 0
        used = RESP_HEADER if s.write else RESP_HEADER + s.nbytes
        q = <Queue>self._queues[s.queue]
        q.add_used_c(s.head, used)
        return used

    cdef tuple _reap(self, bint also, int index, bint woken):
        """reap(); ``also``: queue ``index`` had chains completed before, count it
        as touched.  ``woken`` false (right after a drain submitted): the eventfd
        is read only when something completed, since a read that finds it empty
        is a system call for nothing; a count it keeps for completions taken here
        only makes the loop look once more."""
        cdef io_uring_cqe *cqe
        cdef uint64_t tick
        cdef int slot, res
        cdef int64_t now = 0
        cdef uint32_t used
        cdef long served = 0
        cdef unsigned long long nbytes = 0
        cdef uint64_t mask = 0
        cdef list rest = []
        cdef Pool *p
        p = self.pool
        if self.defer_taskrun:
            # The kernel holds a deferred ring's completions (and signals the
            # eventfd when it first has some, and again as it posts them) until
            # this thread asks: ask, clear the count, then ask again while more
            # came meanwhile (their signal may be the one just cleared).  Another
            # thread cannot ask: it leaves the count for the ring's.
            if (woken or self._work_pending()) and self._own():
                io_uring_get_events(&self.ring)
                read(self.fd, &tick, 8)
                while self._work_pending():
                    io_uring_get_events(&self.ring)
        elif woken or io_uring_cq_ready(&self.ring) or (p != NULL and p.dcount):
            read(self.fd, &tick, 8)  # clear the count first: a later completion sets it again
        while io_uring_peek_cqe(&self.ring, &cqe) == 0:
            slot = <int>cqe.user_data
            res = cqe.res
            io_uring_cqe_seen(&self.ring, cqe)
            used = self._finish_slot(slot, res, &now, rest)
            if used:
                mask |= (<uint64_t>1) << self.slots[slot].queue
                served += 1
                nbytes += used
        p = self.pool
        while p != NULL:
            pthread_mutex_lock(&p.mu)
            if p.dcount == 0:
                pthread_mutex_unlock(&p.mu)
                break
            slot = p.done[p.dhead]
            p.dhead = (p.dhead + 1) % p.cap
            p.dcount -= 1
            pthread_mutex_unlock(&p.mu)
            used = self._finish_slot(slot, self.slots[slot].res, &now, rest)
            if used:
                mask |= (<uint64_t>1) << self.slots[slot].queue
                served += 1
                nbytes += used
        if also:
            mask |= (<uint64_t>1) << index
        return served, nbytes, self._to_signal(mask), rest


cdef class RequestPump(FdPump):
    """A request queue's kicks served in compiled code (``VirtioDevice.kick_pump``):
    :meth:`Engine.serve` without the device's Python ``process_queue`` frame, for
    the common drain whose every chain the engine completed or queued and whose
    notifications went through the signallers.  Anything else (a chain for the
    Python path, an error, the device not active or broken) answers 1: the device's
    ``process_queue`` then runs and takes the drain the engine held."""

    cdef Engine engine
    cdef int index
    cdef object device

    def __init__(self, Engine engine not None, int index, device):
        self.engine = engine
        self.index = index
        self.device = device

    cdef int pump_c(self) except -1:
        dev = self.device
        if dev.broken is not None or not dev.active:
            return 1
        return self.engine._pump(self.index)


cdef class ReapPump(FdPump):
    """The engine's eventfd served in compiled code (``add_reader(..., pump=)``):
    :meth:`Engine.reap` without the device's Python callback, for the common reap
    whose every request moved its whole transfer and whose notifications went
    through the signallers.  Anything else (a request for Python, an error, the
    device not active or broken) answers 1: the device's callback then runs and
    takes the reap the engine held."""

    cdef Engine engine
    cdef object device

    def __init__(self, Engine engine not None, device):
        self.engine = engine
        self.device = device

    cdef int pump_c(self) except -1:
        dev = self.device
        if dev.broken is not None or not dev.active:
            return 1
        return self.engine._reap_pump()
