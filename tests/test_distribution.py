"""Expert parallelism: `moe.distribution` (keras.distribution on JAX).

Virtual XLA devices are fixed when JAX starts, so each scenario runs in its
own process.
"""

import json
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import REPO_ROOT, script_env

EXPERT_PARALLEL_SCRIPT = """
import json, sys
import jax, keras, numpy as np
import moe
from moe.distribution import expert_parallel

assert len(jax.devices()) == 4, jax.devices()
x = np.random.default_rng(0).normal(size=(16, 8)).astype("float32")
y = np.random.default_rng(1).normal(size=(16, 3)).astype("float32")


def build(num_experts=4):
    keras.utils.set_random_seed(3)
    inputs = keras.Input((8,))
    h = moe.MoELayer(
        num_experts=num_experts, hidden_dim=16, gated=True,
        num_shared_experts=1, name="moe",
    )(inputs)
    net = keras.Model(inputs, keras.layers.Dense(3, name="head")(h))
    net.compile(keras.optimizers.SGD(0.1), "mse")
    return net


def loss_and_grads(net):
    def loss(trainable):
        out, _ = net.stateless_call(
            trainable, [v.value for v in net.non_trainable_variables], x,
            training=False,
        )
        return jax.numpy.mean((out - y) ** 2), out
    (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        [v.value for v in net.trainable_variables]
    )
    return np.asarray(out), [np.asarray(g) for g in grads]


distribution = expert_parallel(expert_shards=2)  # mesh (batch 2, experts 2)
with distribution.scope():
    sharded = build()
    shardings = {v.path: list(v.value.sharding.spec) for v in sharded.weights}
    devices = {
        v.path: len({s.device for s in v.value.addressable_shards
                     if s.data.shape[0] < v.shape[0]})
        for v in sharded.weights
    }
    out, grads = loss_and_grads(sharded)
    sharded.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    trained = sharded.predict(x, verbose=0)
    sharded.save(sys.argv[1])
    try:
        build(num_experts=3)
        error = None
    except ValueError as e:
        error = str(e)

reference = build()  # unsharded, same initial weights
ref_out, ref_grads = loss_and_grads(reference)
reference.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
np.save(sys.argv[2], trained)
print(json.dumps({
    "shardings": shardings, "devices": devices, "error": error,
    "out": float(np.abs(out - ref_out).max()),
    "grads": max(float(np.abs(a - b).max()) for a, b in zip(grads, ref_grads)),
    "trained": float(np.abs(trained - reference.predict(x, verbose=0)).max()),
    "x": x.tolist(),
}))
"""


def _jax_env(devices):
    env = {**script_env(), "KERAS_BACKEND": "jax"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def test_expert_parallel_shards_experts_and_matches_one_device(tmp_path):
    saved, trained = tmp_path / "ep.keras", tmp_path / "trained.npy"
    result = subprocess.run(
        [sys.executable, "-c", EXPERT_PARALLEL_SCRIPT, str(saved),
         str(trained)],
        cwd=REPO_ROOT, env=_jax_env(4), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    routed = [
        f"moe/experts/expert_{part}"
        for part in ("in_kernel", "gate_kernel", "out_kernel")
    ] + [
        f"moe/experts/expert_{part}"
        for part in ("in_bias", "gate_bias", "out_bias")
    ]
    for path in routed:
        rank = 3 if path.endswith("kernel") else 2
        assert out["shardings"][path] == ["experts"] + [None] * (rank - 1)
        assert out["devices"][path] == 4  # each device holds 2 of 4 experts
    replicated = set(out["shardings"]) - set(routed)
    assert "moe/shared_experts/shared_expert_in_kernel" in replicated
    assert "moe/router/gating_network/router_kernel" in replicated
    for path in replicated:
        assert set(out["shardings"][path]) <= {None}, path
        assert out["devices"][path] == 0  # whole copies
    assert out["out"] < 1e-5 and out["grads"] < 1e-5
    assert out["trained"] < 1e-5  # one SGD step, sharded vs not
    assert (
        "`num_experts` (3) must be a multiple of the 2 devices"
        in (out["error"])
    )

    # Saved under expert parallelism, it is a plain Keras file: here it
    # loads on one device (this process: TensorFlow, one CPU).
    loaded = keras.saving.load_model(saved)
    np.testing.assert_allclose(
        loaded.predict(np.array(out["x"], "float32"), verbose=0),
        np.load(trained),
        atol=1e-5,
    )


KERAS_HUB_EXPERT_PARALLEL_SCRIPT = """
import json
import jax, keras, keras_hub, numpy as np
import moe.keras_hub
from moe.distribution import expert_parallel

assert len(jax.devices()) == 4, jax.devices()
rng = np.random.default_rng(1)
x = {
    "token_ids": rng.integers(1, 40, (2, 7)).astype("int32"),
    "padding_mask": np.ones((2, 7), "int32"),
}


def sparse_qwen_moe():
    # A tiny Qwen-MoE: 8 experts and a gated shared one, every weight drawn
    # from one seed (some of keras-hub's banks start at zero).
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.QwenMoeBackbone(
        vocabulary_size=40, num_layers=2, num_query_heads=4, hidden_dim=16,
        num_key_value_heads=2, intermediate_dim=24, moe_intermediate_dim=8,
        num_experts=8, top_k=3, shared_expert_intermediate_dim=12,
    )
    draw = np.random.default_rng(0)
    for v in backbone.weights:
        value = draw.normal(size=v.shape)
        value = 1 + 0.1 * value if "layernorm" in v.path else 0.3 * value
        v.assign(value.astype(v.dtype))
    return moe.keras_hub.sparsify(backbone)


distribution = expert_parallel(expert_shards=4)  # mesh (batch 1, experts 4)
with distribution.scope():
    sharded = sparse_qwen_moe()
    out = np.asarray(sharded(x))
    predicted = sharded.predict(x, batch_size=2, verbose=0)  # traced
    sharded.enable_lora(2, target_layer_names=["experts"])
    shardings = {
        v.path: list(v.value.sharding.spec) for v in sharded.weights
    }
    split = {
        v.path: len({s.device for s in v.value.addressable_shards
                     if s.data.shape[0] < v.shape[0]})
        for v in sharded.weights
    }
reference = np.asarray(sparse_qwen_moe()(x))  # unsharded, same weights
print(json.dumps({
    "shardings": shardings, "split": split,
    "out": float(np.abs(out - reference).max()),
    "predicted": float(np.abs(predicted - reference).max()),
}))
"""


def test_expert_parallel_shards_a_sparsified_keras_hub_model():
    pytest.importorskip("keras_hub")
    result = subprocess.run(
        [sys.executable, "-c", KERAS_HUB_EXPERT_PARALLEL_SCRIPT],
        cwd=REPO_ROOT, env=_jax_env(4), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["out"] < 1e-5 and out["predicted"] < 1e-5
    routed = [
        path
        for path in out["shardings"]
        if re.fullmatch(r".*/moe/experts/expert_\w+", path)
    ]
    # Two blocks: three kernels, each with two LoRA adapters.
    assert len(routed) == 2 * 3 * 3, routed
    assert any("lora_a" in path for path in routed)
    for path in routed:
        spec = out["shardings"][path]
        assert spec[0] == "experts" and set(spec[1:]) <= {None}, path
        assert out["split"][path] == 4, path  # 2 of the 8 experts each
    replicated = set(out["shardings"]) - set(routed)
    assert any("shared_expert_in_kernel" in p for p in replicated)
    assert any("router_kernel" in p for p in replicated)
    for path in replicated:
        assert set(out["shardings"][path]) <= {None}, path
        assert out["split"][path] == 0, path


def test_expert_parallel_needs_jax():
    from moe.distribution import expert_parallel

    assert keras.backend.backend() == "tensorflow"
    with pytest.raises(ValueError, match="JAX backend only"):
        expert_parallel()


def test_expert_layout_map_patterns():
    from moe.distribution import EXPERT_BIAS_PATH, EXPERT_KERNEL_PATH

    for path in (
        "moe/experts/expert_in_kernel",
        "moe/experts/expert_gate_kernel",
        "block_1/moe/experts/expert_out_kernel",
        "transformer_layer_0/qwen_sparse_moe_block/moe/experts/"
        "expert_in_kernel",
    ):
        assert re.fullmatch(EXPERT_KERNEL_PATH, path)
        assert re.fullmatch(EXPERT_BIAS_PATH, path.replace("kernel", "bias"))
        for adapter in ("lora_a", "lora_b"):
            assert re.fullmatch(
                EXPERT_KERNEL_PATH, path.replace("kernel", adapter)
            )
    for path in (
        "moe/shared_experts/shared_expert_in_kernel",
        "moe/router/gating_network/router_kernel",
        "adam/moe_expert_in_kernel_momentum",
        "moe/expert_in_kernel_extra",
        "moe/shared_experts/shared_expert_in_lora_a",
    ):
        assert not re.fullmatch(EXPERT_KERNEL_PATH, path)
