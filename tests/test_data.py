"""The grain input pipeline: formats, packing, exact resume, shuffling, mixtures, sharding, bad data."""

import json
import logging
import pathlib
import subprocess
import sys

import batch_topologies  # noqa: E402  (tests/)
import grain
import jax
import numpy as np
import pytest

from configs import small_lm
from trainer.data import pipeline, sources, tokenizers
from trainer.errors import ConfigError
from trainer.training import checkpoints, config_checks

REPO = pathlib.Path(__file__).resolve().parents[1]
WORDS = 'the quick brown fox jumps over a lazy dog while seven wizards quietly hex jovial bakers'.split()


def write_corpus(folder: pathlib.Path, files: int = 6, paragraphs: int = 40, seed: int = 0) -> list[str]:
    """Text files of blank-line separated paragraphs, each paragraph tagged with its file and number."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        paragraphs_text = [
            f'doc {f}.{p}: ' + ' '.join(rng.choice(WORDS, rng.integers(3, 30))) for p in range(paragraphs)
        ]
        (folder / f'part{f}.txt').write_text('\n\n'.join(paragraphs_text) + '\n')
    return sorted(str(p) for p in folder.glob('*.txt'))


def data_config(train_files: str, **changes):
    config = small_lm.get_config()
    config.data.train_files = train_files
    config.data.eval_files = ''
    config.data.seq_len = 32
    config.data.shuffle_buffer = 16
    config.data.update(changes)
    return config


def dataset(config, shuffle=True, local_batch=4):
    tokenizer = tokenizers.make_tokenizer(config.data.tokenizer, config.data.eos_token)
    srcs = pipeline.train_sources(config.data)
    return pipeline.make_dataset(srcs, config.data, tokenizer, config.seed, local_batch, shuffle)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def all_documents(config, shuffle=False, count=400):
    """The first `count` documents (text) of the train source, decoded."""
    tokenizer = tokenizers.make_tokenizer(config.data.tokenizer)
    (src,) = pipeline.train_sources(config.data)
    docs = pipeline._documents(src, config.data, tokenizer, config.seed, shuffle)
    iterator = iter(docs)
    return [tokenizer.decode(next(iterator)['tokens'][:-1]) for _ in range(count)]


@pytest.mark.parametrize('num_workers', [0, 2])
def test_restored_iterator_continues_with_exactly_the_same_batches(tmp_path, num_workers):
    config = data_config(str(tmp_path / 'corpus' / '*.txt'), num_workers=num_workers, prefetch_batches=2)
    write_corpus(tmp_path / 'corpus')
    first = iter(pipeline.prefetch(dataset(config), config.data))
    take(first, 7)
    state = first.get_state()
    expected = take(first, 30)  # crosses epoch boundaries: 6 files x 40 paragraphs is ~45 batches
    first.close()
    state = checkpoints._from_json(checkpoints._to_json(state))  # exactly what a checkpoint stores
    second = iter(pipeline.prefetch(dataset(config), config.data))
    second.set_state(state)
    assert_same_batches(take(second, 30), expected)
    second.close()


def test_same_seed_same_order_and_each_epoch_reshuffled(tmp_path):
    config = data_config(str(tmp_path / '*.txt'), sample_by='document')  # one document per file
    write_corpus(tmp_path, files=8, paragraphs=2)
    docs = [d.split(':')[0] for d in all_documents(config, shuffle=True, count=24)]
    epochs = [docs[0:8], docs[8:16], docs[16:24]]
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs), 'each epoch holds every file once'
    assert len({tuple(e) for e in epochs}) == 3, 'each epoch has its own order'
    assert docs == [d.split(':')[0] for d in all_documents(config, shuffle=True, count=24)]
    config.seed = 1
    assert docs != [d.split(':')[0] for d in all_documents(config, shuffle=True, count=24)]


def test_packed_rows_mark_documents_and_mask_what_is_not_predicted(tmp_path):
    (tmp_path / 'short.txt').write_text('first doc\n\nsecond one\n\n' + 'third and longer document ' * 5)
    config = data_config(str(tmp_path / 'short.txt'), shuffle_buffer=0)
    batch = next(iter(dataset(config, shuffle=False)))
    row = {key: value[0] for key, value in batch.items()}
    assert bytes(row['inputs'][:21].astype(np.uint8)) == b'first doc\0second one\0'  # EOS (0) after each document
    np.testing.assert_array_equal(row['inputs'][1:], row['targets'][:-1])
    np.testing.assert_array_equal(row['segment_ids'][:23], [1] * 10 + [2] * 11 + [3] * 2)
    np.testing.assert_array_equal(row['positions'][8:13], [8, 9, 0, 1, 2])  # positions restart per document
    assert row['weights'][8] == 1, 'the last token predicts EOS'
    assert row['weights'][9] == 0 and row['weights'][20] == 0, 'EOS does not predict the next document'
    assert row['weights'][:9].all() and row['weights'][10:20].all()


def test_a_document_longer_than_seq_len_is_split_not_dropped(tmp_path):
    long_text = ''.join(chr(ord('a') + i % 26) for i in range(200))
    (tmp_path / 'long.txt').write_text(long_text)
    config = data_config(str(tmp_path / 'long.txt'), shuffle_buffer=0)
    rows = next(iter(dataset(config, shuffle=False, local_batch=8)))
    stream = np.concatenate([np.append(r, t[-1]) for r, t in zip(rows['inputs'], rows['targets'], strict=True)])
    expected = np.frombuffer(long_text.encode() + b'\0', np.uint8)
    assert bytes(stream[: len(expected)].astype(np.uint8)) == bytes(expected)
    # grain's concat-then-split starts the continuation as a new segment with positions from 0.
    assert rows['segment_ids'][1][0] == 1 and rows['positions'][1][0] == 0


@pytest.mark.parametrize('sample_by, expected', [('line', 4), ('paragraph', 2), ('document', 1)])
def test_text_documents_by_line_paragraph_or_file(tmp_path, sample_by, expected):
    (tmp_path / 'a.txt').write_text('one\ntwo\n\nthree\nfour\n')
    config = data_config(str(tmp_path / 'a.txt'), sample_by=sample_by)
    reader = iter(sources.FileDocuments(str(tmp_path / 'a.txt'), config.data))
    assert len(list(reader)) == expected


def test_jsonl_parquet_and_text_give_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f'line {i} ' + ' '.join(WORDS[: i % 10 + 1]) for i in range(50)]
    (tmp_path / 'c.txt').write_text('\n'.join(texts) + '\n')
    (tmp_path / 'c.jsonl').write_text('\n'.join(json.dumps({'body': t, 'id': i}) for i, t in enumerate(texts)))
    pq.write_table(pa.table({'body': texts, 'id': list(range(50))}), tmp_path / 'c.parquet', row_group_size=7)
    text_docs = all_documents(data_config(str(tmp_path / 'c.txt'), sample_by='line'), count=50)
    for name in ('c.jsonl', 'c.parquet'):
        assert all_documents(data_config(str(tmp_path / name), text_field='body'), count=50) == text_docs, name
    assert text_docs == texts


def test_parquet_reader_resumes_inside_a_row_group(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({'text': [f't{i}' for i in range(20)]}), tmp_path / 'p.parquet', row_group_size=6)
    config = data_config(str(tmp_path / 'p.parquet'))
    reader = iter(sources.FileDocuments(str(tmp_path / 'p.parquet'), config.data))
    take(reader, 8)
    state = reader.get_state()
    rest = list(reader)
    again = iter(sources.FileDocuments(str(tmp_path / 'p.parquet'), config.data))
    again.set_state(state)
    assert list(again) == rest == [f't{i}' for i in range(8, 20)]


def test_prepared_arrayrecord_shards_hold_the_same_tokens_and_rerun_is_a_no_op(tmp_path):
    files = write_corpus(tmp_path / 'corpus', files=3, paragraphs=10)
    out = tmp_path / 'prepared'
    command = [
        sys.executable,
        str(REPO / 'scripts' / 'prepare_data.py'),
        '--inputs',
        str(tmp_path / 'corpus/*.txt'),
        '--output_dir',
        str(out),
        '--workers',
        '2',
    ]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    assert '30 documents' in first.stdout
    assert 'tokenizing' not in first.stderr  # the progress bar is for terminals: in a log, each refresh is a line
    manifest = json.loads((out / 'manifest.json').read_text())
    assert manifest['tokenizer'] == 'byte' and manifest['dtype'] == 'uint16' and len(manifest['shards']) == 3
    assert [s['source'] for s in manifest['shards']] == files and all(
        len(s['sha256']) == 64 for s in manifest['shards']
    )
    text_bytes = sum(len(p) for f in files for p in pathlib.Path(f).read_text().split('\n\n') if p.strip())
    assert manifest['tokens'] == text_bytes
    second = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    assert 'up to date: nothing to do' in second.stdout
    # Training reads the shards: the same documents as the text, in another (globally shuffled) order.
    prepared = all_documents(data_config(str(out / '*.arrayrecord')), shuffle=True, count=30)
    from_text = all_documents(data_config(str(tmp_path / 'corpus/*.txt')), count=30)
    assert sorted(prepared) == sorted(from_text) and prepared != from_text


def test_prepared_shards_must_match_the_tokenizer(tmp_path):
    write_corpus(tmp_path / 'corpus', files=1, paragraphs=5)
    sys.path.insert(0, str(REPO / 'scripts'))
    import prepare_data

    options = dict(prepare_data.DEFAULT_OPTIONS)  # byte-tokenized
    prepare_data.prepare(str(tmp_path / 'corpus/*.txt'), str(tmp_path / 'prep'), options, workers=1)
    config = data_config(str(tmp_path / 'prep/*.arrayrecord'))
    config.data.tokenizer = str(train_tokenizer(tmp_path))
    config.model.vocab_size = 512
    with pytest.raises(ConfigError, match="was tokenized with 'byte', not config.data.tokenizer="):
        config_checks.check_data(config)


def train_tokenizer(tmp_path) -> pathlib.Path:
    corpus = write_corpus(tmp_path / 'tok_corpus', files=2)
    output = tmp_path / 'new_folder' / 'tokenizer.json'  # created first, not found missing after training
    subprocess.run(
        [
            sys.executable,
            str(REPO / 'scripts' / 'train_tokenizer.py'),
            '--inputs',
            ','.join(corpus),
            '--vocab_size',
            '300',
            '--output',
            str(output),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return output


def test_train_tokenizer_checks_its_inputs_and_output_before_training(tmp_path):
    script = [sys.executable, str(REPO / 'scripts' / 'train_tokenizer.py'), '--vocab_size', '300']
    missing = subprocess.run(
        [*script, '--inputs', str(tmp_path / 'none*.txt'), '--output', str(tmp_path / 't.json')],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 2 and missing.stderr.startswith("error: --inputs='")
    write_corpus(tmp_path / 'corpus', files=1)
    folder = subprocess.run(
        [*script, '--inputs', str(tmp_path / 'corpus/*.txt'), '--output', str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert folder.returncode == 2 and 'is a folder: give the path of the .json file to write' in folder.stderr
    assert 'Traceback' not in missing.stderr + folder.stderr


def test_trained_bpe_tokenizer_round_trips_and_is_checked_against_the_model(tmp_path):
    path = train_tokenizer(tmp_path)
    tokenizer = tokenizers.make_tokenizer(str(path))
    text = 'the lazy dog jumps'
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text and len(ids) < len(text)
    assert tokenizer.vocab_size == 300 and tokenizer.eos_id == 0  # '<|endoftext|>' is its first token
    config = data_config(str(tmp_path / 'tok_corpus/*.txt'), tokenizer=str(path))
    config.model.vocab_size = 256
    with pytest.raises(
        ConfigError, match='has 300 ids but config.model.vocab_size=256: set vocab_size to at least 300'
    ):
        config_checks.check_data(config)


def test_sentencepiece_model(tmp_path):
    import sentencepiece

    corpus = write_corpus(tmp_path / 'sp', files=1, paragraphs=200)
    sentencepiece.SentencePieceTrainer.train(
        input=corpus[0], model_prefix=str(tmp_path / 'sp_model'), vocab_size=60, model_type='bpe', minloglevel=2
    )
    tokenizer = tokenizers.make_tokenizer(str(tmp_path / 'sp_model.model'))
    assert tokenizer.decode(tokenizer.encode('the lazy dog')) == 'the lazy dog'
    assert tokenizer.vocab_size == 60 and tokenizer.eos_id == 2  # SentencePiece's default </s>
    config = data_config(corpus[0], tokenizer=str(tmp_path / 'sp_model.model'))
    batch = next(iter(dataset(config)))
    assert batch['inputs'].max() < 60


def test_mixture_follows_weights_deterministically(tmp_path):
    for name, letter in (('a', 'A'), ('b', 'B')):
        (tmp_path / name).mkdir()
        (tmp_path / name / 'x.txt').write_text('\n'.join(f'{letter}{i}' for i in range(500)))
    config = data_config(
        '', sample_by='line', mixture=((str(tmp_path / 'a/*.txt'), 3.0), (str(tmp_path / 'b/*.txt'), 1.0))
    )
    tokenizer = tokenizers.make_tokenizer('byte')
    srcs = pipeline.train_sources(config.data)
    streams = [pipeline._documents(s, config.data, tokenizer, config.seed + i, True) for i, s in enumerate(srcs)]

    def first_letters():
        mixed = iter(grain.IterDataset.mix(streams, [s.weight for s in srcs]))
        return ''.join(chr(next(mixed)['tokens'][0]) for _ in range(400))

    letters = first_letters()
    assert letters == first_letters()
    assert letters.count('A') == 300 and letters.count('B') == 100


def test_each_stream_reads_its_own_disjoint_share(tmp_path):
    write_corpus(tmp_path / 'many', files=4, paragraphs=5)
    (tmp_path / 'one').mkdir()
    (tmp_path / 'one' / 'x.txt').write_text('\n\n'.join(f'doc {i}' for i in range(20)))
    tokenizer = tokenizers.make_tokenizer('byte')
    for pattern in ('many/*.txt', 'one/*.txt'):  # whole files per stream, or every other document of one file
        config = data_config(str(tmp_path / pattern))
        (src,) = pipeline.train_sources(config.data)
        shares = []
        for stream in (0, 1):
            docs = iter(pipeline._documents(src, config.data, tokenizer, config.seed, False, stream, 2))
            shares.append({tokenizer.decode(next(docs)['tokens'][:-1]) for _ in range(10)})
        assert shares[0].isdisjoint(shares[1]) and len(shares[0] | shares[1]) == 20, pattern


def test_streams_fill_fixed_rows_whatever_the_process_count(tmp_path):
    """Two processes running one stream each see the same global batches as one process running both."""
    write_corpus(tmp_path / 'c', files=3, paragraphs=30)
    config = data_config(str(tmp_path / 'c/*.txt'), num_streams=2)
    config.train.global_batch_size = 8
    tokenizer = tokenizers.make_tokenizer('byte')
    mesh = jax.make_mesh((8,), ('fsdp',), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('fsdp'))
    both = pipeline.train_batches(config, tokenizer, sharding)
    assert both.num_streams == 2 and sorted(both.get_state()) == [0, 1]
    global_batches = [np.asarray(next(both)['inputs']) for _ in range(3)]
    both.close()
    srcs = pipeline.train_sources(config.data)
    for stream, rows in ((0, slice(0, 4)), (1, slice(4, 8))):  # what process `stream` of two would read
        alone = iter(pipeline.make_dataset(srcs, config.data, tokenizer, config.seed, 4, True, stream, 2))
        for batch in global_batches:
            np.testing.assert_array_equal(next(alone)['inputs'], batch[rows])
    config.data.num_streams = 3
    with pytest.raises(ConfigError, match='cannot be cut into 3 data streams'):
        pipeline.train_batches(config, tokenizer, sharding)


def test_invalid_utf8_is_replaced_counted_and_logged(tmp_path, caplog):
    (tmp_path / 'bad.txt').write_bytes(b'good text\n\nbad \xff\xfe text\n\nmore \xc3 here\n')
    config = data_config(str(tmp_path / 'bad.txt'))
    with caplog.at_level(logging.WARNING):
        docs = list(iter(sources.FileDocuments(str(tmp_path / 'bad.txt'), config.data)))
    assert docs == ['good text', 'bad \ufffd\ufffd text', 'more \ufffd here\n']
    assert 'replaced 3 invalid UTF-8 sequences in' in caplog.text


def test_json_lines_without_the_field_are_skipped_counted_and_logged(tmp_path, caplog):
    lines = ['{"text": "kept one"}', '{"other": 1}', 'not json', '{"text": 5}', '{"text": "kept two"}']
    (tmp_path / 'd.jsonl').write_text('\n'.join(lines))
    config = data_config(str(tmp_path / 'd.jsonl'))
    with caplog.at_level(logging.WARNING):
        docs = list(iter(sources.FileDocuments(str(tmp_path / 'd.jsonl'), config.data)))
    assert docs == ['kept one', 'kept two']
    assert 'skipped 3 lines of' in caplog.text and "without a string field 'text'" in caplog.text


def test_parquet_without_the_column_is_a_clear_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({'content': ['a']}), tmp_path / 'p.parquet')
    config = data_config(str(tmp_path / 'p.parquet'))
    with pytest.raises(
        ConfigError,
        match=r"p.parquet has no column 'text' \(it has \['content'\]\): set "
        r'config.data.text_field',
    ):
        config_checks.check_data(config)


def test_empty_files_are_skipped_with_a_warning(tmp_path, caplog):
    (tmp_path / 'empty.txt').write_text('')
    (tmp_path / 'full.txt').write_text('some text')
    with caplog.at_level(logging.WARNING):
        assert sources.resolve_files(str(tmp_path / '*.txt'), 'config.data.train_files') == [str(tmp_path / 'full.txt')]
    assert caplog.text.count('skipping 1 empty file(s) of config.data.train_files: ') == 1
    assert str(tmp_path / 'empty.txt') in caplog.text


def test_fsspec_urls_are_read(tmp_path):
    write_corpus(tmp_path, files=2, paragraphs=3)
    url_config = data_config(f'file://{tmp_path}/*.txt')
    assert all_documents(url_config, count=6) == all_documents(data_config(str(tmp_path / '*.txt')), count=6)


def test_a_missing_fsspec_backend_names_the_extra():
    with pytest.raises(
        ConfigError, match=r"needs an fsspec backend that is not installed: pip install 'shardtrain\[s3\]'"
    ):
        sources.resolve_files('s3://some-bucket/data/*.jsonl', 'config.data.train_files')


def test_a_document_longer_than_max_document_bytes_is_read_in_pieces_without_splitting_characters(tmp_path):
    text = 'é' * 3000 + 'x'  # 6001 bytes of two-byte characters
    (tmp_path / 'one.txt').write_text(text)
    config = data_config(str(tmp_path / 'one.txt'), sample_by='document', max_document_bytes=1024)
    pieces = list(iter(sources.FileDocuments(str(tmp_path / 'one.txt'), config.data)))
    assert ''.join(pieces) == text and all(len(p.encode()) <= 1024 for p in pieces) and len(pieces) == 6


def test_files_contribute_in_proportion_to_their_size(tmp_path):
    """A file of few long documents does not crowd out one of many short ones (one document each in turn did)."""
    (tmp_path / 'long.txt').write_text('\n\n'.join('L' * 3000 for _ in range(20)))  # 60 kB: 31% of the bytes
    (tmp_path / 'short.txt').write_text('\n\n'.join('s' * 31 for _ in range(4000)))  # 132 kB
    config = data_config(str(tmp_path / '*.txt'), shuffle_buffer=0, seq_len=128)
    rows = iter(dataset(config, local_batch=1))
    inputs = np.concatenate([next(rows)['inputs'] for _ in range(500)])  # 64 kB: a third of the epoch
    from_long, from_short = (inputs == ord('L')).sum(), (inputs == ord('s')).sum()
    share = from_long / (from_long + from_short)
    # Within a document of the long file (5% of it) of its size share; taking turns gave it 94%.
    assert abs(share - 60_000 / 192_000) < 0.06, share


def test_windows_line_ends_split_paragraphs_and_lines_and_are_normalized(tmp_path):
    (tmp_path / 'crlf.txt').write_bytes(b'one\r\ntwo\r\n\r\nthree\r\n\r\nfour\r\n')
    config = data_config(str(tmp_path / 'crlf.txt'))
    reader = iter(sources.FileDocuments(str(tmp_path / 'crlf.txt'), config.data))
    assert list(reader) == ['one\ntwo', 'three', 'four\n']
    config.data.sample_by = 'line'
    assert list(iter(sources.FileDocuments(str(tmp_path / 'crlf.txt'), config.data))) == ['one', 'two', 'three', 'four']


def test_a_paragraph_cut_at_the_size_cap_is_warned_about(tmp_path, caplog):
    (tmp_path / 'no_blank_lines.txt').write_text('a line\n' * 400)  # 2800 bytes and no blank line
    config = data_config(str(tmp_path / 'no_blank_lines.txt'), max_document_bytes=1024)
    with caplog.at_level(logging.WARNING):
        pieces = list(iter(sources.FileDocuments(str(tmp_path / 'no_blank_lines.txt'), config.data)))
    assert len(pieces) == 3
    assert 'has a paragraph longer than config.data.max_document_bytes=1024, read in pieces' in caplog.text


def test_files_that_yield_no_document_are_an_error_not_a_hang(tmp_path):
    (tmp_path / 'a.jsonl').write_text('{"body": "text under another field"}\n')
    config = data_config(str(tmp_path / 'a.jsonl'))
    with pytest.raises(ConfigError, match='none of the 1 data files yields a document'):
        next(iter(dataset(config)))


def one_paragraph(words: int = 20_000, seed: int = 0) -> str:
    """Prose without a blank line (one paragraph), with two-byte characters so that a cut could split one."""
    rng = np.random.default_rng(seed)
    return ' '.join(rng.choice(WORDS + ['café', 'naïve', 'señor'], words)) + '\n'


def stream_texts(config, num_streams: int) -> list[list[str]]:
    """Each stream's documents of the (one) train source, read once in order, decoded."""
    tokenizer = tokenizers.make_tokenizer('byte')
    (src,) = pipeline.train_sources(config.data)
    texts = []
    for stream in range(num_streams):
        docs = pipeline._documents(src, config.data, tokenizer, 0, False, stream, num_streams, repeat=False)
        texts.append([tokenizer.decode(d['tokens'][:-1]) for d in docs])
    return texts


def test_a_file_of_fewer_documents_than_streams_is_shared_by_byte_ranges(tmp_path):
    """One paragraph of 100 kB, or sentences one per line read by paragraph: each of 8 streams gets an eighth."""
    prose = one_paragraph()
    assert len(prose.encode()) > 100_000 and '\n\n' not in prose
    (tmp_path / 'prose.txt').write_text(prose)
    rng = np.random.default_rng(1)
    lines = ''.join(' '.join(rng.choice(WORDS, 12)) + '.\n' for _ in range(2000))
    (tmp_path / 'lines.txt').write_text(lines)
    for name, text in (('prose.txt', prose), ('lines.txt', lines)):
        shares = stream_texts(data_config(str(tmp_path / name)), 8)
        assert ''.join(''.join(share) for share in shares) == text, 'every byte once, in order'
        sizes = [sum(len(t.encode()) for t in share) for share in shares]
        assert min(sizes) > 0.45 * len(text.encode()) / 8, (name, sizes)
        if name == 'lines.txt':  # cut at line ends, not inside a sentence
            assert all(t.endswith('\n') for share in shares for t in share), name
    # Two files of three documents each (JSON lines, Parquet): each stream an eighth of each file's text.
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [one_paragraph(800, seed) for seed in range(3)]
    (tmp_path / 'few.jsonl').write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs))
    pq.write_table(pa.table({'text': docs}), tmp_path / 'few.parquet')
    for name in ('few.jsonl', 'few.parquet'):
        shares = stream_texts(data_config(str(tmp_path / name)), 8)
        assert all(shares) and ''.join(''.join(share) for share in shares) == ''.join(docs), name


def test_a_file_of_enough_documents_is_dealt_by_documents_as_before(tmp_path):
    """At least as many documents as streams: each stream keeps every n-th one, whole (the order of old runs)."""
    (tmp_path / 'x.txt').write_text('\n\n'.join(f'doc {i}' for i in range(8)))
    shares = stream_texts(data_config(str(tmp_path / 'x.txt')), 8)
    assert shares == [[f'doc {i}'] for i in range(8)]


def test_streams_sharing_one_paragraph_resume_exactly(tmp_path):
    # Worker processes too (num_workers=2) passed, in 3 minutes for 16 of them: test_restored_iterator_... covers
    # grain's workers; a stream's byte range is one more entry of the same state.
    (tmp_path / 'prose.txt').write_text(one_paragraph(2_000))  # 12 kB: a stream's eighth lasts ~12 batches
    config = data_config(str(tmp_path / 'prose.txt'), prefetch_batches=2)
    tokenizer = tokenizers.make_tokenizer('byte')
    sharding = jax.sharding.NamedSharding(
        jax.make_mesh((1,), ('fsdp',), devices=jax.devices()[:1]), jax.sharding.PartitionSpec('fsdp')
    )
    first = pipeline.train_batches(config, tokenizer, sharding)
    assert first.num_streams == 8
    take(first, 7)
    saved = checkpoints._from_json(checkpoints._to_json(first.get_state()))  # as a checkpoint stores it
    expected = [{k: np.asarray(v) for k, v in b.items()} for b in take(first, 30)]  # crosses epochs
    first.close()
    second = pipeline.train_batches(config, tokenizer, sharding)
    second.set_state({int(stream): state for stream, state in saved.items()})
    assert_same_batches([{k: np.asarray(v) for k, v in b.items()} for b in take(second, 30)], expected)
    second.close()


def test_a_file_smaller_than_one_sequence_is_one_line_naming_it(tmp_path):
    (tmp_path / 'tiny.txt').write_text('too little text\n')
    config = data_config(str(tmp_path / 'tiny.txt'))
    with pytest.raises(ConfigError) as refused:
        config_checks.check_data(config)
    assert str(refused.value) == (
        f'config.data.train_files ({tmp_path / "tiny.txt"}) holds 17 tokens of text, less than one sequence of '
        'config.data.seq_len + 1 = 33: give more text, or lower config.data.seq_len.'
    )
    config.data.seq_len = 16
    config_checks.check_data(config)  # 16 bytes and an EOS: one sequence


def test_a_json_lines_file_that_is_not_json_is_one_line_naming_it(tmp_path):
    (tmp_path / 'bad.jsonl').write_text('\n'.join(f'line {i} of plain text' for i in range(3000)))
    config = data_config(str(tmp_path / 'bad.jsonl'))
    with pytest.raises(ConfigError) as refused:
        config_checks.check_data(config)
    message = str(refused.value)
    assert message.startswith(f'{tmp_path / "bad.jsonl"} is not JSON lines ({tmp_path / "bad.jsonl"}:1: not JSON (')
    assert "config.data.format='text' to read it as plain text" in message and '\n' not in message
    (tmp_path / 'sft.jsonl').write_text(json.dumps({'prompt': 'a', 'completion': 'b'}) + '\n')
    with pytest.raises(ConfigError, match=r"sft.jsonl:1: no field 'text' in its first records \(they have 'prompt'"):
        config_checks.check_data(data_config(str(tmp_path / 'sft.jsonl')))


def test_a_global_batch_of_examples_draws_from_the_whole_file_not_a_few_runs_of_neighbours(tmp_path):
    """Each stream shuffles its share with a seed of its own. With one seed for all, the 16 rows of a batch from 8
    streams were 2 places of the file, 8 neighbouring examples each (a file sorted by label: batches of one label)."""
    lines = [json.dumps({'text': f'example {i:02d}', 'label': i // 32}) for i in range(64)]
    (tmp_path / 'labeled.jsonl').write_text('\n'.join(lines) + '\n')
    config = data_config(str(tmp_path / 'labeled.jsonl'), format='classify')
    config.model.update(head='classify', num_classes=2)
    tokenizer = tokenizers.make_tokenizer('byte')
    srcs = pipeline.train_sources(config.data)
    batch = []  # the example numbers of the first global batch of 16 rows, from 8 streams of 2
    for stream in range(8):
        rows = next(iter(pipeline.make_dataset(srcs, config.data, tokenizer, 0, 2, True, stream, 8, num_classes=2)))
        batch += [int(bytes(row[8:10].astype(np.uint8))) for row in rows['inputs']]
    assert sorted(batch) == sorted(set(batch)) and len(batch) == 16
    assert len({i // 8 for i in batch}) >= 4, sorted(batch)  # of the 8 runs of 8 neighbours


def test_the_default_stream_count_is_the_configs_alone_and_each_process_runs_the_streams_of_its_rows():
    """Not one per device or process: the same streams on any mesh; a process keeps its rows of them."""
    mesh = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'tensor'), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(('data', 'fsdp')))
    assert pipeline.data_streams(0, sharding, (32, 16)) == pipeline.StreamPlan(8, range(8), slice(0, 32))
    assert pipeline.data_streams(0, sharding, (12, 16)).num_streams == 4  # gcd(12, 8)
    assert pipeline.data_streams(2, sharding, (8, 16)) == pipeline.StreamPlan(2, range(2), slice(0, 8))
    # Processes holding rows 6-9 of 16 (4 streams of 4 rows): streams 1 and 2, rows 2-5 of their 8.
    assert pipeline.plan_streams(4, 16, slice(6, 10)) == pipeline.StreamPlan(4, range(1, 3), slice(2, 6))
    # 16 processes sharing 8 streams: two run each stream and keep half of its rows.
    assert pipeline.plan_streams(8, 32, slice(2, 4)) == pipeline.StreamPlan(8, range(0, 1), slice(2, 4))


@pytest.fixture(scope='module')
def topology_data(tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp('topologies')
    batch_topologies.write_data(folder)
    return folder


@pytest.fixture(scope='module')
def one_device_batches(topology_data):
    """Format name -> its batches on one device, computed once per module."""
    cache = {}

    def batches(name: str) -> dict[str, np.ndarray]:
        if name not in cache:
            config = batch_topologies.config_for(topology_data, name, (1, 1, 1))
            cache[name] = batch_topologies.global_batches(config, jax.devices()[:1])
        return cache[name]

    return batches


def assert_same_arrays(found: dict[str, np.ndarray], expected: dict[str, np.ndarray], where: str) -> None:
    assert found.keys() == expected.keys(), where
    for key, array in expected.items():
        assert found[key].dtype == array.dtype, (where, key)
        np.testing.assert_array_equal(found[key], array, err_msg=f'{where}: {key}')


@pytest.mark.parametrize('name', batch_topologies.FORMATS)
def test_the_batches_of_a_step_are_the_same_on_one_device_and_on_any_mesh_of_eight(
    topology_data, one_device_batches, name
):
    """1 device, and 8 devices as (2,2,2), (1,4,2), (8,1,1): byte for byte, train and eval batches alike."""
    one = one_device_batches(name)
    assert len(one) >= batch_topologies.STEPS * 5
    for shape in ((2, 2, 2), (1, 4, 2), (8, 1, 1)):
        config = batch_topologies.config_for(topology_data, name, shape)
        assert_same_arrays(batch_topologies.global_batches(config, jax.devices()), one, f'{name} on {shape}')


def test_the_batches_of_a_step_are_the_same_in_two_processes_of_four_devices(
    topology_data, one_device_batches, tmp_path
):
    """2 processes x 4 devices (gloo on 127.0.0.1), each reading its rows: the 1-device batches, gathered."""
    out = tmp_path / 'two_processes.npz'
    command = [sys.executable, 'scripts/launch_local.py', '--num_processes', '2', '--']
    command += [sys.executable, 'tests/batch_topologies.py', str(topology_data), str(out), *batch_topologies.FORMATS]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    with np.load(out) as found:
        for name in batch_topologies.FORMATS:
            mine = {key.split('/', 1)[1]: found[key] for key in found.files if key.startswith(f'{name}/')}
            assert_same_arrays(mine, one_device_batches(name), f'{name} in 2 processes x 4 devices')
