"""How close `moe.convert.from_transformers` comes to the Hugging Face blocks.

For every tiny seeded block of `tests/hf_blocks.py` (the blocks the parity
tests use): the max abs difference between the converted `MoELayer`'s outputs
and Hugging Face's, on the backend `KERAS_BACKEND` names, and how long the
pieces take: importing torch and transformers, building and running all the
Hugging Face blocks, converting them and calling the layers (first calls:
tracing included).

Run it as a module from the repository root, so that `tests.hf_blocks`
imports without a path edit:

    python -m bench.convert_parity
    KERAS_BACKEND=jax python -m bench.convert_parity --json parity.json
"""

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from moe.convert import from_transformers  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write results here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    import torch  # noqa: F401  (timed: the tests pay it once)
    import transformers

    from tests import hf_blocks  # the tiny blocks, defined once

    import_s = time.perf_counter() - start
    print(
        f"backend {keras.backend.backend()}, transformers "
        f"{transformers.__version__}"
    )
    print(f"{'case':<22} {'max abs diff':>12}")
    results, hf_s, moe_s = [], 0.0, 0.0
    for case in hf_blocks.CASES:
        start = time.perf_counter()
        block = hf_blocks.hf_block(case)
        hf_s += time.perf_counter() - start
        start = time.perf_counter()
        layer = from_transformers(block.config, block.weights)
        outputs = ops.convert_to_numpy(layer(block.inputs))
        moe_s += time.perf_counter() - start
        diff = float(np.max(np.abs(outputs - block.outputs)))
        print(f"{case:<22} {diff:>12.2e}")
        results.append(dict(case=case, max_abs_diff=diff))
    print(
        f"import torch + transformers {import_s:.1f} s, Hugging Face blocks "
        f"{hf_s:.1f} s, conversions and calls {moe_s:.1f} s"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                dict(
                    backend=keras.backend.backend(),
                    transformers=transformers.__version__,
                    import_s=import_s,
                    hf_blocks_s=hf_s,
                    conversions_s=moe_s,
                    results=results,
                ),
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
