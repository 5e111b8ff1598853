/*
 * The Internet checksum's 16-bit one's-complement sum (RFC 1071) over any bytes-like object.
 *
 * sum16(data, start=0) -> int: the sum of data's big-endian 16-bit words (an odd last byte is
 * padded with zero) plus start, folded to 16 bits. The same result as core/checksum.py's loops,
 * about ten times faster: 32-bit loads into a 64-bit accumulator, byte order fixed at the end
 * (RFC 1071 section 2(B)). Optional: the package falls back to the mypyc-compiled loop without it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

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

static PyObject *csum_sum16(PyObject *self, PyObject *args)
{
    Py_buffer view;
    unsigned long long start = 0;
    if (!PyArg_ParseTuple(args, "y*|K", &view, &start))
        return NULL;
    uint64_t acc;
    Py_BEGIN_ALLOW_THREADS
    acc = add_words((const unsigned char *)view.buf, view.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    while (acc >> 16)
        acc = (acc & 0xFFFF) + (acc >> 16);
    uint16_t folded = (uint16_t)acc;
    /* the words were added in host order: bring the folded sum to network order */
    uint16_t be = (uint16_t)((folded >> 8) | (folded << 8));
    const uint16_t probe = 1;
    if (*(const unsigned char *)&probe == 0)
        be = folded; /* big-endian host */
    uint64_t total = (uint64_t)be + start;
    while (total >> 16)
        total = (total & 0xFFFF) + (total >> 16);
    return PyLong_FromUnsignedLong((unsigned long)total);
}

static PyMethodDef methods[] = {
    {"sum16", csum_sum16, METH_VARARGS, "One's-complement 16-bit sum of a bytes-like object, plus start."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_csum", NULL, -1, methods};

PyMODINIT_FUNC PyInit__csum(void) { return PyModule_Create(&module); }
