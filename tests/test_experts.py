"""Experts: the stacked `Experts` component, shared experts with their own
width and Qwen2-MoE's gate, experts that are arbitrary Keras layers (the
ensemble pattern) and an `MoELayer` as an expert of another (nested MoE),
checked against the NumPy reference in moe_reference.

Runs on the backend KERAS_BACKEND names; test_backends.py (the backend
matrix) reruns its backend-dependent tests on the others.
"""

import warnings

import keras
import numpy as np
import pytest
from keras import ops
from layer_contract import check_layer_contract
from moe_reference import (
    expert_choice_forward,
    expert_output,
    layer_params,
    moe_forward,
)

import moe

BACKEND = keras.backend.backend()
NOT_ON_JAX = pytest.mark.skipif(
    BACKEND == "jax", reason="JAX runs one case per pattern (slow eager ops)"
)


def random_inputs(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def to_numpy(x):
    return ops.convert_to_numpy(x)


def numpy_expert(layer):
    """A `(d,) -> (d_out,)` NumPy view of a built Keras layer (eager)."""
    return lambda x: to_numpy(layer(x[None].astype("float32")))[0]


# --- The stacked Experts component --------------------------------------------


@pytest.mark.parametrize("gated, use_bias", [(False, True), (True, False)])
def test_experts_run_every_expert_like_the_reference(gated, use_bias, tmp_path):
    def make():
        return moe.Experts(
            3, 5, output_dim=4, gated=gated, use_bias=use_bias, name="ex"
        )

    x = random_inputs((7, 6))
    check_layer_contract(make, x, tmp_path=tmp_path)
    keras.utils.set_random_seed(0)
    experts = make()
    out = to_numpy(experts(x))  # (3, 7, 4)
    params = layer_params(experts)
    activation = "relu"
    for e in range(3):
        for t in range(7):
            want = expert_output(params, e, x[t], activation, gated)
            np.testing.assert_allclose(out[e, t], want, rtol=1e-5, atol=1e-6)


def test_experts_errors():
    with pytest.raises(ValueError, match="Received: hidden_dim=0"):
        moe.Experts(2, 0)
    with pytest.raises(ValueError, match="Received: weight_prefix=''"):
        moe.Experts(2, 3, weight_prefix="")
    with pytest.raises(ValueError, match="Received: glu_limit=0"):
        moe.Experts(2, 3, gated=True, glu_limit=0)
    with pytest.raises(ValueError, match="Received: glu_linear_offset=nan"):
        moe.Experts(2, 3, gated=True, glu_linear_offset=float("nan"))
    with pytest.raises(ValueError, match="need `gated=True`.*gated=False"):
        moe.Experts(2, 3, glu_limit=7.0)


# GPT-OSS's clamped SwiGLU; a limit the random pre-activations cross.
GPT_OSS_EXPERTS = dict(
    activation="quick_gelu",
    gated=True,
    use_bias=True,
    glu_limit=0.5,
    glu_linear_offset=1.0,
    bias_initializer="random_normal",
)
GPT_OSS_GLU = dict(glu_limit=0.5, glu_linear_offset=1.0)


def test_gpt_oss_experts_equal_the_reference(tmp_path):
    def make():
        return moe.Experts(3, 5, output_dim=4, name="ex", **GPT_OSS_EXPERTS)

    x = random_inputs((7, 6))
    check_layer_contract(make, x, tmp_path=tmp_path)
    keras.utils.set_random_seed(0)
    experts = make()
    out = to_numpy(experts(x))  # (3, 7, 4)
    params = layer_params(experts)
    for e in range(3):
        gate = (
            x @ params["expert_gate_kernel"][e] + params["expert_gate_bias"][e]
        )
        assert gate.max() > 0.5  # the clamp acts
        for t in range(7):
            want = expert_output(
                params, e, x[t], "quick_gelu", True, **GPT_OSS_GLU
            )
            np.testing.assert_allclose(out[e, t], want, rtol=1e-5, atol=1e-6)
    config = experts.get_config()
    assert config["activation"] == "quick_gelu"
    assert (config["glu_limit"], config["glu_linear_offset"]) == (0.5, 1.0)


@pytest.mark.parametrize(
    "dispatch",
    ["dynamic", pytest.param("static", marks=NOT_ON_JAX), "grouped"],
)
def test_gpt_oss_moe_layer_equals_reference(dispatch, tmp_path):
    # GPT-OSS: a router with a bias, softmax top-k renormalised, clamped
    # SwiGLU experts with biases; every dispatch layout runs `expert_fn`.
    def make(dispatch=dispatch):
        return moe.MoELayer(
            6, 5, top_k=2, router_use_bias=True, dispatch=dispatch,
            **GPT_OSS_EXPERTS,
        )  # fmt: skip

    x = random_inputs((3, 4, 6))
    mask = np.arange(4)[None, :] < np.array([4, 2, 1])[:, None]
    keras.utils.set_random_seed(0)
    layer = make()
    layer.build((None, 6))
    bias = np.random.default_rng(3).normal(size=6).astype("float32")
    layer.gating_network.router_bias.assign(bias)
    want, _ = moe_forward(
        layer_params(layer), x, "top_k", 2, mask=mask,
        activation="quick_gelu", gated=True, glu=GPT_OSS_GLU,
    )  # fmt: skip
    got = to_numpy(layer(x, mask=mask))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    if dispatch == "dynamic":  # once; "auto", which JAX's traced fit takes
        check_layer_contract(lambda: make("auto"), x, tmp_path=tmp_path)


# --- Shared experts: their own width, Qwen2-MoE's gate ------------------------


@pytest.mark.parametrize("dispatch", ["dynamic", "static"])
def test_wide_gated_shared_expert_equals_reference(dispatch):
    # Qwen2-MoE: top-k without renormalisation, one wider shared expert
    # scaled per token by sigmoid(x @ w).
    keras.utils.set_random_seed(0)
    layer = moe.MoELayer(
        4,
        5,
        top_k=2,
        normalize_top_k=False,
        gated=True,
        activation="silu",
        num_shared_experts=1,
        shared_expert_hidden_dim=9,
        shared_expert_gate=True,
        dispatch=dispatch,
    )
    x = random_inputs((3, 4, 6))
    mask = np.arange(4)[None, :] < np.array([4, 2, 1])[:, None]
    got = to_numpy(layer(x, mask=mask))
    params = layer_params(layer)
    assert params["shared_expert_in_kernel"].shape == (1, 6, 9)
    assert params["shared_gate_kernel"].shape == (6, 1)
    want, _ = moe_forward(
        params,
        x,
        "top_k",
        2,
        mask=mask,
        activation="silu",
        gated=True,
        normalize=False,
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # The gate matters: without it the output differs.
    del params["shared_gate_kernel"]
    ungated, _ = moe_forward(
        params, x, "top_k", 2, mask=mask, activation="silu", gated=True,
        normalize=False,
    )  # fmt: skip
    assert not np.allclose(ungated, want, atol=1e-3)


# --- Initialisation: experts start different ----------------------------------

INITIALIZERS = [
    "glorot_uniform",
    "he_normal",
    keras.initializers.HeNormal(),
    keras.initializers.GlorotUniform(seed=1),
]


def expert_kernels(layer):
    """`{variable name: (E, ...) array}` of every expert kernel of an
    `MoELayer` (routed and shared)."""
    parts = [layer.experts, layer.shared_experts]
    return {
        v.path.split("/", 1)[1]: to_numpy(v)  # without the layer's name
        for part in parts
        if part is not None
        for v in part.weights
        if "kernel" in v.path
    }


@pytest.mark.parametrize(
    "initializer",
    INITIALIZERS,
    ids=["glorot_uniform", "he_normal", "HeNormal()", "GlorotUniform(seed=1)"],
)
def test_every_expert_starts_different_with_dense_statistics(initializer):
    # The default path (no seed anywhere) and the usual spellings: every
    # slice of every expert kernel differs from every other, and each has
    # the statistics of one Dense kernel of its shape (its own fans, not
    # those of the whole stack).
    layer = moe.MoELayer(
        num_experts=4,
        hidden_dim=64,
        gated=True,
        num_shared_experts=2,
        kernel_initializer=initializer,
    )
    layer.build((None, 64))
    slices = [
        kernel[e] for kernel in expert_kernels(layer).values() for e in range(2)
    ]
    for i, a in enumerate(slices):
        for b in slices[i + 1 :]:
            assert not np.allclose(a, b)
    dense = keras.layers.Dense(64, kernel_initializer=initializer)
    dense.build((None, 64))
    dense_var = to_numpy(dense.kernel).var()
    for kernel in expert_kernels(layer).values():
        for e in range(kernel.shape[0]):
            np.testing.assert_allclose(kernel[e].var(), dense_var, rtol=0.15)


def test_the_default_moe_layer_is_not_an_upcycled_dense_layer():
    layer = moe.MoELayer(num_experts=8, hidden_dim=16)
    x = random_inputs((5, 12))
    layer(x)
    every = to_numpy(layer.experts(x))  # (E, 5, 12): every expert on x
    assert all(not np.allclose(every[0], every[e]) for e in range(1, 8))


def test_random_biases_are_drawn_per_expert():
    experts = moe.Experts(4, 8, bias_initializer="random_normal")
    experts.build((None, 6))
    bias = to_numpy(experts.expert_in_bias)
    assert not np.allclose(bias[0], bias[1])
    np.testing.assert_allclose(bias.std(), 0.05, rtol=0.3)


def test_the_layer_seed_makes_the_experts_reproducible():
    def kernels(**kwargs):
        layer = moe.MoELayer(
            num_experts=4, hidden_dim=8, num_shared_experts=1, **kwargs
        )
        layer.build((None, 6))
        return expert_kernels(layer)

    first, again, other = kernels(seed=3), kernels(seed=3), kernels(seed=4)
    assert first.keys() == again.keys() == other.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
        assert not np.allclose(first[name], other[name])
    # Unseeded layers follow the global seed, as Keras layers do.
    keras.utils.set_random_seed(5)
    first = kernels()
    keras.utils.set_random_seed(5)
    for name, value in kernels().items():
        np.testing.assert_array_equal(first[name], value)


def test_shared_expert_gate_needs_shared_experts():
    with pytest.raises(ValueError, match="needs `num_shared_experts`"):
        moe.MoELayer(4, 5, shared_expert_gate=True)
    with pytest.raises(ValueError, match="shared_expert_hidden_dim=0"):
        moe.MoELayer(4, 5, num_shared_experts=1, shared_expert_hidden_dim=0)


# --- Experts that are Keras layers (the ensemble pattern) ---------------------


def ensemble_layers():
    keras.utils.set_random_seed(1)
    return [
        keras.layers.Dense(3, name="linear"),
        keras.Sequential(
            [keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(3)],
            name="mlp",
        ),
        keras.layers.Dense(3, use_bias=False, name="nobias"),
    ]


def ensemble(**kwargs):
    keras.utils.set_random_seed(0)
    layer = moe.MoELayer(experts=ensemble_layers(), **kwargs)
    layer.build((None, 6))
    return layer


@pytest.mark.parametrize(
    "routing, dispatch, capacity_factor",
    [
        ("top_k", "dynamic", None),
        ("top_k", "static", None),
        pytest.param("top_k", "dynamic", 0.5, marks=NOT_ON_JAX),
        ("switch", "static", 0.5),
        pytest.param("soft", "auto", None, marks=NOT_ON_JAX),
    ],
)
def test_layer_experts_equal_reference(routing, dispatch, capacity_factor):
    layer = ensemble(
        routing=routing, dispatch=dispatch, capacity_factor=capacity_factor
    )
    x = random_inputs((3, 4, 6))
    mask = np.arange(4)[None, :] < np.array([4, 3, 1])[:, None]
    got = to_numpy(layer(x, mask=mask))
    fns = [numpy_expert(e) for e in layer.experts.expert_layers]
    k = {"top_k": 2, "switch": 1, "soft": 3}[routing]
    want, kept = moe_forward(
        layer_params(layer),
        x,
        routing,
        k,
        capacity_factor,
        mask,
        expert_fns=fns,
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    if capacity_factor:
        assert not kept[mask.reshape(-1)].all()  # some pairs dropped


def test_layer_experts_with_expert_choice_equal_reference():
    layer = ensemble(routing="expert_choice", capacity_factor=1.0)
    x = random_inputs((8, 6))
    fns = [numpy_expert(e) for e in layer.experts.expert_layers]
    want, _ = expert_choice_forward(layer_params(layer), x, 1.0, expert_fns=fns)
    np.testing.assert_allclose(to_numpy(layer(x)), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dispatch", ["dynamic", "static"])
def test_layer_expert_never_sees_inputs_not_routed_to_it(dispatch):
    layer = ensemble(routing="top_k", top_k=1, dispatch=dispatch)
    x = random_inputs((12, 6))
    before = to_numpy(layer(x))
    chosen = to_numpy(layer.route(x)["expert_indices"])[:, 0]
    for e, expert in enumerate(layer.experts.expert_layers):
        originals = [to_numpy(w) for w in expert.weights]
        for w in expert.weights:
            w.assign(to_numpy(w) + 10.0)
        after = to_numpy(layer(x))
        for w, value in zip(expert.weights, originals):
            w.assign(value)
        users = chosen == e
        assert users.any()
        np.testing.assert_array_equal(after[~users], before[~users])
        assert np.all(np.abs(after[users] - before[users]).max(axis=1) > 1e-3)


def test_layer_experts_errors():
    with pytest.raises(ValueError, match="Every expert must be a Keras layer"):
        moe.MoELayer(experts=[keras.layers.Dense(3), "dense"])
    dense = keras.layers.Dense(3)
    with pytest.raises(ValueError, match="its own layer"):
        moe.MoELayer(experts=[dense, dense])
    with pytest.raises(ValueError, match=r"is their number \(2\)"):
        moe.MoELayer(4, experts=[keras.layers.Dense(3), keras.layers.Dense(3)])
    widths = moe.MoELayer(
        experts=[keras.layers.Dense(3), keras.layers.Dense(4)]
    )
    with pytest.raises(ValueError, match="same output width"):
        widths.build((None, 6))


def test_experts_over_the_size_limit_warn_before_creating_weights(
    monkeypatch,
):
    # 2 experts x (6 x 8 + 8 + 8 x 6 + 6) = 220 numbers, 880 B in float32.
    monkeypatch.setattr(moe.experts, "LARGE_WEIGHTS", 219, raising=False)
    with pytest.warns(
        UserWarning,
        match=r"The stacked experts 'experts' are about to create 220 "
        r"parameters \(880 B in float32\), more than 219: building may run "
        r"out of memory.*Received: shapes \[\(2, 6, 8\), \(2, 8\), "
        r"\(2, 8, 6\), \(2, 6\)\]",
    ):
        moe.MoELayer(2, 8).build((None, 6))
    monkeypatch.setattr(moe.experts, "LARGE_WEIGHTS", 220, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        moe.MoELayer(2, 8).build((None, 6))


@pytest.mark.parametrize("load", ["from_config", "deserialize"])
def test_config_with_a_huge_hidden_dim_warns_before_allocating(load):
    # A crafted config: 2 experts of width 10**12 on 8 features, 123.7 TiB.
    # The warning, made an error here, comes before any variable exists.
    config = moe.MoELayer(2, 4, name="crafted").get_config()
    config["hidden_dim"] = 10**12
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(
            UserWarning,
            match=r"about to create 34,000,000,000,016 parameters "
            r"\(123.7 TiB in float32\)",
        ):
            if load == "from_config":
                moe.MoELayer.from_config(config).build((None, 8))
            else:
                keras.layers.deserialize(
                    {
                        "module": "moe",
                        "class_name": "MoELayer",
                        "registered_name": "moe>MoELayer",
                        "config": config,
                        "build_config": {"input_shape": [None, 8]},
                    }
                )


class FirstRowOnly(keras.layers.Layer):
    """A broken expert: a `Dense` whose output keeps only the first row,
    though it declares one row per input row."""

    def build(self, input_shape):
        self.dense = keras.layers.Dense(3)
        self.dense.build(input_shape)

    def call(self, x):
        return self.dense(x)[:1]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 3)


class MeanRow(keras.layers.Layer):
    """A broken expert whose declared output is one row."""

    def call(self, x):
        return ops.mean(x, axis=0, keepdims=True)


@pytest.mark.parametrize("dispatch", ["dynamic", "static"])
def test_layer_expert_returning_fewer_rows_is_refused(dispatch):
    layer = moe.MoELayer(
        experts=[FirstRowOnly(), keras.layers.Dense(3)],
        top_k=2,
        dispatch=dispatch,
    )
    with pytest.raises(
        ValueError,
        match=r"one row per input row. Received: expert 'first_row_only\w*' "
        r"returned 1 rows for 4 \(output shape \(1, 3\)\)",
    ):
        layer(random_inputs((4, 6)))


def test_layer_expert_declaring_fewer_rows_is_refused():
    layer = moe.MoELayer(experts=[MeanRow(), MeanRow()])
    with pytest.raises(
        ValueError,
        match=r"to `\(n, d_out\)`. Received: expert 'mean_row\w*' with "
        r"output shape \(1, 6\)",
    ):
        layer.build((None, 6))


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_layer_experts_of_another_dtype_give_the_layer_compute_dtype(policy):
    experts = [keras.layers.Dense(3, dtype="float16") for _ in range(2)]
    layer = moe.MoELayer(experts=experts, top_k=1, dtype=policy)
    outputs = layer(random_inputs((4, 6)))
    assert keras.backend.standardize_dtype(outputs.dtype) == (
        layer.compute_dtype
    )
    assert layer.experts.compute_dtype == layer.compute_dtype


def test_layer_experts_contract(tmp_path):
    x = random_inputs((4, 3, 6))
    mask = np.arange(3)[None, :] < np.array([3, 2, 2, 1])[:, None]
    check_layer_contract(
        lambda: moe.MoELayer(
            experts=ensemble_layers(),
            num_shared_experts=1,
            hidden_dim=4,
            output_dim=3,
            name="ens",
        ),
        x,
        call_args={"mask": mask},
        mask="mask",
        tmp_path=tmp_path,
    )


# --- Nested MoE: an MoELayer as an expert of another --------------------------


def nested(dispatch="auto"):
    keras.utils.set_random_seed(2)
    inner = [
        moe.MoELayer(2, 4, top_k=1, name=f"inner_{i}", dispatch=dispatch)
        for i in range(2)
    ]
    return moe.MoELayer(
        experts=[*inner, keras.layers.Dense(6, name="plain")],
        top_k=2,
        dispatch=dispatch,
        name="outer",
    )


@pytest.mark.parametrize("dispatch", ["dynamic", "static"])
def test_nested_moe_equals_reference_and_adds_inner_losses(dispatch):
    layer = nested(dispatch)
    x = random_inputs((3, 4, 6))
    mask = np.arange(4)[None, :] < np.array([4, 2, 1])[:, None]
    got = to_numpy(layer(x, mask=mask, training=True))
    losses = [float(to_numpy(v)) for v in layer.losses]
    # 2 outer losses and 2 per inner MoE.
    assert len(losses) == 6 and all(np.isfinite(losses))
    fns = []
    for expert in layer.experts.expert_layers:
        if isinstance(expert, moe.MoELayer):
            # An inner top-1 MoE, dropless: each row is routed on its own.
            params = layer_params(expert)
            fns.append(
                lambda v, p=params: moe_forward(p, v[None], "top_k", 1)[0][0]
            )
        else:
            fns.append(numpy_expert(expert))
    want, _ = moe_forward(
        layer_params(layer), x, "top_k", 2, mask=mask, expert_fns=fns
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(BACKEND == "jax", reason="JAX traces fit: static only")
def test_nested_inner_losses_ignore_the_static_buffers_padding():
    # Under the static layout each inner MoE gets a buffer padded with zero
    # rows; it is told which rows are real, so its losses are the same.
    x = random_inputs((3, 4, 6))
    losses = []
    for dispatch in ("dynamic", "static"):
        layer = nested(dispatch)
        layer(x, training=True)
        losses.append([float(to_numpy(v)) for v in layer.losses])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_nested_moe_contract(tmp_path):
    check_layer_contract(
        nested, random_inputs((8, 6)), untrained=("inner_",), tmp_path=tmp_path
    )
