/*
 * vminit: PID 1 of an actorvisor VM.
 *
 * The worker starts one long-lived sandbox per actor (bubblewrap with --as-pid-1) whose
 * first process is this program. It owns three jobs and nothing else:
 *   - reap every process of the VM, orphans included (PID 1's duty);
 *   - start commands on the worker's request, inside the VM's namespaces, cgroup and
 *     seccomp filter (all inherited), each in a session of its own;
 *   - forward signals sent to it from outside to every process of the VM, and take the
 *     whole VM down when asked to, when the worker goes away, or on SIGTERM.
 *
 * Why C and not Python: it is resident in every VM for the VM's whole life (a Python
 * interpreter would cost ~8 MiB per idle actor), it must not depend on the VM's userland,
 * and its job is a handful of system calls. It never allocates per message beyond one
 * fixed buffer and a pid table, never reads a file of the VM, and never runs anything
 * itself.
 *
 * The control channel is a SOCK_SEQPACKET socket inherited from the worker (fd given as
 * argv[1]); every message is one datagram: a fixed header (struct msg) then, for SPAWN,
 * NUL-terminated strings: cwd, argv[0..argc), envp[0..envc). File descriptors travel as
 * SCM_RIGHTS: stdin/stdout/stderr of a SPAWN; the pty master of a SPAWNED reply. The
 * layout is mirrored by vmworker/initproto.py; change both together.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

enum op {
    OP_SPAWN = 1,    /* worker → init: start a command                          */
    OP_KILL = 2,     /* worker → init: signal a process (or its group)          */
    OP_SHUTDOWN = 3, /* worker → init: TERM everything, KILL after grace, exit  */
    OP_SPAWNED = 10, /* init → worker: started, pid (+ pty master fd)           */
    OP_ERROR = 11,   /* init → worker: request failed, errno in `status`        */
    OP_EXIT = 12,    /* init → worker: a spawned process ended, wait status     */
    OP_KILLED = 13,  /* init → worker: kill done, errno (0 = ok) in `status`    */
};

enum flag {
    F_PTY = 1,   /* SPAWN: run on a new pseudo-terminal (rows, cols)           */
    F_GROUP = 2, /* KILL: signal the process group, not only the process       */
};

struct msg {
    uint32_t op;
    uint32_t id;     /* request id, echoed in the reply                         */
    int32_t pid;
    int32_t status;  /* KILL: signal; SHUTDOWN: grace ms; EXIT: wait status; ERROR: errno */
    uint32_t argc;
    uint32_t envc;
    uint16_t rows;
    uint16_t cols;
    uint32_t flags;
};

#define MAX_MSG (256 * 1024)
#define MAX_STRINGS 4096

static int ctl = -1;
static pid_t *tracked;
static size_t n_tracked, cap_tracked;

static void send_msg(const struct msg *m, int fd) {
    struct iovec iov = {.iov_base = (void *)m, .iov_len = sizeof *m};
    char cbuf[CMSG_SPACE(sizeof(int))];
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
    if (fd >= 0) {
        memset(cbuf, 0, sizeof cbuf);
        mh.msg_control = cbuf;
        mh.msg_controllen = sizeof cbuf;
        struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof(int));
    }
    while (sendmsg(ctl, &mh, MSG_NOSIGNAL) < 0 && errno == EINTR) {
    }
}

static void reply(uint32_t op, uint32_t id, int32_t pid, int32_t status) {
    struct msg m = {.op = op, .id = id, .pid = pid, .status = status};
    send_msg(&m, -1);
}

static void track(pid_t pid) {
    if (n_tracked == cap_tracked) {
        size_t cap = cap_tracked ? cap_tracked * 2 : 64;
        pid_t *grown = realloc(tracked, cap * sizeof *grown);
        if (!grown) {
            return; /* out of memory: the exit goes unreported rather than init dying */
        }
        tracked = grown;
        cap_tracked = cap;
    }
    tracked[n_tracked++] = pid;
}

static int untrack(pid_t pid) {
    for (size_t i = 0; i < n_tracked; i++) {
        if (tracked[i] == pid) {
            tracked[i] = tracked[--n_tracked];
            return 1;
        }
    }
    return 0;
}

static void reap(void) {
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        if (untrack(pid)) {
            reply(OP_EXIT, 0, pid, status);
        }
    }
}

/* The VM's processes get what any process expects: default signal dispositions, an
 * empty mask, an OOM score of their own (init's -1000 is set from outside and inherited). */
static void child_setup(void) {
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    for (int s = 1; s < NSIG; s++) {
        signal(s, SIG_DFL);
    }
    int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
    if (fd >= 0) {
        (void)!write(fd, "0", 1);
        close(fd);
    }
}

static void do_spawn(const struct msg *m, const char *payload, size_t len, int *fds, int nfds) {
    char *strings[MAX_STRINGS + 1];
    size_t want = 1 + (size_t)m->argc + (size_t)m->envc, n = 0;
    int err = 0;
    if (m->argc == 0 || want > MAX_STRINGS) {
        err = E2BIG;
    }
    for (size_t off = 0; !err && off < len && n < want; n++) {
        strings[n] = (char *)payload + off;
        const char *end = memchr(payload + off, '\0', len - off);
        if (!end) {
            err = EINVAL;
            break;
        }
        off = (size_t)(end - payload) + 1;
    }
    if (!err && n != want) {
        err = EINVAL;
    }
    int pty = (m->flags & F_PTY) != 0;
    if (!err && (pty ? nfds != 0 : nfds != 3)) {
        err = EBADF;
    }
    if (err) {
        reply(OP_ERROR, m->id, 0, err);
        return;
    }
    const char *cwd = strings[0];
    char *envp[MAX_STRINGS + 1];
    for (size_t i = 0; i < m->envc; i++) {
        envp[i] = strings[1 + m->argc + i];
    }
    envp[m->envc] = NULL;
    char **argv = &strings[1];
    argv[m->argc] = NULL; /* the slot of envp's first string, copied above */

    int master = -1;
    char slave_name[128];
    if (pty) {
        master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (master < 0 || grantpt(master) < 0 || unlockpt(master) < 0 ||
            ptsname_r(master, slave_name, sizeof slave_name) != 0) {
            err = errno ? errno : EIO;
            if (master >= 0) {
                close(master);
            }
            reply(OP_ERROR, m->id, 0, err);
            return;
        }
        struct winsize ws = {.ws_row = m->rows, .ws_col = m->cols};
        ioctl(master, TIOCSWINSZ, &ws);
    }

    /* The child reports a failed exec through this pipe; a successful exec closes it. */
    int report[2];
    if (pipe2(report, O_CLOEXEC) < 0) {
        err = errno;
        if (master >= 0) {
            close(master);
        }
        reply(OP_ERROR, m->id, 0, err);
        return;
    }
    pid_t pid = fork();
    if (pid == 0) {
        close(report[0]);
        child_setup();
        /* A session of its own: a process group the worker can signal as one, and no
         * controlling terminal but its own pty (nothing to inject keystrokes into). */
        setsid();
        int io[3];
        if (pty) {
            int slave = open(slave_name, O_RDWR | O_NOCTTY);
            if (slave < 0 || ioctl(slave, TIOCSCTTY, 0) < 0) {
                goto fail;
            }
            io[0] = io[1] = io[2] = slave;
        } else {
            io[0] = fds[0];
            io[1] = fds[1];
            io[2] = fds[2];
        }
        /* Move the sources above 2 first so dup2 never clobbers one still needed. */
        for (int i = 0; i < 3; i++) {
            int high = fcntl(io[i], F_DUPFD_CLOEXEC, 10);
            if (high < 0) {
                goto fail;
            }
            io[i] = high;
        }
        for (int i = 0; i < 3; i++) {
            if (dup2(io[i], i) < 0) {
                goto fail;
            }
        }
        syscall(SYS_close_range, 3, ~0U, 0x4 /* CLOSE_RANGE_CLOEXEC */);
        if (chdir(cwd) < 0) {
            goto fail;
        }
        execvpe(argv[0], argv, envp);
    fail:
        err = errno;
        (void)!write(report[1], &err, sizeof err);
        _exit(127);
    }
    int fork_err = pid < 0 ? errno : 0;
    close(report[1]);
    for (int i = 0; i < nfds; i++) {
        close(fds[i]);
    }
    if (pid < 0) {
        close(report[0]);
        if (master >= 0) {
            close(master);
        }
        reply(OP_ERROR, m->id, 0, fork_err);
        return;
    }
    int child_err = 0;
    ssize_t got;
    while ((got = read(report[0], &child_err, sizeof child_err)) < 0 && errno == EINTR) {
    }
    close(report[0]);
    if (got == sizeof child_err) {
        /* exec failed: reap the child here so no EXIT is sent for it. */
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
        }
        if (master >= 0) {
            close(master);
        }
        reply(OP_ERROR, m->id, 0, child_err);
        return;
    }
    track(pid);
    struct msg r = {.op = OP_SPAWNED, .id = m->id, .pid = pid};
    send_msg(&r, master);
    if (master >= 0) {
        close(master);
    }
}

static void do_kill(const struct msg *m) {
    int err = 0;
    if (m->pid <= 1 || m->status < 0 || m->status >= NSIG) {
        err = EINVAL;
    } else if (kill((m->flags & F_GROUP) ? -m->pid : m->pid, m->status) < 0) {
        err = errno;
    }
    reply(OP_KILLED, m->id, m->pid, err);
}

static long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

/* TERM every process of the VM, KILL what is left after the grace period, reap, exit. */
static void shutdown_vm(int grace_ms, int sig) {
    kill(-1, sig);
    long deadline = now_ms() + (grace_ms > 0 ? grace_ms : 0);
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid > 0) {
            if (ctl >= 0 && untrack(pid)) {
                reply(OP_EXIT, 0, pid, status);
            }
            continue;
        }
        if (pid < 0 && errno == ECHILD) {
            break;
        }
        if (now_ms() >= deadline) {
            kill(-1, SIGKILL);
            deadline = now_ms() + 60000; /* KILL cannot be refused: wait for the reaping */
        }
        struct timespec nap = {0, 10 * 1000000L};
        nanosleep(&nap, NULL);
    }
    _exit(0);
}

int main(int argc, char **argv) {
    if (argc != 2 || getpid() != 1) {
        fprintf(stderr, "vminit: runs as PID 1 of a VM, started by the actorvisor worker\n");
        return 2;
    }
    ctl = atoi(argv[1]);
    /* Keep only stdio and the control socket: nothing else of bwrap's reaches the VM. */
    if (ctl > 3) {
        syscall(SYS_close_range, 3, ctl - 1, 0);
    }
    syscall(SYS_close_range, ctl + 1, ~0U, 0);
    sigset_t mask;
    sigfillset(&mask);
    sigdelset(&mask, SIGSEGV);
    sigdelset(&mask, SIGBUS);
    sigdelset(&mask, SIGFPE);
    sigdelset(&mask, SIGILL);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    int sfd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sfd < 0) {
        perror("vminit: signalfd");
        return 1;
    }
    fcntl(ctl, F_SETFD, FD_CLOEXEC);
    static char buf[MAX_MSG];
    for (;;) {
        struct pollfd pfd[2] = {{.fd = ctl, .events = POLLIN}, {.fd = sfd, .events = POLLIN}};
        if (poll(pfd, 2, -1) < 0) {
            if (errno == EINTR) {
                continue;
            }
            shutdown_vm(0, SIGKILL);
        }
        if (pfd[1].revents & POLLIN) {
            struct signalfd_siginfo si;
            while (read(sfd, &si, sizeof si) == sizeof si) {
                int s = (int)si.ssi_signo;
                if (s == SIGCHLD) {
                    reap();
                } else if (s == SIGTERM || s == SIGINT || s == SIGHUP) {
                    shutdown_vm(2000, SIGTERM);
                } else if (s != SIGPIPE) {
                    kill(-1, s); /* forwarded to every process of the VM */
                }
            }
        }
        if (pfd[0].revents & (POLLIN | POLLHUP | POLLERR)) {
            struct iovec iov = {.iov_base = buf, .iov_len = sizeof buf};
            char cbuf[CMSG_SPACE(3 * sizeof(int))];
            struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1,
                                .msg_control = cbuf, .msg_controllen = sizeof cbuf};
            ssize_t n = recvmsg(ctl, &mh, MSG_CMSG_CLOEXEC);
            if (n < 0 && (errno == EINTR || errno == EAGAIN)) {
                continue;
            }
            if (n <= 0) {
                /* The worker is gone: nobody may use this VM any more. */
                close(ctl);
                ctl = -1;
                shutdown_vm(0, SIGKILL);
            }
            int fds[3], nfds = 0;
            for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
                if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                    int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                    for (int i = 0; i < count; i++) {
                        int fd;
                        memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
                        if (nfds < 3) {
                            fds[nfds++] = fd;
                        } else {
                            close(fd);
                        }
                    }
                }
            }
            struct msg m;
            if ((size_t)n < sizeof m || (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC))) {
                for (int i = 0; i < nfds; i++) {
                    close(fds[i]);
                }
                if ((size_t)n >= sizeof m) {
                    memcpy(&m, buf, sizeof m);
                    reply(OP_ERROR, m.id, 0, E2BIG);
                }
                continue;
            }
            memcpy(&m, buf, sizeof m);
            switch (m.op) {
            case OP_SPAWN:
                do_spawn(&m, buf + sizeof m, (size_t)n - sizeof m, fds, nfds);
                nfds = 0;
                break;
            case OP_KILL:
                do_kill(&m);
                break;
            case OP_SHUTDOWN:
                shutdown_vm(m.status, SIGTERM);
                break;
            default:
                reply(OP_ERROR, m.id, 0, ENOSYS);
            }
            for (int i = 0; i < nfds; i++) {
                close(fds[i]);
            }
        }
    }
}
