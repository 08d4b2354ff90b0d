"""The optimiser recipe of a training run: optimizer, schedule, EMA, budget.

What modern language-model training uses, from `TrainingConfig`'s
"Optimiser recipe" settings (`None` there: the architecture's default,
`moe.lm.model.architectures.ARCHITECTURES`):

- `make_optimizer`: Adam or AdamW (decoupled weight decay), gradients
  clipped by their global norm.
- `recipe_callback`: the learning rate (linear warmup from 0, then constant
  or cosine decay to 0 over the run), the training budget (`max_steps`,
  `max_minutes`: a clean stop, after which the epoch's validation still
  runs, so early stopping keeps the best weights), and an exponential
  moving average (EMA) of the weights: the averaged weights are the ones
  validated, kept by early stopping (`restore_best_weights`) and saved.
  Keras's own (`use_ema`) is not used: it has no warm-up, so a short run's
  average is still mostly the initial weights, and `fit` writes it over
  the weights early stopping restored.

The run's length for the schedule is the longest it may be: the epochs'
steps, or `max_steps`, or `max_minutes` of wall time, whichever ends first
(progress is the largest of the three fractions). The callback sets the
rate, updates the average (momentum to the power of the steps since)
and checks the budget once per `fit` call, i.e. every
`steps_per_execution` steps.

Keras imports inside: `TrainingConfig` reads this module's names before
TensorFlow loads.
"""

import math
import time

OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("constant", "cosine")


def check(config, optimizer: str) -> list[tuple[str, str]]:
    """`(field, rule)` for each invalid recipe setting of `config`.

    Args:
        optimizer: the run's optimizer (`config.optimizer` or the
            architecture's default).
    """
    problems = []
    for name, choices in (
        ("optimizer", OPTIMIZERS),
        ("lr_schedule", LR_SCHEDULES),
    ):
        value = getattr(config, name)
        if value is not None and value not in choices:
            problems.append((name, f"must be one of {', '.join(choices)}"))
    for name in ("weight_decay", "clip_norm", "warmup_steps"):
        value = getattr(config, name)
        if value is not None and value < 0:
            problems.append((name, "must be 0 or more"))
    if config.weight_decay and optimizer == "adam":
        # Adam has no decoupled decay: it would be recorded, not applied.
        problems.append(
            (
                "weight_decay",
                "needs `optimizer` adamw (Adam has no decoupled weight decay): "
                "add --optimizer adamw or leave --weight-decay out",
            )
        )
    if config.ema is not None and not 0 <= config.ema < 1:
        problems.append(("ema", "must be in [0, 1) (0: no average)"))
    for name in ("max_steps", "max_minutes"):
        value = getattr(config, name)
        if value is not None and not value > 0:
            problems.append((name, "must be positive"))
    return problems


def make_optimizer(config):
    """The Keras optimizer of `config` (architecture defaults applied)."""
    import keras

    options = dict(learning_rate=config.learning_rate)
    if config.clip_norm:
        options["global_clipnorm"] = config.clip_norm
    if config.optimizer == "adamw":
        return keras.optimizers.AdamW(
            weight_decay=config.weight_decay or 0.0, **options
        )
    return keras.optimizers.Adam(**options)


def ema_momentum(momentum: float, step: int) -> float:
    """The average's momentum at `step`: lower at first, so that it follows
    the fast early change of the weights (TensorFlow's
    `ExponentialMovingAverage` rule with `num_updates`)."""
    return min(momentum, (1 + step) / (10 + step))


def learning_rate_at(progress: float, step: int, config) -> float:
    """The rate after `step` steps, `progress` (0 to 1) through the run."""
    peak = config.learning_rate
    if config.warmup_steps and step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    if config.lr_schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return peak


def recipe_callback(config, total_steps: int):
    """The recipe's Keras callback for `config` (see `_CALLBACK_DOC`).

    Args:
        total_steps: the training steps of all `config.epochs` epochs.
    """
    import keras

    class _RecipeCallback(keras.callbacks.Callback):
        __doc__ = _CALLBACK_DOC

        def __init__(self):
            super().__init__()
            self.total_steps = max(1, total_steps)
            if config.max_steps:
                self.total_steps = min(self.total_steps, config.max_steps)
            self.seconds = None
            if config.max_minutes:
                self.seconds = config.max_minutes * 60
            self.stopped_by_budget = False
            self.steps = 0
            self._raw = None
            self._average = None
            self._averaged_at = 0
            self._started = None

        # The schedule and the budget.
        def on_train_begin(self, logs=None):
            self._started = time.perf_counter()
            self._set_rate()

        def on_train_batch_begin(self, batch, logs=None):
            self._swap_raw_back()

        def on_train_batch_end(self, batch, logs=None):
            # `.numpy()`: under a strategy the count is a MirroredVariable.
            self.steps = int(self.model.optimizer.iterations.numpy())
            elapsed = time.perf_counter() - self._started
            if (config.max_steps and self.steps >= config.max_steps) or (
                self.seconds and elapsed >= self.seconds
            ):
                self.stopped_by_budget = True
                self.model.stop_training = True
            if config.ema:
                self._update_average()
            self._set_rate()

        def _progress(self):
            fractions = [self.steps / self.total_steps]
            if self.seconds:
                elapsed = time.perf_counter() - self._started
                fractions.append(elapsed / self.seconds)
            return max(fractions)

        def _set_rate(self):
            if config.warmup_steps or config.lr_schedule == "cosine":
                self.model.optimizer.learning_rate = learning_rate_at(
                    self._progress(), self.steps, config
                )

        # The EMA: validated, kept by early stopping and saved.
        def _update_average(self):
            variables = self.model.trainable_variables
            values = [v.numpy() for v in variables]
            if self._average is None:
                self._average = values
                return
            keep = ema_momentum(config.ema, self.steps) ** max(
                1, self.steps - self._averaged_at
            )
            for average, value in zip(self._average, values):
                average *= keep
                average += (1 - keep) * value
            self._averaged_at = self.steps

        def on_test_begin(self, logs=None):
            if self._average is None or self._raw is not None:
                return  # no average, or an `evaluate` outside `fit`
            variables = self.model.trainable_variables
            self._raw = [v.numpy() for v in variables]
            for variable, average in zip(variables, self._average):
                variable.assign(average)

        def on_epoch_begin(self, epoch, logs=None):
            self._swap_raw_back()

        def _swap_raw_back(self):
            if self._raw is None:
                return
            variables = self.model.trainable_variables
            for variable, raw in zip(variables, self._raw):
                variable.assign(raw)
            self._raw = None

        def on_train_end(self, logs=None):
            # The weights stay the average (swapped in at the last
            # validation); early stopping, after this callback, restores
            # the best validated ones, averages too.
            self._raw = None

    return _RecipeCallback()


_CALLBACK_DOC = """Learning-rate schedule, training budget and EMA swap.

Put it before `EarlyStopping` in `fit`'s callbacks: at each validation
the EMA replaces the raw weights until training resumes, so what is
validated, and what early stopping keeps and restores, is the average.
"""
