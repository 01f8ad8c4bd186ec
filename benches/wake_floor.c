/*
 * The floor of a periodic device on this machine: what one wake-up per period
 * costs a process that does nothing else, depending on what wakes it.
 *
 * Two processes stand in for a device and its driver, with no virtqueue, no
 * Python and no vhost-user between them: only the wake-ups and the system calls
 * a paced audio device needs each period.
 *
 *   device   the device keeps time: a periodic timerfd wakes it (epoll_wait),
 *            it reads the timer and writes the call eventfd; the driver sleeps
 *            in read() on the call eventfd (our null backend's shape);
 *   driver   the driver keeps time: its periodic timerfd wakes it, it writes
 *            the kick eventfd and sleeps on the call eventfd; the device
 *            sleeps in epoll_wait on the kick, reads it, writes the call
 *            (upstream's null backend driven by a real-time source).
 *
 * Usage: wake_floor device|driver PERIOD_US PERIODS
 * Prints one line, per period over PERIODS periods after 50 of warm-up:
 *   "<device ns> <driver ns> <device slices> <device on-CPU ns> <driver on-CPU ns>"
 * the CPU time each process was charged (schedstat: from its wake-up on), the
 * device's time slices, and the time each process really ran (the perf
 * task-clock counter: from its switch-in on; -1 where perf events are refused).
 * The two clocks differ by what the kernel charges a woken task for the time
 * between its wake-up and its switch-in.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/perf_event.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <sys/wait.h>
#include <unistd.h>

#define WARMUP 50

static void die(const char *what)
{
    fprintf(stderr, "wake_floor: %s: %s\n", what, strerror(errno));
    exit(2);
}

/* Fields 1 (ns on the CPU) and 3 (time slices) of /proc/PID/schedstat. */
static void schedstat(pid_t pid, long long *ns, long long *slices)
{
    char path[64];
    long long wait;
    FILE *f;

    snprintf(path, sizeof(path), "/proc/%d/schedstat", (int)pid);
    f = fopen(path, "r");
    if (!f)
        die(path);
    if (fscanf(f, "%lld %lld %lld", ns, &wait, slices) != 3)
        die("schedstat format");
    fclose(f);
}

/* A task-clock counter on the process pid (its later threads too); -1 when refused. */
static int task_clock(pid_t pid)
{
    struct perf_event_attr attr;

    memset(&attr, 0, sizeof(attr));
    attr.size = sizeof(attr);
    attr.type = PERF_TYPE_SOFTWARE;
    attr.config = PERF_COUNT_SW_TASK_CLOCK;
    attr.inherit = 1;
    return (int)syscall(SYS_perf_event_open, &attr, pid, -1, -1, PERF_FLAG_FD_CLOEXEC);
}

static long long read_clock(int fd)
{
    uint64_t ns;

    if (fd < 0)
        return 0;
    if (read(fd, &ns, sizeof(ns)) != sizeof(ns))
        die("read task-clock");
    return (long long)ns;
}

static int periodic_timer(long period_us)
{
    struct itimerspec its;
    int fd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC);

    if (fd < 0)
        die("timerfd_create");
    its.it_interval.tv_sec = period_us / 1000000;
    its.it_interval.tv_nsec = (period_us % 1000000) * 1000;
    its.it_value = its.it_interval;
    if (timerfd_settime(fd, 0, &its, NULL) < 0)
        die("timerfd_settime");
    return fd;
}

static void must_rw(ssize_t got, const char *what)
{
    if (got != 8)
        die(what);
}

/* The device: wait for its wake-up source, read it, signal the call. */
static void device(int device_paced, long period_us, long total, int kick, int call)
{
    struct epoll_event ev = {.events = EPOLLIN}, ready[4];
    int ep = epoll_create1(EPOLL_CLOEXEC);
    int src = device_paced ? periodic_timer(period_us) : kick;
    uint64_t v;

    if (ep < 0)
        die("epoll_create1");
    ev.data.fd = src;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, src, &ev) < 0)
        die("epoll_ctl");
    /* A late wake-up finds several expirations or kicks: answer them all at once. */
    for (long seen = 0; seen < total; seen += (long)v) {
        if (epoll_wait(ep, ready, 4, -1) < 1)
            die("epoll_wait");
        must_rw(read(src, &v, 8), "read wake-up source");
        must_rw(write(call, &v, 8), "write call");
    }
    _exit(0);
}

int main(int argc, char **argv)
{
    long period_us, periods, total;
    long long d0 = 0, d1, s0 = 0, s1, f0 = 0, f1, unused, dc0 = 0, fc0 = 0, dc1, fc1;
    int device_paced, kick, call, tfd = -1, status, dclock, fclock;
    uint64_t v;
    pid_t pid;

    if (argc != 4 || (strcmp(argv[1], "device") && strcmp(argv[1], "driver"))) {
        fprintf(stderr, "usage: wake_floor device|driver PERIOD_US PERIODS\n");
        return 2;
    }
    device_paced = strcmp(argv[1], "device") == 0;
    period_us = atol(argv[2]);
    periods = atol(argv[3]);
    if (period_us <= 0 || periods <= 0) {
        fprintf(stderr, "wake_floor: PERIOD_US and PERIODS must be positive\n");
        return 2;
    }
    total = periods + WARMUP;
    kick = eventfd(0, EFD_CLOEXEC);
    call = eventfd(0, EFD_CLOEXEC);
    if (kick < 0 || call < 0)
        die("eventfd");
    pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0)
        device(device_paced, period_us, total, kick, call);
    dclock = task_clock(pid);
    fclock = task_clock(0);
    if (!device_paced)
        tfd = periodic_timer(period_us);
    for (long i = 0, answered = 0; answered < total; i++) {
        if (i == WARMUP) {
            schedstat(pid, &d0, &s0);
            schedstat(getpid(), &f0, &unused);
            dc0 = read_clock(dclock);
            fc0 = read_clock(fclock);
        }
        if (!device_paced) {
            must_rw(read(tfd, &v, 8), "read timer");
            v = 1;
            must_rw(write(kick, &v, 8), "write kick");
        }
        must_rw(read(call, &v, 8), "read call");
        answered += (long)v;
    }
    schedstat(pid, &d1, &s1);
    schedstat(getpid(), &f1, &unused);
    dc1 = read_clock(dclock);
    fc1 = read_clock(fclock);
    if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status))
        die("the device process failed");
    printf("%.1f %.1f %.3f %.1f %.1f\n", (double)(d1 - d0) / periods, (double)(f1 - f0) / periods,
           (double)(s1 - s0) / periods, dclock < 0 ? -1.0 : (double)(dc1 - dc0) / periods,
           fclock < 0 ? -1.0 : (double)(fc1 - fc0) / periods);
    return 0;
}
