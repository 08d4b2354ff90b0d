"""Training throughput of model.py's real pipeline: tokenize, tf.data, fit.

Reuses what `model.py` runs (`moe.lm.training.train`: `TrainingConfig`,
`load_corpus`, `prepare_data`, `make_datasets`, `build`) and
`moe.lm.model.architectures.compile_model`, and calls `model.fit` exactly as
`training.train` does (validation included), with a callback that times each
epoch's training steps. Reported per configuration:

- data preparation: reading the corpus + `Tokenizer.fit` + token stream +
  pair positions (`prepare_data`), and building the tf.data pipelines;
- next-word pairs/s during `fit`: epoch 1 (includes tracing) and the steady
  state (median of the later epochs), training steps only;
- the FLOP bound: the output softmax costs about `6 x embed_dim x vocab`
  FLOP per pair (forward + backward); the machine's achievable matmul FLOP/s
  is measured in the same process (a TensorFlow 1024^3 matmul), so
  `bound = flops_per_s / (6 x embed_dim x vocab)` pairs/s and the run
  reaches `pairs_per_s / bound` of it.

Configurations: `seed` (a small model: embedding 32, 4 experts, expert
hidden 64) and `default` (model.py's defaults: embedding 64, 4 experts,
hidden 128); both use model.py's default `--max-seq-len 1` and
`--batch-size 64` unless given. Target: >= 15k pairs/s with the `seed`
sizes on 2 cores.

Usage:
    python bench/training_throughput.py            # alice.txt, ~2 min
    python bench/training_throughput.py --corpus book.txt --epochs 4
    python bench/training_throughput.py --quick    # built-in corpus, seconds
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO_ROOT = Path(__file__).resolve().parent.parent

import keras  # noqa: E402

from moe.lm.training import train  # noqa: E402
from moe.lm.training.config import (  # noqa: E402
    TrainingConfig,
    with_defaults,
)
from moe.lm.training.datasets import (  # noqa: E402
    load_corpus,
    make_datasets,
    prepare_data,
)
from moe.lm.training.resolve import validate  # noqa: E402

DEFAULT_CORPUS = REPO_ROOT.parent / "shared" / "corpora" / "alice.txt"
CONFIGS = {
    "seed": {"embed_dim": 32, "num_experts": 4, "hidden_dim": 64},
    "default": {},
}


def matmul_flops_per_s(size=1024, repeats=7):
    """Achievable float32 matmul FLOP/s (median of `repeats` runs)."""
    import tensorflow as tf

    a = tf.random.normal((size, size))
    b = tf.random.normal((size, size))
    matmul = tf.function(lambda a, b: tf.reduce_sum(tf.matmul(a, b)))
    matmul(a, b).numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).numpy()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def run_config(name, overrides, steps_per_execution, args, flops_per_s):
    from moe.lm.model import architectures

    config = TrainingConfig(
        corpus=[str(args.corpus)] if args.corpus else None,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_seq_len=args.max_seq_len,
        jit_compile=args.jit_compile,
        seed=1337,
        **overrides,
    )
    validate(config)
    config = with_defaults(config)
    start = time.perf_counter()
    texts = load_corpus(config)
    tokenizer, tokens, starts, train_pos, val_pos = prepare_data(config, texts)
    prepare_s = time.perf_counter() - start
    start = time.perf_counter()
    keras.utils.set_random_seed(config.seed)
    train_ds, val_ds = make_datasets(config, tokens, starts, train_pos, val_pos)
    dataset_s = time.perf_counter() - start
    model = train.build(config, tokenizer.vocab_size)
    architectures.compile_model(
        model,
        config.learning_rate,
        steps_per_execution=steps_per_execution,
        jit_compile=train.jit_compile(config),
    )
    timer = EpochTimer()
    model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=config.epochs,
        callbacks=[timer],
        shuffle=False,
        verbose=0,
    )
    pairs = len(train_pos)
    rates = [pairs / s for s in timer.train_seconds]
    steady = statistics.median(rates[1:]) if len(rates) > 1 else rates[0]
    cpu_rates = [pairs / s for s in timer.cpu_seconds]
    cpu_steady = (
        statistics.median(cpu_rates[1:]) if len(cpu_rates) > 1 else cpu_rates[0]
    )
    flop_per_pair = 6 * config.embed_dim * tokenizer.vocab_size
    bound = flops_per_s / flop_per_pair
    return {
        "config": name,
        "embed_dim": config.embed_dim,
        "num_experts": config.num_experts,
        "hidden_dim": config.hidden_dim,
        "max_seq_len": config.max_seq_len,
        "batch_size": config.batch_size,
        "steps_per_execution": steps_per_execution,
        "jit_compile": train.jit_compile(config),
        "vocab_size": tokenizer.vocab_size,
        "tokens": int(len(tokens)),
        "train_pairs": pairs,
        "prepare_s": prepare_s,
        "dataset_s": dataset_s,
        "epoch_train_s": timer.train_seconds,
        "first_epoch_pairs_per_s": rates[0],
        "steady_pairs_per_s": steady,
        "steady_pairs_per_cpu_s": cpu_steady,
        "softmax_flop_per_pair": flop_per_pair,
        "flop_bound_pairs_per_s": bound,
        "fraction_of_flop_bound": steady / bound,
    }


class EpochTimer(keras.callbacks.Callback):
    """Seconds of each epoch's training steps (validation excluded)."""

    def __init__(self):
        super().__init__()
        self.train_seconds = []
        self.cpu_seconds = []  # process CPU time: less noisy when shared
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = (time.perf_counter(), time.process_time())

    def on_test_begin(self, logs=None):
        # This epoch's validation starts: its training steps are done.
        if self._start is not None:
            self.train_seconds.append(time.perf_counter() - self._start[0])
            self.cpu_seconds.append(time.process_time() - self._start[1])
            self._start = None

    def on_epoch_end(self, epoch, logs=None):
        self.on_test_begin()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="built-in corpus, seed sizes, 2 epochs (seconds)",
    )
    parser.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help=f"text file (default: {DEFAULT_CORPUS} if present, else the "
        "built-in corpus)",
    )
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=1)
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=sorted(CONFIGS),
        default=None,
        help="which sizes to run (default: seed default; --quick: seed)",
    )
    parser.add_argument(
        "--steps-per-execution",
        type=int,
        nargs="+",
        default=None,
        help="compile with each of these (default: 1 32; --quick: 1). "
        "model.py uses 32",
    )
    parser.add_argument(
        "--jit-compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="as model.py's flag (auto: XLA on TensorFlow)",
    )
    parser.add_argument("--json", type=Path, help="write results here")
    args = parser.parse_args(argv)
    if args.corpus is not None and not args.corpus.is_file():
        parser.exit(2, f"{parser.prog}: error: no such file: {args.corpus}\n")
    if args.quick:
        args.epochs = args.epochs or 2
        args.configs = args.configs or ["seed"]
        args.steps_per_execution = args.steps_per_execution or [1]
    else:
        if args.corpus is None and DEFAULT_CORPUS.is_file():
            args.corpus = DEFAULT_CORPUS
        args.epochs = args.epochs or 4
        args.configs = args.configs or ["seed", "default"]
        args.steps_per_execution = args.steps_per_execution or [1, 32]

    flops_per_s = matmul_flops_per_s()
    print(
        f"# corpus={args.corpus or 'built-in'} epochs={args.epochs} "
        f"batch={args.batch_size} max_seq_len={args.max_seq_len} "
        f"jit_compile={args.jit_compile}; "
        f"matmul {flops_per_s / 1e9:.1f} GFLOP/s; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    results = [
        run_config(name, CONFIGS[name], spe, args, flops_per_s)
        for name in args.configs
        for spe in args.steps_per_execution
    ]
    print(
        f"{'config':<9}{'spe':>4}{'vocab':>7}{'pairs':>8}{'prep s':>8}"
        f"{'epoch 1/s':>11}{'steady/s':>10}{'/cpu-s':>9}{'bound/s':>10}"
        f"{'of bound':>10}"
    )
    for r in results:
        print(
            f"{r['config']:<9}{r['steps_per_execution']:>4}"
            f"{r['vocab_size']:>7}{r['train_pairs']:>8}"
            f"{r['prepare_s'] + r['dataset_s']:>8.2f}"
            f"{r['first_epoch_pairs_per_s']:>11,.0f}"
            f"{r['steady_pairs_per_s']:>10,.0f}"
            f"{r['steady_pairs_per_cpu_s']:>9,.0f}"
            f"{r['flop_bound_pairs_per_s']:>10,.0f}"
            f"{r['fraction_of_flop_bound']:>10.1%}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "corpus": str(args.corpus or "built-in"),
                    "epochs": args.epochs,
                    "matmul_flops_per_s": flops_per_s,
                    "results": results,
                },
                indent=2,
            )
        )
    return results


if __name__ == "__main__":
    main()
