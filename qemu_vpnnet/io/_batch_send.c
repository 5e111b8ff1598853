/*
 * Many datagrams of one host UDP socket in one system call (sendmmsg), for io/host_udp.py.
 * Optional: without it the shell sends them one sendto() at a time, with the same result.
 *
 * send_datagrams(fd, family, ops, start, gso_max=0) -> (sent, error, gso_refused)
 *     Sends ops[start:], each an object with .data (a bytes-like payload), .addr (a numeric
 *     IPv4 address for family AF_INET, IPv6 for AF_INET6) and .port, to fd without blocking,
 *     BATCH datagrams per sendmmsg. Stops at the first one the kernel does not take. Returns
 *     how many were sent from start, and 0 if that is all of them, else the errno of the first
 *     one not sent (EINVAL for an address that is not numeric: the caller's sendto() tells).
 *     Python exceptions only for objects of the wrong shape.
 *
 *     With gso_max > 0, a run of datagrams to one address, all of one size up to gso_max (the
 *     last may be shorter), goes out as one message with UDP_SEGMENT (UDP GSO, Linux 4.18): the
 *     kernel walks its send path once for the run and cuts it into the same datagrams at the
 *     device -- a third of the CPU per datagram of one sendto() each, measured on loopback. A
 *     path that refuses segmented sends (an MTU below the segment, IPsec, a device without it)
 *     fails such a message with EINVAL, EMSGSIZE, EIO or EOPNOTSUPP: then gso_refused is 1 and
 *     the caller sends again without gso_max.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <stdint.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

#define BATCH 64 /* datagrams per sendmmsg */

static PyObject *name_data, *name_addr, *name_port;

/* The last address parsed, by the identity of its text and the port's value: the datagrams of a
   flow's batch share one destination's addr object, so most need no inet_pton (it was 3 % of
   the backend's CPU on a UDP stream). Holds a reference while a call runs. */
struct last_address {
    PyObject *text; /* a reference, so that its identity stays its own */
    long port;
    struct sockaddr_storage addr;
    socklen_t len;
};

static void forget_address(struct last_address *last) { Py_CLEAR(last->text); }

/* Fills addr from op.addr and op.port; 0, or -1 with a Python exception, or 1 if not numeric. */
static int op_address(PyObject *op, int family, struct sockaddr_storage *addr, socklen_t *len,
                      struct last_address *last)
{
    PyObject *text = PyObject_GetAttr(op, name_addr);
    if (text == NULL)
        return -1;
    PyObject *port_obj = PyObject_GetAttr(op, name_port);
    if (port_obj == NULL) {
        Py_DECREF(text);
        return -1;
    }
    long port = PyLong_AsLong(port_obj);
    Py_DECREF(port_obj);
    if (text == last->text && port == last->port) {
        Py_DECREF(text);
        memcpy(addr, &last->addr, sizeof(*addr));
        *len = last->len;
        return 0;
    }
    const char *host = PyUnicode_Check(text) ? PyUnicode_AsUTF8(text) : NULL;
    if (host == NULL || (port == -1 && PyErr_Occurred())) {
        Py_DECREF(text);
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "op.addr must be a str");
        return -1;
    }
    int bad = port < 0 || port > 65535;
    memset(addr, 0, sizeof(*addr));
    if (family == AF_INET) {
        struct sockaddr_in *sin = (struct sockaddr_in *)addr;
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)port);
        bad = bad || inet_pton(AF_INET, host, &sin->sin_addr) != 1;
        *len = sizeof(*sin);
    } else {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)addr;
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((uint16_t)port);
        bad = bad || inet_pton(AF_INET6, host, &sin6->sin6_addr) != 1;
        *len = sizeof(*sin6);
    }
    if (!bad) { /* keep it, and the text: while we hold it, no other object can take its address */
        forget_address(last);
        last->text = text;
        last->port = port;
        memcpy(&last->addr, addr, sizeof(*addr));
        last->len = *len;
        return 0;
    }
    Py_DECREF(text);
    return 1;
}

/* The segment size a run of datagrams to one address goes out with (UDP_SEGMENT, linux/udp.h). */
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#define MAX_SEGMENTS 64     /* the kernel takes up to 64 (128 since Linux 5.x) */
#define MAX_GSO_BYTES 64512 /* the payloads of one segmented send: well inside IP's 64 KiB */

static PyObject *bs_send_datagrams(PyObject *self, PyObject *args)
{
    (void)self;
    int fd, family;
    PyObject *ops;
    Py_ssize_t start, gso_max = 0;
    if (!PyArg_ParseTuple(args, "iiO!n|n", &fd, &family, &PyList_Type, &ops, &start, &gso_max))
        return NULL;
    if (family != AF_INET && family != AF_INET6) {
        PyErr_SetString(PyExc_ValueError, "family must be AF_INET or AF_INET6");
        return NULL;
    }
    Py_ssize_t total = PyList_GET_SIZE(ops);
    if (start < 0 || start > total) {
        PyErr_SetString(PyExc_IndexError, "start out of range");
        return NULL;
    }
    struct mmsghdr msgs[BATCH];
    int segments[BATCH];                 /* datagrams (ops) in each message */
    size_t seg_size[BATCH];              /* the first one's size: the UDP_SEGMENT of a message of 2+ */
    size_t msg_bytes[BATCH];
    int msg_open[BATCH];                 /* a shorter datagram closes a segmented run */
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(uint16_t))];
    } controls[BATCH];
    struct iovec iov[BATCH];
    struct sockaddr_storage addrs[BATCH]; /* per message */
    Py_buffer views[BATCH];               /* per datagram */
    Py_ssize_t sent = 0;
    struct last_address last = {NULL, -1, {0}, 0};
    int error = 0, gso_refused = 0;
    while (start + sent < total && error == 0) {
        int n = 0, m = 0; /* datagrams and messages filled */
        int stop = 0;     /* the datagram after the n filled ones has an address that is not numeric */
        int failed = 0;
        while (n < BATCH && start + sent + n < total) {
            PyObject *op = PyList_GET_ITEM(ops, start + sent + n);
            struct sockaddr_storage addr;
            socklen_t len = 0;
            int rc = op_address(op, family, &addr, &len, &last);
            if (rc < 0) {
                failed = 1;
                break;
            }
            if (rc > 0) {
                stop = 1;
                break;
            }
            PyObject *data = PyObject_GetAttr(op, name_data);
            if (data == NULL) {
                failed = 1;
                break;
            }
            rc = PyObject_GetBuffer(data, &views[n], PyBUF_SIMPLE);
            Py_DECREF(data); /* the view holds its own reference */
            if (rc < 0) {
                failed = 1;
                break;
            }
            size_t size = (size_t)views[n].len;
            iov[n].iov_base = views[n].buf;
            iov[n].iov_len = size;
            struct msghdr *last = m > 0 ? &msgs[m - 1].msg_hdr : NULL;
            if (last != NULL && msg_open[m - 1] && size <= seg_size[m - 1] && segments[m - 1] < MAX_SEGMENTS &&
                msg_bytes[m - 1] + size <= MAX_GSO_BYTES && last->msg_namelen == len &&
                memcmp(&addrs[m - 1], &addr, len) == 0) {
                /* one more segment of the run (iov[] is contiguous across a message) */
                last->msg_iovlen++;
                segments[m - 1]++;
                msg_bytes[m - 1] += size;
                msg_open[m - 1] = size == seg_size[m - 1];
            } else {
                memset(&msgs[m], 0, sizeof(msgs[m]));
                addrs[m] = addr;
                msgs[m].msg_hdr.msg_name = &addrs[m];
                msgs[m].msg_hdr.msg_namelen = len;
                msgs[m].msg_hdr.msg_iov = &iov[n];
                msgs[m].msg_hdr.msg_iovlen = 1;
                segments[m] = 1;
                seg_size[m] = size;
                msg_bytes[m] = size;
                msg_open[m] = size > 0 && (Py_ssize_t)size <= gso_max;
                m++;
            }
            n++;
        }
        for (int i = 0; i < m; i++) {
            if (segments[i] < 2)
                continue;
            struct msghdr *h = &msgs[i].msg_hdr;
            h->msg_control = controls[i].buf;
            h->msg_controllen = sizeof(controls[i].buf);
            struct cmsghdr *c = CMSG_FIRSTHDR(h);
            c->cmsg_level = SOL_UDP;
            c->cmsg_type = UDP_SEGMENT;
            c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            uint16_t segment = (uint16_t)seg_size[i];
            memcpy(CMSG_DATA(c), &segment, sizeof(segment));
        }
        int done = 0; /* messages sent */
        if (!failed && m > 0) {
            int rc;
            Py_BEGIN_ALLOW_THREADS
            do {
                rc = sendmmsg(fd, msgs + done, (unsigned int)(m - done), MSG_DONTWAIT);
                if (rc > 0)
                    done += rc;
            } while ((rc > 0 && done < m) || (rc < 0 && errno == EINTR));
            if (rc < 0)
                error = errno;
            Py_END_ALLOW_THREADS
        }
        for (int i = 0; i < n; i++)
            PyBuffer_Release(&views[i]);
        for (int i = 0; i < done; i++)
            sent += segments[i];
        if (failed) {
            forget_address(&last);
            return NULL;
        }
        if (error != 0 && segments[done] > 1 && (error == EINVAL || error == EMSGSIZE || error == EIO || error == EOPNOTSUPP))
            gso_refused = 1; /* the path cannot take segmented sends (MTU, IPsec, no GSO): not this datagram's fault */
        if (error == 0 && stop)
            error = EINVAL;
    }
    forget_address(&last);
    return Py_BuildValue("nii", sent, error, gso_refused);
}

static PyMethodDef methods[] = {
    {"send_datagrams", bs_send_datagrams, METH_VARARGS,
     "Send ops[start:] (.data, .addr, .port) on a UDP socket with sendmmsg; return (sent, errno, gso_refused)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_batch_send", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__batch_send(void)
{
    name_data = PyUnicode_InternFromString("data");
    name_addr = PyUnicode_InternFromString("addr");
    name_port = PyUnicode_InternFromString("port");
    if (name_data == NULL || name_addr == NULL || name_port == NULL)
        return NULL;
    return PyModule_Create(&module);
}
