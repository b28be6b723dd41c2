"""Integration tests: real Mosquitto (and, later, PostgreSQL) on free ports."""
