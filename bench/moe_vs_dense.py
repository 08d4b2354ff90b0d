"""MoE against dense Transformers on a whole-book split (issue 17).

Trains `model.py --architecture transformer` models on the training books
of `--books` (`moe.lm.book_split`: one book validates, one tests, the rest
train), each for the same `--max-steps` (and/or `--max-minutes`), and
reports held-out perplexity and top-1 on the validation book and on the
test book. `--experts 1` is the dense control at equal active parameters:
one expert of width `top_k x --hidden-dim` (`--routing soft` over one
expert: exactly a dense FFN); any other count is top-`--top-k` routing.

One JSON line per run is appended to `--jsonl` (so that several processes
can share the machine's cores and one file); `--plot PNG` draws held-out
perplexity against experts and against training time from those lines.

Usage:
    python bench/moe_vs_dense.py --books DIR --experts 1 8 --seeds 1 2 3 \\
        --max-steps 3000 --jsonl bench/moe_vs_dense.jsonl
    python bench/moe_vs_dense.py --jsonl bench/moe_vs_dense.jsonl \\
        --plot bench/moe_vs_dense.png                  # table and picture
"""

import argparse
import json
import os
import shlex
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
warnings.filterwarnings("ignore", message="You are using a softmax over axis")


import numpy as np  # noqa: E402

from moe.lm import book_split, cli, corpus, training  # noqa: E402


def run_flags(experts: int, top_k: int, hidden_dim: int) -> list[str]:
    """The MoE flags of a run with `experts` experts (1: the dense one)."""
    if experts == 1:
        return [
            "--num-experts", "1", "--top-k", "1", "--routing", "soft",
            "--hidden-dim", str(top_k * hidden_dim), "--aux-loss-weight", "0",
        ]  # fmt: skip
    return [
        "--num-experts", str(experts), "--top-k", str(top_k),
        "--hidden-dim", str(hidden_dim),
    ]  # fmt: skip


def test_metrics(output: str, test_book: Path) -> dict:
    """The bundle's metrics on every target of the test book (the serving
    task: the next word after each whole context)."""
    import dataclasses

    from moe.lm.bundle import load_bundle
    from moe.lm.training_data import validation_dataset

    loaded = load_bundle(output)
    summary = json.loads((Path(output) / "training.json").read_text())
    config = training.with_defaults(
        training.TrainingConfig(**summary["config"])
    )
    tokens, starts = corpus.token_stream(
        loaded.tokenizer, [corpus.read_text(test_book)]
    )
    positions = corpus.pair_positions(starts)
    ds = validation_dataset(
        dataclasses.replace(config, train_positions="last"),
        tokens, starts, positions,
    )  # fmt: skip
    from moe.lm.architectures import compile_model

    compile_model(loaded.model, config.learning_rate)  # for the metrics
    m = loaded.model.evaluate(ds, return_dict=True, verbose=0)
    return {k: float(m[k]) for k in ("accuracy", "top5_accuracy", "perplexity")}


def train_one(args, split, experts, seed, workdir) -> dict:
    flags = [
        "--architecture", "transformer",
        "--corpus", *map(str, split.train),
        "--validation-corpus", str(split.validate),
        "--seed", str(seed), "--output", str(Path(workdir) / "bundle"),
        *run_flags(experts, args.top_k, args.hidden_dim),
        *shlex.split(args.flags),
    ]  # fmt: skip
    if args.max_steps:
        flags += ["--max-steps", str(args.max_steps)]
    if args.max_minutes:
        flags += ["--max-minutes", str(args.max_minutes)]
    config = cli.parse_training_args(flags)
    started = time.perf_counter()
    summary = training.train(config, verbose=0)
    seconds = time.perf_counter() - started
    return {
        "experts": experts,
        "seed": seed,
        "flags": flags[flags.index("--seed") :],
        "steps": summary["steps"],
        "epochs": summary["epochs_run"],
        "stopped_by_budget": summary["stopped_by_budget"],
        "train_seconds": round(summary["seconds"], 1),
        "wall_seconds": round(seconds, 1),
        "load": os.getloadavg()[0],
        "validation": summary["validation"],
        "test": test_metrics(config.output, split.test),
        "best_val_loss": min(summary["history"]["val_loss"]),
    }


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    by_experts = {}
    for r in rows:
        by_experts.setdefault(r["experts"], []).append(r)
    xs = sorted(by_experts)
    means = [np.mean([r["validation"]["perplexity"] for r in by_experts[e]])
             for e in xs]  # fmt: skip
    stds = [np.std([r["validation"]["perplexity"] for r in by_experts[e]])
            for e in xs]  # fmt: skip
    left.errorbar(xs, means, yerr=stds, marker="o", capsize=3)
    left.set_xscale("log", base=2)
    left.set_xticks(xs, [str(e) for e in xs])
    left.set_xlabel("experts (1 = dense, top-2 otherwise)")
    left.set_ylabel("validation-book perplexity")
    for e in xs:
        right.scatter(
            [r["train_seconds"] for r in by_experts[e]],
            [r["validation"]["perplexity"] for r in by_experts[e]],
            label=f"{e} expert{'s' if e > 1 else ''}",
        )
    right.set_xlabel("training seconds (2 shared CPU cores)")
    right.set_ylabel("validation-book perplexity")
    right.legend()
    fig.suptitle("Equal active parameters and steps, whole-book split")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _mean_std(values) -> str:
    std = np.std(values, ddof=1) if len(values) > 1 else 0.0
    return f"{np.mean(values):.3f} ± {std:.3f}"


def table(rows) -> str:
    """Markdown: mean ± sample std over the seeds, per expert count."""
    out = [
        "| experts | runs | steps | train s | val ppl | val top-1 | "
        "test ppl | test top-1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_experts = {}
    for r in rows:
        by_experts.setdefault(r["experts"], []).append(r)
    for e in sorted(by_experts):
        rs = by_experts[e]
        cells = [
            _mean_std([r[part][key] for r in rs])
            for part in ("validation", "test")
            for key in ("perplexity", "accuracy")
        ]
        seconds = np.mean([r["train_seconds"] for r in rs])
        out.append(
            f"| {e} | {len(rs)} | {rs[0]['steps']} | {seconds:.0f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--books", type=Path, help="folder of *.txt books")
    parser.add_argument("--validate-book", default="his_last_bow")
    parser.add_argument("--test-book", default="the_hound_of_the_baskervilles")
    parser.add_argument("--experts", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--hidden-dim", type=int, default=256)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--max-minutes", type=float)
    parser.add_argument(
        "--flags", default="", help="further model.py flags (quoted)"
    )
    parser.add_argument("--jsonl", type=Path, required=True)
    parser.add_argument("--plot", type=Path, help="draw the PNG, no runs")
    args = parser.parse_args(argv)
    if args.plot:
        rows = [json.loads(line) for line in args.jsonl.read_text().split("\n")
                if line.strip()]  # fmt: skip
        print(table(rows))
        plot(rows, args.plot)
        return
    if args.books is None:
        parser.error("--books DIR is needed for runs")
    split = book_split.split_books(
        args.books, args.validate_book, args.test_book
    )
    for seed in args.seeds:
        for experts in args.experts:
            with tempfile.TemporaryDirectory(prefix="moe-vs-dense-") as work:
                row = train_one(args, split, experts, seed, work)
            print(json.dumps(row), flush=True)
            with args.jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
