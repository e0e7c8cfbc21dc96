"""Helpers the tests share: reference samplers, distribution checks, a trained BPE tokenizer,
structured-output cases, bad request bodies, the distributed probe (run by each rank)."""
