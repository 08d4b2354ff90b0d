"""int8 bundles (`model.py --quantize int8`): size, held-out quality, latency.

From one float32 bundle (`--model-dir`), its int8 twin is made as
`model.py --quantize int8` makes it (`moe.lm.quantize.quantize_model`, then
`moe.lm.bundle.save_bundle`) and loaded back from disk, as `serve.py` does;
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

from serving_latency import (  # noqa: E402  (bench/ is sys.path[0])
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
    from moe.lm import bundle, quantize

    loaded = bundle.load_bundle(model_dir)  # compile=False: no optimizer
    quantize.quantize_model(loaded.model, mode)
    training = {**loaded.training, "quantized": {"mode": mode}}
    return bundle.save_bundle(
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

    from moe.lm import bundle
    from moe.lm.predictor import NextWordPredictor

    tmp = Path(tempfile.mkdtemp(prefix="quantization-bench-"))
    model_dir = args.model_dir or train_bundle(tmp, quick=True)
    dirs = {
        "float32": write_bundle(model_dir, tmp / "float32_model", "none"),
        "int8": write_bundle(model_dir, tmp / "int8_model", "int8"),
    }
    loaded = {name: bundle.load_bundle(d) for name, d in dirs.items()}
    predictors = {
        name: NextWordPredictor(b.model, b.tokenizer, b.max_seq_len)
        for name, b in loaded.items()
    }
    sizes = {
        name: {
            "model_keras_bytes": (d / bundle.MODEL_FILE).stat().st_size,
            "bundle_bytes": folder_bytes(d),
            "weight_bytes_by_dtype": weight_bytes(loaded[name].model),
        }
        for name, d in dirs.items()
    }
    trained_bytes = (model_dir / bundle.MODEL_FILE).stat().st_size
    result = {
        "model_dir": str(model_dir),
        "sizes": sizes,
        # model.py's float bundle also holds Adam's two moments per weight.
        "trained_model_keras_bytes": trained_bytes,
        "int8_vs_trained_ratio": sizes["int8"]["model_keras_bytes"]
        / trained_bytes,
        "model_keras_ratio": sizes["int8"]["model_keras_bytes"]
        / sizes["float32"]["model_keras_bytes"],
        "bundle_ratio": sizes["int8"]["bundle_bytes"]
        / sizes["float32"]["bundle_bytes"],
    }
    text = (
        args.eval.read_text(encoding="utf-8")
        if args.eval
        else " ".join(QUERIES) + "."
    )
    quality = {n: p.evaluate(text) for n, p in predictors.items()}
    result["eval"] = str(args.eval) if args.eval else "queries"
    result["quality"] = quality
    result["top1_change_points"] = 100 * (
        quality["int8"]["accuracy"] - quality["float32"]["accuracy"]
    )
    result["perplexity_change"] = (
        quality["int8"]["perplexity"] / quality["float32"]["perplexity"] - 1
    )
    rounds = {n: {"p50_ms": [], "b64_ms": [], "b512_ms": []} for n in dirs}
    for _ in range(args.repeats):
        for name, predictor in predictors.items():
            r = rounds[name]
            r["p50_ms"].append(warm_latency(predictor, args.calls)["p50_ms"])
            for batch in (64, 512):
                b = batched_throughput(predictor, batch, 5)
                r[f"b{batch}_ms"].append(b["median_ms"])
    result["latency"] = {
        n: {k: statistics.median(v) for k, v in r.items()}
        for n, r in rounds.items()
    }
    lat = result["latency"]
    print(
        f"model.keras int8/float32 {result['model_keras_ratio']:.3f}x, "
        f"bundle {result['bundle_ratio']:.3f}x (float32 without optimizer "
        f"state; vs model.py's float bundle with it: "
        f"{result['int8_vs_trained_ratio']:.3f}x)"
    )
    for name, size in sizes.items():
        print(f"{name} weight bytes: {size['weight_bytes_by_dtype']}")
    for name in dirs:
        q, L = quality[name], lat[name]
        print(
            f"{name}: {q['pairs']} pairs | top-1 {q['accuracy']:.4f} top-5 "
            f"{q['top5_accuracy']:.4f} perplexity {q['perplexity']:.2f} | "
            f"p50 {L['p50_ms']:.2f} ms, batch 64 {L['b64_ms']:.1f} ms, "
            f"batch 512 {L['b512_ms']:.1f} ms"
        )
    print(
        f"change: top-1 {result['top1_change_points']:+.2f} points, "
        f"perplexity {100 * result['perplexity_change']:+.2f} %"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
