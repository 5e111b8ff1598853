/*
 * The per-byte and per-segment work of the data path, in C. Optional: the package falls back to
 * its (mypyc-compiled) Python without it, with the same results; tests compare the two.
 *
 * sum16(data, start=0) -> int
 *     The Internet checksum's 16-bit one's-complement sum (RFC 1071) of data's big-endian words
 *     (an odd last byte padded with zero) plus start, folded to 16 bits: 32-bit loads into a
 *     64-bit accumulator, byte order fixed at the end (RFC 1071 section 2(B)).
 *
 * tcp_segments(frames, header, buf, off, end, psh_end, mss, seq, ack, window, ident,
 *              ip_base, tcp_base) -> int
 *     Appends to the list frames one Ethernet frame per segment of buf[off:end], each at most
 *     mss bytes of payload: a copy of the 54-byte header template (Ethernet, IPv4 and TCP without
 *     options; addresses, ports and constant fields filled in) with total length, IP ident
 *     (ident, ident + 1, ...), sequence number (seq, advancing), ack, flags (ACK, plus PSH on the
 *     segment that ends at psh_end), window and both checksums set. ip_base and tcp_base are the
 *     partial sums of the constant fields (core/tcp_wire.py address_sums). Returns the number of
 *     frames appended. One allocation and one copy of the payload per segment.
 *     A 74-byte template is Ethernet, IPv6 and TCP: then the payload length is set instead of
 *     total length, ident and the IP checksum (IPv6 has none), and tcp_base covers the IPv6
 *     pseudo-header's addresses; ip_base and ident are ignored.
 *     A false 14th argument, checksum, leaves the TCP checksum 0 and the payload unsummed: for a
 *     vhost-user guest that takes partial checksums (core/vhost_net.py writes the pseudo-header
 *     sum into the field as it fills the guest's buffer, and marks the frame NEEDS_CSUM).
 *
 * split_frames(buf, start, end, frames, max_frame) -> int
 *     QEMU's stream framing (io/framing.py): appends to the list frames, as bytes, every whole
 *     frame of buf[start:end] (a 4-byte big-endian length, then that many bytes) and returns where
 *     the remainder starts. A length of 0 or above max_frame stops it: then it returns -1 - pos,
 *     pos where that length prefix starts (the frames before it are appended). One allocation
 *     and one copy per frame; the Python loop copies each twice (a bytearray slice, then bytes).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "_tcp_segment.h"


static uint64_t add_words(const unsigned char *p, Py_ssize_t n)
{
    uint64_t acc = 0;
    while (n >= 32) {
        uint32_t w[8];
        memcpy(w, p, 32);
        acc += (uint64_t)w[0] + w[1] + w[2] + w[3] + w[4] + w[5] + w[6] + w[7];
        p += 32;
        n -= 32;
    }
    while (n >= 4) {
        uint32_t w;
        memcpy(&w, p, 4);
        acc += w;
        p += 4;
        n -= 4;
    }
    while (n >= 2) {
        uint16_t w;
        memcpy(&w, p, 2);
        acc += w;
        p += 2;
        n -= 2;
    }
    if (n) {
        uint16_t w = 0;
        memcpy(&w, p, 1); /* the byte goes first in memory: the high half in network order */
        acc += w;
    }
    return acc;
}

/* The folded sum of the bytes' big-endian 16-bit words. */
static uint64_t sum_be(const unsigned char *p, Py_ssize_t n)
{
    uint16_t folded = (uint16_t)seg_fold(add_words(p, n));
    /* the words were added in host order: bring the folded sum to network order */
    const uint16_t probe = 1;
    if (*(const unsigned char *)&probe == 0)
        return folded; /* big-endian host */
    return (uint16_t)((folded >> 8) | (folded << 8));
}

static PyObject *fp_sum16(PyObject *self, PyObject *args)
{
    Py_buffer view;
    unsigned long long start = 0;
    if (!PyArg_ParseTuple(args, "y*|K", &view, &start))
        return NULL;
    uint64_t total = sum_be((const unsigned char *)view.buf, view.len);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong(seg_fold(total + start));
}

/* A non-negative Python int, or -1 with an exception set. */
static long long arg_int(PyObject *obj, const char *name)
{
    long long v = PyLong_AsLongLong(obj);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < 0) {
        PyErr_Format(PyExc_ValueError, "tcp_segments: %s must not be negative", name);
        return -1;
    }
    return v;
}

static PyObject *fp_tcp_segments(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    static const char *names[] = {"off", "end", "psh_end", "mss", "seq", "ack", "window", "ident", "ip_base", "tcp_base"};
    long long v[10];
    if (nargs != 13 && nargs != 14) {
        PyErr_SetString(PyExc_TypeError, "tcp_segments takes 13 or 14 positional arguments");
        return NULL;
    }
    int checksum = nargs == 14 ? PyObject_IsTrue(args[13]) : 1;
    if (checksum < 0)
        return NULL;
    PyObject *frames = args[0];
    if (!PyList_Check(frames) || !PyBytes_Check(args[1])
        || (PyBytes_GET_SIZE(args[1]) != SEG_HEADER_LEN && PyBytes_GET_SIZE(args[1]) != SEG_HEADER6_LEN)) {
        PyErr_SetString(PyExc_TypeError, "tcp_segments: frames must be a list, header 54 or 74 bytes");
        return NULL;
    }
    const Py_ssize_t hlen = PyBytes_GET_SIZE(args[1]);
    const int v6 = hlen == SEG_HEADER6_LEN;
    const Py_ssize_t t = v6 ? 54 : 34; /* where the TCP header starts */
    for (int i = 0; i < 10; i++) {
        v[i] = arg_int(args[3 + i], names[i]);
        if (v[i] < 0)
            return NULL;
    }
    long long off = v[0], end = v[1], psh_end = v[2], mss = v[3];
    uint64_t seq = (uint64_t)v[4], ack = (uint64_t)v[5] & 0xFFFFFFFF, window = (uint64_t)v[6] & 0xFFFF;
    uint64_t ident = (uint64_t)v[7], ip_base = (uint64_t)v[8], tcp_base = (uint64_t)v[9];
    if (mss <= 0 || mss > 0xFFFF - 40) {
        PyErr_SetString(PyExc_ValueError, "tcp_segments: mss out of range");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[2], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (off > end || end > view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "tcp_segments: off/end outside the buffer");
        return NULL;
    }
    const unsigned char *header = (const unsigned char *)PyBytes_AS_STRING(args[1]);
    const unsigned char *buf = (const unsigned char *)view.buf;
    /* what does not change from one segment to the next */
    const uint64_t ack_sum = (ack >> 16) + (ack & 0xFFFF);
    long count = 0;
    while (off < end) {
        long long n = end - off < mss ? end - off : mss;
        PyObject *frame = PyBytes_FromStringAndSize(NULL, hlen + n);
        if (frame == NULL)
            goto fail;
        unsigned char *p = (unsigned char *)PyBytes_AS_STRING(frame);
        uint64_t tcp_len = 20 + (uint64_t)n;
        uint64_t s = seq & 0xFFFFFFFF;
        uint64_t off_flags = (5u << 12) | SEG_TCP_ACK | (off + n == psh_end ? SEG_TCP_PSH : 0);
        seg_fill_header(p, header, (size_t)hlen, (uint64_t)n, s, ack, off_flags, window, ident, ip_base);
        memcpy(p + hlen, buf + off, (size_t)n);
        if (checksum) {
            uint64_t total = tcp_base + tcp_len + (s >> 16) + (s & 0xFFFF) + ack_sum + off_flags + window
                + sum_be(buf + off, (Py_ssize_t)n);
            seg_put16(p + t + 16, ~seg_fold(total) & 0xFFFF);
        } else {
            seg_put16(p + t + 16, 0); /* the guest's NIC takes a partial checksum: vhost_net fills it in */
        }
        int rc = PyList_Append(frames, frame);
        Py_DECREF(frame);
        if (rc < 0)
            goto fail;
        off += n;
        seq += (uint64_t)n;
        ident++;
        count++;
    }
    PyBuffer_Release(&view);
    return PyLong_FromLong(count);
fail:
    PyBuffer_Release(&view);
    return NULL;
}

static PyObject *fp_split_frames(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t start, end, max_frame;
    PyObject *frames;
    if (!PyArg_ParseTuple(args, "y*nnO!n", &view, &start, &end, &PyList_Type, &frames, &max_frame))
        return NULL;
    if (start < 0 || end > view.len || start > end) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "split_frames: start and end outside the buffer");
        return NULL;
    }
    const unsigned char *buf = (const unsigned char *)view.buf;
    Py_ssize_t pos = start;
    while (end - pos >= 4) {
        const unsigned char *p = buf + pos;
        Py_ssize_t length = ((Py_ssize_t)p[0] << 24) | ((Py_ssize_t)p[1] << 16) | ((Py_ssize_t)p[2] << 8) | p[3];
        if (length == 0 || length > max_frame) {
            pos = -1 - pos;
            break;
        }
        if (end - pos - 4 < length)
            break;
        PyObject *frame = PyBytes_FromStringAndSize((const char *)p + 4, length);
        if (frame == NULL || PyList_Append(frames, frame) < 0) {
            Py_XDECREF(frame);
            PyBuffer_Release(&view);
            return NULL;
        }
        Py_DECREF(frame);
        pos += 4 + length;
    }
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(pos);
}

/* A full memory barrier: a store to the shared rings made visible before a later load of the
   guest's side (x86 may otherwise let the load pass the store). */
static PyObject *fp_fence(PyObject *self, PyObject *unused)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"fence", fp_fence, METH_NOARGS, "A full memory barrier (for rings shared with another process)."},
    {"split_frames", fp_split_frames, METH_VARARGS,
     "Append the whole stream-framed frames of buf[start:end] to a list; return where the rest starts."},
    {"sum16", fp_sum16, METH_VARARGS, "One's-complement 16-bit sum of a bytes-like object, plus start."},
    {"tcp_segments", (PyCFunction)(void (*)(void))fp_tcp_segments, METH_FASTCALL,
     "Append checksummed TCP frames for buf[off:end] to a list; return how many."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastpath", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastpath(void) { return PyModule_Create(&module); }
