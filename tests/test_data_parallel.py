"""Data parallelism: `model.py --strategy` (tf.distribute,
`moe.lm.training.data_parallel`).

Device set-ups (logical CPU devices, virtual XLA devices, a cluster) are
fixed when a backend starts, so each scenario runs in its own processes.
"""

import json
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
