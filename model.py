"""Train the next-word Mixture-of-Experts model and save it to `saved_model/`.

Usage:
    python model.py                                # built-in corpus, < 1 min
    python model.py --corpus book.txt notes.txt --epochs 40
    python model.py --routing switch --capacity-factor 1.25 --num-experts 8
    python model.py --architecture transformer --num-layers 2 --num-heads 4
    TF_CONFIG='{"cluster": ...}' python model.py --strategy multi-worker
    python model.py --help                         # every setting

Writes `model.keras`, `tokenizer.json`, `max_seq_len.txt`,
`training.json` and the pictures `training.png` and `experts.png` into
`--output` (default `saved_model/`), atomically: an
interrupted or failing run leaves the previous model as it was. Serve it with
`python serve.py "some text"`.
"""

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import signal
import sys
import threading
import time

# Silence TensorFlow's C++ start-up log unless the user asked for it.
_QUIET_TF = "TF_CPP_MIN_LOG_LEVEL" not in os.environ
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Set by `main`'s Ctrl-C handler. A KeyboardInterrupt that Python raises
# inside a finalizer (`__del__`) is printed and dropped, and training would
# go on to overwrite the bundle; `train` checks this after every step and
# before saving, so an interrupt is never lost.
INTERRUPTED = threading.Event()

# `moe.routing.ROUTINGS`, repeated so that flags are checked before the slow
# `import moe` (which loads Keras and TensorFlow).
ROUTINGS = ("top_k", "switch", "soft", "expert_choice", "hash", "hierarchical")
# `moe.lm.distribute.STRATEGIES`, repeated for the same reason.
STRATEGIES = ("none", "mirrored", "multi-worker")
# Per-architecture defaults of unset flags. `--max-seq-len`: the pooled
# trunk averages its context, so more than the last word hurts it (README,
# "Measured figures"); the Transformer attends by position and uses a
# longer context. `--train-positions`: a causal Transformer predicts the
# next word at every position of a window in one step; the pooled trunk has
# one output per context. `--learning-rate`: on alice.txt the Transformer's
# held-out perplexity is 252 at 1e-3 against 266 at 3e-3 (mean of 4 seeds,
# `bench/quality.py`; README, "Next-word quality").
ARCHITECTURES = {
    "pooled": {
        "max_seq_len": 1, "train_positions": "last", "learning_rate": 3e-3,
    },
    "transformer": {
        "max_seq_len": 8, "train_positions": "all", "learning_rate": 1e-3,
    },
}  # fmt: skip
TRAIN_POSITIONS = ("all", "last")


@dataclasses.dataclass
class Config:
    """Training settings; each field is the flag of the same name."""

    corpus: list[str] | None = None
    encoding: str = "utf-8"
    epochs: int = 40
    batch_size: int = 64
    steps_per_execution: int = 32
    jit_compile: str = "auto"
    architecture: str = "pooled"
    max_seq_len: int | None = None
    train_positions: str | None = None
    vocab_size: int = 5000
    embed_dim: int = 64
    num_layers: int = 2
    num_heads: int = 4
    dropout: float = 0.1
    num_experts: int = 4
    top_k: int | None = None
    routing: str = "top_k"
    hidden_dim: int = 128
    capacity_factor: float | None = None
    num_groups: int | None = None
    num_shared_experts: int = 0
    aux_loss_weight: float = 0.01
    learning_rate: float | None = None
    validation_split: float = 0.1
    patience: int = 3
    seed: int = 1337
    strategy: str = "none"
    output: str = "saved_model"
    tensorboard: str | None = None


HELP = {
    "corpus": "UTF-8 text files to train on (default: the built-in corpus)",
    "encoding": "text encoding of the corpus files",
    "epochs": "most passes over the training pairs (early stopping may "
    "end sooner)",
    "batch_size": "examples per training step: (context, next word) "
    "pairs, or windows with --train-positions all",
    "steps_per_execution": "training steps per compiled call: fewer "
    "Python round trips per step (a small model's main cost); always 1 "
    "under --strategy",
    "jit_compile": "XLA-compile the training step. auto: Keras's default "
    "(off on CPU). on: about 1.3x the pooled model's pairs per CPU-second, "
    "but compiling takes tens of seconds: pays on long runs only; the "
    "transformer gets slower",
    "architecture": "pooled: the average of the context embeddings feeds "
    "one MoE layer; transformer: causal Transformer blocks with an MoE "
    "feed-forward layer each",
    "max_seq_len": "context window: how many preceding words the model sees "
    "(default: 1 for pooled, 8 for transformer)",
    "train_positions": "transformer: learn the next word at every position "
    "of a window of --max-seq-len words (all), or only after each whole "
    "context (last, as serving asks; pooled always does). all sees each "
    "word once per epoch, as last does, in fewer, larger steps (default: "
    "all for transformer)",
    "vocab_size": "vocabulary cap, padding and out-of-vocabulary ids "
    "included; rarer words become out-of-vocabulary",
    "embed_dim": "word embedding width (the Transformer's width)",
    "num_layers": "transformer: Transformer blocks",
    "num_heads": "transformer: attention heads (must divide --embed-dim)",
    "dropout": "transformer: dropout rate of attention and residuals",
    "num_experts": "experts in the MoE layer",
    "top_k": "experts per context (default: 2 for top_k, 1 for switch, all "
    "for soft)",
    "routing": "MoE routing",
    "hidden_dim": "hidden width of each expert",
    "capacity_factor": "expert capacity factor (default: dropless; 2 for "
    "expert_choice)",
    "num_groups": "expert groups of --routing hierarchical (must divide "
    "--num-experts)",
    "num_shared_experts": "always-on shared experts added to the routed ones",
    "aux_loss_weight": "weight of the load-balancing loss (0 disables it)",
    "learning_rate": "Adam learning rate (default: 0.003 for pooled, "
    "0.001 for transformer)",
    "validation_split": "held-out fraction at the end of the corpus, in (0, 1)",
    "patience": "epochs without val_loss improvement before stopping",
    "seed": "random seed: same seed, same vocabulary and metrics",
    "strategy": "data-parallel training (TensorFlow backend): mirrored over "
    "this machine's GPUs (or CPU devices), or multi-worker across the "
    "machines in TF_CONFIG; --batch-size is the global batch",
    "output": "directory to write the model bundle to",
    "tensorboard": "also log to TensorBoard in DIR, with per-expert load",
}


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(
        description="Train the next-word MoE model.",
        formatter_class=_HelpFormatter,
    )
    defaults = Config()
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        kwargs = {"default": getattr(defaults, field.name)}
        if field.name == "corpus":
            kwargs.update(nargs="+", metavar="PATH")
        elif field.name == "routing":
            kwargs.update(choices=ROUTINGS)
        elif field.name == "architecture":
            kwargs.update(choices=tuple(ARCHITECTURES))
        elif field.name == "train_positions":
            kwargs.update(choices=TRAIN_POSITIONS)
        elif field.name == "max_seq_len":
            kwargs.update(type=int)
        elif field.name in ("top_k", "num_groups"):
            kwargs.update(type=int)
        elif field.name in ("capacity_factor", "learning_rate"):
            kwargs.update(type=float)
        elif field.name == "strategy":
            kwargs.update(choices=STRATEGIES)
        elif field.name == "jit_compile":
            kwargs.update(choices=("auto", "on", "off"))
        elif field.name in ("output", "tensorboard"):
            kwargs.update(metavar="DIR")
        else:
            kwargs.update(type=type(kwargs["default"]))
        parser.add_argument(flag, help=HELP[field.name], **kwargs)
    return Config(**vars(parser.parse_args(argv)))


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" unless the help already explains the default."""

    def _get_help_string(self, action):
        if action.default is None or "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ConfigError(ValueError):
    """An invalid setting; the message names the flag."""


def validate(config: Config) -> None:
    """Raises `ConfigError` naming the flag of the first invalid setting."""
    checks = [
        (config.epochs >= 1, "--epochs must be at least 1"),
        (config.batch_size >= 1, "--batch-size must be at least 1"),
        (
            config.steps_per_execution >= 1,
            "--steps-per-execution must be at least 1",
        ),
        (
            config.max_seq_len is None or config.max_seq_len >= 1,
            "--max-seq-len must be at least 1",
        ),
        (config.vocab_size >= 3, "--vocab-size must be at least 3"),
        (config.embed_dim >= 1, "--embed-dim must be at least 1"),
        (
            config.train_positions in (None, "last")
            or config.architecture == "transformer",
            "--train-positions all needs --architecture transformer (the "
            "pooled model predicts once per context)",
        ),
        (config.num_layers >= 1, "--num-layers must be at least 1"),
        (
            config.num_heads >= 1
            and (
                config.architecture != "transformer"
                or config.embed_dim % config.num_heads == 0
            ),
            f"--num-heads must divide --embed-dim ({config.embed_dim})",
        ),
        (0 <= config.dropout < 1, "--dropout must be in [0, 1)"),
        (config.num_experts >= 1, "--num-experts must be at least 1"),
        (config.hidden_dim >= 1, "--hidden-dim must be at least 1"),
        (
            config.top_k is None or 1 <= config.top_k <= config.num_experts,
            f"--top-k must be between 1 and --num-experts "
            f"({config.num_experts})",
        ),
        (
            config.capacity_factor is None or config.capacity_factor > 0,
            "--capacity-factor must be positive",
        ),
        (
            config.num_groups is None
            if config.routing != "hierarchical"
            else config.num_groups is not None
            and config.num_groups >= 1
            and config.num_experts % config.num_groups == 0,
            "--num-groups must be set, and divide --num-experts "
            f"({config.num_experts}), exactly when --routing is hierarchical",
        ),
        (
            config.num_shared_experts >= 0,
            "--num-shared-experts must be >= 0",
        ),
        (config.aux_loss_weight >= 0, "--aux-loss-weight must be >= 0"),
        (
            config.learning_rate is None or config.learning_rate > 0,
            "--learning-rate must be positive",
        ),
        (
            0 < config.validation_split < 1,
            "--validation-split must be between 0 and 1 (exclusive)",
        ),
        (config.patience >= 1, "--patience must be at least 1"),
        (
            config.tensorboard is None
            or importlib.util.find_spec("tensorboard") is not None,
            "--tensorboard needs the tensorboard package (pip install "
            "tensorboard)",
        ),
        (config.routing in ROUTINGS, f"--routing must be one of {ROUTINGS}"),
        (
            config.architecture in ARCHITECTURES,
            f"--architecture must be one of {tuple(ARCHITECTURES)}",
        ),
        (
            config.strategy in STRATEGIES,
            f"--strategy must be one of {STRATEGIES}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            field = message.split()[0][2:].replace("-", "_")
            value = getattr(config, field)
            raise ConfigError(f"{message}. Received: {value}")


def load_corpus(config: Config) -> list[str]:
    """The corpus texts (raises `CorpusError`)."""
    from moe.lm import corpus

    if not config.corpus:
        return [corpus.default_corpus_text()]
    return [corpus.read_text(p, config.encoding) for p in config.corpus]


def prepare_data(config: Config, texts: list[str]):
    """Tokenizer, token stream and the train / validation target positions.

    The validation positions are the targets in the last
    `validation_split` fraction of the token stream (their contexts may
    reach back into the training part, as when continuing a text).
    """
    from moe.lm import corpus
    from moe.lm.tokenizer import Tokenizer

    tokenizer = Tokenizer.fit(texts, config.vocab_size)
    tokens, starts = corpus.token_stream(tokenizer, texts)
    if len(tokens) < 2:
        raise corpus.CorpusError(
            f"the corpus has {len(tokens)} word(s); at least 2 are needed"
        )
    split = len(tokens) - max(1, round(len(tokens) * config.validation_split))
    positions = corpus.pair_positions(starts)
    train, val = positions[positions < split], positions[positions >= split]
    if len(train) == 0 or len(val) == 0:
        raise corpus.CorpusError(
            f"the corpus is too small: {len(tokens)} words give "
            f"{len(train)} training and {len(val)} validation pairs; add "
            "text or change --validation-split"
        )
    return tokenizer, tokens, starts, train, val


def make_datasets(
    config: Config, tokens, starts, train_pos, val_pos, replicas: int = 1
):
    """The shuffled training and the ordered validation `tf.data` pipelines.

    Pairs (`data.make_dataset`), or windows (`data.make_window_dataset`)
    with `--train-positions all`. With `replicas` > 1 (a `tf.distribute`
    strategy), the first validation batch splits evenly over them: Keras
    builds a model's evaluation from the replicas' mean of that batch
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


def validation_dataset(config: Config, tokens, starts, val_pos, replicas=1):
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
            f"{replicas} replicas: raise --validation-split"
        )
    batch_size = config.batch_size
    if first % replicas:
        batch_size = first - first % replicas
    return make(tokens, starts, val_pos, config.max_seq_len, batch_size)


def _dataset_builder(config: Config):
    # Pairs, or windows with `--train-positions all` (same signature).
    from moe.lm import data

    if config.train_positions == "all":
        return data.make_window_dataset
    return data.make_dataset


def examples_per_epoch(config: Config, starts, positions, shuffled=True):
    """Examples (pairs or windows) in the shortest epoch over `positions`."""
    from moe.lm import data

    config = with_defaults(config)
    if config.train_positions == "all":
        return data.window_count(
            positions, starts, config.max_seq_len, shuffled=shuffled
        )
    return len(positions)


def with_defaults(config: Config) -> Config:
    """`config` with the per-architecture defaults of unset fields."""
    defaults = ARCHITECTURES[config.architecture]
    unset = {k: v for k, v in defaults.items() if getattr(config, k) is None}
    return dataclasses.replace(config, **unset)


def train(
    config: Config, verbose: int = 1, callbacks=(), strategy=None
) -> dict:
    """Trains, saves the bundle to `config.output` and returns a summary.

    `callbacks` are Keras callbacks added to `fit` (early stopping is
    always there). `strategy` is the `tf.distribute` strategy of
    `config.strategy` (`moe.lm.distribute.make_strategy`), made here when
    not given; a multi-worker one must be made at program start, before
    TensorFlow sets up its devices, as `main` does.
    """
    validate(config)
    config = with_defaults(config)
    texts = load_corpus(config)
    tokenizer, tokens, starts, train_pos, val_pos = prepare_data(config, texts)
    with _quiet_stderr():
        import keras

        from moe.lm import architectures, bundle, data, distribute, plots
        from moe.lm.expert_load import ExpertLoadCallback

    try:
        task = distribute.check_strategy(config.strategy)  # TF_CONFIG
        if strategy is None:
            strategy = distribute.make_strategy(config.strategy)
    except distribute.StrategyError as e:
        raise ConfigError(str(e)) from None
    started = time.perf_counter()
    keras.utils.set_random_seed(config.seed)
    replicas = 1 if strategy is None else strategy.num_replicas_in_sync
    train_ds, val_ds = make_datasets(
        config, tokens, starts, train_pos, val_pos, replicas
    )
    if strategy is not None:
        try:
            train_ds = distribute.whole_batches(
                train_ds,
                examples_per_epoch(config, starts, train_pos),
                config.batch_size,
            )
        except distribute.StrategyError as e:
            raise ConfigError(str(e)) from None
        train_ds = distribute.distribute_options(train_ds)
        val_ds = distribute.distribute_options(val_ds)
    # Under a strategy, the model's variables are mirrored on every replica.
    # `model` is the one serving uses; `trained` is the one `fit` trains:
    # itself, or with `--train-positions all` the same layers predicting at
    # every position of a window.
    try:
        with distribute.scope(strategy):
            model = build(config, tokenizer.vocab_size)
            trained = model
            if config.train_positions == "all":
                trained = architectures.every_position_model(model)
    except ValueError as e:  # a combination the layer rejects
        raise ConfigError(str(e)) from None
    with distribute.scope(strategy):
        if trained is not model:  # compiled for `evaluate` and the bundle
            architectures.compile_model(model, config.learning_rate)
        architectures.compile_model(
            trained,
            config.learning_rate,
            # Keras's multi-step loop fails under a strategy with more than
            # one replica (a while-loop placeholder error in TF 2.21): one
            # step a call.
            steps_per_execution=(
                1 if strategy is not None else config.steps_per_execution
            ),
            jit_compile=jit_compile(config),
        )
    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss",
        patience=config.patience,
        restore_best_weights=True,
    )
    # Per-expert load on a fixed validation sample, on every backend; after
    # `stop` so that its final load is that of the restored weights.
    sample, _ = next(iter(data.make_dataset(
        tokens, starts, val_pos[:1024], config.max_seq_len, 1024
    )))  # fmt: skip
    load = ExpertLoadCallback(sample.numpy(), log_dir=config.tensorboard)
    board = []
    if config.tensorboard:
        board = [
            keras.callbacks.TensorBoard(config.tensorboard, write_graph=False)
        ]
    history = trained.fit(
        train_ds,
        validation_data=val_ds,
        epochs=config.epochs,
        callbacks=[stop, load, *board, *callbacks, _stop_on_interrupt()],
        shuffle=False,  # the dataset shuffles itself, reproducibly
        verbose=verbose,
    )
    # The restored best weights, measured again on the serving task: the
    # next word after each validation context.
    if trained is not model:
        val_ds = validation_dataset(
            dataclasses.replace(config, train_positions="last"),
            tokens, starts, val_pos, replicas,
        )  # fmt: skip
        if strategy is not None:
            val_ds = distribute.distribute_options(val_ds)
    metrics = model.evaluate(val_ds, return_dict=True, verbose=0)
    seconds = time.perf_counter() - started
    summary = {
        "config": dataclasses.asdict(config),
        "vocab_size": tokenizer.vocab_size,
        "tokens": len(tokens),
        "pairs": {"train": len(train_pos), "validation": len(val_pos)},
        "epochs_run": len(history.history["loss"]),
        "validation": {
            k: float(metrics[k])
            for k in ("loss", "accuracy", "top5_accuracy", "perplexity")
        },
        "history": {
            k: [float(v) for v in vs] for k, vs in history.history.items()
        },
        "expert_load": {"per_epoch": load.history, "final": load.final},
        "distribution": distribute.describe(strategy, task),
        "seconds": round(seconds, 2),
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _versions(),
    }
    figures = {
        bundle.TRAINING_FIGURE: plots.training_png(summary["history"]),
        bundle.EXPERTS_FIGURE: plots.experts_png(load.history, load.final),
    }
    _raise_if_interrupted()
    if summary["distribution"]["chief"]:  # other workers leave it alone
        bundle.save_bundle(
            config.output, model, tokenizer, config.max_seq_len, summary,
            figures,
        )  # fmt: skip
    return summary


def _raise_if_interrupted(*_, **__):
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt


def _stop_on_interrupt():
    import keras

    return keras.callbacks.LambdaCallback(
        on_train_batch_end=_raise_if_interrupted,
        on_epoch_end=_raise_if_interrupted,
    )


def _on_sigint(signum, frame):
    INTERRUPTED.set()
    raise KeyboardInterrupt


def _ignore_dropped_interrupts(unraisable):
    # `sys.unraisablehook` while `main` runs: an interrupt Python had to drop
    # is handled through `INTERRUPTED`, so it is not an error to print.
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):
        sys.__unraisablehook__(unraisable)


def jit_compile(config: Config) -> bool | str:
    """`keras.Model.compile`'s `jit_compile` for `config.jit_compile`.

    `"auto"` is Keras's own rule (no XLA on CPU-only TensorFlow or under a
    `tf.distribute` strategy, `jit` on JAX). Measured on 2 CPU cores
    (`bench/training_throughput.py`, alice.txt): with 32 steps per
    execution XLA gives the pooled model about 1.3x the pairs per
    CPU-second (about the same wall-clock pairs/s), since its step is
    dominated by per-op overhead that XLA fuses (the MoE layer switches to
    its static padded-block dispatch, same outputs), but compiling the train
    and evaluation steps costs tens of seconds, more than a default 5-epoch
    run on alice.txt saves; it made the transformer 3-5x slower.
    """
    if config.jit_compile == "auto":
        return "auto"
    return config.jit_compile == "on"


def build(config: Config, vocab_size: int):
    """The uncompiled model of `config.architecture`."""
    from moe.lm import architectures

    config = with_defaults(config)
    shared = dict(
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
        return architectures.build_transformer_model(
            **shared,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            dropout=config.dropout,
        )
    return architectures.build_model(**shared)


def summary_line(summary: dict) -> str:
    val = summary["validation"]
    return (
        f"vocabulary {summary['vocab_size']} | pairs "
        f"{summary['pairs']['train']} train, "
        f"{summary['pairs']['validation']} validation | "
        f"{summary['epochs_run']} epochs in {summary['seconds']:.1f} s | "
        f"val top-1 {val['accuracy']:.3f}, top-5 {val['top5_accuracy']:.3f}, "
        f"perplexity {val['perplexity']:.1f} | {_saved_where(summary)}"
    )


def _saved_where(summary: dict) -> str:
    where = summary.get("distribution", {"chief": True})
    if where["chief"]:
        return f"saved to {summary['config']['output']}"
    return f"not saved by {where['task']}: the chief writes the bundle"


def _versions() -> dict:
    import platform

    import keras
    import numpy
    import tensorflow

    import moe

    return {
        "python": platform.python_version(),
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "tensorflow": tensorflow.__version__,
        "numpy": numpy.__version__,
        "moe": moe.__version__,
    }


@contextlib.contextmanager
def _quiet_stderr():
    """Hides the C++ log lines TensorFlow prints while it loads."""
    if not _QUIET_TF:
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
        import tensorflow as tf

        tf.config.list_logical_devices()  # device set-up logs here
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    INTERRUPTED.clear()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, _on_sigint)
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _ignore_dropped_interrupts
    try:
        return _main(argv)
    finally:
        sys.unraisablehook = previous_hook
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _main(argv: list[str] | None) -> int:
    config = parse_args(argv)
    try:
        validate(config)  # before the slow imports
    except ConfigError as e:
        print(f"model.py: error: {e}", file=sys.stderr)
        return 1
    try:
        with _quiet_stderr():
            from moe.lm import distribute
            from moe.lm.bundle import BundleError
            from moe.lm.corpus import CorpusError

            # A cluster is joined before TensorFlow sets up its devices.
            strategy = distribute.make_strategy(config.strategy)
        summary = train(config, strategy=strategy)
    except (
        ConfigError,
        CorpusError,
        BundleError,
        distribute.StrategyError,
        OSError,
    ) as e:
        print(f"model.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"model.py: interrupted; {config.output} left unchanged",
            file=sys.stderr,
        )
        return 130
    print(summary_line(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
