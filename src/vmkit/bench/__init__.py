"""Benchmarks that run inside a machine (``vmkit bench``)."""
