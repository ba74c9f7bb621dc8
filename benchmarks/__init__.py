"""Benchmarks: measured speed, scale and privacy figures written as JSON (see README.md here)."""
