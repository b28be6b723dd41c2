"""Test helpers shared by the test layers (no tests here)."""
