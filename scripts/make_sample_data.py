"""Rebuilds the bundled Shakespeare sample (trainer/sample_data/) from the shared corpus.

Usage: python scripts/make_sample_data.py --source ../shared/data/shakespeare
Writes train.txt (twelve plays) and eval.txt (one held-out play); the choice is fixed here
so that the bundled files can be reproduced byte for byte.
"""

import argparse
import hashlib
import pathlib

TRAIN_PLAYS = (
    'hamlet',
    'macbeth',
    'lear',
    'othello',
    'romeo_and_juliet',
    'julius_caesar',
    'antony_and_cleopatra',
    'coriolanus',
    'midsummer_nights_dream',
    'much_ado_about_nothing',
    'twelfth_night',
    'merchant_of_venice',
)
EVAL_PLAYS = ('tempest',)
OUT_DIR = pathlib.Path(__file__).resolve().parents[1] / 'trainer' / 'sample_data'


def concatenate(source: pathlib.Path, plays: tuple[str, ...]) -> bytes:
    """Joins the plays' texts, separated by a blank line, in the order given."""
    return b'\n\n'.join((source / f'{play}.txt').read_bytes().strip() for play in plays) + b'\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--source', type=pathlib.Path, required=True, help='folder of <play>.txt files')
    args = parser.parse_args()
    for name, plays in (('train.txt', TRAIN_PLAYS), ('eval.txt', EVAL_PLAYS)):
        data = concatenate(args.source, plays)
        (OUT_DIR / name).write_bytes(data)
        print(f'{name}: {len(data):,} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}')


if __name__ == '__main__':
    main()
