"""`.keras` files written by earlier versions of `moe` still load and give
the outputs they gave when they were written.

The fixtures (`tests/fixtures/legacy/`, written by
`tests/fixtures/write_legacy_fixtures.py` with the monolithic `MoELayer`
that predates the router and experts components) cover every routing,
capacity, shared, gated and biasless experts, router noise, masks and the
Transformer block.
"""

from pathlib import Path

import keras
import numpy as np
import pytest

import moe  # noqa: F401  (registers the layers)

FIXTURES = Path(__file__).parent / "fixtures" / "legacy"


@pytest.mark.parametrize("name", ["pooled", "routings", "transformer"])
def test_legacy_file_loads_with_the_same_outputs(name):
    model = keras.saving.load_model(FIXTURES / f"{name}.keras")
    arrays = np.load(FIXTURES / f"{name}.npz")
    got = keras.ops.convert_to_numpy(model(arrays["input_0"]))
    np.testing.assert_allclose(got, arrays["output"], rtol=1e-5, atol=1e-6)
