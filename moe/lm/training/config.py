"""`TrainingConfig`: every setting of a training run, and their checks.

One field per `model.py` flag, with its help text and argparse options
(`moe.lm.cli.training_parser` builds the flags from them). `check`
checks what this module owns without TensorFlow, so the command line
answers at once; the MoE settings are the layers' to check, when
`moe.lm.training.train.train` builds the model.
"""

import dataclasses
import importlib.util
import math
import os
from pathlib import Path

from moe.lm.bundle.folder import OutputLock, check_output
from moe.lm.bundle.layout import MAX_SEQ_LEN
from moe.lm.errors import ConfigError
from moe.lm.model.architectures import ARCHITECTURES, TRAIN_POSITIONS
from moe.lm.model.quantize_model import QUANTIZE_MODES
from moe.lm.text.tokenizer import check_vocab_size
from moe.lm.training import data_parallel, recipe

JIT_COMPILE = ("auto", "on", "off")
# The held-out fraction of the corpus without `validation_corpus`.
VALIDATION_SPLIT = 0.1
# `keras.utils.set_random_seed` takes NumPy's seed range.
MAX_SEED = 2**32 - 1


def setting(default, help: str, **flag):
    """A `TrainingConfig` field: its default, help text and argparse options."""
    return dataclasses.field(default=default, metadata={"help": help, **flag})


def per_architecture(name: str) -> str:
    """`"default: 1 for pooled, 8 for transformer"`: the architectures'
    defaults of setting `name`, from `ARCHITECTURES`."""
    shown = (
        f"{value:g}" if isinstance(value, float) else str(value)
        for value in (getattr(d, name) for d in ARCHITECTURES.values())
    )
    return "default: " + ", ".join(
        f"{value} for {architecture}"
        for value, architecture in zip(shown, ARCHITECTURES)
    )


@dataclasses.dataclass
class TrainingConfig:
    """Training settings; each field is the `model.py` flag of the same name.

    `None` means "the architecture's default" (`ARCHITECTURES`) or, for the
    MoE settings, the layer's own default.
    """

    corpus: list[str] | None = setting(
        None,
        "text files to train on (default: the built-in corpus)",
        nargs="+",
        metavar="PATH",
    )
    encoding: str = setting("utf-8", "text encoding of the corpus files")
    # Held-out data (moe.lm.text.book_split makes whole-book splits).
    validation_corpus: list[str] | None = setting(
        None,
        "text files held out for validation, whole (default: the last "
        "--validation-split of the corpus); the vocabulary comes from "
        "--corpus alone",
        nargs="+",
        metavar="PATH",
    )
    epochs: int = setting(
        40, "most passes over the training data (early stopping may end sooner)"
    )
    batch_size: int = setting(
        64,
        "examples per training step: (context, next word) pairs, or windows "
        "with --train-positions all",
    )
    steps_per_execution: int = setting(
        32,
        "training steps per compiled call: fewer Python round trips per step "
        "(a small model's main cost); always 1 under --strategy",
    )
    jit_compile: str = setting(
        "auto",
        "XLA-compile the training step. auto: Keras's rule (off on CPU); on: "
        "faster steps after a long compile, so it pays on long runs only "
        "(see bench/README.md)",
        choices=JIT_COMPILE,
    )
    architecture: str = setting(
        "pooled",
        "pooled: the average of the context embeddings feeds one MoE layer; "
        "transformer: causal Transformer blocks with an MoE feed-forward "
        "layer each",
        choices=tuple(ARCHITECTURES),
    )
    max_seq_len: int | None = setting(
        None,
        "context window: how many preceding words the model sees, at most "
        f"{MAX_SEQ_LEN} ({per_architecture('max_seq_len')})",
        type=int,
    )
    train_positions: str | None = setting(
        None,
        "transformer: learn the next word at every position of a window of "
        "--max-seq-len words (all), or only after each whole context (last, "
        "as serving asks; pooled always does). all sees each word once per "
        "epoch, as last does, in fewer, larger steps "
        f"({per_architecture('train_positions')})",
        choices=TRAIN_POSITIONS,
    )
    vocab_size: int = setting(
        5000,
        "vocabulary cap, padding and out-of-vocabulary ids included; rarer "
        "words become out-of-vocabulary",
    )
    embed_dim: int = setting(
        64, "word embedding width (the Transformer's width)"
    )
    num_layers: int = setting(2, "transformer: Transformer blocks")
    num_heads: int = setting(
        4, "transformer: attention heads (must divide --embed-dim)"
    )
    dropout: float = setting(
        0.1, "transformer: dropout rate of attention and residuals"
    )
    num_experts: int = setting(4, "experts in each MoE layer")
    top_k: int | None = setting(
        None,
        "experts per context (default: the routing's own: 2 for top_k, 1 for "
        "switch, all for soft)",
        type=int,
    )
    routing: str = setting(
        "top_k",
        "MoE routing: a `routing` of moe.MoELayer (top_k, switch, soft, ...; "
        "see docs/layers.md)",
    )
    hidden_dim: int = setting(128, "hidden width of each expert")
    capacity_factor: float | None = setting(
        None,
        "expert capacity factor (default: dropless; 2 for expert_choice)",
        type=float,
    )
    num_groups: int | None = setting(
        None,
        "expert groups of --routing hierarchical (must divide --num-experts)",
        type=int,
    )
    num_shared_experts: int = setting(
        0, "always-on shared experts added to the routed ones"
    )
    aux_loss_weight: float = setting(
        0.01, "weight of the load-balancing loss (0 disables it)"
    )
    learning_rate: float | None = setting(
        None,
        f"peak learning rate ({per_architecture('learning_rate')})",
        type=float,
    )
    validation_split: float | None = setting(
        None,
        "held-out fraction at the end of the corpus, in (0, 1) (default: "
        f"{VALIDATION_SPLIT}; not with --validation-corpus)",
        type=float,
    )
    patience: int = setting(
        3, "epochs without val_loss improvement before stopping"
    )
    seed: int = setting(
        1337,
        f"random seed, 0 to {MAX_SEED}: same seed, same vocabulary and metrics",
    )
    strategy: str = setting(
        "none",
        "data-parallel training (TensorFlow backend): mirrored over this "
        "machine's GPUs (or CPU devices), or multi-worker across the machines "
        "in TF_CONFIG; --batch-size is the global batch",
        choices=data_parallel.STRATEGIES,
    )
    output: str = setting(
        "saved_model",
        "folder to write the model bundle to: new, empty, or holding a bundle",
        metavar="DIR",
    )
    tensorboard: str | None = setting(
        None, "also log to TensorBoard in DIR, with per-expert load",
        metavar="DIR",
    )  # fmt: skip
    # Starting point: a saved bundle to continue or upcycle
    # (moe.lm.training.finetune).
    init_from: str | None = setting(
        None,
        "continue training the bundle in DIR on the corpus: its vocabulary "
        "(new words are out-of-vocabulary), context window and model "
        "settings are kept (a flag that contradicts them is refused)",
        metavar="DIR",
    )
    upcycle_from: str | None = setting(
        None,
        "start the MoE model from the dense bundle in DIR (trained with "
        "--num-experts 1): every expert a copy of its feed-forward network, "
        "the router new; its sizes and vocabulary are kept",
        metavar="DIR",
    )
    freeze: str | None = setting(
        None,
        "with --init-from or --upcycle-from: parts left untrained, "
        "comma-separated among experts, router, embeddings, shared",
        metavar="PARTS",
    )

    # --- The saved bundle's number format (moe.lm.model.quantize_model) ---
    quantize: str = setting(
        "none",
        "store the trained model quantized: the embeddings, the output "
        "layer, the attention and the experts' kernels (per expert and "
        "output channel) in int8, the routers in float32; serve.py serves it "
        "as it is. int8: Keras's int8 (inputs quantized too, int8 matmuls); "
        "int8-weights: int8 weights, float matmuls (faster on CPU, see "
        "bench/README.md)",
        choices=QUANTIZE_MODES,
    )

    # Optimiser recipe (moe.lm.training.recipe): None is the architecture's
    # default.
    optimizer: str | None = setting(
        None,
        "adam, or adamw: Adam with decoupled weight decay "
        f"({per_architecture('optimizer')})",
        choices=recipe.OPTIMIZERS,
    )
    weight_decay: float | None = setting(
        None,
        f"adamw's decoupled weight decay ({per_architecture('weight_decay')})",
        type=float,
    )
    clip_norm: float | None = setting(
        None,
        "clip the gradients to this global norm, 0 for none "
        f"({per_architecture('clip_norm')})",
        type=float,
    )
    warmup_steps: int | None = setting(
        None,
        "steps of linear learning-rate warmup from 0 "
        f"({per_architecture('warmup_steps')})",
        type=int,
    )
    lr_schedule: str | None = setting(
        None,
        "after warmup: constant, or cosine decay to 0 at the end of the run "
        "(--epochs, --max-steps or --max-minutes, whichever ends first; "
        f"{per_architecture('lr_schedule')})",
        choices=recipe.LR_SCHEDULES,
    )
    ema: float | None = setting(
        None,
        "momentum of an exponential moving average of the weights, which "
        "is validated, kept by early stopping and saved; 0 for none "
        f"({per_architecture('ema')})",
        type=float,
    )
    max_steps: int | None = setting(
        None,
        "stop after this many training steps (checked every "
        "--steps-per-execution steps); the best weights are saved",
        type=int,
    )
    max_minutes: float | None = setting(
        None,
        "stop after this many minutes of training (validation included); "
        "the best weights are saved",
        type=float,
    )


def check(config: TrainingConfig) -> None:
    """Checks the settings this module owns, and the output and log folders.

    `config` holds the model settings of the bundle it starts from, if any
    (`moe.lm.training.resolve.validate` checks the flags as given).

    No TensorFlow: it answers at once. The MoE settings are checked by the
    layers themselves when `train` builds the model.

    Raises:
        ConfigError: the first invalid setting, naming its flag.
        moe.lm.bundle.layout.BundleError: `output` may not be written, or
            another run is writing it (`BundleBusyError`).
    """
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            _fail(field.name, "must be a finite number", value)
    for name in ("epochs", "batch_size", "steps_per_execution", "patience"):
        if getattr(config, name) < 1:
            _fail(name, "must be at least 1", getattr(config, name))
    if config.max_seq_len is not None and not (
        1 <= config.max_seq_len <= MAX_SEQ_LEN
    ):
        _fail("max_seq_len", f"must be between 1 and {MAX_SEQ_LEN}",
              config.max_seq_len)  # fmt: skip
    try:
        check_vocab_size(config.vocab_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_choice("architecture", tuple(ARCHITECTURES), config.architecture)
    _check_choice("jit_compile", JIT_COMPILE, config.jit_compile)
    _check_choice("quantize", QUANTIZE_MODES, config.quantize)
    positions = config.train_positions
    if positions is not None:
        _check_choice("train_positions", TRAIN_POSITIONS, positions)
    if positions == "all" and config.architecture != "transformer":
        _fail("train_positions", '"all" needs `architecture` "transformer" '
              "(pooled predicts once per context)", positions)  # fmt: skip
    if config.num_layers < 1:
        _fail("num_layers", "must be at least 1", config.num_layers)
    if config.learning_rate is not None and not config.learning_rate > 0:
        _fail("learning_rate", "must be positive", config.learning_rate)
    split = config.validation_split
    if split is not None and not 0 < split < 1:
        _fail("validation_split", "must be between 0 and 1 (exclusive)",
              split)  # fmt: skip
    if split is not None and config.validation_corpus:
        _fail("validation_split", "holds out the end of `corpus`; "
              "`validation_corpus` holds out its files instead: give one "
              "or the other", split)  # fmt: skip
    optimizer = config.optimizer or ARCHITECTURES[config.architecture].optimizer
    for name, rule in recipe.check(config, optimizer):
        _fail(name, rule, getattr(config, name))
    if not 0 <= config.seed <= MAX_SEED:
        _fail("seed", f"must be between 0 and {MAX_SEED}", config.seed)
    try:
        task = data_parallel.check_strategy(config.strategy)
    except data_parallel.StrategyError as e:
        raise ConfigError(str(e)) from None
    _check_tensorboard(config.tensorboard)
    output = check_output(config.output)
    if task is None or task.is_chief:  # only the chief writes
        OutputLock(output).check_free()
    for path in (config.corpus or []) + (config.validation_corpus or []):
        if Path(os.path.realpath(path)).is_relative_to(output):
            _fail("corpus", f"must not be inside `output` ({config.output}): "
                  "the new bundle replaces that folder", path)  # fmt: skip


def _fail(name: str, rule: str, value) -> None:
    shown = repr(value) if isinstance(value, str) else value
    raise ConfigError(f"`{name}` {rule}. Received: {name}={shown}")


def _check_choice(name: str, choices: tuple, value) -> None:
    if value not in choices:
        _fail(name, f"must be one of {', '.join(choices)}", value)


def _check_tensorboard(log_dir: str | None) -> None:
    if log_dir is None:
        return
    if importlib.util.find_spec("tensorboard") is None:
        _fail("tensorboard", "needs the tensorboard package (pip install "
              "tensorboard)", log_dir)  # fmt: skip
    path = Path(log_dir)
    if path.exists() and not path.is_dir():
        _fail("tensorboard", "must be a folder, not a file", log_dir)
    existing = next(p for p in [path, *path.absolute().parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        _fail("tensorboard", f"must be writable ({existing} is not)", log_dir)


def with_defaults(config: TrainingConfig) -> TrainingConfig:
    """`config` with the architecture's defaults for its unset fields.

    Adam has no weight decay: its run records 0 (`check` refuses a decay
    given with it). With `validation_corpus`, `validation_split` stays
    `None` (unused).
    """
    defaults = dataclasses.asdict(ARCHITECTURES[config.architecture])
    unset = {k: v for k, v in defaults.items() if getattr(config, k) is None}
    if config.validation_split is None and not config.validation_corpus:
        unset["validation_split"] = VALIDATION_SPLIT
    config = dataclasses.replace(config, **unset)
    if config.optimizer == "adam":
        config = dataclasses.replace(config, weight_decay=0.0)
    return config
