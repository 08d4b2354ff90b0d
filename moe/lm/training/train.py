"""Training the next-word model: `train()`, the model and the summary.

`train(config)` (settings: `moe.lm.training.config.TrainingConfig`) checks
the settings, reads the corpus, builds the tokenizer and the `tf.data`
pipelines (`moe.lm.training.datasets`), builds and trains the model, and saves
the bundle; it returns the summary that `training.json` records.

The checks run cheapest first, so that a mistake is reported before time
is spent: `resolve` (the settings, the output folder and the TensorBoard
folder; no TensorFlow) and reading the corpus answer in a
fraction of a second; the layers check their own arguments when the model
is built, after tokenization and a memory estimate, before training.

A run never replaces a good bundle with a bad one: it locks the output
folder for its whole length, stops on a non-finite loss
(`keras.callbacks.TerminateOnNaN`), refuses to save non-finite weights,
and writes the bundle atomically (`moe.lm.bundle.save_load.save_bundle`).

Example:
    from moe.lm import TrainingConfig, train

    summary = train(TrainingConfig(corpus=["book.txt"], epochs=5))
    summary["validation"]["perplexity"]
"""

import contextlib
import dataclasses
import math
import os
import threading
import time

import numpy as np

from moe.lm.bundle import save_load
from moe.lm.bundle.folder import OutputLock, check_output
from moe.lm.bundle.layout import (
    EXPERT_WORDS_FIGURE,
    EXPERTS_FIGURE,
    TRAINING_FIGURE,
)
from moe.lm.errors import ConfigError, TrainingError
from moe.lm.model import architectures, quantize_model
from moe.lm.text.tokenizer import NUM_RESERVED
from moe.lm.training import data_parallel, finetune, recipe
from moe.lm.training.config import (
    TrainingConfig,
    with_defaults,
)
from moe.lm.training.datasets import (
    examples_per_epoch,
    load_corpus,
    make_datasets,
    out_of_vocabulary,
    prepare_data,
    validation_dataset,
)
from moe.lm.training.resolve import resolve

# Training memory per parameter: float32 weights, gradients and Adam's two
# moments.
BYTES_PER_PARAMETER = 16


def check_memory(config: TrainingConfig, vocab_size: int) -> int:
    """Estimated training memory in bytes; refuses what this machine lacks.

    The estimate: `BYTES_PER_PARAMETER` per weight
    (`architectures.count_parameters`), plus the output layer's activations
    (probabilities and their gradient, float32, for every predicted
    position of a batch), plus the attention scores of the Transformer.

    Raises:
        ConfigError: more than the machine's physical memory.
    """
    config = with_defaults(config)
    parameters = architectures.count_parameters(
        **model_arguments(config, vocab_size), architecture=config.architecture
    )
    positions = config.max_seq_len if config.train_positions == "all" else 1
    needed = BYTES_PER_PARAMETER * parameters
    needed += 2 * 4 * config.batch_size * positions * vocab_size
    if config.architecture == "transformer":
        scores = config.num_heads * config.max_seq_len**2 * config.num_layers
        needed += 2 * 4 * config.batch_size * scores
    available = physical_memory()
    if available is not None and needed > available:
        raise ConfigError(
            f"the model needs about {needed / 2**30:.1f} GiB to train "
            f"({parameters:,} parameters and the batch's activations), more "
            f"than this machine's {available / 2**30:.1f} GiB: lower "
            "`hidden_dim`, `embed_dim`, `num_experts`, `vocab_size` or "
            "`batch_size`"
        )
    return needed


def check_size(config: TrainingConfig) -> None:
    """`check_memory` before the corpus is tokenized (no TensorFlow).

    With the smallest vocabulary the settings allow: what the experts and
    the attention alone need is refused at once; the exact check runs once
    the vocabulary is known.

    Raises:
        ConfigError: more than the machine's physical memory.
    """
    check_memory(finetune.resolve(config), vocab_size=NUM_RESERVED + 1)


def physical_memory() -> int | None:
    """The memory this process may use, in bytes (`None` if unknown): the
    machine's physical memory, or its control group's limit if lower."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    for limit in (
        "/sys/fs/cgroup/memory.max",  # cgroup v2
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",  # v1
    ):
        try:
            with open(limit) as f:
                memory = min(memory, int(f.read().strip()))
        except (OSError, ValueError):  # absent, or "max"
            continue
    return memory


def model_arguments(config: TrainingConfig, vocab_size: int) -> dict:
    """The builder arguments of `config`'s model
    (`moe.lm.model.architectures`)."""
    config = with_defaults(config)
    arguments = dict(
        vocab_size=vocab_size,
        max_seq_len=config.max_seq_len,
        embed_dim=config.embed_dim,
        num_experts=config.num_experts,
        hidden_dim=config.hidden_dim,
        top_k=config.top_k,
        routing=config.routing,
        capacity_factor=config.capacity_factor,
        aux_loss_weight=config.aux_loss_weight,
        seed=config.seed,
        num_groups=config.num_groups,
        num_shared_experts=config.num_shared_experts,
    )
    if config.architecture == "transformer":
        arguments.update(
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            dropout=config.dropout,
        )
    return arguments


def build(config: TrainingConfig, vocab_size: int):
    """The uncompiled model of `config.architecture`.

    Raises:
        ConfigError: a setting the layers reject, with their message (they
            name their arguments, which are `TrainingConfig` fields).
    """
    builder = {
        "pooled": architectures.build_model,
        "transformer": architectures.build_transformer_model,
    }[config.architecture]
    try:
        return builder(**model_arguments(config, vocab_size))
    except ValueError as e:  # the layers name their (our) arguments
        raise ConfigError(str(e)) from None


def jit_compile(config: TrainingConfig) -> bool | str:
    """`keras.Model.compile`'s `jit_compile` for `config.jit_compile`.

    `"auto"` is Keras's own rule (no XLA on CPU-only TensorFlow or under a
    `tf.distribute` strategy, `jit` on JAX). XLA fuses the per-op overhead
    that dominates the pooled model's step (the MoE layer then uses its
    static padded-block dispatch, same outputs) but compiling the train and
    evaluation steps takes long; `bench/training_throughput.py` measures
    both.
    """
    if config.jit_compile == "auto":
        return "auto"
    return config.jit_compile == "on"


def train(
    config: TrainingConfig,
    verbose: int = 1,
    callbacks=(),
    strategy=None,
    interrupted: threading.Event | None = None,
    texts: list[str] | None = None,
    held_out: list[str] | None = None,
) -> dict:
    """Trains, saves the bundle to `config.output` and returns the summary.

    Args:
        config: the settings.
        verbose: Keras's `fit` verbosity.
        callbacks: Keras callbacks added to `fit` (early stopping and the
            stop on a non-finite loss are always there).
        strategy: the `tf.distribute` strategy of `config.strategy`
            (`moe.lm.training.data_parallel.make_strategy`), made here when
            not given; a multi-worker one must be made at program start, before
            TensorFlow sets up its devices, as `model.py` does.
        interrupted: set (e.g. by a Ctrl-C handler) to stop training before
            the next step and before saving, with `KeyboardInterrupt`.
        texts: the corpus, if already read (`load_corpus(config)`).
        held_out: the validation corpus, if already read
            (`load_validation_corpus(config, texts)`).

    Raises:
        ConfigError, moe.lm.text.corpus.CorpusError,
        moe.lm.bundle.layout.BundleError: bad settings, corpus or output
            folder, found before training.
        TrainingError: the loss or the weights became non-finite, or the
            machine ran out of memory; nothing is saved.
        KeyboardInterrupt: `interrupted` was set; nothing is saved.
    """
    config = resolve(config)  # checked, bundle and defaults taken
    if texts is None:
        texts = load_corpus(config)
    task = data_parallel.check_strategy(config.strategy)  # TF_CONFIG
    chief = task is None or task.is_chief  # only the chief writes
    lock = OutputLock(config.output) if chief else None
    with contextlib.nullcontext() if lock is None else lock:
        if lock is not None:
            check_output(config.output)  # again, under the lock
        summary, model, tokenizer, figures = _fit(
            config, texts, held_out, task, verbose, callbacks, strategy,
            interrupted or threading.Event(),
        )  # fmt: skip
        if chief:
            save_load.save_bundle(
                config.output, model, tokenizer, config.max_seq_len,
                summary, figures, lock=lock,
            )  # fmt: skip
    return summary


def _fit(config, texts, held_out, task, verbose, callbacks, strategy,
         interrupted):  # fmt: skip
    """Trains; returns `(summary, model, tokenizer, figures)`."""
    import keras

    from moe.lm.analysis import plots
    from moe.lm.analysis.expert_load import ExpertLoadCallback
    from moe.lm.analysis.expert_words import MAX_CONTEXTS, expert_words

    try:
        if strategy is None:
            strategy = data_parallel.make_strategy(config.strategy)
    except data_parallel.StrategyError as e:
        raise ConfigError(str(e)) from None
    started = time.perf_counter()
    keras.utils.set_random_seed(config.seed)
    start = finetune.load(config)
    data = prepare_data(
        config, texts, start.bundle.tokenizer if start else None, held_out
    )
    check_memory(config, data.tokenizer.vocab_size)
    unknown = out_of_vocabulary(data)
    if start is not None and verbose:
        print(
            f"{unknown['train']:.1%} of the words to predict in the new text "
            f"are outside the vocabulary of {start.directory}: each is the "
            "out-of-vocabulary token [UNK] (a miss for accuracy, a class "
            "like any for the loss and perplexity)"
        )
    train_ds, val_ds = _datasets(config, data, strategy)
    model, trained = _compiled_models(config, data.tokenizer, strategy, start)
    # Per-expert load on a fixed validation sample, on every backend; after
    # early stopping so that its final load is that of the restored weights.
    load = ExpertLoadCallback(
        _load_sample(config, data), log_dir=config.tensorboard
    )
    board = []
    if config.tensorboard:
        board = [
            keras.callbacks.TensorBoard(config.tensorboard, write_graph=False)
        ]
    steps_per_epoch = math.ceil(
        examples_per_epoch(config, data.starts, data.train_positions)
        / config.batch_size
    )
    schedule = recipe.recipe_callback(config, config.epochs * steps_per_epoch)
    callbacks = [
        keras.callbacks.TerminateOnNaN(),
        schedule,  # before early stopping: it validates the EMA
        keras.callbacks.EarlyStopping(
            monitor="val_loss",
            patience=config.patience,
            restore_best_weights=True,
        ),
        load,
        *board,
        *callbacks,
        _stop_when(interrupted),
    ]
    history = _run_fit(trained, train_ds, val_ds, config, callbacks, verbose)
    _check_finite(history, model)
    # The restored best weights, measured again on the serving task.
    if trained is not model:
        val_ds = _serving_task(config, data, strategy)
    metrics = model.evaluate(val_ds, return_dict=True, verbose=0)
    validation = {
        k: float(metrics[k])
        for k in ("loss", "accuracy", "top5_accuracy", "perplexity")
    }
    if not math.isfinite(validation["loss"]):
        raise TrainingError(_DIVERGED.format(what="the validation loss"))
    quantized = _quantized(config, model, val_ds, strategy)
    history = {k: [float(v) for v in vs] for k, vs in history.items()}
    words = expert_words(
        model, data.tokenizer, _load_sample(config, data, MAX_CONTEXTS)
    )
    summary = {
        "config": dataclasses.asdict(config),
        "vocab_size": data.tokenizer.vocab_size,
        "tokens": len(data.tokens),
        "pairs": {
            "train": len(data.train_positions),
            "validation": len(data.val_positions),
        },
        "epochs_run": len(history["loss"]),
        "steps": schedule.steps,
        "stopped_by_budget": schedule.stopped_by_budget,
        "validation": validation,
        "out_of_vocabulary": unknown,
        **quantized,
        "history": history,
        "expert_load": {"per_epoch": load.history, "final": load.final},
        "starting_point": finetune.describe(start),
        "expert_words": words,
        "distribution": data_parallel.describe(strategy, task),
        "seconds": round(time.perf_counter() - started, 2),
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _versions(),
        "runtime": _runtime(),
    }
    figures = {
        TRAINING_FIGURE: plots.training_png(history),
        EXPERTS_FIGURE: plots.experts_png(load.history, load.final),
        EXPERT_WORDS_FIGURE: plots.expert_words_png(words),
    }
    if interrupted.is_set():
        raise KeyboardInterrupt
    return summary, model, data.tokenizer, figures


def _quantized(config, model, val_ds, strategy) -> dict:
    # `--quantize`: the model saved quantized, and its validation metrics.
    if config.quantize == "none":
        return {}
    with data_parallel.scope(strategy):
        quantize_model.quantize_model(model, config.quantize)
    metrics = model.evaluate(val_ds, return_dict=True, verbose=0)
    # A quantized bundle serves; it does not resume training (its int8
    # kernels are not trainable), so it leaves out Adam's moments, which
    # would be twice the float weights.
    model.optimizer = None
    names = ("loss", "accuracy", "top5_accuracy", "perplexity")
    return {
        "quantized": {
            "mode": config.quantize,
            "validation": {k: float(metrics[k]) for k in names},
        }
    }


def _datasets(config, data, strategy):
    """`make_datasets`'s pipelines, set up for `strategy`."""
    replicas = 1 if strategy is None else strategy.num_replicas_in_sync
    train_ds, val_ds = make_datasets(
        config, data.tokens, data.starts, data.train_positions,
        data.val_positions, replicas,
    )  # fmt: skip
    if strategy is None:
        return train_ds, val_ds
    try:
        train_ds = data_parallel.whole_batches(
            train_ds,
            examples_per_epoch(config, data.starts, data.train_positions),
            config.batch_size,
        )
    except data_parallel.StrategyError as e:
        raise ConfigError(str(e)) from None
    return (
        data_parallel.distribute_options(train_ds),
        data_parallel.distribute_options(val_ds),
    )


def _serving_task(config, data, strategy):
    """The validation pipeline of the serving task: the next word after
    each whole validation context."""
    replicas = 1 if strategy is None else strategy.num_replicas_in_sync
    val_ds = validation_dataset(
        dataclasses.replace(config, train_positions="last"),
        data.tokens, data.starts, data.val_positions, replicas,
    )  # fmt: skip
    if strategy is None:
        return val_ds
    return data_parallel.distribute_options(val_ds)


def _compiled_models(config, tokenizer, strategy, start=None):
    """`(model, trained)`, compiled in `strategy`'s scope.

    `model` is the one serving uses; `trained` the one `fit` trains: the
    same model, or with `--train-positions all` the same layers predicting
    at every position of a window. Under a strategy, the variables are
    mirrored on every replica.
    """
    with data_parallel.scope(strategy):
        model = build(config, tokenizer.vocab_size)
        finetune.start_from(model, start)  # --init-from, --upcycle-from
        trained = model
        if config.train_positions == "all":
            trained = architectures.every_position_model(model)
            # `model` is compiled too, for `evaluate` and the bundle; it
            # never trains, so it has no optimizer.
            architectures.compile_model(model)
        architectures.compile_model(
            trained,
            config.learning_rate,
            optimizer=recipe.make_optimizer(config),
            # Keras's multi-step loop fails under a strategy with more than
            # one replica (a while-loop placeholder error in TF 2.21): one
            # step a call.
            steps_per_execution=(
                1 if strategy is not None else config.steps_per_execution
            ),
            jit_compile=jit_compile(config),
        )
    return model, trained


def _run_fit(trained, train_ds, val_ds, config, callbacks, verbose) -> dict:
    """`trained.fit(...)`'s history; running out of memory is a user error."""
    import tensorflow as tf

    try:
        return trained.fit(
            train_ds,
            validation_data=val_ds,
            epochs=config.epochs,
            callbacks=callbacks,
            shuffle=False,  # the dataset shuffles itself, reproducibly
            verbose=verbose,
        ).history
    except (MemoryError, tf.errors.ResourceExhaustedError):
        raise TrainingError(_OUT_OF_MEMORY) from None


_DIVERGED = (
    "training diverged: {what} became NaN or infinite; nothing was saved "
    "(lower `learning_rate`, or check `aux_loss_weight`)"
)
_OUT_OF_MEMORY = (
    "training ran out of memory; nothing was saved (lower `batch_size`, "
    "`hidden_dim`, `embed_dim`, `num_experts` or `vocab_size`)"
)


def _check_finite(history: dict, model) -> None:
    """Raises `TrainingError` if training diverged (loss or weights)."""
    for key in ("loss", "val_loss"):
        values = history.get(key, [])
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            what = f"the {key.replace('_', ' ')} of epoch {bad[0] + 1}"
            raise TrainingError(_DIVERGED.format(what=what))
    if not save_load.weights_are_finite(model):
        raise TrainingError(_DIVERGED.format(what="a weight"))


def _load_sample(config, data, size: int = 1024):
    """Up to `size` validation contexts (`ExpertLoadCallback`'s 1024)."""
    from moe.lm.text.examples import contexts

    sample = data.val_positions[:size]
    return contexts(
        data.tokens, sample, data.starts[sample], config.max_seq_len
    ).numpy()


def _stop_when(event: threading.Event):
    """A callback raising `KeyboardInterrupt` once `event` is set.

    Ctrl-C raises `KeyboardInterrupt` by itself, except when Python raises
    it inside a finalizer (`__del__`), which prints and drops it; a handler
    that also sets `event` makes the interrupt stop training regardless.
    """
    import keras

    def check(*_, **__):
        if event.is_set():
            raise KeyboardInterrupt

    return keras.callbacks.LambdaCallback(
        on_train_batch_end=check, on_epoch_end=check
    )


def _versions() -> dict:
    import platform

    import keras
    import tensorflow

    import moe

    return {
        "python": platform.python_version(),
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "tensorflow": tensorflow.__version__,
        "numpy": np.__version__,
        "moe": moe.__version__,
    }


def _runtime() -> dict:
    # TensorFlow reads the allocator setting once, when it starts.
    bfc = os.environ.get("TF_CPU_ALLOCATOR_USE_BFC", "").lower()
    return {"tf_cpu_allocator": "bfc" if bfc in ("1", "true") else "malloc"}
