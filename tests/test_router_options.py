"""The router options the open models' MoE blocks need, checked against the
NumPy reference in moe_reference: sigmoid scores, top-k renormalised or not,
a routed scaling factor, group-limited selection, a selection bias and
auxiliary-loss-free balancing, custom router objects.

Runs on the backend KERAS_BACKEND names; test_backends.py (the backend
matrix) reruns its backend-dependent tests on the others.
"""

import keras
import numpy as np
import pytest
from keras import ops
from layer_contract import check_layer_contract
from moe_reference import layer_params, moe_forward, router_options

import moe
from moe.routers import Router, TokenChoice, TopKRouter

BACKEND = keras.backend.backend()
NOT_ON_JAX = pytest.mark.skipif(
    BACKEND == "jax", reason="JAX runs one case per option (slow eager ops)"
)

# name -> MoELayer arguments; 8 experts of hidden width 5 on 6 features.
CASES = {
    # DeepSeek-V3: sigmoid, bias, top-2-sum groups, renormalised, scaled.
    "deepseek_v3": dict(
        score_function="sigmoid",
        normalize_top_k=True,
        routed_scaling_factor=2.5,
        num_groups=4,
        groups_per_token=2,
        group_score="top2_sum",
        selection_bias=True,
        top_k=3,
    ),
    # DeepSeek-V2: softmax, best-expert groups, raw weights, scaled.
    "deepseek_v2": dict(
        normalize_top_k=False,
        routed_scaling_factor=16.0,
        num_groups=4,
        groups_per_token=1,
        group_score="max",
        top_k=2,
    ),
    # OLMoE / Qwen2-MoE: softmax top-k without renormalisation.
    "olmoe": dict(top_k=3, normalize_top_k=False),
    "sigmoid_raw": dict(score_function="sigmoid", normalize_top_k=False),
    "switch_normalized": dict(routing="switch", normalize_top_k=True),
    "biased_switch_cf1": dict(
        routing="switch", selection_bias=True, capacity_factor=1.0
    ),
    # GPT-OSS: the router's linear map has a bias.
    "router_bias": dict(top_k=2, router_use_bias=True),
}


def make_layer(case, **overrides):
    keras.utils.set_random_seed(0)
    kwargs = dict(num_experts=8, hidden_dim=5, **CASES[case])
    kwargs.update(overrides)
    layer = moe.MoELayer(**kwargs)
    layer.build((None, 6))
    if layer.selection_bias is not None:
        # A bias large enough to change choices.
        bias = np.random.default_rng(5).normal(size=8).astype("float32")
        layer.selection_bias.assign(bias * 0.3)
    if layer.router.router_use_bias:
        bias = np.random.default_rng(6).normal(size=8).astype("float32")
        layer.gating_network.router_bias.assign(bias)
    return layer


def random_inputs(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def to_numpy(x):
    return ops.convert_to_numpy(x)


def reference(layer, x, mask=None):
    return moe_forward(
        layer_params(layer),
        x,
        layer.routing,
        layer.experts_per_input,
        layer.capacity_factor,
        mask,
        **router_options(layer),
    )


# --- Outputs equal the slow reference ----------------------------------------


@pytest.mark.parametrize(
    "case, dispatch",
    [
        ("deepseek_v3", "dynamic"),
        pytest.param("deepseek_v3", "static", marks=NOT_ON_JAX),
        ("deepseek_v2", "static"),
        pytest.param("deepseek_v2", "dynamic", marks=NOT_ON_JAX),
        pytest.param("olmoe", "dynamic", marks=NOT_ON_JAX),
        ("sigmoid_raw", "static"),
        pytest.param("switch_normalized", "dynamic", marks=NOT_ON_JAX),
        ("biased_switch_cf1", "static"),
        pytest.param("biased_switch_cf1", "dynamic", marks=NOT_ON_JAX),
        ("router_bias", "dynamic"),
        pytest.param("router_bias", "static", marks=NOT_ON_JAX),
    ],
)
def test_outputs_and_routes_equal_reference(case, dispatch):
    layer = make_layer(case, dispatch=dispatch)
    x = random_inputs((3, 4, 6))
    mask = np.arange(4)[None, :] < np.array([4, 3, 1])[:, None]
    want, kept = reference(layer, x, mask)
    np.testing.assert_allclose(
        to_numpy(layer(x, mask=mask)), want, rtol=1e-4, atol=1e-5
    )
    info = layer.route(x, mask=mask)
    np.testing.assert_array_equal(
        to_numpy(info["kept"]).reshape(kept.shape), kept
    )


def test_selection_bias_changes_the_choice_not_the_weights():
    layer = make_layer("olmoe", selection_bias=True)
    x = random_inputs((16, 6))
    layer.selection_bias.assign(np.zeros(8, "float32"))
    before = {k: to_numpy(v) for k, v in layer.route(x).items()}
    bias = np.zeros(8, "float32")
    bias[5] = 10.0  # expert 5 wins every token's first slot
    layer.selection_bias.assign(bias)
    after = {k: to_numpy(v) for k, v in layer.route(x).items()}
    assert (after["expert_indices"][:, 0] == 5).all()
    assert not (before["expert_indices"][:, 0] == 5).all()
    # Its weight is its unbiased probability, not biased by 10.
    probs = to_numpy(layer.gating_network(x)["router_probs"])
    np.testing.assert_allclose(after["expert_weights"][:, 0], probs[:, 5], 1e-6)


def test_router_bias_is_softmax_over_the_top_k_biased_logits():
    # GPT-OSS's router: top-k of the biased logits, then a softmax over
    # those k: the renormalised top-k of the softmax, to float32 precision.
    layer = make_layer("router_bias")
    x = random_inputs((64, 6))
    logits = x @ to_numpy(layer.gating_network.router_kernel)
    logits = logits + to_numpy(layer.gating_network.router_bias)
    indices = np.argsort(-logits, axis=-1, kind="stable")[:, :2]
    top = np.take_along_axis(logits, indices, -1)
    weights = np.exp(top - top.max(-1, keepdims=True))
    weights = weights / weights.sum(-1, keepdims=True)
    route = layer.route(x)
    np.testing.assert_array_equal(to_numpy(route["expert_indices"]), indices)
    assert np.abs(to_numpy(route["expert_weights"]) - weights).max() <= 1e-6
    # The bias changes choices.
    unbiased = logits - to_numpy(layer.gating_network.router_bias)
    assert not np.array_equal(np.argsort(-unbiased, -1)[:, :2], indices)


def test_group_limited_selection_stays_within_the_chosen_groups():
    layer = make_layer("deepseek_v3")
    x = random_inputs((64, 6), seed=3)
    indices = to_numpy(layer.route(x)["expert_indices"])  # (64, 3)
    groups = indices // 2  # 4 groups of 2 experts
    assert all(len(set(row)) <= 2 for row in groups.tolist())
    # The groups matter: without them some tokens choose from 3 groups.
    free = make_layer("deepseek_v3", num_groups=None, groups_per_token=None)
    free_groups = to_numpy(free.route(x)["expert_indices"]) // 2
    assert any(len(set(row)) == 3 for row in free_groups.tolist())


# --- Auxiliary-loss-free balancing -------------------------------------------


def test_bias_moves_by_rate_times_sign_of_load_gap_in_training_only():
    layer = make_layer(
        "olmoe", selection_bias=True, bias_update_rate=0.25, top_k=2
    )
    layer.selection_bias.assign(np.zeros(8, "float32"))
    x = random_inputs((3, 5, 6))
    mask = np.arange(5)[None, :] < np.array([5, 2, 0])[:, None]
    layer(x, mask=mask)  # inference: no update
    np.testing.assert_array_equal(to_numpy(layer.selection_bias), 0.0)
    chosen = to_numpy(layer.route(x, mask=mask)["expert_indices"])[mask]
    counts = np.bincount(chosen.reshape(-1), minlength=8)  # before capacity
    layer(x, mask=mask, training=True)
    want = 0.25 * np.sign(counts.mean() - counts)
    np.testing.assert_allclose(to_numpy(layer.selection_bias), want)


def skewed_problem():
    """Inputs whose router sends most tokens to two of eight experts."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 6)).astype("float32")
    x[:, 0] = 2.0  # a constant feature the router keys on
    y = x @ rng.normal(size=(6, 6)).astype("float32")
    return x, y


def max_load_after_fit(bias_update_rate):
    """Busiest expert's share x 8 after 4 epochs, `aux_loss_weight=0`."""
    keras.utils.set_random_seed(0)
    layer = moe.MoELayer(
        8,
        8,
        top_k=2,
        score_function="sigmoid",
        selection_bias=True,
        bias_update_rate=bias_update_rate,
        aux_loss_weight=0.0,
        name="moe",
    )
    inputs = keras.Input((6,))
    model = keras.Model(inputs, layer(inputs))
    kernel = np.random.default_rng(1).normal(0, 0.3, (6, 8))
    kernel[0] = 0.0
    kernel[0, :2] = 2.0  # experts 0 and 1 score ~0.98, the others ~0.5
    layer.gating_network.router_kernel.assign(kernel.astype("float32"))
    x, y = skewed_problem()
    model.compile(keras.optimizers.SGD(0.01), "mse")
    model.fit(x, y, batch_size=32, epochs=4, verbose=0)
    chosen = to_numpy(layer.route(x)["expert_indices"]).reshape(-1)
    return np.bincount(chosen, minlength=8).max() / chosen.size * 8


def test_aux_loss_free_balancing_during_fit_evens_out_a_skewed_router():
    # Busiest expert's share x 8 (1 is balanced, 4 is two experts taking
    # every token): 4.0 without the update on every backend; with it 1.30
    # on TensorFlow, 1.42 on JAX, 1.39 on PyTorch (the two busy experts'
    # bias fell and the others' rose over 64 steps).
    without = max_load_after_fit(0.0)
    with_update = max_load_after_fit(0.005)
    assert without > 3.5, without
    assert with_update < 1.5, with_update


# --- Custom routers ----------------------------------------------------------


@keras.saving.register_keras_serializable(package="test_router_options")
class FirstFeatureRouter(Router):
    """Token `t` goes to expert `int(x[t, 0] > 0)`, weight 1."""

    @property
    def experts_per_input(self):
        return 1

    def call(self, tokens, token_mask=None, routing_key=None, training=None):
        expert = ops.cast(tokens[:, :1] > 0, "int32")  # (T, 1)
        return TokenChoice(expert, ops.ones(ops.shape(expert), "float32"))


def test_custom_router_routes_reference_and_round_trips(tmp_path):
    x = random_inputs((4, 3, 6))
    mask = np.arange(3)[None, :] < np.array([3, 3, 2, 1])[:, None]

    def make():
        return moe.MoELayer(
            2, 5, routing=FirstFeatureRouter(num_experts=2), name="custom"
        )

    check_layer_contract(
        make,
        x,
        call_args={"mask": mask},
        mask="mask",
        untrained=("custom/",),  # no router weights; experts train below
        tmp_path=tmp_path,
    )
    layer = make()
    got = to_numpy(layer(x, mask=mask))
    params = layer_params(layer)
    from moe_reference import expert_output

    for b, s in zip(*np.nonzero(mask)):
        e = int(x[b, s, 0] > 0)
        want = expert_output(params, e, x[b, s])
        np.testing.assert_allclose(got[b, s], want, rtol=1e-5, atol=1e-6)
    assert np.all(got[~mask] == 0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_k=2), "router's: pass it to the router. Received: top_k=2"),
        (dict(num_experts=3), "routes to 2 experts.*Received: num_experts=3"),
    ],
)
def test_router_object_owns_its_arguments(kwargs, message):
    args = dict(dict(num_experts=2, hidden_dim=5), **kwargs)
    with pytest.raises(ValueError, match=message):
        moe.MoELayer(routing=FirstFeatureRouter(num_experts=2), **args)


class FixedDecisionRouter(Router):
    """Returns what `decide(num_tokens, num_experts)` gives, for k = 1."""

    def __init__(self, decide, **kwargs):
        super().__init__(**kwargs)
        self.decide = decide

    @property
    def experts_per_input(self):
        return 1

    def call(self, tokens, token_mask=None, routing_key=None, training=None):
        return self.decide(tokens.shape[0], self.num_experts)


def _choice(indices):
    indices = np.asarray(indices)
    return TokenChoice(
        ops.convert_to_tensor(indices),
        ops.ones(indices.shape, "float32"),
    )


@pytest.mark.parametrize(
    "decide, message",
    [
        (
            lambda t, e: _choice(np.full((t, 1), e, "int32")),
            r"`expert_indices` in \[0, num_experts\) = \[0, 4\)\. "
            "Received: expert_indices from 4 to 4",
        ),
        (
            lambda t, e: _choice(np.arange(-1, t - 1, dtype="int32")[:, None]),
            "Received: expert_indices from -1 to 4",
        ),
        (
            lambda t, e: _choice(np.zeros((t - 1, 1), "int32")),
            r"of shape \(tokens, experts_per_input\) = \(6, 1\): one row "
            r"per token.*Received: expert_indices.shape=\(5, 1\)",
        ),
        (
            lambda t, e: _choice(np.zeros((t, 2), "int32")),
            r"Received: expert_indices.shape=\(6, 2\)",
        ),
        (
            lambda t, e: _choice(np.zeros((t, 1), "float32")),
            "`expert_indices` of an integer dtype. "
            "Received: expert_indices.dtype=float32",
        ),
        (
            lambda t, e: TokenChoice(
                ops.zeros((t, 1), "int32"), ops.ones((t, 1), "int32")
            ),
            "Received: expert_weights.dtype=int32",
        ),
        (
            lambda t, e: {"expert_indices": ops.zeros((t, 1), "int32")},
            "a `TokenChoice`.*Received: a dict",
        ),
    ],
)
@pytest.mark.parametrize("method", ["call", "route"])
def test_custom_router_decision_is_checked(decide, message, method):
    layer = moe.MoELayer(
        4, 5, routing=FixedDecisionRouter(decide, num_experts=4)
    )
    x = random_inputs((6, 3))
    with pytest.raises(
        ValueError, match="`FixedDecisionRouter.call` must return .*" + message
    ):
        (layer if method == "call" else layer.route)(x)


def test_custom_router_decision_in_range_and_int64_runs():
    layer = moe.MoELayer(
        4,
        5,
        routing=FixedDecisionRouter(
            lambda t, e: _choice(np.arange(t, dtype="int64")[:, None] % e),
            num_experts=4,
        ),
    )
    assert tuple(layer(random_inputs((6, 3))).shape) == (6, 3)


# --- Saving and construction errors ------------------------------------------


def test_options_round_trip_with_trained_bias(tmp_path):
    def make():
        return moe.MoELayer(
            name="moe", num_experts=8, hidden_dim=5, **CASES["deepseek_v3"]
        )

    check_layer_contract(
        make,
        random_inputs((8, 6)),
        untrained=("experts/",),  # only the chosen experts train
        tmp_path=tmp_path,
    )
    layer = make()
    assert isinstance(layer.router, TopKRouter)
    assert layer.get_config()["selection_bias"] is True
    assert "moe/router/selection_bias" in [w.path for w in layer.weights] or (
        not layer.built
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(score_function="relu"), "Received: score_function='relu'"),
        (dict(group_score="min", num_groups=2), "Received: group_score='min'"),
        (dict(routed_scaling_factor=0), "Received: routed_scaling_factor=0"),
        (
            dict(routed_scaling_factor=float("inf")),
            "Received: routed_scaling_factor=inf",
        ),
        (dict(bias_update_rate=-1.0), "Received: bias_update_rate=-1.0"),
        (
            dict(bias_update_rate=0.1),
            "needs `selection_bias=True`.*bias_update_rate=0.1",
        ),
        (dict(groups_per_token=2), "needs `num_groups`.*groups_per_token=2"),
        (dict(num_groups=3), r"divides `num_experts` \(8\).*num_groups=3"),
        (
            dict(num_groups=4, groups_per_token=1, top_k=3),
            r"group size \(2\). Received: top_k=3",
        ),
        (dict(normalize_top_k="yes"), "Received: normalize_top_k='yes'"),
        (dict(selection_bias=1), "Received: selection_bias=1"),
        (dict(router_use_bias="yes"), "Received: router_use_bias='yes'"),
        (
            dict(routing="hash", score_function="sigmoid"),
            "`score_function` is not used by `routing='hash'`",
        ),
        (
            dict(routing="soft", selection_bias=True),
            "`selection_bias` is not used by `routing='soft'`",
        ),
        (
            dict(routing="expert_choice", num_groups=2),
            "`num_groups` is not used by `routing='expert_choice'`",
        ),
    ],
)
def test_bad_options_raise_value_error_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        moe.MoELayer(num_experts=8, hidden_dim=5, **kwargs)
