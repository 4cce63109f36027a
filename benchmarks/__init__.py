"""Benchmarks that run against live pagedserve services (``pagedserve bench ...``)."""
