"""int8 experts through Keras's quantization API (`moe.quantization`).

`model.quantize("int8")` on models holding `MoELayer`s and
`MoETransformerBlock`s, checked against NumPy: per-expert, per-output-channel
abs-max int8 kernels, the router left float32, the sparse dispatch intact,
and a `.keras` round trip. Runs on the backend KERAS_BACKEND names; the last
test reruns the NumPy checks on JAX and PyTorch.
"""

import warnings

import keras
import numpy as np
import pytest
from conftest import (
    LM_TINY_FLAGS,
    LM_TINY_SENTENCES,
    load_script,
    run_script,
)

import moe

BACKEND = keras.backend.backend()
to_numpy = keras.ops.convert_to_numpy
WEIGHT_ONLY = keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)


def quantize(model_or_layer, mode="int8", config=None):
    # Keras warns for every leaf layer without int8 (InputLayer, Dropout,
    # LayerNormalization, ...) and about NumPy's copy keyword.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_or_layer.quantize(mode, config=config)


def numpy_abs_max(w, axis):
    # Keras's abs-max scheme: q = round(w * scale), scale = 127 / max|w|.
    scale = 127.0 / (np.max(np.abs(w), axis=axis, keepdims=True) + 1e-7)
    return np.clip(np.round(w * scale), -127, 127), scale


def numpy_int8_linear(x, q, scale, bias, quantize_inputs):
    # One expert: x (n, d) @ q (d, h) / scale (h,), in float64.
    x = x.astype(np.float64)
    if quantize_inputs:
        xq, x_scale = numpy_abs_max(x.astype(np.float32), axis=-1)
        y = xq.astype(np.float64) @ q.astype(np.float64) / x_scale / scale
    else:
        y = x @ q.astype(np.float64) / scale
    return y if bias is None else y + bias


def numpy_experts(layer, x, quantize_inputs):
    """Every expert on every row, from the layer's int8 kernels and scales:
    `(E, n, d_out)`."""
    v = {w.name: to_numpy(w) for w in layer.weights}
    p = layer.weight_prefix
    act = {
        "relu": lambda h: np.maximum(h, 0.0),
        "quick_gelu": lambda h: h / (1 + np.exp(-1.702 * h)),
    }.get(layer.get_config()["activation"], lambda h: h / (1 + np.exp(-h)))
    limit = layer.glu_limit
    outputs = []
    for e in range(layer.num_experts):

        def linear(inputs, part, e=e):
            bias = v.get(f"{p}_{part}_bias")
            return numpy_int8_linear(
                inputs,
                v[f"{p}_{part}_kernel"][e],
                v[f"{p}_{part}_kernel_scale"][e],
                None if bias is None else bias[e],
                quantize_inputs,
            )

        hidden = linear(x, "in")
        if layer.gated:
            gate = linear(x, "gate")
            if limit is not None:  # GPT-OSS's clamps
                gate = np.minimum(gate, limit)
                hidden = np.clip(hidden, -limit, limit)
            hidden = act(gate) * (hidden + layer.glu_linear_offset)
        else:
            hidden = act(hidden)
        outputs.append(linear(hidden, "out"))
    return np.stack(outputs)


@pytest.mark.parametrize("weight_only", [False, True])
@pytest.mark.parametrize(
    "gated, use_bias, activation, glu",
    [
        (False, True, "relu", {}),
        (True, False, "silu", {}),
        # GPT-OSS's clamped SwiGLU with biases.
        (True, True, "quick_gelu", dict(glu_limit=1.0, glu_linear_offset=1.0)),
    ],
)
def test_int8_experts_match_numpy(
    weight_only, gated, use_bias, activation, glu
):
    experts = moe.Experts(
        num_experts=3,
        hidden_dim=16,
        gated=gated,
        use_bias=use_bias,
        activation=activation,
        bias_initializer="random_normal",
        **glu,
    )
    x = np.random.default_rng(0).normal(size=(5, 8)).astype("float32")
    float_out = to_numpy(experts(x))
    float_kernels = {
        w.name: to_numpy(w) for w in experts.weights if "kernel" in w.name
    }
    quantize(experts, config=WEIGHT_ONLY if weight_only else None)

    # The stored int8 kernels are NumPy's abs-max over the input axis of
    # each expert's matrix: one scale per expert and output channel.
    for name, w in float_kernels.items():
        q = to_numpy(getattr(experts, name))
        scale = to_numpy(getattr(experts, f"{name}_scale"))
        assert q.dtype == np.int8 and scale.shape == (w.shape[0], w.shape[2])
        ref_q, ref_scale = numpy_abs_max(w, axis=1)
        np.testing.assert_allclose(scale, ref_scale[:, 0], rtol=1e-6)
        assert np.abs(q - ref_q).max() <= 1  # float rounding at .5 ties
    out = to_numpy(experts(x))
    ref = numpy_experts(experts, x, quantize_inputs=not weight_only)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    # And int8 stays close to float (a loose check of the scheme itself).
    error = np.abs(out - float_out).max() / np.abs(float_out).max()
    assert error < 0.03


def moe_model(**moe_kwargs):
    inputs = keras.Input((8,))
    x = moe.MoELayer(num_experts=4, hidden_dim=16, name="moe", **moe_kwargs)(
        inputs
    )
    return keras.Model(inputs, keras.layers.Dense(6, name="head")(x))


def router_variables(model):
    return {v.path: to_numpy(v) for v in model.get_layer("moe").router.weights}


@pytest.mark.parametrize(
    "moe_kwargs",
    [
        dict(top_k=2, gated=True, num_shared_experts=1),
        dict(routing="switch", capacity_factor=1.0, selection_bias=True),
    ],
)
def test_model_quantize_keeps_the_router_float(moe_kwargs):
    model = moe_model(**moe_kwargs)
    x = np.random.default_rng(1).normal(size=(7, 8)).astype("float32")
    before = router_variables(model)
    float_out = to_numpy(model(x))
    quantize(model)
    layer = model.get_layer("moe")
    after = router_variables(model)
    assert before.keys() == after.keys() and before
    for path, value in after.items():
        assert value.dtype == np.float32, path
        np.testing.assert_array_equal(value, before[path])
    assert layer.experts.quantization_mode == "int8"
    assert layer.experts.expert_in_kernel.dtype == "int8"
    if layer.shared_experts is not None:
        assert layer.shared_experts.quantization_mode == "int8"
    assert model.get_layer("head").quantization_mode == "int8"
    out = to_numpy(model(x))
    assert np.abs(out - float_out).max() < 0.05 * np.abs(float_out).max()


@pytest.mark.parametrize("dispatch", ["dynamic", "static", "gather"])
def test_int8_dispatch_matches_every_expert_on_every_token(dispatch):
    layer = moe.MoELayer(
        num_experts=4, hidden_dim=16, top_k=2, dispatch=dispatch
    )
    x = np.random.default_rng(2).normal(size=(9, 8)).astype("float32")
    layer(x)
    quantize(layer.experts)
    route = {k: to_numpy(v) for k, v in layer.route(x).items()}
    every = to_numpy(layer.experts(x))  # (E, T, d): every expert
    rows = np.arange(len(x))[:, None]
    weights = route["expert_weights"][..., None]
    ref = np.sum(every[route["expert_indices"], rows] * weights, axis=1)
    np.testing.assert_allclose(to_numpy(layer(x)), ref, atol=1e-5)


def test_perturbing_a_non_selected_int8_expert_changes_nothing():
    layer = moe.MoELayer(num_experts=4, hidden_dim=16, routing="switch")
    x = np.random.default_rng(3).normal(size=(1, 8)).astype("float32")
    layer(x)
    quantize(layer.experts)
    chosen = int(to_numpy(layer.route(x)["expert_indices"])[0, 0])
    before = to_numpy(layer(x))
    for e in range(4):
        for name in ("expert_in_kernel", "expert_out_kernel"):
            q = getattr(layer.experts, name)
            value = to_numpy(q).copy()
            value[e] = 127 - value[e]
            q.assign(value)
            scale = getattr(layer.experts, f"{name}_scale")
            value = to_numpy(scale).copy()
            value[e] *= 0.5
            scale.assign(value)
        after = to_numpy(layer(x))
        if e == chosen:
            assert np.abs(after - before).max() > 1e-3
            before = after
        else:
            np.testing.assert_array_equal(after, before)


def lm_like_model():
    tokens = keras.Input((4,), dtype="int32")
    x = keras.layers.Embedding(50, 16, name="embedding")(tokens)
    x = moe.MoETransformerBlock(
        num_heads=2,
        intermediate_dim=16,
        num_experts=4,
        top_k=2,
        moe_kwargs={"num_shared_experts": 1},
        name="block",
    )(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    x = moe.MoELayer(num_experts=3, hidden_dim=8, gated=True, name="moe")(x)
    return keras.Model(tokens, keras.layers.Dense(50, name="head")(x))


def test_quantized_model_round_trips_through_keras_file(tmp_path):
    model = lm_like_model()
    x = np.random.default_rng(4).integers(0, 50, size=(3, 4)).astype("int32")
    quantize(model)
    path = tmp_path / "int8.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(to_numpy(loaded(x)), to_numpy(model(x)))
    dtypes = {v.path: v.dtype for v in loaded.weights}
    for path in (
        "block/block_moe/experts/expert_in_kernel",
        "block/block_moe/shared_experts/shared_expert_out_kernel",
        "block/self_attention/query/kernel",
        "moe/experts/expert_gate_kernel",
        "head/kernel",
    ):
        assert dtypes[path] == "int8", path
    routers = [p for p in dtypes if "/router/" in p]
    assert routers and all(dtypes[p] == "float32" for p in routers)
    # A second save of the reloaded model writes the same weights.
    loaded.save(tmp_path / "again.keras")
    again = keras.saving.load_model(tmp_path / "again.keras")
    np.testing.assert_array_equal(to_numpy(again(x)), to_numpy(model(x)))


def test_quantizing_twice_is_refused():
    model = moe_model(top_k=2)
    quantize(model)
    with pytest.raises(ValueError, match="already quantized"):
        model.get_layer("moe").experts.quantize("int8")


@pytest.mark.parametrize("mode", ["int4", "float8"])
def test_other_modes_leave_the_experts_float_with_a_warning(mode):
    experts = moe.Experts(num_experts=2, hidden_dim=4)
    experts.build((None, 3))
    with pytest.raises(NotImplementedError, match="quantizes to int8 only"):
        experts.quantize(mode)
    model = moe_model(top_k=2)
    with pytest.warns(UserWarning, match="quantizes to int8 only"):
        model.quantize(mode)
    layer = model.get_layer("moe")
    assert layer.experts.quantization_mode is None
    assert layer.experts.expert_in_kernel.dtype == "float32"


def test_an_unknown_mode_is_refused():
    experts = moe.Experts(num_experts=2, hidden_dim=4)
    experts.build((None, 3))
    with pytest.raises(ValueError, match="Invalid quantization mode"):
        experts.quantize("int3")


def test_model_py_writes_an_int8_bundle_that_serves(tmp_path, lm_corpus_file):
    from moe.lm.bundle import save_load
    from moe.lm.serving.predictor import NextWordPredictor

    out = tmp_path / "int8_model"
    result = run_script(
        "model.py", "--corpus", lm_corpus_file, "--output", out,
        *LM_TINY_FLAGS, "--quantize", "int8",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "int8: top-1" in result.stdout
    loaded = save_load.load_bundle(out)
    assert loaded.training["quantized"]["mode"] == "int8"
    dtypes = {v.path: v.dtype for v in loaded.model.weights}
    experts = [p for p in dtypes if p.endswith("expert_in_kernel")]
    assert experts and all(dtypes[p] == "int8" for p in experts)
    assert all(dtypes[p] == "float32" for p in dtypes if "/router/" in p)
    predictor = NextWordPredictor(
        loaded.model, loaded.tokenizer, loaded.max_seq_len
    )
    assert predictor.predict_next("the cat sat on the")
    assert predictor.evaluate(LM_TINY_SENTENCES[0])["pairs"] > 0
    # serve.py serves it as it is, and refuses to quantize it again.
    serve = load_script("serve.py")
    assert serve.main(["--model-dir", str(out), "the cat"]) == 0
    args = ["--model-dir", str(out), "--quantize", "int8", "the cat"]
    assert serve.main(args) == 1


def test_serve_py_quantizes_a_float_bundle_in_memory(lm_trained, capsys):
    serve = load_script("serve.py")
    model_dir = str(lm_trained[0])
    before = (lm_trained[0] / "model.keras").read_bytes()
    queries = ["the cat sat on the", "how are"]
    assert serve.main(["--model-dir", model_dir, *queries]) == 0
    float_words = capsys.readouterr().out
    args = ["--model-dir", model_dir, "--quantize", "int8-weights"]
    assert serve.main([*args, *queries]) == 0
    assert capsys.readouterr().out == float_words  # tiny model, same words
    assert (lm_trained[0] / "model.keras").read_bytes() == before
    assert serve.main([*args, "--export", "x"]) == 1
    assert "--quantize goes with serving" in capsys.readouterr().err


def test_model_py_refuses_an_unknown_quantize_mode(tmp_path, lm_corpus_file):
    result = run_script(
        "model.py", "--corpus", lm_corpus_file, "--output", tmp_path / "m",
        "--quantize", "int4",
    )  # fmt: skip
    assert result.returncode == 2
    assert "--quantize: invalid choice: 'int4'" in result.stderr
    assert not (tmp_path / "m").exists()
