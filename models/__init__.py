"""Model definitions; the whole transformer lives in models/transformer.py."""
