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
 * rx_segments(views, gpa_table, desc_view, desc_off, avail_view, avail_off, num, last_avail,
 *             in_flight, hdr_len, mrg, used, header, buf, off, end, psh_end, segment, mss, seq,
 *             ack, window, ident, ip_base, mtu) -> int
 *
 *     The TCP segments of buf[off:end] (segment bytes of payload each, the last one shorter),
 *     written straight into the guest's RX chains without a frame in between: for each, an
 *     hdr_len-byte virtio-net header (NEEDS_CSUM at the TCP header; gso_type and gso_size = mss
 *     when the frame exceeds mtu), the headers _tcp_segment.h makes from the 54- or 74-byte
 *     template header (as _fastpath.c's tcp_segments with checksum false, the TCP checksum field
 *     holding the pseudo-header's sum), then its payload. The same bytes as tcp_segments'
 *     frames through rx_fill with core/vhost_net.py's headers. Chains are taken as rx_fill takes
 *     them, segment after segment, and (head, length) of each appended to used. Returns the
 *     number of segments written: it stops at the first that rx_fill would decline, and the
 *     caller sends the rest as frames.
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

#include "_tcp_segment.h"
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
#define VNET_F_NEEDS_CSUM 1
#define VNET_GSO_TCPV4 1
#define VNET_GSO_TCPV6 4
#define VNET_TCP_CSUM_OFFSET 16

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

/* One ring as rx_fill and rx_segments see it. */
typedef struct {
    const unsigned char *table; /* the descriptor table */
    const unsigned char *ring;  /* the avail ring */
    unsigned char *held;        /* in_flight, by head */
    uint16_t num, mask;
    memory_t *m;
} ring_t;

/* The chains of one frame: their heads, and their writable buffers (pieces[ends[c - 1]:ends[c]]
   are chain c's). */
typedef struct {
    long chains;
    int npieces;
    uint16_t heads[MAX_CHAINS];
    int ends[MAX_CHAINS];
    piece_t pieces[MAX_PIECES];
} take_t;

/* Take chains from avail position first on (at most limit, and at most pending are there) until
   their writable buffers hold need bytes, marking their heads held. Returns 1, or 0 having
   unmarked every head it marked (declined: see rx_fill), with *err set when a Python exception
   was raised. */
static int take_chains(const ring_t *r, uint16_t first, long pending, long limit, uint64_t need, take_t *t, int *err)
{
    uint64_t room = 0;
    t->chains = 0;
    t->npieces = 0;
    while (room < need) {
        if (t->chains >= limit || t->chains >= pending)
            goto decline;
        uint16_t head = load16(r->ring + 4 + 2 * ((uint16_t)(first + t->chains) & r->mask));
        if (head >= r->num || r->held[head])
            goto decline;
        r->held[head] = 1; /* (a head twice for one frame is refused the second time) */
        t->heads[t->chains++] = head;
        uint64_t chain_bytes = 0;
        uint16_t index = head;
        for (long count = 1;; count++) {
            if (count > r->num)
                goto decline;
            const unsigned char *d = r->table + 16 * (size_t)index;
            uint64_t addr = load64(d);
            uint32_t len = load32(d + 8);
            uint16_t flags = load16(d + 12), next = load16(d + 14);
            if ((flags & (DESC_F_INDIRECT | DESC_F_WRITE)) != DESC_F_WRITE)
                goto decline;
            if (len) {
                chain_bytes += len;
                if (chain_bytes > 0xFFFFFFFFu || t->npieces >= MAX_PIECES)
                    goto decline;
                unsigned char *p = translate(r->m, addr, len, err);
                if (p == NULL)
                    goto decline;
                t->pieces[t->npieces].ptr = p;
                t->pieces[t->npieces].len = len;
                t->npieces++;
            }
            if (!(flags & DESC_F_NEXT))
                break;
            if (next >= r->num)
                goto decline;
            index = next;
        }
        t->ends[t->chains - 1] = t->npieces;
        room += chain_bytes;
    }
    return 1;
decline:
    for (long k = 0; k < t->chains; k++)
        r->held[t->heads[k]] = 0;
    t->chains = 0;
    return 0;
}

/* Write the sources (nsrc of them, in order) across the taken chains' buffers, then append
   (head, bytes written) of each chain to used. Returns 0, or -1 (out of memory) having appended
   nothing and unmarked the chains' heads (the bytes written are in the guest's own free
   buffers). */
static int scatter_report(const ring_t *r, const take_t *t, const unsigned char *const *src, const size_t *src_len,
                          int nsrc, PyObject *used)
{
    const Py_ssize_t used_before = PyList_GET_SIZE(used);
    int s = 0;
    size_t s_off = 0;
    while (s < nsrc && src_len[s] == 0)
        s++;
    int piece = 0;
    for (long c = 0; c < t->chains; c++) {
        size_t written = 0;
        for (; piece < t->ends[c]; piece++) {
            size_t done = 0;
            while (done < t->pieces[piece].len && s < nsrc) {
                size_t n = src_len[s] - s_off;
                if (n > t->pieces[piece].len - done)
                    n = t->pieces[piece].len - done;
                guest_copy(t->pieces[piece].ptr + done, src[s] + s_off, n);
                done += n;
                s_off += n;
                if (s_off == src_len[s]) {
                    s++;
                    s_off = 0;
                    while (s < nsrc && src_len[s] == 0)
                        s++;
                }
            }
            written += done;
        }
        PyObject *h = PyLong_FromLong(t->heads[c]), *w = PyLong_FromSize_t(written);
        int rc = (h && w) ? PyList_Append(used, h) : -1;
        if (rc == 0)
            rc = PyList_Append(used, w);
        Py_XDECREF(h);
        Py_XDECREF(w);
        if (rc < 0) {
            PyList_SetSlice(used, used_before, PY_SSIZE_T_MAX, NULL);
            for (long k = 0; k < t->chains; k++)
                r->held[t->heads[k]] = 0;
            return -1;
        }
    }
    return 0;
}

static long long arg_ll(PyObject *obj, int *err)
{
    long long v = PyLong_AsLongLong(obj);
    if (v == -1 && PyErr_Occurred())
        *err = 1;
    return v;
}

/* The ring arguments both functions start with, checked and held. */
typedef struct {
    memory_t m;
    Py_buffer desc, avail, flight;
    int have_desc, have_avail, have_flight;
    ring_t r;
    long long last_avail;
    uint16_t pending; /* chains the guest made available past last_avail */
    int usable;       /* 0: the Python handles this ring (declined) */
} open_ring_t;

static void close_ring(open_ring_t *o)
{
    memory_release(&o->m);
    if (o->have_flight)
        PyBuffer_Release(&o->flight);
    if (o->have_avail)
        PyBuffer_Release(&o->avail);
    if (o->have_desc)
        PyBuffer_Release(&o->desc);
}

/* args[0:9]: views, gpa_table, desc_view, desc_off, avail_view, avail_off, num, last_avail,
   in_flight. Returns 0 (o->usable says whether this code may go on), or -1 with an exception
   set; close_ring(o) afterwards either way. */
static int open_ring(PyObject *const *args, const char *who, open_ring_t *o)
{
    memset(o, 0, sizeof *o);
    PyObject *views = args[0];
    if (!PyList_Check(views) || !PyBytes_Check(args[1])) {
        PyErr_Format(PyExc_TypeError, "%s: views must be a list, gpa_table bytes", who);
        return -1;
    }
    int err = 0;
    long long desc_off = arg_ll(args[3], &err), avail_off = arg_ll(args[5], &err), num = arg_ll(args[6], &err);
    long long last_avail = arg_ll(args[7], &err);
    if (err)
        return -1;
    Py_ssize_t table_len = PyBytes_GET_SIZE(args[1]);
    if (num < 1 || num > 32768 || (num & (num - 1)) || last_avail < 0 || last_avail > 0xFFFF || desc_off < 0
        || avail_off < 0 || table_len % 32 || table_len / 32 != PyList_GET_SIZE(views)) {
        PyErr_Format(PyExc_ValueError, "%s: arguments out of range", who);
        return -1;
    }
    o->m.views = views;
    o->m.count = table_len / 32;
    o->m.table = (const uint64_t *)PyBytes_AS_STRING(args[1]);
    if (o->m.count > MAX_REGIONS) {
        o->m.count = 0; /* (nothing held to release) */
        return 0;
    }
    if (PyObject_GetBuffer(args[2], &o->desc, PyBUF_SIMPLE) < 0)
        return -1;
    o->have_desc = 1;
    if (PyObject_GetBuffer(args[4], &o->avail, PyBUF_SIMPLE) < 0)
        return -1;
    o->have_avail = 1;
    if (PyObject_GetBuffer(args[8], &o->flight, PyBUF_WRITABLE) < 0)
        return -1;
    o->have_flight = 1;
    if (desc_off > o->desc.len || o->desc.len - desc_off < 16 * num || avail_off > o->avail.len
        || o->avail.len - avail_off < 4 + 2 * num || o->flight.len != num) {
        PyErr_Format(PyExc_ValueError, "%s: the rings lie outside their buffers", who);
        return -1;
    }
    o->r.table = (const unsigned char *)o->desc.buf + desc_off;
    o->r.ring = (const unsigned char *)o->avail.buf + avail_off;
    o->r.held = (unsigned char *)o->flight.buf;
    o->r.num = (uint16_t)num;
    o->r.mask = (uint16_t)(num - 1);
    o->r.m = &o->m;
    o->last_avail = last_avail;
    if (((uintptr_t)o->r.table & 7) || ((uintptr_t)o->r.ring & 1))
        return 0; /* (the loads want alignment; the Python has none of these) */
    o->pending = (uint16_t)(load16(o->r.ring + 2) - (uint16_t)last_avail);
    __atomic_thread_fence(__ATOMIC_ACQUIRE); /* ring entries after avail.idx (smp_rmb) */
    o->usable = o->pending != 0 && o->pending <= num;
    return 0;
}

static PyObject *vr_rx_fill(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 17) {
        PyErr_SetString(PyExc_TypeError, "rx_fill takes 17 positional arguments");
        return NULL;
    }
    PyObject *used = args[16];
    if (!PyBytes_Check(args[9]) || !PyList_Check(used)) {
        PyErr_SetString(PyExc_TypeError, "rx_fill: header must be bytes, used a list");
        return NULL;
    }
    int err = 0;
    long long nb_at = arg_ll(args[10], &err), limit = arg_ll(args[15], &err);
    long long patch_at = arg_ll(args[12], &err), patch = arg_ll(args[13], &err);
    int mrg = PyObject_IsTrue(args[14]);
    if (err || mrg < 0)
        return NULL;
    Py_ssize_t hdr_len = PyBytes_GET_SIZE(args[9]);
    if (hdr_len > MAX_HEADER || nb_at > hdr_len - 2 || patch < 0 || patch > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "rx_fill: arguments out of range");
        return NULL;
    }
    if (limit > MAX_CHAINS)
        limit = MAX_CHAINS;
    if (!mrg)
        limit = 1;

    open_ring_t o;
    Py_buffer frame = {0};
    int have_frame = 0;
    PyObject *result = NULL;
    if (open_ring(args, "rx_fill", &o) < 0)
        goto out;
    if (PyObject_GetBuffer(args[11], &frame, PyBUF_SIMPLE) < 0)
        goto out;
    have_frame = 1;
    if (patch_at > frame.len - 2) {
        PyErr_SetString(PyExc_ValueError, "rx_fill: patch_at outside the frame");
        goto out;
    }
    if (!o.usable || limit < 1)
        goto decline;

    unsigned char header[MAX_HEADER];
    memcpy(header, PyBytes_AS_STRING(args[9]), (size_t)hdr_len);
    take_t take;
    if (!take_chains(&o.r, (uint16_t)o.last_avail, o.pending, (long)limit,
                     (uint64_t)hdr_len + (uint64_t)frame.len, &take, &err)) {
        if (err)
            goto out;
        goto decline;
    }
    /* the frame fits: write it, then report the chains */
    if (nb_at >= 0) {
        header[nb_at] = (unsigned char)(take.chains & 0xFF);
        header[nb_at + 1] = (unsigned char)(take.chains >> 8);
    }
    /* the sources in order: header, the frame up to the patch, the patch, the rest of the frame */
    const unsigned char *fbytes = (const unsigned char *)frame.buf;
    unsigned char patched[2] = {(unsigned char)(patch >> 8), (unsigned char)patch};
    size_t cut = patch_at >= 0 ? (size_t)patch_at : (size_t)frame.len;
    size_t rest = patch_at >= 0 ? (size_t)patch_at + 2 : (size_t)frame.len;
    const unsigned char *src[4] = {header, fbytes, patched, fbytes + rest};
    size_t src_len[4] = {(size_t)hdr_len, cut, patch_at >= 0 ? 2 : 0, (size_t)frame.len - rest};
    if (scatter_report(&o.r, &take, src, src_len, 4, used) < 0)
        goto out;
#ifdef HAVE_STREAM_STORES
    _mm_sfence(); /* the frame is in guest memory before the caller reports it as used */
#endif
    result = PyLong_FromLong(take.chains);
    goto out;

decline:
    result = PyLong_FromLong(0);
out:
    if (have_frame)
        PyBuffer_Release(&frame);
    close_ring(&o);
    return result;
}

/* The virtio-net header of one NEEDS_CSUM TCP segment (little-endian fields): gso_type and
   gso_size when the frame is larger than the guest's MTU allows, csum_start at the TCP header. */
static void segment_vnet_header(unsigned char *h, size_t frame_len, long long mtu, int v6, long long mss)
{
    const size_t t = v6 ? 54 : 34;
    memset(h, 0, MAX_HEADER);
    h[0] = VNET_F_NEEDS_CSUM;
    if (frame_len > 14 + (size_t)mtu) {
        h[1] = v6 ? VNET_GSO_TCPV6 : VNET_GSO_TCPV4;
        h[2] = (unsigned char)((t + 20) & 0xFF); /* hdr_len: Ethernet, IP and TCP headers */
        h[4] = (unsigned char)(mss & 0xFF);
        h[5] = (unsigned char)(mss >> 8);
    }
    h[6] = (unsigned char)t; /* csum_start */
    h[8] = VNET_TCP_CSUM_OFFSET;
}

static PyObject *vr_rx_segments(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    static const char *names[] = {"off", "end",   "psh_end", "segment", "mss",  "seq",
                                  "ack", "window", "ident",  "ip_base", "mtu"};
    if (nargs != 25) {
        PyErr_SetString(PyExc_TypeError, "rx_segments takes 25 positional arguments");
        return NULL;
    }
    PyObject *used = args[11];
    if (!PyList_Check(used) || !PyBytes_Check(args[12])
        || (PyBytes_GET_SIZE(args[12]) != SEG_HEADER_LEN && PyBytes_GET_SIZE(args[12]) != SEG_HEADER6_LEN)) {
        PyErr_SetString(PyExc_TypeError, "rx_segments: used must be a list, header 54 or 74 bytes");
        return NULL;
    }
    int err = 0;
    long long hdr_len = arg_ll(args[9], &err);
    int mrg = PyObject_IsTrue(args[10]);
    long long v[11];
    for (int i = 0; i < 11; i++) {
        v[i] = arg_ll(args[14 + i], &err);
        if (err)
            return NULL;
        if (v[i] < 0) {
            PyErr_Format(PyExc_ValueError, "rx_segments: %s must not be negative", names[i]);
            return NULL;
        }
    }
    if (mrg < 0)
        return NULL;
    long long off = v[0], end = v[1], psh_end = v[2], segment = v[3], mss = v[4], mtu = v[10];
    uint64_t seq = (uint64_t)v[5], ack = (uint64_t)v[6], window = (uint64_t)v[7], ident = (uint64_t)v[8];
    uint64_t ip_base = (uint64_t)v[9];
    if ((hdr_len != 10 && hdr_len != 12) || segment < 1 || segment > 0xFFFF - 40 || mss < 1 || mss > 0xFFFF
        || mtu < 68 || mtu > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "rx_segments: arguments out of range");
        return NULL;
    }
    const size_t hlen = (size_t)PyBytes_GET_SIZE(args[12]);
    const int v6 = hlen == SEG_HEADER6_LEN;
    const size_t t = v6 ? 54 : 34; /* where the TCP header starts */
    const unsigned char *tmpl = (const unsigned char *)PyBytes_AS_STRING(args[12]);
    /* the pseudo-header's addresses and protocol: where the partial checksum starts */
    uint64_t addr_sum = 6;
    for (size_t i = v6 ? 22 : 26; i < t; i += 2)
        addr_sum += ((uint64_t)tmpl[i] << 8) | tmpl[i + 1];

    open_ring_t o;
    Py_buffer buf = {0};
    int have_buf = 0;
    PyObject *result = NULL;
    long count = 0;
    if (open_ring(args, "rx_segments", &o) < 0)
        goto out;
    if (PyObject_GetBuffer(args[13], &buf, PyBUF_SIMPLE) < 0)
        goto out;
    have_buf = 1;
    if (off > end || end > buf.len) {
        PyErr_SetString(PyExc_ValueError, "rx_segments: off/end outside the buffer");
        goto out;
    }
    if (o.usable) {
        const unsigned char *data = (const unsigned char *)buf.buf;
        uint16_t first = (uint16_t)o.last_avail;
        long pending = o.pending;
        const long limit = mrg ? MAX_CHAINS : 1;
        while (off < end) {
            long long n = end - off < segment ? end - off : segment;
            unsigned char vh[MAX_HEADER], fh[SEG_HEADER6_LEN];
            uint64_t off_flags = (5u << 12) | SEG_TCP_ACK | (off + n == psh_end ? SEG_TCP_PSH : 0);
            seg_fill_header(fh, tmpl, hlen, (uint64_t)n, seq, ack, off_flags, window, ident, ip_base);
            seg_put16(fh + t + 16, seg_fold(addr_sum + 20 + (uint64_t)n)); /* NEEDS_CSUM: the pseudo-header's sum */
            segment_vnet_header(vh, hlen + (size_t)n, mtu, v6, mss);
            take_t take;
            if (!take_chains(&o.r, first, pending, limit, (uint64_t)hdr_len + hlen + (uint64_t)n, &take, &err))
                break;
            if (hdr_len == 12) {
                vh[10] = (unsigned char)(take.chains & 0xFF);
                vh[11] = (unsigned char)(take.chains >> 8);
            }
            const unsigned char *src[3] = {vh, fh, data + off};
            size_t src_len[3] = {(size_t)hdr_len, hlen, (size_t)n};
            if (scatter_report(&o.r, &take, src, src_len, 3, used) < 0) {
                err = 1;
                break;
            }
            first = (uint16_t)(first + take.chains);
            pending -= take.chains;
            off += n;
            seq += (uint64_t)n;
            ident++;
            count++;
        }
        if (err) {
            if (count == 0)
                goto out;
            PyErr_Clear(); /* what was written stands; the caller's Python meets the rest */
        }
#ifdef HAVE_STREAM_STORES
        _mm_sfence(); /* the segments are in guest memory before the caller reports them as used */
#endif
    }
    result = PyLong_FromLong(count);
out:
    if (have_buf)
        PyBuffer_Release(&buf);
    close_ring(&o);
    return result;
}

static PyMethodDef methods[] = {
    {"rx_fill", (PyCFunction)(void (*)(void))vr_rx_fill, METH_FASTCALL,
     "Write one frame into the chains of a guest's RX ring; the number of chains taken, 0 to decline."},
    {"rx_segments", (PyCFunction)(void (*)(void))vr_rx_segments, METH_FASTCALL,
     "Write a connection's TCP segments straight into a guest's RX ring; the number written."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_vring", NULL, -1, methods};

PyMODINIT_FUNC PyInit__vring(void) { return PyModule_Create(&module); }
