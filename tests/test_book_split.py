"""Whole-book splits, and training that validates on a whole book."""

import pytest
from conftest import LM_TINY_FLAGS, LM_TINY_SENTENCES

from moe.lm import cli
from moe.lm.errors import CorpusError
from moe.lm.text import book_split, corpus
from moe.lm.training import train
from moe.lm.training.config import TrainingConfig
from moe.lm.training.datasets import load_corpus, prepare_data


def tiny_flags_without_split():
    # --validation-split is refused beside --validation-corpus.
    at = LM_TINY_FLAGS.index("--validation-split")
    return LM_TINY_FLAGS[:at] + LM_TINY_FLAGS[at + 2 :]


def books(tmp_path, names):
    folder = tmp_path / "books"
    folder.mkdir()
    for i, name in enumerate(names):
        lines = LM_TINY_SENTENCES[i % len(LM_TINY_SENTENCES) :]
        (folder / f"{name}.txt").write_text("\n".join(lines * 3) + "\n")
    return folder


def test_split_keeps_books_whole(tmp_path):
    folder = books(tmp_path, ["a", "b", "c", "d"])
    split = book_split.split_books(folder, validate="b", test="d.txt")
    assert [p.name for p in split.train] == ["a.txt", "c.txt"]
    assert (split.validate.name, split.test.name) == ("b.txt", "d.txt")
    default = book_split.split_books(folder)
    assert (default.validate.name, default.test.name) == ("c.txt", "d.txt")


@pytest.mark.parametrize(
    "names, kwargs, message",
    [
        (["a", "b"], {}, "needs at least 3"),
        (["a", "b", "c"], {"validate": "x"}, "no validation book 'x'"),
        (["a", "b", "c"], {"validate": "a", "test": "a"}, "must differ"),
    ],
)
def test_bad_splits_are_refused(tmp_path, names, kwargs, message):
    with pytest.raises(CorpusError, match=message):
        book_split.split_books(books(tmp_path, names), **kwargs)


def test_validation_corpus_is_held_out_whole(tmp_path):
    folder = books(tmp_path, ["a", "b", "c"])
    split = book_split.split_books(folder)
    config = cli.parse_training_args(
        ["--corpus", *map(str, split.train),
         "--validation-corpus", str(split.validate)]
    )  # fmt: skip
    data = prepare_data(config, load_corpus(config))
    train_tokens, _ = corpus.token_stream(
        data.tokenizer, [p.read_text() for p in split.train]
    )
    # The training part is the training books' text; every held-out target
    # is in the validation book, whose text follows it.
    assert data.train_positions.max() < len(train_tokens)
    assert data.val_positions.min() >= len(train_tokens)
    held_tokens, _ = corpus.token_stream(
        data.tokenizer, [split.validate.read_text()]
    )
    assert len(data.tokens) == len(train_tokens) + len(held_tokens)
    # The vocabulary comes from the training books only.
    unseen = TrainingConfig(corpus=[str(p) for p in split.train])
    assert (
        data.tokenizer.vocabulary
        == prepare_data(unseen, load_corpus(unseen)).tokenizer.vocabulary
    )


def test_training_validates_on_the_held_out_book(tmp_path):
    folder = books(tmp_path, ["a", "b", "c"])
    split = book_split.split_books(folder)
    config = cli.parse_training_args(
        ["--corpus", *map(str, split.train),
         "--validation-corpus", str(split.validate),
         "--output", str(tmp_path / "out"), *tiny_flags_without_split()]
    )  # fmt: skip
    summary = train.train(config, verbose=0)
    assert summary["pairs"]["validation"] > 0
