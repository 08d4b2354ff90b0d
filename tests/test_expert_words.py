"""What the experts learned: `expert_words` and `serve.py --expert-words`."""

import json

import numpy as np
import pytest
from conftest import run_script

from moe.lm.analysis import expert_words
from moe.lm.bundle.layout import EXPERT_WORDS_FIGURE, TRAINING_FILE
from moe.lm.text.tokenizer import Tokenizer


def test_counts_of_the_pooled_model_are_a_per_word_loop():
    from moe.lm.model import architectures

    model = architectures.build_model(
        vocab_size=12, max_seq_len=1, embed_dim=6, num_experts=3,
        hidden_dim=4, top_k=2, seed=1,
    )  # fmt: skip
    words = np.random.default_rng(0).integers(1, 12, (50, 1), np.int32)
    counts = expert_words.count_words(model, words, batch_size=16)["moe"]
    # The reference: each word's embedding (the average of a one-word
    # context) routed alone by the MoE layer's `route()`.
    embedding = model.get_layer("embedding").weights[0].numpy()
    expected = np.zeros((3, 12), np.int64)
    for (word,) in words:
        route = model.get_layer("moe").route(embedding[word][None])
        for e, kept in zip(
            np.asarray(route["expert_indices"])[0], np.asarray(route["kept"])[0]
        ):
            expected[e, word] += kept
    np.testing.assert_array_equal(counts, expected)
    assert counts.sum() == 2 * len(words)


def test_counts_of_the_transformer_are_a_per_context_loop():
    from moe.lm.model import architectures
    from moe.lm.model.explain import ExplainedModel

    model = architectures.build_transformer_model(
        vocab_size=12, max_seq_len=4, embed_dim=8, num_layers=2,
        num_heads=2, num_experts=3, hidden_dim=8, top_k=2, seed=1,
    )  # fmt: skip
    contexts = np.random.default_rng(1).integers(0, 12, (20, 4), np.int32)
    contexts[:, -1] = np.maximum(contexts[:, -1], 1)  # a real last word
    counts = expert_words.count_words(model, contexts, batch_size=7)
    explained = ExplainedModel(model)
    expected = {name: np.zeros((3, 12), np.int64) for name in counts}
    for row in contexts:
        _, routes = explained(row[None])
        for name, route in zip(explained.layer_names, routes):
            for e, kept in zip(
                np.asarray(route["expert_indices"])[0],
                np.asarray(route["kept"])[0],
            ):
                expected[name][e, row[-1]] += kept
    for name in counts:
        np.testing.assert_array_equal(counts[name], expected[name])


def test_summary_shares_and_table():
    tokenizer = Tokenizer(["the", "cat", "dog"])  # ids 2, 3, 4
    counts = {"moe": np.array([[0, 0, 6, 2, 0], [0, 1, 0, 0, 3]])}
    summary = expert_words.summarize(counts, tokenizer, top=2)
    first, second = summary["moe"]
    assert first["words_taken"] == 8 and first["load"] == pytest.approx(2 / 3)
    assert first["top_words"] == [["the", 6, 0.75], ["cat", 2, 0.25]]
    assert second["top_words"][0] == ["dog", 3, 0.75]
    table = expert_words.format_table(summary, 1)
    assert table.splitlines()[0] == "moe expert 0 (67% of the load): the 75%"


def test_training_records_them_and_serve_prints_them(lm_trained):
    directory, _ = lm_trained
    training = json.loads((directory / TRAINING_FILE).read_text())
    words = training[expert_words.KEY]["moe"]
    assert sum(e["words_taken"] for e in words) > 0
    png = (directory / EXPERT_WORDS_FIGURE).read_bytes()
    assert png.startswith(b"\x89PNG")
    result = run_script("serve.py", "--model-dir", directory,
                        "--expert-words", "3")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("moe expert 0 (")


def test_serve_without_them_is_one_line(tmp_path, lm_trained):
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(lm_trained[0], copy)
    training = json.loads((copy / TRAINING_FILE).read_text())
    del training[expert_words.KEY]
    (copy / TRAINING_FILE).write_text(json.dumps(training))
    result = run_script("serve.py", "--model-dir", copy, "--expert-words")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "records no expert words" in result.stderr


@pytest.mark.parametrize(
    "record, field",
    [
        ([1, 2], "field expert_words must be an object"),
        ({"moe": "x"}, "field expert_words.moe must be a list of experts"),
        ({"moe": [5]}, "field expert_words.moe[0] must be an object"),
        ({"moe": [{"load": 0.5, "top_words": []}]},
         "field expert_words.moe[0].expert must be a whole number, found null"),
        ({"moe": [{"expert": 0, "load": "half", "top_words": []}]},
         'field expert_words.moe[0].load must be a number, found "half"'),
        ({"moe": [{"expert": 0, "load": 1, "top_words": {}}]},
         "field expert_words.moe[0].top_words must be a list"),
        ({"moe": [{"expert": 0, "load": 1, "top_words": [["a", 1]]}]},
         "field expert_words.moe[0].top_words[0] must be [word, count, share]"),
        ({"moe": [{"expert": 0, "load": 1, "top_words": [["a", 1, None]]}]},
         "field expert_words.moe[0].top_words[0] must be [word, count, share]"),
    ],
)  # fmt: skip
def test_a_hand_edited_record_is_one_line_naming_the_field(
    tmp_path, lm_trained, record, field, capsys
):
    import shutil

    from conftest import load_script

    copy = tmp_path / "edited"
    shutil.copytree(lm_trained[0], copy)
    training = json.loads((copy / TRAINING_FILE).read_text())
    training[expert_words.KEY] = record
    (copy / TRAINING_FILE).write_text(json.dumps(training))
    code = load_script("serve.py").main(
        ["--model-dir", str(copy), "--expert-words", "3"]
    )
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert f"{TRAINING_FILE}: {field}" in err
