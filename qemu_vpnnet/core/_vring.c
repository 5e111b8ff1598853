/*
 * One frame into a vhost-user guest's RX ring, in C: the common case of core/virtqueue.py's
 * pop() and write() and core/vhost_net.py's scatter(), without a Python object per descriptor.
 * Optional: without it (or whenever it declines) the mypyc-compiled Python does the same work.
 *
 * rx_fill(views, gpa_table, desc_view, desc_off, avail_view, avail_off, num, last_avail,
 *         in_flight, header, num_buffers_at, frame, patch_at, patch, mrg, limit, used) -> int
 *
 *     Pops the chains the guest made available from ring index last_avail on, as many as the
 *     header plus the frame need (one without mrg, at most limit), writes the header (its u16
 *     at num_buffers_at, when that is not negative, set to the number of chains) and then the
 *     frame (its big-endian u16 at patch_at replaced by patch, when patch_at is not negative: a
 *     NEEDS_CSUM frame's checksum field) across their writable buffers, marks their heads in in_flight and appends
 *     (head, bytes written) of each to the list used. Returns the number of chains taken; the
 *     caller advances last_avail by it and pushes the used elements.
 *
 *     Returns 0, having changed nothing (neither guest memory nor in_flight nor used), for
 *     anything but that common case: too few chains available, a chain too small, a head or
 *     next index out of range or already held, a loop, an INDIRECT or device-readable
 *     descriptor, a buffer outside one memory region, avail.idx too far ahead, more than
 *     MAX_CHAINS chains or MAX_PIECES buffers for one frame, more than MAX_REGIONS regions. The
 *     caller's Python then handles that frame, and raises RingError with the reason where the
 *     ring is bad. Everything this code accepts the Python accepts with the same result, so the
 *     fast path decides nothing on its own; tests compare the two on hostile rings.
 *
 *     Guest memory is the guest's to change at any time: each descriptor and ring entry is
 *     read once, with single loads the compiler may not repeat, and checked in the local copy.
 *
 *     views: the memory table's regions' writable buffers, by region index. gpa_table: bytes,
 *     native u64 quadruples (guest-physical start, size, offset of the region's first byte in
 *     its buffer, region index), sorted by start, regions not overlapping.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) && defined(__SSE2__)
#include <emmintrin.h>
#define HAVE_STREAM_STORES 1
#endif

#define MAX_CHAINS 256
#define MAX_PIECES 512
#define MAX_REGIONS 32
#define MAX_HEADER 16
#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define LE16(x) __builtin_bswap16(x)
#define LE32(x) __builtin_bswap32(x)
#define LE64(x) __builtin_bswap64(x)
#else
#define LE16(x) (x)
#define LE32(x) (x)
#define LE64(x) (x)
#endif

/* Into guest memory: the RX buffers are cold (scattered pages the guest handed over some time
   ago), so a plain memcpy first reads each line in to own it. Non-temporal stores skip that read
   (measured here: 8 against 4-5 GB/s into random pages of a 2 GiB memfd). They are weakly
   ordered: rx_fill ends with an sfence, before the caller publishes the used elements. */
#define STREAM_MIN 1024
static void guest_copy(unsigned char *dst, const unsigned char *src, size_t n)
{
#ifdef HAVE_STREAM_STORES
    if (n >= STREAM_MIN) {
        size_t lead = (16 - ((uintptr_t)dst & 15)) & 15;
        memcpy(dst, src, lead);
        dst += lead;
        src += lead;
        n -= lead;
        for (; n >= 64; dst += 64, src += 64, n -= 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)src), b = _mm_loadu_si128((const __m128i *)(src + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(src + 32)), d = _mm_loadu_si128((const __m128i *)(src + 48));
            _mm_stream_si128((__m128i *)dst, a);
            _mm_stream_si128((__m128i *)(dst + 16), b);
            _mm_stream_si128((__m128i *)(dst + 32), c);
            _mm_stream_si128((__m128i *)(dst + 48), d);
        }
        memcpy(dst, src, n);
        return;
    }
#endif
    memcpy(dst, src, n);
}

/* Single loads of the guest's words (relaxed atomics: never torn, never re-read). Every address
   is aligned: the rings by their checks in virtqueue.py, a descriptor by the 16-aligned table. */
static uint16_t load16(const unsigned char *p) { return LE16(__atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED)); }
static uint32_t load32(const unsigned char *p) { return LE32(__atomic_load_n((const uint32_t *)p, __ATOMIC_RELAXED)); }
static uint64_t load64(const unsigned char *p) { return LE64(__atomic_load_n((const uint64_t *)p, __ATOMIC_RELAXED)); }

typedef struct {
    unsigned char *ptr;
    size_t len;
} piece_t;

typedef struct {
    PyObject *views;
    Py_ssize_t count;        /* regions in the table */
    const uint64_t *table;   /* count quadruples */
    Py_buffer bufs[MAX_REGIONS];
    char held[MAX_REGIONS];
} memory_t;

static void memory_release(memory_t *m)
{
    for (Py_ssize_t i = 0; i < m->count; i++)
        if (m->held[i])
            PyBuffer_Release(&m->bufs[i]);
}

/* The bytes of guest-physical [addr, addr+len) (len > 0) inside one region, or NULL (then *err
   is set if a Python exception was raised). */
static unsigned char *translate(memory_t *m, uint64_t addr, uint64_t len, int *err)
{
    if (len > UINT64_MAX - addr)
        return NULL;
    Py_ssize_t lo = 0, hi = m->count;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (m->table[4 * mid] <= addr)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return NULL;
    const uint64_t *r = m->table + 4 * (lo - 1);
    uint64_t gpa = r[0], size = r[1], offset = r[2], index = r[3];
    if (addr - gpa >= size || len > size - (addr - gpa) || index >= (uint64_t)m->count)
        return NULL;
    if (!m->held[index]) {
        PyObject *view = PyList_GET_ITEM(m->views, (Py_ssize_t)index);
        if (PyObject_GetBuffer(view, &m->bufs[index], PyBUF_WRITABLE) < 0) {
            *err = 1;
            return NULL;
        }
        m->held[index] = 1;
    }
    const Py_buffer *b = &m->bufs[index];
    uint64_t start = offset + (addr - gpa);
    if (start < offset || start > (uint64_t)b->len || len > (uint64_t)b->len - start)
        return NULL;
    return (unsigned char *)b->buf + start;
}

static long long arg_ll(PyObject *obj, int *err)
{
    long long v = PyLong_AsLongLong(obj);
    if (v == -1 && PyErr_Occurred())
        *err = 1;
    return v;
}

static PyObject *vr_rx_fill(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 17) {
        PyErr_SetString(PyExc_TypeError, "rx_fill takes 17 positional arguments");
        return NULL;
    }
    PyObject *views = args[0], *used = args[16];
    if (!PyList_Check(views) || !PyBytes_Check(args[1]) || !PyBytes_Check(args[9]) || !PyList_Check(used)) {
        PyErr_SetString(PyExc_TypeError, "rx_fill: views and used must be lists, gpa_table and header bytes");
        return NULL;
    }
    int err = 0;
    long long desc_off = arg_ll(args[3], &err), avail_off = arg_ll(args[5], &err), num = arg_ll(args[6], &err);
    long long last_avail = arg_ll(args[7], &err), nb_at = arg_ll(args[10], &err), limit = arg_ll(args[15], &err);
    long long patch_at = arg_ll(args[12], &err), patch = arg_ll(args[13], &err);
    int mrg = PyObject_IsTrue(args[14]);
    if (err || mrg < 0)
        return NULL;
    Py_ssize_t table_len = PyBytes_GET_SIZE(args[1]);
    Py_ssize_t hdr_len = PyBytes_GET_SIZE(args[9]);
    if (num < 1 || num > 32768 || (num & (num - 1)) || last_avail < 0 || last_avail > 0xFFFF || desc_off < 0
        || avail_off < 0 || hdr_len > MAX_HEADER || nb_at > hdr_len - 2 || table_len % 32
        || table_len / 32 != PyList_GET_SIZE(views)) {
        PyErr_SetString(PyExc_ValueError, "rx_fill: arguments out of range");
        return NULL;
    }
    if (table_len / 32 > MAX_REGIONS || limit < 1)
        return PyLong_FromLong(0);
    if (limit > MAX_CHAINS)
        limit = MAX_CHAINS;
    if (!mrg)
        limit = 1;

    memory_t m;
    m.views = views;
    m.count = table_len / 32;
    m.table = (const uint64_t *)PyBytes_AS_STRING(args[1]);
    memset(m.held, 0, sizeof m.held);
    Py_buffer desc = {0}, avail = {0}, frame = {0}, flight = {0};
    int have_desc = 0, have_avail = 0, have_frame = 0, have_flight = 0;
    long taken = 0;
    PyObject *result = NULL;
    if (PyObject_GetBuffer(args[2], &desc, PyBUF_SIMPLE) < 0)
        goto out;
    have_desc = 1;
    if (PyObject_GetBuffer(args[4], &avail, PyBUF_SIMPLE) < 0)
        goto out;
    have_avail = 1;
    if (PyObject_GetBuffer(args[8], &flight, PyBUF_WRITABLE) < 0)
        goto out;
    have_flight = 1;
    if (PyObject_GetBuffer(args[11], &frame, PyBUF_SIMPLE) < 0)
        goto out;
    have_frame = 1;
    if (desc_off > desc.len || desc.len - desc_off < 16 * num || avail_off > avail.len
        || avail.len - avail_off < 4 + 2 * num || flight.len != num || patch_at > frame.len - 2 || patch < 0
        || patch > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "rx_fill: the rings lie outside their buffers");
        goto out;
    }
    const unsigned char *table = (const unsigned char *)desc.buf + desc_off;
    const unsigned char *ring = (const unsigned char *)avail.buf + avail_off;
    unsigned char *held = (unsigned char *)flight.buf;
    const uint16_t mask = (uint16_t)(num - 1);
    const Py_ssize_t used_before = PyList_GET_SIZE(used);
    if (((uintptr_t)table & 7) || ((uintptr_t)ring & 1))
        goto decline; /* (the loads below want alignment; the Python has none of these) */

    uint16_t pending = (uint16_t)(load16(ring + 2) - (uint16_t)last_avail);
    __atomic_thread_fence(__ATOMIC_ACQUIRE); /* ring entries after avail.idx (smp_rmb) */
    if (pending == 0 || pending > num)
        goto decline;

    unsigned char header[MAX_HEADER];
    memcpy(header, PyBytes_AS_STRING(args[9]), (size_t)hdr_len);
    const uint64_t need = (uint64_t)hdr_len + (uint64_t)frame.len;
    uint16_t heads[MAX_CHAINS];
    int ends[MAX_CHAINS]; /* each chain's pieces end here in pieces[] */
    piece_t pieces[MAX_PIECES];
    int npieces = 0;
    uint64_t room = 0;
    long chains = 0;
    while (room < need) {
        if (chains >= limit || chains >= pending)
            goto decline_unmark;
        uint16_t head = load16(ring + 4 + 2 * (((uint16_t)last_avail + chains) & mask));
        if (head >= num || held[head])
            goto decline_unmark;
        held[head] = 1; /* (a head twice for one frame is refused the second time) */
        heads[chains++] = head;
        uint64_t chain_bytes = 0;
        uint16_t index = head;
        for (long count = 1;; count++) {
            if (count > num)
                goto decline_unmark;
            const unsigned char *d = table + 16 * (size_t)index;
            uint64_t addr = load64(d);
            uint32_t len = load32(d + 8);
            uint16_t flags = load16(d + 12), next = load16(d + 14);
            if ((flags & (DESC_F_INDIRECT | DESC_F_WRITE)) != DESC_F_WRITE)
                goto decline_unmark;
            if (len) {
                chain_bytes += len;
                if (chain_bytes > 0xFFFFFFFFu || npieces >= MAX_PIECES)
                    goto decline_unmark;
                unsigned char *p = translate(&m, addr, len, &err);
                if (p == NULL)
                    goto decline_unmark;
                pieces[npieces].ptr = p;
                pieces[npieces].len = len;
                npieces++;
            }
            if (!(flags & DESC_F_NEXT))
                break;
            if (next >= num)
                goto decline_unmark;
            index = next;
        }
        ends[chains - 1] = npieces;
        room += chain_bytes;
    }
    /* the frame fits: write it, then report the chains */
    if (nb_at >= 0) {
        header[nb_at] = (unsigned char)(chains & 0xFF);
        header[nb_at + 1] = (unsigned char)(chains >> 8);
    }
    /* the sources in order: header, the frame up to the patch, the patch, the rest of the frame */
    const unsigned char *fbytes = (const unsigned char *)frame.buf;
    unsigned char patched[2] = {(unsigned char)(patch >> 8), (unsigned char)patch};
    size_t cut = patch_at >= 0 ? (size_t)patch_at : (size_t)frame.len;
    size_t rest = patch_at >= 0 ? (size_t)patch_at + 2 : (size_t)frame.len;
    const unsigned char *src[4] = {header, fbytes, patched, fbytes + rest};
    size_t src_len[4] = {(size_t)hdr_len, cut, patch_at >= 0 ? 2 : 0, (size_t)frame.len - rest};
    int s = 0;
    size_t s_off = 0;
    int piece = 0;
    for (long c = 0; c < chains; c++) {
        size_t written = 0;
        for (; piece < ends[c]; piece++) {
            size_t done = 0;
            while (done < pieces[piece].len && s < 4) {
                size_t n = src_len[s] - s_off;
                if (n > pieces[piece].len - done)
                    n = pieces[piece].len - done;
                guest_copy(pieces[piece].ptr + done, src[s] + s_off, n);
                done += n;
                s_off += n;
                if (s_off == src_len[s]) {
                    s++;
                    s_off = 0;
                }
            }
            written += done;
        }
        PyObject *h = PyLong_FromLong(heads[c]), *w = PyLong_FromSize_t(written);
        int rc = (h && w) ? PyList_Append(used, h) : -1;
        if (rc == 0)
            rc = PyList_Append(used, w);
        Py_XDECREF(h);
        Py_XDECREF(w);
        if (rc < 0) { /* out of memory: nothing reported, no head held (the bytes written are
                          in the guest's own free buffers) */
            PyList_SetSlice(used, used_before, PY_SSIZE_T_MAX, NULL);
            for (long k = 0; k < chains; k++)
                held[heads[k]] = 0;
            goto out;
        }
    }
#ifdef HAVE_STREAM_STORES
    _mm_sfence(); /* the frame is in guest memory before the caller reports it as used */
#endif
    taken = chains;
    result = PyLong_FromLong(taken);
    goto out;

decline_unmark:
    for (long k = 0; k < chains; k++)
        held[heads[k]] = 0;
    if (err)
        goto out;
decline:
    result = PyLong_FromLong(0);
out:
    memory_release(&m);
    if (have_frame)
        PyBuffer_Release(&frame);
    if (have_flight)
        PyBuffer_Release(&flight);
    if (have_avail)
        PyBuffer_Release(&avail);
    if (have_desc)
        PyBuffer_Release(&desc);
    return result;
}

static PyMethodDef methods[] = {
    {"rx_fill", (PyCFunction)(void (*)(void))vr_rx_fill, METH_FASTCALL,
     "Write one frame into the chains of a guest's RX ring; the number of chains taken, 0 to decline."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_vring", NULL, -1, methods};

PyMODINIT_FUNC PyInit__vring(void) { return PyModule_Create(&module); }
