"""Fine-tuning (`--init-from`, `--freeze`) and upcycling (`--upcycle-from`)."""

import dataclasses

import numpy as np
import pytest
from conftest import LM_TINY_CORPUS, run_script

from moe.lm import cli
from moe.lm.bundle import save_load
from moe.lm.errors import ConfigError, CorpusError
from moe.lm.training import finetune, train
from moe.lm.training.resolve import validate
from moe.lm.training.summary import summary_line

# New text for fine-tuning: the tiny corpus's words and some it lacks.
NEW_TEXT = "\n".join(["the zebra sat on the mat.", "how are you, zebra?"] * 12)
TINY = dict(
    epochs=2, batch_size=16, max_seq_len=3, embed_dim=8, hidden_dim=8,
    validation_split=0.2, seed=7,
)  # fmt: skip


def config_for(tmp_path, text: str, output: str, **changes):
    path = tmp_path / f"corpus-{abs(hash(text))}.txt"
    path.write_text(text, encoding="utf-8")
    config = cli.parse_training_args([])
    return dataclasses.replace(
        config, corpus=[str(path)], output=str(output), **{**TINY, **changes}
    )


def weights_of(model, part: str) -> dict:
    return {
        w.path: np.array(w.numpy())
        for layer in finetune.part_layers(model, part)
        for w in layer.weights
        if "seed_generator" not in w.path  # a random state, not trained
    }


@pytest.fixture(scope="module")
def base_bundle(tmp_path_factory):
    """A tiny pooled MoE bundle with a shared expert."""
    tmp = tmp_path_factory.mktemp("base")
    config = config_for(tmp, LM_TINY_CORPUS, tmp / "base", num_experts=2,
                        num_shared_experts=1)  # fmt: skip
    train.train(config, verbose=0)
    return tmp / "base"


def test_init_from_keeps_frozen_parts_bit_identical(tmp_path, base_bundle):
    before = save_load.load_bundle(base_bundle)
    # Fine-tune into the same folder: the old bundle stays until the new
    # one is complete (the model is read before training starts).
    out = tmp_path / "tuned"
    first = config_for(
        tmp_path, NEW_TEXT, out, init_from=str(base_bundle),
        freeze="experts,embeddings", epochs=3,
    )  # fmt: skip
    summary = train.train(first, verbose=0)
    tuned = save_load.load_bundle(out)
    assert tuned.tokenizer.vocabulary == before.tokenizer.vocabulary
    assert "zebra" not in tuned.tokenizer.vocabulary  # out-of-vocabulary
    assert summary["config"]["num_shared_experts"] == 1  # from the bundle
    assert summary["starting_point"]["frozen"] == ["experts", "embeddings"]
    # "zebra" is 2 of the 8 words to predict in each pair of lines: the
    # metrics count it as [UNK], and say so.
    unknown = summary["out_of_vocabulary"]
    assert unknown["train"] == pytest.approx(2 / 8, abs=0.02)
    assert f"({unknown['validation']:.1%} of targets out of vocabulary)" in (
        summary_line(summary)
    )
    for part, frozen in [("experts", True), ("embeddings", True),
                         ("router", False), ("shared", False)]:  # fmt: skip
        old, new = weights_of(before.model, part), weights_of(tuned.model, part)
        assert old.keys() == new.keys() and old
        same = [np.array_equal(old[k], new[k]) for k in old]
        assert all(same) if frozen else not any(same), part
    head = [before.model.get_layer("next_word"), tuned.model.get_layer(
        "next_word")]  # fmt: skip
    assert not np.array_equal(*(la.weights[0].numpy() for la in head))

    # Again, in place, freezing the other parts.
    second = dataclasses.replace(
        first, init_from=str(out), freeze="router,shared"
    )
    train.train(second, verbose=0)
    again = save_load.load_bundle(out)
    for part, frozen in [("experts", False), ("embeddings", False),
                         ("router", True), ("shared", True)]:  # fmt: skip
        old, new = weights_of(tuned.model, part), weights_of(again.model, part)
        same = [np.array_equal(old[k], new[k]) for k in old]
        assert all(same) if frozen else not any(same), part


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(freeze="experts,attention"), "`freeze` takes a comma-separated"),
        (dict(init_from=None, freeze="experts"), "`freeze` needs a trained"),
        (dict(embed_dim=16), "`embed_dim` comes from the bundle"),
        (dict(architecture="transformer"), "`architecture` comes from"),
        (dict(upcycle_from="BASE", init_from=None), "needs a dense bundle"),
        (dict(upcycle_from="BASE"), "not both"),
    ],
)
def test_starting_point_errors(tmp_path, base_bundle, changes, message):
    changes = {
        k: str(base_bundle) if v == "BASE" else v for k, v in changes.items()
    }
    config = config_for(
        tmp_path, NEW_TEXT, tmp_path / "out", init_from=str(base_bundle)
    )
    with pytest.raises(ConfigError, match=message):
        validate(dataclasses.replace(config, **changes))


def test_fine_tuning_on_text_with_no_known_word_is_refused(
    tmp_path, base_bundle
):
    # Its perplexity would be that of predicting [UNK], near 1.
    text = "zebras graze. okapis browse quietly. giraffes stretch upward.\n"
    config = config_for(tmp_path, text * 10, tmp_path / "out",
                        init_from=str(base_bundle))  # fmt: skip
    with pytest.raises(CorpusError, match="none of the .* words to predict"):
        train.train(config, verbose=0)
    assert not (tmp_path / "out").exists()


def copy_of(base_bundle, folder, quantize=None, num_experts=None):
    """A copy of the bundle: its model quantized, `training.json`'s
    `num_experts` rewritten (the model keeps its own)."""
    from moe.lm.model.quantize_model import quantize_model

    loaded = save_load.load_bundle(base_bundle)
    if quantize:
        quantize_model(loaded.model, quantize)
    record = dict(loaded.training, config=dict(loaded.training["config"]))
    if num_experts is not None:
        record["config"]["num_experts"] = num_experts
    save_load.save_bundle(
        folder, loaded.model, loaded.tokenizer, loaded.max_seq_len, record
    )
    return str(folder)


@pytest.mark.parametrize(
    "kind, quantize, label, message",
    [
        ("init_from", "int8", None, r"\(saved with `quantize`\)"),
        ("upcycle_from", "int8-weights", 1, "is quantized"),
        # A 2-expert model whose training.json says 1: the model decides.
        ("upcycle_from", None, 1, "needs a dense bundle .* has 2 experts"),
    ],
)
def test_the_starting_model_itself_is_checked(
    tmp_path, base_bundle, kind, quantize, label, message
):
    start = copy_of(base_bundle, tmp_path / "start", quantize, label)
    config = config_for(tmp_path, NEW_TEXT, tmp_path / "out", **{kind: start})
    if kind == "upcycle_from":
        config = dataclasses.replace(config, num_experts=4)
    validate(config)  # training.json alone does not tell
    with pytest.raises(ConfigError, match=message):
        finetune.load(config)


def test_freeze_a_part_the_model_lacks(tmp_path, lm_trained):
    config = config_for(
        tmp_path, NEW_TEXT, tmp_path / "out",
        init_from=str(lm_trained[0]), freeze="shared",
    )  # fmt: skip
    with pytest.raises(ConfigError, match="no shared experts"):
        validate(config)


def test_cli_bad_freeze_is_one_line(tmp_path, base_bundle):
    result = run_script(
        "model.py", "--init-from", base_bundle, "--freeze", "expert",
        "--output", tmp_path / "out",
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "--freeze takes a comma-separated list of experts, router" in (
        result.stderr
    )


@pytest.mark.parametrize("architecture", ["pooled", "transformer"])
def test_upcycled_model_starts_as_the_dense_one(architecture):
    from moe.lm.model import architectures, upcycle

    builder = {
        "pooled": architectures.build_model,
        "transformer": architectures.build_transformer_model,
    }[architecture]
    sizes = dict(vocab_size=30, max_seq_len=4, embed_dim=8, hidden_dim=16,
                 num_shared_experts=1, seed=3)  # fmt: skip
    if architecture == "transformer":
        sizes.update(num_layers=2, num_heads=2)
    dense = builder(num_experts=1, top_k=1, **sizes)
    sparse = builder(num_experts=4, top_k=2, **sizes)
    contexts = np.random.default_rng(0).integers(0, 30, (16, 4), np.int32)
    before = sparse.predict(contexts, verbose=0)
    upcycle.copy_weights(dense, sparse, upcycle=True)
    expected = dense.predict(contexts, verbose=0)
    assert not np.allclose(before, expected, atol=1e-4)
    np.testing.assert_allclose(
        sparse.predict(contexts, verbose=0), expected, atol=1e-5
    )
    # Every expert is the dense FFN; the router is the new model's own.
    from moe.lm.model.routed_layers import moe_layer_of, routed_layers

    for layer in routed_layers(sparse):
        kernel = moe_layer_of(layer).experts.weights[0].numpy()
        assert np.array_equal(kernel[0], kernel[3])


def test_upcycle_from_trains(tmp_path):
    dense_dir = tmp_path / "dense"
    dense = config_for(tmp_path, LM_TINY_CORPUS, dense_dir, num_experts=1,
                       top_k=1, architecture="transformer")  # fmt: skip
    train.train(dense, verbose=0)
    upcycled = config_for(
        tmp_path, LM_TINY_CORPUS, tmp_path / "moe",
        upcycle_from=str(dense_dir), num_experts=4, top_k=2, epochs=1,
    )  # fmt: skip
    summary = train.train(upcycled, verbose=0)
    assert summary["config"]["architecture"] == "transformer"
    assert summary["config"]["num_experts"] == 4
    assert summary["starting_point"]["kind"] == "upcycle_from"
    model = save_load.load_bundle(tmp_path / "moe").model
    from moe.lm.model.routed_layers import moe_layer_of, routed_layers

    kernel = moe_layer_of(routed_layers(model)[0]).experts.weights[0].numpy()
    assert not np.array_equal(kernel[0], kernel[1])  # trained apart
    assert np.isfinite(summary["validation"]["perplexity"])
