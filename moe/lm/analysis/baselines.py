"""Count baselines for next-word prediction: n-gram backoff ranking and
interpolated modified Kneser-Ney (pure NumPy, no TensorFlow).

Both read the same token stream as the neural models (`tokens`, `starts`
from `moe.lm.text.corpus.token_stream`) and the same target positions: a
context is the `order - 1` previous words of the sentence, padding (id 0)
before its start, so "sentence start" is a context of its own. The
out-of-vocabulary id is a word like any other to count and to give a
probability to, and never a prediction (`moe.lm.model.metrics`' rules).

`KneserNey` is interpolated Kneser-Ney with the modified discounts of Chen
and Goodman (1998): three discounts per order, from the counts of counts;
the highest order uses raw counts, lower orders continuation counts (how
many distinct words precede), and the unigram is interpolated with the
uniform distribution over the vocabulary (every id but padding).
"""

import numpy as np

from moe.lm.model.metrics import next_word_metrics
from moe.lm.text.tokenizer import NUM_RESERVED


def context_rows(tokens, starts, positions, length: int) -> np.ndarray:
    """`(len(positions), length)`: the words before each position within its
    sentence, left-padded with 0 (NumPy twin of
    `moe.lm.text.examples.contexts`)."""
    tokens, starts = np.asarray(tokens), np.asarray(starts)
    positions = np.asarray(positions)
    index = positions[:, None] + np.arange(-length, 0)
    rows = tokens[np.maximum(index, 0)]
    return np.where(index >= starts[positions][:, None], rows, 0)


def ngram_baseline(tokens, starts, train_pos, val_pos, order) -> dict:
    """Top-1 / top-5 held-out accuracy of an n-gram count model with backoff.

    The ranking is the followers of the longest context seen in training,
    by count, then those of the next shorter context, and so on, then
    every word by unigram count; ties go to the more frequent word (then
    the lower id). Padding and out-of-vocabulary are never predicted.
    `order=2` is the bigram model.
    """
    tokens = np.asarray(tokens)
    context_len = order - 1
    unigram = np.bincount(tokens[train_pos], minlength=NUM_RESERVED)
    by_frequency = [
        int(w) for w in np.argsort(-unigram, kind="stable")
        if w >= NUM_RESERVED
    ][:5]  # fmt: skip
    followers = {}  # context suffix (shorter ones too) -> {word: count}
    rows = context_rows(tokens, starts, train_pos, context_len)
    for row, word in zip(rows, tokens[train_pos]):
        if word < NUM_RESERVED:
            continue
        for n in range(1, context_len + 1):
            counts = followers.setdefault(tuple(row[-n:]), {})
            counts[int(word)] = counts.get(int(word), 0) + 1
    hits = np.zeros((len(val_pos), 5), bool)
    rows = context_rows(tokens, starts, val_pos, context_len)
    for i, (row, target) in enumerate(zip(rows, tokens[val_pos])):
        ranking = []
        for n in range(context_len, 0, -1):  # longest context first
            counts = followers.get(tuple(row[-n:]), {})
            ranked = sorted(counts, key=lambda w: (-counts[w], -unigram[w], w))
            ranking += [w for w in ranked if w not in ranking]
            if len(ranking) >= 5:
                break
        ranking += [w for w in by_frequency if w not in ranking]
        hits[i] = np.asarray(ranking[:5]) == target
    return {
        "accuracy": float(hits[:, 0].mean()),
        "top5_accuracy": float(hits.any(axis=1).mean()),
    }


def modified_discounts(counts) -> tuple[float, float, float]:
    """Chen and Goodman's D1, D2, D3+ from a level's n-gram counts.

    `Y = n1 / (n1 + 2 n2)`, `Dk = k - (k + 1) Y n(k+1) / nk`, with `nk` the
    number of n-grams seen exactly k times; each is kept in [0, k] (a
    level too small to estimate them gets 0.5 for the missing ones).
    """
    counts = np.asarray(list(counts))
    n = [int(np.sum(counts == k)) for k in (1, 2, 3, 4)]
    if n[0] == 0 or n[1] == 0:
        return 0.5, 0.5, 0.5
    y = n[0] / (n[0] + 2 * n[1])
    out = []
    for k in (1, 2, 3):
        if n[k - 1] == 0:
            out.append(0.5)
        else:
            out.append(min(k, max(0.0, k - (k + 1) * y * n[k] / n[k - 1])))
    return tuple(out)


class KneserNey:
    """Interpolated modified Kneser-Ney n-gram model of a token stream.

    Args:
        tokens, starts: the token stream and its sentence starts.
        train_pos: the training target positions.
        order: n (3: two words of context).
        vocab_size: ids `0..vocab_size - 1`; id 0 (padding) gets no
            probability, the others share the uniform floor.

    `probabilities(rows)` gives the next-word distribution of contexts,
    `evaluate(...)` the held-out metrics.
    """

    def __init__(self, tokens, starts, train_pos, order: int, vocab_size):
        if order < 1:
            raise ValueError(f"`order` must be at least 1. Received: {order}")
        self.order, self.vocab_size = order, vocab_size
        tokens = np.asarray(tokens)
        rows = context_rows(tokens, starts, train_pos, order - 1)
        grams = np.concatenate([rows, tokens[train_pos][:, None]], axis=1)
        # levels[k]: {context of k words: {word: count}}, raw counts at the
        # top, continuation counts (distinct preceding words) below.
        self.levels = []
        for k in range(order):
            table = {}
            if k == order - 1:
                source = grams
            else:  # distinct (preceding word, context, word) of k + 2 words
                source = np.unique(grams[:, -(k + 2) :], axis=0)[:, 1:]
            for *context, word in map(tuple, source.tolist()):
                followers = table.setdefault(tuple(context), {})
                followers[word] = followers.get(word, 0) + 1
            self.levels.append(table)
        self.discounts = [
            modified_discounts(
                c for followers in table.values() for c in followers.values()
            )
            for table in self.levels
        ]
        self._cache = {}

    def _discount(self, k, count):
        d1, d2, d3 = self.discounts[k]
        return np.where(count == 1, d1, np.where(count == 2, d2, d3))

    def distribution(self, context) -> np.ndarray:
        """`(vocab_size,)` float64: P(next word | `context`), the last
        `order - 1` words (0 for padding) as a sequence."""
        n = self.order - 1
        context = tuple(int(w) for w in context)
        context = context[len(context) - n :] if n else ()
        if context in self._cache:
            return self._cache[context]
        probs = np.full(self.vocab_size, 1.0 / (self.vocab_size - 1))
        probs[0] = 0.0  # padding
        for k in range(self.order):
            followers = self.levels[k].get(context[n - k :])
            if not followers:
                continue
            words = np.fromiter(followers, int, len(followers))
            counts = np.fromiter(followers.values(), float, len(followers))
            discount = self._discount(k, counts)
            total = counts.sum()
            d1, d2, d3 = self.discounts[k]
            gamma = (
                d1 * np.sum(counts == 1)
                + d2 * np.sum(counts == 2)
                + d3 * np.sum(counts >= 3)
            ) / total
            lower = probs
            probs = gamma * lower
            probs[words] += np.maximum(counts - discount, 0.0) / total
        if len(self._cache) < 200_000:
            self._cache[context] = probs
        return probs

    def evaluate(self, tokens, starts, positions, chunk=1024) -> dict:
        """Top-1 / top-5 accuracy and perplexity at `positions`, by
        `moe.lm.model.metrics.next_word_metrics` (the models' rules)."""
        tokens = np.asarray(tokens)
        positions = np.asarray(positions)
        rows = context_rows(tokens, starts, positions, self.order - 1)
        sums = {"accuracy": 0.0, "top5_accuracy": 0.0, "log_ppl": 0.0}
        for i in range(0, len(positions), chunk):
            part = slice(i, i + chunk)
            probs = np.stack([self.distribution(r) for r in rows[part]])
            m = next_word_metrics(probs, tokens[positions[part]])
            sums["accuracy"] += m["accuracy"] * m["pairs"]
            sums["top5_accuracy"] += m["top5_accuracy"] * m["pairs"]
            sums["log_ppl"] += np.log(m["perplexity"]) * m["pairs"]
        n = len(positions)
        return {
            "accuracy": sums["accuracy"] / n,
            "top5_accuracy": sums["top5_accuracy"] / n,
            "perplexity": float(np.exp(sums["log_ppl"] / n)),
        }
