"""Executor service: cache engine, paged model, attention backends, sampler."""
