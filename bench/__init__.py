"""Benchmarks behind `make bench`: each compares Tuneship with a baseline in the same run."""
