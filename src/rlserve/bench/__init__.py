"""Benchmarks behind ``rlserve bench`` and the scripts in ``benchmarks/``."""
