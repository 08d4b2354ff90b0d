"""The data of a training run: corpus -> tokenizer -> `tf.data` pipelines.

`load_corpus` reads `TrainingConfig.corpus` (or the built-in corpus),
`prepare_data` fits the tokenizer and splits the token stream into training
and validation targets, `make_datasets` builds the shuffled training and the
ordered validation pipelines (`moe.lm.text.examples`) for the configured
architecture. Nothing here imports TensorFlow until a pipeline is built.
"""

from typing import NamedTuple

import numpy as np

from moe.lm.errors import ConfigError
from moe.lm.text import corpus
from moe.lm.text.tokenizer import (
    NUM_RESERVED,
    OOV_ID,
    Tokenizer,
    split_sentences,
)
from moe.lm.training.config import (
    TrainingConfig,
    with_defaults,
)


class PreparedData(NamedTuple):
    """The tokenizer, the token stream and the target positions."""

    tokenizer: Tokenizer
    tokens: np.ndarray
    starts: np.ndarray
    train_positions: np.ndarray
    val_positions: np.ndarray


def load_corpus(config: TrainingConfig) -> list[str]:
    """The corpus texts (raises `moe.lm.text.corpus.CorpusError`)."""
    if not config.corpus:
        return [corpus.default_corpus_text()]
    return [corpus.read_text(p, config.encoding) for p in config.corpus]


def load_validation_corpus(
    config: TrainingConfig, texts: list[str]
) -> list[str] | None:
    """The texts of `config.validation_corpus` (`None` without one), checked.

    Each file must hold a word to predict (a sentence of two words or more)
    and be none of the training `texts`.

    Raises:
        moe.lm.text.corpus.CorpusError: a file is unreadable, has no word to
            predict, or is a training text.
    """
    if not config.validation_corpus:
        return None
    held_out = []
    for path in config.validation_corpus:
        text = corpus.read_text(path, config.encoding)
        sentences = split_sentences(text)
        if not any(len(sentence) > 1 for sentence in sentences):
            words = sum(map(len, sentences))
            raise corpus.CorpusError(
                f"`validation_corpus` {path} has no word to predict "
                f"({words} word(s), none after another in a sentence): give "
                "a file of whole sentences"
            )
        if text in texts:
            raise corpus.CorpusError(
                f"`validation_corpus` {path} is also training text (`corpus`)"
                ": a model is not validated on what it trains on; hold out "
                "another file"
            )
        held_out.append(text)
    return held_out


def prepare_data(
    config: TrainingConfig,
    texts: list[str],
    tokenizer: Tokenizer | None = None,
    held_out: list[str] | None = None,
) -> PreparedData:
    """Tokenizer, token stream and the train / validation target positions.

    The tokenizer is fitted on `texts`, unless one is given (a bundle's, to
    continue training it: words outside its vocabulary are out of it).

    The validation positions are the targets in the last
    `validation_split` fraction of the token stream (their contexts may
    reach back into the training part, as when continuing a text), or
    with `validation_corpus` those of its texts (`held_out`, read here
    unless given: `load_validation_corpus`), appended to the stream as
    texts of their own and tokenized by the vocabulary of `texts`.

    Raises:
        moe.lm.text.corpus.CorpusError: too few words for both parts, or none to
            predict in the vocabulary of the given `tokenizer`.
    """
    config = with_defaults(config)
    if config.validation_corpus and held_out is None:
        held_out = load_validation_corpus(config, texts)
    given = tokenizer  # a bundle's, to continue training it
    if tokenizer is None:
        tokenizer = Tokenizer.fit(texts, config.vocab_size)
    tokens, starts = corpus.token_stream(tokenizer, texts)
    if len(tokens) < 2:
        raise corpus.CorpusError(
            f"the corpus has {len(tokens)} word(s); at least 2 are needed"
        )
    if held_out:
        split = len(tokens)
        more, more_starts = corpus.token_stream(tokenizer, held_out)
        tokens = np.concatenate([tokens, more])
        starts = np.concatenate([starts, more_starts + split])
    else:
        split = len(tokens) - max(
            1, round(len(tokens) * config.validation_split)
        )
    positions = corpus.pair_positions(starts)
    train, val = positions[positions < split], positions[positions >= split]
    if len(train) == 0 or len(val) == 0:
        advice = "add text or change `validation_split`"
        if held_out:
            advice = "add text to `corpus`"
        raise corpus.CorpusError(
            f"the corpus is too small: {len(tokens)} words give "
            f"{len(train)} training and {len(val)} validation pairs; {advice}"
        )
    if given is not None and not np.any(tokens[train] >= NUM_RESERVED):
        # Only [UNK] to learn: a "good" perplexity that means nothing.
        raise corpus.CorpusError(
            f"none of the {len(train)} words to predict in `corpus` is in "
            "the vocabulary of the model it starts from: fine-tune on text "
            "in that vocabulary, or train a new model (without `init_from` "
            "or `upcycle_from`)"
        )
    return PreparedData(tokenizer, tokens, starts, train, val)


def out_of_vocabulary(data: PreparedData) -> dict:
    """The share of the training and validation targets that are out of
    the vocabulary (`[UNK]`: a miss for accuracy, an ordinary class for
    the loss and perplexity)."""
    return {
        part: round(float(np.mean(data.tokens[positions] == OOV_ID)), 4)
        for part, positions in (
            ("train", data.train_positions),
            ("validation", data.val_positions),
        )
    }


def make_datasets(
    config: TrainingConfig, tokens, starts, train_pos, val_pos, replicas=1
):
    """The shuffled training and the ordered validation `tf.data` pipelines.

    Pairs (`examples.make_dataset`), or windows
    (`examples.make_window_dataset`) with `--train-positions all`. With
    `replicas` > 1 (a `tf.distribute` strategy), the first validation batch
    splits evenly over them: Keras builds a model's evaluation from the
    replicas' mean of that batch
    (`_maybe_symbolic_build` in Keras's TensorFlow trainer), which fails on
    unequal shares, as when the validation part is under one batch.

    Raises:
        ConfigError: fewer validation examples than replicas.
    """
    config = with_defaults(config)
    make = _dataset_builder(config)
    train_ds = make(
        tokens, starts, train_pos, config.max_seq_len, config.batch_size,
        shuffle_seed=config.seed,
    )  # fmt: skip
    return train_ds, validation_dataset(
        config, tokens, starts, val_pos, replicas
    )


def validation_dataset(config: TrainingConfig, tokens, starts, val_pos,
                       replicas=1):  # fmt: skip
    """`make_datasets`'s validation pipeline alone (same rules)."""
    config = with_defaults(config)
    make = _dataset_builder(config)
    first = min(
        config.batch_size,
        examples_per_epoch(config, starts, val_pos, shuffled=False),
    )
    if first < replicas:
        raise ConfigError(
            f"the validation part has {first} examples, fewer than the "
            f"{replicas} replicas: raise `validation_split`"
        )
    batch_size = config.batch_size
    if first % replicas:
        batch_size = first - first % replicas
    return make(tokens, starts, val_pos, config.max_seq_len, batch_size)


def _dataset_builder(config: TrainingConfig):
    # Pairs, or windows with `--train-positions all` (same signature).
    from moe.lm.text import examples

    if config.train_positions == "all":
        return examples.make_window_dataset
    return examples.make_dataset


def examples_per_epoch(config: TrainingConfig, starts, positions,
                       shuffled=True) -> int:  # fmt: skip
    """Examples (pairs or windows) in the shortest epoch over `positions`."""
    from moe.lm.text import examples

    config = with_defaults(config)
    if config.train_positions == "all":
        return examples.window_count(
            positions, starts, config.max_seq_len, shuffled=shuffled
        )
    return len(positions)
