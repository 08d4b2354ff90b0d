"""LoRA on the experts: `Experts.enable_lora` / `MoELayer.enable_lora`.

Every dispatch layout reads the experts through `Experts.stacked_weights`,
so a layer with adapters must equal the NumPy reference on the merged
kernels `W + (alpha / rank) * A @ B`, expert by expert, whatever the
layout. Fine-tuning trains the adapters only; saving writes the merged
kernels; `merge_lora` writes them in place. tests/test_keras_hub.py runs
the same on a sparsified keras-hub model.
"""

import keras
import numpy as np
import pytest
from keras import ops
from moe_reference import layer_params, moe_forward

import moe

BACKEND = keras.backend.backend()


def random_inputs(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def to_numpy(x):
    return ops.convert_to_numpy(x)


def qwen_like_layer(dispatch="dynamic", rank=2, lora_alpha=None):
    # Routed and shared SwiGLU experts with biases, and Qwen2-MoE's gate.
    keras.utils.set_random_seed(0)
    layer = moe.MoELayer(
        4,
        5,
        top_k=2,
        gated=True,
        activation="silu",
        num_shared_experts=1,
        shared_expert_hidden_dim=7,
        shared_expert_gate=True,
        dispatch=dispatch,
    )
    layer.build((None, 6))
    if rank:
        layer.enable_lora(rank, lora_alpha=lora_alpha)
    return layer


def randomise_adapters(layer, seed=1):
    rng = np.random.default_rng(seed)
    for variable in layer.weights:
        if "lora_" in variable.path:
            variable.assign(0.3 * rng.normal(size=variable.shape))


def merged_params(layer, alpha_over_rank):
    """`layer_params` with every kernel merged with its adapters, in
    NumPy: `W[e] + (alpha / rank) * A[e] @ B[e]`."""
    params = layer_params(layer)
    for part in (layer.experts, layer.shared_experts):
        for kernel_name, (a_name, b_name) in part._lora_names.items():
            a = to_numpy(getattr(part, a_name))
            b = to_numpy(getattr(part, b_name))
            delta = np.stack([a[e] @ b[e] for e in range(len(a))])
            params[kernel_name] = params[kernel_name] + alpha_over_rank * delta
    return params


@pytest.mark.parametrize("dispatch", ["dynamic", "static", "grouped", "gather"])
def test_every_dispatch_layout_reads_the_adapted_kernels(dispatch):
    x = random_inputs((3, 4, 6))
    mask = np.arange(4)[None, :] < np.array([4, 2, 1])[:, None]
    plain = to_numpy(qwen_like_layer(dispatch, rank=0)(x, mask=mask))
    layer = qwen_like_layer(dispatch, rank=2, lora_alpha=3.0)
    # B starts at zero: the layer computes what it did.
    np.testing.assert_allclose(to_numpy(layer(x, mask=mask)), plain, atol=1e-6)
    randomise_adapters(layer)
    want, _ = moe_forward(
        merged_params(layer, 3.0 / 2), x, "top_k", 2, mask=mask,
        activation="silu", gated=True,
    )  # fmt: skip
    got = to_numpy(layer(x, mask=mask))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(got, plain, atol=1e-3)


def test_adapters_shapes_and_what_stays_trainable():
    layer = qwen_like_layer(rank=3)
    shapes = {
        v.path.split("/")[-1]: tuple(v.shape)
        for v in layer.weights
        if "lora" in v.path
    }
    assert shapes == {
        "expert_in_lora_a": (4, 6, 3),
        "expert_in_lora_b": (4, 3, 5),
        "expert_gate_lora_a": (4, 6, 3),
        "expert_gate_lora_b": (4, 3, 5),
        "expert_out_lora_a": (4, 5, 3),
        "expert_out_lora_b": (4, 3, 6),
        "shared_expert_in_lora_a": (1, 6, 3),
        "shared_expert_in_lora_b": (1, 3, 7),
        "shared_expert_gate_lora_a": (1, 6, 3),
        "shared_expert_gate_lora_b": (1, 3, 7),
        "shared_expert_out_lora_a": (1, 7, 3),
        "shared_expert_out_lora_b": (1, 3, 6),
    }
    assert all("experts/" in v.path for v in layer.weights if "lora" in v.path)
    # The adapters and (as Dense's) the experts' biases train; the
    # kernels, the router and the shared gate do not.
    trainable = {v.path.split("/")[-1] for v in layer.trainable_weights}
    assert trainable == set(shapes) | {
        f"{prefix}_{part}_bias"
        for prefix in ("expert", "shared_expert")
        for part in ("in", "gate", "out")
    }
    # Each expert's A is drawn on its own: experts start different.
    a = to_numpy(layer.experts.expert_in_lora_a)
    assert not np.allclose(a[0], a[1])
    assert not np.any(to_numpy(layer.experts.expert_in_lora_b))
    routed = qwen_like_layer(rank=0)
    routed.enable_lora(2, train_router=True)
    paths = [v.path for v in routed.trainable_weights]
    assert any("router_kernel" in p for p in paths)
    assert any("shared_gate_kernel" in p for p in paths)


def test_fit_trains_the_adapters_only_and_merge_keeps_the_outputs(tmp_path):
    inputs = keras.Input((4, 6))
    layer = qwen_like_layer("auto", rank=0)  # JAX traces fit
    model = keras.Model(inputs, keras.layers.Dense(3)(layer(inputs)))
    layer.enable_lora(2)
    frozen = {
        v.path: to_numpy(v)
        for v in layer.weights
        if "kernel" in v.path and "lora" not in v.path
    }
    x = random_inputs((8, 4, 6), seed=2)
    y = random_inputs((8, 4, 3), seed=3)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.fit(x, y, epochs=3, batch_size=4, verbose=0)
    for variable in layer.weights:
        if variable.path in frozen:
            np.testing.assert_array_equal(
                to_numpy(variable), frozen[variable.path]
            )
    assert np.any(to_numpy(layer.experts.expert_out_lora_b))
    adapted = to_numpy(model(x))
    # Saved: the merged kernels, loading as a plain layer.
    path = tmp_path / "lora.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert not any("lora" in v.path for v in loaded.weights)
    np.testing.assert_allclose(to_numpy(loaded(x)), adapted, atol=1e-5)
    # Weights into a layer that has adapters: the kernels are the merged
    # ones, B is zero again.
    weights = tmp_path / "lora.weights.h5"
    model.save_weights(weights)
    model.load_weights(weights)
    assert not np.any(to_numpy(layer.experts.expert_out_lora_b))
    np.testing.assert_allclose(to_numpy(model(x)), adapted, atol=1e-5)
    randomise_adapters(layer, seed=4)
    adapted = to_numpy(model(x))
    layer.merge_lora()
    assert not any("lora" in v.path for v in model.weights)
    assert not layer.experts.lora_enabled
    assert all(v.trainable for v in layer.experts.weights)
    np.testing.assert_allclose(to_numpy(model(x)), adapted, atol=1e-5)


def test_lora_refusals():
    layer = qwen_like_layer(rank=0)
    with pytest.raises(ValueError, match="`rank` must be"):
        layer.enable_lora(0)
    with pytest.raises(ValueError, match="`lora_alpha` must be"):
        layer.enable_lora(2, lora_alpha=0)
    with pytest.raises(ValueError, match="no LoRA adapters to merge"):
        layer.merge_lora()
    with pytest.raises(ValueError, match="build or call the layer first"):
        moe.Experts(4, 5).enable_lora(2)
    layer.enable_lora(2)
    with pytest.raises(ValueError, match="already enabled"):
        layer.experts.enable_lora(2)
    with pytest.raises(ValueError, match="before quantizing"):
        layer.experts.quantize("int8")
    quantized = qwen_like_layer(rank=0)
    quantized.experts.quantize("int8")
    with pytest.raises(ValueError, match="is quantized"):
        quantized.experts.enable_lora(2)
    ensemble = moe.MoELayer(
        experts=[keras.layers.Dense(3), keras.layers.Dense(3)], top_k=1
    )
    ensemble.build((None, 3))
    with pytest.raises(ValueError, match="Received: experts=LayerExperts"):
        ensemble.enable_lora(2)
