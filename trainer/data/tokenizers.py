"""Tokenizers: bytes, a Hugging Face `tokenizers` JSON file or model folder, or a SentencePiece model file.

`config.data.tokenizer` is 'byte', a path ending in .json, a Hugging Face model folder (its
tokenizer.json and tokenizer_config.json), or a path ending in .model. Each tokenizer knows its
vocabulary size and the id it puts after every document (EOS); a Hugging Face tokenizer also puts
whatever its post-processor adds (Llama's BOS) before it, exactly as transformers' tokenizer does.
"""

from __future__ import annotations

import hashlib
import json
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
    bos_id: int | None  # the id put before each document, if any

    def encode(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
        """Ids of `text`; without special tokens for text that already holds them (a rendered chat template)."""
        ...

    def decode(self, ids: np.ndarray) -> str: ...

    def byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes of text each id stands for (0 for EOS and other special tokens), for bits per byte."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255; byte 0 (NUL, absent from text) ends each document."""

    name = 'byte'
    vocab_size = 256
    eos_id = 0
    bos_id = None

    def encode(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
        return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: np.ndarray) -> str:
        return np.asarray(ids, dtype=np.uint8).tobytes().decode('utf-8', errors='replace')

    def byte_lengths(self) -> np.ndarray:
        lengths = np.ones(self.vocab_size, np.int32)
        lengths[self.eos_id] = 0
        return lengths


def _token_text(value: str | dict | None) -> str:
    """A special token as tokenizer_config.json writes it: a string or {'content': ...}."""
    return value.get('content', '') if isinstance(value, dict) else value or ''


class HuggingFaceTokenizer:
    """A `tokenizers` JSON file (tokenizer.json of a Hugging Face model, or scripts/train_tokenizer.py's).

    Text is encoded with the file's post-processor, as transformers encodes it: a Llama tokenizer's
    BOS comes first, never twice. The EOS is config.data.eos_token, else tokenizer_config.json's beside
    the file, else a common one the file has.
    """

    def __init__(self, path: str, eos_token: str):
        import tokenizers  # imported here: only runs that use one pay for it

        self.name = path
        self._tokenizer = tokenizers.Tokenizer.from_file(path)
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        settings_file = os.path.join(os.path.dirname(path), 'tokenizer_config.json')
        settings = {}
        if os.path.isfile(settings_file):
            with open(settings_file, encoding='utf-8') as f:
                settings = json.load(f)
        own = _token_text(settings.get('eos_token'))
        candidates = (eos_token,) if eos_token else ((own,) if own else ()) + COMMON_EOS_TOKENS
        ids = [self._tokenizer.token_to_id(token) for token in candidates]
        found = [i for i in ids if i is not None]
        if not found:
            raise ConfigError(
                f'the tokenizer {path!r} has no end-of-document token among {candidates}: '
                'set config.data.eos_token to one it has.'
            )
        self.eos_id = found[0]
        added = self._tokenizer.encode('', add_special_tokens=True).ids  # what the post-processor adds
        self.bos_id = added[0] if added else self._tokenizer.token_to_id(_token_text(settings.get('bos_token')))

    def encode(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids, dtype=np.int32)

    def decode(self, ids: np.ndarray) -> str:
        return self._tokenizer.decode([int(i) for i in ids])

    def byte_lengths(self) -> np.ndarray:
        """Exact for byte-level BPE (each character of a token is one byte); else each token decoded alone."""
        import tokenizers

        byte_level = isinstance(self._tokenizer.decoder, tokenizers.decoders.ByteLevel)
        special = {i for i, token in self._tokenizer.get_added_tokens_decoder().items() if token.special}
        lengths = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            token = self._tokenizer.id_to_token(i)
            if token is not None and i not in special:
                lengths[i] = len(token) if byte_level else len(self._tokenizer.decode([i]).encode())
        return lengths


class SentencePieceTokenizer:
    """A SentencePiece .model file; its own EOS id, or config.data.eos_token's."""

    def __init__(self, path: str, eos_token: str):
        import sentencepiece

        self.name = path
        self.bos_id = None
        self._processor = sentencepiece.SentencePieceProcessor(model_file=path)
        self.vocab_size = self._processor.get_piece_size()
        self.eos_id = self._processor.piece_to_id(eos_token) if eos_token else self._processor.eos_id()
        if self.eos_id < 0 or (eos_token and self._processor.id_to_piece(self.eos_id) != eos_token):
            raise ConfigError(
                f'the SentencePiece model {path!r} has no end-of-document token'
                f'{" " + repr(eos_token) if eos_token else ""}: set config.data.eos_token to one of its pieces.'
            )

    def encode(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
        return np.asarray(self._processor.encode(text), dtype=np.int32)

    def decode(self, ids: np.ndarray) -> str:
        return self._processor.decode([int(i) for i in ids])

    def byte_lengths(self) -> np.ndarray:
        """Each piece decoded alone; control pieces (BOS, EOS) count nothing."""
        return np.array(
            [
                0 if self._processor.is_control(i) else len(self._processor.decode([i]).encode())
                for i in range(self.vocab_size)
            ],
            np.int32,
        )


def make_tokenizer(spec: str, eos_token: str = '') -> Tokenizer:
    """The tokenizer named by `config.data.tokenizer`."""
    if spec == 'byte':
        return ByteTokenizer()
    if os.path.isdir(spec):  # a Hugging Face model folder
        if not os.path.isfile(os.path.join(spec, 'tokenizer.json')):
            raise ConfigError(
                f'config.data.tokenizer={spec!r} is a folder without tokenizer.json: give a Hugging Face model '
                'folder that has one, or the path of a tokenizer file.'
            )
        return HuggingFaceTokenizer(os.path.join(spec, 'tokenizer.json'), eos_token)
    if spec.endswith(('.json', '.model')):
        if not os.path.isfile(spec):
            raise ConfigError(f'config.data.tokenizer={spec!r} is not a file: give the path of a tokenizer file.')
        if spec.endswith('.json'):
            return HuggingFaceTokenizer(spec, eos_token)
        return SentencePieceTokenizer(spec, eos_token)
    raise ConfigError(
        f"config.data.tokenizer={spec!r} is not known: use 'byte', a tokenizers .json file, a Hugging Face model "
        'folder or a SentencePiece .model file.'
    )


def fingerprint(spec: str) -> str:
    """Identifies a tokenizer across machines: 'byte', or the sha256 of its file."""
    if spec == 'byte':
        return 'byte'
    if os.path.isdir(spec):
        spec = os.path.join(spec, 'tokenizer.json')
    with open(spec, 'rb') as f:
        return 'sha256:' + hashlib.sha256(f.read()).hexdigest()
