"""Evaluation: bits per byte with and without retrieval, the overlap table, near-duplicate
filtering, the lm-evaluation-harness backend."""
