"""Every benchmark in `bench/` runs in `--quick` mode and writes its JSON.

The scripts run as subprocesses, all at once (they mostly wait on imports
and tracing), and only the structure of what they write is checked, never a
timing: timings belong to the benchmarks, not to the tests.
"""

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, script_env

SCRIPTS = {
    "layer_step_time": [],
    "training_throughput": [],
    "serving_latency": [],
    "memory": [],
    "cli_latency": [],
    "quantization": [],
}
# keras-hub is an optional extra: its benchmark runs where it is installed.
if importlib.util.find_spec("keras_hub") is not None:
    SCRIPTS["keras_hub_block"] = []


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """`{script: (completed process, parsed JSON or None)}`."""
    out = tmp_path_factory.mktemp("bench")
    processes = {}
    for name, flags in SCRIPTS.items():
        processes[name] = subprocess.Popen(
            [
                sys.executable,
                f"bench/{name}.py",
                "--quick",
                "--json",
                str(out / f"{name}.json"),
                *flags,
            ],
            cwd=REPO_ROOT,
            env=script_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    runs = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=600)
        path = out / f"{name}.json"
        data = json.loads(path.read_text()) if path.exists() else None
        runs[name] = (process.returncode, stdout, stderr, data)
    return runs


def result_of(quick_runs, name):
    returncode, stdout, stderr, data = quick_runs[name]
    assert returncode == 0, stderr[-3000:]
    assert data is not None, f"{name} wrote no JSON; stdout:\n{stdout}"
    return data


def is_positive_number(value):
    return isinstance(value, (int, float)) and value > 0


def test_layer_step_time(quick_runs):
    data = result_of(quick_runs, "layer_step_time")
    assert data["backend"] == "tensorflow"
    assert data["tf_cpu_allocator"] in ("bfc", "malloc")
    assert data["experts"] == [8]
    assert [r["shape"] for r in data["results"]] == [[256, 32], [8, 32, 32]]
    for result in data["results"]:
        contenders = {"moe_top2_E8", "dense_ffn", "all_experts", "soft"}
        assert set(result["ms"]) == set(result["cpu_ms"]) == contenders
        assert set(result["params"]) == contenders
        assert all(map(is_positive_number, result["ms"].values()))
        # Same experts, same parameters; the dense FFN holds 2 experts' worth.
        assert result["params"]["moe_top2_E8"] > result["params"]["dense_ffn"]
        assert set(result["ratios"]) == {
            "moe_vs_dense_ffn",
            "all_experts_vs_moe",
            "soft_vs_moe",
        }


def test_training_throughput(quick_runs):
    data = result_of(quick_runs, "training_throughput")
    assert data["corpus"] == "built-in"
    assert is_positive_number(data["matmul_flops_per_s"])
    (result,) = data["results"]
    assert result["config"] == "seed"
    assert (result["embed_dim"], result["num_experts"]) == (32, 4)
    assert result["hidden_dim"] == 64
    assert len(result["epoch_train_s"]) == data["epochs"] == 2
    for key in (
        "train_pairs",
        "prepare_s",
        "first_epoch_pairs_per_s",
        "steady_pairs_per_s",
        "flop_bound_pairs_per_s",
        "fraction_of_flop_bound",
    ):
        assert is_positive_number(result[key]), key
    assert result["softmax_flop_per_pair"] == 6 * 32 * result["vocab_size"]


def test_serving_latency(quick_runs):
    data = result_of(quick_runs, "serving_latency")
    warm = data["warm"]
    assert warm["calls"] == 200
    assert 0 < warm["p50_ms"] <= warm["p90_ms"] <= warm["p99_ms"]
    assert [b["batch"] for b in data["batched"]] == [64, 512]
    assert all(is_positive_number(b["queries_per_s"]) for b in data["batched"])
    cold = data["cold"]
    assert cold["runs"] == 1
    assert is_positive_number(cold["serve_py_s"])
    assert is_positive_number(cold["import_tensorflow_s"])


def test_memory(quick_runs):
    data = result_of(quick_runs, "memory")
    runs = data["runs"]
    assert set(runs) == {"once", "x10"}
    assert runs["x10"]["corpus_bytes"] > 10 * runs["once"]["corpus_bytes"]
    assert all(is_positive_number(r["peak_rss_mb"]) for r in runs.values())
    ratio = runs["x10"]["peak_rss_mb"] / runs["once"]["peak_rss_mb"]
    assert data["ratio"] == pytest.approx(ratio)


def test_cli_latency(quick_runs):
    data = result_of(quick_runs, "cli_latency")
    assert data["repeats"] == 1
    codes = {r["command"]: r["exit_code"] for r in data["results"]}
    assert codes["model.py --help"] == codes["python -c pass"] == 0
    # The bad inputs fail, as they should, with argparse's 2 or our 1.
    assert codes["model.py --epochs x (invalid flag)"] == 2
    for name in ("--epochs 0", "--corpus", "serve.py --model-dir"):
        assert all(c == 1 for k, c in codes.items() if name in k), codes
    assert all(is_positive_number(r["median_s"]) for r in data["results"])


def test_bad_corpus_path_is_one_line_and_nonzero(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "bench/memory.py",
            "--corpus",
            str(tmp_path / "missing.txt"),
        ],
        cwd=REPO_ROOT,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "no such file" in result.stderr
    assert "Traceback" not in result.stderr


def test_quantization(quick_runs):
    data = result_of(quick_runs, "quantization")
    modes = {"none", "int8", "int8-weights"}
    assert set(data["sizes"]) == set(data["quality"]) == modes
    assert set(data["vs_float32"]) == modes - {"none"}
    for mode in modes - {"none"}:
        sizes = data["sizes"][mode]["weight_bytes_by_dtype"]
        assert sizes["int8"] > sizes["float32"]
        assert 0 < data["vs_float32"][mode]["model_keras_ratio"] < 1
    for mode in modes:
        assert set(data["latency"][mode]) == {"p50_ms", "b64_ms", "b512_ms"}
        assert all(map(is_positive_number, data["latency"][mode].values()))


@pytest.mark.skipif(
    "keras_hub_block" not in SCRIPTS, reason="keras-hub is not installed"
)
def test_keras_hub_block(quick_runs):
    data = result_of(quick_runs, "keras_hub_block")
    rows = data["results"]
    # Both shapes, 1 and 8 tokens, TF graph and XLA, JAX jit.
    assert len(rows) == 2 * 2 * 3
    assert {r["mode"] for r in rows} == {"graph", "xla", "jit"}
    for row in rows:
        assert set(row["ms"]) == {"keras_hub", "moe"}
        assert all(map(is_positive_number, row["ms"].values()))
        assert row["max_abs_diff"] <= 1e-5
        # Decode under a compiler reads only the chosen experts' weights.
        if row["tokens"] == 1 and row["mode"] != "graph":
            assert row["auto_layout"] == "gather"
