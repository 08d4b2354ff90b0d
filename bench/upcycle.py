"""Sparse upcycling vs training the MoE from scratch (issue 17, item 2).

Trains a dense Transformer (`--num-experts 1`), then the same MoE
Transformer (`--moe-experts`, top-2) twice for `--epochs` epochs with the
same seed: from scratch, and upcycled from the dense bundle
(`--upcycle-from`: every expert a copy of the dense FFN, the router new).
Prints the held-out perplexity after every epoch with the optimizer steps
so far, and the steps each needs to reach the from-scratch model's final
perplexity (the upcycled model's count excludes the dense pre-training,
printed beside it). Early stopping is off (patience = epochs).

Usage:
    nice -n 10 python bench/upcycle.py --corpus A.txt B.txt HELD_OUT.txt \
        --validation-split 0.27 --epochs 4 --dense-epochs 3 \
        [--upcycled-learning-rate 3e-4]
"""

import argparse
import dataclasses
import json
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from moe.lm import cli  # noqa: E402
from moe.lm.training import train  # noqa: E402


def run(config, label: str) -> dict:
    import keras

    steps = []
    counter = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: steps.append(
            int(counter.model.optimizer.iterations.numpy())
        )
    )
    started = time.perf_counter()
    summary = train.train(config, verbose=0, callbacks=[counter])
    ppl = summary["history"]["val_perplexity"]
    print(f"{label}: " + ", ".join(
        f"step {s} ppl {p:.1f}" for s, p in zip(steps, ppl)
    ) + f" ({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    return {"steps": steps, "val_perplexity": ppl,
            "seconds": summary["seconds"]}  # fmt: skip


def first_step_at(result: dict, target: float):
    for step, ppl in zip(result["steps"], result["val_perplexity"]):
        if ppl <= target:
            return step
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", nargs="+", required=True)
    parser.add_argument("--validation-split", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--dense-epochs", type=int, default=3)
    parser.add_argument("--moe-experts", type=int, default=4)
    parser.add_argument("--flags", default="--embed-dim 64 --hidden-dim 64 "
                        "--num-layers 1 --num-heads 4")  # fmt: skip
    parser.add_argument(
        "--upcycled-learning-rate",
        type=float,
        help="the upcycled run's (default: the others')",
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    base = cli.parse_training_args(
        ["--architecture", "transformer", *args.flags.split()]
    )
    base = dataclasses.replace(
        base, corpus=args.corpus, validation_split=args.validation_split,
        patience=max(args.epochs, args.dense_epochs),
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        dense_dir = f"{tmp}/dense"
        dense = run(dataclasses.replace(
            base, output=dense_dir, num_experts=1, top_k=1,
            epochs=args.dense_epochs,
        ), "dense")  # fmt: skip
        moe = dataclasses.replace(
            base, num_experts=args.moe_experts, top_k=2, epochs=args.epochs
        )
        scratch = run(dataclasses.replace(moe, output=f"{tmp}/s"), "scratch")
        upcycled = run(dataclasses.replace(
            moe, output=f"{tmp}/u", upcycle_from=dense_dir,
            learning_rate=args.upcycled_learning_rate or moe.learning_rate,
        ), "upcycled")  # fmt: skip
    target = scratch["val_perplexity"][-1]
    print(
        f"target ppl {target:.1f} (scratch, final): scratch reaches it at "
        f"step {first_step_at(scratch, target)}, upcycled at step "
        f"{first_step_at(upcycled, target)} (+ {dense['steps'][-1]} dense "
        "steps before)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(dense=dense, scratch=scratch, upcycled=upcycled,
                           target=target), f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
