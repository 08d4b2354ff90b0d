import re

import numpy as np
import pytest
from conftest import LM_TINY_CORPUS

from moe.lm.model.metrics import next_word_metrics
from moe.lm.text.tokenizer import NUM_RESERVED, split_sentences

QUERIES = [
    "the cat",
    "how are",
    "i am fine thank",
    "zzz qqq",  # only unknown words
    "don't worry about the",
    "one two three four five six seven the dog sat on the",  # > max_seq_len
]


def reference_probabilities(predictor, text):
    """The model on a context built by hand: last max_seq_len ids, 0-padded."""
    ids = [predictor.tokenizer.word_id(w) for w in text.split()]
    ids = ids[-predictor.max_seq_len :]
    context = [0] * (predictor.max_seq_len - len(ids)) + ids
    return np.asarray(predictor.model(np.array([context], np.int32)))[0]


def test_batch_answers_equal_single_answers(lm_predictor):
    batch = lm_predictor.predict_next(QUERIES)
    assert batch == [lm_predictor.predict_next(q) for q in QUERIES]
    assert all(isinstance(w, str) for w in batch)


def test_answers_are_real_words_never_pad_or_oov(lm_predictor):
    vocabulary = set(lm_predictor.tokenizer.vocabulary)
    for word in lm_predictor.predict_next(QUERIES):
        assert word in vocabulary
    real_words = len(lm_predictor.tokenizer.vocabulary)
    for word, _ in lm_predictor.top("zzz qqq", real_words):
        assert word in vocabulary


def test_probabilities_match_the_model_on_hand_built_contexts(lm_predictor):
    probs = lm_predictor.probabilities(QUERIES)
    for query, row in zip(QUERIES, probs, strict=True):
        expected = reference_probabilities(lm_predictor, query)
        np.testing.assert_allclose(row, expected, rtol=1e-5, atol=1e-6)
        best = int(np.argmax(expected[NUM_RESERVED:])) + NUM_RESERVED
        assert (
            lm_predictor.predict_next(query)
            == (lm_predictor.tokenizer.decode([best])[0])
        )


def test_long_query_uses_its_last_words(lm_predictor):
    long = "the cat sat on the mat the dog sat on the"
    last = " ".join(long.split()[-lm_predictor.max_seq_len :])
    np.testing.assert_allclose(
        lm_predictor.probabilities([long]), lm_predictor.probabilities([last])
    )


def test_batches_beyond_the_largest_bucket(lm_predictor):
    queries = QUERIES * 100  # 600 > 512: two chunks
    words = lm_predictor.predict_next(queries)
    assert words == lm_predictor.predict_next(QUERIES) * 100


def test_top_is_sorted_and_matches_the_model(lm_predictor):
    top = lm_predictor.top("the cat", 4)
    assert len(top) == 4
    probs = [p for _, p in top]
    assert probs == sorted(probs, reverse=True)
    expected = reference_probabilities(lm_predictor, "the cat")
    for word, p in top:
        assert p == pytest.approx(
            expected[lm_predictor.tokenizer.word_id(word)], rel=1e-5
        )
    assert top[0][0] == lm_predictor.predict_next("the cat")


def test_empty_query_is_rejected(lm_predictor):
    with pytest.raises(ValueError, match="empty query"):
        lm_predictor.predict_next("  ,!  ")
    with pytest.raises(ValueError, match="`n` must be between 1 and 20"):
        lm_predictor.top("the", 0)


def test_greedy_generation_repeats_predict_next(lm_predictor):
    words = lm_predictor.generate("the cat", 4)
    text = "the cat"
    for word in words:
        assert word == lm_predictor.predict_next(text)
        text += " " + word


def test_sampling_is_reproducible_with_a_seed(lm_predictor):
    a = lm_predictor.generate("the", 6, temperature=1.5, seed=3)
    b = lm_predictor.generate("the", 6, temperature=1.5, seed=3)
    assert a == b
    vocabulary = set(lm_predictor.tokenizer.vocabulary)
    assert set(a) <= vocabulary


def test_evaluate_equals_numpy_reference(lm_predictor):
    text = "The cat sat on the rug. How are you? The zebra sat on the mat!"
    probs, targets = [], []
    for sentence in split_sentences(text):
        for i in range(1, len(sentence)):
            probs.append(
                reference_probabilities(lm_predictor, " ".join(sentence[:i]))
            )
            targets.append(lm_predictor.tokenizer.word_id(sentence[i]))
    probs, targets = np.array(probs), np.array(targets)
    # Plain NumPy: argmax / top 5 over real words; OOV targets ("zebra")
    # are misses; perplexity from the target probabilities.
    real = probs[:, NUM_RESERVED:]
    top5 = np.argsort(-real, axis=1)[:, :5] + NUM_RESERVED
    is_real = targets >= NUM_RESERVED
    expected = {
        "pairs": len(targets),
        "accuracy": np.mean(is_real & (top5[:, 0] == targets)),
        "top5_accuracy": np.mean(
            is_real & (top5 == targets[:, None]).any(axis=1)
        ),
        "perplexity": np.exp(
            -np.mean(np.log(probs[np.arange(len(targets)), targets]))
        ),
    }
    assert not is_real.all()
    got = lm_predictor.evaluate(text)
    assert got["pairs"] == expected["pairs"] == 12
    for key in ("accuracy", "top5_accuracy", "perplexity"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5)


def test_next_word_metrics_oov_target_is_a_miss():
    probs = np.array([[0.0, 0.9, 0.1], [0.0, 0.2, 0.8]])
    m = next_word_metrics(probs, np.array([1, 2]))
    assert m["accuracy"] == 0.5  # row 0: OOV target never counts
    assert m["top5_accuracy"] == 0.5


def test_evaluate_needs_a_pair(lm_predictor):
    with pytest.raises(ValueError, match="nothing to evaluate"):
        lm_predictor.evaluate("cat. dog.")


# --- NaN never counts, never answers; sampling never overflows --------------


def test_a_nan_prediction_is_never_a_hit():
    # A NaN compares false with everything, so a naive rank puts the target
    # first: both metric implementations must count the row as a miss.
    from keras import ops

    from moe.lm.model.metrics import real_word_top_k_hits

    probs = np.array(
        [[0.0, 0.0, np.nan, np.nan], [0.0, 0.0, 0.7, 0.3]], np.float32
    )
    targets = np.array([2, 2])
    metrics = next_word_metrics(probs, targets)
    assert metrics["accuracy"] == metrics["top5_accuracy"] == 0.5
    assert np.isnan(metrics["perplexity"])
    for k in (1, 5):
        hits = ops.convert_to_numpy(real_word_top_k_hits(targets, probs, k=k))
        np.testing.assert_array_equal(hits, [0.0, 1.0])


def nan_predictor(lm_predictor):
    """The trained model with one NaN weight: every probability is NaN."""
    import keras

    from moe.lm.serving.predictor import NextWordPredictor

    model = keras.models.clone_model(lm_predictor.model)
    weights = lm_predictor.model.get_weights()
    weights[-1] = np.full_like(weights[-1], np.nan)  # the output bias
    model.set_weights(weights)
    return NextWordPredictor(
        model, lm_predictor.tokenizer, lm_predictor.max_seq_len
    )


def test_a_model_that_outputs_nan_gives_no_answer(lm_predictor):
    from moe.lm.errors import ModelOutputError

    broken = nan_predictor(lm_predictor)
    for ask in (
        lambda: broken.predict_next("the cat"),
        lambda: broken.top("the cat", 3),
        lambda: broken.generate("the cat", 2),
        lambda: broken.explain(["the cat"]),
    ):
        with pytest.raises(ModelOutputError, match="NaN or infinite"):
            ask()
    assert broken.evaluate(LM_TINY_CORPUS)["accuracy"] == 0.0


@pytest.mark.parametrize("temperature", [1e-300, 1e-3, 1.0, 1e3, 1e300])
def test_sampling_weights_are_a_distribution_at_any_temperature(temperature):
    from moe.lm.serving.predictor import _sharpened

    probs = np.array([1e-30, 0.2, 0.5, 0.3, 0.0], np.float32)
    weights = _sharpened(probs, temperature)
    assert np.isfinite(weights).all() and weights.sum() == pytest.approx(1)
    if temperature <= 1e-3:  # greedy in the limit
        assert weights.argmax() == 2 and weights[2] > 0.99
    if temperature >= 1e300:  # uniform in the limit
        np.testing.assert_allclose(weights, 0.2)


def test_generate_words_come_one_at_a_time(lm_predictor):
    words = lm_predictor.generate_words("the cat", 3)
    assert iter(words) is words  # a generator, not a finished list
    first = next(words)
    assert first == lm_predictor.predict_next("the cat")
    assert [first, *words] == lm_predictor.generate("the cat", 3)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"num_words": 0}, "`num_words` must be between 1 and 10000"),
        ({"num_words": 10001}, "`num_words` must be between 1 and 10000"),
        ({"num_words": 2, "temperature": 0.0}, "finite number > 0"),
        ({"num_words": 2, "temperature": float("nan")}, "finite number > 0"),
        ({"num_words": 2, "temperature": float("inf")}, "finite number > 0"),
    ],
)
def test_generate_bounds_are_checked_before_the_first_word(
    lm_predictor, kwargs, words
):
    with pytest.raises(ValueError, match=re.escape(words)):
        lm_predictor.generate_words("the cat", **kwargs)
