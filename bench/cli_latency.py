"""How fast `model.py` and `serve.py` answer help and bad input.

Each command runs as a fresh process in an empty temporary folder, timed
from start to exit (the whole process: interpreter start, imports, checks,
the error message), interleaved with the others, `--repeats` times; the
table gives the median and the slowest. `python -c pass` is the floor, and
`python -c "import tensorflow"` what an answer costs once TensorFlow loads.

Usage:
    python bench/cli_latency.py                 # 5 runs of each
    python bench/cli_latency.py --repeats 9 --json out.json
    python bench/cli_latency.py --quick         # 1 run of each
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

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = str(REPO_ROOT / "model.py")
SERVE = str(REPO_ROOT / "serve.py")

COMMANDS = {
    "python -c pass": ["-c", "pass"],
    "model.py --help": [MODEL, "--help"],
    "model.py --epochs x (invalid flag)": [MODEL, "--epochs", "x"],
    "model.py --epochs 0 (invalid value)": [MODEL, "--epochs", "0"],
    "model.py --corpus missing.txt": [MODEL, "--corpus", "missing.txt"],
    "serve.py --model-dir missing": [SERVE, "--model-dir", "missing", "hi"],
    "serve.py --model-dir corrupt": [SERVE, "--model-dir", "corrupt", "hi"],
    "python -c 'import tensorflow'": ["-c", "import tensorflow"],
}


def corrupt_bundle(folder: Path) -> None:
    """A bundle whose model.keras is cut short (a truncated copy)."""
    from moe.lm.text.tokenizer import Tokenizer

    folder.mkdir()
    (folder / "tokenizer.json").write_text(Tokenizer(["a", "b"]).to_json())
    (folder / "max_seq_len.txt").write_text("1\n")
    (folder / "model.keras").write_bytes(b"PK\x03\x04" + b"\x00" * 4096)


def run_once(argv: list[str], cwd: Path) -> tuple[float, int]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, *argv], cwd=cwd, env=env, capture_output=True
    )
    return time.perf_counter() - start, result.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1 run each")
    parser.add_argument("--json", metavar="PATH", help="also write JSON")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    seconds = {name: [] for name in COMMANDS}
    codes = {}
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        corrupt_bundle(cwd / "corrupt")
        for _ in range(repeats):
            for name, argv in COMMANDS.items():
                elapsed, codes[name] = run_once(argv, cwd)
                seconds[name].append(elapsed)
    print(f"{'command':40} {'median s':>9} {'max s':>7} {'exit':>5}")
    results = []
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"{name:40} {median:9.3f} {max(times):7.3f} {codes[name]:5d}")
        results.append(
            {
                "command": name,
                "median_s": median,
                "max_s": max(times),
                "runs": times,
                "exit_code": codes[name],
            }  # fmt: skip
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "python": platform.python_version(),
                    "repeats": repeats,
                    "cpus": os.cpu_count(),
                    "results": results,
                },  # fmt: skip
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
