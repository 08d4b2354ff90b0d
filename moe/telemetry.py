"""Routing statistics that `MoELayer` logs as metrics.

`"summary"` (the default) logs two entries per layer whatever the number of
experts, so the progress line stays readable: `max_load`, the busiest
expert's share of the assignments since the metrics were reset (an epoch in
`fit()`) times `num_experts` (1.0 is perfectly balanced, `num_experts` is
everything on one expert), and `dropped`, the fraction of assignments
dropped for capacity (for expert choice: of the inputs no expert picked).
`"full"` adds `load_<e>`, each expert's share, and the router's own
statistics (`Router.telemetry_names`, e.g. `router_entropy`); `"none"`
logs nothing.
"""

import keras
from keras import ops

MODES = ("summary", "full", "none")


class MaxLoad(keras.metrics.Metric):
    """The busiest expert's mean load times `num_experts` (1.0: balanced).

    The loads are averaged per expert first, then the maximum taken, so the
    figure is that of all the steps (and replicas) together, not a mean of
    per-step maxima.
    """

    def __init__(self, num_experts, name="max_load", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.num_experts = num_experts
        self.total = self.add_variable(
            shape=(num_experts,), initializer="zeros", name="total"
        )
        self.count = self.add_variable(
            shape=(), initializer="zeros", name="count"
        )

    def update_state(self, load):
        self.total.assign_add(ops.cast(load, self.dtype))
        self.count.assign_add(ops.ones((), self.dtype))

    def result(self):
        mean = self.total / ops.maximum(self.count, 1.0)
        return ops.max(mean) * self.num_experts

    def get_config(self):
        return {**super().get_config(), "num_experts": self.num_experts}


def metric_names(mode, router):
    """The statistics logged in `mode`, without the layer's prefix."""
    if mode == "none" or keras.backend.backend() == "jax":
        # JAX's trainer cannot update metrics a layer owns
        # (keras-team/keras#21639): `route()` remains there.
        return []
    names = ["max_load", "dropped"]
    if mode == "full":
        names = [f"load_{e}" for e in range(router.num_experts)] + names
        names += list(router.telemetry_names)
    return names


def make_metrics(names, router, prefix):
    """One metric per name, called `<prefix>_<name>`."""
    return [
        MaxLoad(router.num_experts, name=f"{prefix}_{name}")
        if name == "max_load"
        else keras.metrics.Mean(name=f"{prefix}_{name}")
        for name in names
    ]
