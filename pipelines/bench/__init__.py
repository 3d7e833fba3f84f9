"""Benchmarks: attention, memory and model speed tables, and the device check."""
