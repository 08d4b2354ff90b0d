import keras
import numpy as np
import pytest
from keras import ops
from layer_contract import check_layer_contract
from moe_reference import softmax

import moe


def test_soft_gating_returns_all_experts_with_probabilities():
    router = moe.GatingNetwork(num_experts=3)
    x = np.random.default_rng(0).normal(size=(2, 5, 4)).astype("float32")
    out = router(x)
    kernel = ops.convert_to_numpy(router.router_kernel)
    probs = softmax(x @ kernel)
    np.testing.assert_allclose(
        ops.convert_to_numpy(out["router_probs"]), probs, rtol=1e-5
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(out["expert_weights"]), probs, rtol=1e-5
    )
    np.testing.assert_array_equal(
        ops.convert_to_numpy(out["expert_indices"]),
        np.broadcast_to(np.arange(3), (2, 5, 3)),
    )


@pytest.mark.parametrize("normalize", [True, False])
def test_top_k_gating_picks_most_probable(normalize):
    router = moe.GatingNetwork(
        num_experts=5, top_k=2, normalize_top_k=normalize
    )
    x = np.random.default_rng(1).normal(size=(7, 4)).astype("float32")
    out = {k: ops.convert_to_numpy(v) for k, v in router(x).items()}
    probs = softmax(x @ ops.convert_to_numpy(router.router_kernel))
    want = np.argsort(-probs, axis=-1)[:, :2]
    np.testing.assert_array_equal(out["expert_indices"], want)
    weights = np.take_along_axis(probs, want, axis=-1)
    if normalize:
        weights = weights / weights.sum(-1, keepdims=True)
    np.testing.assert_allclose(out["expert_weights"], weights, rtol=1e-5)
    assert out["expert_indices"].dtype == np.int32


def test_noise_and_jitter_only_in_training():
    router = moe.GatingNetwork(
        num_experts=4, top_k=1, noisy=True, jitter_noise=0.2, seed=0
    )
    x = np.random.default_rng(2).normal(size=(64, 4)).astype("float32")
    clean = ops.convert_to_numpy(router(x)["router_logits"])
    again = ops.convert_to_numpy(router(x, training=False)["router_logits"])
    noisy = ops.convert_to_numpy(router(x, training=True)["router_logits"])
    np.testing.assert_array_equal(clean, again)
    assert np.abs(noisy - clean).mean() > 1e-3
    np.testing.assert_allclose(
        clean, x @ ops.convert_to_numpy(router.router_kernel), atol=1e-5
    )


def test_router_runs_in_float32_under_mixed_precision():
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        router = moe.GatingNetwork(num_experts=4, top_k=2)
        out = router(np.ones((2, 3), "float32"))
        assert router.compute_dtype == "float32"
        assert keras.backend.standardize_dtype(out["router_probs"].dtype) == (
            "float32"
        )
    finally:
        keras.config.set_dtype_policy("float32")


def test_config_round_trip_and_errors():
    router = moe.GatingNetwork(num_experts=4, top_k=3, noisy=True, seed=5)
    clone = moe.GatingNetwork.from_config(router.get_config())
    assert clone.get_config() == router.get_config()
    with pytest.raises(ValueError, match="Received: top_k=5"):
        moe.GatingNetwork(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="Received: num_experts=0"):
        moe.GatingNetwork(num_experts=0)
    for bad in (float("nan"), -0.1, 1.0, "0.1"):
        with pytest.raises(ValueError, match="Received: jitter_noise="):
            moe.GatingNetwork(num_experts=4, jitter_noise=bad)
    with pytest.raises(ValueError, match="Received: use_bias=1"):
        moe.GatingNetwork(num_experts=4, use_bias=1)


def test_bias_is_added_to_the_logits(tmp_path):
    def make():
        return moe.GatingNetwork(4, top_k=2, use_bias=True, name="gate")

    x = np.random.default_rng(0).normal(size=(8, 6)).astype("float32")
    check_layer_contract(
        make,
        x,
        output_fn=lambda decision: decision["router_probs"],
        tmp_path=tmp_path,
    )
    router = make()
    router.build((None, 6))
    bias = np.array([0.5, -1.0, 2.0, 0.0], "float32")
    router.router_bias.assign(bias)
    logits = keras.ops.convert_to_numpy(router(x)["router_logits"])
    kernel = keras.ops.convert_to_numpy(router.router_kernel)
    np.testing.assert_allclose(logits, x @ kernel + bias, rtol=1e-6, atol=1e-6)
    assert router.get_config()["use_bias"] is True


def test_symbolic_call_in_functional_model():
    inputs = keras.Input((3, 4))
    out = moe.GatingNetwork(num_experts=6, top_k=2)(inputs)
    assert tuple(out["expert_indices"].shape) == (None, 3, 2)
    assert tuple(out["router_probs"].shape) == (None, 3, 6)


def test_layer_contract(tmp_path):
    check_layer_contract(
        lambda: moe.GatingNetwork(4, top_k=2, noisy=True, seed=1, name="gate"),
        np.random.default_rng(0).normal(size=(8, 6)).astype("float32"),
        output_fn=lambda decision: decision["router_probs"],
        tmp_path=tmp_path,
    )
