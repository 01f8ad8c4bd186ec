# cython: language_level=3
from cpython.pythread cimport PyThread_type_lock
from libc.stdint cimport uint16_t, uint32_t


# One message of a group, as the compiled request path hands it to an adapter.
cdef struct I2cCMsg:
    uint16_t addr            # 7-bit address
    bint read
    uint32_t len
    unsigned char *buf       # len bytes: the data to write, or where a read goes


# A batch of consecutive groups of one device for one adapter (see I2cDevPort).
cdef struct I2cJob:
    I2cJob *next
    I2cCMsg *msgs            # every message of the batch, group after group
    int *group_len           # messages per group
    int *group_done          # out: messages completed, per group
    int *group_errno         # out: the errno of a failed group (0: none or no command)
    int ngroups
    int notify_fd            # written (eventfd) when the batch is done
    volatile int finished


cdef class I2cDevPort:
    cdef int fd
    cdef readonly unsigned long funcs
    cdef readonly bint smbus
    cdef int cur_addr
    cdef object hook
    cdef bint has_hook
    cdef bint started
    cdef PyThread_type_lock bus_lock
    cdef PyThread_type_lock q_lock
    cdef I2cJob *head
    cdef I2cJob *tail
    cdef int wake_fd
    cdef bint stopping
    cdef object thread
    cdef readonly unsigned long long ioctls
    cdef readonly unsigned long long batches

    cdef int _ioctl(self, unsigned long request, void *arg, unsigned long value) noexcept nogil
    cdef int _set_address(self, int addr) noexcept nogil
    cdef int transfer_c(self, I2cCMsg *msgs, int n, int *err) noexcept nogil
    cdef int _rdwr(self, I2cCMsg *msgs, int n, int *err) noexcept nogil
    cdef int _smbus(self, I2cCMsg *msgs, int n, int *err) noexcept nogil
    cdef void run_job(self, I2cJob *job) noexcept nogil
    cdef int submit(self, I2cJob *job) except -1
