"""The Transformer next-word model: builder, flags, train via the CLI, serve.

The block itself is tested in test_transformer.py (on every backend).
"""

import json

import numpy as np
import pytest
from conftest import LM_TINY_FLAGS, run_script
from keras import ops

import model
from moe.lm import architectures
from moe.lm.predictor import NextWordPredictor

TRANSFORMER_FLAGS = [
    "--architecture", "transformer", "--num-layers", "1", "--num-heads", "2",
]  # fmt: skip


def test_max_seq_len_defaults_per_architecture():
    assert model.with_defaults(model.Config()).max_seq_len == 1
    transformer = model.Config(architecture="transformer")
    assert model.with_defaults(transformer).max_seq_len == 8
    explicit = model.Config(architecture="transformer", max_seq_len=5)
    assert model.with_defaults(explicit).max_seq_len == 5


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--architecture", "transformer", "--num-heads", "3"],
            "--num-heads must divide --embed-dim (64). Received: 3",
        ),
        (["--num-layers", "0"], "--num-layers must be at least 1. Received: 0"),
        (["--dropout", "1"], "--dropout must be in [0, 1). Received: 1.0"),
    ],
)
def test_bad_transformer_flags_are_one_line_errors(tmp_path, flags, message):
    out = tmp_path / "never_written"
    result = run_script("model.py", "--output", out, *flags)
    assert result.returncode == 1
    assert result.stderr.strip() == f"model.py: error: {message}"
    assert not out.exists()


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


def test_train_transformer_then_serve_end_to_end(tmp_path, lm_corpus_file):
    out = tmp_path / "bundle"
    trained = run_script(
        "model.py", "--corpus", lm_corpus_file, "--output", out,
        *LM_TINY_FLAGS, *TRANSFORMER_FLAGS,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "val top-1" in trained.stdout.splitlines()[-1]
    summary = json.loads((out / "training.json").read_text())
    assert summary["config"]["architecture"] == "transformer"
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
