"""Benchmarks behind ``mopd bench``: each prints a ratio against a reference run in-process."""
