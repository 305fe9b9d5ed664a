"""A corpus much larger than what the pipeline may hold streams with flat memory."""

import pathlib
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

STREAM = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    import jax
    from configs import small_lm
    from trainer.runtime import mesh as mesh_lib
    from trainer.data import pipeline, tokenizers

    def peak_mb():
        # VmHWM is this process's own peak; ru_maxrss can carry the forking parent's (pytest's).
        with open('/proc/self/status') as status:
            line = next(line for line in status if line.startswith('VmHWM:'))
        return int(line.split()[1]) / 1024

    config = small_lm.get_config()  # the default batch of 32 rows: 8 data streams, even on one device
    config.data.update(train_files={pattern!r}, sample_by={sample_by!r}, seq_len=128, shuffle_buffer=256)
    tokenizer = tokenizers.make_tokenizer('byte')
    mesh = mesh_lib.make_mesh({{'data': 1, 'fsdp': 1, 'tensor': 1}}, jax.devices()[:1])
    batches = pipeline.train_batches(config, tokenizer, mesh_lib.batch_sharding(mesh, tuple(config.mesh.rules)))
    assert batches.num_streams == 8, batches.num_streams
    for _ in range(100):
        next(batches)
    warm = peak_mb()
    for _ in range(1500):  # 6M more tokens, read from all over the corpus
        next(batches)
    batches.close()
    print(warm, peak_mb())
""")


def write_large_corpus(folder: pathlib.Path, files: int, megabytes_each: int) -> None:
    """Files of distinct paragraphs, written a block at a time."""
    block = '\n\n'.join(
        f'paragraph {i}: ' + 'all the world is a stage and all the men and women ' * 4 for i in range(4000)
    ).encode()
    for f in range(files):
        with open(folder / f'big{f}.txt', 'wb') as out:
            for _ in range(megabytes_each * (1 << 20) // len(block)):
                out.write(block)


def peak_memory(pattern: str, sample_by: str) -> tuple[float, float]:
    code = STREAM.format(repo=str(REPO), pattern=pattern, sample_by=sample_by)
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    warm, peak = map(float, result.stdout.split())
    return warm, peak


@pytest.mark.slow  # 40 s: writes and streams 700 MB
def test_a_700_mb_corpus_streams_in_the_default_eight_streams_with_flat_memory(tmp_path):
    write_large_corpus(tmp_path, files=7, megabytes_each=100)
    assert sum(p.stat().st_size for p in tmp_path.glob('*.txt')) > 690 * (1 << 20)
    for sample_by in ('paragraph', 'document'):  # 'document': each 100 MB file is one document, read in pieces
        warm, peak = peak_memory(str(tmp_path / '*.txt'), sample_by)
        # Holding the corpus would cost 700 MB as bytes, 2.8 GB as int32 ids.
        assert peak - warm < 40, (sample_by, warm, peak)
        assert peak < 1000, (sample_by, peak)
        print(f'{sample_by}: warm {warm:.0f} MB, peak {peak:.0f} MB')
