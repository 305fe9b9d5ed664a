# ruff: noqa: UP030, UP032 -- str.format on purpose: this file must parse on Pythons without f-strings
"""Says in one line, before anything is installed, whether this Python can run shardtrain.

The README's commands start with it: on a Python that cannot work, pip would otherwise fail on the first
dependency with no wheel for it ('No matching distribution found for ...'), never naming Python. Written
for any Python 3 (no f-strings), so that it runs where shardtrain cannot.
"""

import sys

OLDEST, NEWEST_TESTED = (3, 11), (3, 13)

if __name__ == '__main__':
    version = '.'.join(map(str, sys.version_info[:3]))
    if sys.version_info[:2] < OLDEST:
        sys.stderr.write(
            'shardtrain needs Python 3.11 to 3.13 (jax, grain and orbax have no wheels for older ones); this '
            'python3 is {0} ({1}): run the command with python3.11, python3.12 or python3.13 in its place.'.format(
                version, sys.executable
            )
            + '\n'
        )
        sys.exit(2)
    if sys.version_info[:2] > NEWEST_TESTED:
        print('note: shardtrain is tested on Python 3.11 to 3.13; on {0} pip may lack jax or grain.'.format(version))
