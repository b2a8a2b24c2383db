"""Decoding: what a model reads from a database, and incremental generation with retrieval."""
