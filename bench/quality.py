"""Held-out next-word accuracy at equal training time (issue #4).

Contenders, all on the same tokenizer and the same split (the held-out tail
is the last `--validation-split` of the corpus, as in `model.py`):
- `bigram`: counts of (previous word of the sentence, next word) on the
  training part; predicts the most frequent follower among real words
  (unigram counts where the previous word was never seen). Counting, no
  training time.
- `trigram`: the same with the two previous words, backing off to the
  bigram where those two were never seen together: how much a longer
  context can give at this corpus size, from counts alone.
- `pooled`: `model.py` defaults (the card's pooled trunk, context 1).
- `moe_transformer`: `model.py --architecture transformer` defaults.
- `dense_transformer`: the same Transformer with a dense feed-forward layer
  of the same *active* parameters: one expert of width top_k x hidden_dim,
  `--routing soft` (one expert, weight 1: exactly a dense FFN).

Each neural model is trained by `moe.lm.training.train.train` (same data
pipeline, Adam, early stopping on validation loss with the best weights
restored) with a budget of `--seconds` of training time: a callback stops
training when the time spent in training steps passes the budget
(validation passes and the first step, which traces the graph, are not
counted). Every model trains
with `--seed`, so a rerun differs only by how many steps fit in the time.

- `kn3`, `kn4`, `kn5`: interpolated modified Kneser-Ney of order 3 to 5
  (`moe.lm.analysis.baselines.KneserNey`), with perplexity.

With `--books DIR` the split is by whole book (`moe.lm.text.book_split`): the
vocabulary and counts come from the training books, and the count
baselines are scored on every target of the validation book and of the
test book; the neural models of that split are `bench/moe_vs_dense.py`'s.

Usage:
    python bench/quality.py --books ../shared/corpora/sherlock --json x.json
    python bench/quality.py                   # ~2 min on 2 CPU cores
    python bench/quality.py --quick           # 15 s per model, ~2 min
    python bench/quality.py --seconds 120 --json /tmp/quality.json
    python bench/quality.py --transformer-flags="--num-layers 3"
"""

import argparse
import json
import os
import platform
import shlex
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO_ROOT = Path(__file__).resolve().parent.parent

import keras  # noqa: E402
import numpy as np  # noqa: E402

from moe.lm import cli  # noqa: E402
from moe.lm.analysis.baselines import (  # noqa: E402
    KneserNey,
    ngram_baseline,
)
from moe.lm.text import book_split, corpus  # noqa: E402
from moe.lm.training import train  # noqa: E402
from moe.lm.training.datasets import load_corpus, prepare_data  # noqa: E402

DEFAULT_CORPUS = REPO_ROOT.parent / "shared" / "corpora" / "alice.txt"
# The dense control's one-expert router: its softmax over one logit is 1 on
# purpose.
warnings.filterwarnings("ignore", message="You are using a softmax over axis")


class TrainingTimeBudget(keras.callbacks.Callback):
    """Stops `fit` once the time spent in training steps passes `seconds`.

    The clock runs from the end of the first training call (which traces
    and compiles the step) and pauses during validation; it is checked
    once per `steps_per_execution` steps.
    """

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds
        self.spent = 0.0
        self.steps = 0
        self._since = None

    def on_train_batch_end(self, batch, logs=None):
        # With `steps_per_execution` > 1 Keras calls this once per
        # execution; the optimizer counts the steps themselves (an epoch's
        # last execution may run fewer than `steps_per_execution`).
        now = time.perf_counter()
        self.steps = int(self.model.optimizer.iterations)
        if self._since is not None:
            self.spent += now - self._since
        self._since = now
        if self.spent >= self.seconds:
            self.model.stop_training = True

    def on_test_begin(self, logs=None):
        self._since = None  # validation is not training time

    def on_epoch_begin(self, epoch, logs=None):
        if epoch > 0:
            self._since = time.perf_counter()


def contender_flags(transformer_flags: list[str]) -> dict[str, list[str]]:
    """`model.py` flags of each neural contender."""
    moe_flags = ["--architecture", "transformer", *transformer_flags]
    moe_config = cli.parse_training_args(moe_flags)
    top_k = moe_config.top_k or 2
    dense_flags = moe_flags + [
        "--num-experts", "1", "--top-k", "1", "--routing", "soft",
        "--hidden-dim", str(top_k * moe_config.hidden_dim),
        "--aux-loss-weight", "0",
    ]  # fmt: skip
    if moe_config.routing not in ("top_k",):
        raise SystemExit(
            "quality.py: error: the dense control matches top_k routing; "
            f"got --routing {moe_config.routing}"
        )
    return {
        "pooled": [],
        "moe_transformer": moe_flags,
        "dense_transformer": dense_flags,
    }


def parameter_counts(model) -> dict:
    """Total parameters, and those one position uses (active)."""
    import moe

    total = model.count_params()
    inactive = 0
    for layer in model.layers:
        moe_layer = getattr(layer, "moe", layer)  # a block's MoE layer
        if isinstance(moe_layer, moe.MoELayer) and moe_layer.routing != "soft":
            per_expert = sum(
                int(np.prod(w.shape[1:])) for w in moe_layer.expert_weights
            )
            idle = moe_layer.num_experts - moe_layer.experts_per_input
            inactive += idle * per_expert
    return {"total": total, "active": total - inactive}


def train_contender(name, flags, args, workdir) -> dict:
    config = cli.parse_training_args(
        [
            "--corpus", str(args.corpus),
            "--seed", str(args.seed),
            "--validation-split", str(args.validation_split),
            "--epochs", str(args.epochs),
            "--output", str(Path(workdir) / name),
            *flags,
        ]
    )  # fmt: skip
    budget = TrainingTimeBudget(args.seconds)
    summary = train.train(config, verbose=0, callbacks=[budget])
    from moe.lm.bundle.save_load import load_bundle

    params = parameter_counts(load_bundle(config.output).model)
    return {
        "flags": flags,
        **summary["validation"],
        "params": params,
        "steps": budget.steps,
        "epochs": summary["epochs_run"],
        "train_seconds": round(budget.spent, 1),
        "max_seq_len": summary["config"]["max_seq_len"],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--corpus", type=Path, default=DEFAULT_CORPUS, help="text to use"
    )
    parser.add_argument(
        "--seconds", type=float, default=150.0,
        help="training time budget of each neural model",
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true", help="15 s per model (smoke run)"
    )
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--validation-split", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument(
        "--transformer-flags", default="",
        help="extra model.py flags for both Transformers (quoted)",
    )  # fmt: skip
    parser.add_argument(
        "--only", nargs="+", help="contenders to run (default: all)"
    )
    parser.add_argument("--json", type=Path, help="write results here")
    parser.add_argument(
        "--books", type=Path,
        help="a folder of books: count baselines on a whole-book split",
    )  # fmt: skip
    parser.add_argument("--validate-book", default="his_last_bow")
    parser.add_argument("--test-book", default="the_hound_of_the_baskervilles")
    args = parser.parse_args(argv)
    if args.books:
        return book_baselines(args)
    if args.quick:
        args.seconds = 15.0
    if not args.corpus.is_file():
        parser.error(f"no corpus at {args.corpus}; pass --corpus PATH")

    started = time.perf_counter()
    config = cli.parse_training_args(
        ["--corpus", str(args.corpus),
         "--validation-split", str(args.validation_split)]
    )  # fmt: skip
    tokenizer, tokens, starts, train_pos, val_pos = prepare_data(
        config, load_corpus(config)
    )
    print(
        f"{args.corpus.name}: {len(tokens)} words, vocabulary "
        f"{tokenizer.vocab_size}, {len(train_pos)} training / "
        f"{len(val_pos)} held-out targets; {args.seconds:g} s of training "
        "per model",
        flush=True,
    )
    results = {}
    for name, order in (("bigram", 2), ("trigram", 3)):
        if not args.only or name in args.only:
            results[name] = {
                "flags": None,
                **ngram_baseline(tokens, starts, train_pos, val_pos, order),
            }
            _print_row(name, results[name])
    for order in (3, 4, 5):
        name = f"kn{order}"
        if not args.only or name in args.only:
            kn = KneserNey(
                tokens, starts, train_pos, order, tokenizer.vocab_size
            )
            results[name] = {
                "flags": None, **kn.evaluate(tokens, starts, val_pos)
            }  # fmt: skip
            _print_row(name, results[name])
    flags = contender_flags(shlex.split(args.transformer_flags))
    with tempfile.TemporaryDirectory(prefix="quality-") as workdir:
        for name, contender in flags.items():
            if args.only and name not in args.only:
                continue
            results[name] = train_contender(name, contender, args, workdir)
            _print_row(name, results[name])

    print()
    print(markdown_table(results))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "corpus": str(args.corpus),
                    "seconds": args.seconds,
                    "seed": args.seed,
                    "validation_split": args.validation_split,
                    "tokens": len(tokens),
                    "vocab_size": tokenizer.vocab_size,
                    "targets": {
                        "train": len(train_pos),
                        "held_out": len(val_pos),
                    },
                    "results": results,
                    "machine": {
                        "platform": platform.platform(),
                        "cpus": os.cpu_count(),
                        "keras": keras.__version__,
                        "backend": keras.backend.backend(),
                    },
                },
                indent=2,
            )
        )


def book_baselines(args) -> None:
    """The count baselines on a whole-book split, validation and test."""
    split = book_split.split_books(
        args.books, args.validate_book, args.test_book
    )
    config = cli.parse_training_args(
        ["--corpus", *map(str, split.train),
         "--validation-corpus", str(split.validate)]
    )  # fmt: skip
    data = prepare_data(config, load_corpus(config))
    # The test book appended as a stream of its own, same vocabulary.
    test_tokens, test_starts = corpus.token_stream(
        data.tokenizer, [corpus.read_text(split.test)]
    )
    tokens = np.concatenate([data.tokens, test_tokens])
    starts = np.concatenate([data.starts, test_starts + len(data.tokens)])
    test_pos = corpus.pair_positions(test_starts) + len(data.tokens)
    held_out = {"validation": data.val_positions, "test": test_pos}
    print(
        f"{len(split.train)} training books, {len(data.train_positions)} "
        f"targets; validation {split.validate.name} "
        f"{len(data.val_positions)}, test {split.test.name} "
        f"{len(test_pos)}; vocabulary {data.tokenizer.vocab_size}",
        flush=True,
    )
    results = {}
    for name, order in (("bigram", 2), ("trigram", 3)):
        results[name] = {
            part: ngram_baseline(
                tokens, starts, data.train_positions, positions, order
            )
            for part, positions in held_out.items()
        }
        print(name, results[name], flush=True)
    for order in (3, 4):  # 5 gives no more than 4 here (bench/README.md)
        kn = KneserNey(
            tokens, starts, data.train_positions, order,
            data.tokenizer.vocab_size,
        )  # fmt: skip
        results[f"kn{order}"] = {
            part: kn.evaluate(tokens, starts, positions)
            for part, positions in held_out.items()
        }
        print(f"kn{order}", results[f"kn{order}"], flush=True)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "books": str(args.books),
                    "train": [p.name for p in split.train],
                    "validate": split.validate.name,
                    "test": split.test.name,
                    "vocab_size": data.tokenizer.vocab_size,
                    "results": results,
                },
                indent=2,
            )
        )


def _print_row(name, result):
    line = (
        f"{name}: top-1 {result['accuracy']:.3f}, "
        f"top-5 {result['top5_accuracy']:.3f}"
    )
    if "perplexity" in result:
        line += f", perplexity {result['perplexity']:.1f}"
    if "steps" in result:
        line += (
            f", {result['steps']} "
            f"steps / {result['epochs']} epochs in "
            f"{result['train_seconds']:.0f} s"
        )
    print(line, flush=True)


def markdown_table(results) -> str:
    rows = [
        "| model | params (active) | steps (epochs) | top-1 | top-5 | "
        "perplexity |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if "steps" in r:
            params = f"{r['params']['total']:,} ({r['params']['active']:,})"
            steps = f"{r['steps']} ({r['epochs']})"
            perplexity = f"{r['perplexity']:.1f}"
        else:
            params = steps = "-"
            perplexity = f"{r['perplexity']:.1f}" if "perplexity" in r else "-"
        rows.append(
            f"| {name} | {params} | {steps} | {r['accuracy']:.3f} | "
            f"{r['top5_accuracy']:.3f} | {perplexity} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
