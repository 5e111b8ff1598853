/*
 * connloop: the test guest's connection-rate client (the real-VM "connections/s" row of
 * scripts/bench). Opens a new TCP connection per HTTP request, keeps CONCURRENCY of them in
 * flight for SECONDS, and prints
 *
 *     BENCH-CONN <completed> <failed> <elapsed seconds>
 *
 * A request is completed when its connection delivered at least one byte of reply and then the
 * server's close. Busybox's wget forks per request, which under TCG costs more than the network
 * does, hence this small static program (built by vm-images/build.sh when gcc is there).
 *
 *     connloop ADDRESS PORT SECONDS CONCURRENCY
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONCURRENCY 256

static const char REQUEST[] = "GET / HTTP/1.0\r\nHost: gateway\r\n\r\n";

struct slot {
    int fd;
    int sent;      /* the request is written */
    size_t got;    /* reply bytes read */
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int open_one(int ep, struct slot *s, const struct sockaddr_in *to)
{
    s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    s->sent = 0;
    s->got = 0;
    if (s->fd < 0)
        return -1;
    if (connect(s->fd, (const struct sockaddr *)to, sizeof *to) < 0 && errno != EINPROGRESS) {
        close(s->fd);
        s->fd = -1;
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = s};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev) < 0) {
        close(s->fd);
        s->fd = -1;
        return -1;
    }
    return 0;
}

static void close_one(struct slot *s)
{
    close(s->fd); /* (also takes it out of the epoll set) */
    s->fd = -1;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: connloop ADDRESS PORT SECONDS CONCURRENCY\n");
        return 2;
    }
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[2]))};
    double seconds = atof(argv[3]);
    int concurrency = atoi(argv[4]);
    if (inet_pton(AF_INET, argv[1], &to.sin_addr) != 1 || seconds <= 0 || concurrency < 1
        || concurrency > MAX_CONCURRENCY) {
        fprintf(stderr, "connloop: bad arguments\n");
        return 2;
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) {
        perror("connloop: epoll_create1");
        return 1;
    }
    static struct slot slots[MAX_CONCURRENCY];
    long completed = 0, failed = 0;
    double start = now(), end = start + seconds;
    int open = 0;
    for (int i = 0; i < concurrency; i++) {
        if (open_one(ep, &slots[i], &to) == 0)
            open++;
        else
            failed++;
    }
    char buf[4096];
    struct epoll_event events[MAX_CONCURRENCY];
    while (open > 0) {
        int stopping = now() >= end;
        int n = epoll_wait(ep, events, MAX_CONCURRENCY, 100);
        if (n < 0 && errno != EINTR) {
            perror("connloop: epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            struct slot *s = events[i].data.ptr;
            int done = 0, ok = 0;
            if (!s->sent) {
                int err = 0;
                socklen_t len = sizeof err;
                if (getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err != 0
                    || write(s->fd, REQUEST, sizeof REQUEST - 1) != (ssize_t)(sizeof REQUEST - 1)) {
                    done = 1;
                } else {
                    s->sent = 1;
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = s};
                    if (epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev) < 0)
                        done = 1;
                }
            } else {
                for (;;) {
                    ssize_t got = read(s->fd, buf, sizeof buf);
                    if (got > 0) {
                        s->got += (size_t)got;
                        continue;
                    }
                    if (got == 0) {
                        done = 1;
                        ok = s->got > 0;
                    } else if (errno != EAGAIN && errno != EINTR) {
                        done = 1;
                    }
                    break;
                }
            }
            if (!done)
                continue;
            if (ok)
                completed++;
            else
                failed++;
            close_one(s);
            open--;
            if (!stopping) {
                if (open_one(ep, s, &to) == 0)
                    open++;
                else
                    failed++;
            }
        }
        if (stopping && now() > end + 10) /* connections that never finish: give up on them */
            break;
    }
    printf("BENCH-CONN %ld %ld %.3f\n", completed, failed, now() - start);
    return 0;
}
