import numpy as np
import pytest

from moe.lm.text import corpus, examples
from moe.lm.text.tokenizer import Tokenizer, split_sentences

TEXT = (
    "The cat sat on the mat. The dog sat too!\n"
    "A single\nline break keeps the sentence going\n\n"
    "new paragraph here. x"
)


def reference_pairs(text, tokenizer, max_seq_len):
    """Plain Python loop: every word after the first of its sentence."""
    pairs = []
    for sentence in split_sentences(text):
        ids = [tokenizer.word_id(w) for w in sentence]
        for i in range(1, len(ids)):
            context = ids[max(0, i - max_seq_len) : i]
            pairs.append(([0] * (max_seq_len - len(context)) + context, ids[i]))
    return pairs


def dataset_pairs(dataset):
    pairs = []
    for x, y in dataset.as_numpy_iterator():
        pairs += [(list(c), int(t)) for c, t in zip(x, y, strict=True)]
    return pairs


@pytest.mark.parametrize("max_seq_len", [1, 3, 8])
def test_dataset_pairs_equal_python_loop(max_seq_len):
    tokenizer = Tokenizer.fit([TEXT], vocab_size=10)  # some words are OOV
    tokens, starts = corpus.token_stream(tokenizer, [TEXT])
    positions = corpus.pair_positions(starts)
    ds = examples.make_dataset(tokens, starts, positions, max_seq_len, 4)
    expected = reference_pairs(TEXT, tokenizer, max_seq_len)
    assert len(expected) == len(positions) > 0
    assert dataset_pairs(ds) == expected


def test_shuffle_is_a_reproducible_permutation():
    tokenizer = Tokenizer.fit([TEXT], vocab_size=100)
    tokens, starts = corpus.token_stream(tokenizer, [TEXT])
    positions = corpus.pair_positions(starts)

    def pairs(seed):
        return dataset_pairs(
            examples.make_dataset(tokens, starts, positions, 3, 5, seed)
        )

    ordered = dataset_pairs(
        examples.make_dataset(tokens, starts, positions, 3, 5)
    )
    assert pairs(1) == pairs(1)
    assert pairs(1) != ordered
    assert sorted(pairs(1)) == sorted(ordered)


def test_separate_texts_are_separate_sentences():
    tokenizer = Tokenizer.fit(["a b c"], 10)
    tokens, starts = corpus.token_stream(tokenizer, ["a b", "c"])
    assert starts.tolist() == [0, 0, 2]
    assert corpus.pair_positions(starts).tolist() == [1]


def test_contexts_left_pads_and_keeps_the_last_words():
    tokens = np.array([5, 6, 7, 8, 9], np.int32)
    out = examples.contexts(
        tokens, ends=[5, 2, 4], begins=[0, 0, 3], max_seq_len=3
    )
    assert out.numpy().tolist() == [[7, 8, 9], [0, 5, 6], [0, 0, 8]]


def test_dataset_is_streaming():
    # The pipeline holds positions, not contexts: one int per pair.
    tokens = np.arange(1, 1001, dtype=np.int32)
    starts = np.zeros_like(tokens)
    positions = corpus.pair_positions(starts)
    ds = examples.make_dataset(
        tokens, starts, positions, 16, 32, shuffle_seed=0
    )
    x, y = next(iter(ds))
    assert x.shape == (32, 16) and y.shape == (32,)
    chain = [ds]
    while hasattr(chain[-1], "_input_dataset"):
        chain.append(chain[-1]._input_dataset)
    # Shuffled as one tensor per epoch: no `Dataset.shuffle` buffer holding
    # every position as an element of its own (memory grew with the corpus).
    assert not [d for d in chain if "Shuffle" in type(d).__name__]


@pytest.mark.parametrize(
    "make", [examples.make_dataset, examples.make_window_dataset]
)
def test_shuffled_epochs_differ_and_keep_the_cardinality(make):
    tokens = np.arange(1, 201, dtype=np.int32)  # a word's id: its position + 1
    starts = np.zeros_like(tokens)
    positions = corpus.pair_positions(starts)
    ds = make(tokens, starts, positions, 1, 8, shuffle_seed=3)
    epochs = [[np.ravel(batch[1]) for batch in ds] for _ in range(2)]
    assert len(epochs[0]) == int(ds.cardinality()) == 25
    first, second = (np.concatenate(e).tolist() for e in epochs)
    assert first != second
    assert sorted(first) == (positions + 1).tolist()


def test_read_text(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("héllo wörld", encoding="utf-8")
    assert corpus.read_text(good) == "héllo wörld"
    latin = tmp_path / "latin.txt"
    latin.write_bytes("héllo".encode("latin-1"))
    with pytest.raises(corpus.CorpusError, match="not valid utf-8"):
        corpus.read_text(latin)
    assert corpus.read_text(latin, "latin-1") == "héllo"
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\x01\x02abc")
    with pytest.raises(corpus.CorpusError, match="binary"):
        corpus.read_text(binary)
    with pytest.raises(corpus.CorpusError, match="not found"):
        corpus.read_text(tmp_path / "missing.txt")
    with pytest.raises(corpus.CorpusError, match="directory"):
        corpus.read_text(tmp_path)
    with pytest.raises(corpus.CorpusError, match="unknown text encoding"):
        corpus.read_text(good, "no-such-codec")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_text_full_of_nul_bytes_is_read_in_its_encoding(tmp_path, encoding):
    # UTF-16/32 text is full of NUL bytes: they are looked for after
    # decoding, so only a file that is not text in `encoding` is "binary".
    path = tmp_path / "wide.txt"
    path.write_bytes("the cat sat.".encode(encoding))
    assert corpus.read_text(path, encoding) == "the cat sat."
    with pytest.raises(corpus.CorpusError, match="pass `encoding`"):
        corpus.read_text(path)  # as UTF-8


def test_default_corpus_is_package_data():
    text = corpus.default_corpus_text()
    assert len(text.split()) > 1000


def random_stream(seed, num_words=400, max_sentence=20):
    """Tokens 1, 2, ... (a word's id names its position) in random sentences."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_sentence, size=num_words)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)[:num_words]
    tokens = np.arange(1, num_words + 1, dtype=np.int32)
    return tokens, starts.astype(np.int32)


def window_examples(dataset):
    """(target position, context positions) of every weighted slot."""
    examples = []
    for windows, targets, weights in dataset.as_numpy_iterator():
        assert windows.shape == targets.shape == weights.shape
        for x, y, w in zip(windows, targets, weights, strict=True):
            assert np.array_equal(w, (y != 0).astype(w.dtype))
            for j in np.flatnonzero(w):
                context = x[: j + 1]
                examples.append(
                    (int(y[j]) - 1, tuple(context[context > 0] - 1))
                )
    return examples


@pytest.mark.parametrize("max_seq_len", [1, 3, 8])
@pytest.mark.parametrize("part", ["train", "validation"])
def test_windows_hold_every_target_once_with_its_sentence_context(
    max_seq_len, part
):
    tokens, starts = random_stream(seed=max_seq_len)
    positions = corpus.pair_positions(starts)
    split = 300  # mid-sentence: the held-out part starts inside one
    positions = positions[
        positions < split if part == "train" else positions >= split
    ]
    lengths = []
    for epoch_seed, epochs in ((None, 1), (3, 4)):
        ds = examples.make_window_dataset(
            tokens, starts, positions, max_seq_len, 7, shuffle_seed=epoch_seed
        )
        for _ in range(epochs):
            pairs = window_examples(ds)
            targets = sorted(t for t, _ in pairs)
            if epoch_seed is None:
                assert targets == positions.tolist()
            else:  # all but the windows past the fewest an epoch has
                assert len(set(targets)) == len(targets)
                assert set(targets) <= set(positions.tolist())
                windows = sum(len(x) for x, _, _ in ds.as_numpy_iterator())
                fewest = examples.window_count(positions, starts, max_seq_len)
                assert fewest <= windows <= -(-fewest // 7) * 7
            for target, context in pairs:
                # The words just before the target, in its sentence, as many
                # as the window holds: a suffix of the serving context.
                assert 1 <= len(context) <= max_seq_len
                assert context == tuple(range(target - len(context), target))
                assert context[0] >= starts[target]
            lengths.append(dict((t, len(c)) for t, c in pairs))
    # In stream order every window's last target sees its full context.
    ordered = examples.make_window_dataset(
        tokens, starts, positions, max_seq_len, 7
    )
    for x, y, _ in ordered.as_numpy_iterator():
        last = y[:, -1] - 1
        full = np.minimum(max_seq_len, last - starts[last])
        assert np.array_equal((x > 0).sum(axis=1), full)
    if max_seq_len > 1:  # the cuts move between shuffled epochs
        assert any(a != b for a, b in zip(lengths[1:], lengths[2:]))


def test_window_count_is_the_fewest_windows_of_an_epoch():
    # Sentences start at 0 and 6: targets 1-5 and 7-8. Windows of 2 end at
    # even targets and run ends (2 4 5 8) with offset 0, at odd targets
    # and run ends (1 3 5 7 8) with offset 1.
    starts = np.array([0] * 6 + [6] * 3, np.int32)
    positions = corpus.pair_positions(starts)
    ends, firsts = examples.window_ends(positions, starts, 2, 0)
    assert ends.numpy().tolist() == [2, 4, 5, 8]
    assert firsts.numpy().tolist() == [1, 3, 5, 7]
    ends, firsts = examples.window_ends(positions, starts, 2, 1)
    assert ends.numpy().tolist() == [1, 3, 5, 7, 8]
    assert firsts.numpy().tolist() == [1, 2, 4, 7, 8]
    assert examples.window_count(positions, starts, 2) == 4
