"""`moe.routing`'s pure functions against NumPy loops."""

import math

import numpy as np
import pytest
from keras import ops
from moe_reference import sigmoid, softmax, top_k_choice

from moe import dispatch, routing


def to_numpy(x):
    return ops.convert_to_numpy(x)


def tensor(x):
    return ops.convert_to_tensor(x)


def scores(shape=(9, 8), seed=0):
    return softmax(np.random.default_rng(seed).normal(size=shape)).astype(
        "float32"
    )


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_expert_scores(score_function):
    logits = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    got = to_numpy(routing.expert_scores(tensor(logits), score_function))
    want = softmax(logits) if score_function == "softmax" else sigmoid(logits)
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("group_score", ["max", "top2_sum"])
@pytest.mark.parametrize("groups_per_token", [1, 3])
def test_limit_to_groups_keeps_the_best_groups(group_score, groups_per_token):
    s = scores()
    got = to_numpy(
        routing.limit_to_groups(tensor(s), 4, groups_per_token, group_score)
    )
    for t in range(len(s)):
        grouped = s[t].reshape(4, 2)
        per_group = (
            grouped.max(axis=1)
            if group_score == "max"
            else np.sort(grouped, axis=1)[:, -2:].sum(axis=1)
        )
        kept = np.argsort(-per_group, kind="stable")[:groups_per_token]
        for e in range(8):
            if e // 2 in kept:
                assert got[t, e] == s[t, e]
            else:
                assert got[t, e] == -np.inf


@pytest.mark.parametrize(
    "options",
    [
        dict(normalize=True),
        dict(normalize=False, scaling_factor=2.5),
        dict(normalize=True, selection_bias="random"),
        dict(
            normalize=True,
            num_groups=4,
            groups_per_token=2,
            group_score="top2_sum",
            selection_bias="random",
            scaling_factor=2.5,
        ),
        dict(normalize=False, num_groups=2, groups_per_token=1),
    ],
)
def test_top_k_selection_equals_per_token_loop(options):
    s = scores(seed=1)
    options = dict(options)
    bias = None
    if options.pop("selection_bias", None):
        bias = np.random.default_rng(2).normal(0, 0.1, 8).astype("float32")
    indices, weights = routing.top_k_selection(
        tensor(s),
        3,
        selection_bias=None if bias is None else tensor(bias),
        **options,
    )
    groups = None
    if "num_groups" in options:
        groups = (
            options["num_groups"],
            options["groups_per_token"],
            options.get("group_score", "max"),
        )
    for t in range(len(s)):
        want = top_k_choice(
            s[t].astype(np.float64),
            3,
            options["normalize"],
            options.get("scaling_factor", 1.0),
            bias,
            groups,
        )
        assert to_numpy(indices)[t].tolist() == [e for e, _ in want]
        np.testing.assert_allclose(
            to_numpy(weights)[t], [w for _, w in want], rtol=1e-5
        )


def test_top_k_selection_and_soft_routing():
    s = scores()
    indices, weights = routing.top_k_selection(tensor(s), 2, normalize=False)
    np.testing.assert_array_equal(
        to_numpy(indices), np.argsort(-s, axis=1, kind="stable")[:, :2]
    )
    np.testing.assert_allclose(
        to_numpy(weights), -np.sort(-s, axis=1)[:, :2], rtol=1e-6
    )
    indices, weights = routing.soft_routing(tensor(s))
    np.testing.assert_array_equal(
        to_numpy(indices), np.tile(np.arange(8), (9, 1))
    )
    np.testing.assert_array_equal(to_numpy(weights), s)


@pytest.mark.parametrize(
    "tokens, factor, want",
    [(12, 2.0, 3), (12, 0.1, 1), (3, 8.0, 3), (0, 2.0, 0), (1, 2.0, 1)],
)
def test_expert_choice_capacity(tokens, factor, want):
    # Expert choice's picks per expert, the capacity rule with k = 1:
    # ceil(factor * tokens / 8), clipped to [1, tokens] (0 without tokens).
    assert dispatch.expert_capacity(tokens, 1, 8, factor) == want
    tensor = dispatch.expert_capacity(
        ops.convert_to_tensor(tokens), 1, 8, factor
    )
    assert int(to_numpy(tensor)) == want


def test_expert_choice_routing_picks_best_unmasked_tokens():
    s = scores((10, 4), seed=3)
    mask = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], bool)
    indices, weights, picked = routing.expert_choice_routing(
        tensor(s), 3, tensor(mask)
    )
    for e in range(4):
        candidates = sorted(np.flatnonzero(mask), key=lambda t: -s[t, e])[:3]
        assert to_numpy(indices)[e].tolist() == candidates
        np.testing.assert_allclose(to_numpy(weights)[e], s[candidates, e])
    assert to_numpy(picked).all()
    # More picks than routed tokens: the extra picks are not real.
    few = np.zeros(10, bool)
    few[:2] = True
    _, weights, picked = routing.expert_choice_routing(
        tensor(s), 3, tensor(few)
    )
    assert to_numpy(picked).sum(axis=1).tolist() == [2, 2, 2, 2]
    assert (to_numpy(weights)[~to_numpy(picked)] == 0).all()


def test_hierarchical_routing_equals_loop():
    rng = np.random.default_rng(4)
    group_probs = softmax(rng.normal(size=(6, 2))).astype("float32")
    logits = rng.normal(size=(6, 8)).astype("float32")
    indices, weights, joint = routing.hierarchical_routing(
        tensor(group_probs), tensor(logits), 2, 3
    )
    for t in range(6):
        pairs = []
        for g in np.argsort(-group_probs[t], kind="stable"):
            within = softmax(logits[t, 4 * g : 4 * g + 4])
            for m in np.argsort(-within, kind="stable")[:3]:
                pairs.append((4 * g + m, group_probs[t, g] * within[m]))
        assert to_numpy(indices)[t].tolist() == [e for e, _ in pairs]
        np.testing.assert_allclose(
            to_numpy(weights)[t], [w for _, w in pairs], rtol=1e-5
        )
    np.testing.assert_allclose(to_numpy(joint).sum(axis=1), 1.0, rtol=1e-5)


def test_hash_routing_is_the_documented_formula():
    keys = np.array([0, 1, 46337, 2**31 - 1, 123456], "int32")
    indices, weights = routing.hash_routing(tensor(keys), 8)
    for key, expert in zip(keys, to_numpy(indices)[:, 0]):
        q, r = divmod(int(key), 46337)
        h = (28411 * r + 17389 * (q % 46337) + 9241) % 46337
        assert expert == (h * h + 31607) % 46337 % 8
    np.testing.assert_array_equal(to_numpy(weights), 1.0)
    assert math.isclose(float(to_numpy(weights).sum()), 5.0)
