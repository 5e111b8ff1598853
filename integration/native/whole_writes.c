/*
 * LD_PRELOAD shim for QEMU on the namespace-guest harness: never let QEMU see a short write on a
 * Unix stream socket.
 *
 * QEMU 7.2's stream netdev, behind a hub, mishandles a short write: the hub flushes other queues
 * and then continues with a different frame, which aborts QEMU or splices two frames (see
 * shared/TESTBED.md). Here a short sendmsg() on an AF_UNIX stream socket is completed before
 * returning: the rest is written with poll() for room, so each frame goes out whole. The backend
 * reads asynchronously and never blocks on QEMU, so the wait is short and cannot deadlock. The
 * first time a socket number is seen, a Unix stream socket's send buffer is raised
 * (SO_SNDBUFFORCE as root) to make such waits rare.
 *
 * Built by the test harness (integration/native/build.py); never committed as a binary.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

static ssize_t (*real_sendmsg)(int, const struct msghdr *, int);
static unsigned char seen[65536];

static int is_unix_stream(int fd)
{
    int type = 0;
    struct sockaddr_storage addr;
    socklen_t len = sizeof(type);
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0 || type != SOCK_STREAM)
        return 0;
    len = sizeof(addr);
    if (getsockname(fd, (struct sockaddr *)&addr, &len) < 0)
        return 0;
    return addr.ss_family == AF_UNIX;
}

ssize_t sendmsg(int fd, const struct msghdr *msg, int flags)
{
    if (!real_sendmsg)
        real_sendmsg = (ssize_t (*)(int, const struct msghdr *, int))dlsym(RTLD_NEXT, "sendmsg");
    /* The socket is classified (two syscalls) only the first time its number is seen, to raise
     * its buffer, and again on a short write: not on every frame, which would double QEMU's
     * syscalls per frame and tax the backend under test. */
    if (fd >= 0 && fd < (int)sizeof(seen) && !seen[fd]) {
        seen[fd] = 1;
        if (is_unix_stream(fd)) {
            int size = 8 << 20;
            if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof(size)) < 0)
                setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
        }
    }
    size_t total = 0;
    for (size_t i = 0; i < msg->msg_iovlen; i++)
        total += msg->msg_iov[i].iov_len;
    ssize_t done = real_sendmsg(fd, msg, flags);
    if (done < 0 || (size_t)done >= total || fd < 0 || !is_unix_stream(fd))
        return done;
    /* A short write: finish this frame before QEMU can notice. */
    size_t sent = (size_t)done;
    while (sent < total) {
        struct iovec rest[64];
        size_t skip = sent, n = 0;
        for (size_t i = 0; i < msg->msg_iovlen && n < 64; i++) {
            size_t len = msg->msg_iov[i].iov_len;
            if (skip >= len) {
                skip -= len;
                continue;
            }
            rest[n].iov_base = (char *)msg->msg_iov[i].iov_base + skip;
            rest[n].iov_len = len - skip;
            skip = 0;
            n++;
        }
        struct msghdr more;
        memset(&more, 0, sizeof(more));
        more.msg_iov = rest;
        more.msg_iovlen = n;
        ssize_t r = real_sendmsg(fd, &more, flags | MSG_NOSIGNAL);
        if (r > 0) {
            sent += (size_t)r;
            continue;
        }
        if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            return (ssize_t)sent; /* the peer is gone: report what went out */
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        poll(&p, 1, 1000);
    }
    return (ssize_t)sent;
}
