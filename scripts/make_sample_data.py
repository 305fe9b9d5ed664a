"""Rebuilds the bundled Shakespeare sample (trainer/sample_data/) from the shared corpus.

Usage: python scripts/make_sample_data.py --source ../shared/data/shakespeare
Writes train/<play>.txt (twelve plays) and eval/<play>.txt (one held-out play), one file per play
so that the pipeline interleaves plays; the choice is fixed here so that the bundled files can be
reproduced byte for byte.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--source', type=pathlib.Path, required=True, help='folder of <play>.txt files')
    args = parser.parse_args()
    for split, plays in (('train', TRAIN_PLAYS), ('eval', EVAL_PLAYS)):
        (OUT_DIR / split).mkdir(parents=True, exist_ok=True)
        for play in plays:
            data = (args.source / f'{play}.txt').read_bytes()
            (OUT_DIR / split / f'{play}.txt').write_bytes(data)
            print(f'{split}/{play}.txt: {len(data):,} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}')


if __name__ == '__main__':
    main()
