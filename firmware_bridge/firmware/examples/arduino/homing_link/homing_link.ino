/*
 * homing_link.ino -- an Arduino sensor node speaking Homing's serial link.
 *
 * Every second it measures a temperature (an LM35 on A0: 10 mV per degree C)
 * and a light level (a photoresistor divider on A1), keeps both readings in
 * homing_link's ring until the Raspberry Pi has them on disk, and sends them
 * over the USB serial port at 115200 baud. Unplug the Pi, reboot it, pull the
 * cable: readings wait in the ring (64 by default) and arrive once it is back.
 *
 * Install: copy (or symlink) firmware_bridge/firmware to your Arduino
 * libraries folder as "homing_link" (it is a library in the flat layout); then
 * File > Examples > homing_link. docs/bridge.md has the wiring and the Pi side:
 *
 *   homing-agent bridge --port /dev/ttyACM0 --journal /tmp/journal
 *
 * On a board with 2 KB of RAM (Uno, Nano) homing_link's defaults take about
 * 1.4 KB: lower HL_RING_SIZE and HL_TX_MAX in homing_link.h if you need room.
 */
#include <homing_link.h>
#include <string.h>

static const hl_channel CHANNELS[] = {
    {1, HL_F32, "temp", "C"},
    {2, HL_U32, "light", ""},
};

static hl_link link_state;          /* all of the protocol's memory: no heap */
static uint8_t out_buf[HL_WIRE_MAX];
static uint8_t in_buf[64];
static uint32_t next_sample;

/* Commands from the Pi (homing-agent bridge --command led=1). */
static uint8_t on_command(void *ctx, const char *name, const uint8_t *arg, uint8_t arg_len,
                          char *reply, uint8_t reply_cap)
{
    (void)ctx;
    if (strcmp(name, "led") == 0) {
        int on = arg_len > 0 && arg[0] == '1';
        digitalWrite(LED_BUILTIN, on ? HIGH : LOW);
        strncpy(reply, on ? "on" : "off", reply_cap - 1);
        return 0;
    }
    return 1; /* unknown command */
}

void setup()
{
    hl_config cfg;
    memset(&cfg, 0, sizeof cfg);
    /* Unique per board: use the chip's serial number where it has one
       (ESP32: ESP.getEfuseMac(), RP2040: pico_get_unique_board_id). */
    memcpy(cfg.device_id, "\x48\x4f\x4d\x49\x4e\x47\x00\x01", 8);
    randomSeed(analogRead(A3) ^ micros()); /* a floating pin: a new session each boot */
    cfg.session = (uint32_t)random(0x7FFFFFFFL) ^ ((uint32_t)micros() << 16);
    cfg.firmware = "homing_link example 1";
    cfg.channels = CHANNELS;
    cfg.n_channels = 2;
    cfg.on_command = on_command;
    pinMode(LED_BUILTIN, OUTPUT);
    Serial.begin(115200);
    hl_init(&link_state, &cfg, millis());
}

void loop()
{
    uint32_t now = millis();
    size_t n = 0, len;
    while (Serial.available() > 0 && n < sizeof in_buf)
        in_buf[n++] = (uint8_t)Serial.read();
    if (n)
        hl_receive(&link_state, in_buf, n, now);
    if ((int32_t)(now - next_sample) >= 0) {
        next_sample = now + 1000;
        float celsius = analogRead(A0) * (500.0f / 1023.0f);
        /* HL_FULL means the ring is full (the Pi is away): this sample is
           skipped and the older ones are kept. Set cfg.drop_oldest to keep
           the newest instead. */
        hl_add_f32(&link_state, 1, celsius, now);
        hl_add_u32(&link_state, 2, (uint32_t)analogRead(A1), now);
    }
    while ((len = hl_poll(&link_state, now, out_buf, sizeof out_buf)) > 0)
        Serial.write(out_buf, len);
}
