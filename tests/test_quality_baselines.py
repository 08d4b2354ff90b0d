"""`bench/quality.py`'s count baselines against brute-force references.

The n-gram baselines are what the neural models are judged against, so
they are checked like the layers are: against slow, obviously-correct
Python that scans the whole training part for every held-out position.
"""

import importlib.util

import numpy as np
import pytest
from conftest import REPO_ROOT

from moe.lm.text.tokenizer import NUM_RESERVED


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location(
        "quality_bench", REPO_ROOT / "bench" / "quality.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_stream(seed, length=400, vocab=12, sentences=30):
    """Tokens (with some OOV ids) and sentence starts, like `token_stream`."""
    rng = np.random.default_rng(seed)
    # Skewed word frequencies, so that counts and ties both occur.
    probs = 1.0 / np.arange(1, vocab - NUM_RESERVED + 1)
    words = rng.choice(
        np.arange(NUM_RESERVED, vocab), size=length, p=probs / probs.sum()
    )
    words[rng.random(length) < 0.05] = 1  # out of vocabulary
    cuts = np.sort(rng.choice(np.arange(1, length), sentences, replace=False))
    starts = np.zeros(length, np.int32)
    for cut in cuts:
        starts[cut:] = cut
    return words.astype(np.int32), starts


def reference_ranking(tokens, starts, train_pos, position, order):
    """The top 5 by scanning the training part (no shared code)."""

    def context(t, n):
        # The n previous words of t's sentence, 0 before its start.
        return tuple(
            int(tokens[i]) if i >= starts[t] else 0 for i in range(t - n, t)
        )

    unigram = {}
    for t in train_pos:
        unigram[int(tokens[t])] = unigram.get(int(tokens[t]), 0) + 1
    ranking = []
    for n in range(order - 1, 0, -1):
        wanted = context(position, n)
        counts = {}
        for t in train_pos:
            word = int(tokens[t])
            if word >= NUM_RESERVED and context(t, n) == wanted:
                counts[word] = counts.get(word, 0) + 1
        for word in sorted(
            counts, key=lambda w: (-counts[w], -unigram.get(w, 0), w)
        ):
            if word not in ranking:
                ranking.append(word)
    for word in sorted(unigram, key=lambda w: (-unigram[w], w)):
        if word >= NUM_RESERVED and word not in ranking:
            ranking.append(word)
    return ranking[:5]


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_ngram_baseline_matches_brute_force(quality, order, seed):
    tokens, starts = random_stream(seed)
    positions = np.flatnonzero(np.arange(len(tokens)) > starts)
    train_pos, val_pos = positions[:300], positions[300:]
    got = quality.ngram_baseline(tokens, starts, train_pos, val_pos, order)

    rankings = [
        reference_ranking(tokens, starts, train_pos, p, order) for p in val_pos
    ]
    targets = tokens[val_pos]
    top1 = np.mean([r[0] == y for r, y in zip(rankings, targets)])
    top5 = np.mean([y in r for r, y in zip(rankings, targets)])
    assert got["accuracy"] == pytest.approx(top1)
    assert got["top5_accuracy"] == pytest.approx(top5)
    assert 0 < got["accuracy"] <= got["top5_accuracy"] < 1


def test_trigram_uses_the_second_word_back(quality):
    # "a b -> x" and "c b -> y": the bigram cannot tell them apart (b is
    # followed by x and y equally often), the trigram can.
    a, b, c, x, y = range(NUM_RESERVED, NUM_RESERVED + 5)
    sentences = [[a, b, x], [c, b, y]] * 5 + [[a, b, x], [c, b, y]]
    tokens = np.asarray([w for s in sentences for w in s], np.int32)
    starts = np.repeat(np.arange(0, len(tokens), 3), 3).astype(np.int32)
    positions = np.flatnonzero(np.arange(len(tokens)) > starts)
    train_pos, val_pos = positions[:-4], positions[-4:]  # the last 2 sentences
    bigram = quality.ngram_baseline(tokens, starts, train_pos, val_pos, 2)
    trigram = quality.ngram_baseline(tokens, starts, train_pos, val_pos, 3)
    assert trigram["accuracy"] == 1.0
    assert bigram["accuracy"] == 0.75  # a->b, c->b right; one of x / y wrong


def test_book_baselines_score_validation_and_test(quality, tmp_path):
    import json

    from conftest import LM_TINY_SENTENCES

    books = tmp_path / "books"
    books.mkdir()
    for i, name in enumerate(["a", "b", "c"]):
        lines = LM_TINY_SENTENCES[i:] + LM_TINY_SENTENCES[:i]
        (books / f"{name}.txt").write_text("\n".join(lines * 4) + "\n")
    out = tmp_path / "books.json"
    quality.main(["--books", str(books), "--validate-book", "b",
                  "--test-book", "c", "--json", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    assert (report["validate"], report["test"]) == ("b.txt", "c.txt")
    assert set(report["results"]) == {"bigram", "trigram", "kn3", "kn4"}
    for part in ("validation", "test"):
        kn = report["results"]["kn3"][part]
        assert 1 < kn["perplexity"] < report["vocab_size"]
        assert 0 <= kn["accuracy"] <= kn["top5_accuracy"] <= 1
