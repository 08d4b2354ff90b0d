"""Initialising stacked expert weights one expert at a time.

`Experts` stacks every expert's matrix in one `(num_experts, ...)`
variable; each expert's slice is drawn here on its own shape and with its
own seed, so that experts start different and each has the statistics of
one `Dense` kernel.
"""

import random as python_random
import zlib

import numpy as np
from keras import ops

from moe import validation


class PerExpertInitializer:
    """Initialise a stacked `(experts, ...)` weight one expert at a time.

    Keras computes fans from all leading axes of a 3-D shape, which would
    scale a variance-scaling initializer by the number of experts, so each
    expert's slice is drawn on its own shape. A random initializer with an
    integer seed or none (Keras turns `seed=None` into one fixed seed, so
    calling it again returns the same tensor) is rebuilt for each slice
    with its own seed, derived from `(base seed, stream, expert)`: experts
    differ, and so do the weights of one expert (`stream` names the
    weight). Initializers without a seed (`"zeros"`), with a
    `keras.random.SeedGenerator` (which advances on each call) or with no
    config are called as they are.
    """

    def __init__(self, initializer, base_seed, stream):
        self.initializer = initializer
        self.base_seed = base_seed
        self.stream = stream

    def __call__(self, shape, dtype=None):
        config = _config_of(self.initializer)
        seed = None if config is None else config.get("seed", "absent")
        reseed = seed is None or validation.is_integer(seed)
        slices = []
        for e in range(shape[0]):
            initializer = self.initializer
            if reseed:
                initializer = self.initializer.__class__.from_config(
                    {
                        **config,
                        "seed": derived_seed(self.base_seed, self.stream, e),
                    }
                )
            slices.append(initializer(shape[1:], dtype=dtype))
        return ops.stack(slices)


def _config_of(initializer):
    get_config = getattr(initializer, "get_config", None)
    if get_config is None or not hasattr(initializer, "from_config"):
        return None
    return get_config()


def derived_seed(base_seed, stream, index):
    """A seed in `[0, 2**31)` for item `index` of the named `stream`, mixed
    from `base_seed` (NumPy's `SeedSequence`: nearby inputs give unrelated
    seeds)."""
    entropy = [base_seed, zlib.crc32(stream.encode()), index]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] >> 1)


def base_seed(initializer, seed):
    """The seed an expert bank's initialisation derives from: the
    initializer's own integer seed, else the layer's `seed`, else one drawn
    from Python's `random` (seeded by `keras.utils.set_random_seed`, as
    Keras's own default seeds are)."""
    config = _config_of(initializer) or {}
    if validation.is_integer(config.get("seed")):
        return int(config["seed"])
    if seed is not None:
        return int(seed)
    return python_random.randint(1, 10**9)
