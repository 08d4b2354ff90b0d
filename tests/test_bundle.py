import json

import numpy as np
import pytest

from moe.lm import architectures, bundle
from moe.lm.tokenizer import Tokenizer

MAX_SEQ_LEN = 3
# The bundle, and the lock file beside it: no temporary folder.
LEFT_AFTER_SAVE = [".saved_model.lock", "saved_model"]


def make_parts(seed=0, words=("a", "b", "c", "d")):
    tokenizer = Tokenizer(list(words))
    model = architectures.build_model(
        vocab_size=tokenizer.vocab_size,
        max_seq_len=MAX_SEQ_LEN,
        embed_dim=4,
        num_experts=2,
        hidden_dim=4,
        seed=seed,
    )
    return model, tokenizer


def save(directory, seed=0, words=("a", "b", "c", "d")):
    model, tokenizer = make_parts(seed, words)
    bundle.save_bundle(directory, model, tokenizer, MAX_SEQ_LEN, {"seed": seed})
    return model


def test_save_load_round_trip(tmp_path):
    target = tmp_path / "saved_model"
    model = save(target)
    assert sorted(p.name for p in target.iterdir()) == sorted(
        [*bundle.REQUIRED_FILES, bundle.TRAINING_FILE]
    )
    assert (target / bundle.MAX_SEQ_LEN_FILE).read_text().strip() == "3"
    loaded = bundle.load_bundle(target)
    x = np.array([[0, 2, 3], [4, 5, 1]], np.int32)
    np.testing.assert_allclose(loaded.model(x), model(x), atol=1e-6)
    assert loaded.tokenizer.vocabulary == ["a", "b", "c", "d"]
    assert loaded.max_seq_len == MAX_SEQ_LEN
    assert loaded.training == {"seed": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == LEFT_AFTER_SAVE


def test_failed_save_leaves_old_bundle_intact(tmp_path):
    target = tmp_path / "saved_model"
    save(target, seed=1)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    model, tokenizer = make_parts(seed=2)

    class Boom(RuntimeError):
        pass

    def to_json_that_fails():  # fails after model.keras was written
        raise Boom("disk full")

    tokenizer.to_json = to_json_that_fails
    with pytest.raises(Boom):
        bundle.save_bundle(target, model, tokenizer, MAX_SEQ_LEN, {})
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == LEFT_AFTER_SAVE


def test_leftovers_of_a_killed_run_do_not_break_the_next(tmp_path):
    target = tmp_path / "saved_model"
    save(target, seed=1)
    leftover = tmp_path / ".saved_model.tmp-killed"
    leftover.mkdir()
    (leftover / "model.keras").write_bytes(b"half a file")
    old = tmp_path / ".saved_model.old-killed"
    (old / "saved_model").mkdir(parents=True)
    save(target, seed=2)
    assert bundle.load_bundle(target).training == {"seed": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == LEFT_AFTER_SAVE


def test_missing_bundle(tmp_path):
    with pytest.raises(bundle.BundleError, match="no trained model in .*"):
        bundle.load_bundle(tmp_path / "nothing")
    with pytest.raises(bundle.BundleError, match="run `python model.py`"):
        bundle.load_bundle(tmp_path)


def test_partial_bundle(tmp_path):
    save(tmp_path)
    (tmp_path / bundle.TOKENIZER_FILE).unlink()
    with pytest.raises(bundle.BundleError, match="missing tokenizer.json"):
        bundle.load_bundle(tmp_path)


def test_corrupt_model(tmp_path):
    save(tmp_path)
    (tmp_path / bundle.MODEL_FILE).write_bytes(b"not a zip file")
    with pytest.raises(bundle.BundleError, match="model.keras: not a complete"):
        bundle.load_bundle(tmp_path)


@pytest.mark.parametrize(
    "content, match",
    [
        ("{oops", "not valid JSON"),
        (json.dumps({"format": "moe.lm.tokenizer"}), "version None"),
    ],
)
def test_corrupt_tokenizer(tmp_path, content, match):
    save(tmp_path)
    (tmp_path / bundle.TOKENIZER_FILE).write_text(content)
    with pytest.raises(bundle.BundleError, match=f"corrupt .*{match}"):
        bundle.load_bundle(tmp_path)


def test_corrupt_max_seq_len(tmp_path):
    save(tmp_path)
    (tmp_path / bundle.MAX_SEQ_LEN_FILE).write_text("three")
    with pytest.raises(bundle.BundleError, match="a whole number from 1"):
        bundle.load_bundle(tmp_path)


def test_mismatched_parts(tmp_path):
    save(tmp_path)
    (tmp_path / bundle.TOKENIZER_FILE).write_text(
        Tokenizer(["a", "b"]).to_json()
    )
    with pytest.raises(bundle.BundleError, match="4 ids but .* predicts 6"):
        bundle.load_bundle(tmp_path)
    save(tmp_path)
    (tmp_path / bundle.MAX_SEQ_LEN_FILE).write_text("5\n")
    with pytest.raises(bundle.BundleError, match="says 5 but .* of 3"):
        bundle.load_bundle(tmp_path)
