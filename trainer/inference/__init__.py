"""Decoding: loading a model to use, prefill and decode against a KV cache, sampling, streaming text, and the
flags generate and chat share."""
