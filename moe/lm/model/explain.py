"""Which experts a query went to: routing explanations for serving.

`ExplainedModel` wraps a trained next-word model so that ONE call returns
the next-word probabilities and, for every routed layer of the model (a
`moe.MoELayer`, or any layer with a `route()` method such as the MoE
Transformer block), the experts the query's context was sent to with their
gate weights. The routed layers' inputs come from the same forward pass as
the probabilities, and each layer is asked for its `route()` with exactly
the arguments the model called it with, so the explanation is the routing
the prediction used.

A layer that routes a sequence (`(batch, seq, d)`) is explained at its last
position: contexts are right-aligned (`moe.lm.text.examples.contexts`), so
that is the position of the last word, the one whose representation predicts
the
next word.
"""

import inspect

import keras
from keras import ops

from moe import validation
from moe.lm.model.routed_layers import routed_layers


class ExplainedModel(keras.Model):
    """`context -> (probabilities, routes)` in one forward pass.

    Args:
        model: a functional next-word model, int32 contexts
            `(batch, max_seq_len)` -> probabilities `(batch, vocab_size)`.
        positions: `"last"` (default): a layer routing a sequence is
            reported at its last position, the last word; `"all"`: at every
            position (`(batch, seq, k)` tensors; padding is not kept).

    Call arguments:
        contexts: int32 `(batch, max_seq_len)`, right-aligned, 0 = padding.

    Returns:
        `(probabilities, routes)`: probabilities `(batch, vocab_size)` and
        one dict per routed layer (see `routed_layers`) with `(batch, k)`
        tensors `"expert_indices"` (int32), `"expert_weights"` (float32)
        and `"kept"` (bool) — the layer's `route()` (at the last position
        of a sequence, with `positions="last"`).

    Raises:
        ValueError: the model has no routed layer.

    Example:
        explained = ExplainedModel(model)
        probs, routes = explained(contexts)
        routes[0]["expert_indices"]  # (batch, k)
    """

    def __init__(self, model, positions="last", **kwargs):
        validation.one_of("positions", positions, ("last", "all"))
        super().__init__(**kwargs)
        self.model = model
        self.positions = positions
        self.routed = routed_layers(model)
        if not self.routed:
            raise ValueError(
                f"model {model.name!r} has no layer with a `route()` method "
                "to explain"
            )
        # The tensors each routed layer was called with (`layer.input`), as
        # extra outputs of the same graph, and the `route()` argument each
        # one is.
        inputs = [_call_tensors(layer) for layer in self.routed]
        self._names = [
            _argument_names(layer, tensors)
            for layer, tensors in zip(self.routed, inputs)
        ]
        self._features = keras.Model(
            model.inputs,
            [model.outputs[0], *(t for tensors in inputs for t in tensors)],
            name="features",
        )
        self.layer_names = [layer.name for layer in self.routed]

    def call(self, contexts):
        probabilities, *values = self._features(contexts, training=False)
        values = iter(values)
        routes = []
        for layer, names in zip(self.routed, self._names):
            inputs, *extra = [next(values) for _ in names]
            kwargs = dict(zip(names[1:], extra))
            kwargs = _with_mask(layer, inputs, kwargs, contexts)
            route = layer.route(inputs, **kwargs)
            sequence = len(ops.shape(route["expert_indices"])) == 3
            if sequence and self.positions == "last":
                # A sequence: the last position is the last word.
                route = {key: value[:, -1] for key, value in route.items()}
            routes.append(route)
        return probabilities, routes


def _call_tensors(layer) -> list:
    """The tensors the model called `layer` with: its input first, then
    those given as keyword arguments, in the order of their names."""
    tensors = layer.input
    return list(tensors) if isinstance(tensors, (list, tuple)) else [tensors]


def _argument_names(layer, tensors) -> list:
    """`[None, route() argument, ...]`: what each call tensor is to `route()`.

    Besides its input, a routed layer takes at most a mask (bool) and a
    routing key (integer), the two optional arguments of `route()`; so a
    tensor's dtype says which it is.
    """
    names = [None]
    for tensor in tensors[1:]:
        dtype = keras.backend.standardize_dtype(tensor.dtype)
        if dtype == "bool":
            name = _mask_argument(layer)
        elif "int" in dtype:
            name = "routing_key"
        else:
            name = None
        if name not in inspect.signature(layer.route).parameters:
            raise ValueError(
                f"cannot explain layer {layer.name!r}: it is called with a "
                f"{dtype} tensor besides its input, and its `route()` takes "
                "only a bool mask and an integer `routing_key`"
            )
        names.append(name)
    return names


def _mask_argument(layer) -> str | None:
    """The name of the mask argument of `layer.route()`, if it has one."""
    accepted = inspect.signature(layer.route).parameters
    return next((n for n in ("padding_mask", "mask") if n in accepted), None)


def _with_mask(layer, inputs, kwargs, contexts) -> dict:
    """`kwargs` plus the mask of a sequence input, when not given.

    A Keras mask (e.g. from `Embedding(mask_zero=True)`) reaches a layer
    implicitly, so it is rebuilt from the contexts (0 is padding).
    """
    name = _mask_argument(layer)
    if (
        len(ops.shape(inputs)) != 3
        or name is None
        or kwargs.get(name) is not None
    ):
        return kwargs
    return {**kwargs, name: ops.not_equal(contexts, 0)}


def experts_by_row(route: dict, row: int) -> list[list]:
    """`[[expert, weight], ...]` of one row: kept pairs, heaviest first."""
    pairs = [
        [int(e), float(w)]
        for e, w, kept in zip(
            route["expert_indices"][row],
            route["expert_weights"][row],
            route["kept"][row],
        )
        if kept
    ]
    return sorted(pairs, key=lambda pair: -pair[1])
