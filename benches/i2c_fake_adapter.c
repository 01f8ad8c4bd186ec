/* A fake /dev/i2c-N for measuring the daemons on a host without I2C (LD_PRELOAD,
   benches/i2c_stub_table.py --host-fake): opens of /dev/i2c-* get /dev/null, and the
   i2c-dev ioctls (I2C_FUNCS, I2C_SLAVE, I2C_SMBUS) answer at once as an SMBus-only
   adapter with one chip of 256 byte registers, register 0x10 holding 0x5a, as
   i2c-stub does in the guest bench.  Every other ioctl goes to the kernel. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/i2c.h>
#include <linux/i2c-dev.h>

static unsigned char regs[256] = {[0x10] = 0x5a};

static int fake(unsigned long req, void *arg, int *rc) {
    if (req == I2C_FUNCS) { *(unsigned long *)arg = I2C_FUNC_SMBUS_QUICK | I2C_FUNC_SMBUS_BYTE | I2C_FUNC_SMBUS_BYTE_DATA | I2C_FUNC_SMBUS_WORD_DATA | I2C_FUNC_SMBUS_I2C_BLOCK; *rc = 0; return 1; }
    if (req == I2C_SLAVE || req == I2C_SLAVE_FORCE) { *rc = 0; return 1; }
    if (req == I2C_SMBUS) {
        struct i2c_smbus_ioctl_data *d = arg;
        if (d->size == I2C_SMBUS_BYTE_DATA) {
            if (d->read_write == I2C_SMBUS_READ) d->data->byte = regs[d->command]; else regs[d->command] = d->data->byte;
        } else if (d->size == I2C_SMBUS_WORD_DATA) {
            if (d->read_write == I2C_SMBUS_READ) d->data->word = regs[d->command] | regs[(d->command + 1) & 255] << 8;
            else { regs[d->command] = d->data->word; regs[(d->command + 1) & 255] = d->data->word >> 8; }
        }
        *rc = 0; return 1;
    }
    return 0;
}

int ioctl(int fd, unsigned long req, ...) {
    static int (*real)(int, unsigned long, ...);
    va_list ap; va_start(ap, req); void *arg = va_arg(ap, void *); va_end(ap);
    int rc;
    if (fake(req, arg, &rc)) return rc;
    if (!real) real = dlsym(RTLD_NEXT, "ioctl");
    return real(fd, req, arg);
}

#define REDIRECT(path) (strncmp((path), "/dev/i2c-", 9) == 0 ? "/dev/null" : (path))
int open(const char *p, int f, ...) { static int (*r)(const char *, int, ...); va_list ap; va_start(ap, f); int m = va_arg(ap, int); va_end(ap); if (!r) r = dlsym(RTLD_NEXT, "open"); return r(REDIRECT(p), f, m); }
int open64(const char *p, int f, ...) { static int (*r)(const char *, int, ...); va_list ap; va_start(ap, f); int m = va_arg(ap, int); va_end(ap); if (!r) r = dlsym(RTLD_NEXT, "open64"); return r(REDIRECT(p), f, m); }
int openat(int d, const char *p, int f, ...) { static int (*r)(int, const char *, int, ...); va_list ap; va_start(ap, f); int m = va_arg(ap, int); va_end(ap); if (!r) r = dlsym(RTLD_NEXT, "openat"); return r(d, REDIRECT(p), f, m); }
int openat64(int d, const char *p, int f, ...) { static int (*r)(int, const char *, int, ...); va_list ap; va_start(ap, f); int m = va_arg(ap, int); va_end(ap); if (!r) r = dlsym(RTLD_NEXT, "openat64"); return r(d, REDIRECT(p), f, m); }
