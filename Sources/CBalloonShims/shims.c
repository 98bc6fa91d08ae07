#define _GNU_SOURCE
#include "balloon_shims.h"

#include <fcntl.h>
#include <sys/mman.h>

#include <errno.h>
#include <signal.h>
#include <pthread.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int bs_cpuid(uint32_t leaf, uint32_t out[4]) {
#if defined(__x86_64__) || defined(__i386__)
    uint32_t a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(leaf), "c"(0));
    out[0] = a; out[1] = b; out[2] = c; out[3] = d;
    return 0;
#else
    (void)leaf; (void)out;
    return -1;
#endif
}

static volatile sig_atomic_t signal_fd = -1;
static volatile sig_atomic_t last_signal = 0;

static void on_signal(int sig) {
    int saved = errno;
    last_signal = sig;
    if (signal_fd >= 0) {
        unsigned char b = (unsigned char)sig;
        ssize_t r = write(signal_fd, &b, 1);
        (void)r;
    }
    errno = saved;
}

int bs_install_signal_pipe(int fd) {
    signal_fd = fd;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    if (sigaction(SIGTERM, &sa, 0) != 0) return -1;
    if (sigaction(SIGINT, &sa, 0) != 0) return -1;
    if (sigaction(SIGHUP, &sa, 0) != 0) return -1;
    /* A closed status reader or log pipe must not kill the daemon mid-round: EPIPE instead. */
    if (signal(SIGPIPE, SIG_IGN) == SIG_ERR) return -1;
    return 0;
}

void bs_uninstall_signal_pipe(int fd) {
    /* Only the pipe this fd belongs to: a newer pipe stays installed. After this the handler
       writes nowhere, so a signal arriving after close() cannot write into a reused fd. */
    if (signal_fd == fd) signal_fd = -1;
}

int bs_signal_received(void) { return last_signal; }

static void on_alarm(int sig) { (void)sig; }

long bs_write_with_timeout(int fd, const void *buf, unsigned long len, int timeout_ms) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; /* no SA_RESTART: the write must come back with EINTR */
    if (sigaction(SIGALRM, &sa, 0) != 0) return -1;
    sigset_t alarm_only, old;
    sigemptyset(&alarm_only);
    sigaddset(&alarm_only, SIGALRM);
    if (pthread_sigmask(SIG_UNBLOCK, &alarm_only, &old) != 0) return -1;
    struct sigevent sev;
    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = SIGALRM;
    sev._sigev_un._tid = gettid();
    timer_t timer;
    if (timer_create(CLOCK_MONOTONIC, &sev, &timer) != 0) {
        int e = errno;
        pthread_sigmask(SIG_SETMASK, &old, 0);
        errno = e;
        return -1;
    }
    struct itimerspec its;
    memset(&its, 0, sizeof its);
    its.it_value.tv_sec = timeout_ms / 1000;
    its.it_value.tv_nsec = (long)(timeout_ms % 1000) * 1000000L;
    if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0) its.it_value.tv_nsec = 1;
    /* Keep firing every 20 ms until timer_delete: one signal can be used up before the
       write starts (the thread preempted) or by a path the kernel restarts transparently
       (ERESTARTNOINTR while waiting for the device-hotplug lock). */
    its.it_interval.tv_nsec = 20 * 1000000L;
    long r = -1;
    int e = 0;
    if (timer_settime(timer, 0, &its, 0) != 0) {
        e = errno;
    } else {
        r = (long)write(fd, buf, len);
        e = errno;
    }
    timer_delete(timer);
    pthread_sigmask(SIG_SETMASK, &old, 0);
    errno = e;
    return r;
}

int bs_memfd_create(const char *name, unsigned int flags) { return memfd_create(name, flags); }

int bs_punch_hole(int fd, int64_t offset, int64_t length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length);
}

#include <sys/ioctl.h>

int bs_ioctl_pointer(int fd, unsigned long request, void *arg) { return ioctl(fd, request, arg); }
int bs_ioctl_value(int fd, unsigned long request, unsigned long value) { return ioctl(fd, request, value); }
