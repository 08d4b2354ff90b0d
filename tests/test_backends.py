"""The backend matrix, in one place: which tests rerun on which other Keras
backend.

Keras fixes its backend at import, so each entry runs `pytest` on one test
file in a Python process of its own with `KERAS_BACKEND` set (one process,
no xdist workers inside: the outer run already spreads the entries over the
cores). The suite itself runs on TensorFlow; a backend that is not
installed is skipped (requirements-dev.txt installs JAX and PyTorch).

What reruns is what a backend can change: the numbers (the comparisons
with NumPy references and per-token loops, every dispatch layout), saving
and loading, a training step, compiled calls. Tests of argument checks,
docs, and slow end-to-end training behaviour run on TensorFlow only: their
subject does not depend on the backend, and eager JAX and PyTorch make them
several times slower.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

# What each backend-dependent test file reruns: `-k` expression ("" = the
# whole file).
RERUN = {
    "test_moe_layer.py": (
        "outputs_equal_reference or perturbing or keras_file_round_trip"
        " or one_fit_step or compiled or losses_ignore_padding"
    ),
    "test_routings.py": "outputs_equal_reference or fit_step",
    "test_router_options.py": "outputs_and_routes_equal_reference",
    "test_experts.py": "reference and not contract",
    "test_transformer.py": "keras_round_trip or causal",
    "test_routing_functions.py": "",
    "test_losses.py": "",
    "test_legacy_files.py": "pooled",
    "test_dispatch.py": "not under_xla and not on_tensorflow",
    "test_lora.py": "every_dispatch_layout or fit",
    "test_quantization.py": "numpy",
    "test_convert.py": "parity and (mixtral or deepseek_v3 or gpt_oss)",
}
# keras-hub's models run slowly eagerly: one family, on JAX only.
ONLY_ON = {("jax", "test_keras_hub.py"): "mixtral"}

OTHER_BACKENDS = [
    b for b in ("tensorflow", "jax", "torch") if b != keras.backend.backend()
]
CASES = [
    (backend, name, selection)
    for backend in OTHER_BACKENDS
    for name, selection in RERUN.items()
] + [
    (backend, name, selection)
    for (backend, name), selection in ONLY_ON.items()
    if backend in OTHER_BACKENDS
]


@pytest.mark.parametrize(
    "backend, name, selection",
    CASES,
    ids=[f"{backend}-{name[5:-3]}" for backend, name, _ in CASES],
)
def test_reruns_on_backend(backend, name, selection):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    path = Path(__file__).parent / name
    result = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            "-n", "0", str(path), *(["-k", selection] if selection else []),
        ],
        env=dict(os.environ, KERAS_BACKEND=backend),
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout, result.stdout[-2000:]
