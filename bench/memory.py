"""Peak memory of `python model.py` on a corpus and on it repeated 10x.

Each run is a child process (`python model.py --corpus FILE --epochs N
--patience N --output TMP`); its peak resident set size comes from
`os.wait4` (the kernel's `ru_maxrss` of that child alone). The 10x corpus
is the same text written 10 times into a temporary file; both runs train
the same number of epochs. The data pipeline streams contexts out of the
token stream, so memory should grow with the corpus only through the
token stream and the vocabulary.

Target: peak RSS on 10x the corpus <= 1.3x that on the corpus.

Usage:
    python bench/memory.py                    # alice.txt, ~2 min
    python bench/memory.py --corpus book.txt --epochs 2
    python bench/memory.py --quick            # built-in corpus, seconds
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO_ROOT.parent / "shared" / "corpora" / "alice.txt"
BUILT_IN_CORPUS = REPO_ROOT / "moe" / "lm" / "text" / "default_corpus.txt"
QUICK_FLAGS = ["--embed-dim", "16", "--hidden-dim", "16", "--num-experts", "2"]


def peak_rss_mb(command: list[str]) -> float:
    """Runs `command` in the repository root; its peak RSS in MiB."""
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    # wait4 reaps the child and returns its own rusage (Linux: KiB).
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    stderr = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    if process.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{stderr[-2000:]}")
    return usage.ru_maxrss / 1024


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a quarter of the built-in corpus, 1 epoch, tiny model",
    )
    parser.add_argument(
        "--corpus",
        type=Path,
        help=f"text file (default: {DEFAULT_CORPUS} if present, else the "
        "built-in corpus)",
    )
    parser.add_argument("--epochs", type=int, help="epochs of both runs")
    parser.add_argument("--times", type=int, default=10, help="repetitions")
    parser.add_argument("--json", type=Path, help="write results here")
    args = parser.parse_args(argv)
    if args.corpus is not None and not args.corpus.is_file():
        parser.exit(2, f"{parser.prog}: error: no such file: {args.corpus}\n")
    corpus = args.corpus
    if corpus is None:
        use_alice = not args.quick and DEFAULT_CORPUS.is_file()
        corpus = DEFAULT_CORPUS if use_alice else BUILT_IN_CORPUS
    epochs = args.epochs or (1 if args.quick else 2)
    flags = QUICK_FLAGS if args.quick else []

    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        text = corpus.read_text(encoding="utf-8")
        if args.quick and args.corpus is None:
            # A quarter of the built-in corpus: the runs are mostly start-up.
            corpus = Path(tmp) / "quarter.txt"
            text = text[: len(text) // 4]
            corpus.write_text(text, encoding="utf-8")
        repeated = Path(tmp) / "repeated.txt"
        repeated.write_text("\n\n".join([text] * args.times), encoding="utf-8")
        for name, path in (("once", corpus), (f"x{args.times}", repeated)):
            command = [
                sys.executable, "model.py", "--corpus", str(path),
                "--epochs", str(epochs), "--patience", str(epochs),
                "--output", str(Path(tmp) / name), *flags,
            ]  # fmt: skip
            runs[name] = {
                "corpus_bytes": path.stat().st_size,
                "peak_rss_mb": peak_rss_mb(command),
            }
    once, many = runs["once"], runs[f"x{args.times}"]
    ratio = many["peak_rss_mb"] / once["peak_rss_mb"]
    print(
        f"# python model.py --epochs {epochs} {' '.join(flags)}; corpus "
        f"{corpus}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores"
    )
    for name, run in runs.items():
        print(
            f"{name:<6}{run['corpus_bytes'] / 1e6:>8.2f} MB text"
            f"{run['peak_rss_mb']:>10.0f} MiB peak RSS"
        )
    print(f"ratio x{args.times} / once: {ratio:.2f}")
    results = {
        "corpus": str(corpus),
        "epochs": epochs,
        "times": args.times,
        "runs": runs,
        "ratio": ratio,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
