# cython: language_level=3, embedsignature=True
"""``/dev/i2c-N`` in compiled code: the ``I2C_RDWR`` and ``I2C_SMBUS`` ioctls and one
dedicated thread per adapter (the compiled half of :class:`~.i2c.HostAdapter`).

:class:`I2cDevPort` runs a group of messages as one transaction on an open i2c-dev
fd, as :meth:`HostAdapter.transfer <virtio_devices.hosts.i2c.HostAdapter.transfer>`
defines it: raw mode (the adapter has ``I2C_FUNC_I2C``) is one ``I2C_RDWR`` per
group, all or nothing; SMBus mode turns the group into SMBus commands exactly as
:func:`~virtio_devices.hosts.i2c.smbus_plan` does (a group no command covers fails
whole before the bus) and issues each as one ``I2C_SMBUS`` ioctl, with ``I2C_SLAVE``
when the address changes, stopping at the first that fails.  These are every shape
``smbus_plan`` knows, so the compiled path needs ``smbus2`` only to open the node and
read ``I2C_FUNCS``.

The compiled request path of virtio-i2c (:mod:`virtio_devices._i2c_fast`) hands it
batches (:c:type:`I2cJob`: consecutive groups of one device queue for this
adapter) with :meth:`I2cDevPort.submit`; the port's thread, started on the first
batch, runs them in order with the GIL released (a bus transfer can take
milliseconds and must not hold any event loop) and writes the batch's eventfd
when it is done: one wake-up of the device's loop per batch.  Every transfer,
from the thread or from :meth:`I2cDevPort.transfer`, holds the port's bus lock:
``I2C_SLAVE`` then ``I2C_SMBUS`` on the shared fd must not interleave.

Tests have no i2c-dev node: :meth:`I2cDevPort.set_hook` routes every ioctl to a
Python callable instead (``hook(request, arg)``, ``arg`` the address of the
structure, or the value of ``I2C_SLAVE``), which raises ``OSError`` as the kernel
would fail.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.pythread cimport (WAIT_LOCK, PyThread_acquire_lock,
                               PyThread_allocate_lock, PyThread_free_lock,
                               PyThread_release_lock)
from libc.errno cimport EINTR, errno
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy
from posix.unistd cimport close, read, write
from virtio_queue._linux cimport eventfd, EFD_CLOEXEC

import threading


cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)


cdef extern from "<linux/i2c.h>" nogil:
    struct i2c_msg:
        uint16_t addr
        uint16_t flags
        uint16_t len
        uint8_t *buf

    union i2c_smbus_data:
        uint8_t byte
        uint16_t word
        uint8_t block[34]

    enum:
        I2C_M_RD
        I2C_SMBUS_READ
        I2C_SMBUS_WRITE
        I2C_SMBUS_QUICK
        I2C_SMBUS_BYTE
        I2C_SMBUS_BYTE_DATA
        I2C_SMBUS_WORD_DATA
        I2C_SMBUS_I2C_BLOCK_DATA
        I2C_SMBUS_BLOCK_MAX


cdef extern from "<linux/i2c-dev.h>" nogil:
    struct i2c_rdwr_ioctl_data:
        i2c_msg *msgs
        uint32_t nmsgs

    struct i2c_smbus_ioctl_data:
        uint8_t read_write
        uint8_t command
        uint32_t size
        i2c_smbus_data *data

    enum:
        I2C_SLAVE
        I2C_RDWR
        I2C_SMBUS


# The adapter functionality bits (linux/i2c.h) the plan looks at.
cdef enum:
    F_I2C = 0x00000001
    F_QUICK = 0x00010000
    F_READ_BYTE = 0x00020000
    F_WRITE_BYTE = 0x00040000
    F_READ_BYTE_DATA = 0x00080000
    F_WRITE_BYTE_DATA = 0x00100000
    F_READ_WORD_DATA = 0x00200000
    F_WRITE_WORD_DATA = 0x00400000
    F_READ_I2C_BLOCK = 0x04000000
    F_WRITE_I2C_BLOCK = 0x08000000

# SMBus commands (smbus_plan's SmbusOp kinds).
cdef enum:
    OP_NONE = -1
    OP_QUICK = 0
    OP_READ_BYTE
    OP_WRITE_BYTE
    OP_READ_BYTE_DATA
    OP_WRITE_BYTE_DATA
    OP_READ_WORD_DATA
    OP_WRITE_WORD_DATA
    OP_READ_I2C_BLOCK
    OP_WRITE_I2C_BLOCK

cdef enum:
    RDWR_STACK_MSGS = 8


I2C_IOCTL_SLAVE = I2C_SLAVE
I2C_IOCTL_RDWR = I2C_RDWR
I2C_IOCTL_SMBUS = I2C_SMBUS


cdef inline int plan_op(I2cCMsg *m, int i, int n, unsigned long funcs, int *nmsgs) noexcept nogil:
    """The SMBus command for message ``i`` (with ``i + 1`` when they pair), as
    ``smbus_plan`` chooses it; ``*nmsgs`` the messages it stands for."""
    cdef I2cCMsg *a = &m[i]
    cdef uint32_t r
    if not a.read and a.len == 1 and i + 1 < n and m[i + 1].read and m[i + 1].addr == a.addr:
        r = m[i + 1].len
        nmsgs[0] = 2
        if r == 1 and funcs & F_READ_BYTE_DATA:
            return OP_READ_BYTE_DATA
        if r == 2 and funcs & F_READ_WORD_DATA:
            return OP_READ_WORD_DATA
        if 1 <= r <= I2C_SMBUS_BLOCK_MAX and funcs & F_READ_I2C_BLOCK:
            return OP_READ_I2C_BLOCK
    nmsgs[0] = 1
    if a.len == 0:
        return OP_QUICK if funcs & F_QUICK else OP_NONE
    if a.read:
        return OP_READ_BYTE if a.len == 1 and funcs & F_READ_BYTE else OP_NONE
    if a.len == 1 and funcs & F_WRITE_BYTE:
        return OP_WRITE_BYTE
    if a.len == 2 and funcs & F_WRITE_BYTE_DATA:
        return OP_WRITE_BYTE_DATA
    if a.len == 3 and funcs & F_WRITE_WORD_DATA:
        return OP_WRITE_WORD_DATA
    if 2 <= a.len <= I2C_SMBUS_BLOCK_MAX + 1 and funcs & F_WRITE_I2C_BLOCK:
        return OP_WRITE_I2C_BLOCK
    return OP_NONE


def smbus_kinds(list msgs, unsigned long funcs):
    """The SMBus command names the compiled plan gives ``msgs`` ((addr, read, len)
    tuples), or None: for tests, against ``smbus_plan``."""
    cdef int n = len(msgs)
    cdef int i = 0, nm, op
    cdef I2cCMsg *m = <I2cCMsg *>malloc(sizeof(I2cCMsg) * (n if n else 1))
    names = ("quick", "read_byte", "write_byte", "read_byte_data", "write_byte_data",
             "read_word_data", "write_word_data", "read_i2c_block_data", "write_i2c_block_data")
    if m == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            addr, rd, ln = msgs[i]
            m[i].addr = addr
            m[i].read = rd
            m[i].len = ln
            m[i].buf = NULL
        out = []
        i = 0
        while i < n:
            op = plan_op(m, i, n, funcs, &nm)
            if op == OP_NONE:
                return None
            out.append(names[op])
            i += nm
        return out
    finally:
        free(m)


cdef class I2cDevPort:
    """An open i2c-dev fd (not owned) with ``funcs`` (``I2C_FUNCS``); see the module
    docstring.

    Raises:
        OSError: the eventfd of its thread cannot be made.
    """

    def __cinit__(self, *args, **kwargs):
        self.fd = -1
        self.cur_addr = -1
        self.wake_fd = -1
        self.bus_lock = PyThread_allocate_lock()
        self.q_lock = PyThread_allocate_lock()
        if self.bus_lock == NULL or self.q_lock == NULL:
            raise MemoryError()
        self.wake_fd = eventfd(0, EFD_CLOEXEC)
        if self.wake_fd < 0:
            raise OSError(errno, "eventfd for the i2c adapter thread")

    def __init__(self, int fd, unsigned long funcs):
        if self.started:
            raise RuntimeError("I2cDevPort initialised twice")
        self.fd = fd
        self.funcs = funcs
        self.smbus = not (funcs & F_I2C)

    def __dealloc__(self):
        if self.wake_fd >= 0:
            close(self.wake_fd)
        if self.bus_lock != NULL:
            PyThread_free_lock(self.bus_lock)
        if self.q_lock != NULL:
            PyThread_free_lock(self.q_lock)

    def set_hook(self, hook):
        """Route every ioctl to ``hook(request, arg)`` (tests; None: the kernel)."""
        self.hook = hook
        self.has_hook = hook is not None

    @property
    def thread_running(self):
        """Whether the adapter's thread was started and not yet stopped."""
        return self.started and not self.stopping

    cdef int _ioctl(self, unsigned long request, void *arg, unsigned long value) noexcept nogil:
        """One ioctl: its result (>= 0), or ``-errno``."""
        cdef int rc
        self.ioctls += 1
        if self.has_hook:
            with gil:
                try:
                    rc = self.hook(request, value if request == I2C_SLAVE else <size_t>arg)
                except OSError as e:
                    rc = -(e.errno or 5)
            return rc
        while True:
            if request == I2C_SLAVE:
                rc = ioctl(self.fd, request, value)
            else:
                rc = ioctl(self.fd, request, arg)
            if rc >= 0:
                return rc
            if errno != EINTR:
                return -errno

    cdef int _set_address(self, int addr) noexcept nogil:
        cdef int rc
        if addr == self.cur_addr:
            return 0
        rc = self._ioctl(I2C_SLAVE, NULL, <unsigned long>addr)
        self.cur_addr = addr if rc >= 0 else -1
        return rc

    cdef int transfer_c(self, I2cCMsg *msgs, int n, int *err) noexcept nogil:
        """Run one group (the bus lock held by the caller); the messages completed,
        ``*err`` the errno of a failure (0: a group no SMBus command covers)."""
        err[0] = 0
        if n <= 0:
            return 0
        if self.smbus:
            return self._smbus(msgs, n, err)
        return self._rdwr(msgs, n, err)

    cdef int _rdwr(self, I2cCMsg *msgs, int n, int *err) noexcept nogil:
        cdef i2c_msg stack[RDWR_STACK_MSGS]
        cdef i2c_msg *km = stack
        cdef i2c_rdwr_ioctl_data data
        cdef int i, rc
        if n > RDWR_STACK_MSGS:
            km = <i2c_msg *>malloc(sizeof(i2c_msg) * n)
            if km == NULL:
                err[0] = 12  # ENOMEM
                return 0
        for i in range(n):
            km[i].addr = msgs[i].addr
            km[i].flags = I2C_M_RD if msgs[i].read else 0
            km[i].len = <uint16_t>msgs[i].len
            km[i].buf = msgs[i].buf
        data.msgs = km
        data.nmsgs = <uint32_t>n
        rc = self._ioctl(I2C_RDWR, &data, 0)
        if km != stack:
            free(km)
        if rc < 0:
            err[0] = -rc
            return 0
        return n

    cdef int _smbus(self, I2cCMsg *msgs, int n, int *err) noexcept nogil:
        cdef int i = 0, nm, op, rc, done = 0
        cdef I2cCMsg *a
        cdef I2cCMsg *t
        cdef i2c_smbus_data u
        cdef i2c_smbus_ioctl_data args
        # The whole group must have commands before anything reaches the bus.
        while i < n:
            if plan_op(msgs, i, n, self.funcs, &nm) == OP_NONE:
                return 0
            i += nm
        i = 0
        while i < n:
            op = plan_op(msgs, i, n, self.funcs, &nm)
            a = &msgs[i]
            t = &msgs[i + 1] if nm == 2 else a
            rc = self._set_address(a.addr)
            if rc < 0:
                err[0] = -rc
                return done
            args.read_write = I2C_SMBUS_WRITE
            args.command = 0
            args.data = &u
            if op == OP_QUICK:
                args.read_write = I2C_SMBUS_READ if a.read else I2C_SMBUS_WRITE
                args.size = I2C_SMBUS_QUICK
                args.data = NULL
            elif op == OP_READ_BYTE:
                args.read_write = I2C_SMBUS_READ
                args.size = I2C_SMBUS_BYTE
            elif op == OP_WRITE_BYTE:
                args.command = a.buf[0]
                args.size = I2C_SMBUS_BYTE
                args.data = NULL
            elif op == OP_READ_BYTE_DATA or op == OP_READ_WORD_DATA or op == OP_READ_I2C_BLOCK:
                args.read_write = I2C_SMBUS_READ
                args.command = a.buf[0]
                if op == OP_READ_BYTE_DATA:
                    args.size = I2C_SMBUS_BYTE_DATA
                elif op == OP_READ_WORD_DATA:
                    args.size = I2C_SMBUS_WORD_DATA
                else:
                    args.size = I2C_SMBUS_I2C_BLOCK_DATA
                    u.block[0] = <uint8_t>t.len
            elif op == OP_WRITE_BYTE_DATA:
                args.command = a.buf[0]
                args.size = I2C_SMBUS_BYTE_DATA
                u.byte = a.buf[1]
            elif op == OP_WRITE_WORD_DATA:
                args.command = a.buf[0]
                args.size = I2C_SMBUS_WORD_DATA
                u.word = <uint16_t>(a.buf[1] | (<uint16_t>a.buf[2] << 8))
            else:  # OP_WRITE_I2C_BLOCK
                args.command = a.buf[0]
                args.size = I2C_SMBUS_I2C_BLOCK_DATA
                u.block[0] = <uint8_t>(a.len - 1)
                memcpy(&u.block[1], a.buf + 1, a.len - 1)
            rc = self._ioctl(I2C_SMBUS, &args, 0)
            if rc < 0:
                err[0] = -rc
                return done
            if op == OP_READ_BYTE or op == OP_READ_BYTE_DATA:
                t.buf[0] = u.byte
            elif op == OP_READ_WORD_DATA:
                t.buf[0] = u.word & 0xFF
                t.buf[1] = u.word >> 8
            elif op == OP_READ_I2C_BLOCK:
                memcpy(t.buf, &u.block[1], t.len)
            done += nm
            i += nm
        return done

    def set_address(self, int addr):
        """``I2C_SLAVE`` for ``addr`` now (the CLI claims every address at start).

        Raises:
            OSError: the kernel refused it (EBUSY: a driver owns the address).
        """
        cdef int rc
        with nogil:
            PyThread_acquire_lock(self.bus_lock, WAIT_LOCK)
            self.cur_addr = -1
            rc = self._set_address(addr)
            PyThread_release_lock(self.bus_lock)
        if rc < 0:
            raise OSError(-rc, f"I2C_SLAVE {addr:#04x}")

    def transfer(self, msgs):
        """Run ``msgs`` (``I2cMsg``: ``addr``, ``read``, ``buf`` a bytearray) as one
        group, as the thread runs a batch's: ``(completed, errno)``; reads fill
        ``buf`` in place."""
        cdef int n = len(msgs)
        cdef int i, done, err = 0
        cdef I2cCMsg *m = <I2cCMsg *>malloc(sizeof(I2cCMsg) * (n if n else 1))
        if m == NULL:
            raise MemoryError()
        bufs = []
        try:
            for i in range(n):
                msg = msgs[i]
                buf = msg.buf
                if type(buf) is not bytearray:
                    buf = bytearray(buf)
                bufs.append(buf)
                m[i].addr = msg.addr
                m[i].read = msg.read
                m[i].len = <uint32_t>PyByteArray_GET_SIZE(buf)
                m[i].buf = <unsigned char *>PyByteArray_AS_STRING(buf)
            with nogil:
                PyThread_acquire_lock(self.bus_lock, WAIT_LOCK)
                done = self.transfer_c(m, n, &err)
                PyThread_release_lock(self.bus_lock)
            for i in range(n):
                if msgs[i].buf is not bufs[i]:
                    msgs[i].buf[:] = bufs[i]
        finally:
            free(m)
        return done, err

    cdef void run_job(self, I2cJob *job) noexcept nogil:
        """Run ``job``'s groups in order on the calling thread (GIL released), each
        under the bus lock, and mark it finished: the adapter's thread does this
        for a submitted batch, a ring worker for its own."""
        cdef int g, off = 0, err
        for g in range(job.ngroups):
            err = 0
            PyThread_acquire_lock(self.bus_lock, WAIT_LOCK)
            if g == 0:
                self.batches += 1  # under the lock: ring workers of two sockets share it
            job.group_done[g] = self.transfer_c(job.msgs + off, job.group_len[g], &err)
            PyThread_release_lock(self.bus_lock)
            job.group_errno[g] = err
            off += job.group_len[g]
        job.finished = 1

    cdef int submit(self, I2cJob *job) except -1:
        """Queue ``job`` for the adapter's thread (started on the first job)."""
        cdef uint64_t one = 1
        if self.stopping:
            raise RuntimeError("i2c adapter thread stopped: the adapter was closed")
        if not self.started:
            self.started = True
            self.thread = threading.Thread(target=self._run, name=f"i2c-adapter-fd{self.fd}", daemon=True)
            self.thread.start()
        job.next = NULL
        job.finished = 0
        with nogil:
            PyThread_acquire_lock(self.q_lock, WAIT_LOCK)
            if self.tail == NULL:
                self.head = job
            else:
                self.tail.next = job
            self.tail = job
            PyThread_release_lock(self.q_lock)
            write(self.wake_fd, &one, 8)
        return 0

    def _run(self):
        """The adapter's thread: run queued batches in order, GIL released."""
        cdef I2cJob *job
        cdef uint64_t value, one = 1
        cdef bint stop = False
        with nogil:
            while True:
                if read(self.wake_fd, &value, 8) < 0 and errno == EINTR:
                    continue
                while True:
                    PyThread_acquire_lock(self.q_lock, WAIT_LOCK)
                    job = self.head
                    if job != NULL:
                        self.head = job.next
                        if self.head == NULL:
                            self.tail = NULL
                    else:
                        stop = self.stopping
                    PyThread_release_lock(self.q_lock)
                    if job == NULL:
                        break
                    self.run_job(job)
                    # The results are written before the eventfd the device reads
                    # after (a system call orders them).
                    write(job.notify_fd, &one, 8)
                if stop:
                    break

    def close(self):
        """Stop the thread after the batches queued (idempotent); the fd stays open."""
        cdef uint64_t one = 1
        if self.stopping:
            return
        PyThread_acquire_lock(self.q_lock, WAIT_LOCK)
        self.stopping = True
        PyThread_release_lock(self.q_lock)
        if self.started:
            write(self.wake_fd, &one, 8)
            self.thread.join()
