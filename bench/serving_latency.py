"""Serving: warm latency, batched throughput and cold start of the predictor.

- warm: `NextWordPredictor.predict_next(query)` for one query, many calls
  (after warm-up), p50 / p90 / p99 in ms; queries cycle through a fixed list;
- batched: `predict_next(list)` of 64 and of 512 queries, queries/s
  (median of repeated calls);
- cold: wall time of `python serve.py --model-dir DIR "how are"` next to
  bare `python -c "import tensorflow"`, interleaved, medians of several
  runs each.

The bundle comes from `--model-dir`, or is trained first into a temporary
directory with `moe.lm.train` (what `python model.py` runs) on the
built-in corpus (model.py's defaults; `--quick`: 1 epoch, tiny sizes).

Targets: warm p50 <= 1 ms; cold serve.py <= 1.5 s more than bare
`import tensorflow`. The warm figures also give the process CPU time per
call (steadier than wall time on a shared machine) and the load average
(`os.getloadavg`) before and after.

Usage:
    python bench/serving_latency.py                      # ~2 min
    python bench/serving_latency.py --model-dir saved_model --calls 5000
    python bench/serving_latency.py --quick              # seconds
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO_ROOT = Path(__file__).resolve().parent.parent

QUERIES = [
    "how are",
    "thank",
    "good",
    "the cat sat on the",
    "once upon a time there was a",
    "i am",
    "what do you",
    "don't",
]
QUICK_SIZES = {"embed_dim": 16, "hidden_dim": 16, "num_experts": 2}


def train_bundle(directory: Path, quick: bool) -> Path:
    """Trains model.py's model on the built-in corpus into `directory`.

    In this process, through `moe.lm.train` (what `python model.py`
    runs): model.py's defaults, or 1 epoch of a tiny model with `quick`.
    """
    from moe.lm.training import train
    from moe.lm.training.config import TrainingConfig

    out = directory / "saved_model"
    overrides = {"epochs": 1, **QUICK_SIZES} if quick else {}
    config = TrainingConfig(output=str(out), **overrides)
    train.train(config, verbose=0)
    return out


def percentiles(seconds: list[float]) -> dict:
    ms = sorted(s * 1e3 for s in seconds)

    def at(q):
        return ms[min(len(ms) - 1, round(q * (len(ms) - 1)))]

    return {"p50_ms": at(0.5), "p90_ms": at(0.9), "p99_ms": at(0.99)}


def warm_latency(predictor, calls: int) -> dict:
    for query in QUERIES * 3:  # warm-up: traces, caches
        predictor.predict_next(query)
    seconds = []
    cpu_start = time.process_time()
    for i in range(calls):
        query = QUERIES[i % len(QUERIES)]
        start = time.perf_counter()
        predictor.predict_next(query)
        seconds.append(time.perf_counter() - start)
    cpu_ms = (time.process_time() - cpu_start) * 1e3 / calls
    return {"calls": calls, **percentiles(seconds), "cpu_ms_per_call": cpu_ms}


def batched_throughput(predictor, batch: int, repeats: int) -> dict:
    queries = (QUERIES * (batch // len(QUERIES) + 1))[:batch]
    predictor.predict_next(queries)  # warm-up (traces this bucket)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.predict_next(queries)
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {
        "batch": batch,
        "median_ms": median * 1e3,
        "queries_per_s": batch / median,
    }


def cold_start(model_dir: Path, runs: int) -> dict:
    """Interleaved wall times of serve.py and of bare `import tensorflow`."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    commands = {
        "serve_py": [
            sys.executable, "serve.py", "--model-dir", str(model_dir),
            "how are",
        ],
        "import_tensorflow": [sys.executable, "-c", "import tensorflow"],
    }  # fmt: skip
    times = {name: [] for name in commands}
    for _ in range(runs):
        for name, command in commands.items():
            start = time.perf_counter()
            result = subprocess.run(
                command, cwd=REPO_ROOT, env=env, capture_output=True
            )
            times[name].append(time.perf_counter() - start)
            if result.returncode != 0:
                sys.exit(f"{command} failed:\n{result.stderr[-2000:]}")
    medians = {f"{k}_s": statistics.median(v) for k, v in times.items()}
    return {
        "runs": runs,
        **medians,
        "extra_s": medians["serve_py_s"] - medians["import_tensorflow_s"],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny model, few calls"
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        help="bundle to serve (default: train one on the built-in corpus)",
    )
    parser.add_argument("--calls", type=int, help="warm single-query calls")
    parser.add_argument("--cold-runs", type=int, help="cold runs of each")
    parser.add_argument("--json", type=Path, help="write results here")
    args = parser.parse_args(argv)
    if args.model_dir is not None and not args.model_dir.is_dir():
        parser.exit(
            2, f"{parser.prog}: error: no such directory: {args.model_dir}\n"
        )
    calls = args.calls or (200 if args.quick else 3000)
    cold_runs = args.cold_runs or (1 if args.quick else 5)
    batch_repeats = 3 if args.quick else 20

    with tempfile.TemporaryDirectory(prefix="bench_serving_") as tmp:
        model_dir = args.model_dir or train_bundle(Path(tmp), args.quick)
        from moe.lm.serving.predictor import NextWordPredictor

        predictor = NextWordPredictor.load(model_dir)
        load_before = os.getloadavg()[0]
        warm = warm_latency(predictor, calls)
        warm["load_average"] = [load_before, os.getloadavg()[0]]
        batched = [
            batched_throughput(predictor, b, batch_repeats) for b in (64, 512)
        ]
        cold = cold_start(model_dir, cold_runs)

    print(
        f"# model={args.model_dir or 'trained on the built-in corpus'}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    print(
        f"warm predict_next, {warm['calls']} calls: p50 {warm['p50_ms']:.2f} "
        f"ms, p90 {warm['p90_ms']:.2f} ms, p99 {warm['p99_ms']:.2f} ms, "
        f"{warm['cpu_ms_per_call']:.2f} CPU-ms per call (load average "
        f"{warm['load_average'][0]:.1f} -> {warm['load_average'][1]:.1f})"
    )
    for b in batched:
        print(
            f"batch {b['batch']}: {b['median_ms']:.1f} ms, "
            f"{b['queries_per_s']:,.0f} queries/s"
        )
    print(
        f"cold (median of {cold['runs']}): serve.py {cold['serve_py_s']:.2f} "
        f"s, import tensorflow {cold['import_tensorflow_s']:.2f} s, "
        f"extra {cold['extra_s']:+.2f} s"
    )
    results = {"warm": warm, "batched": batched, "cold": cold}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
