"""int8 bundles (`model.py --quantize int8`): size, held-out quality, latency.

From one float32 bundle (`--model-dir`), its int8 twin is made as
`model.py --quantize int8` makes it
(`moe.lm.model.quantize_model.quantize_model`, then
`moe.lm.bundle.save_load.save_bundle`) and loaded back from disk, as
`serve.py` does;
the float32 side is the same bundle saved again the same way (without the
optimizer state model.py's float bundle carries, reported apart).
Side by side, in this process:
- size: `model.keras` and the whole bundle folder, int8 / float32, and the
  bytes of the weights by dtype (what int8 covers, what stays float);
- quality: `NextWordPredictor.evaluate` (`serve.py --eval`) on `--eval`, a
  held-out text: top-1, top-5, perplexity, and the change;
- latency: warm single-query `predict_next` p50 and batched `predict_next`
  of 64 and 512 queries, float and int8 interleaved, `--repeats` rounds,
  medians over rounds.

Targets (issue 16): size <= 0.35x; top-1 within 0.5 points and perplexity
within 2 % of float32.

Usage:
    python bench/quantization.py --model-dir saved_model --eval book.txt
    python bench/quantization.py --quick     # trains a tiny bundle, seconds
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from serving_latency import (  # noqa: E402  (a sibling script)
    QUERIES,
    batched_throughput,
    train_bundle,
    warm_latency,
)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def weight_bytes(model) -> dict:
    """`{dtype: bytes}` of the model's weights."""
    sizes = {}
    for v in model.weights:
        dtype = str(v.dtype)
        n = int(v.numpy().nbytes)
        sizes[dtype] = sizes.get(dtype, 0) + n
    return sizes


def write_bundle(model_dir: Path, out: Path, mode: str) -> Path:
    """The bundle in `model_dir` saved again without its optimizer state,
    quantized to `mode` as `model.py --quantize` does (`"none"`: float)."""
    from moe.lm.bundle import save_load
    from moe.lm.model import quantize_model

    loaded = save_load.load_bundle(model_dir)  # compile=False: no optimizer
    quantize_model.quantize_model(loaded.model, mode)
    training = {**loaded.training, "quantized": {"mode": mode}}
    if mode == "none":
        del training["quantized"]
    return save_load.save_bundle(
        out, loaded.model, loaded.tokenizer, loaded.max_seq_len, training
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, help="a float32 bundle")
    parser.add_argument("--eval", type=Path, help="held-out text file")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.calls = 1, 20

    from moe.lm.bundle import save_load
    from moe.lm.bundle.layout import MODEL_FILE
    from moe.lm.model.quantize_model import QUANTIZE_MODES
    from moe.lm.serving.predictor import NextWordPredictor

    tmp = Path(tempfile.mkdtemp(prefix="quantization-bench-"))
    model_dir = args.model_dir or train_bundle(tmp, quick=True)
    dirs = {
        mode: write_bundle(model_dir, tmp / f"{mode}_model", mode)
        for mode in QUANTIZE_MODES
    }
    loaded = {mode: save_load.load_bundle(d) for mode, d in dirs.items()}
    predictors = {
        mode: NextWordPredictor(b.model, b.tokenizer, b.max_seq_len)
        for mode, b in loaded.items()
    }
    sizes = {
        mode: {
            "model_keras_bytes": (d / MODEL_FILE).stat().st_size,
            "bundle_bytes": folder_bytes(d),
            "weight_bytes_by_dtype": weight_bytes(loaded[mode].model),
        }
        for mode, d in dirs.items()
    }
    text = (
        args.eval.read_text(encoding="utf-8")
        if args.eval
        else " ".join(QUERIES) + "."
    )
    quality = {mode: p.evaluate(text) for mode, p in predictors.items()}
    rounds = {m: {"p50_ms": [], "b64_ms": [], "b512_ms": []} for m in dirs}
    for _ in range(args.repeats):
        for mode, predictor in predictors.items():
            r = rounds[mode]
            r["p50_ms"].append(warm_latency(predictor, args.calls)["p50_ms"])
            for batch in (64, 512):
                b = batched_throughput(predictor, batch, 5)
                r[f"b{batch}_ms"].append(b["median_ms"])
    latency = {
        m: {k: statistics.median(v) for k, v in r.items()}
        for m, r in rounds.items()
    }
    base, trained_bytes = sizes["none"], (model_dir / MODEL_FILE)
    result = {
        "model_dir": str(model_dir),
        "eval": str(args.eval) if args.eval else "queries",
        # model.py's float bundle also holds Adam's two moments per weight.
        "trained_model_keras_bytes": trained_bytes.stat().st_size,
        "sizes": sizes,
        "quality": quality,
        "latency": latency,
        "vs_float32": {
            mode: {
                "model_keras_ratio": sizes[mode]["model_keras_bytes"]
                / base["model_keras_bytes"],
                "bundle_ratio": sizes[mode]["bundle_bytes"]
                / base["bundle_bytes"],
                "top1_change_points": 100
                * (quality[mode]["accuracy"] - quality["none"]["accuracy"]),
                "perplexity_change": quality[mode]["perplexity"]
                / quality["none"]["perplexity"]
                - 1,
            }
            for mode in QUANTIZE_MODES[1:]
        },
    }
    print(f"model.py's float bundle: {trained_bytes.stat().st_size} B")
    for mode in dirs:
        q, lat, size = quality[mode], latency[mode], sizes[mode]
        print(
            f"{mode}: model.keras {size['model_keras_bytes']} B "
            f"{size['weight_bytes_by_dtype']} | {q['pairs']} pairs, top-1 "
            f"{q['accuracy']:.4f} top-5 {q['top5_accuracy']:.4f} perplexity "
            f"{q['perplexity']:.2f} | p50 {lat['p50_ms']:.2f} ms, batch 64 "
            f"{lat['b64_ms']:.1f} ms, batch 512 {lat['b512_ms']:.1f} ms"
        )
    for mode, c in result["vs_float32"].items():
        print(
            f"{mode} vs float32: model.keras {c['model_keras_ratio']:.3f}x, "
            f"bundle {c['bundle_ratio']:.3f}x, top-1 "
            f"{c['top1_change_points']:+.2f} points, perplexity "
            f"{100 * c['perplexity_change']:+.2f} %"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
