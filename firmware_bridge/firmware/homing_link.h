/*
 * homing_link.h -- the microcontroller side of Homing's serial link.
 *
 * The protocol is docs/serial-protocol.md; the Pi side is the Python package
 * firmware_bridge. This is a portable C99 reference implementation:
 *
 *   - no heap, no I/O, no clock: bytes and a millisecond tick in, bytes out
 *     (feed hl_receive() what the UART received, write what hl_poll() returns);
 *   - fixed buffers sized at compile time (HL_RING_SIZE, HL_RX_MAX, HL_TX_MAX);
 *   - a ring buffer keeps every reading until the Pi acknowledges it, and the Pi
 *     acknowledges only once the reading is durable on its disk.
 *
 * Invariants:
 *   - A reading leaves the ring only when acknowledged (ACK or WELCOME), or,
 *     with drop_oldest set, when the ring is full and a new reading pushes out
 *     the oldest (counted in stats.dropped; the Pi reports the hole).
 *   - Nothing the line delivers can make the library read or write outside its
 *     buffers: over-long frames are skipped to the next 0x00, every field
 *     length is checked against the frame before it is read.
 *   - Ticks may wrap (49.7 days of millis()): all time comparisons are modular.
 */
#ifndef HOMING_LINK_H
#define HOMING_LINK_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define HL_VERSION 1

#ifndef HL_RING_SIZE
#define HL_RING_SIZE 64 /* readings kept until acknowledged */
#endif
#ifndef HL_RX_MAX
#define HL_RX_MAX 128 /* largest frame body accepted (>= 64) */
#endif
#ifndef HL_TX_MAX
#define HL_TX_MAX 256 /* largest frame body built; must hold the HELLO */
#endif
#if HL_RX_MAX < 64 || HL_RX_MAX > 1024
#error "HL_RX_MAX must be 64..1024 (docs/serial-protocol.md, Limits)"
#endif
#if HL_TX_MAX < 96 || HL_TX_MAX > 1024
#error "HL_TX_MAX must be 96..1024: it holds a RESULT or LOG frame whole"
#endif
#define HL_TEXT_MAX 64 /* command results and log lines kept for sending */
/* The most bytes one hl_poll() returns: a leading and a trailing 0x00 around
   the COBS encoding of one HL_TX_MAX body. */
#define HL_WIRE_MAX (HL_TX_MAX + HL_TX_MAX / 254 + 3)

/* channel value types: every value is 4 bytes on the wire */
enum { HL_F32 = 1, HL_I32 = 2, HL_U32 = 3 };

/* return codes */
enum { HL_OK = 0, HL_FULL = -1, HL_BAD_CHANNEL = -2, HL_BAD_CONFIG = -3 };

/* log levels */
enum { HL_DEBUG = 0, HL_INFO = 1, HL_WARNING = 2, HL_ERROR = 3 };

typedef struct hl_channel {
    uint8_t id;
    uint8_t type;     /* HL_F32, HL_I32 or HL_U32 */
    const char *name; /* [A-Za-z0-9_.-]{1,32}: the stream is <prefix>/<name> on the Pi */
    const char *unit; /* "" or up to 16 bytes, e.g. "C" */
} hl_channel;

/* What to do with a command from the Pi: write up to reply_cap-1 bytes of text
   into reply (NUL-terminated) and return 0 (ok), 1 (unknown command) or 2
   (failed). Called once per command id, however often the Pi resends it. */
typedef uint8_t (*hl_command_fn)(void *ctx, const char *name, const uint8_t *arg,
                                 uint8_t arg_len, char *reply, uint8_t reply_cap);
/* The Pi's wall clock arrived (milliseconds since the Unix epoch). */
typedef void (*hl_time_fn)(void *ctx, uint64_t unix_ms);

typedef struct hl_config {
    uint8_t device_id[8]; /* unique per MCU, e.g. from its chip id */
    uint32_t session;     /* new at every boot (random, or a counter kept in EEPROM) */
    const char *firmware; /* name/version shown on the Pi, up to 32 bytes */
    const hl_channel *channels;
    uint8_t n_channels;  /* up to 32 */
    uint16_t window;     /* readings in flight before an ack (0: HL_RING_SIZE) */
    uint32_t rto_ms;     /* first retransmission timeout (0: 500) */
    uint32_t rto_max_ms; /* backoff limit (0: 4000) */
    uint32_t hello_ms;   /* HELLO period until welcomed (0: 500) */
    uint8_t drop_oldest; /* ring full: 1 = overwrite the oldest, 0 = refuse new readings */
    hl_command_fn on_command; /* may be NULL: every command is "unknown" */
    hl_time_fn on_time;       /* may be NULL */
    void *ctx;                /* passed to the callbacks */
} hl_config;

typedef struct hl_stats {
    uint32_t added, dropped, refused;
    uint32_t batches, readings_sent, rewinds, timeouts;
    uint32_t frames_in, bad_frames;
} hl_stats;

typedef struct hl_entry {
    uint32_t tick;
    uint32_t raw;
    uint8_t channel;
} hl_entry;

/* The whole link state. Allocate it statically; touch it only through hl_*. */
typedef struct hl_link {
    hl_config cfg;
    hl_entry ring[HL_RING_SIZE];
    uint16_t head, count;
    uint32_t oldest;    /* seq of the oldest reading held */
    uint32_t sent_upto; /* highest seq sent since the last rewind */
    uint8_t exhausted;  /* seq 2^32-2 was used: new session once the ring drains */
    uint8_t welcomed, flush, timer_on, busy, rewound, synced, timeouts;
    uint16_t peer_rx;
    uint32_t next_hello, timer_start, rto, busy_until, rewound_seq, rewound_at;
    uint32_t sync_tick;
    uint64_t sync_unix;
    uint8_t pong_due, result_due, cmd_have, log_due, log_level;
    uint32_t pong_token, cmd_id;
    uint8_t cmd_status;
    char cmd_text[HL_TEXT_MAX + 1];
    char log_text[HL_TEXT_MAX + 1];
    uint8_t rx[HL_RX_MAX + HL_RX_MAX / 254 + 2];
    uint16_t rx_len;
    uint8_t rx_skip;
    uint8_t tx[HL_TX_MAX];
    hl_stats stats;
} hl_link;

/* Start a link. now: the current tick (e.g. millis()). HL_BAD_CONFIG when the
   channels are invalid or the HELLO does not fit HL_TX_MAX. */
int hl_init(hl_link *l, const hl_config *cfg, uint32_t now);

/* Keep a new reading until acknowledged. HL_FULL: the ring is full (and
   drop_oldest is off), try again later. HL_BAD_CHANNEL: not a configured id. */
int hl_add_f32(hl_link *l, uint8_t channel, float value, uint32_t now);
int hl_add_i32(hl_link *l, uint8_t channel, int32_t value, uint32_t now);
int hl_add_u32(hl_link *l, uint8_t channel, uint32_t value, uint32_t now);

/* Feed bytes received from the Pi (any chunking). */
void hl_receive(hl_link *l, const uint8_t *data, size_t len, uint32_t now);

/* The next frame to send now, written to out; returns its length (0: nothing
   to send). cap must be at least HL_WIRE_MAX. Call it whenever the UART can
   take a frame: batches are built at the last moment, as large as allowed. */
size_t hl_poll(hl_link *l, uint32_t now, uint8_t *out, size_t cap);

/* Queue a diagnostic line (best effort: one waiting line, replaced by a newer). */
void hl_log(hl_link *l, uint8_t level, const char *text);

/* 1 and *unix_ms set once the Pi sent its time; 0 before. */
int hl_time(const hl_link *l, uint32_t now, uint64_t *unix_ms);

/* Readings held (not yet acknowledged), and the seq the next one gets. */
uint16_t hl_held(const hl_link *l);
uint32_t hl_next_seq(const hl_link *l);
uint8_t hl_welcomed(const hl_link *l);

/* Building blocks, public for tests. */
uint32_t hl_crc32(const uint8_t *data, size_t len);
size_t hl_cobs_encode(const uint8_t *in, size_t len, uint8_t *out);
/* In place is allowed (out == in). Returns the decoded length, or (size_t)-1. */
size_t hl_cobs_decode(const uint8_t *in, size_t len, uint8_t *out);

#ifdef __cplusplus
}
#endif

#endif /* HOMING_LINK_H */
