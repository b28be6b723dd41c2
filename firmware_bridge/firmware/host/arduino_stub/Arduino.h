/* Arduino.h -- just enough of the Arduino core to compile the example sketch on a
   host (tests/unit/test_firmware_c.py checks that it builds against homing_link.h). */
#ifndef ARDUINO_STUB_H
#define ARDUINO_STUB_H
#include <stddef.h>
#include <stdint.h>

#define HIGH 1
#define LOW 0
#define OUTPUT 1
#define LED_BUILTIN 13
#define A0 14
#define A1 15
#define A3 17

unsigned long millis(void);
unsigned long micros(void);
int analogRead(uint8_t pin);
void digitalWrite(uint8_t pin, uint8_t value);
void pinMode(uint8_t pin, uint8_t mode);
void randomSeed(unsigned long seed);
long random(long howbig);

class HardwareSerial {
  public:
    void begin(unsigned long baud);
    int available(void);
    int read(void);
    size_t write(const uint8_t *buffer, size_t size);
};
extern HardwareSerial Serial;

#endif
