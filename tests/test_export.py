"""`serve.py --export`: a TensorFlow SavedModel with the tokenizer inside
answers like `NextWordPredictor`."""

import random

import keras
import numpy as np
import pytest
from conftest import load_script

from moe.lm.errors import ExportError
from moe.lm.serving.export import (
    export_saved_model,
    graph_words,
)
from moe.lm.text.tokenizer import NUM_RESERVED, split_words

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the SavedModel export needs the TensorFlow backend",
)

TEXTS = [
    "how are",
    "How ARE",  # case
    "the cat, the dog; the...",  # punctuation
    "don't worry about the",  # apostrophe inside a word
    "Don’t ‘worry’ about `the`",  # curly and back-tick apostrophes
    "'the cat' sat on the mat'",  # apostrophes around words
    "zzz qqq",  # only unknown words
    "the zzz",  # unknown then known
    "one two three four five six seven the dog sat on the",  # > max_seq_len
    "i am 42 and 3.14 thank",  # numbers
    "the\tcat\nsat  on\r\nthe",  # whitespace
    "ÉTÉ déjà-vu the ΟΔΟΣ cat",  # non-ASCII letters, final sigma
    "snake_case the cat",  # underscore separates words
    "the. cat! sat? on",  # sentence ends: a query ignores them
]


@pytest.fixture(scope="module")
def exported(lm_trained, tmp_path_factory):
    target = tmp_path_factory.mktemp("export") / "moe" / "1"
    target.mkdir(parents=True)  # an existing empty directory is fine
    export_saved_model(lm_trained[0], target)
    return target


def test_saved_model_answers_like_the_predictor(exported, lm_predictor):
    import tensorflow as tf

    served = tf.saved_model.load(str(exported))
    serving = served.signatures["serving_default"]
    out = serving(texts=tf.constant([*TEXTS, "", " ?! "]))
    words = [w.decode() for w in out["word"].numpy()]
    probabilities = out["probability"].numpy()
    expected = lm_predictor.probabilities(TEXTS)
    for text, word, p, row in zip(TEXTS, words, probabilities, expected):
        word_id = lm_predictor.tokenizer.word_id(word)
        assert word_id >= NUM_RESERVED, text  # never padding or OOV
        assert p == pytest.approx(row[word_id], rel=1e-5), text
        # The best real word (a tie may pick another word of equal prob).
        assert p >= row[NUM_RESERVED:].max() - 1e-6, text
        if word != lm_predictor.predict_next(text):
            best = lm_predictor.predict_next(text)
            assert p == pytest.approx(
                row[lm_predictor.tokenizer.word_id(best)], abs=1e-6
            )
    # No words: no answer, probability 0.
    assert words[-2:] == ["", ""] and probabilities[-2:].tolist() == [0, 0]
    # The other signature name is the same function.
    again = served.signatures["serve"](texts=tf.constant(TEXTS[:2]))
    np.testing.assert_allclose(again["probability"], probabilities[:2])


def test_graph_tokenizer_splits_like_the_python_tokenizer():
    import tensorflow as tf

    rng = random.Random(0)
    alphabet = list(
        "abcXYZ019 '’‘`.,;!?-_\n\t\r\"ΣσςΑΒİıßéÉ\u0301ǅﬁ²½日本ⱟꟁ𐕰😀"
    ) + [chr(rng.randrange(0x20, 0x3000)) for _ in range(200)]
    texts = TEXTS + [
        "".join(rng.choices(alphabet, k=rng.randint(0, 25)))
        for _ in range(3000)
    ]
    got = graph_words(tf.constant(texts)).to_list()
    for text, words in zip(texts, got):
        assert [w.decode() for w in words] == split_words(text), repr(text)


def test_export_refuses_a_non_empty_directory(lm_trained, tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "mine.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not empty"):
        export_saved_model(lm_trained[0], target)
    assert [p.name for p in target.iterdir()] == ["mine.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temp


def test_cli_export_errors_are_one_line(lm_trained, tmp_path, capsys):
    serve = load_script("serve.py")

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    assert serve.main(["--export", str(tmp_path / "taken"), "--model-dir",
                       str(lm_trained[0])]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("serve.py: error: ") and "not empty" in err
    assert len(err.strip().splitlines()) == 1
    assert serve.main(["--export", str(tmp_path / "new"), "--model-dir",
                       str(tmp_path / "nothing")]) == 1  # fmt: skip
    assert "no trained model" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_export_needs_the_tensorflow_backend(monkeypatch, tmp_path):
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(ExportError, match="KERAS_BACKEND=tensorflow"):
        export_saved_model(tmp_path, tmp_path / "out")
