// The GNU-only calls of CBerthShims, compiled with _GNU_SOURCE (see the header).
#define _GNU_SOURCE
#include <fcntl.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/socket.h>
#include <unistd.h>
#include <pthread.h>
#include "CBerthShims.h"

_Static_assert(CBERTH_SPLICE_F_MOVE == SPLICE_F_MOVE, "SPLICE_F_MOVE");
_Static_assert(CBERTH_SPLICE_F_NONBLOCK == SPLICE_F_NONBLOCK, "SPLICE_F_NONBLOCK");
_Static_assert(CBERTH_SPLICE_F_MORE == SPLICE_F_MORE, "SPLICE_F_MORE");
_Static_assert(CBERTH_F_SETPIPE_SZ == F_SETPIPE_SZ, "F_SETPIPE_SZ");
_Static_assert(CBERTH_F_GETPIPE_SZ == F_GETPIPE_SZ, "F_GETPIPE_SZ");

ssize_t cberth_splice(int fd_in, int fd_out, size_t len, unsigned int flags) {
    return splice(fd_in, NULL, fd_out, NULL, len, flags);
}

int cberth_accept4(int fd, struct sockaddr *addr, socklen_t *len) {
    return accept4(fd, addr, len, SOCK_NONBLOCK | SOCK_CLOEXEC);
}

int cberth_pipe2(int fds[2]) { return pipe2(fds, O_NONBLOCK | O_CLOEXEC); }

int cberth_pin_to_cpu(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return sched_setaffinity(0, sizeof(set), &set);
}

int cberth_pin_task_to_cpu(int tid, int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return sched_setaffinity(tid, sizeof(set), &set);
}

int cberth_affinity_cpu_count(void) {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) != 0) return -1;
    return CPU_COUNT(&set);
}

int cberth_set_thread_nice(int nice) {
    return setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), nice);
}

int cberth_set_thread_name(pthread_t thread, const char *name) {
    return pthread_setname_np(thread, name);
}
