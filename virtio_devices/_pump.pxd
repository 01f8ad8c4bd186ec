# cython: language_level=3

cdef class FdPump:
    # What pump_c raised when the loop called it: pump() raises it (under the guard).
    cdef public object error
    cdef public unsigned long long pumped
    cdef public unsigned long long handed_over
    cdef int pump_c(self) except -1
