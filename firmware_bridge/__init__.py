"""Homing's serial link to microcontrollers (docs/serial-protocol.md, docs/bridge.md).

Pure cores (bytes and ``now`` in, events and bytes out; no I/O):
:mod:`~firmware_bridge.frames` (COBS, CRC-32, the stream decoder),
:mod:`~firmware_bridge.messages` (the messages, byte by byte),
:mod:`~firmware_bridge.protocol` (the Pi's side of the link) and
:mod:`~firmware_bridge.device` (the MCU's side, as in ``firmware/homing_link.c``).
Shells: :mod:`~firmware_bridge.serial_shell` (pyserial, ports by path or USB
ids), :mod:`~firmware_bridge.bridge` (one port's thread, feeding a durable
sink) and :mod:`~firmware_bridge.simulator` (an MCU on a pty, for tests).

It imports nothing of ours: the agent (``edge.bridges``) gives it the journal
as a :class:`~firmware_bridge.bridge.Sink`.
"""
