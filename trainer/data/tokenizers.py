"""Tokenizers: bytes, a Hugging Face `tokenizers` JSON file, or a SentencePiece model file.

`config.data.tokenizer` is 'byte', a path ending in .json, or a path ending in .model. Each tokenizer
knows its vocabulary size and the id it puts after every document (EOS).
"""

from __future__ import annotations

import hashlib
import os
from typing import Protocol

import numpy as np

from trainer.errors import ConfigError

# Tried in order when config.data.eos_token is empty and the tokenizer file names no EOS of its own.
COMMON_EOS_TOKENS = ('<|endoftext|>', '</s>', '<eos>', '<|end_of_text|>')


class Tokenizer(Protocol):
    """What the pipeline needs of a tokenizer."""

    name: str  # as given in config.data.tokenizer
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: np.ndarray) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255; byte 0 (NUL, absent from text) ends each document."""

    name = 'byte'
    vocab_size = 256
    eos_id = 0

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: np.ndarray) -> str:
        return np.asarray(ids, dtype=np.uint8).tobytes().decode('utf-8', errors='replace')


class HuggingFaceTokenizer:
    """A `tokenizers` JSON file (tokenizer.json of a Hugging Face model, or scripts/train_tokenizer.py's)."""

    def __init__(self, path: str, eos_token: str):
        import tokenizers  # imported here: only runs that use one pay for it

        self.name = path
        self._tokenizer = tokenizers.Tokenizer.from_file(path)
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        candidates = (eos_token,) if eos_token else COMMON_EOS_TOKENS
        ids = [self._tokenizer.token_to_id(token) for token in candidates]
        found = [i for i in ids if i is not None]
        if not found:
            raise ConfigError(
                f'the tokenizer {path!r} has no end-of-document token among {candidates}: '
                'set config.data.eos_token to one it has.'
            )
        self.eos_id = found[0]

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids: np.ndarray) -> str:
        return self._tokenizer.decode([int(i) for i in ids])


class SentencePieceTokenizer:
    """A SentencePiece .model file; its own EOS id, or config.data.eos_token's."""

    def __init__(self, path: str, eos_token: str):
        import sentencepiece

        self.name = path
        self._processor = sentencepiece.SentencePieceProcessor(model_file=path)
        self.vocab_size = self._processor.get_piece_size()
        self.eos_id = self._processor.piece_to_id(eos_token) if eos_token else self._processor.eos_id()
        if self.eos_id < 0 or (eos_token and self._processor.id_to_piece(self.eos_id) != eos_token):
            raise ConfigError(
                f'the SentencePiece model {path!r} has no end-of-document token'
                f'{" " + repr(eos_token) if eos_token else ""}: set config.data.eos_token to one of its pieces.'
            )

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._processor.encode(text), dtype=np.int32)

    def decode(self, ids: np.ndarray) -> str:
        return self._processor.decode([int(i) for i in ids])


def make_tokenizer(spec: str, eos_token: str = '') -> Tokenizer:
    """The tokenizer named by `config.data.tokenizer`."""
    if spec == 'byte':
        return ByteTokenizer()
    if spec.endswith(('.json', '.model')):
        if not os.path.isfile(spec):
            raise ConfigError(f'config.data.tokenizer={spec!r} is not a file: give the path of a tokenizer file.')
        if spec.endswith('.json'):
            return HuggingFaceTokenizer(spec, eos_token)
        return SentencePieceTokenizer(spec, eos_token)
    raise ConfigError(
        f"config.data.tokenizer={spec!r} is not known: use 'byte', a tokenizers .json file or a SentencePiece "
        '.model file.'
    )


def fingerprint(spec: str) -> str:
    """Identifies a tokenizer across machines: 'byte', or the sha256 of its file."""
    if spec == 'byte':
        return 'byte'
    with open(spec, 'rb') as f:
        return 'sha256:' + hashlib.sha256(f.read()).hexdigest()
