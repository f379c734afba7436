/*
 * netbridge: the VM's way to its egress proxy, a loopback TCP port forwarded to a Unix socket.
 *
 *   /run/netbridge PORT UNIX_PATH
 *   /run/netbridge --connect PORT       (the way in: fd 0 is a socket from the worker)
 *
 * Started by the worker through the VM's init at boot. The VM has loopback only, so programs
 * that honour HTTP_PROXY / ALL_PROXY (which name a TCP address) reach the worker's proxy
 * through this bridge and the Unix socket bound into the sandbox. It decides nothing: the
 * proxy at the other end does (docs/network.md).
 *
 * Written in C, like the init, because every idle VM runs one: a Python bridge cost an
 * interpreter per VM. One process accepts; each connection is a child that copies
 * both ways with poll() and half-closes as each side ends, then exits. Prints "ready\n" on
 * stdout once listening. Children are reaped automatically (SIGCHLD ignored).
 *
 * `--connect PORT` is the way in, for preview URLs (vmworker/ingress.py): the worker starts
 * one per connection with a socket of its own as fd 0, this connects to 127.0.0.1:PORT (then
 * [::1]:PORT) in the VM, answers '+' (or '-' when nothing listens) on fd 0 and copies both
 * ways. The VM's loopback is reachable only from inside it, so the copy has to run here.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define BUF 65536

static int copy_once(int from, int to, char *buf) {
    ssize_t n = read(from, buf, BUF);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) return 1;
    if (n <= 0) return 0;
    for (ssize_t off = 0; off < n;) {
        ssize_t w = write(to, buf + off, (size_t)(n - off));
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        off += w;
    }
    return 1;
}

static void copy_both_ways(int client, int up) {
    static char buf[BUF];
    struct pollfd fds[2] = {{.fd = client, .events = POLLIN}, {.fd = up, .events = POLLIN}};
    int peer[2] = {up, client};
    int open_dirs = 2;
    while (open_dirs > 0) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR) continue;
            break;
        }
        for (int i = 0; i < 2; i++) {
            if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            int r = copy_once(fds[i].fd, peer[i], buf);
            if (r < 0) _exit(0);
            if (r == 0) {  /* this side ended: pass the end on, keep the other direction */
                shutdown(peer[i], SHUT_WR);
                fds[i].fd = -1;
                open_dirs--;
            }
        }
    }
    _exit(0);
}

static void relay(int client, const char *path) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) _exit(2);
    strcpy(addr.sun_path, path);
    int up = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (up < 0 || connect(up, (struct sockaddr *)&addr, sizeof addr) < 0) _exit(1);
    copy_both_ways(client, up);
}

static int connect_loopback(int port) {
    struct sockaddr_in v4 = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd >= 0 && connect(fd, (struct sockaddr *)&v4, sizeof v4) == 0) return fd;
    if (fd >= 0) close(fd);
    struct sockaddr_in6 v6 = {.sin6_family = AF_INET6, .sin6_port = htons((unsigned short)port),
                              .sin6_addr = IN6ADDR_LOOPBACK_INIT};
    fd = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd >= 0 && connect(fd, (struct sockaddr *)&v6, sizeof v6) == 0) return fd;
    if (fd >= 0) close(fd);
    return -1;
}

static int connect_in(const char *raw_port) {
    int port = atoi(raw_port);
    signal(SIGPIPE, SIG_IGN);
    if (port <= 0 || port > 65535) return 2;
    int up = connect_loopback(port);
    if (write(STDIN_FILENO, up < 0 ? "-" : "+", 1) != 1 || up < 0) return 1;
    copy_both_ways(STDIN_FILENO, up);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "--connect") == 0) return connect_in(argv[2]);
    if (argc != 3) {
        fprintf(stderr, "usage: netbridge PORT UNIX_PATH\n");
        return 2;
    }
    int port = atoi(argv[1]);
    if (port <= 0 || port > 65535) {
        fprintf(stderr, "netbridge: bad port %s\n", argv[1]);
        return 2;
    }
    signal(SIGCHLD, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port),
                               .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof addr) < 0 ||
        listen(listener, 128) < 0) {
        perror("netbridge: listen");
        return 1;
    }
    if (write(STDOUT_FILENO, "ready\n", 6) != 6) return 1;
    close(STDOUT_FILENO);
    for (;;) {
        int client = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
        if (client < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE || errno == ENFILE) {
                if (errno == EMFILE || errno == ENFILE) usleep(100000);
                continue;
            }
            perror("netbridge: accept");
            return 1;
        }
        pid_t pid = fork();
        if (pid == 0) {
            close(listener);
            relay(client, argv[2]);
        }
        close(client);  /* parent, or a failed fork: the client sees its connection close */
    }
}
