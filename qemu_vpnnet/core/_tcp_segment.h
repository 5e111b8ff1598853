/*
 * The headers of one TCP segment toward a guest, from a connection's header template: shared by
 * _fastpath.c (segments as frames) and _vring.c (segments straight into a vhost-user guest's
 * RX buffers), so that both write the same bytes.
 */
#ifndef QEMU_VPNNET_TCP_SEGMENT_H
#define QEMU_VPNNET_TCP_SEGMENT_H

#include <stdint.h>
#include <string.h>

#define SEG_HEADER_LEN 54  /* Ethernet 14 + IPv4 20 + TCP 20 */
#define SEG_HEADER6_LEN 74 /* Ethernet 14 + IPv6 40 + TCP 20 */
#define SEG_TCP_ACK 0x10
#define SEG_TCP_PSH 0x08

static inline uint64_t seg_fold(uint64_t acc)
{
    while (acc >> 16)
        acc = (acc & 0xFFFF) + (acc >> 16);
    return acc;
}

static inline void seg_put16(unsigned char *p, uint64_t v)
{
    p[0] = (unsigned char)(v >> 8);
    p[1] = (unsigned char)v;
}

static inline void seg_put32(unsigned char *p, uint64_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

/* Copy the template (hlen: SEG_HEADER_LEN or SEG_HEADER6_LEN) to p and set what differs per
   segment of n payload bytes: IPv4 total length, ident and header checksum (ip_base: the sum of
   the template's constant IPv4 fields) or the IPv6 payload length; then the TCP sequence number,
   ack, offset and flags (off_flags), window, and urgent pointer. The TCP checksum field is the
   caller's. */
static inline void seg_fill_header(unsigned char *p, const unsigned char *header, size_t hlen, uint64_t n, uint64_t seq,
                                   uint64_t ack, uint64_t off_flags, uint64_t window, uint64_t ident, uint64_t ip_base)
{
    const size_t t = hlen == SEG_HEADER6_LEN ? 54 : 34; /* where the TCP header starts */
    const uint64_t tcp_len = 20 + n;
    memcpy(p, header, hlen);
    if (hlen == SEG_HEADER6_LEN) {
        seg_put16(p + 18, tcp_len);
    } else {
        uint64_t id = ident & 0xFFFF;
        seg_put16(p + 16, 20 + tcp_len);
        seg_put16(p + 18, id);
        seg_put16(p + 24, ~seg_fold(ip_base + 20 + tcp_len + id) & 0xFFFF);
    }
    seg_put32(p + t + 4, seq & 0xFFFFFFFF);
    seg_put32(p + t + 8, ack & 0xFFFFFFFF);
    seg_put16(p + t + 12, off_flags);
    seg_put16(p + t + 14, window & 0xFFFF);
    seg_put16(p + t + 18, 0);
}

#endif
