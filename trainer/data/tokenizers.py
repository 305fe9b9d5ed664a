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
    stop_ids: tuple[int, ...]  # ids that end a reply: the EOS, and a model folder's other end-of-turn ids

    def encode(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
        """Ids of `text`; without special tokens for text that already holds them (a rendered chat template)."""
        ...

    def encode_with_ends(self, text: str, add_special_tokens: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Ids of `text` and where each token's text ends: a byte offset into text's UTF-8, never decreasing.

        What a token stands for runs from where the one before it ended to its own end, so that spaces a
        tokenizer folds into the next piece (SentencePiece's '▁') are counted once; tokens the tokenizer adds
        (BOS) stand for nothing.
        """
        ...

    def decode(self, ids: np.ndarray) -> str: ...

    def token_text(self, token_id: int) -> str:
        """One token's text with special tokens written out ('<s>'), as transformers' decode gives it."""
        ...


def prefix_id(tokenizer: Tokenizer) -> int:
    """The token that stands for an empty context (lm-evaluation-harness's, an empty prompt's): the BOS, else EOS."""
    return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id


def token_bytes(ends: np.ndarray, text_bytes: int) -> np.ndarray:
    """The UTF-8 bytes each token stands for, from encode_with_ends' `ends`: they add up to `text_bytes`
    exactly (text after the last token's end, such as spaces a tokenizer strips, counts with the last token)."""
    counts = np.diff(np.concatenate([[0], ends])).astype(np.int32)
    if len(counts):
        counts[-1] += text_bytes - (int(ends[-1]) if len(ends) else 0)
    return counts


def _byte_offsets(text: str) -> np.ndarray:
    """The UTF-8 byte offset of each character boundary of `text` (len(text) + 1 of them)."""
    if text.isascii():
        return np.arange(len(text) + 1)
    codes = np.frombuffer(text.encode('utf-32-le'), np.uint32)
    sizes = 1 + (codes >= 0x80).astype(np.int64) + (codes >= 0x800) + (codes >= 0x10000)
    return np.concatenate([[0], np.cumsum(sizes)])


def bytes_of_ids(tokenizer: Tokenizer, ids: np.ndarray) -> np.ndarray:
    """The UTF-8 bytes each of a document's ids stands for, when only the ids are at hand (prepared shards).

    The ids are decoded and the text encoded again: where that gives the same ids (almost always), the counts
    are exact; else the document's bytes are shared out in proportion to each id decoded alone.
    """
    text = tokenizer.decode(ids)
    again, ends = tokenizer.encode_with_ends(text, add_special_tokens=False)
    total = len(text.encode())
    if np.array_equal(again, ids):
        return token_bytes(ends, total)
    alone = np.array([len(tokenizer.decode(ids[i : i + 1]).encode()) for i in range(len(ids))], np.float64)
    shares = np.floor(alone / max(alone.sum(), 1.0) * total).astype(np.int32)
    if len(shares):
        shares[-1] += total - shares.sum()
    return shares


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, the alphabet of byte-level BPE (`tokenizers` uses it, but does
    not expose the byte -> character table; transformers' copy is not a dependency)."""
    kept = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in kept else next(extra)) for b in range(256)}


def write_byte_tokenizer_json(path: str) -> None:
    """ByteTokenizer as a `tokenizers` file that transformers loads: byte-level BPE without merges, ids 0-255 the
    bytes, so that an exported byte-level model works wherever tokenizer.json is read. Its EOS, id 0 (the NUL
    byte), is named by its stand-in character, 'Ā'."""
    import tokenizers

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    tokenizer.save(path)


BYTE_EOS_TOKEN = _bytes_to_unicode()[0]


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255; byte 0 (NUL, absent from text) ends each document."""

    name = 'byte'
    vocab_size = 256
    eos_id = 0
    bos_id = None
    stop_ids = (0,)

    def encode(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
        return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int32)

    def encode_with_ends(self, text: str, add_special_tokens: bool = True) -> tuple[np.ndarray, np.ndarray]:
        ids = self.encode(text)
        return ids, np.arange(1, len(ids) + 1)

    def decode(self, ids: np.ndarray) -> str:
        return np.asarray(ids, dtype=np.uint8).tobytes().decode('utf-8', errors='replace')

    def token_text(self, token_id: int) -> str:
        return self.decode(np.array([token_id]))


def _token_text(value: str | dict | None) -> str:
    """A special token as tokenizer_config.json writes it: a string or {'content': ...}."""
    return value.get('content', '') if isinstance(value, dict) else value or ''


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding='utf-8') as f:
        found = json.load(f)
    return found if isinstance(found, dict) else {}


def special_tokens(folder: str) -> dict:
    """A model folder's special tokens as transformers 5 reads them: tokenizer_config.json's `*_token` entries,
    overridden by special_tokens_map.json's only when tokenizer_config.json has no `added_tokens_decoder`
    (a legacy folder: the first Llama-3 Instruct release names its <|eot_id|> EOS there; today's Llama-3
    folders have the field, and transformers takes tokenizer_config.json's EOS, ignoring the map's)."""
    settings = _read_json(os.path.join(folder, 'tokenizer_config.json'))
    tokens = {key: _token_text(value) for key, value in settings.items() if key.endswith('_token')}
    if 'added_tokens_decoder' not in settings:  # transformers' from_pretrained reads the map in this case alone
        mapped = _read_json(os.path.join(folder, 'special_tokens_map.json'))
        tokens.update({key: _token_text(value) for key, value in mapped.items() if isinstance(value, (str, dict))})
    return {key: value for key, value in tokens.items() if value}


def folder_stop_ids(folder: str, eos_id: int) -> tuple[int, ...]:
    """The EOS and every `eos_token_id` of the folder's generation_config.json and config.json (an id or a list,
    as Llama-3.x Instruct's <|end_of_text|>, <|eom_id|>, <|eot_id|>): each ends a reply, as in transformers."""
    ids = [eos_id]
    for name in ('generation_config.json', 'config.json'):
        value = _read_json(os.path.join(folder, name)).get('eos_token_id')
        for i in value if isinstance(value, list) else [value]:
            if isinstance(i, int) and not isinstance(i, bool) and i not in ids:
                ids.append(i)
    return tuple(ids)


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
        folder = os.path.dirname(path)
        settings = special_tokens(folder)
        own = settings.get('eos_token', '')
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
        self.bos_id = added[0] if added else self._tokenizer.token_to_id(settings.get('bos_token', ''))
        self.stop_ids = folder_stop_ids(folder, self.eos_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids, dtype=np.int32)

    def encode_with_ends(self, text: str, add_special_tokens: bool = True) -> tuple[np.ndarray, np.ndarray]:
        encoding = self._tokenizer.encode(text, add_special_tokens=add_special_tokens)
        # Offsets are characters of `text`; tokens the post-processor adds have (0, 0).
        char_ends = np.array([end for _, end in encoding.offsets], np.int64)
        ends = np.maximum.accumulate(_byte_offsets(text)[char_ends]) if len(char_ends) else char_ends
        return np.asarray(encoding.ids, dtype=np.int32), ends

    def decode(self, ids: np.ndarray) -> str:
        return self._tokenizer.decode([int(i) for i in ids])

    def token_text(self, token_id: int) -> str:
        return self._tokenizer.decode([int(token_id)], skip_special_tokens=False)


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
        self.stop_ids = folder_stop_ids(os.path.dirname(path), self.eos_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
        return np.asarray(self._processor.encode(text), dtype=np.int32)

    def encode_with_ends(self, text: str, add_special_tokens: bool = True) -> tuple[np.ndarray, np.ndarray]:
        try:
            pieces = self._processor.encode(text, return_type='proto').pieces
        except (TypeError, ValueError):  # sentencepiece before return_type
            pieces = self._processor.encode(text, out_type='immutable_proto').pieces
        # `end` is a byte offset into the UTF-8 text (SentencePiece works on bytes).
        ends = np.maximum.accumulate(np.array([piece.end for piece in pieces], np.int64)) if pieces else np.zeros(0)
        return np.array([piece.id for piece in pieces], np.int32), ends.astype(np.int64)

    def decode(self, ids: np.ndarray) -> str:
        return self._processor.decode([int(i) for i in ids])

    def token_text(self, token_id: int) -> str:
        # decode drops control pieces (<s>, </s>); transformers writes them out.
        if self._processor.is_control(int(token_id)):
            return self._processor.id_to_piece(int(token_id))
        return self._processor.decode([int(token_id)])


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
