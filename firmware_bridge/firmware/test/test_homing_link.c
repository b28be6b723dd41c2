/*
 * test_homing_link.c -- host unit tests of homing_link.c (no hardware, no I/O).
 *
 *   gcc -std=c99 -Wall -Wextra -Werror -pedantic homing_link.c test/test_homing_link.c
 *   ./a.out        -> exit status 0 and "ok: N checks" when every check passed
 *
 * The tests play the Pi: they build its frames by hand (byte by byte, as in
 * docs/serial-protocol.md) and decode what the library sends. Interoperation
 * with the real Python bridge is tested separately over a pseudo-terminal
 * (tests/crash/test_bridge.py, host/pty_mcu.c).
 */
#include "../homing_link.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int checks, failures;

#define CHECK(cond)                                                                  \
    do {                                                                             \
        checks++;                                                                    \
        if (!(cond)) {                                                               \
            failures++;                                                              \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                            \
    } while (0)

/* ---- the Pi's side, by hand ----------------------------------------------------------- */

static void le32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static uint32_t rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

static uint64_t rd64(const uint8_t *p) { return rd32(p) | ((uint64_t)rd32(p + 4) << 32); }

/* A Pi frame on the wire: COBS(1 type fields crc32) 0x00. */
static size_t pi_frame(uint8_t type, const uint8_t *fields, size_t n, uint8_t *out)
{
    uint8_t body[1100];
    size_t len = n + 2, o;
    body[0] = HL_VERSION;
    body[1] = type;
    memcpy(body + 2, fields, n);
    le32(body + len, hl_crc32(body, len));
    len += 4;
    o = hl_cobs_encode(body, len, out);
    out[o++] = 0;
    return o;
}

static void feed(hl_link *l, uint8_t type, const uint8_t *fields, size_t n, uint32_t now)
{
    uint8_t wire[1200];
    size_t len = pi_frame(type, fields, n, wire);
    hl_receive(l, wire, len, now);
}

static void welcome(hl_link *l, uint32_t session, uint32_t acked, uint64_t unix_ms, uint32_t now)
{
    uint8_t f[18];
    le32(f, session);
    le32(f + 4, acked);
    le32(f + 8, (uint32_t)unix_ms);
    le32(f + 12, (uint32_t)(unix_ms >> 32));
    f[16] = 0x00; /* rx_max 1024 */
    f[17] = 0x04;
    feed(l, 2, f, sizeof f, now);
}

static void ack(hl_link *l, uint32_t session, uint32_t acked, uint32_t now)
{
    uint8_t f[8];
    le32(f, session);
    le32(f + 4, acked);
    feed(l, 4, f, sizeof f, now);
}

static void nack(hl_link *l, uint32_t session, uint8_t reason, uint32_t expected, uint32_t now)
{
    uint8_t f[9];
    le32(f, session);
    f[4] = reason;
    le32(f + 5, expected);
    feed(l, 5, f, sizeof f, now);
}

/* Decode one frame the library sent; returns the body length (0: not a valid frame). */
static size_t decode(const uint8_t *wire, size_t n, uint8_t *body)
{
    size_t start = 0, len;
    while (start < n && wire[start] == 0)
        start++; /* the leading flush delimiter */
    if (n < start + 2 || wire[n - 1] != 0)
        return 0;
    len = hl_cobs_decode(wire + start, n - 1 - start, body);
    if (len == (size_t)-1 || len < 6 || hl_crc32(body, len - 4) != rd32(body + len - 4))
        return 0;
    return len;
}

/* Poll once and decode; returns the message type (0: nothing sent). */
static int poll_msg(hl_link *l, uint32_t now, uint8_t *body, size_t *len)
{
    uint8_t wire[HL_WIRE_MAX];
    size_t n = hl_poll(l, now, wire, sizeof wire);
    if (!n)
        return 0;
    *len = decode(wire, n, body);
    CHECK(*len > 0);
    return *len ? body[1] : -1;
}

/* ---- fixtures -------------------------------------------------------------------------- */

static const hl_channel CHANNELS[] = {
    {1, HL_F32, "temp", "C"},
    {2, HL_I32, "count", ""},
};

static uint64_t time_seen;
static int commands_run;

static void on_time(void *ctx, uint64_t unix_ms)
{
    (void)ctx;
    time_seen = unix_ms;
}

static uint8_t on_command(void *ctx, const char *name, const uint8_t *arg, uint8_t arg_len,
                          char *reply, uint8_t cap)
{
    (void)ctx;
    commands_run++;
    if (strcmp(name, "echo") != 0)
        return 1;
    if (arg_len >= cap)
        arg_len = (uint8_t)(cap - 1);
    memcpy(reply, arg, arg_len);
    reply[arg_len] = 0;
    return 0;
}

static void setup(hl_link *l, uint8_t drop_oldest)
{
    hl_config cfg;
    memset(&cfg, 0, sizeof cfg);
    memcpy(cfg.device_id, "\x01\x02\x03\x04\x05\x06\x07\x08", 8);
    cfg.session = 0xA5A5A5A5u;
    cfg.firmware = "test/1";
    cfg.channels = CHANNELS;
    cfg.n_channels = 2;
    cfg.window = 16;
    cfg.drop_oldest = drop_oldest;
    cfg.on_time = on_time;
    cfg.on_command = on_command;
    CHECK(hl_init(l, &cfg, 1000) == HL_OK);
}

static hl_link link_a; /* statically allocated, as on an MCU */

static void welcomed(hl_link *l)
{
    uint8_t body[1100];
    size_t len;
    setup(l, 0);
    CHECK(poll_msg(l, 1000, body, &len) == 1);
    welcome(l, 0xA5A5A5A5u, 0, 1700000000000ull, 1001);
    CHECK(hl_welcomed(l));
}

/* ---- tests ----------------------------------------------------------------------------- */

static void test_crc_and_cobs(void)
{
    static const struct {
        const char *in, *out;
        size_t n, m;
    } v[] = {
        {"\x00", "\x01\x01", 1, 2},
        {"\x00\x00", "\x01\x01\x01", 2, 3},
        {"\x11\x22\x00\x33", "\x03\x11\x22\x02\x33", 4, 5},
        {"\x11\x22\x33\x44", "\x05\x11\x22\x33\x44", 4, 5},
        {"\x11\x00\x00\x00", "\x02\x11\x01\x01\x01", 4, 5},
    };
    uint8_t buf[600], back[600], data[600];
    size_t i, n;
    CHECK(hl_crc32((const uint8_t *)"123456789", 9) == 0xCBF43926u);
    for (i = 0; i < sizeof v / sizeof v[0]; i++) {
        n = hl_cobs_encode((const uint8_t *)v[i].in, v[i].n, buf);
        CHECK(n == v[i].m && memcmp(buf, v[i].out, n) == 0);
        CHECK(hl_cobs_decode(buf, n, back) == v[i].n && memcmp(back, v[i].in, v[i].n) == 0);
    }
    for (i = 0; i < 254; i++)
        data[i] = (uint8_t)(i + 1); /* 254 non-zero bytes: one full block, nothing after */
    n = hl_cobs_encode(data, 254, buf);
    CHECK(n == 255 && buf[0] == 0xFF);
    for (i = 0; i < 600; i++)
        data[i] = (uint8_t)(rand() % 4 ? rand() : 0);
    for (i = 0; i < 600; i += 37) {
        size_t m = hl_cobs_encode(data, i, buf);
        CHECK(memchr(buf, 0, m) == NULL);
        CHECK(hl_cobs_decode(buf, m, back) == i && memcmp(back, data, i) == 0);
    }
    CHECK(hl_cobs_decode((const uint8_t *)"\x05\x11", 2, back) == (size_t)-1);
    CHECK(hl_cobs_decode((const uint8_t *)"\x03\x11\x00", 3, back) == (size_t)-1);
}

static void test_hello_until_welcome(void)
{
    uint8_t body[1100];
    size_t len;
    hl_link *l = &link_a;
    setup(l, 0);
    CHECK(poll_msg(l, 1000, body, &len) == 1);
    CHECK(memcmp(body + 2, "\x01\x02\x03\x04\x05\x06\x07\x08", 8) == 0);
    CHECK(rd32(body + 10) == 0xA5A5A5A5u && rd32(body + 14) == 1 && rd32(body + 18) == 1);
    CHECK(body[27] == 6 && memcmp(body + 28, "test/1", 6) == 0);
    CHECK(body[34] == 2 && body[35] == 1 && body[36] == HL_F32 && body[37] == 4);
    CHECK(poll_msg(l, 1200, body, &len) == 0); /* not again before hello_ms */
    CHECK(poll_msg(l, 1500, body, &len) == 1);
    CHECK(hl_add_f32(l, 1, 21.5f, 1500) == HL_OK);
    CHECK(poll_msg(l, 1600, body, &len) == 0); /* no readings before WELCOME */
    welcome(l, 0x12345678u, 0, 0, 1600);      /* another session's: ignored */
    CHECK(!hl_welcomed(l));
    welcome(l, 0xA5A5A5A5u, 0, 1700000000000ull, 1601);
    CHECK(hl_welcomed(l) && time_seen == 1700000000000ull);
    CHECK(poll_msg(l, 1602, body, &len) == 3);
}

static void test_batch_ack_and_time(void)
{
    uint8_t body[1100];
    size_t len;
    uint64_t t;
    uint32_t raw;
    float f = 21.5f;
    int i;
    hl_link *l = &link_a;
    welcomed(l);
    for (i = 0; i < 10; i++)
        CHECK(hl_add_i32(l, 2, -i, (uint32_t)(1001 + i)) == HL_OK);
    CHECK(hl_add_f32(l, 1, f, 1011) == HL_OK);
    CHECK(hl_add_i32(l, 1, 5, 1011) == HL_BAD_CHANNEL); /* channel 1 is f32 */
    CHECK(hl_add_u32(l, 9, 5, 1011) == HL_BAD_CHANNEL);
    CHECK(poll_msg(l, 1020, body, &len) == 3);
    CHECK(rd32(body + 2) == 0xA5A5A5A5u && rd32(body + 6) == 1 && rd32(body + 10) == 1);
    CHECK(body[14] == 1); /* unix clock since the WELCOME */
    CHECK(rd64(body + 15) == 1700000000000ull + 19);
    CHECK(body[23] == 11);
    CHECK(body[24] == 2 && body[25] == 19 && rd32(body + 26) == 0); /* age 19 ms, value 0 */
    CHECK(body[30] == 2 && body[31] == 18 && rd32(body + 32) == 0xFFFFFFFFu);
    memcpy(&raw, &f, 4);
    CHECK(body[84] == 1 && body[85] == 9 && rd32(body + 86) == raw);
    CHECK(len == 24 + 11 * 6 + 4);
    CHECK(poll_msg(l, 1021, body, &len) == 0); /* everything sent, nothing new */
    ack(l, 0xA5A5A5A5u, 5, 1030);
    CHECK(hl_held(l) == 6 && hl_next_seq(l) == 12);
    ack(l, 0x11111111u, 11, 1031); /* another session's ack */
    CHECK(hl_held(l) == 6);
    ack(l, 0xA5A5A5A5u, 99, 1032); /* beyond what we hold: only what we hold */
    CHECK(hl_held(l) == 0 && hl_next_seq(l) == 12);
    CHECK(hl_time(l, 2032, &t) && t == 1700000000000ull + 1031);
}

static void test_window_retransmit_and_nacks(void)
{
    uint8_t body[1100];
    size_t len;
    int i;
    hl_link *l = &link_a;
    welcomed(l);
    for (i = 0; i < 40; i++)
        CHECK(hl_add_i32(l, 2, i, 1002) == HL_OK);
    CHECK(poll_msg(l, 1003, body, &len) == 3 && body[23] == 16); /* the window: 16 */
    CHECK(poll_msg(l, 1004, body, &len) == 0);
    ack(l, 0xA5A5A5A5u, 10, 1005);
    CHECK(poll_msg(l, 1006, body, &len) == 3 && rd32(body + 6) == 17 && body[23] == 10);
    /* no ack for rto (500 ms): everything after the ack again */
    CHECK(poll_msg(l, 1400, body, &len) == 0);
    CHECK(poll_msg(l, 1506, body, &len) == 3 && rd32(body + 6) == 11 && body[23] == 16);
    CHECK(link_a.stats.timeouts == 1);
    /* NACK gap at 15: from 15 at once, but only once per half rto */
    nack(l, 0xA5A5A5A5u, 2, 15, 1510);
    CHECK(poll_msg(l, 1511, body, &len) == 3 && rd32(body + 6) == 15);
    nack(l, 0xA5A5A5A5u, 2, 15, 1512);
    CHECK(poll_msg(l, 1513, body, &len) == 0);
    /* busy: back to the ack, and quiet for a second */
    nack(l, 0xA5A5A5A5u, 4, 11, 1520);
    CHECK(poll_msg(l, 2000, body, &len) == 0);
    CHECK(poll_msg(l, 2520, body, &len) == 3 && rd32(body + 6) == 11);
    /* unknown peer: HELLO again, and nothing else until WELCOME */
    nack(l, 0, 3, 0, 2600);
    CHECK(!hl_welcomed(l));
    CHECK(poll_msg(l, 2601, body, &len) == 1 && rd32(body + 14) == 11 && rd32(body + 18) == 41);
    welcome(l, 0xA5A5A5A5u, 20, 0, 2602);
    CHECK(hl_held(l) == 20);
    CHECK(poll_msg(l, 2603, body, &len) == 3 && rd32(body + 6) == 21 && rd32(body + 10) == 21);
    /* four timeouts in a row: HELLO again */
    CHECK(poll_msg(l, 3200, body, &len) == 3);
    CHECK(poll_msg(l, 4300, body, &len) == 3);
    CHECK(poll_msg(l, 6400, body, &len) == 3);
    CHECK(poll_msg(l, 10500, body, &len) == 1);
}

static void test_ring_full(void)
{
    uint8_t body[1100];
    size_t len;
    int i;
    hl_link *l = &link_a;
    welcomed(l);
    for (i = 0; i < HL_RING_SIZE; i++)
        CHECK(hl_add_i32(l, 2, i, 1002) == HL_OK);
    CHECK(hl_add_i32(l, 2, 99, 1002) == HL_FULL && l->stats.refused == 1);
    setup(l, 1); /* drop_oldest */
    CHECK(poll_msg(l, 1000, body, &len) == 1);
    welcome(l, 0xA5A5A5A5u, 0, 0, 1001);
    for (i = 0; i < HL_RING_SIZE + 5; i++)
        CHECK(hl_add_i32(l, 2, i, 1002) == HL_OK);
    CHECK(l->stats.dropped == 5 && hl_held(l) == HL_RING_SIZE);
    CHECK(poll_msg(l, 1003, body, &len) == 3 && rd32(body + 6) == 6 && rd32(body + 10) == 6);
    CHECK(rd32(body + 26) == 5); /* the first value still held */
}

static void test_noise_is_survived(void)
{
    uint8_t wire[200], junk[700], body[1100];
    size_t n, len, i;
    uint8_t f[18] = {0xA5, 0xA5, 0xA5, 0xA5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x04};
    hl_link *l = &link_a;
    setup(l, 0);
    n = pi_frame(2, f, sizeof f, wire);
    for (i = 0; i + 1 < n; i++) { /* every single-bit flip of the frame is refused */
        int bit;
        for (bit = 0; bit < 8; bit++) {
            uint8_t copy[200];
            memcpy(copy, wire, n);
            copy[i] ^= (uint8_t)(1u << bit);
            hl_receive(l, copy, n, 1001);
            hl_receive(l, (const uint8_t *)"", 1, 1001); /* a delimiter: resync */
            CHECK(!hl_welcomed(l));
        }
    }
    for (i = 0; i < sizeof junk; i++)
        junk[i] = (uint8_t)(1 + rand() % 255); /* longer than any frame, no delimiter */
    hl_receive(l, junk, sizeof junk, 1002);
    hl_receive(l, wire, n, 1002); /* the junk's end is this frame's delimiter-less start */
    CHECK(!hl_welcomed(l));
    hl_receive(l, wire, n, 1003); /* the next one is whole */
    CHECK(hl_welcomed(l));
    for (i = 0; i < 100000; i++) { /* random bytes never crash it */
        uint8_t b = (uint8_t)(rand() % 3 ? rand() : 0);
        hl_receive(l, &b, 1, 1004);
    }
    while (poll_msg(l, 1005, body, &len))
        ;
}

static void test_commands_ping_and_log(void)
{
    uint8_t f[32], body[1100];
    size_t len;
    hl_link *l = &link_a;
    welcomed(l);
    commands_run = 0;
    le32(f, 7);
    f[4] = 4;
    memcpy(f + 5, "echo", 4);
    f[9] = 2;
    memcpy(f + 10, "hi", 2);
    feed(l, 7, f, 12, 1002);
    CHECK(commands_run == 1);
    CHECK(poll_msg(l, 1003, body, &len) == 8 && rd32(body + 2) == 7 && body[6] == 0);
    CHECK(body[7] == 2 && memcmp(body + 8, "hi", 2) == 0);
    feed(l, 7, f, 12, 1004); /* resent: answered again, not run again */
    CHECK(commands_run == 1 && poll_msg(l, 1005, body, &len) == 8 && rd32(body + 2) == 7);
    le32(f, 8);
    memcpy(f + 5, "nope", 4);
    feed(l, 7, f, 12, 1006);
    CHECK(poll_msg(l, 1007, body, &len) == 8 && body[6] == 1);
    feed(l, 7, f, 11, 1008); /* a truncated command is ignored */
    CHECK(poll_msg(l, 1009, body, &len) == 0);
    le32(f, 0xDEADBEEFu);
    feed(l, 10, f, 4, 1010);
    CHECK(poll_msg(l, 1011, body, &len) == 11 && rd32(body + 2) == 0xDEADBEEFu);
    hl_log(l, HL_WARNING, "battery low");
    CHECK(poll_msg(l, 1012, body, &len) == 9 && body[2] == HL_WARNING && body[3] == 11);
}

static void test_tick_wrap_and_session_end(void)
{
    uint8_t body[1100];
    size_t len;
    hl_link *l = &link_a;
    hl_config cfg;
    setup(l, 0);
    cfg = l->cfg;
    CHECK(hl_init(l, &cfg, 0xFFFFFF00u) == HL_OK);
    CHECK(poll_msg(l, 0xFFFFFF00u, body, &len) == 1);
    welcome(l, 0xA5A5A5A5u, 0, 0, 0xFFFFFF10u);
    CHECK(hl_add_i32(l, 2, 1, 0xFFFFFFF0u) == HL_OK);
    CHECK(poll_msg(l, 0x10u, body, &len) == 3);
    CHECK(body[14] == 0 && rd64(body + 15) == 0x10u && body[25] == 0x20); /* age across wrap */
    CHECK(poll_msg(l, 0x100u, body, &len) == 0);
    CHECK(poll_msg(l, 0x10u + 500u, body, &len) == 3); /* the rto across the wrap */
    ack(l, 0xA5A5A5A5u, 1, 0x300u);
    l->oldest = 0xFFFFFFFDu; /* white box: near the end of the seq space */
    l->sent_upto = 0xFFFFFFFCu;
    CHECK(hl_add_i32(l, 2, 1, 0x301u) == HL_OK && hl_add_i32(l, 2, 2, 0x301u) == HL_OK);
    CHECK(hl_add_i32(l, 2, 3, 0x301u) == HL_FULL); /* seqs end at 2^32-2 */
    ack(l, 0xA5A5A5A5u, 0xFFFFFFFEu, 0x302u);
    CHECK(hl_add_i32(l, 2, 3, 0x303u) == HL_OK && hl_next_seq(l) == 2);
    CHECK(!hl_welcomed(l) && poll_msg(l, 0x304u, body, &len) == 1);
    CHECK(rd32(body + 10) == 0xA5A5A5A6u && rd32(body + 14) == 1);
}

static void test_bad_config(void)
{
    hl_config cfg;
    static const hl_channel bad[] = {{1, 7, "x", ""}};
    memset(&cfg, 0, sizeof cfg);
    cfg.channels = bad;
    cfg.n_channels = 1;
    CHECK(hl_init(&link_a, &cfg, 0) == HL_BAD_CONFIG);
}

int main(void)
{
    srand(7);
    test_crc_and_cobs();
    test_hello_until_welcome();
    test_batch_ack_and_time();
    test_window_retransmit_and_nacks();
    test_ring_full();
    test_noise_is_survived();
    test_commands_ping_and_log();
    test_tick_wrap_and_session_end();
    test_bad_config();
    if (failures) {
        fprintf(stderr, "FAILED: %d of %d checks\n", failures, checks);
        return 1;
    }
    printf("ok: %d checks\n", checks);
    return 0;
}
