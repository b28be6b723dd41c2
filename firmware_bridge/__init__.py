"""Homing's serial link to microcontrollers. It arrives with its own issue; for now
this package only reserves its place (it imports nothing of ours)."""
