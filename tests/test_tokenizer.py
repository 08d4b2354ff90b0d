import json

import pytest

from moe.lm.text import tokenizer as tok
from moe.lm.text.tokenizer import Tokenizer, split_sentences, split_words


def test_words_lowercased_apostrophes_kept_punctuation_dropped():
    text = "Don't stop, Alice’s CAT! A daisy-chain; `tis 42 cats..."
    assert split_words(text) == [
        "don't", "stop", "alice's", "cat", "a", "daisy", "chain", "tis",
        "42", "cats",
    ]  # fmt: skip


def test_sentences_end_at_punctuation_and_blank_lines_not_line_breaks():
    text = "One two.\nThree\nfour! Five?\n\nsix seven\n  \neight"
    assert split_sentences(text) == [
        ["one", "two"],
        ["three", "four"],
        ["five"],
        ["six", "seven"],
        ["eight"],
    ]


def test_fit_orders_by_count_then_alphabet_and_caps():
    t = Tokenizer.fit(["b a c b a d b", "e"], vocab_size=5)
    # counts: b=3, a=2, then c, d, e tied at 1 -> alphabetical, capped.
    assert t.vocabulary == ["b", "a", "c"]
    assert t.vocab_size == 5
    assert t.encode("a b zzz") == [3, 2, tok.OOV_ID]
    assert t.decode([0, 1, 2]) == [tok.PAD_TOKEN, tok.OOV_TOKEN, "b"]


def test_fit_is_deterministic_whatever_the_text_order():
    a = Tokenizer.fit(["x y z", "z y w"], 100)
    b = Tokenizer.fit(["z y w", "x y z"], 100)
    assert a.to_json() == b.to_json()


def test_fit_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.fit(["a b"], vocab_size=2)


def test_json_round_trip_is_versioned_and_complete():
    t = Tokenizer.fit(["the cat sat on the mat. don't"], 50)
    data = json.loads(t.to_json())
    assert data["format"] == tok.FORMAT
    assert data["format_version"] == tok.FORMAT_VERSION
    assert "config" in data
    u = Tokenizer.from_json(t.to_json())
    assert u.vocabulary == t.vocabulary
    assert u.encode("the cat don't fly") == t.encode("the cat don't fly")


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "not valid JSON"),
        ('{"format": "other"}', "not a tokenizer file"),
        (
            json.dumps({"format": tok.FORMAT, "format_version": 99}),
            "version 99 is not supported",
        ),
        (
            json.dumps(
                {"format": tok.FORMAT, "format_version": 1, "vocabulary": 3}
            ),
            "list of strings",
        ),
        (
            json.dumps(
                {
                    "format": tok.FORMAT,
                    "format_version": 1,
                    "vocabulary": ["a", "a"],
                }
            ),
            "duplicate",
        ),
    ],
)
def test_from_json_rejects_bad_files(text, match):
    with pytest.raises(ValueError, match=match):
        Tokenizer.from_json(text)
