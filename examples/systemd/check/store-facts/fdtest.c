/* fdtest: probe systemd's file descriptor store (FDSTORE=1) as a Type=notify service.
 *
 * Env (or argv[1] for the mode):
 *   FDTEST_MODE  normal (default) | move | dup | remove | child
 *     normal  store the listener as "web" if "web" was not passed
 *     move    FDSTOREREMOVE=1 FDNAME=web, then bind FDTEST_PORT2 and store that as "web"
 *     dup     like normal, then send the same fd again (2nd FDSTORE=1) and a dup() of it (3rd)
 *     remove  use the passed "web" (or bind), then send FDSTOREREMOVE=1 FDNAME=web
 *     child   a forked child (not the main PID) sends the FDSTORE=1 message, lingers 2 s
 *     addsame keep the passed "web", also bind FDTEST_PORT2 and store it as "web" too (no FDSTOREREMOVE)
 *   FDTEST_PORT  (default 8080), FDTEST_PORT2 (default 8081)
 * Answers every connection with an HTTP/1.0 200 whose body is "pid <pid> ino <inode>\n".
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <stddef.h>
#include <time.h>
#include <unistd.h>

static pid_t me;
#define LOG(...) do { printf("fdtest[%d]: ", (int)getpid()); printf(__VA_ARGS__); printf("\n"); fflush(stdout); } while (0)

static const char *env(const char *k) { const char *v = getenv(k); return v ? v : "(unset)"; }

static unsigned long ino_of(int fd) {
    struct stat st;
    if (fstat(fd, &st) < 0) return 0;
    return (unsigned long)st.st_ino;
}

static void addr_of(int fd, char *buf, size_t n) {
    struct sockaddr_storage ss; socklen_t l = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &l) < 0) { snprintf(buf, n, "getsockname: %s", strerror(errno)); return; }
    if (ss.ss_family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss; char ip[64];
        inet_ntop(AF_INET, &a->sin_addr, ip, sizeof ip);
        snprintf(buf, n, "%s:%u", ip, ntohs(a->sin_port));
    } else if (ss.ss_family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss; char ip[64];
        inet_ntop(AF_INET6, &a->sin6_addr, ip, sizeof ip);
        snprintf(buf, n, "[%s]:%u", ip, ntohs(a->sin6_port));
    } else snprintf(buf, n, "family %d", ss.ss_family);
}

/* Send one datagram to $NOTIFY_SOCKET, optionally with fds attached. */
static int notify(const char *msg, const int *fds, int nfds) {
    const char *p = getenv("NOTIFY_SOCKET");
    if (!p) { LOG("notify(%s): no NOTIFY_SOCKET", msg); return -1; }
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    socklen_t sl;
    size_t pl = strlen(p);
    if (pl >= sizeof sa.sun_path) return -1;
    memcpy(sa.sun_path, p, pl);
    if (p[0] == '@') sa.sun_path[0] = 0;
    sl = offsetof(struct sockaddr_un, sun_path) + pl + (p[0] == '@' ? 0 : 1);
    int s = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) return -1;
    struct iovec iov = { .iov_base = (void *)msg, .iov_len = strlen(msg) };
    char cbuf[CMSG_SPACE(sizeof(int) * 8)];
    struct msghdr mh = { .msg_name = &sa, .msg_namelen = sl, .msg_iov = &iov, .msg_iovlen = 1 };
    if (nfds > 0) {
        memset(cbuf, 0, sizeof cbuf);
        mh.msg_control = cbuf;
        mh.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET; c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
    }
    ssize_t r = sendmsg(s, &mh, MSG_NOSIGNAL);
    int e = errno;
    close(s);
    char shown[256]; size_t j = 0;
    for (const char *q = msg; *q && j < sizeof shown - 3; q++) { if (*q == '\n') { shown[j++] = '\\'; shown[j++] = 'n'; } else shown[j++] = *q; }
    shown[j] = 0;
    LOG("notify \"%s\" with %d fd(s)%s%d ino=%lu: sendmsg=%zd%s%s", shown, nfds, nfds ? " fd=" : " fd=", nfds ? fds[0] : -1,
        nfds ? ino_of(fds[0]) : 0UL, r, r < 0 ? " " : "", r < 0 ? strerror(e) : "");
    return r < 0 ? -1 : 0;
}

static int listen_on(int port) {
    int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0) { LOG("bind 127.0.0.1:%d: %s", port, strerror(errno)); exit(1); }
    if (listen(s, 1024) < 0) { LOG("listen: %s", strerror(errno)); exit(1); }
    LOG("bound fresh listener 127.0.0.1:%d fd=%d ino=%lu", port, s, ino_of(s));
    return s;
}

static void store(int fd, const char *name) {
    char m[128];
    snprintf(m, sizeof m, "FDSTORE=1\nFDNAME=%s", name);
    notify(m, &fd, 1);
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    me = getpid();
    const char *mode = argc > 1 ? argv[1] : getenv("FDTEST_MODE");
    if (!mode || !*mode) mode = "normal";
    int port = getenv("FDTEST_PORT") ? atoi(getenv("FDTEST_PORT")) : 8080;
    int port2 = getenv("FDTEST_PORT2") ? atoi(getenv("FDTEST_PORT2")) : 8081;

    LOG("start mode=%s", mode);
    LOG("env FDSTORE=%s", env("FDSTORE"));
    LOG("env LISTEN_FDS=%s", env("LISTEN_FDS"));
    LOG("env LISTEN_FDNAMES=%s", env("LISTEN_FDNAMES"));
    LOG("env LISTEN_PID=%s", env("LISTEN_PID"));
    LOG("env NOTIFY_SOCKET=%s", env("NOTIFY_SOCKET"));

    int n = getenv("LISTEN_FDS") ? atoi(getenv("LISTEN_FDS")) : 0;
    char names[1024] = "";
    if (getenv("LISTEN_FDNAMES")) snprintf(names, sizeof names, "%s", getenv("LISTEN_FDNAMES"));
    int web = -1;
    char *save = NULL, *tok = strtok_r(names, ":", &save);
    for (int i = 0; i < n; i++) {
        int fd = 3 + i; char a[128];
        addr_of(fd, a, sizeof a);
        LOG("passed fd=%d name=%s addr=%s ino=%lu", fd, tok ? tok : "?", a, ino_of(fd));
        if (tok && strcmp(tok, "web") == 0 && web < 0) web = fd;
        else if (tok && strcmp(tok, "web") == 0) LOG("extra fd named web: fd=%d (keeping fd=%d)", fd, web);
        tok = strtok_r(NULL, ":", &save);
    }

    if (strcmp(mode, "move") == 0) {
        notify("FDSTOREREMOVE=1\nFDNAME=web", NULL, 0);
        if (web >= 0) close(web);
        web = listen_on(port2);
        store(web, "web");
    } else if (strcmp(mode, "addsame") == 0 && web >= 0) {
        int extra = listen_on(port2);
        store(extra, "web");
    } else if (web < 0) {
        web = listen_on(port);
        if (strcmp(mode, "child") == 0) {
            pid_t c = fork();
            if (c == 0) {
                LOG("child of main %d sends FDSTORE", (int)me);
                store(web, "web");
                sleep(2);
                _exit(0);
            }
            int st; waitpid(c, &st, 0);
            LOG("child %d done", (int)c);
        } else {
            store(web, "web");
            if (strcmp(mode, "dup") == 0) {
                store(web, "web");
                int d = dup(web);
                LOG("dup of fd=%d is fd=%d ino=%lu", web, d, ino_of(d));
                store(d, "web");
                close(d);
            }
        }
    } else {
        LOG("reusing passed listener fd=%d ino=%lu", web, ino_of(web));
        if (strcmp(mode, "dup") == 0) store(web, "web");
    }
    if (strcmp(mode, "remove") == 0) notify("FDSTOREREMOVE=1\nFDNAME=web", NULL, 0);

    char st[128];
    snprintf(st, sizeof st, "READY=1\nSTATUS=serving ino %lu", ino_of(web));
    notify(st, NULL, 0);

    unsigned long lino = ino_of(web);
    for (;;) {
        int c = accept4(web, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) { if (errno == EINTR) continue; LOG("accept: %s", strerror(errno)); sleep(1); continue; }
        struct timeval tv = { .tv_sec = 1 };
        setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        char buf[2048]; size_t got = 0;
        while (got < sizeof buf - 1) {
            ssize_t r = read(c, buf + got, sizeof buf - 1 - got);
            if (r <= 0) break;
            got += r; buf[got] = 0;
            if (strstr(buf, "\r\n\r\n") || strstr(buf, "\n\n")) break;
        }
        char body[128], resp[256];
        int bl = snprintf(body, sizeof body, "pid %d ino %lu\n", (int)getpid(), lino);
        int rl = snprintf(resp, sizeof resp, "HTTP/1.0 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", bl, body);
        ssize_t w = write(c, resp, rl); (void)w;
        shutdown(c, SHUT_WR);
        close(c);
    }
}
