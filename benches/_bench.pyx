# cython: language_level=3, embedsignature=True
"""Cython-level loops of the queue benchmark (benches/bench_queue.py).

They run the workloads of shared/tools/queue-anchor (rust-vmm virtio-queue's anchor)
through the same C-level API the devices' hot paths use, with the driver side written
as plain stores into the avail ring, as the anchor's driver does.  Both sides are
timed, as in the anchor.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.errno cimport errno
from libc.stdint cimport uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memset
from posix.types cimport off_t
from posix.uio cimport iovec

from virtio_queue.chain cimport (ChainCursor, DescriptorChain, Reader, Writer, chain_init,
                                 chain_next, make_chain, make_reader, make_writer,
                                 raise_for_status)
from virtio_queue.includes.atomics cimport vq_store_release16
from virtio_queue.includes.endian cimport htole16, le16toh
from virtio_queue.includes.virtio_ring cimport vring_desc
from virtio_queue.includes.vq_copy cimport vq_copy, vq_have_avx2
from virtio_queue.queue cimport Queue


cdef inline void _publish(Queue q, uint16_t *drv_next, uint16_t n, bint same_head,
                          bint used_event) noexcept:
    """Driver: heads k (or 0) for k < n into avail.ring, then avail.idx += n (release)."""
    cdef uint16_t k
    cdef uint16_t mask = q._size - 1
    cdef uint16_t *ring = <uint16_t *>(q._avail + 4)
    for k in range(n):
        ring[(drv_next[0] + k) & mask] = htole16(0 if same_head else k)
    if used_event:
        (<uint16_t *>(q._avail + 4 + 2 * <size_t>q._size))[0] = htole16(drv_next[0])
    drv_next[0] += n
    vq_store_release16(q._avail + 2, htole16(drv_next[0]))


def workload_a(Queue q not None, Py_ssize_t batches):
    """Workload A (or B when q.event_idx): per batch, publish heads 0..size-1, then
    pop every chain, read its head descriptor and add_used(head, 0); one
    needs_notification() per batch.  Returns (chains, sink, notifications)."""
    cdef uint16_t head, drv
    cdef ChainCursor c
    cdef vring_desc d
    cdef int rc
    cdef uint64_t sink = 0, chains = 0, notes = 0
    cdef Py_ssize_t _b
    q.ensure_ready()
    drv = le16toh((<uint16_t *>(q._avail + 2))[0])
    for _b in range(batches):
        _publish(q, &drv, q._size, False, q._event_idx)
        while q.pop_head(&head):
            chain_init(&c, q._desc, q._size, head)
            rc = chain_next(q._snap, &c, &d)
            if rc != 1:
                raise_for_status(rc if rc < 0 else -1, &c, head)
            sink += d.len
            q.add_used_c(head, 0)
            chains += 1
        if q.needs_notification_c():
            notes += 1
    return chains, sink, notes


def workload_c(Queue q not None, buffer, Py_ssize_t iters, bint device_writes):
    """Workload C: per iteration publish head 0, pop the chain, build a Writer (or a
    Reader) and copy all of ``buffer`` into (out of) the chain, add_used.  Returns
    the bytes copied."""
    cdef Py_buffer view
    cdef uint16_t head, drv
    cdef DescriptorChain ch
    cdef Writer w
    cdef Reader r
    cdef uint64_t total = 0
    cdef Py_ssize_t _i
    q.ensure_ready()
    PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE if not device_writes else PyBUF_SIMPLE)
    try:
        drv = le16toh((<uint16_t *>(q._avail + 2))[0])
        for _i in range(iters):
            _publish(q, &drv, 1, True, False)
            if not q.pop_head(&head):
                raise RuntimeError("no chain")
            ch = make_chain(q._snap, q._memory, q._desc, q._desc_gpa, q._size, head)
            if device_writes:
                w = make_writer(ch)
                if w.avail < <size_t>view.len:
                    raise RuntimeError("chain too small")
                total += w.copy_in(<const unsigned char *>view.buf, <size_t>view.len)
                q.add_used_c(head, <uint32_t>w.done)
            else:
                r = make_reader(ch)
                if r.avail < <size_t>view.len:
                    raise RuntimeError("chain too small")
                total += r.copy_out(<unsigned char *>view.buf, <size_t>view.len)
                q.add_used_c(head, 0)
    finally:
        PyBuffer_Release(&view)
    return total


def memcpy_loop(dst, src, Py_ssize_t iters, str mode="libc"):
    """Reference: copy ``src`` into ``dst`` ``iters`` times with libc memcpy
    (mode "libc") or our vq_copy (mode "vq").  Returns the bytes copied."""
    cdef Py_buffer d, s
    cdef Py_ssize_t _i
    cdef bint use_vq = mode == "vq"
    PyObject_GetBuffer(dst, &d, PyBUF_WRITABLE)
    try:
        PyObject_GetBuffer(src, &s, PyBUF_SIMPLE)
        try:
            if s.len != d.len:
                raise ValueError("buffers differ in size")
            for _i in range(iters):
                if use_vq:
                    vq_copy(d.buf, s.buf, <size_t>d.len)
                else:
                    _opaque_memcpy(d.buf, s.buf, <size_t>d.len)
        finally:
            PyBuffer_Release(&s)
    finally:
        PyBuffer_Release(&d)
    return d.len * iters


cdef extern from *:
    """
    #include <string.h>
    /* An out-of-line memcpy the compiler cannot elide or fold across iterations. */
    __attribute__((noinline)) static void _opaque_memcpy(void *d, const void *s, size_t n) {
        memcpy(d, s, n);
        __asm__ volatile("" : : "r"(d) : "memory");
    }
    """
    void _opaque_memcpy(void *d, const void *s, size_t n) noexcept nogil


# ------------------------------------------------------------------ fd I/O

cdef extern from "<sys/uio.h>" nogil:
    ssize_t _preadv "preadv"(int fd, const iovec *iov, int iovcnt, off_t offset)

cdef enum:
    _IOV_MAX_BENCH = 64


def workload_fd(Queue q not None, int fd, Py_ssize_t iters, long long offset=0, int variant=0):
    """The fd figure at Cython level: per iteration publish head 0, pop the chain,
    build a Writer and fill it with preadv(fd, <its iovecs>, offset) as
    ``Writer.read_from_fd`` does, add_used(head, bytes read).  Returns the bytes read.
    (Separates the Python-level call overhead from the kernel's cost.)

    ``variant`` (for profiling): 2 builds no Writer at all (the iovecs of the first
    chain are reused: pop, preadv, add_used only)."""
    cdef iovec iov[_IOV_MAX_BENCH]
    cdef iovec fixed[_IOV_MAX_BENCH]
    cdef uint16_t head, drv
    cdef DescriptorChain ch
    cdef Writer w
    cdef uint64_t total = 0
    cdef size_t got, done
    cdef ssize_t r
    cdef int k, j, nfixed = 0
    cdef Py_ssize_t _i
    q.ensure_ready()
    drv = le16toh((<uint16_t *>(q._avail + 2))[0])
    for _i in range(iters):
        _publish(q, &drv, 1, True, False)
        if not q.pop_head(&head):
            raise RuntimeError("no chain")
        done = 0
        if variant == 2 and nfixed:
            r = _preadv(fd, fixed, nfixed, <off_t>offset)
            if r < 0:
                raise OSError(errno, "preadv")
            done = <size_t>r
        else:
            ch = make_chain(q._snap, q._memory, q._desc, q._desc_gpa, q._size, head)
            w = make_writer(ch)
            while w.avail:
                k = w._iov(iov, _IOV_MAX_BENCH, w.avail, &got)
                if variant == 2:
                    for j in range(k):
                        fixed[j] = iov[j]
                    nfixed = k
                r = _preadv(fd, iov, k, <off_t>(offset + <long long>done))
                if r < 0:
                    raise OSError(errno, "preadv")
                w._advance(<size_t>r)
                done += <size_t>r
                if <size_t>r < got:
                    break
        total += done
        q.add_used_c(head, <uint32_t>done)
    return total


def preadv_loop(int fd, buffer, Py_ssize_t iters, int nseg=1, long long offset=0):
    """Reference for the fd figure without Python overhead: ``iters`` times one
    preadv(fd, ...) of all of ``buffer``, described as ``nseg`` equal iovecs."""
    cdef iovec iov[_IOV_MAX_BENCH]
    cdef Py_buffer view
    cdef Py_ssize_t _i
    cdef int k
    cdef size_t part
    cdef ssize_t r
    cdef uint64_t total = 0
    if not 1 <= nseg <= _IOV_MAX_BENCH:
        raise ValueError("nseg out of range")
    PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE)
    try:
        part = <size_t>view.len // <size_t>nseg
        for k in range(nseg):
            iov[k].iov_base = <unsigned char *>view.buf + part * k
            iov[k].iov_len = part if k + 1 < nseg else <size_t>view.len - part * k
        for _i in range(iters):
            r = _preadv(fd, iov, nseg, <off_t>offset)
            if r < 0:
                raise OSError(errno, "preadv")
            total += <size_t>r
    finally:
        PyBuffer_Release(&view)
    return total


# ------------------------------------------------------------------ vq_copy check

cdef extern from *:
    """
    #include "virtio_queue/includes/vq_copy.h"
    /* The vector routine alone (vq_copy only takes it from VQ_COPY_VECTOR_MIN up),
       so that the check can cover it at every small size; 0 if unavailable. */
    static int vqb_copy_vector(void *d, const void *s, size_t n) {
    #if VQ_HAVE_AVX2_PATH
        if (n >= 32 && vq_have_avx2()) {
            vq_copy_avx2((unsigned char *)d, (const unsigned char *)s, n);
            return 1;
        }
    #endif
        (void)d; (void)s; (void)n;
        return 0;
    }
    """
    int vqb_copy_vector(void *d, const void *s, size_t n) noexcept nogil


cdef int _check_one(unsigned char *dbase, const unsigned char *sbase, size_t doff,
                    size_t soff, size_t n, size_t span, bint vector_only) noexcept nogil:
    """Copy n bytes src+soff -> dst+doff; 0 if right (copied bytes equal, every other
    byte of the dst span still 0xA5), 1 if wrong, 2 if the vector path is absent."""
    cdef size_t j
    cdef int rc = 0
    if vector_only:
        if not vqb_copy_vector(dbase + doff, sbase + soff, n):
            return 2
    else:
        vq_copy(dbase + doff, sbase + soff, n)
    if memcmp(dbase + doff, sbase + soff, n) != 0:
        rc = 1
    for j in range(doff):
        if dbase[j] != 0xA5:
            rc = 1
    for j in range(doff + n, span):
        if dbase[j] != 0xA5:
            rc = 1
    memset(dbase + doff, 0xA5, n)
    return rc


def vq_copy_check(sizes, Py_ssize_t max_align=64, bint vector_only=False):
    """Check vq_copy (or, with ``vector_only``, its AVX2 routine alone, sizes >= 32) for
    every n in ``sizes`` and every (src, dst) offset pair in [0, max_align)^2 from
    64-byte aligned bases, with 0xA5 guard bytes all around the destination.  Returns
    the number of cases checked; raises AssertionError on the first wrong copy and
    ValueError if the vector routine is unavailable."""
    cdef size_t n, so, do_, biggest, span
    cdef unsigned char *s_raw
    cdef unsigned char *d_raw
    cdef unsigned char *s
    cdef unsigned char *d
    cdef uint64_t cases = 0, x = 0x9E3779B97F4A7C15
    cdef int rc
    cdef size_t j
    ns = [int(v) for v in sizes]
    if not ns:
        return 0
    biggest = <size_t>max(ns)
    span = biggest + <size_t>max_align + 128
    s_raw = <unsigned char *>malloc(span + 64)
    d_raw = <unsigned char *>malloc(span + 64)
    if s_raw == NULL or d_raw == NULL:
        free(s_raw)
        free(d_raw)
        raise MemoryError()
    try:
        s = <unsigned char *>((<uintptr_t>s_raw + 63) & ~(<uintptr_t>63))
        d = <unsigned char *>((<uintptr_t>d_raw + 63) & ~(<uintptr_t>63))
        for j in range(span):
            x ^= x << 13
            x ^= x >> 7
            x ^= x << 17
            s[j] = <unsigned char>(x >> 24)
        memset(d, 0xA5, span)
        for n_obj in ns:
            n = <size_t>n_obj
            for so in range(<size_t>max_align):
                for do_ in range(<size_t>max_align):
                    rc = _check_one(d, s, do_ + 64, so, n, span, vector_only)
                    if rc == 2:
                        raise ValueError("the vector copy routine is not available here")
                    if rc:
                        raise AssertionError(
                            f"vq_copy{' (vector)' if vector_only else ''} wrong for n={n}, "
                            f"src offset {so}, dst offset {do_}")
                    cases += 1
    finally:
        free(s_raw)
        free(d_raw)
    return cases


def have_vector_copy():
    """True when vq_copy has its vector routine on this CPU (AVX2)."""
    return vq_have_avx2() != 0
