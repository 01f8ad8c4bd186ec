# cython: language_level=3, embedsignature=True
"""Cython-level loops of the queue benchmark (benches/bench_queue.py).

They run the workloads of shared/tools/queue-anchor (rust-vmm virtio-queue's anchor)
through the same C-level API the devices' hot paths use, with the driver side written
as plain stores into the avail ring, as the anchor's driver does.  Both sides are
timed, as in the anchor.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport uint16_t, uint32_t, uint64_t

from virtio_queue.chain cimport (ChainCursor, DescriptorChain, Reader, Writer, chain_init,
                                 chain_next, make_chain, make_reader, make_writer,
                                 raise_for_status)
from virtio_queue.includes.atomics cimport vq_store_release16
from virtio_queue.includes.endian cimport htole16, le16toh
from virtio_queue.includes.virtio_ring cimport vring_desc
from virtio_queue.includes.vq_copy cimport vq_copy
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
    cdef Py_ssize_t b
    q.ensure_ready()
    drv = le16toh((<uint16_t *>(q._avail + 2))[0])
    for b in range(batches):
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
    cdef Py_ssize_t i
    q.ensure_ready()
    PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE if not device_writes else PyBUF_SIMPLE)
    try:
        drv = le16toh((<uint16_t *>(q._avail + 2))[0])
        for i in range(iters):
            _publish(q, &drv, 1, True, False)
            if not q.pop_head(&head):
                raise RuntimeError("no chain")
            ch = make_chain(q._snap, q._memory, q._desc, q._size, head)
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
    cdef Py_ssize_t i
    cdef bint use_vq = mode == "vq"
    PyObject_GetBuffer(dst, &d, PyBUF_WRITABLE)
    try:
        PyObject_GetBuffer(src, &s, PyBUF_SIMPLE)
        try:
            if s.len != d.len:
                raise ValueError("buffers differ in size")
            for i in range(iters):
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
