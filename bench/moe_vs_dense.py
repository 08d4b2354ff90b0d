"""MoE against dense Transformers on a whole-book split (issue 17).

Trains `model.py --architecture transformer` models on the training books
of `--books` (`moe.lm.text.book_split`: one book validates, one tests, the rest
train), each for the same `--max-steps` (and/or `--max-minutes`), and
reports held-out perplexity and top-1 on the validation book and on the
test book. `--experts 1` is the dense control at equal active parameters:
one expert of width `top_k x --hidden-dim` (`--routing soft` over one
expert: exactly a dense FFN); any other count is top-`--top-k` routing.

One JSON line per run is appended to `--jsonl` as soon as the run ends,
with the run's settings under `"run"`. The sweep is resumable: a rerun of
the same command skips every run whose settings (experts, seed, steps,
flags, books) are already recorded there, so interrupting it loses at most
the run in progress. `--plot PNG` prints the table and the paired
comparison with the dense runs, and draws held-out perplexity against
experts and against training time.

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

from moe.lm import cli  # noqa: E402
from moe.lm.text import book_split, corpus  # noqa: E402
from moe.lm.training import train  # noqa: E402
from moe.lm.training.config import (  # noqa: E402
    TrainingConfig,
    with_defaults,
)


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

    from moe.lm.bundle.save_load import load_bundle
    from moe.lm.training.datasets import validation_dataset

    loaded = load_bundle(output)
    summary = json.loads((Path(output) / "training.json").read_text())
    config = with_defaults(TrainingConfig(**summary["config"]))
    tokens, starts = corpus.token_stream(
        loaded.tokenizer, [corpus.read_text(test_book)]
    )
    positions = corpus.pair_positions(starts)
    ds = validation_dataset(
        dataclasses.replace(config, train_positions="last"),
        tokens, starts, positions,
    )  # fmt: skip
    from moe.lm.model.architectures import compile_model

    compile_model(loaded.model)  # for the metrics
    m = loaded.model.evaluate(ds, return_dict=True, verbose=0)
    return {k: float(m[k]) for k in ("accuracy", "top5_accuracy", "perplexity")}


def run_settings(args, split, experts, seed) -> dict:
    """What identifies a run: two runs with equal settings are the same
    run (the resume key)."""
    return {
        "experts": experts,
        "seed": seed,
        "top_k": args.top_k,
        "hidden_dim": args.hidden_dim,
        "max_steps": args.max_steps,
        "max_minutes": args.max_minutes,
        "flags": args.flags,
        "train_books": sorted(path.name for path in split.train),
        "validate_book": split.validate.name,
        "test_book": split.test.name,
    }


def read_rows(path: Path) -> list[dict]:
    """The recorded runs; a line cut short by an interrupted write is
    skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def record(path: Path, row: dict) -> None:
    """Appends one run's line and flushes it to disk at once (on a line of
    its own after a line an interrupted write left unfinished)."""
    with path.open("a+b") as f:
        f.seek(0, os.SEEK_END)
        start = b""
        if f.tell():
            f.seek(-1, os.SEEK_END)
            start = b"" if f.read(1) == b"\n" else b"\n"
        f.write(start + (json.dumps(row) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


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
    summary = train.train(config, verbose=0)
    seconds = time.perf_counter() - started
    return {
        "run": run_settings(args, split, experts, seed),
        "experts": experts,
        "seed": seed,
        "flags": flags[flags.index("--seed") :],
        "steps": summary["steps"],
        "epochs": summary["epochs_run"],
        "stopped_by_budget": summary["stopped_by_budget"],
        "train_seconds": round(summary["seconds"], 1),
        "steps_per_second": round(summary["steps"] / summary["seconds"], 3),
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

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, rs in groups(rows).items():
        ppl = [r["validation"]["perplexity"] for r in rs]
        experts = rs[0]["run"]["experts"]
        left.errorbar(
            [experts], [np.mean(ppl)], yerr=[np.std(ppl)], marker="o",
            capsize=3, label=f"{label}, {len(rs)} run(s)",
        )  # fmt: skip
        right.scatter([r["train_seconds"] for r in rs], ppl, label=label)
    left.set_xscale("log", base=2)
    left.set_xlabel("experts (1 = dense of equal active width)")
    left.set_ylabel("validation-book perplexity")
    left.legend(fontsize=7)
    right.set_xlabel("training seconds (2 CPU cores)")
    right.set_ylabel("validation-book perplexity")
    right.legend(fontsize=7)
    fig.suptitle("Equal active parameters and steps, whole-book split")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def group_label(row) -> str:
    """`"8"` for top-`k` of the default width; the routing spelt out
    otherwise (`"32 (top-8, width 64)"`)."""
    run = row["run"]
    if run["experts"] == 1:
        return f"1 (dense, width {run['top_k'] * run['hidden_dim']})"
    return f"{run['experts']} (top-{run['top_k']}, width {run['hidden_dim']})"


def groups(rows) -> dict:
    """`{label: rows}`, dense first, then by experts."""
    by_label = {}
    for r in sorted(rows, key=lambda r: (r["run"]["experts"], group_label(r))):
        by_label.setdefault(group_label(r), []).append(r)
    return by_label


def _mean_std(values, digits=3) -> str:
    std = np.std(values, ddof=1) if len(values) > 1 else 0.0
    return f"{np.mean(values):.{digits}f} ± {std:.{digits}f}"


def table(rows) -> str:
    """Markdown: mean ± sample std over the seeds, per routing."""
    out = [
        "| experts | runs | steps | steps/s | val ppl | val top-1 | "
        "test ppl | test top-1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, rs in groups(rows).items():
        cells = [
            _mean_std([r[part][key] for r in rs], digits)
            for part in ("validation", "test")
            for key, digits in (("perplexity", 1), ("accuracy", 4))
        ]
        rate = _mean_std([r["steps"] / r["train_seconds"] for r in rs], 2)
        out.append(
            f"| {label} | {len(rs)} | {rs[0]['steps']} | {rate} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(out)


def dense_partner(row, rows):
    """The dense run of equal active width, seed, steps and flags."""
    run = row["run"]
    for other in rows:
        o = other["run"]
        if (
            o["experts"] == 1
            and o["top_k"] * o["hidden_dim"] == run["top_k"] * run["hidden_dim"]
            and all(
                o[k] == run[k]
                for k in ("seed", "max_steps", "max_minutes", "flags")
            )
        ):
            return other
    return None


def paired(rows) -> str:
    """Markdown: each MoE against its dense partner, seed by seed: the
    relative perplexity change and the top-1 change, mean ± sample std and
    the standard error of the mean over seeds, and the step-rate ratio."""
    out = [
        "| experts | seeds | val ppl change | (std. error) | test ppl "
        "change | (std. error) | val top-1 change | steps/s vs dense |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, rs in groups(rows).items():
        pairs = [(r, dense_partner(r, rows)) for r in rs]
        pairs = [(r, d) for r, d in pairs if d is not None and r is not d]
        if not pairs:
            continue

        def change(part, key, pairs=pairs):
            return [100 * (r[part][key] / d[part][key] - 1) for r, d in pairs]

        def std_error(values):
            if len(values) < 2:
                return "-"
            return f"{np.std(values, ddof=1) / np.sqrt(len(values)):.2f}"

        val, test = (
            change("validation", "perplexity"),
            change("test", "perplexity"),
        )
        top1 = [
            100 * (r["validation"]["accuracy"] - d["validation"]["accuracy"])
            for r, d in pairs
        ]
        speed = [
            (r["steps"] / r["train_seconds"])
            / (d["steps"] / d["train_seconds"])
            for r, d in pairs
        ]
        seeds = ", ".join(str(r["run"]["seed"]) for r, _ in pairs)
        out.append(
            f"| {label} | {seeds} | {_mean_std(val, 2)} % | {std_error(val)} "
            f"| {_mean_std(test, 2)} % | {std_error(test)} | "
            f"{_mean_std(top1, 2)} pt | {_mean_std(speed, 2)}x |"
        )
    return "\n".join(out)


def per_seed(rows) -> str:
    """Markdown: every run, one row each."""
    out = [
        "| experts | seed | steps | train s | val ppl | val top-1 | test ppl "
        "| test top-1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, rs in groups(rows).items():
        for r in sorted(rs, key=lambda r: r["run"]["seed"]):
            v, t = r["validation"], r["test"]
            out.append(
                f"| {label} | {r['run']['seed']} | {r['steps']} | "
                f"{r['train_seconds']:.0f} | {v['perplexity']:.1f} | "
                f"{v['accuracy']:.4f} | {t['perplexity']:.1f} | "
                f"{t['accuracy']:.4f} |"
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
        rows = [r for r in read_rows(args.jsonl) if "run" in r]
        print(table(rows), per_seed(rows), paired(rows), sep="\n\n")
        plot(rows, args.plot)
        return
    if args.books is None:
        parser.error("--books DIR is needed for runs")
    split = book_split.split_books(
        args.books, args.validate_book, args.test_book
    )
    done = [row.get("run") for row in read_rows(args.jsonl)]
    for seed in args.seeds:
        for experts in args.experts:
            if run_settings(args, split, experts, seed) in done:
                print(f"recorded already: {experts} experts, seed {seed}")
                continue
            with tempfile.TemporaryDirectory(prefix="moe-vs-dense-") as work:
                row = train_one(args, split, experts, seed, work)
            record(args.jsonl, row)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
