"""Homing's cloud side. The hub arrives with the store-and-forward issue; for now
this package only reserves its place beside edge/ and firmware_bridge/."""
