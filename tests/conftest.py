"""Shared fixtures for the next-word application tests (`moe.lm`)."""

import functools
import os
import runpy
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# A tiny, repetitive corpus: a few epochs learn it well enough to check
# that predictions are sensible words.
LM_TINY_SENTENCES = [
    "the cat sat on the mat.",
    "the dog sat on the rug.",
    "how are you today?",
    "i am fine, thank you.",
    "don't worry about the cat!",
    "the cat and the dog are friends.",
]
LM_TINY_CORPUS = "\n".join(LM_TINY_SENTENCES * 8) + "\n"
# Small and fast; the flags every CLI training run in the tests shares.
LM_TINY_FLAGS = [
    "--epochs", "2", "--batch-size", "16", "--max-seq-len", "3",
    "--embed-dim", "8", "--hidden-dim", "8", "--num-experts", "2",
    "--validation-split", "0.2", "--seed", "7",
]  # fmt: skip


@functools.cache
def load_script(name: str) -> types.SimpleNamespace:
    """The functions of `model.py` or `serve.py`, to call in this process.

    The file is run (not as `__main__`) and its globals returned: no
    change to the import path, no module named after the script.
    """
    return types.SimpleNamespace(**runpy.run_path(str(REPO_ROOT / name)))


# Settings `model.py` and `serve.py` choose unless the user does; a test
# process may have them from loading a script (`load_script`).
SCRIPT_DEFAULTS = ("TF_CPP_MIN_LOG_LEVEL", "TF_CPU_ALLOCATOR_USE_BFC")


def script_env() -> dict:
    """The environment of a user who set none of `SCRIPT_DEFAULTS`."""
    return {k: v for k, v in os.environ.items() if k not in SCRIPT_DEFAULTS}


def run_script(*args, timeout=180, **kwargs) -> subprocess.CompletedProcess:
    """Runs `python <args>` in the repository root, capturing text output."""
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=REPO_ROOT,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


@pytest.fixture(scope="session")
def lm_corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lm_corpus") / "tiny.txt"
    path.write_text(LM_TINY_CORPUS, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def lm_trained(tmp_path_factory, lm_corpus_file):
    """`(bundle_dir, completed_process)` of `model.py` trained via the CLI."""
    out = tmp_path_factory.mktemp("lm_bundle") / "saved_model"
    result = run_script(
        "model.py", "--corpus", lm_corpus_file, "--output", out, *LM_TINY_FLAGS
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.fixture(scope="session")
def lm_predictor(lm_trained):
    from moe.lm.serving.predictor import NextWordPredictor

    return NextWordPredictor.load(lm_trained[0])
