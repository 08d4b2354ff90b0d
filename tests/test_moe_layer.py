"""MoELayer behaviour, checked against the NumPy reference in moe_reference.

Runs on the backend KERAS_BACKEND names; test_backends.py (the backend
matrix) reruns its backend-dependent tests on the others.
"""

import math

import keras
import numpy as np
import pytest
from keras import ops
from moe_reference import layer_params, moe_forward

import moe

BACKEND = keras.backend.backend()
ROUTINGS = ["top_k", "switch", "soft"]
DISPATCHES = ["dynamic", "static", "gather"]


def make_layer(input_dim=6, **kwargs):
    keras.utils.set_random_seed(0)
    kwargs.setdefault("num_experts", 4)
    kwargs.setdefault("hidden_dim", 5)
    layer = moe.MoELayer(**kwargs)
    layer.build((None, input_dim))
    return layer


def random_inputs(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def to_numpy(x):
    return ops.convert_to_numpy(x)


# --- Construction and build errors -------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(num_experts=0),
            "`num_experts` must be .* Received: num_experts=0",
        ),
        (dict(num_experts=2.5), "Received: num_experts=2.5"),
        (dict(top_k=0), "`top_k` must be between 1 and .* Received: top_k=0"),
        (
            dict(top_k=5),
            r"between 1 and `num_experts` \(4\). Received: top_k=5",
        ),
        (dict(hidden_dim=0), "`hidden_dim` .* Received: hidden_dim=0"),
        (dict(output_dim=-1), "Received: output_dim=-1"),
        (dict(capacity_factor=0), "Received: capacity_factor=0"),
        (dict(capacity_factor=-1.5), "Received: capacity_factor=-1.5"),
        (dict(routing="expert-choice"), "Received: routing='expert-choice'"),
        (dict(routing="switch", top_k=2), "Received: top_k=2"),
        (dict(routing="soft", top_k=2), "Received: top_k=2"),
        (dict(aux_loss_weight=-0.1), "Received: aux_loss_weight=-0.1"),
        (dict(z_loss_weight=-1), "Received: z_loss_weight=-1"),
        (dict(router_jitter=1.5), "Received: router_jitter=1.5"),
        (dict(router_jitter=-1), "Received: router_jitter=-1"),
        (dict(router_jitter=float("nan")), "Received: router_jitter=nan"),
        (dict(aux_loss_weight=float("inf")), "Received: aux_loss_weight=inf"),
        (dict(aux_loss_weight=float("nan")), "Received: aux_loss_weight=nan"),
        (dict(z_loss_weight=float("inf")), "Received: z_loss_weight=inf"),
        (dict(z_loss_weight=float("nan")), "Received: z_loss_weight=nan"),
        (dict(capacity_factor=float("inf")), "Received: capacity_factor=inf"),
        (dict(capacity_factor=float("nan")), "Received: capacity_factor=nan"),
        (dict(capacity_factor="1.25"), "Received: capacity_factor='1.25'"),
        (dict(top_k="2"), "Received: top_k='2'"),
        (dict(top_k=True), "Received: top_k=True"),
        (dict(hidden_dim=8.0), "Received: hidden_dim=8.0"),
        (dict(num_experts=float("inf")), "Received: num_experts=inf"),
        (dict(num_shared_experts=1.5), "Received: num_shared_experts=1.5"),
        (dict(seed=-1), "Received: seed=-1"),
        (dict(seed="7"), "Received: seed='7'"),
        (dict(router_noise="yes"), "Received: router_noise='yes'"),
        (dict(gated=None), "Received: gated=None"),
        (dict(dispatch="fast"), "Received: dispatch='fast'"),
        (dict(telemetry="all"), "Received: telemetry='all'"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, message):
    args = dict(num_experts=4, hidden_dim=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        moe.MoELayer(**args).build((None, 6))


@pytest.mark.parametrize("shape", [(6,), (2, 3, 4, 6)])
def test_unsupported_input_rank_raises(shape):
    layer = moe.MoELayer(num_experts=4, hidden_dim=8)
    # The layer's InputSpec: rank 2 `(batch, d)` or 3 `(batch, seq, d)`.
    with pytest.raises(ValueError, match=r"incompatible .* (min|max)_ndim"):
        layer(np.zeros(shape, "float32"))


def test_undefined_feature_dimension_raises():
    with pytest.raises(ValueError, match="last dimension .* defined"):
        moe.MoELayer(num_experts=4, hidden_dim=8).build((None, 3, None))


def test_mismatched_mask_raises():
    layer = make_layer()
    x = random_inputs((2, 3, 6))
    with pytest.raises(ValueError, match="`mask` must have the shape"):
        layer(x, mask=np.ones((2, 4), bool))


# --- Outputs equal the slow reference ---------------------------------------


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize(
    "routing, capacity_factor",
    [
        ("top_k", None),
        ("top_k", 0.5),
        ("top_k", 1.0),
        ("switch", None),
        ("switch", 1.0),
        ("switch", 0.5),
        ("soft", None),
    ],
)
@pytest.mark.parametrize("rank", [2, 3])
def test_outputs_equal_reference(dispatch, routing, capacity_factor, rank):
    layer = make_layer(
        routing=routing,
        capacity_factor=capacity_factor,
        dispatch=dispatch,
        output_dim=3,
    )
    shape = (24, 6) if rank == 2 else (4, 6, 6)
    x = random_inputs(shape)
    mask = None
    if rank == 3:
        mask = np.arange(6)[None, :] < np.array([6, 4, 1, 0])[:, None]
    got = to_numpy(layer(x, mask=mask))
    k = {"top_k": 2, "switch": 1, "soft": 4}[routing]
    want, kept = moe_forward(
        layer_params(layer), x, routing, k, capacity_factor, mask
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    if capacity_factor == 0.5 and rank == 2:
        # 24 inputs x k pairs cannot fit in 4 experts x ceil(0.5 * 24 * k / 4).
        assert not kept.all()
    routing_info = layer.route(x, mask=mask)
    np.testing.assert_array_equal(
        to_numpy(routing_info["kept"]).reshape(kept.shape), kept
    )


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_gated_experts_equal_reference(dispatch):
    layer = make_layer(gated=True, activation="silu", dispatch=dispatch)
    x = random_inputs((10, 6))
    want, _ = moe_forward(
        layer_params(layer), x, "top_k", 2, activation="silu", gated=True
    )
    np.testing.assert_allclose(to_numpy(layer(x)), want, rtol=1e-4, atol=1e-5)


def test_many_experts_and_tokens_static_blocks_equal_reference():
    # Enough pairs that the dropless static layout uses several blocks per
    # expert and padding between groups.
    layer = make_layer(num_experts=6, top_k=3, dispatch="static")
    x = random_inputs((300, 6), seed=3)
    want, _ = moe_forward(layer_params(layer), x, "top_k", 3)
    np.testing.assert_allclose(to_numpy(layer(x)), want, rtol=1e-4, atol=1e-4)


def test_masked_positions_output_zero_and_are_not_routed():
    layer = make_layer(capacity_factor=1.0)
    x = random_inputs((2, 5, 6))
    mask = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], bool)
    out = to_numpy(layer(x, mask=mask))
    assert np.all(out[~mask] == 0)
    assert not to_numpy(layer.route(x, mask=mask)["kept"])[~mask].any()
    # Padding does not take capacity: the same rows without the padded
    # positions route identically.
    changed = x.copy()
    changed[~mask] = 1e3
    np.testing.assert_allclose(to_numpy(layer(changed, mask=mask)), out)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(routing="switch", capacity_factor=1.25),
        dict(routing="soft"),
        dict(routing="expert_choice"),
        dict(routing="hash"),
        dict(routing="hierarchical", num_groups=2, capacity_factor=1.0),
        dict(
            score_function="sigmoid",
            selection_bias=True,
            bias_update_rate=0.1,
            num_groups=2,
            num_shared_experts=1,
        ),
    ],
)
@pytest.mark.parametrize("shape", [(0, 6), (0, 3, 6)])
def test_empty_batch_in_training_gives_zero_losses(kwargs, shape):
    layer = make_layer(**kwargs)
    x = np.zeros(shape, "float32")
    keys = {}
    if layer.routing == "hash":
        keys["routing_key"] = np.zeros(shape[:-1], "int32")
    out = layer(x, training=True, **keys)
    assert tuple(out.shape) == shape
    values = [float(to_numpy(v)) for v in layer.losses]
    assert values == [0.0] * len(values)
    if layer.selection_bias is not None:  # nothing routed: no update
        np.testing.assert_array_equal(to_numpy(layer.selection_bias), 0.0)


def test_mask_propagates_through_layer():
    inputs = keras.Input((5,), dtype="int32")
    x = keras.layers.Embedding(10, 6, mask_zero=True)(inputs)
    x = moe.MoELayer(num_experts=4, hidden_dim=8)(x)
    assert x._keras_mask is not None


# --- Sparsity: a non-chosen expert cannot affect an input -------------------


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("routing", ["top_k", "switch"])
def test_perturbing_unchosen_expert_changes_nothing(dispatch, routing):
    layer = make_layer(num_experts=4, routing=routing, dispatch=dispatch)
    x = random_inputs((16, 6))
    before = to_numpy(layer(x))
    chosen = to_numpy(layer.route(x)["expert_indices"])  # (16, k)
    originals = [to_numpy(w) for w in layer.expert_weights]
    for expert in range(4):
        # Change every parameter of this one expert.
        for variable, value in zip(layer.expert_weights, originals):
            perturbed = value.copy()
            perturbed[expert] += 10.0
            variable.assign(perturbed)
        after = to_numpy(layer(x))
        for variable, value in zip(layer.expert_weights, originals):
            variable.assign(value)
        uses = (chosen == expert).any(axis=1)
        # Exactly equal, not close: the expert is never computed on them.
        np.testing.assert_array_equal(after[~uses], before[~uses])
        assert np.all(np.abs(after[uses] - before[uses]).max(axis=1) > 1e-3)


def test_dropped_input_ignores_its_chosen_expert():
    # Capacity 1 per expert: later inputs that chose a full expert get zero
    # output, whatever that expert's weights are. (SiLU: a kept input's
    # output is not zero by chance, as ReLU's can be.)
    layer = make_layer(
        num_experts=2, routing="switch", capacity_factor=0.25, activation="silu"
    )
    x = random_inputs((8, 6))
    kept = to_numpy(layer.route(x)["kept"])[:, 0]
    out = to_numpy(layer(x))
    assert kept.sum() == 2
    assert np.all(out[~kept] == 0)
    assert np.all(np.abs(out[kept]).sum(axis=1) > 0)


# --- Losses and telemetry ---------------------------------------------------


def test_losses_match_formulas_and_only_in_training():
    layer = make_layer(
        num_experts=3, aux_loss_weight=0.5, z_loss_weight=0.25, top_k=1
    )
    kernel = np.array(
        [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]] + [[0.0] * 3] * 4, "float32"
    )
    layer.gating_network.router_kernel.assign(kernel)
    x = np.array(
        [
            [1, 0, 0, 0, 0, 0],
            [0, 1, 0, 0, 0, 0],
            [2, 1, 0, 0, 0, 0],
            [-1, 0, 0, 0, 0, 0],
        ],
        "float32",
    )
    layer(x, training=False)
    assert layer.losses == []
    layer(x, training=True)
    aux, z = (float(to_numpy(v)) for v in layer.losses)

    logits = x[:, :2] @ kernel[:2]
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    # Switch eq. 4 by hand: the logits rows are [1, 0, -1], [.5, 2, 0],
    # [2.5, 2, -2] and [-1, 0, 1], so the top-1 choices are [0, 1, 0, 2].
    f = np.array([2, 1, 1]) / 4
    p_mean = probs.mean(0)
    np.testing.assert_allclose(aux, 0.5 * 3 * np.sum(f * p_mean), rtol=1e-5)
    log_z = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(z, 0.25 * np.mean(log_z**2), rtol=1e-5)


def test_loss_weight_zero_disables_loss():
    layer = make_layer(aux_loss_weight=0.0, z_loss_weight=0.0)
    layer(random_inputs((4, 6)), training=True)
    assert layer.losses == []


def test_losses_ignore_padding():
    layer = make_layer()
    x = random_inputs((2, 4, 6))
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], bool)
    layer(x, mask=mask, training=True)
    padded = [float(to_numpy(v)) for v in layer.losses]
    layer(x[mask][None], training=True)
    packed = [float(to_numpy(v)) for v in layer.losses]
    np.testing.assert_allclose(padded, packed, rtol=1e-5)


@pytest.mark.skipif(
    BACKEND == "jax", reason="keras-team/keras#21639: no layer metrics on JAX"
)
def test_telemetry_appears_in_fit_logs():
    inputs = keras.Input((6,))
    x = moe.MoELayer(4, 8, capacity_factor=0.5, name="moe", telemetry="full")(
        inputs
    )
    model = keras.Model(inputs, keras.layers.Dense(1)(x))
    model.compile("sgd", "mse")
    history = model.fit(
        random_inputs((32, 6)),
        np.zeros((32, 1)),
        epochs=2,
        verbose=0,
        validation_split=0.25,
    )
    loads = [history.history[f"moe_load_{e}"][-1] for e in range(4)]
    assert math.isclose(sum(loads), 1.0, rel_tol=1e-5)
    assert 0 < history.history["moe_dropped"][-1] < 1
    assert 0 < history.history["moe_router_entropy"][-1] <= math.log(4)
    assert "val_moe_load_0" in history.history


@pytest.mark.skipif(
    BACKEND == "jax", reason="keras-team/keras#21639: no layer metrics on JAX"
)
def test_default_telemetry_is_two_entries_whatever_the_experts():
    inputs = keras.Input((6,))
    layer = moe.MoELayer(8, 4, capacity_factor=0.5, name="moe")
    model = keras.Model(inputs, keras.layers.Dense(1)(layer(inputs)))
    model.compile("sgd", "mse")
    x = random_inputs((32, 6))
    history = model.fit(
        x,
        np.zeros((32, 1)),
        verbose=0,
        batch_size=32,
        validation_data=(x, 0 * x[:, :1]),
    ).history
    assert sorted(k for k in history if "moe" in k) == [
        "moe_dropped",
        "moe_max_load",
        "val_moe_dropped",
        "val_moe_max_load",
    ]
    # The busiest expert's share x 8, from the validation pass's routing.
    chosen = to_numpy(layer.route(x)["expert_indices"]).reshape(-1)
    want = np.bincount(chosen, minlength=8).max() / chosen.size * 8
    np.testing.assert_allclose(history["val_moe_max_load"][-1], want, 1e-5)
    assert 0 < history["moe_dropped"][-1] < 1


def test_layers_without_a_name_are_called_moe():
    keras.backend.clear_session()
    first, second = moe.MoELayer(4, 8), moe.MoELayer(4, 8)
    assert (first.name, second.name) == ("moe", "moe_1")
    assert moe.MoELayer(4, 8, name="router_a").name == "router_a"


def test_route_reports_reference_choices():
    layer = make_layer(num_experts=5, top_k=2)
    x = random_inputs((3, 4, 6))
    info = layer.route(x)
    assert tuple(info["expert_indices"].shape) == (3, 4, 2)
    from moe_reference import route

    choices, _ = route(layer_params(layer), x.reshape(-1, 6), "top_k", 2)
    indices = to_numpy(info["expert_indices"]).reshape(-1, 2)
    weights = to_numpy(info["expert_weights"]).reshape(-1, 2)
    for t, pairs in enumerate(choices):
        assert indices[t].tolist() == [e for e, _ in pairs]
        np.testing.assert_allclose(weights[t], [w for _, w in pairs], 1e-5)


# --- Learning: experts specialise on a task where routing matters ----------


def test_tiny_model_learns_clustered_task_and_experts_specialise():
    # Inputs come from 4 clusters and each cluster needs its own linear map:
    # one linear expert cannot fit two clusters, so the task is only learnt
    # if the router sends each cluster to a different expert.
    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(1)
    centres = np.eye(4, 8, dtype="float32") * 4.0
    maps = rng.normal(size=(4, 8, 2)).astype("float32")
    cluster = rng.integers(0, 4, size=2048)
    x = centres[cluster] + rng.normal(size=(2048, 8)).astype("float32")
    y = np.einsum("nd,ndo->no", x, maps[cluster])
    inputs = keras.Input((8,))
    layer = moe.MoELayer(
        4,
        16,
        output_dim=2,
        top_k=2,
        activation="linear",
        name="moe",
        aux_loss_weight=0.1,
        seed=1,
    )
    model = keras.Model(inputs, layer(inputs))
    model.compile(keras.optimizers.Adam(0.02), "mse")
    first = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    model.fit(x, y, epochs=15, batch_size=64, verbose=0)
    last = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    assert last < first * 0.05, (first, last)
    # Specialisation: each cluster's first choice is one expert, and the four
    # clusters own four different experts.
    chosen = to_numpy(layer.route(x)["expert_indices"])[:, 0]
    owners = set()
    for c in range(4):
        counts = np.bincount(chosen[cluster == c], minlength=4)
        assert counts.max() / counts.sum() > 0.9, counts
        owners.add(int(counts.argmax()))
    assert len(owners) == 4, owners


# --- Serialization and training ----------------------------------------------


def build_model(**kwargs):
    inputs = keras.Input((4, 6))
    x = moe.MoELayer(num_experts=4, hidden_dim=8, name="moe", **kwargs)(inputs)
    outputs = keras.layers.Dense(2)(x)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(routing="switch", capacity_factor=1.25, router_jitter=0.1),
        dict(routing="soft", gated=True, activation="silu", use_bias=False),
        dict(top_k=3, router_noise=True, output_dim=5, seed=3),
    ],
)
def test_keras_file_round_trip(tmp_path, kwargs):
    model = build_model(**kwargs)
    x = random_inputs((3, 4, 6))
    want = to_numpy(model(x))
    path = tmp_path / "model.keras"
    model.save(path)
    for custom_objects in (None, moe.custom_objects()):
        loaded = keras.saving.load_model(
            path, custom_objects=custom_objects, safe_mode=True
        )
        np.testing.assert_allclose(to_numpy(loaded(x)), want, atol=1e-6)
        assert loaded.get_layer("moe").get_config() == (
            model.get_layer("moe").get_config()
        )


def test_from_config_round_trip():
    layer = make_layer(routing="switch", capacity_factor=2.0, gated=True)
    clone = moe.MoELayer.from_config(layer.get_config())
    clone.build((None, 6))
    clone.set_weights(layer.get_weights())
    x = random_inputs((5, 6))
    np.testing.assert_allclose(to_numpy(clone(x)), to_numpy(layer(x)))


def test_router_object_arguments_are_the_routers(tmp_path):
    # The layer keeps no copy of a router argument: it reads the router's,
    # and its config (and so a `.keras` file) stores the router's values.
    router = moe.routers.TopKRouter(
        num_experts=4, capacity_factor=1.25, top_k=1, aux_loss_weight=0.5
    )
    layer = moe.MoELayer(4, 8, routing=router, name="moe")
    assert layer.capacity_factor == 1.25
    assert layer.top_k == 1 and layer.experts_per_input == 1
    assert layer.aux_loss_weight == 0.5
    config = layer.get_config()
    assert config["capacity_factor"] == 1.25 and config["top_k"] == 1
    clone = moe.MoELayer.from_config(config)
    assert clone.capacity_factor == 1.25
    assert clone.router.capacity_factor == 1.25
    with pytest.raises(AttributeError, match="`capacity_factor` is the router"):
        layer.capacity_factor = 2.0
    inputs = keras.Input((4, 6))
    model = keras.Model(inputs, layer(inputs))
    x = random_inputs((3, 4, 6))
    want = to_numpy(model(x))
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path).get_layer("moe")
    assert loaded.capacity_factor == 1.25
    got, want_config = loaded.get_config(), layer.get_config()
    for config in (got, want_config):  # JAX reloads the shape as a list
        config["routing"].pop("build_config")
    assert got == want_config
    np.testing.assert_allclose(to_numpy(loaded(x)), want, atol=1e-6)


def test_routing_name_arguments_read_the_router():
    layer = moe.MoELayer(4, 8, routing="switch", capacity_factor=1.5)
    # "switch" fixes top_k=1 and raw probabilities: the router's values.
    assert (layer.top_k, layer.normalize_top_k) == (1, False)
    assert layer.capacity_factor == layer.router.capacity_factor == 1.5
    layer = moe.MoELayer(4, 8, routing="expert_choice")
    assert layer.top_k is None and layer.num_groups is None


@pytest.mark.parametrize("routing", ROUTINGS)
def test_one_fit_step_updates_experts_and_router(routing):
    model = build_model(routing=routing)
    model.compile("sgd", "mse")
    before = [to_numpy(w) for w in model.get_layer("moe").weights]
    model.fit(random_inputs((8, 4, 6)), np.ones((8, 4, 2)), verbose=0)
    after = [to_numpy(w) for w in model.get_layer("moe").weights]
    names = [w.path for w in model.get_layer("moe").weights]
    for name, b, a in zip(names, before, after):
        assert not np.allclose(b, a), f"{name} did not train"


@pytest.mark.skipif(
    BACKEND == "jax", reason="JAX's fit traces the model: static layout only"
)
def test_dynamic_and_static_dispatch_train_identically():
    x, y = random_inputs((16, 4, 6)), random_inputs((16, 4, 2), seed=1)
    results = []
    for dispatch in DISPATCHES:
        keras.utils.set_random_seed(0)
        model = build_model(dispatch=dispatch, capacity_factor=0.75)
        model.compile("sgd", "mse")
        model.fit(x, y, epochs=2, batch_size=8, verbose=0, shuffle=False)
        results.append([to_numpy(w) for w in model.weights])
    for first, *others in zip(*results):
        for other in others:
            np.testing.assert_allclose(other, first, rtol=1e-4, atol=1e-6)


def test_compiled_calls_match_eager():
    layer = make_layer(capacity_factor=1.0)
    x = random_inputs((12, 6))
    want = to_numpy(layer(x))
    if BACKEND == "tensorflow":
        import tensorflow as tf

        for jit in (False, True):
            fn = tf.function(layer, jit_compile=jit)
            np.testing.assert_allclose(to_numpy(fn(x)), want, atol=1e-5)
    elif BACKEND == "jax":
        import jax

        out, _ = jax.jit(layer.stateless_call)(
            [v.value for v in layer.trainable_variables],
            [v.value for v in layer.non_trainable_variables],
            x,
        )
        np.testing.assert_allclose(to_numpy(out), want, atol=1e-5)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="XLA on TensorFlow")
def test_fit_with_jit_compile():
    model = build_model()
    model.compile("sgd", "mse", jit_compile=True)
    history = model.fit(random_inputs((8, 4, 6)), np.ones((8, 4, 2)), verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_expert_initializer_is_per_expert_and_seeded_experts_differ():
    layer = make_layer(
        num_experts=8,
        hidden_dim=64,
        input_dim=64,
        kernel_initializer=keras.initializers.GlorotUniform(seed=1),
    )
    kernel = to_numpy(layer.expert_in_kernel)
    # Glorot variance of one expert's (64, 64) matrix, not of all eight.
    np.testing.assert_allclose(kernel.var(), 2 / (64 + 64), rtol=0.1)
    assert not np.allclose(kernel[0], kernel[1])


# --- Numerics ---------------------------------------------------------------


@pytest.mark.parametrize("routing", ROUTINGS)
def test_extreme_router_logits_stay_finite(routing):
    layer = make_layer(
        routing=routing, capacity_factor=1.0 if routing != "soft" else None
    )
    layer.gating_network.router_kernel.assign(
        np.full((6, 4), 1e4, "float32") * np.array([1, -1, 1, -1], "float32")
    )
    x = random_inputs((8, 6))
    out = to_numpy(layer(x, training=True))
    assert np.isfinite(out).all()
    assert all(np.isfinite(to_numpy(v)) for v in layer.losses)


def test_every_input_to_one_expert_and_batch_of_one():
    layer = make_layer(capacity_factor=1.0)
    kernel = np.zeros((6, 4), "float32")
    kernel[:, 2] = 50.0
    layer.gating_network.router_kernel.assign(kernel)
    x = np.abs(random_inputs((8, 6))) + 0.1
    out = to_numpy(layer(x, training=True))
    assert np.isfinite(out).all()
    assert (to_numpy(layer.route(x)["expert_indices"])[:, 0] == 2).all()
    one = to_numpy(layer(x[:1]))
    assert one.shape == (1, 6) and np.isfinite(one).all()


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    if BACKEND == "torch" and policy == "mixed_float16":
        pytest.skip("float16 matmul on CPU is not implemented by PyTorch")
    keras.config.set_dtype_policy(policy)
    try:
        model = build_model(capacity_factor=1.0)
        layer = model.get_layer("moe")
        assert layer.gating_network.compute_dtype == "float32"
        assert layer.expert_in_kernel.dtype == "float32"
        x = random_inputs((4, 4, 6))
        out = layer(x, training=True)
        assert keras.backend.standardize_dtype(out.dtype) == policy[6:]
        assert np.isfinite(to_numpy(ops.cast(out, "float32"))).all()
        model.compile("sgd", "mse")
        history = model.fit(x, np.ones((4, 4, 2)), verbose=0)
        assert np.isfinite(history.history["loss"][0])
    finally:
        keras.config.set_dtype_policy("float32")
