"""The optimiser recipe: schedule values, flag checks, the training budget,
and the EMA that early stopping keeps and the bundle saves."""

import dataclasses
import math

import numpy as np
import pytest
from conftest import LM_TINY_FLAGS

from moe.lm import cli
from moe.lm.errors import ConfigError
from moe.lm.training import recipe, train
from moe.lm.training.config import (
    TrainingConfig,
    with_defaults,
)
from moe.lm.training.resolve import validate


def tiny(tmp_path, corpus, *flags):
    return cli.parse_training_args(
        ["--corpus", str(corpus), "--output", str(tmp_path / "out"),
         *LM_TINY_FLAGS, *flags]
    )  # fmt: skip


def test_warmup_then_cosine_values():
    config = with_defaults(
        TrainingConfig(learning_rate=1.0, warmup_steps=4, lr_schedule="cosine")
    )
    rates = [recipe.learning_rate_at(0.0, s, config) for s in range(4)]
    assert rates == [0.25, 0.5, 0.75, 1.0]
    assert recipe.learning_rate_at(0.5, 10, config) == pytest.approx(0.5)
    assert recipe.learning_rate_at(1.0, 10, config) == pytest.approx(0.0)
    constant = dataclasses.replace(config, lr_schedule="constant")
    assert recipe.learning_rate_at(0.9, 10, constant) == 1.0


def test_ema_momentum_warms_up():
    assert recipe.ema_momentum(0.999, 0) == pytest.approx(0.1)
    assert recipe.ema_momentum(0.999, 10**6) == 0.999


def test_transformer_defaults_are_the_recipe():
    config = with_defaults(TrainingConfig(architecture="transformer"))
    assert (config.optimizer, config.lr_schedule) == ("adamw", "cosine")
    assert config.clip_norm > 0 and config.weight_decay > 0
    assert 0 < config.ema < 1 and config.warmup_steps > 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ema", "1"], "`ema` must be in [0, 1)"),
        (["--max-steps", "0"], "`max_steps` must be positive"),
        (["--max-minutes", "-1"], "`max_minutes` must be positive"),
        (["--clip-norm", "-0.5"], "`clip_norm` must be 0 or more"),
        (["--warmup-steps", "-1"], "`warmup_steps` must be 0 or more"),
        # Adam has no decoupled decay: it would be recorded, not applied.
        (["--weight-decay", "0.05"], "`weight_decay` needs `optimizer` adamw"),
        (
            [
                "--architecture",
                "transformer",
                "--optimizer",
                "adam",
                "--weight-decay",
                "0.1",
            ],
            "`weight_decay` needs `optimizer` adamw",
        ),  # fmt: skip
    ],
)
def test_bad_recipe_settings_are_refused(tmp_path, flags, message):
    config = cli.parse_training_args(["--output", str(tmp_path), *flags])
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")
                       .replace(")", r"\)")):  # fmt: skip
        validate(config)


def test_adam_records_no_weight_decay(tmp_path):
    # The transformer's default decay is adamw's; with --optimizer adam
    # none is applied, and training.json must not say otherwise.
    config = cli.parse_training_args(
        ["--architecture", "transformer", "--optimizer", "adam",
         "--output", str(tmp_path / "out")]
    )  # fmt: skip
    validate(config)  # the decay was not given: accepted
    assert with_defaults(config).weight_decay == 0.0


def test_optimizer_options():
    config = with_defaults(
        TrainingConfig(architecture="transformer", clip_norm=0.5)
    )
    optimizer = recipe.make_optimizer(config)
    assert type(optimizer).__name__ == "AdamW"
    assert optimizer.global_clipnorm == 0.5
    assert optimizer.weight_decay == config.weight_decay


def test_max_steps_stops_and_saves_the_best(tmp_path, lm_corpus_file):
    from moe.lm.bundle.save_load import load_bundle

    config = tiny(
        tmp_path, lm_corpus_file, "--epochs", "50", "--max-steps", "5",
        "--steps-per-execution", "1", "--ema", "0.9", "--warmup-steps", "2",
        "--lr-schedule", "cosine", "--optimizer", "adamw",
        "--weight-decay", "0.01", "--clip-norm", "1",
    )  # fmt: skip
    summary = train.train(config, verbose=0)
    assert summary["steps"] == 5 and summary["stopped_by_budget"]
    assert summary["epochs_run"] < 50
    # What was saved is what early stopping validated best: with the EMA
    # swapped in for every validation, the restored weights are averages.
    best = min(summary["history"]["val_loss"])
    assert summary["validation"]["loss"] == pytest.approx(best, rel=1e-4)
    assert load_bundle(config.output).model is not None


def test_ema_is_what_gets_validated(tmp_path, lm_corpus_file):
    # Momentum near 1 keeps the average near the first step's weights: the
    # validated (and saved) model then differs from one trained without it.
    base = ["--epochs", "2", "--steps-per-execution", "1"]
    plain = train.train(tiny(tmp_path / "a", lm_corpus_file, *base),
                           verbose=0)  # fmt: skip
    averaged = train.train(
        tiny(tmp_path / "b", lm_corpus_file, *base, "--ema", "0.99"),
        verbose=0,
    )
    assert plain["history"]["loss"] == pytest.approx(
        averaged["history"]["loss"]
    )  # same raw training
    assert not math.isclose(
        plain["history"]["val_loss"][-1], averaged["history"]["val_loss"][-1]
    )
    assert np.isfinite(averaged["validation"]["perplexity"])
