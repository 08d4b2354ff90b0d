"""`moe.convert.from_transformers` against the real Hugging Face blocks.

Each case of hf_blocks.CASES builds a tiny seeded block with `transformers`
(float32, CPU); the converted `MoELayer` must give its outputs to 1e-5, its
training losses, and ignore an expert no token chose. Runs on the backend
KERAS_BACKEND names; test_backends.py (the backend matrix) reruns the parity
tests of Mixtral, DeepSeek-V3 and GPT-OSS (softmax and sigmoid routers,
groups, bias, shared experts) on JAX and PyTorch.
"""

import doctest
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from hf_blocks import (
    CASES,
    hf_block,
    hf_load_balancing_loss,
    hf_router_z_loss,
    per_expert_weights,
)
from keras import ops

import moe
import moe.convert
from moe.convert import from_transformers

BACKEND = keras.backend.backend()
TOLERANCE = 1e-5
needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None,
    reason="transformers is not installed (requirements-dev.txt)",
)
needs_keras_hub = pytest.mark.skipif(
    importlib.util.find_spec("keras_hub") is None,
    reason="keras-hub is not installed (requirements-dev.txt)",
)
# Models whose Hugging Face block has the fused transformers-5 experts and
# whose checkpoints hold one matrix per expert.
PER_EXPERT_LAYOUTS = ["mixtral", "qwen2_moe", "olmoe", "deepseek_v3"]


def run(layer, inputs, **kwargs):
    return ops.convert_to_numpy(layer(inputs, **kwargs))


def max_abs_diff(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.fixture(scope="module")
def blocks():
    """One Hugging Face block per case, built once."""
    cache = {}

    def get(case, **kwargs):
        key = (case, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = hf_block(case, **kwargs)
        return cache[key]

    return get


# --- Parity ------------------------------------------------------------------


@needs_transformers
@pytest.mark.parametrize("case", CASES)
def test_parity_outputs_match_hugging_face(blocks, case):
    block = blocks(case)
    layer = from_transformers(block.config, block.weights)
    assert max_abs_diff(run(layer, block.inputs), block.outputs) < TOLERANCE


@needs_transformers
@pytest.mark.parametrize("case", PER_EXPERT_LAYOUTS)
def test_parity_per_expert_layout_of_older_checkpoints(blocks, case):
    block = blocks(case)
    weights = per_expert_weights(case, block.weights)
    assert "experts.gate_up_proj" not in weights
    layer = from_transformers(block.config, weights)
    assert max_abs_diff(run(layer, block.inputs), block.outputs) < TOLERANCE


@needs_transformers
@pytest.mark.parametrize(
    "case", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"]
)
def test_parity_on_rank_2_inputs_and_routing_decision(blocks, case):
    block = blocks(case)
    layer = from_transformers(block.config, block.weights)
    d = block.inputs.shape[-1]
    tokens = block.inputs.reshape(-1, d)
    outputs = run(layer, tokens)
    assert max_abs_diff(outputs, block.outputs.reshape(-1, d)) < TOLERANCE
    chosen = ops.convert_to_numpy(layer.route(tokens)["expert_indices"])
    np.testing.assert_array_equal(
        np.sort(chosen, -1), np.sort(block.expert_indices, -1)
    )


@needs_transformers
@pytest.mark.parametrize(
    "case", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"]
)
def test_parity_expert_nobody_chose_changes_nothing(blocks, case):
    # Two tokens choose at most 2 * k of the experts.
    block = blocks(case, batch=1, seq=2)
    unchosen = sorted(
        set(range(block.router_logits.shape[-1]))
        - set(block.expert_indices.ravel())
    )
    assert unchosen
    weights = dict(block.weights)
    for name in ("experts.gate_up_proj", "experts.down_proj"):
        weights[name] = weights[name].copy()
        weights[name][unchosen] += 100.0
    layer = from_transformers(block.config, weights)
    reference = from_transformers(block.config, block.weights)
    np.testing.assert_array_equal(
        run(layer, block.inputs), run(reference, block.inputs)
    )
    assert max_abs_diff(run(layer, block.inputs), block.outputs) < TOLERANCE


@needs_transformers
def test_parity_selection_bias_changes_choices_not_weights(blocks):
    # The test block's bias changes some choices, so the layer uses it.
    block = blocks("deepseek_v3")
    weights = dict(block.weights)
    weights["gate.e_score_correction_bias"] = np.zeros(16, "float32")
    unbiased = from_transformers(block.config, weights)
    biased = from_transformers(block.config, block.weights)
    chosen = ops.convert_to_numpy(biased.route(block.inputs)["expert_indices"])
    unbiased_chosen = unbiased.route(block.inputs)["expert_indices"]
    assert not np.array_equal(
        np.sort(chosen, -1), np.sort(ops.convert_to_numpy(unbiased_chosen), -1)
    )


@needs_transformers
def test_parity_gpt_oss_router_bias_and_clamps_matter(blocks):
    # The test block's router bias changes choices and its expert
    # pre-activations cross `swiglu_limit`: parity needs both.
    block = blocks("gpt_oss")
    layer = from_transformers(block.config, block.weights)
    assert layer.router.router_use_bias
    assert layer.experts.glu_limit == block.config["swiglu_limit"] == 1.0
    weights = dict(block.weights, **{"router.bias": np.zeros(8, "float32")})
    chosen = from_transformers(block.config, weights).route(block.inputs)
    assert not np.array_equal(
        np.sort(ops.convert_to_numpy(chosen["expert_indices"]), -1),
        np.sort(block.expert_indices, -1).reshape(chosen["kept"].shape),
    )
    unclamped = from_transformers(block.config, block.weights, glu_limit=None)
    assert max_abs_diff(run(unclamped, block.inputs), block.outputs) > 1e-2


@needs_transformers
def test_parity_switch_router_with_bias(blocks):
    block = blocks("switch_transformers", router_bias=True)
    assert "router.classifier.bias" in block.weights
    layer = from_transformers(block.config, block.weights)
    assert max_abs_diff(run(layer, block.inputs), block.outputs) < TOLERANCE


@needs_keras_hub
def test_parity_keras_hub_gpt_oss_block():
    # keras-hub's GPT-OSS block (every expert on every token), its weights
    # re-drawn (the banks start at zero) under Hugging Face's names, with
    # pre-activations that cross its fixed limit of 7.
    from keras_hub.src.models.gpt_oss.gpt_oss_decoder import (
        GptOssSparseMoeBlock,
    )

    d, h, num_experts, top_k = 16, 12, 8, 2
    block = GptOssSparseMoeBlock(d, h, num_experts, top_k, dtype="float32")
    block.build((None, None, d))
    rng = np.random.default_rng(0)
    scales = {
        "router_dense/kernel": d**-0.5,
        "router_dense/bias": 1.0,
        "gate_up_proj": 4 * d**-0.5,
        "gate_up_proj_bias": 1.0,
        "down_proj": 0.1 * h**-0.5,
        "down_proj_bias": 0.1,
    }
    for variable in block.weights:
        (scale,) = [v for k, v in scales.items() if variable.path.endswith(k)]
        variable.assign(rng.normal(size=variable.shape) * scale)
    router, experts = block.router.router_dense, block.experts
    weights = {
        "router.weight": ops.convert_to_numpy(router.kernel).T,
        "router.bias": router.bias,
        "experts.gate_up_proj": experts.gate_up_proj,
        "experts.gate_up_proj_bias": experts.gate_up_proj_bias,
        "experts.down_proj": experts.down_proj,
        "experts.down_proj_bias": experts.down_proj_bias,
    }
    weights = {k: ops.convert_to_numpy(v) for k, v in weights.items()}
    config = {
        "model_type": "gpt_oss",
        "hidden_size": d,
        "intermediate_size": h,
        "num_local_experts": num_experts,
        "num_experts_per_tok": top_k,
    }
    layer = from_transformers(config, weights)
    inputs = rng.normal(size=(2, 8, d)).astype("float32")
    gate_up = inputs @ weights["experts.gate_up_proj"][0]
    assert (gate_up[..., ::2] > 7).any() and (gate_up[..., 1::2] < -7).any()
    expected = ops.convert_to_numpy(block(inputs)[0])
    assert max_abs_diff(run(layer, inputs), expected) < TOLERANCE


# --- Training losses ---------------------------------------------------------


def training_losses(layer, inputs):
    layer(inputs, training=True)
    return [float(ops.convert_to_numpy(loss)) for loss in layer.losses]


@needs_transformers
@pytest.mark.parametrize(
    "case", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "jamba", "gpt_oss"]
)
def test_load_balancing_loss_is_hugging_faces(blocks, case):
    block = blocks(case)
    layer = from_transformers(block.config, block.weights)
    coef = block.config["router_aux_loss_coef"]
    (aux_loss,) = training_losses(layer, block.inputs)  # no z-loss
    expected = coef * hf_load_balancing_loss(case, block)
    np.testing.assert_allclose(aux_loss, expected, rtol=1e-5)
    # Hugging Face's top-k form counts k choices per token: k when
    # balanced, where MoELayer's loss is 1.
    top_k = block.config["num_experts_per_tok"]
    assert layer.aux_loss_weight == pytest.approx(coef * top_k)


@needs_transformers
def test_switch_losses_are_hugging_faces_per_sequence(blocks):
    # Hugging Face averages Switch's losses over sequences: one call each.
    block = blocks("switch_transformers", router_jitter_noise=0.0)
    layer = from_transformers(block.config, block.weights)
    per_sequence = [training_losses(layer, x[None]) for x in block.inputs]
    aux_loss, z_loss = np.mean(per_sequence, axis=0)
    config = block.config
    np.testing.assert_allclose(
        aux_loss,
        config["router_aux_loss_coef"]
        * hf_load_balancing_loss("switch_transformers", block),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        z_loss,
        config["router_z_loss_coef"]
        * hf_router_z_loss("switch_transformers", block),
        rtol=1e-5,
    )


@needs_transformers
@pytest.mark.parametrize("case", ["deepseek_v3", "deepseek_v2"])
def test_no_auxiliary_loss_where_hugging_face_has_none(blocks, case):
    block = blocks(case)
    layer = from_transformers(block.config, block.weights)
    assert hf_load_balancing_loss(case, block) is None
    assert training_losses(layer, block.inputs) == []


# --- Switch Transformers' capacity -------------------------------------------


@needs_transformers
def test_switch_tokens_kept_within_capacity_match(blocks):
    block = blocks("switch_transformers", expert_capacity=2)
    assert 0 < block.kept.sum() < block.kept.size  # some tokens dropped
    layer = from_transformers(block.config, block.weights)  # dropless
    d = block.inputs.shape[-1]
    outputs = run(layer, block.inputs).reshape(-1, d)
    reference = block.outputs.reshape(-1, d)
    assert max_abs_diff(outputs[block.kept], reference[block.kept]) < TOLERANCE
    # Hugging Face gives a dropped token no MLP output; the layer computes
    # it with its expert.
    np.testing.assert_array_equal(reference[~block.kept], 0.0)
    assert np.all(np.abs(outputs[~block.kept]).max(-1) > 0)


@needs_transformers
def test_switch_capacity_of_one_sequence_drops_the_same_tokens(blocks):
    # For one sequence of `seq` tokens, capacity_factor = capacity * E / seq
    # gives MoELayer the capacity Hugging Face has per sequence, and both
    # keep the earliest tokens of each expert.
    block = blocks("switch_transformers", batch=1, expert_capacity=2)
    assert 0 < block.kept.sum() < block.kept.size
    num_experts, seq = block.config["num_experts"], block.inputs.shape[1]
    capacity_factor = block.config["expert_capacity"] * num_experts / seq
    layer = from_transformers(
        block.config, block.weights, capacity_factor=capacity_factor
    )
    assert max_abs_diff(run(layer, block.inputs), block.outputs) < TOLERANCE
    kept = ops.convert_to_numpy(layer.route(block.inputs)["kept"])
    np.testing.assert_array_equal(kept.reshape(-1), block.kept)


# --- The converted layer -----------------------------------------------------


@needs_transformers
@pytest.mark.parametrize("case", ["qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_converted_layer_round_trips_through_keras_file(blocks, case, tmp_path):
    block = blocks(case)
    layer = from_transformers(block.config, block.weights)
    inputs = keras.Input(block.inputs.shape[1:])
    model = keras.Model(inputs, layer(inputs))
    path = tmp_path / "converted.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        ops.convert_to_numpy(loaded(block.inputs)),
        ops.convert_to_numpy(model(block.inputs)),
        atol=1e-6,
    )


@needs_transformers
def test_layer_arguments_override_converted_ones(blocks):
    block = blocks("mixtral")
    layer = from_transformers(
        block.config, block.weights, name="block_3", aux_loss_weight=0.0
    )
    assert layer.name == "block_3"
    assert layer.aux_loss_weight == 0.0


@needs_transformers
def test_hub_config_names_are_read(blocks):
    # Qwen3-MoE's config.json says `num_experts`, its to_dict() says
    # `num_local_experts`; config.json may leave class defaults out.
    block = blocks("qwen3_moe")
    config = dict(block.config)
    config["num_experts"] = config.pop("num_local_experts")
    del config["router_aux_loss_coef"]
    layer = from_transformers(config, block.weights)
    assert layer.num_experts == 8
    assert max_abs_diff(run(layer, block.inputs), block.outputs) < TOLERANCE


@needs_transformers
def test_docs_example_reads_a_checkpoint_shard(blocks, tmp_path, monkeypatch):
    # The example of docs/convert.md, on a checkpoint directory laid out
    # like Mixtral's on the Hub: per-expert weights, other layers beside.
    from safetensors.numpy import save_file

    block = blocks("mixtral")
    checkpoint = tmp_path / "Mixtral-8x7B-v0.1"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps(block.config))
    tensors = {
        f"model.layers.{layer}.block_sparse_moe.{name}": value
        for layer in (0, 10)
        for name, value in per_expert_weights("mixtral", block.weights).items()
    }
    tensors["model.layers.0.self_attn.q_proj.weight"] = np.ones((16, 16))
    save_file(
        {k: np.asarray(v, "float32") for k, v in tensors.items()},
        checkpoint / "model-00001-of-00019.safetensors",
    )
    docs = Path(__file__).resolve().parents[1] / "docs" / "convert.md"
    (example,) = re.findall(r"```python\n(.*?)```", docs.read_text(), re.S)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(example, str(docs), "exec"), namespace)
    assert ops.convert_to_numpy(namespace["outputs"]).shape == (1, 10, 16)
    layer = namespace["layer"]
    assert max_abs_diff(run(layer, block.inputs), block.outputs) < TOLERANCE


@needs_transformers
def test_mixed_precision_policy_runs_the_experts_in_bfloat16(blocks):
    block = blocks("mixtral")
    layer = from_transformers(
        block.config, block.weights, dtype="mixed_bfloat16"
    )
    assert layer.expert_in_kernel.dtype == "float32"
    assert layer.gating_network.router_kernel.dtype == "float32"
    outputs = layer(block.inputs)
    assert keras.backend.standardize_dtype(outputs.dtype) == "bfloat16"
    np.testing.assert_allclose(
        ops.convert_to_numpy(ops.cast(outputs, "float32")),
        block.outputs,
        atol=0.1,
    )


def test_no_torch_or_transformers_import():
    code = (
        "import sys, numpy as np\n"
        "from moe.convert import from_transformers\n"
        "config = {'model_type': 'olmoe', 'hidden_size': 4,\n"
        "          'intermediate_size': 3, 'num_experts': 2,\n"
        "          'num_experts_per_tok': 1}\n"
        "weights = {'gate.weight': np.ones((2, 4)),\n"
        "           'experts.gate_up_proj': np.ones((2, 6, 4)),\n"
        "           'experts.down_proj': np.ones((2, 4, 3))}\n"
        "from_transformers(config, weights)\n"
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))\n"
    )
    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


# --- Errors ------------------------------------------------------------------

MIXTRAL_CONFIG = {
    "model_type": "mixtral",
    "hidden_size": 4,
    "intermediate_size": 3,
    "num_local_experts": 2,
    "num_experts_per_tok": 1,
}


def mixtral_weights():
    return {
        "gate.weight": np.ones((2, 4), "float32"),
        "experts.gate_up_proj": np.ones((2, 6, 4), "float32"),
        "experts.down_proj": np.ones((2, 4, 3), "float32"),
    }


def test_docstring_example_runs():
    result = doctest.testmod(moe.convert, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_mixtral_config_and_weights_convert():
    layer = from_transformers(MIXTRAL_CONFIG, mixtral_weights())
    assert isinstance(layer, moe.MoELayer)
    assert layer.built


@pytest.mark.parametrize(
    "config, message",
    [
        (
            {"model_type": "llama"},
            r"converts the MoE blocks of .*'mixtral'.*"
            r"Received: config\['model_type'\]='llama'",
        ),
        ({}, r"Received: config\['model_type'\]=None"),
        (
            {**MIXTRAL_CONFIG, "hidden_act": "gelu_new"},
            "`hidden_act` must be one of .* Received: hidden_act='gelu_new'",
        ),
        (
            {k: v for k, v in MIXTRAL_CONFIG.items() if k != "hidden_size"},
            "A mixtral config needs `hidden_size`",
        ),
        (
            {**MIXTRAL_CONFIG, "model_type": "gpt_oss", "swiglu_alpha": 1.5},
            "Received: swiglu_alpha=1.5",
        ),
        (
            {
                **MIXTRAL_CONFIG,
                "model_type": "deepseek_v2",
                "moe_intermediate_size": 3,
                "topk_method": "noaux_tc",
            },
            "Received: topk_method='noaux_tc'",
        ),
    ],
)
def test_unsupported_config_is_a_clear_error(config, message):
    with pytest.raises(ValueError, match=message):
        from_transformers(config, mixtral_weights())


def test_unknown_weight_is_a_clear_error():
    weights = {**mixtral_weights(), "experts.bias": np.ones(2)}
    with pytest.raises(ValueError, match="no weight named 'experts.bias'"):
        from_transformers(MIXTRAL_CONFIG, weights)


def test_weights_with_the_layer_prefix_are_a_clear_error():
    weights = {
        f"model.layers.0.mlp.{k}": v for k, v in mixtral_weights().items()
    }
    with pytest.raises(ValueError, match="names relative to the block"):
        from_transformers(MIXTRAL_CONFIG, weights)


def test_missing_weight_is_a_clear_error():
    weights = mixtral_weights()
    del weights["experts.down_proj"]
    with pytest.raises(
        ValueError, match="needs the weight 'experts.down_proj'"
    ):
        from_transformers(MIXTRAL_CONFIG, weights)


def test_missing_per_expert_weight_is_a_clear_error():
    weights = {
        "gate.weight": np.ones((2, 4)),
        **{f"experts.{e}.w1.weight": np.ones((3, 4)) for e in range(2)},
        **{f"experts.{e}.w3.weight": np.ones((3, 4)) for e in range(2)},
        "experts.0.w2.weight": np.ones((4, 3)),
    }
    with pytest.raises(ValueError, match="needs the weight 'experts.1.w2"):
        from_transformers(MIXTRAL_CONFIG, weights)


def test_shape_that_does_not_fit_is_a_clear_error():
    weights = {**mixtral_weights(), "gate.weight": np.ones((3, 4))}
    with pytest.raises(
        ValueError,
        match=r"'gate.weight' .* has shape \(2, 4\)\. "
        r"Received: gate.weight of shape \(3, 4\)",
    ):
        from_transformers(MIXTRAL_CONFIG, weights)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_experts_per_tok", 2.0, r"must be between 1 and .* \(2\)"),
        ("num_experts_per_tok", 3, r"must be between 1 and .* \(2\)"),
        ("num_local_experts", "2", "must be an integer >= 1"),
        ("intermediate_size", True, "must be an integer >= 1"),
        ("hidden_size", 4.0, "must be an integer >= 1"),
        ("router_aux_loss_coef", "0.01", "must be a finite number >= 0"),
    ],
)
def test_config_value_of_the_wrong_kind_names_the_field(field, value, message):
    config = {**MIXTRAL_CONFIG, field: value}
    with pytest.raises(
        ValueError,
        match=rf"`config\['{field}'\]` {message}.*"
        rf"Received: config\['{field}'\]={re.escape(repr(value))}$",
    ):
        from_transformers(config, mixtral_weights())


@pytest.mark.parametrize(
    "config",
    [
        {"model_type": "deepseek_v3", "n_group": "4"},
        {"model_type": "deepseek_v3", "n_shared_experts": 1.5},
        {"model_type": "deepseek_v3", "routed_scaling_factor": "2.5"},
        {"model_type": "deepseek_v3", "norm_topk_prob": "yes"},
        {"model_type": "qwen2_moe", "shared_expert_intermediate_size": "8"},
        {"model_type": "switch_transformers", "router_jitter_noise": 1.0},
    ],
)
def test_config_value_of_each_family_names_the_field(config):
    (field,) = set(config) - {"model_type"}
    config = {
        **MIXTRAL_CONFIG,
        "num_experts": 2,
        "moe_intermediate_size": 3,
        "d_ff": 3,
        **config,
    }
    with pytest.raises(ValueError, match=rf"Received: config\['{field}'\]="):
        from_transformers(config, mixtral_weights())


@pytest.mark.parametrize(
    "dtype, message",
    [
        ("int8", "quantised"),
        ("uint8", "quantised"),
        ("int64", "quantised"),
        ("bool", "a mask"),
        ("complex64", "no real equivalent"),
        ("float8_e4m3fn", "quantised"),
    ],
)
def test_weight_that_is_not_real_floats_is_a_clear_error(dtype, message):
    import ml_dtypes  # noqa: F401  (registers the float8 dtype names)

    weights = mixtral_weights()
    weights["experts.down_proj"] = weights["experts.down_proj"].astype(dtype)
    with pytest.raises(
        ValueError,
        match=rf"'experts.down_proj' must hold real floating-point numbers; "
        rf".*{message}.*Received: experts.down_proj of dtype {dtype}$",
    ):
        from_transformers(MIXTRAL_CONFIG, weights)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e300])
def test_weight_that_is_not_finite_is_a_clear_error(bad):
    weights = mixtral_weights()
    weights["gate.weight"] = weights["gate.weight"].astype("float64")
    weights["gate.weight"][1, 2] = bad
    with pytest.raises(
        ValueError,
        match=r"'gate.weight' must be finite; it holds 1 NaN or infinite "
        r".*Received: gate.weight\[1, 2\]=-?(nan|inf)$",
    ):
        from_transformers(MIXTRAL_CONFIG, weights)


def test_bfloat16_and_float16_weights_convert():
    import ml_dtypes

    weights = mixtral_weights()
    weights["gate.weight"] = weights["gate.weight"].astype(ml_dtypes.bfloat16)
    weights["experts.down_proj"] = weights["experts.down_proj"].astype(
        "float16"
    )
    layer = from_transformers(MIXTRAL_CONFIG, weights)
    kernel = {w.name: w for w in layer.weights}["router_kernel"]
    np.testing.assert_array_equal(ops.convert_to_numpy(kernel), np.ones((4, 2)))
