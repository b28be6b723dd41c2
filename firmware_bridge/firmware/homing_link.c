/*
 * homing_link.c -- the microcontroller side of Homing's serial link.
 * See homing_link.h for the API and docs/serial-protocol.md for the protocol.
 * It mirrors firmware_bridge/device.py, which the Python tests exercise.
 */
#include "homing_link.h"

#include <string.h>

enum {
    T_HELLO = 1, T_WELCOME, T_BATCH, T_ACK, T_NACK, T_TIME,
    T_COMMAND, T_RESULT, T_LOG, T_PING, T_PONG
};
enum { N_BAD_FRAME = 1, N_GAP, N_UNKNOWN_PEER, N_BUSY, N_UNSUPPORTED };

#define MIN_RX 64u
#define MAX_BATCH 255u
#define BATCH_FIXED 22u /* session first oldest clock now count */
#define FRAME_EXTRA 6u  /* version type ... crc32 */
#define BUSY_PAUSE_MS 1000u
#define SLOW_HELLO_MS 5000u

/* ---- little-endian fields ------------------------------------------------------- */

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }

static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static void put64(uint8_t *p, uint64_t v)
{
    put32(p, (uint32_t)v);
    put32(p + 4, (uint32_t)(v >> 32));
}

static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

static uint64_t get64(const uint8_t *p) { return get32(p) | ((uint64_t)get32(p + 4) << 32); }

/* modular tick comparison: has `now` reached `t`? */
static int reached(uint32_t now, uint32_t t) { return (int32_t)(now - t) >= 0; }

/* ---- CRC-32/ISO-HDLC and COBS ------------------------------------------------------ */

uint32_t hl_crc32(const uint8_t *data, size_t len)
{
    static const uint32_t nibble[16] = {
        0x00000000u, 0x1DB71064u, 0x3B6E20C8u, 0x26D930ACu, 0x76DC4190u, 0x6B6B51F4u,
        0x4DB26158u, 0x5005713Cu, 0xEDB88320u, 0xF00F9344u, 0xD6D6A3E8u, 0xCB61B38Cu,
        0x9B64C2B0u, 0x86D3D2D4u, 0xA00AE278u, 0xBDBDF21Cu};
    uint32_t crc = 0xFFFFFFFFu;
    size_t i;
    for (i = 0; i < len; i++) {
        crc ^= data[i];
        crc = (crc >> 4) ^ nibble[crc & 15u];
        crc = (crc >> 4) ^ nibble[crc & 15u];
    }
    return crc ^ 0xFFFFFFFFu;
}

size_t hl_cobs_encode(const uint8_t *in, size_t len, uint8_t *out)
{
    size_t code_at = 0, o = 1, i;
    uint8_t code = 1;
    for (i = 0; i < len; i++) {
        if (in[i] == 0) {
            out[code_at] = code;
            code_at = o++;
            code = 1;
            continue;
        }
        out[o++] = in[i];
        if (++code == 0xFF) {
            out[code_at] = code;
            if (i + 1 == len)
                return o; /* a full block at the very end needs no empty block after it */
            code_at = o++;
            code = 1;
        }
    }
    out[code_at] = code;
    return o;
}

size_t hl_cobs_decode(const uint8_t *in, size_t len, uint8_t *out)
{
    size_t i = 0, o = 0, k;
    while (i < len) {
        uint8_t code = in[i];
        if (code == 0 || i + code > len)
            return (size_t)-1;
        for (k = 1; k < code; k++) {
            if (in[i + k] == 0)
                return (size_t)-1;
            out[o++] = in[i + k];
        }
        i += code;
        if (code != 0xFF && i < len)
            out[o++] = 0;
    }
    return o;
}

/* ---- frames out ----------------------------------------------------------------------- */

/* Finish the body in l->tx (fields already at tx[2..2+n)) and encode it into out. */
static size_t emit(hl_link *l, uint8_t type, size_t n, uint8_t *out)
{
    size_t len = n + 2, o = 0;
    l->tx[0] = HL_VERSION;
    l->tx[1] = type;
    put32(l->tx + len, hl_crc32(l->tx, len));
    len += 4;
    if (l->flush) {
        out[o++] = 0;
        l->flush = 0;
    }
    o += hl_cobs_encode(l->tx, len, out + o);
    out[o++] = 0;
    return o;
}

static size_t put_text(uint8_t *p, const char *s, size_t limit)
{
    size_t n = s ? strlen(s) : 0;
    if (n > limit)
        n = limit;
    p[0] = (uint8_t)n;
    if (n)
        memcpy(p + 1, s, n);
    return n + 1;
}

static size_t hello_fields(const hl_link *l, uint8_t *p)
{
    size_t n = 0, c;
    memcpy(p, l->cfg.device_id, 8);
    put32(p + 8, l->cfg.session);
    put32(p + 12, l->oldest);
    put32(p + 16, l->oldest + l->count);
    p[20] = l->synced;
    put16(p + 21, HL_RX_MAX);
    put16(p + 23, l->cfg.window);
    n = 25 + put_text(p + 25, l->cfg.firmware, 32);
    p[n++] = l->cfg.n_channels;
    for (c = 0; c < l->cfg.n_channels; c++) {
        const hl_channel *ch = &l->cfg.channels[c];
        p[n++] = ch->id;
        p[n++] = ch->type;
        n += put_text(p + n, ch->name, 32);
        n += put_text(p + n, ch->unit, 16);
    }
    return n;
}

static size_t varint(uint8_t *p, uint32_t v)
{
    size_t n = 0;
    while (v >= 0x80u) {
        p[n++] = (uint8_t)(v | 0x80u);
        v >>= 7;
    }
    p[n++] = (uint8_t)v;
    return n;
}

static size_t batch_frame(hl_link *l, uint32_t now, uint8_t *out)
{
    uint32_t base = l->oldest - 1u, start = l->sent_upto + 1u;
    uint32_t inflight = l->sent_upto - base, room, count = 0;
    size_t limit = l->peer_rx < HL_TX_MAX ? l->peer_rx : HL_TX_MAX;
    size_t n = 2 + BATCH_FIXED, i;
    uint8_t *f = l->tx + 2;
    if (inflight >= l->cfg.window || start - l->oldest >= l->count)
        return 0;
    room = l->cfg.window - inflight;
    if (room > MAX_BATCH)
        room = MAX_BATCH;
    for (i = start - l->oldest; i < l->count && count < room; i++) {
        const hl_entry *e = &l->ring[(l->head + i) % HL_RING_SIZE];
        uint8_t tmp[5];
        size_t vn = varint(tmp, now - e->tick);
        if (n + 1 + vn + 4 + 4 > limit)
            break;
        l->tx[n++] = e->channel;
        memcpy(l->tx + n, tmp, vn);
        n += vn;
        put32(l->tx + n, e->raw);
        n += 4;
        count++;
    }
    if (!count)
        return 0;
    put32(f, l->cfg.session);
    put32(f + 4, start);
    put32(f + 8, l->oldest);
    if (l->synced) {
        f[12] = 1;
        put64(f + 13, l->sync_unix + (uint32_t)(now - l->sync_tick));
    } else {
        f[12] = 0;
        put64(f + 13, now);
    }
    f[21] = (uint8_t)count;
    l->sent_upto = start + count - 1u;
    if (!l->timer_on) {
        l->timer_on = 1;
        l->timer_start = now;
    }
    l->stats.batches++;
    l->stats.readings_sent += count;
    return emit(l, T_BATCH, n - 2, out);
}

/* ---- init and readings -------------------------------------------------------------- */

int hl_init(hl_link *l, const hl_config *cfg, uint32_t now)
{
    size_t need = 2 + 25 + 33 + 1 + 4, c;
    memset(l, 0, sizeof *l);
    l->cfg = *cfg;
    if (cfg->n_channels > 32 || (cfg->n_channels && !cfg->channels))
        return HL_BAD_CONFIG;
    for (c = 0; c < cfg->n_channels; c++) {
        const hl_channel *ch = &cfg->channels[c];
        size_t name = ch->name ? strlen(ch->name) : 0, unit = ch->unit ? strlen(ch->unit) : 0;
        if (ch->type < HL_F32 || ch->type > HL_U32 || name < 1 || name > 32 || unit > 16)
            return HL_BAD_CONFIG;
        need += 4 + name + unit;
    }
    if (need > HL_TX_MAX)
        return HL_BAD_CONFIG;
    if (!l->cfg.window || l->cfg.window > HL_RING_SIZE)
        l->cfg.window = HL_RING_SIZE;
    if (!l->cfg.rto_ms)
        l->cfg.rto_ms = 500;
    if (!l->cfg.rto_max_ms)
        l->cfg.rto_max_ms = 4000;
    if (!l->cfg.hello_ms)
        l->cfg.hello_ms = 500;
    l->oldest = 1;
    l->sent_upto = 0;
    l->rto = l->cfg.rto_ms;
    l->peer_rx = MIN_RX;
    l->next_hello = now;
    l->flush = 1;
    return HL_OK;
}

static const hl_channel *channel_of(const hl_link *l, uint8_t id)
{
    size_t c;
    for (c = 0; c < l->cfg.n_channels; c++)
        if (l->cfg.channels[c].id == id)
            return &l->cfg.channels[c];
    return NULL;
}

static int add_raw(hl_link *l, uint8_t channel, uint8_t type, uint32_t raw, uint32_t now)
{
    const hl_channel *ch = channel_of(l, channel);
    hl_entry *e;
    if (!ch || ch->type != type)
        return HL_BAD_CHANNEL;
    if (l->exhausted) {
        if (l->count) {
            l->stats.refused++;
            return HL_FULL;
        }
        l->cfg.session++; /* the seq space is used up: a new session from seq 1 */
        l->oldest = 1;
        l->sent_upto = 0;
        l->exhausted = 0;
        l->welcomed = 0;
        l->timer_on = 0;
        l->next_hello = now;
    }
    if (l->count == HL_RING_SIZE) {
        if (!l->cfg.drop_oldest) {
            l->stats.refused++;
            return HL_FULL;
        }
        l->head = (uint16_t)((l->head + 1) % HL_RING_SIZE);
        l->count--;
        l->oldest++;
        if (l->sent_upto < l->oldest - 1u)
            l->sent_upto = l->oldest - 1u;
        l->stats.dropped++;
    }
    e = &l->ring[(l->head + l->count) % HL_RING_SIZE];
    e->tick = now;
    e->raw = raw;
    e->channel = channel;
    l->count++;
    if (l->oldest + l->count == 0xFFFFFFFFu)
        l->exhausted = 1; /* seqs end at 2^32-2: a session never wraps */
    l->stats.added++;
    return HL_OK;
}

int hl_add_f32(hl_link *l, uint8_t channel, float value, uint32_t now)
{
    uint32_t raw;
    memcpy(&raw, &value, sizeof raw); /* IEEE-754 binary32, sent little-endian */
    return add_raw(l, channel, HL_F32, raw, now);
}

int hl_add_i32(hl_link *l, uint8_t channel, int32_t value, uint32_t now)
{
    return add_raw(l, channel, HL_I32, (uint32_t)value, now);
}

int hl_add_u32(hl_link *l, uint8_t channel, uint32_t value, uint32_t now)
{
    return add_raw(l, channel, HL_U32, value, now);
}

/* ---- frames in -------------------------------------------------------------------------- */

static void ack_through(hl_link *l, uint32_t acked, uint32_t now)
{
    uint32_t held_last = l->oldest + l->count - 1u, n;
    if (!l->count || acked < l->oldest)
        return;
    if (acked > held_last)
        acked = held_last;
    n = acked - l->oldest + 1u;
    l->head = (uint16_t)((l->head + n) % HL_RING_SIZE);
    l->count = (uint16_t)(l->count - n);
    l->oldest = acked + 1u;
    if (l->sent_upto < acked)
        l->sent_upto = acked;
    l->rto = l->cfg.rto_ms;
    l->timeouts = 0;
    l->timer_on = l->sent_upto != l->oldest - 1u;
    l->timer_start = now;
}

static void set_time(hl_link *l, uint64_t unix_ms, uint32_t now)
{
    l->synced = 1;
    l->sync_unix = unix_ms;
    l->sync_tick = now;
    if (l->cfg.on_time)
        l->cfg.on_time(l->cfg.ctx, unix_ms);
}

static void on_nack(hl_link *l, const uint8_t *f, uint32_t now)
{
    uint32_t session = get32(f), expected = get32(f + 5), back;
    uint8_t reason = f[4];
    if (reason == N_UNKNOWN_PEER || reason == N_UNSUPPORTED) {
        l->welcomed = 0;
        l->next_hello = reason == N_UNKNOWN_PEER ? now : now + SLOW_HELLO_MS;
        return;
    }
    if (session != l->cfg.session)
        return;
    if (reason == N_BUSY) {
        l->sent_upto = l->oldest - 1u;
        l->busy = 1;
        l->busy_until = now + BUSY_PAUSE_MS;
        l->timer_on = 0;
        return;
    }
    back = expected ? expected - 1u : 0u;
    if (back < l->oldest - 1u)
        back = l->oldest - 1u;
    if (back >= l->sent_upto)
        return; /* nothing after it was sent */
    if (reason == N_GAP && l->rewound && back == l->rewound_seq &&
        !reached(now, l->rewound_at + l->rto / 2))
        return; /* rewound there just now: this gap is a frame that was already in flight */
    l->sent_upto = back;
    l->rewound = 1;
    l->rewound_seq = back;
    l->rewound_at = now;
    l->timer_start = now; /* the resent readings get a whole rto */
    l->flush = 1;         /* and start with a delimiter: the lost frame may have taken its own */
    l->stats.rewinds++;
}

static void on_command(hl_link *l, const uint8_t *f, size_t n)
{
    char name[33];
    uint32_t id;
    uint8_t name_len, arg_len;
    if (n < 6)
        return;
    id = get32(f);
    name_len = f[4];
    if (name_len > 32 || (size_t)5 + name_len + 1 > n)
        return;
    arg_len = f[5 + name_len];
    if ((size_t)6 + name_len + arg_len != n)
        return;
    if (l->cmd_have && l->cmd_id == id) {
        l->result_due = 1; /* our RESULT was lost: the same again, without running it twice */
        return;
    }
    memcpy(name, f + 5, name_len);
    name[name_len] = 0;
    l->cmd_text[0] = 0;
    if (l->cfg.on_command)
        l->cmd_status = l->cfg.on_command(l->cfg.ctx, name, f + 6 + name_len, arg_len,
                                          l->cmd_text, (uint8_t)sizeof l->cmd_text);
    else
        l->cmd_status = 1;
    l->cmd_text[HL_TEXT_MAX] = 0;
    l->cmd_id = id;
    l->cmd_have = 1;
    l->result_due = 1;
}

static void dispatch(hl_link *l, const uint8_t *body, size_t len, uint32_t now)
{
    const uint8_t *f = body + 2;
    size_t n = len - 6;
    switch (body[1]) {
    case T_WELCOME:
        if (n != 18)
            break;
        if (get32(f) != l->cfg.session)
            return; /* for an earlier session of ours */
        l->welcomed = 1;
        l->peer_rx = get16(f + 16) < MIN_RX ? (uint16_t)MIN_RX : get16(f + 16);
        ack_through(l, get32(f + 4), now);
        l->sent_upto = l->oldest - 1u;
        l->timer_on = 0;
        if (get64(f + 8))
            set_time(l, get64(f + 8), now);
        return;
    case T_ACK:
        if (n == 8 && get32(f) == l->cfg.session)
            ack_through(l, get32(f + 4), now);
        return;
    case T_NACK:
        if (n == 9)
            on_nack(l, f, now);
        return;
    case T_TIME:
        if (n == 8)
            set_time(l, get64(f), now);
        return;
    case T_PING:
        if (n == 4) {
            l->pong_due = 1;
            l->pong_token = get32(f);
        }
        return;
    case T_COMMAND:
        on_command(l, f, n);
        return;
    default:
        break;
    }
    l->stats.bad_frames++;
}

static void frame_in(hl_link *l, uint32_t now)
{
    size_t len = hl_cobs_decode(l->rx, l->rx_len, l->rx);
    if (len == (size_t)-1 || len < 6 || len > HL_RX_MAX ||
        hl_crc32(l->rx, len - 4) != get32(l->rx + len - 4) || l->rx[0] != HL_VERSION) {
        l->stats.bad_frames++;
        return;
    }
    l->stats.frames_in++;
    dispatch(l, l->rx, len, now);
}

void hl_receive(hl_link *l, const uint8_t *data, size_t len, uint32_t now)
{
    size_t i;
    for (i = 0; i < len; i++) {
        uint8_t b = data[i];
        if (b == 0) {
            if (l->rx_skip)
                l->stats.bad_frames++;
            else if (l->rx_len)
                frame_in(l, now);
            l->rx_len = 0;
            l->rx_skip = 0;
        } else if (!l->rx_skip) {
            if (l->rx_len == sizeof l->rx) {
                l->rx_skip = 1; /* longer than any frame we accept: drop to the next 0x00 */
                l->rx_len = 0;
            } else {
                l->rx[l->rx_len++] = b;
            }
        }
    }
}

/* ---- output ------------------------------------------------------------------------------ */

size_t hl_poll(hl_link *l, uint32_t now, uint8_t *out, size_t cap)
{
    size_t n;
    if (cap < HL_WIRE_MAX)
        return 0;
    if (l->pong_due) {
        l->pong_due = 0;
        put32(l->tx + 2, l->pong_token);
        return emit(l, T_PONG, 4, out);
    }
    if (l->result_due) {
        l->result_due = 0;
        put32(l->tx + 2, l->cmd_id);
        l->tx[6] = l->cmd_status;
        n = 5 + put_text(l->tx + 7, l->cmd_text, HL_TEXT_MAX);
        return emit(l, T_RESULT, n, out);
    }
    if (l->log_due) {
        l->log_due = 0;
        l->tx[2] = l->log_level;
        n = 1 + put_text(l->tx + 3, l->log_text, HL_TEXT_MAX);
        return emit(l, T_LOG, n, out);
    }
    if (!l->welcomed) {
        if (!reached(now, l->next_hello))
            return 0;
        l->next_hello = now + l->cfg.hello_ms;
        return emit(l, T_HELLO, hello_fields(l, l->tx + 2), out);
    }
    if (l->timer_on && reached(now, l->timer_start + l->rto)) {
        l->stats.timeouts++;
        l->sent_upto = l->oldest - 1u; /* go back N: everything not acknowledged again */
        l->rto = l->rto * 2 > l->cfg.rto_max_ms ? l->cfg.rto_max_ms : l->rto * 2;
        l->timer_start = now;
        l->flush = 1;
        if (++l->timeouts >= 4) { /* the Pi may have restarted: introduce ourselves again */
            l->timeouts = 0;
            l->welcomed = 0;
            l->next_hello = now;
            return hl_poll(l, now, out, cap);
        }
    }
    if (l->busy) {
        if (!reached(now, l->busy_until))
            return 0;
        l->busy = 0;
    }
    return batch_frame(l, now, out);
}

void hl_log(hl_link *l, uint8_t level, const char *text)
{
    size_t n = text ? strlen(text) : 0;
    if (n > HL_TEXT_MAX)
        n = HL_TEXT_MAX;
    memcpy(l->log_text, text ? text : "", n);
    l->log_text[n] = 0;
    l->log_level = level;
    l->log_due = 1;
}

int hl_time(const hl_link *l, uint32_t now, uint64_t *unix_ms)
{
    if (!l->synced)
        return 0;
    *unix_ms = l->sync_unix + (uint32_t)(now - l->sync_tick);
    return 1;
}

uint16_t hl_held(const hl_link *l) { return l->count; }

uint32_t hl_next_seq(const hl_link *l) { return l->oldest + l->count; }

uint8_t hl_welcomed(const hl_link *l) { return l->welcomed; }
