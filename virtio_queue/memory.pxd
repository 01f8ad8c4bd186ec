# cython: language_level=3
from cpython.buffer cimport Py_buffer
from libc.stdint cimport uint64_t

# One entry of a memory snapshot's sorted C table (STYLE.md §2).
cdef struct MemEntry:
    uint64_t gpa
    uint64_t last          # gpa + size - 1 (size > 0, so no overflow)
    unsigned char *hva
    bint writable


cdef class GuestRegion:
    """A contiguous guest-physical range mapped into this process (base class; the Xen
    build adds subclasses).  The mapping lives until the last reference goes."""
    cdef readonly uint64_t guest_addr
    cdef readonly uint64_t size
    cdef unsigned char *hva
    cdef bint _writable
    cdef void *_map_base       # what munmap gets (from_fd), or NULL
    cdef size_t _map_len
    cdef Py_buffer _view       # the exported buffer (from_buffer)
    cdef bint _has_view


cdef class MemorySnapshot:
    """An immutable table of regions.  Chains, Readers, Writers and views hold the
    snapshot they were made from, which holds its regions: a region removed from
    GuestMemory stays mapped until nothing uses it (deferred unmap)."""
    cdef MemEntry *entries
    cdef Py_ssize_t n
    cdef tuple regions
    cdef Py_ssize_t last_hit   # translation cache: index of the last entry hit


cdef class GuestMemory:
    cdef MemorySnapshot snap
    cdef uint64_t _generation


cdef inline MemEntry *snap_entry(MemorySnapshot s, uint64_t gpa, uint64_t length) noexcept nogil:
    """The region entry holding all of [gpa, gpa+length), or NULL.

    Checked add: a range whose end overflows 2^64 is refused (as rust-vmm's
    checked_offset does).  length 0 is valid at any mapped address."""
    cdef Py_ssize_t i, lo, hi
    cdef uint64_t last
    cdef MemEntry *e
    if length == 0:
        last = gpa
    else:
        last = gpa + (length - 1)
        if last < gpa:
            return NULL
    if s.n == 0:
        return NULL
    # The cache is a hint only: a stale index from another thread is still a valid
    # entry of this immutable table, and is checked like any other.
    e = &s.entries[s.last_hit]
    if gpa >= e.gpa and last <= e.last:
        return e
    lo = 0
    hi = s.n
    while lo < hi:                      # first entry whose last >= gpa
        i = (lo + hi) >> 1
        if s.entries[i].last < gpa:
            lo = i + 1
        else:
            hi = i
    if lo == s.n:
        return NULL
    e = &s.entries[lo]
    if gpa < e.gpa or last > e.last:
        return NULL
    s.last_hit = lo
    return e


cdef inline unsigned char *snap_ptr(MemorySnapshot s, uint64_t gpa, uint64_t length) noexcept nogil:
    """Host pointer of [gpa, gpa+length) if it lies inside one region, else NULL."""
    cdef MemEntry *e = snap_entry(s, gpa, length)
    if e == NULL:
        return NULL
    return e.hva + (gpa - e.gpa)


cdef inline unsigned char *snap_ptr_w(MemorySnapshot s, uint64_t gpa, uint64_t length) noexcept nogil:
    """As snap_ptr, but NULL if the region is not writable."""
    cdef MemEntry *e = snap_entry(s, gpa, length)
    if e == NULL or not e.writable:
        return NULL
    return e.hva + (gpa - e.gpa)


# Status of a range that may run over several regions (snap_check); `bad` is the
# address the status is about.
cdef enum:
    GM_OK = 0
    GM_UNMAPPED = -1        # the first byte is not mapped (bad = gpa)
    GM_GAP = -2             # the range runs off a region into unmapped space (bad: where)
    GM_READ_ONLY = -3       # a write range reaches a read-only region (bad: where)
    GM_OVERFLOW = -4        # gpa + length overflows 2^64
    GM_SPLIT_FIELD = -5     # a region boundary falls inside an aligned field (bad: where)


cdef int snap_check(MemorySnapshot s, uint64_t gpa, uint64_t length, bint write,
                    uint64_t align, uint64_t *bad) noexcept nogil
cdef int snap_copy(MemorySnapshot s, uint64_t gpa, unsigned char *buf, size_t length,
                   bint to_guest, uint64_t *bad) noexcept nogil
cdef str gm_text(int rc, uint64_t bad)
cdef int gm_raise(int rc, uint64_t gpa, uint64_t length, uint64_t bad, str what=*) except -1
cdef int gm_copy(GuestMemory m, uint64_t gpa, void *buf, size_t length, bint to_guest) except -1
cdef unsigned char *gm_ptr(GuestMemory m, uint64_t gpa, uint64_t length, bint write) except NULL
cdef object make_view(MemorySnapshot snap, unsigned char *ptr, Py_ssize_t length, bint readonly)
cdef object struct_for(str fmt)
