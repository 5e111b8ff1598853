/*
 * Whether a host stream socket's peer (TCP or Unix) has closed its sending side and nothing it sent is left to
 * read, for io/host_tcp.py. Optional: without it the shell asks the same through Python's poll
 * and ioctl.
 *
 * peer_closed(fd) -> bool
 *     True when poll() says the peer shut its side (POLLRDHUP) with no error pending, and the
 *     receive queue holds nothing before that FIN (SIOCINQ does not count the FIN). False
 *     otherwise, and on any error. Neither question takes anything from the socket, nor clears
 *     a pending error: a peek (recv with MSG_PEEK) would return a reset's ECONNRESET once and
 *     leave the event loop's own read a plain EOF. poll() takes no socket lock: the common
 *     answer, no FIN, costs one light system call.
 *
 * Why: libuv returns from a read that did not fill its buffer, and reports the FIN behind it
 * only on the next turn of the loop. A server that answers and closes (HTTP's Connection:
 * close) has its FIN in the socket by then nearly always; seen at once it leaves in the same
 * segment as the answer, the guest acknowledges both together, and the guest's side closes
 * second (no TIME_WAIT of the guest's ephemeral port).
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE /* POLLRDHUP */
#include <Python.h>
#include <limits.h>
#include <linux/sockios.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

static PyObject *sp_peer_closed(PyObject *self, PyObject *arg)
{
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd < 0 || fd > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "not a file descriptor");
        return NULL;
    }
    struct pollfd pfd = {.fd = (int)fd, .events = POLLIN | POLLRDHUP, .revents = 0};
    if (poll(&pfd, 1, 0) != 1 || !(pfd.revents & POLLRDHUP) || (pfd.revents & (POLLERR | POLLNVAL)))
        Py_RETURN_FALSE;
    int unread = 0;
    if (ioctl((int)fd, SIOCINQ, &unread) != 0)
        Py_RETURN_FALSE;
    return PyBool_FromLong(unread == 0);
}

static PyMethodDef methods[] = {
    {"peer_closed", sp_peer_closed, METH_O, "Whether stream socket fd has only its peer's FIN left to read."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_tcp_state", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__tcp_state(void) { return PyModule_Create(&module); }
