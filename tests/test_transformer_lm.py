"""The Transformer next-word model: builder, flags, train via the CLI, serve.

The block itself is tested in test_transformer.py (on every backend).
"""

import json

import numpy as np
import pytest
from conftest import LM_TINY_FLAGS, run_script
from keras import ops

from moe.lm import cli
from moe.lm.model import architectures
from moe.lm.model.metrics import next_word_metrics
from moe.lm.serving.predictor import NextWordPredictor
from moe.lm.text import examples
from moe.lm.training.config import TrainingConfig, with_defaults
from moe.lm.training.datasets import load_corpus, prepare_data

TRANSFORMER_FLAGS = [
    "--architecture", "transformer", "--num-layers", "1", "--num-heads", "2",
]  # fmt: skip


@pytest.mark.parametrize("architecture", ["pooled", "transformer"])
def test_unset_settings_take_the_architecture_defaults(architecture):
    # A setting left unset resolves to a value (its architecture's, the one
    # `--help` shows); a setting given is kept whatever the architecture.
    resolved = with_defaults(TrainingConfig(architecture=architecture))
    help_text = cli.training_parser().format_help()
    for name in ("max_seq_len", "train_positions", "learning_rate"):
        value = getattr(resolved, name)
        assert value is not None
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        assert f"{shown} for {architecture}" in " ".join(help_text.split())
    explicit = TrainingConfig(architecture=architecture, max_seq_len=5)
    assert with_defaults(explicit).max_seq_len == 5


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--architecture", "transformer", "--num-heads", "3"],
            "a multiple of --num-heads (3). Received: "
            "input_shape=(None, 8, 64)",
        ),
        (
            ["--num-layers", "0"],
            "--num-layers must be at least 1. Received: num_layers=0",
        ),
        (
            ["--architecture", "transformer", "--dropout", "1"],
            "--dropout must be a finite number in [0, 1). "
            "Received: dropout=1.0",
        ),
        (
            ["--train-positions", "all"],
            '--train-positions "all" needs --architecture "transformer" '
            "(pooled predicts once per context). Received: "
            "train_positions='all'",
        ),
    ],
)
def test_bad_transformer_flags_are_one_line_errors(tmp_path, flags, message):
    out = tmp_path / "never_written"
    result = run_script("model.py", "--output", out, *flags)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("model.py: error: ") and line.endswith(message)
    assert not out.exists()


@pytest.mark.parametrize("architecture", ["pooled", "transformer"])
def test_both_architectures_start_with_different_experts(architecture):
    # With model.py's defaults (no seed given), no two experts of a layer
    # start as copies of one FFN.
    if architecture == "pooled":
        model = architectures.build_model(
            vocab_size=20, max_seq_len=4, embed_dim=8, num_experts=4,
            hidden_dim=8,
        )  # fmt: skip
    else:
        model = architectures.build_transformer_model(
            vocab_size=20, max_seq_len=4, embed_dim=8, num_layers=2,
            num_heads=2, num_experts=4, hidden_dim=8,
        )  # fmt: skip
    kernels = [
        ops.convert_to_numpy(v)
        for v in model.weights
        if "expert_" in v.path and "kernel" in v.path
    ]
    assert kernels
    for kernel in kernels:
        for e in range(1, kernel.shape[0]):
            assert not np.allclose(kernel[0], kernel[e]), kernel.shape


@pytest.mark.parametrize("routing", ["top_k", "hash"])
def test_transformer_model_maps_contexts_to_next_word(routing):
    lm = architectures.build_transformer_model(
        vocab_size=30, max_seq_len=5, embed_dim=8, num_layers=2, num_heads=2,
        num_experts=4, hidden_dim=6, routing=routing, seed=0,
    )  # fmt: skip
    contexts = np.array([[0, 0, 4, 5, 6], [7, 8, 9, 10, 11]], "int32")
    probs = ops.convert_to_numpy(lm(contexts))
    assert probs.shape == (2, 30)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    # The prediction reads the whole context, not only the last word.
    changed = contexts.copy()
    changed[:, 2] = 12
    assert not np.allclose(ops.convert_to_numpy(lm(changed)), probs)


@pytest.mark.parametrize("routing", ["top_k", "hash"])
def test_every_position_model_predicts_each_prefix_as_serving_does(routing):
    lm = architectures.build_transformer_model(
        vocab_size=30, max_seq_len=5, embed_dim=8, num_layers=2, num_heads=2,
        num_experts=4, hidden_dim=6, routing=routing, seed=0,
    )  # fmt: skip
    every = architectures.every_position_model(lm)
    assert every.trainable_weights == lm.trainable_weights  # shared
    windows = np.array([[0, 0, 4, 5, 6], [7, 8, 9, 10, 11]], "int32")
    probs = ops.convert_to_numpy(every(windows))
    assert probs.shape == (2, 5, 30)
    for row, window in enumerate(windows):
        for slot in np.flatnonzero(window):
            # The serving context of slot's prediction: the window's words
            # up to the slot, right-aligned.
            words = window[: slot + 1][window[: slot + 1] > 0]
            context = np.zeros((1, 5), "int32")
            context[0, 5 - len(words) :] = words
            np.testing.assert_allclose(
                probs[row, slot], ops.convert_to_numpy(lm(context))[0],
                atol=1e-6,
            )  # fmt: skip


def test_window_loss_and_metrics_count_each_weighted_target_once():
    lm = architectures.build_transformer_model(
        vocab_size=30, max_seq_len=5, embed_dim=8, num_layers=1, num_heads=2,
        num_experts=4, hidden_dim=6, seed=0, aux_loss_weight=0.0,
    )  # fmt: skip
    every = architectures.every_position_model(lm)
    architectures.compile_model(every, 1e-3)
    rng = np.random.default_rng(0)
    windows = rng.integers(1, 30, size=(4, 5)).astype("int32")
    windows[0, :3] = 0  # left padding
    targets = rng.integers(1, 30, size=(4, 5)).astype("int32")
    targets[0, :3] = 0  # padding: no target
    targets[1, :2] = 0  # another window's targets
    targets[2, 0] = 1  # out-of-vocabulary: a target, always a miss
    weights = (targets != 0).astype("float32")
    probs = ops.convert_to_numpy(every(windows))
    mine = targets != 0
    expected = next_word_metrics(probs[mine], targets[mine])
    # Uneven targets per batch: the weighted metrics are exact.
    metrics = every.evaluate(
        windows, targets, sample_weight=weights, batch_size=2, verbose=0,
        return_dict=True,
    )  # fmt: skip
    for name in ("accuracy", "top5_accuracy", "perplexity"):
        np.testing.assert_allclose(metrics[name], expected[name], rtol=1e-5)
    # The loss is the mean over the targets of one batch, padding left out.
    one_batch = every.evaluate(
        windows, targets, sample_weight=weights, batch_size=4, verbose=0,
        return_dict=True,
    )  # fmt: skip
    np.testing.assert_allclose(
        one_batch["loss"], np.log(expected["perplexity"]), rtol=1e-5
    )


@pytest.mark.parametrize("positions", ["all", "last"])
def test_train_transformer_then_serve_end_to_end(
    tmp_path, lm_corpus_file, positions
):
    out = tmp_path / "bundle"
    flags = [
        "--corpus", lm_corpus_file, "--output", out, *LM_TINY_FLAGS,
        *TRANSFORMER_FLAGS, "--train-positions", positions,
    ]  # fmt: skip
    trained = run_script("model.py", *flags)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "Warning" not in trained.stderr, trained.stderr[-3000:]
    assert "val top-1" in trained.stdout.splitlines()[-1]
    summary = json.loads((out / "training.json").read_text())
    assert summary["config"]["architecture"] == "transformer"
    assert summary["config"]["train_positions"] == positions
    assert summary["config"]["num_layers"] == 1
    assert (out / "max_seq_len.txt").read_text().strip() == "3"

    queries = ["the cat sat on", "how are"]
    served = run_script("serve.py", "--model-dir", out, *queries)
    assert served.returncode == 0, served.stderr[-3000:]
    assert served.stderr == ""
    predictor = NextWordPredictor.load(out)
    assert served.stdout.splitlines() == predictor.predict_next(queries)
    # Never the padding or out-of-vocabulary token.
    assert set(served.stdout.split()) <= set(predictor.tokenizer.vocabulary)

    # Whatever it trained on, the reported validation is the serving task:
    # the next word after each held-out context.
    config = with_defaults(cli.parse_training_args(list(map(str, flags))))
    _, tokens, starts, _, val_pos = prepare_data(config, load_corpus(config))
    contexts = examples.contexts(tokens, val_pos, starts[val_pos], 3)
    probs = predictor.model.predict(contexts, verbose=0)
    expected = next_word_metrics(probs, tokens[val_pos])
    for name in ("accuracy", "top5_accuracy", "perplexity"):
        np.testing.assert_allclose(
            summary["validation"][name], expected[name], rtol=1e-5
        )
