"""Evaluation: the passkey retrieval test (``memlm.eval.passkey``)."""
