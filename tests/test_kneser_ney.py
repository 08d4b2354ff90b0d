"""Interpolated modified Kneser-Ney against hand-computed values."""

import numpy as np
import pytest

from moe.lm.analysis.baselines import (
    KneserNey,
    context_rows,
    modified_discounts,
)
from moe.lm.text.corpus import pair_positions

# Ids: 0 padding, 1 OOV, then a=2, b=3, c=4.
A, B, C = 2, 3, 4


def stream(sentences):
    tokens = [w for s in sentences for w in s]
    starts, at = [], 0
    for s in sentences:
        starts += [at] * len(s)
        at += len(s)
    tokens, starts = np.asarray(tokens), np.asarray(starts)
    return tokens, starts, pair_positions(starts)


def test_discounts_from_counts_of_counts():
    # n1 = 4, n2 = 2, n3 = 1, n4 = 1: Y = 4 / 8 = 0.5.
    d1, d2, d3 = modified_discounts([1, 1, 1, 1, 2, 2, 3, 4])
    assert d1 == pytest.approx(1 - 2 * 0.5 * 2 / 4)  # 0.5
    assert d2 == pytest.approx(2 - 3 * 0.5 * 1 / 2)  # 1.25
    assert d3 == pytest.approx(3 - 4 * 0.5 * 1 / 1)  # 1.0


def test_bigram_by_hand():
    # Sentences "a b", "a b", "a c", "b c": targets b, b, c, c with
    # contexts a, a, a, b.
    tokens, starts, positions = stream([[A, B], [A, B], [A, C], [B, C]])
    kn = KneserNey(tokens, starts, positions, 2, vocab_size=5)
    # Bigram counts: (a,b)=2, (a,c)=1, (b,c)=1 -> n1 = 2, n2 = 1:
    # Y = 2 / 4, D1 = 1 - 2 Y n2/n1 = 0.5, D2 = 2 - 3 Y n3/n2 = 2 (n3 = 0).
    d1, d2, _ = kn.discounts[1]
    assert (d1, d2) == pytest.approx((0.5, 2.0))
    # Unigram continuation counts: b after {a}: 1, c after {a, b}: 2;
    # counts of counts n1 = 1, n2 = 1 -> Y = 1/3, D1 = 1 - 2/3 * 1 = 1/3,
    # D2 = 2 (n3 = 0).
    u1, u2, _ = kn.discounts[0]
    assert (u1, u2) == pytest.approx((1 / 3, 2.0))
    uniform = 1 / 4  # ids 1..4
    gamma0 = (u1 + u2) / 3
    p_uni = {
        w: gamma0 * uniform + max(c - d, 0) / 3
        for w, c, d in ((B, 1, u1), (C, 2, u2))
    }
    p_uni[1] = p_uni[A] = gamma0 * uniform
    # P(.|a): counts b=2, c=1, total 3, gamma = (D1 + D2) / 3.
    gamma = (d1 + d2) / 3
    expected = {w: gamma * p_uni[w] for w in (1, A, B, C)}
    expected[B] += (2 - d2) / 3
    expected[C] += (1 - d1) / 3
    got = kn.distribution([A])
    assert got[0] == 0.0
    for w, p in expected.items():
        assert got[w] == pytest.approx(p)
    # An unseen context backs off to the unigram level entirely.
    assert kn.distribution([C])[B] == pytest.approx(p_uni[B])


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_distributions_sum_to_one(order):
    rng = np.random.default_rng(order)
    sentences = [
        list(rng.integers(1, 12, rng.integers(2, 9))) for _ in range(60)
    ]
    tokens, starts, positions = stream(sentences)
    kn = KneserNey(tokens, starts, positions[:200], order, vocab_size=12)
    rows = context_rows(tokens, starts, positions, max(order - 1, 0))
    for row in rows[::7]:
        probs = kn.distribution(row)
        assert probs.sum() == pytest.approx(1.0)
        assert probs[0] == 0 and np.all(probs[1:] > 0)


def test_longer_context_helps_where_it_should():
    # "a b -> a" (6 times) and "c b -> c" (5 times): the bigram always
    # follows b with a, only the trigram tells them apart.
    tokens, starts, positions = stream([[A, B, A]] * 6 + [[C, B, C]] * 5)
    for order, top1 in ((2, 17 / 22), (3, 1.0)):
        kn = KneserNey(tokens, starts, positions, order, vocab_size=5)
        m = kn.evaluate(tokens, starts, positions)
        assert m["accuracy"] == pytest.approx(top1)
