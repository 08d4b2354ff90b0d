"""Rerun the layer tests on the other Keras backends, each in a subprocess.

Keras fixes its backend at import, so JAX and PyTorch need their own Python
processes. A backend that is not installed is skipped (requirements-dev.txt
installs both).
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

LAYER_TESTS = [
    "test_moe_layer.py",
    "test_gating_network.py",
    "test_routings.py",
    "test_transformer.py",
    "test_legacy_files.py",
    "test_router_options.py",
    "test_experts.py",
    "test_routing_functions.py",
    "test_losses.py",
    "test_docs.py",
]
OTHER_BACKENDS = [
    b for b in ("tensorflow", "jax", "torch") if b != keras.backend.backend()
]


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_layer_tests_pass_on_backend(backend):
    module = "tensorflow" if backend == "tensorflow" else backend
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")
    tests_dir = Path(__file__).parent
    env = dict(os.environ, KERAS_BACKEND=backend)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            *[str(tests_dir / name) for name in LAYER_TESTS],
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


@pytest.mark.skipif(
    "jax" not in OTHER_BACKENDS or importlib.util.find_spec("jax") is None,
    reason="runs from the TensorFlow suite, with JAX installed",
)
def test_keras_hub_parity_on_jax():
    # keras-hub's models are slow to run eagerly on JAX: two families.
    tests_dir = Path(__file__).parent
    result = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            "-n", "0", str(tests_dir / "test_keras_hub.py"),
            "-k", "mixtral or qwen3_moe",
        ],
        env=dict(os.environ, KERAS_BACKEND="jax"),
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
