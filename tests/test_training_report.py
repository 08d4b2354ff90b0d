"""What `model.py` records for people: `training.png`, `experts.png`, the
per-expert load in `training.json`, and TensorBoard logs."""

import dataclasses
import json

import keras
import numpy as np
import pytest
from conftest import LM_TINY_FLAGS

from moe.lm import cli
from moe.lm.analysis.expert_load import ExpertLoadCallback, expert_load
from moe.lm.bundle import save_load
from moe.lm.bundle.layout import (
    EXPERTS_FIGURE,
    TRAINING_FIGURE,
    TRAINING_FILE,
)
from moe.lm.model import architectures
from moe.lm.training import train
from moe.lm.training.config import TrainingConfig


def test_bundle_has_the_pictures_as_valid_pngs(lm_trained):
    from matplotlib import image

    out, _ = lm_trained
    for name in (TRAINING_FIGURE, EXPERTS_FIGURE):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), name
        pixels = image.imread(out / name)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 500, name
        assert pixels.std() > 0.05, name  # something drawn, not blank


def test_training_json_records_the_load_per_epoch(lm_trained):
    training = json.loads((lm_trained[0] / TRAINING_FILE).read_text())
    loads = training["expert_load"]
    experts = training["config"]["num_experts"]
    # Epoch 0 (before training), then one entry per epoch run.
    assert len(loads["per_epoch"]["moe"]) == training["epochs_run"] + 1
    for load in [*loads["per_epoch"]["moe"], loads["final"]["moe"]]:
        assert len(load) == experts
        assert sum(load) == pytest.approx(1.0)


def test_figures_only_with_known_names(tmp_path):
    with pytest.raises(ValueError, match="figures"):
        save_load.save_bundle(
            tmp_path / "b", None, None, 1, {}, figures={"x.png": b""}
        )
    assert not list(tmp_path.iterdir())


def test_expert_load_is_a_per_input_count():
    """The callback's load = counting each context's kept experts, one
    context at a time, with the layer's `route()`."""
    net = architectures.build_model(
        vocab_size=20, max_seq_len=3, embed_dim=8, num_experts=4,
        hidden_dim=8, top_k=1, seed=2,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    contexts = rng.integers(1, 20, size=(64, 3)).astype("int32")
    contexts[:10, :2] = 0  # some left padding
    callback = ExpertLoadCallback(contexts)
    callback.set_model(net)
    (load,) = callback.measure()
    layer = net.get_layer("moe")
    pooled = keras.Model(net.input, layer.input)
    counts = np.zeros(4)
    for context in contexts:
        route = layer.route(pooled(context[None]))
        for e, kept in zip(np.asarray(route["expert_indices"])[0],
                           np.asarray(route["kept"])[0]):  # fmt: skip
            counts[e] += kept
    np.testing.assert_allclose(load, counts / counts.sum(), atol=1e-6)
    assert len(set(np.round(load, 6))) > 1  # not trivially uniform


def test_expert_load_with_nothing_kept_is_zero():
    route = {
        "expert_indices": np.array([[0, 1]]),
        "kept": np.zeros((1, 2), bool),
    }
    assert expert_load([route], [3]) == [[0.0, 0.0, 0.0]]


def flags_config(**changes) -> TrainingConfig:
    flags = dict(zip(LM_TINY_FLAGS[::2], LM_TINY_FLAGS[1::2]))
    config = cli.parse_training_args([f for kv in flags.items() for f in kv])
    return dataclasses.replace(config, **changes)


def test_tensorboard_logs_the_per_expert_load(tmp_path, lm_corpus_file):
    import tensorflow as tf

    logs = tmp_path / "logs"
    config = flags_config(
        corpus=[str(lm_corpus_file)],
        output=str(tmp_path / "bundle"),
        tensorboard=str(logs),
        top_k=1,
        epochs=1,
    )
    summary = train.train(config, verbose=0)
    scalars = {}
    for path in (logs / "expert_load").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                number = tf.make_ndarray(value.tensor).item()
                scalars.setdefault(value.tag, {})[event.step] = number
    per_epoch = summary["expert_load"]["per_epoch"]["moe"]
    assert sorted(scalars) == ["expert_load/moe/0", "expert_load/moe/1"]
    for expert in range(2):
        logged = scalars[f"expert_load/moe/{expert}"]
        assert sorted(logged) == list(range(len(per_epoch)))
        for step, load in enumerate(per_epoch):
            assert logged[step] == pytest.approx(load[expert], abs=1e-6)
    # Keras's own TensorBoard callback ran too.
    assert list((logs / "train").glob("events.out.tfevents.*"))
    assert list((logs / "validation").glob("events.out.tfevents.*"))
