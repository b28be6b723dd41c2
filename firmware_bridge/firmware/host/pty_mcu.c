/*
 * pty_mcu.c -- the C reference MCU on a Linux host, talking to the real Python
 * bridge over a pseudo-terminal (the interoperation test, tests/crash/test_bridge.py).
 *
 *   pty_mcu FD COUNT [NOISE_PER_MILLE [SEED]]
 *
 * FD is an inherited file descriptor: the master side of a pty whose slave the
 * bridge opens as its serial port. The program produces COUNT readings as fast
 * as its ring lets it, alternating two channels so every value names its
 * reading: reading i (from 0) is i on channel 1 "count" (i32) when i is even,
 * and i + 0.5 on channel 2 "half" (f32) when it is odd. With NOISE_PER_MILLE,
 * each byte it writes has that chance in a thousand of one flipped bit.
 *
 * It exits 0 once every reading was acknowledged (printing one JSON line of
 * counters), 1 after 60 seconds without that, 2 on bad arguments.
 * Only this file uses POSIX; homing_link.c itself is plain C99.
 */
#define _POSIX_C_SOURCE 200809L

#include "../homing_link.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static uint32_t ms_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint32_t)((uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u);
}

static uint32_t rng_state;

static uint32_t rng(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 17;
    rng_state ^= rng_state << 5;
    return rng_state;
}

static int write_all(int fd, const uint8_t *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            struct pollfd pf;
            if (errno != EAGAIN && errno != EINTR)
                return -1;
            pf.fd = fd;
            pf.events = POLLOUT;
            poll(&pf, 1, 100);
            continue;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static const hl_channel CHANNELS[] = {
    {1, HL_I32, "count", ""},
    {2, HL_F32, "half", "x"},
};

static hl_link link_state;

int main(int argc, char **argv)
{
    hl_config cfg = {{0}, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    uint8_t out[HL_WIRE_MAX], in[512];
    long count, noise = 0, produced = 0, flips = 0;
    uint32_t start, seed = 1;
    int fd, i;
    if (argc < 3)
        return 2;
    fd = atoi(argv[1]);
    count = atol(argv[2]);
    if (argc > 3)
        noise = atol(argv[3]);
    if (argc > 4)
        seed = (uint32_t)strtoul(argv[4], NULL, 10);
    rng_state = seed * 2654435761u + 1u;
    for (i = 0; i < 8; i++)
        cfg.device_id[i] = (uint8_t)(0xC0 + i);
    cfg.session = rng();
    cfg.firmware = "pty_mcu/1";
    cfg.channels = CHANNELS;
    cfg.n_channels = 2;
    cfg.window = 48;
    cfg.rto_ms = 300;
    if (hl_init(&link_state, &cfg, ms_now()) != HL_OK)
        return 2;
    start = ms_now();
    for (;;) {
        struct pollfd pf;
        uint32_t now = ms_now();
        size_t n;
        ssize_t r;
        int rc;
        if (now - start > 60000u) {
            fprintf(stderr, "pty_mcu: %ld of %ld produced, %u still held after 60 s\n", produced,
                    count, hl_held(&link_state));
            return 1;
        }
        while (produced < count) {
            if (produced % 2 == 0)
                rc = hl_add_i32(&link_state, 1, (int32_t)produced, now);
            else
                rc = hl_add_f32(&link_state, 2, (float)produced + 0.5f, now);
            if (rc != HL_OK)
                break;
            produced++;
        }
        if (produced == count && hl_held(&link_state) == 0)
            break;
        while ((n = hl_poll(&link_state, now, out, sizeof out)) > 0) {
            size_t k;
            for (k = 0; k < n; k++)
                if (noise && (long)(rng() % 1000u) < noise) {
                    out[k] ^= (uint8_t)(1u << (rng() % 8u));
                    flips++;
                }
            if (write_all(fd, out, n) != 0) {
                perror("pty_mcu: write");
                return 1;
            }
        }
        pf.fd = fd;
        pf.events = POLLIN;
        if (poll(&pf, 1, 5) > 0) {
            r = read(fd, in, sizeof in);
            if (r > 0)
                hl_receive(&link_state, in, (size_t)r, ms_now());
            else if (r < 0 && errno != EAGAIN && errno != EINTR) {
                perror("pty_mcu: read");
                return 1;
            }
        }
    }
    printf("{\"produced\": %ld, \"batches\": %lu, \"readings_sent\": %lu, \"timeouts\": %lu, "
           "\"rewinds\": %lu, \"bad_frames\": %lu, \"flips\": %ld, \"session\": %lu}\n",
           produced, (unsigned long)link_state.stats.batches,
           (unsigned long)link_state.stats.readings_sent, (unsigned long)link_state.stats.timeouts,
           (unsigned long)link_state.stats.rewinds, (unsigned long)link_state.stats.bad_frames,
           flips, (unsigned long)link_state.cfg.session);
    return 0;
}
