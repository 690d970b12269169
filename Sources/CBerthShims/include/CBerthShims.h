// CBerthShims: the Linux calls that `import Glibc` does not expose to Swift
// (epoll, eventfd, timerfd, splice, accept4, pipe2, F_SETPIPE_SZ, sched_setaffinity),
// forwarded one-to-one. No logic lives here: errno is left as the call set it.
//
// This header is read without _GNU_SOURCE (so that its view of the system headers matches
// Swift's Glibc module); the GNU-only calls are declared here and defined in shims.c, which is
// compiled with _GNU_SOURCE and checks that the constants below match the system's.
#ifndef CBERTH_SHIMS_H
#define CBERTH_SHIMS_H

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <sys/socket.h>
#include <sys/resource.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <unistd.h>
#include <stdint.h>
#include <errno.h>
#include <pthread.h>

static const int CBERTH_SPLICE_F_MOVE = 1;
static const int CBERTH_SPLICE_F_NONBLOCK = 2;
static const int CBERTH_SPLICE_F_MORE = 4;
static const int CBERTH_F_SETPIPE_SZ = 1031;
static const int CBERTH_F_GETPIPE_SZ = 1032;
static const int CBERTH_EFD_NONBLOCK = EFD_NONBLOCK;
static const int CBERTH_EFD_CLOEXEC = EFD_CLOEXEC;
static const int CBERTH_SOCK_NONBLOCK = SOCK_NONBLOCK;
static const int CBERTH_SOCK_CLOEXEC = SOCK_CLOEXEC;
static const int CBERTH_O_NONBLOCK = O_NONBLOCK;
static const int CBERTH_O_CLOEXEC = O_CLOEXEC;
static const uint32_t CBERTH_EPOLLIN = EPOLLIN;
static const uint32_t CBERTH_EPOLLOUT = EPOLLOUT;
static const uint32_t CBERTH_EPOLLERR = EPOLLERR;
static const uint32_t CBERTH_EPOLLHUP = EPOLLHUP;
static const uint32_t CBERTH_EPOLLRDHUP = EPOLLRDHUP;
static const uint32_t CBERTH_EPOLLET = EPOLLET;

static inline int cberth_epoll_create(void) { return epoll_create1(EPOLL_CLOEXEC); }

static inline int cberth_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t data) {
    struct epoll_event ev;
    ev.events = events;
    ev.data.u64 = data;
    return epoll_ctl(epfd, op, fd, &ev);
}

static inline int cberth_epoll_wait(int epfd, struct epoll_event *events, int maxevents, int timeout) {
    return epoll_wait(epfd, events, maxevents, timeout);
}

// epoll_event is packed on x86_64; Swift reads the fields through these.
static inline uint32_t cberth_epoll_event_events(const struct epoll_event *events, int index) {
    return events[index].events;
}
static inline uint64_t cberth_epoll_event_data(const struct epoll_event *events, int index) {
    return events[index].data.u64;
}
static inline size_t cberth_epoll_event_size(void) { return sizeof(struct epoll_event); }

static inline int cberth_eventfd(void) { return eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC); }

static inline int cberth_timerfd_create(void) {
    return timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
}
static inline int cberth_timerfd_settime_ns(int fd, int64_t nanoseconds) {
    struct itimerspec spec = {0};
    spec.it_value.tv_sec = nanoseconds / 1000000000;
    spec.it_value.tv_nsec = nanoseconds % 1000000000;
    return timerfd_settime(fd, 0, &spec, NULL);
}

ssize_t cberth_splice(int fd_in, int fd_out, size_t len, unsigned int flags);

int cberth_accept4(int fd, struct sockaddr *addr, socklen_t *len);

int cberth_pipe2(int fds[2]);
/// posix_spawn_file_actions_addclosefrom_np: the child closes every descriptor from `from` on.
int cberth_spawn_closefrom(posix_spawn_file_actions_t *actions, int from);

static inline int cberth_fcntl_int(int fd, int cmd, int value) { return fcntl(fd, cmd, value); }

static inline int cberth_socket(int domain, int type, int protocol) {
    return socket(domain, type | SOCK_NONBLOCK | SOCK_CLOEXEC, protocol);
}

// SCM_RIGHTS over a unix stream socket (the CMSG_* macros are not visible to Swift): one
// sendmsg/recvmsg each. Received fds are close-on-exec (MSG_CMSG_CLOEXEC); `*truncated` is set
// when the kernel dropped control data (MSG_CTRUNC: the fds it did pass are still returned).
enum { CBERTH_MAX_PASSED_FDS = 64 };
ssize_t cberth_send_fds(int socket, const void *bytes, size_t length, const int *fds, int count);
ssize_t cberth_receive_fds(int socket, void *bytes, size_t length, int *fds, int capacity, int *received, int *truncated);

/// Pins the calling thread to one CPU (used by `bench` and `--cpu`).
int cberth_pin_to_cpu(int cpu);
// The same for another thread (or process) by its kernel id (a tid from /proc/PID/task).
int cberth_pin_task_to_cpu(int tid, int cpu);
// setpriority(PRIO_PROCESS, gettid(), nice): the calling thread's nice value alone (Linux
// schedules threads as tasks). Raising it needs no privilege.
// CPUs in this thread's affinity mask (sched_getaffinity + CPU_COUNT), or -1.
int cberth_affinity_cpu_count(void);
int cberth_set_thread_nice(int nice);

/// Names a thread (15 characters at most), for top/perf.
int cberth_set_thread_name(pthread_t thread, const char *name);

/// Blocks `signals` (SIGTERM, SIGINT, ...) in the calling thread, so that threads created
/// afterwards inherit the mask and one thread can take them with sigwait.
static inline int cberth_block_signals(const int *signals, int count) {
    sigset_t set;
    sigemptyset(&set);
    for (int i = 0; i < count; i++) sigaddset(&set, signals[i]);
    return pthread_sigmask(SIG_BLOCK, &set, NULL);
}

/// Waits for one of `signals`; returns the signal number, or -1 with errno.
static inline int cberth_wait_signal(const int *signals, int count) {
    sigset_t set;
    sigemptyset(&set);
    for (int i = 0; i < count; i++) sigaddset(&set, signals[i]);
    int received = 0;
    int result = sigwait(&set, &received);
    if (result != 0) { errno = result; return -1; }
    return received;
}

static inline int cberth_ignore_sigpipe(void) {
    return signal(SIGPIPE, SIG_IGN) == SIG_ERR ? -1 : 0;
}
#endif
