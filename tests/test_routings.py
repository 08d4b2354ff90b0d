"""Expert-choice, hash and hierarchical routing and shared experts: the same
guarantees as top-k (reference outputs, sparsity, losses, telemetry, saving,
compiled calls), checked against the NumPy reference in moe_reference.

Runs on the backend KERAS_BACKEND names; test_backends.py (the backend
matrix) reruns its backend-dependent tests on the others.
"""

import math

import keras
import numpy as np
import pytest
from keras import ops
from layer_contract import check_layer_contract
from moe_reference import (
    expert_choice_forward,
    hash_expert,
    layer_params,
    moe_forward,
    softmax,
)

import moe

BACKEND = keras.backend.backend()
# JAX compiles every eager op for every new shape, which makes each case
# cost seconds: there, one case per routing runs (the others on TensorFlow
# and PyTorch).
NOT_ON_JAX = pytest.mark.skipif(
    BACKEND == "jax", reason="JAX runs one case per routing (slow eager ops)"
)

# name -> MoELayer arguments; 4 experts of hidden width 5 on 6 features.
CASES = {
    "expert_choice": dict(routing="expert_choice"),
    "expert_choice_cf0.5": dict(routing="expert_choice", capacity_factor=0.5),
    "hash": dict(routing="hash"),
    "hash_cf0.5": dict(routing="hash", capacity_factor=0.5),
    "hierarchical": dict(routing="hierarchical", num_groups=2),
    "hierarchical_2x1_cf1": dict(
        routing="hierarchical",
        num_groups=2,
        groups_per_token=2,
        top_k=1,
        capacity_factor=1.0,
    ),
    "top_k_shared": dict(num_shared_experts=2),
    "soft_shared": dict(routing="soft", num_shared_experts=1),
    "expert_choice_shared": dict(
        routing="expert_choice", num_shared_experts=1, gated=True
    ),
    "hash_shared": dict(routing="hash", num_shared_experts=1),
}


def make_layer(case, input_dim=6, **overrides):
    keras.utils.set_random_seed(0)
    kwargs = dict(num_experts=4, hidden_dim=5, **CASES[case])
    kwargs.update(overrides)
    layer = moe.MoELayer(**kwargs)
    layer.build((None, input_dim))
    return layer


def random_inputs(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def routing_keys(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 10_000, shape, "int32")


def to_numpy(x):
    return ops.convert_to_numpy(x)


def key_kwargs(layer, x):
    """`routing_key=` for hash layers (keys from the inputs' shape)."""
    if layer.routing != "hash":
        return {}
    return {"routing_key": routing_keys(x.shape[:-1])}


def reference(layer, x, mask=None, routing_key=None):
    """NumPy output and `(tokens, k)` kept flags (expert choice: picks)."""
    params = layer_params(layer)
    activation = keras.activations.serialize(layer.activation)
    common = dict(mask=mask, activation=activation, gated=layer.gated)
    if layer.routing == "expert_choice":
        return expert_choice_forward(
            params, x, layer.router.expert_choice_capacity_factor, **common
        )
    k = layer.experts_per_input
    if layer.routing == "hierarchical":
        k = layer.router.experts_per_group
    return moe_forward(
        params,
        x,
        layer.routing,
        k,
        layer.capacity_factor,
        routing_keys=routing_key,
        num_groups=layer.num_groups,
        group_k=getattr(layer.router, "groups_per_input", 1),
        **common,
    )


def route_matrix(layer, x, **kwargs):
    """`(tokens, experts)` bool: expert `e` computes on token `t`."""
    info = layer.route(x, **kwargs)
    indices = to_numpy(info["expert_indices"]).reshape(-1, info_k(info))
    kept = to_numpy(info["kept"]).reshape(indices.shape)
    uses = np.zeros((len(indices), layer.num_experts), bool)
    for t, e in zip(*np.nonzero(kept)):
        uses[t, indices[t, e]] = True
    return uses


def info_k(info):
    return info["expert_indices"].shape[-1]


# --- Construction errors -----------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(routing="hierarchical"), "needs `num_groups`.*num_groups=None"),
        (
            dict(routing="hierarchical", num_groups=3),
            r"divides `num_experts` \(4\). Received: num_groups=3",
        ),
        (
            dict(routing="soft", num_groups=2),
            "`num_groups` is not used by `routing='soft'`",
        ),
        (
            dict(routing="hierarchical", num_groups=2, groups_per_token=3),
            "Received: groups_per_token=3",
        ),
        (
            dict(routing="hierarchical", num_groups=2, top_k=3),
            r"experts of a group.*\(2\). Received: top_k=3",
        ),
        (dict(routing="expert_choice", top_k=2), "Received: top_k=2"),
        (dict(routing="hash", top_k=2), "Received: top_k=2"),
        (dict(num_shared_experts=-1), "Received: num_shared_experts=-1"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        moe.MoELayer(num_experts=4, hidden_dim=8, **kwargs)


def test_hash_routing_key_errors():
    layer = make_layer("hash")
    x = random_inputs((2, 3, 6))
    with pytest.raises(ValueError, match="routing_key=ids.*routing_key=None"):
        layer(x)
    with pytest.raises(ValueError, match=r"routing_key.shape=\(2, 4\)"):
        layer(x, routing_key=np.zeros((2, 4), "int32"))
    with pytest.raises(ValueError, match="routing_key=None"):
        layer.route(x)
    with pytest.raises(ValueError, match="only used by `routing='hash'`"):
        make_layer("top_k_shared")(x, routing_key=np.zeros((2, 3), "int32"))


@pytest.mark.parametrize(
    "key, message",
    [
        (
            np.full((2, 3), 1.5, "float32"),
            r"an integer tensor .* Received: routing_key.dtype=float32",
        ),
        (np.ones((2, 3), "bool"), "Received: routing_key.dtype=bool"),
        (
            np.arange(-1, 5, dtype="int32").reshape(2, 3),
            r"integers in \[0, 2\*\*31\) .* Received: routing_key from -1 "
            "to 4",
        ),
        (
            # JAX without x64 wraps it to -2**31 on the way in.
            np.full((2, 3), 2**31, "int64"),
            "Received: routing_key from -?2147483648 to -?2147483648",
        ),
    ],
)
@pytest.mark.parametrize("method", ["call", "route"])
def test_hash_routing_key_must_be_integers_from_zero(key, message, method):
    # Eager: the values are checked too (docs/layers.md, "hash").
    layer = make_layer("hash")
    x = random_inputs((2, 3, 6))
    with pytest.raises(ValueError, match=message):
        (layer if method == "call" else layer.route)(x, routing_key=key)


# --- Outputs equal the slow reference ----------------------------------------


# Every case on rank 3 with a mask; rank 2 where capacity drops inputs.
# (One input shape throughout: JAX compiles each eager op once per shape.)
@pytest.mark.parametrize(
    "case, dispatch, rank",
    [
        pytest.param("expert_choice", "auto", 3, marks=NOT_ON_JAX),
        pytest.param("expert_choice_cf0.5", "auto", 2, marks=NOT_ON_JAX),
        ("expert_choice_cf0.5", "auto", 3),
        ("expert_choice_shared", "auto", 3),
        pytest.param("hash", "dynamic", 3, marks=NOT_ON_JAX),
        ("hash_cf0.5", "static", 2),
        pytest.param("hash_cf0.5", "dynamic", 3, marks=NOT_ON_JAX),
        pytest.param("hierarchical", "dynamic", 3, marks=NOT_ON_JAX),
        pytest.param("hierarchical", "static", 3, marks=NOT_ON_JAX),
        pytest.param("hierarchical_2x1_cf1", "dynamic", 2, marks=NOT_ON_JAX),
        ("hierarchical_2x1_cf1", "static", 3),
        ("top_k_shared", "static", 3),
        pytest.param("soft_shared", "auto", 3, marks=NOT_ON_JAX),
        pytest.param("hash_shared", "dynamic", 2, marks=NOT_ON_JAX),
    ],
)
def test_outputs_equal_reference(case, dispatch, rank):
    layer = make_layer(case, dispatch=dispatch)
    shape = (12, 6) if rank == 2 else (3, 4, 6)
    x = random_inputs(shape)
    mask = None
    if rank == 3:
        mask = np.arange(4)[None, :] < np.array([4, 2, 0])[:, None]
    keys = key_kwargs(layer, x)
    got = to_numpy(layer(x, mask=mask, **keys))
    want, kept = reference(layer, x, mask, keys.get("routing_key"))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    info = layer.route(x, mask=mask, **keys)
    if layer.routing == "expert_choice":
        np.testing.assert_array_equal(route_matrix(layer, x, mask=mask), kept)
    else:
        np.testing.assert_array_equal(
            to_numpy(info["kept"]).reshape(kept.shape), kept
        )
    if "cf0.5" in case and rank == 2:
        assert not kept.any(axis=1).all()  # some inputs are dropped


# --- Sparsity: a non-chosen expert cannot affect an input --------------------


def perturbed_outputs(layer, variables, index, call):
    """`call()` with every parameter of expert `index` of `variables`
    shifted by 10, then restored."""
    originals = [to_numpy(v) for v in variables]
    for variable, value in zip(variables, originals):
        changed = value.copy()
        changed[index] += 10.0
        variable.assign(changed)
    try:
        return to_numpy(call())
    finally:
        for variable, value in zip(variables, originals):
            variable.assign(value)


@pytest.mark.parametrize(
    "case, dispatch",
    [
        ("expert_choice_cf0.5", "auto"),
        pytest.param("hash_cf0.5", "static", marks=NOT_ON_JAX),
        ("hierarchical", "dynamic"),
        pytest.param("hierarchical_2x1_cf1", "static", marks=NOT_ON_JAX),
        ("top_k_shared", "dynamic"),
    ],
)
def test_perturbing_unchosen_expert_changes_nothing(case, dispatch):
    layer = make_layer(case, dispatch=dispatch)
    x = random_inputs((3, 4, 6))
    mask = np.arange(4)[None, :] < np.array([4, 3, 1])[:, None]
    kwargs = dict(mask=mask, **key_kwargs(layer, x))
    before = to_numpy(layer(x, **kwargs)).reshape(12, -1)
    uses = route_matrix(layer, x, **kwargs)
    assert uses.any() and not uses.all()
    for expert in range(layer.num_experts):
        after = perturbed_outputs(
            layer, layer.expert_weights, expert, lambda: layer(x, **kwargs)
        ).reshape(12, -1)
        users = uses[:, expert]
        # Exactly equal, not close: the expert is never computed on them.
        np.testing.assert_array_equal(after[~users], before[~users])
        assert np.all(np.abs(after[users] - before[users]).max(axis=1) > 1e-3)
    for shared in range(layer.num_shared_experts):
        after = perturbed_outputs(
            layer,
            layer.shared_expert_weights,
            shared,
            lambda: layer(x, **kwargs),
        ).reshape(12, -1)
        # Always on: every routed input changes, padding stays zero.
        routed = mask.reshape(-1)
        assert np.all(np.abs(after - before)[routed].max(axis=1) > 1e-3)
        np.testing.assert_array_equal(after[~routed], 0.0)


# --- Expert choice -----------------------------------------------------------


def test_expert_choice_each_expert_picks_capacity_unmasked_inputs():
    layer = make_layer("expert_choice", capacity_factor=1.0)
    x = random_inputs((3, 4, 6))
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], bool)
    uses = route_matrix(layer, x, mask=mask)  # (12, 4)
    # ceil(1.0 * 12 positions / 4 experts) = 3 picks each, never padding.
    np.testing.assert_array_equal(uses.sum(axis=0), [3, 3, 3, 3])
    assert not uses[~mask.reshape(-1)].any()
    # Masked positions do not compete: moving them changes nothing.
    changed = x.copy()
    changed[~mask] = 100.0
    np.testing.assert_array_equal(route_matrix(layer, changed, mask=mask), uses)


def test_expert_choice_with_one_input_uses_every_expert():
    # A batch of one: every expert picks the only input, so the layer
    # computes the soft (dense) mixture, weighted by the router probabilities.
    layer = make_layer("expert_choice")
    x = random_inputs((1, 6))
    want, _ = moe_forward(layer_params(layer), x, "soft", 4)
    np.testing.assert_allclose(to_numpy(layer(x)), want, rtol=1e-4, atol=1e-5)
    assert route_matrix(layer, x).all()


def test_expert_choice_output_depends_on_the_batch():
    # Not causal: the same input gets a different output when the other
    # inputs of the call change (they compete for the experts' picks).
    layer = make_layer("expert_choice", capacity_factor=1.0)
    x = random_inputs((12, 6))
    alone = to_numpy(layer(x[:1]))[0]
    together = to_numpy(layer(x))[0]
    assert not np.allclose(alone, together)


# --- Hash routing ------------------------------------------------------------


def test_hash_routing_is_a_fixed_function_of_the_key():
    layer = make_layer("hash", num_experts=8)
    keys = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 46337, 2**31 - 1]], "int32")
    x = random_inputs((1, 10, 6))
    chosen = to_numpy(layer.route(x, routing_key=keys)["expert_indices"])
    # Pinned values: changing the hash would re-route every saved model.
    assert chosen.reshape(-1).tolist() == [5, 4, 5, 1, 7, 7, 1, 6, 2, 6]
    assert chosen.reshape(-1).tolist() == [hash_expert(k, 8) for k in keys[0]]
    # Inputs do not matter, only keys.
    other = layer.route(random_inputs((1, 10, 6), 1), routing_key=keys)
    np.testing.assert_array_equal(to_numpy(other["expert_indices"]), chosen)
    # Spread over the experts.
    many = np.arange(4000, dtype="int32")[None, :]
    counts = np.bincount([hash_expert(k, 8) for k in many[0]], minlength=8)
    assert counts.min() > 0.8 * 500


# --- Losses ------------------------------------------------------------------


def test_hierarchical_losses_match_hand_computed():
    layer = make_layer(
        "hierarchical", aux_loss_weight=0.5, z_loss_weight=0.25
    )  # 2 groups of 2 experts, 1 group per input, 2 experts in it
    x = random_inputs((12, 6))
    layer(x, training=False)
    assert layer.losses == []
    layer(x, training=True)
    group_aux, expert_aux, group_z, expert_z = (
        float(to_numpy(v)) for v in layer.losses
    )
    params = layer_params(layer)
    group_logits = x.astype(np.float64) @ params["group_router_kernel"]
    logits = x.astype(np.float64) @ params["router_kernel"]  # (12, 4)
    group_probs = softmax(group_logits)
    within = softmax(logits.reshape(12, 2, 2))
    joint = (within * group_probs[:, :, None]).reshape(12, 4)
    group = group_probs.argmax(axis=1)
    group_load = np.bincount(group, minlength=2) / 12
    # Both experts of the chosen group: each pair is half of a token's load.
    expert_load = np.zeros(4)
    for g in group:
        expert_load[2 * g : 2 * g + 2] += 0.5 / 12
    np.testing.assert_allclose(
        group_aux, 0.5 * 2 * np.sum(group_load * group_probs.mean(0)), 1e-5
    )
    np.testing.assert_allclose(
        expert_aux, 0.5 * 4 * np.sum(expert_load * joint.mean(0)), 1e-5
    )
    lse = np.log(np.exp(group_logits).sum(-1))
    np.testing.assert_allclose(group_z, 0.25 * np.mean(lse**2), 1e-5)
    lse = np.log(np.exp(logits.reshape(12, 2, 2)).sum(-1))  # (12, 2)
    np.testing.assert_allclose(expert_z, 0.25 * np.mean(lse**2), 1e-5)


def test_expert_choice_has_only_the_z_loss_and_hash_none():
    layer = make_layer("expert_choice", aux_loss_weight=1.0, z_loss_weight=0.5)
    x = random_inputs((3, 4, 6))
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], bool)
    layer(x, mask=mask, training=True)
    (z,) = (float(to_numpy(v)) for v in layer.losses)
    logits = x[mask].astype(np.float64) @ layer_params(layer)["router_kernel"]
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(z, 0.5 * np.mean(lse**2), rtol=1e-5)
    hashed = make_layer("hash", aux_loss_weight=1.0, z_loss_weight=1.0)
    hashed(x, routing_key=routing_keys((3, 4)), training=True)
    assert hashed.losses == []
    assert hashed.gating_network is None
    assert not any("router" in w.path for w in hashed.weights)


# --- Telemetry ---------------------------------------------------------------


@pytest.mark.skipif(
    BACKEND == "jax", reason="keras-team/keras#21639: no layer metrics on JAX"
)
@pytest.mark.parametrize(
    "case",
    ["expert_choice_cf0.5", "hash_cf0.5", "hierarchical", "top_k_shared"],
)
def test_telemetry_matches_reference(case):
    layer = make_layer(case, name="moe", telemetry="full")
    x = random_inputs((12, 6))
    keys = key_kwargs(layer, x)
    layer(x, **keys)
    metrics = {
        m.name: float(to_numpy(m.result())) for m in layer.telemetry_metrics
    }
    _, kept = reference(layer, x, routing_key=keys.get("routing_key"))
    info = layer.route(x, **keys)
    indices = to_numpy(info["expert_indices"])
    if layer.routing == "expert_choice":
        load = kept.sum(axis=0) / kept.sum()  # picks per expert
        dropped = 1.0 - kept.any(axis=1).mean()  # inputs nobody picked
    else:  # the router's choices, before capacity
        load = np.bincount(indices.reshape(-1), minlength=4) / indices.size
        dropped = 1.0 - kept.mean()
    loads = [metrics[f"moe_load_{e}"] for e in range(4)]
    np.testing.assert_allclose(loads, load, atol=1e-6)
    np.testing.assert_allclose(metrics["moe_dropped"], dropped, atol=1e-6)
    if "cf0.5" in case:
        assert metrics["moe_dropped"] > 0
    assert ("moe_router_entropy" in metrics) == (layer.routing != "hash")
    if layer.routing == "hierarchical":
        groups = indices[:, 0] // 2
        np.testing.assert_allclose(
            [metrics["moe_group_load_0"], metrics["moe_group_load_1"]],
            np.bincount(groups, minlength=2) / 12,
            atol=1e-6,
        )
        assert 0 < metrics["moe_group_router_entropy"] <= math.log(2)


# --- Saving, training, compiled calls ----------------------------------------


def build_model():
    """Features and token ids -> hash MoE (keyed by the ids) -> expert
    choice MoE -> hierarchical MoE -> Dense: one compile for all three."""
    features = keras.Input((4, 6), name="features")
    ids = keras.Input((4,), dtype="int32", name="ids")
    full = dict(telemetry="full")
    x = moe.MoELayer(4, 8, name="hash", **CASES["hash_shared"], **full)(
        features, routing_key=ids
    )
    x = moe.MoELayer(4, 8, name="ec", **CASES["expert_choice_shared"])(x)
    x = moe.MoELayer(
        4, 8, name="hier", **CASES["hierarchical_2x1_cf1"], **full
    )(x)
    return keras.Model([features, ids], keras.layers.Dense(2)(x))


def outputs_of(model, x):
    # One compiled call on JAX, whose eager mode compiles every op.
    if BACKEND == "jax":
        return model.predict_on_batch(x)
    return to_numpy(model(x))


def test_fit_step_then_keras_file_round_trip(tmp_path):
    keras.utils.set_random_seed(0)
    model = build_model()
    layers = [model.get_layer(name) for name in ("hash", "ec", "hier")]
    model.compile("sgd", "mse")
    before = [to_numpy(w) for layer in layers for w in layer.weights]
    inputs = [random_inputs((8, 4, 6)), routing_keys((8, 4))]
    history = model.fit(inputs, np.ones((8, 4, 2)), verbose=0).history
    after = [w for layer in layers for w in layer.weights]
    for w, b in zip(after, before):
        assert not np.allclose(to_numpy(w), b), f"{w.path} did not train"
    if BACKEND != "jax":  # keras-team/keras#21639: no layer metrics on JAX
        group_loads = [history[f"hier_group_load_{g}"][0] for g in (0, 1)]
        assert math.isclose(sum(group_loads), 1.0, rel_tol=1e-5)
        assert "hier_group_router_entropy" in history
        assert "ec_dropped" in history and "hash_load_3" in history

    x = [random_inputs((3, 4, 6), seed=1), routing_keys((3, 4), seed=1)]
    want = outputs_of(model, x)
    routes = layers[0].route(x[0], routing_key=x[1])
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(outputs_of(loaded, x), want, atol=1e-6)
    for layer in layers:
        assert loaded.get_layer(layer.name).get_config() == layer.get_config()
    # Hash routing: the same keys reach the same experts after reloading.
    reloaded = loaded.get_layer("hash").route(x[0], routing_key=x[1])
    for name, value in reloaded.items():
        np.testing.assert_array_equal(to_numpy(value), to_numpy(routes[name]))


@pytest.mark.skipif(BACKEND == "torch", reason="torch.compile is slow")
@pytest.mark.parametrize(
    "case", ["expert_choice_shared", "hash_cf0.5", "hierarchical"]
)
def test_compiled_calls_match_eager(case):
    layer = make_layer(case)
    x = random_inputs((12, 6))
    keys = key_kwargs(layer, x)
    want = to_numpy(layer(x, **keys))
    if BACKEND == "tensorflow":
        import tensorflow as tf

        fn = tf.function(lambda x: layer(x, **keys), jit_compile=True)
        np.testing.assert_allclose(to_numpy(fn(x)), want, atol=1e-5)
    else:
        import jax

        out, _ = jax.jit(lambda t, n, x: layer.stateless_call(t, n, x, **keys))(
            [v.value for v in layer.trainable_variables],
            [v.value for v in layer.non_trainable_variables],
            x,
        )
        np.testing.assert_allclose(to_numpy(out), want, atol=1e-5)


@pytest.mark.parametrize(
    "routing, kwargs",
    [
        ("top_k", dict(top_k=2)),
        ("switch", dict(capacity_factor=1.25, router_jitter=0.1)),
        ("soft", dict()),
        ("expert_choice", dict(capacity_factor=1.0)),
        ("hash", dict()),
        ("hierarchical", dict(num_groups=2)),
    ],
)
def test_every_router_keeps_the_layer_contract(routing, kwargs, tmp_path):
    # Routers are sublayers: their config round trip is checked with the
    # layer's; the experts no input reaches in one step may not move.
    x = random_inputs((4, 5, 6))
    mask = np.arange(5)[None, :] < np.array([5, 4, 2, 1])[:, None]
    call_args = {"mask": mask}
    if routing == "hash":
        call_args["routing_key"] = routing_keys((4, 5))
    check_layer_contract(
        lambda: moe.MoELayer(4, 5, routing=routing, name="moe", **kwargs),
        x,
        call_args=call_args,
        mask="mask",
        tmp_path=tmp_path,
    )
