"""`moe.losses` against NumPy: loads, the load-balancing loss, the z-loss and
the router entropy, with and without a token mask, and on no tokens."""

import numpy as np
import pytest
from keras import ops
from moe_reference import softmax

from moe import losses


def to_numpy(x):
    return ops.convert_to_numpy(x)


def tensor(x):
    return None if x is None else ops.convert_to_tensor(x)


def case(seed=0, tokens=10, experts=4):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(tokens, experts)).astype("float32") * 3
    indices = np.argsort(-logits, axis=1)[:, :2].astype("int32")
    mask = (np.arange(tokens) % 3 != 0).astype("float32")
    return logits, softmax(logits).astype("float32"), indices, mask


@pytest.mark.parametrize("masked", [False, True])
def test_expert_load_is_the_share_of_routed_pairs(masked):
    _, probs, indices, mask = case()
    m = mask if masked else None
    got = to_numpy(losses.expert_load(tensor(indices), None, 4, tensor(m)))
    rows = indices[mask > 0] if masked else indices
    want = np.bincount(rows.reshape(-1), minlength=4) / rows.size
    np.testing.assert_allclose(got, want, rtol=1e-6)
    soft = to_numpy(
        losses.expert_load(None, tensor(probs), 4, tensor(m), soft=True)
    )
    np.testing.assert_allclose(
        soft, (probs[mask > 0] if masked else probs).mean(0), rtol=1e-5
    )


def test_expert_choice_load():
    picked = np.array([[1, 1, 0], [1, 1, 1], [0, 0, 0], [1, 0, 0]], bool)
    got = to_numpy(losses.expert_choice_load(tensor(picked)))
    np.testing.assert_allclose(got, [2 / 6, 3 / 6, 0, 1 / 6], rtol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_and_z_loss_and_entropy(masked):
    logits, probs, indices, mask = case(1)
    m = mask if masked else None
    keep = mask > 0 if masked else np.ones(len(probs), bool)
    load = np.bincount(indices[keep].reshape(-1), minlength=4) / (
        2 * keep.sum()
    )
    load = load.astype("float32")
    got = float(
        to_numpy(
            losses.load_balancing_loss(tensor(probs), tensor(load), tensor(m))
        )
    )
    np.testing.assert_allclose(
        got, 4 * np.sum(load * probs[keep].mean(0)), rtol=1e-5
    )
    z = float(to_numpy(losses.router_z_loss(tensor(logits), tensor(m))))
    lse = np.log(np.exp(logits[keep].astype(np.float64)).sum(axis=1))
    np.testing.assert_allclose(z, np.mean(lse**2), rtol=1e-5)
    entropy = float(to_numpy(losses.router_entropy(tensor(probs), tensor(m))))
    p = probs[keep].astype(np.float64)
    np.testing.assert_allclose(
        entropy, np.mean(-(p * np.log(p)).sum(axis=1)), rtol=1e-5
    )


def test_balanced_and_collapsed_routers_bound_the_loss():
    uniform = np.full((8, 4), 0.25, "float32")
    balanced = np.full(4, 0.25, "float32")
    assert float(
        to_numpy(losses.load_balancing_loss(tensor(uniform), tensor(balanced)))
    ) == (pytest.approx(1.0))
    collapsed = np.zeros((8, 4), "float32")
    collapsed[:, 0] = 1.0
    load = np.array([1.0, 0, 0, 0], "float32")
    assert float(
        to_numpy(losses.load_balancing_loss(tensor(collapsed), tensor(load)))
    ) == (pytest.approx(4.0))


@pytest.mark.parametrize("masked", [False, True])
def test_no_tokens_give_zero_not_nan(masked):
    # An empty batch, or every token masked.
    tokens = 0 if not masked else 3
    probs = np.full((tokens, 4), 0.25, "float32")
    indices = np.zeros((tokens, 2), "int32")
    m = np.zeros(tokens, "float32") if masked else None
    values = [
        losses.expert_load(tensor(indices), None, 4, tensor(m)),
        losses.load_balancing_loss(
            tensor(probs), tensor(np.zeros(4, "float32")), tensor(m)
        ),
        losses.router_z_loss(
            tensor(np.zeros((tokens, 4), "float32")), tensor(m)
        ),
        losses.router_entropy(tensor(probs), tensor(m)),
    ]
    for value in values:
        np.testing.assert_array_equal(to_numpy(value), 0.0)
