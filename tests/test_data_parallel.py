"""Scaling out: `model.py --strategy` (tf.distribute) and expert parallelism
(`moe.distribution`, keras.distribution on JAX).

Device set-ups (logical CPU devices, virtual XLA devices, a cluster) are
fixed when a backend starts, so each scenario runs in its own processes.
"""

import json
import re
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import REPO_ROOT, run_script, script_env

from moe.lm.training import data_parallel

# --- tf.distribute ---------------------------------------------------------

MIRRORED_SCRIPT = """
import json, sys
import tensorflow as tf

# Two logical CPU devices: must happen before TensorFlow sets up devices.
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)
import keras
from moe.lm.model import architectures
from moe.lm.text import examples
from moe.lm.training import data_parallel
from moe.lm.training.train import build
from moe.lm.training.config import TrainingConfig
from moe.lm.training.datasets import load_corpus, prepare_data

config = TrainingConfig(
    corpus=[sys.argv[1]], batch_size=16, max_seq_len=3, embed_dim=8,
    hidden_dim=8, num_experts=4, seed=7, validation_split=0.2,
    # The load-balancing loss multiplies two batch means, so each replica's
    # value on half a batch differs from the full batch's; the z-loss and
    # the task loss are means over inputs and split exactly.
    aux_loss_weight=0.0,
)
tokenizer, tokens, starts, train, _ = prepare_data(
    config, load_corpus(config)
)
train = train[: len(train) // 16 * 16]  # whole global batches only


def trajectory(strategy):
    keras.utils.set_random_seed(7)
    dataset = examples.make_dataset(
        tokens, starts, train, 3, config.batch_size, shuffle_seed=7
    )
    with strategy.scope():
        net = build(config, tokenizer.vocab_size)
        architectures.compile_model(net, 3e-3)
    steps = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: steps.append(
            float(logs["loss"])
        )
    )
    history = net.fit(
        dataset, epochs=2, verbose=0, callbacks=[record], shuffle=False
    )
    # The expert load per epoch (the busiest expert's share, x E): a max
    # of the replicas' summed loads, so it is read at the epoch's end.
    load = history.history["moe_max_load"]
    return steps, load, [w.tolist() for w in net.get_weights()]


one = tf.distribute.MirroredStrategy(["/cpu:0"])
two = data_parallel.make_strategy("mirrored")  # every logical device
one_steps, one_load, one_weights = trajectory(one)
two_steps, two_load, two_weights = trajectory(two)
print(json.dumps({
    "replicas": [one.num_replicas_in_sync, two.num_replicas_in_sync],
    "one": one_steps, "two": two_steps, "load": [one_load, two_load],
    "weights": [one_weights, two_weights],
}))
"""


def test_mirrored_two_devices_follow_the_one_device_trajectory(
    lm_corpus_file, tmp_path
):
    result = run_script("-c", MIRRORED_SCRIPT, lm_corpus_file, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["replicas"] == [1, 2]
    one, two = np.array(out["one"]), np.array(out["two"])
    assert one.shape == two.shape and len(one) >= 10
    # Same global batch of 16 (8 per replica): the same loss step by step,
    # the same expert load each epoch and the same weights at the end.
    np.testing.assert_allclose(two, one, atol=1e-4, rtol=0)
    np.testing.assert_allclose(*out["load"], atol=1e-4, rtol=0)
    assert not np.allclose(one[0], one[-1])  # it did train
    for a, b in zip(*out["weights"]):
        np.testing.assert_allclose(np.array(b), np.array(a), atol=1e-4)


MIRRORED_CLI_SCRIPT = """
import runpy, sys
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)
sys.argv[0] = "model.py"
runpy.run_path("model.py", run_name="__main__")
"""


@pytest.mark.parametrize("architecture", ["pooled", "transformer"])
def test_model_py_trains_on_two_mirrored_replicas(
    lm_corpus_file, tmp_path, architecture
):
    # model.py's own defaults (32 steps per execution), and a validation
    # part under one batch, of an odd size (33 pairs, 15 windows): both
    # once failed with two replicas.
    out = tmp_path / "bundle"
    flags = [
        lm_corpus_file, "--output", out, "--architecture", architecture,
        "--strategy", "mirrored", "--epochs", "1", "--batch-size", "64",
        "--max-seq-len", "3", "--embed-dim", "8", "--hidden-dim", "8",
        "--num-layers", "1", "--num-heads", "2", "--validation-split", "0.15",
    ]  # fmt: skip
    flags[0:0] = ["--corpus"]
    result = run_script("-c", MIRRORED_CLI_SCRIPT, *flags, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "training.json").read_text())
    assert summary["distribution"]["replicas"] == 2
    assert summary["validation"]["perplexity"] > 1


WORKER_SCRIPT = """
import sys
import keras, numpy as np
from moe.lm import cli
from moe.lm.training import data_parallel, train
from moe.lm.training.summary import summary_line

# The strategy first: a cluster is joined before TensorFlow sets up devices.
strategy = data_parallel.make_strategy("multi-worker")


class SaveWeights(keras.callbacks.Callback):
    # After EarlyStopping (listed first) has restored the best weights.
    def on_train_end(self, logs=None):
        np.savez(sys.argv[1], *self.model.get_weights())


config = cli.parse_training_args(sys.argv[2:])
summary = train.train(
    config, verbose=0, callbacks=[SaveWeights()], strategy=strategy
)
print(summary_line(summary))
"""


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def test_multi_worker_two_processes_agree_and_only_the_chief_saves(
    lm_corpus_file, tmp_path
):
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    flags = [
        "--corpus", lm_corpus_file, "--epochs", "1", "--batch-size", "16",
        "--max-seq-len", "3", "--embed-dim", "8", "--hidden-dim", "8",
        "--num-experts", "2", "--validation-split", "0.2", "--seed", "7",
        "--strategy", "multi-worker",
    ]  # fmt: skip
    outputs = [tmp_path / "chief_model", tmp_path / "worker_model"]
    # Output to files, not pipes: a worker blocked writing to a full pipe
    # would stall its peer in the next collective.
    logs = [(tmp_path / f"worker_{i}.log").open("w+") for i in range(2)]
    procs = []
    try:
        for index in range(2):
            task = {"type": "worker", "index": index}
            env = {
                **script_env(),
                "TF_CONFIG": json.dumps({"cluster": cluster, "task": task}),
            }
            argv = [
                tmp_path / f"weights_{index}.npz",
                *flags, "--output", outputs[index],
            ]  # fmt: skip
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", WORKER_SCRIPT, *map(str, argv)],
                    cwd=REPO_ROOT,
                    env=env,
                    stdout=logs[index],
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        for p in procs:
            p.wait(timeout=400)
    finally:
        for p in procs:  # a worker left waiting for its peer
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    results = [(tmp_path / f"worker_{i}.log").read_text() for i in range(2)]
    for p, output in zip(procs, results):
        assert p.returncode == 0, output[-3000:]
        assert "Traceback" not in output
    assert results[0].strip().endswith(f"saved to {outputs[0]}")
    assert "not saved by worker 1" in results[1]

    # Every step all-reduced the same gradients: identical weights.
    weights = [np.load(tmp_path / f"weights_{i}.npz") for i in range(2)]
    assert len(weights[0].files) == len(weights[1].files) > 0
    for name in weights[0].files:
        np.testing.assert_array_equal(weights[0][name], weights[1][name])

    # Only the chief wrote, atomically; its bundle loads and holds them.
    assert not outputs[1].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["chief_model", ".chief_model.lock", "weights_0.npz", "weights_1.npz"]
        + ["worker_0.log", "worker_1.log"]
    )
    from moe.lm.bundle import save_load

    loaded = save_load.load_bundle(outputs[0])
    for saved, name in zip(loaded.model.get_weights(), weights[0].files):
        np.testing.assert_allclose(saved, weights[0][name], atol=1e-6)
    assert loaded.training["distribution"] == {
        "strategy": "multi-worker", "replicas": 2, "workers": 2,
        "chief": True, "task": "worker 0",
    }  # fmt: skip


CLUSTER = {"worker": ["host1:2222", "host2:2222"]}


@pytest.mark.parametrize(
    "value, message",
    [
        (None, "needs the TF_CONFIG environment variable"),
        ("  ", "needs the TF_CONFIG environment variable"),
        ('{"cluster": ', "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ({"task": {"type": "worker", "index": 0}}, 'has no "cluster"'),
        (
            {"cluster": {"ps": ["h:1"]}, "task": {"type": "ps", "index": 0}},
            "job\\(s\\) ps",
        ),
        (
            {"cluster": {"chief": []}, "task": {"type": "chief", "index": 0}},
            "non-empty list",
        ),
        (
            {"cluster": {"worker": ["host1"]}, "task": {}},
            '"host:port" strings',
        ),
        (
            {"cluster": {"chief": ["a:1", "b:1"]}, "task": {}},
            'one "chief" at most',
        ),
        (
            {"cluster": {"worker": ["a:1", "a:1"]}, "task": {}},
            "an address twice",
        ),
        ({"cluster": CLUSTER}, 'no "task"'),
        ({"cluster": CLUSTER, "task": {"type": "chief"}}, "not a job"),
        (
            {"cluster": CLUSTER, "task": {"type": "worker", "index": "0"}},
            "must be an integer",
        ),
        (
            {"cluster": CLUSTER, "task": {"type": "worker", "index": 2}},
            "index 2 is out of range",
        ),
    ],
)
def test_bad_tf_config_is_named(value, message):
    if isinstance(value, dict):
        value = json.dumps(value)
    with pytest.raises(data_parallel.StrategyError, match=message):
        data_parallel.check_strategy("multi-worker", {"TF_CONFIG": value or ""})
    if value is None:
        with pytest.raises(data_parallel.StrategyError, match=message):
            data_parallel.check_strategy("multi-worker", {})


def test_tf_config_tasks():
    chief = {"chief": ["c:1"], **CLUSTER}
    cases = [
        (CLUSTER, "worker", 0, True),
        (CLUSTER, "worker", 1, False),
        (chief, "chief", 0, True),
        (chief, "worker", 0, False),
    ]
    for cluster, job, index, is_chief in cases:
        value = json.dumps(
            {"cluster": cluster, "task": {"type": job, "index": index}}
        )
        task = data_parallel.parse_tf_config(value)
        assert task == data_parallel.ClusterTask(
            job, index, len(cluster.get("chief", [])) + 2, is_chief
        )
    assert data_parallel.check_strategy("mirrored", {}) is None


def test_cli_bad_tf_config_one_line_error(lm_corpus_file, tmp_path):
    out = tmp_path / "model"
    env = {**script_env(), "TF_CONFIG": '{"cluster": {"worker": ['}
    result = subprocess.run(
        [sys.executable, "model.py", "--strategy", "multi-worker",
         "--corpus", str(lm_corpus_file), "--output", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith("model.py: error: TF_CONFIG is not valid")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_strategies_need_tensorflow(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    task = {"type": "worker", "index": 0}
    monkeypatch.setenv(
        "TF_CONFIG", json.dumps({"cluster": CLUSTER, "task": task})
    )
    for name in ("mirrored", "multi-worker"):
        with pytest.raises(data_parallel.StrategyError, match="TensorFlow"):
            data_parallel.make_strategy(name)
    assert data_parallel.make_strategy("none") is None


# --- expert parallelism (keras.distribution, JAX) --------------------------

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
import json, sys
sys.path.insert(0, "tests")
import jax, keras, numpy as np
import moe.keras_hub
from moe.distribution import expert_parallel
from test_keras_hub import inputs, tiny_backbone

assert len(jax.devices()) == 4, jax.devices()
x = inputs(batch=2, length=7, padded=0)


def sparse_qwen_moe():
    backbone = tiny_backbone("qwen_moe")  # 8 experts, a gated shared one
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
