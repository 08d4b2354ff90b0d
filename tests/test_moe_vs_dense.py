"""`bench/moe_vs_dense.py`: the sweep records each run at once and resumes.

A tiny configuration (one-block Transformers of width 8 on three tiny
books) trains for real; only the bookkeeping is checked, never a figure.
"""

import importlib.util
import json

import pytest
from conftest import LM_TINY_SENTENCES, REPO_ROOT

TINY_FLAGS = (
    "--embed-dim 8 --max-seq-len 3 --num-layers 1 --num-heads 2 "
    "--batch-size 16 --epochs 1 --warmup-steps 1"
)


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location(
        "moe_vs_dense_bench", REPO_ROOT / "bench" / "moe_vs_dense.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_books(tmp_path):
    books = tmp_path / "books"
    books.mkdir()
    for i, name in enumerate(["a", "b", "c"]):
        lines = LM_TINY_SENTENCES[i:] + LM_TINY_SENTENCES[:i]
        (books / f"{name}.txt").write_text("\n".join(lines * 4) + "\n")
    return books


def test_the_sweep_records_each_run_and_skips_recorded_ones(
    sweep, tmp_path, monkeypatch
):
    books, jsonl = tiny_books(tmp_path), tmp_path / "runs.jsonl"
    argv = [
        "--books", str(books), "--validate-book", "b", "--test-book", "c",
        "--experts", "1", "2", "--seeds", "1", "--top-k", "1",
        "--hidden-dim", "4", "--max-steps", "2", "--flags", TINY_FLAGS,
        "--jsonl", str(jsonl),
    ]  # fmt: skip
    sweep.main(argv)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [(r["run"]["experts"], r["run"]["seed"]) for r in rows] == [
        (1, 1),
        (2, 1),
    ]
    assert all(r["steps"] >= 1 and r["steps_per_second"] > 0 for r in rows)

    # A run cut off mid-write leaves a partial line; the rerun ignores it,
    # trains only what is missing (seed 2), and skips what is recorded.
    jsonl.write_text(jsonl.read_text() + '{"run": {"experts": 1, "se')
    trained = []
    real = sweep.train_one

    def counting(args, split, experts, seed, workdir):
        trained.append((experts, seed))
        return real(args, split, experts, seed, workdir)

    monkeypatch.setattr(sweep, "train_one", counting)
    sweep.main([*argv[: argv.index("--seeds") + 1], "1", "2",
                *argv[argv.index("--seeds") + 2 :]])  # fmt: skip
    assert trained == [(1, 2), (2, 2)]
    rows = sweep.read_rows(jsonl)
    assert sorted((r["run"]["experts"], r["run"]["seed"]) for r in rows) == [
        (1, 1), (1, 2), (2, 1), (2, 2),
    ]  # fmt: skip
    # The report pairs each MoE run with the dense run of its seed.
    assert "| 2 (top-1, width 4) | 1, 2 |" in sweep.paired(rows)
    # A changed setting is a different run.
    trained.clear()
    sweep.main([*argv[: argv.index("--max-steps") + 1], "3",
                *argv[argv.index("--max-steps") + 2 :]])  # fmt: skip
    assert trained == [(1, 1), (2, 1)]

    png = tmp_path / "sweep.png"
    sweep.main(["--jsonl", str(jsonl), "--plot", str(png)])
    assert png.stat().st_size > 0
