"""Trains a byte-level BPE tokenizer on local files with the Hugging Face `tokenizers` library.

Usage:
  python scripts/train_tokenizer.py --inputs 'corpus/*.txt' --vocab_size 8192 --output tokenizer.json

Documents are read the way training reads them (same formats and options); the result has an
'<|endoftext|>' token, which the trainer uses as end-of-document. Use it with
--config.data.tokenizer=tokenizer.json and a config.model.vocab_size at least --vocab_size.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import types

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from trainer.data import sources  # noqa: E402
from trainer.errors import ConfigError  # noqa: E402

EOS_TOKEN = '<|endoftext|>'


def documents(files: list[str], options: types.SimpleNamespace):
    for path in files:
        yield from sources.FileDocuments(path, options)


def train(files: list[str], vocab_size: int, output: str, options: types.SimpleNamespace) -> int:
    """Trains and saves the tokenizer; returns its vocabulary size."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = tokenizers.Tokenizer(models.BPE())
    # Byte-level: every string encodes, so no unknown token is needed.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tokenizer.train_from_iterator(documents(files, options), trainer=trainer)
    tokenizer.save(output)
    return tokenizer.get_vocab_size()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--inputs', required=True, help='comma-separated paths or globs')
    parser.add_argument('--vocab_size', type=int, default=8192)
    parser.add_argument('--output', required=True, help='where to write the tokenizer .json')
    parser.add_argument('--format', default='auto', choices=sources.FORMATS[:-1])
    parser.add_argument('--text_field', default='text')
    parser.add_argument('--sample_by', default='paragraph', choices=sources.SAMPLE_BY)
    args = parser.parse_args()
    options = types.SimpleNamespace(
        format=args.format, text_field=args.text_field, sample_by=args.sample_by, max_document_bytes=1 << 20
    )
    output = pathlib.Path(args.output)
    try:  # everything that can fail is checked before the training, which can take long
        files = sources.resolve_files(args.inputs, '--inputs')
        if output.is_dir():
            raise ConfigError(f'--output={args.output} is a folder: give the path of the .json file to write.')
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f'cannot create the folder of --output={args.output}: {error.strerror}.') from None
    except ConfigError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    size = train(files, args.vocab_size, str(output), options)
    print(f'wrote {args.output}: {size} tokens, end-of-document {EOS_TOKEN!r}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
