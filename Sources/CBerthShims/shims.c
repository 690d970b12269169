// The GNU-only calls of CBerthShims, compiled with _GNU_SOURCE (see the header).
#define _GNU_SOURCE
#include <fcntl.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/socket.h>
#include <unistd.h>
#include <string.h>
#include <errno.h>
#include <pthread.h>
#include <spawn.h>
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
int cberth_spawn_closefrom(posix_spawn_file_actions_t *actions, int from) {
    return posix_spawn_file_actions_addclosefrom_np(actions, from);
}

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

ssize_t cberth_send_fds(int socket, const void *bytes, size_t length, const int *fds, int count) {
    if (count < 0 || count > CBERTH_MAX_PASSED_FDS) { errno = EINVAL; return -1; }
    union { char buffer[CMSG_SPACE(sizeof(int) * CBERTH_MAX_PASSED_FDS)]; struct cmsghdr align; } control;
    struct iovec vector = { .iov_base = (void *)bytes, .iov_len = length };
    struct msghdr message = { .msg_iov = &vector, .msg_iovlen = 1 };
    if (count > 0) {
        message.msg_control = control.buffer;
        message.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)count);
        struct cmsghdr *header = CMSG_FIRSTHDR(&message);
        header->cmsg_level = SOL_SOCKET;
        header->cmsg_type = SCM_RIGHTS;
        header->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)count);
        memcpy(CMSG_DATA(header), fds, sizeof(int) * (size_t)count);
    }
    return sendmsg(socket, &message, MSG_NOSIGNAL);
}

ssize_t cberth_receive_fds(int socket, void *bytes, size_t length, int *fds, int capacity, int *received, int *truncated) {
    union { char buffer[CMSG_SPACE(sizeof(int) * CBERTH_MAX_PASSED_FDS)]; struct cmsghdr align; } control;
    struct iovec vector = { .iov_base = bytes, .iov_len = length };
    struct msghdr message = { .msg_iov = &vector, .msg_iovlen = 1,
                              .msg_control = control.buffer, .msg_controllen = sizeof(control.buffer) };
    *received = 0;
    *truncated = 0;
    ssize_t result = recvmsg(socket, &message, MSG_CMSG_CLOEXEC);
    if (result < 0) return result;
    for (struct cmsghdr *header = CMSG_FIRSTHDR(&message); header; header = CMSG_NXTHDR(&message, header)) {
        if (header->cmsg_level != SOL_SOCKET || header->cmsg_type != SCM_RIGHTS) continue;
        size_t count = (header->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        const int *passed = (const int *)CMSG_DATA(header);
        for (size_t index = 0; index < count; index++) {
            // Never more than asked for; extra ones (a peer not following the protocol) are closed.
            if (*received < capacity) fds[(*received)++] = passed[index];
            else { close(passed[index]); *truncated = 1; }
        }
    }
    if (message.msg_flags & MSG_CTRUNC) *truncated = 1;
    return result;
}
