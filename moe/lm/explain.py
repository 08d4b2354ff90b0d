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
position: contexts are right-aligned (`moe.lm.data.contexts`), so that is
the position of the last word, the one whose representation predicts the
next word.
"""

import inspect

import keras
from keras import ops


def routed_layers(model: keras.Model) -> list:
    """The top-level layers of `model` that route to experts, input first.

    A layer routes if it has a `route()` method (`moe.MoELayer`, the MoE
    Transformer block).
    """
    return [
        layer
        for layer in model.layers
        if callable(getattr(layer, "route", None)) and layer._inbound_nodes
    ]


def moe_layer_of(layer):
    """The `moe.MoELayer` of a routed layer: itself, or a block's `.moe`."""
    inner = getattr(layer, "moe", None)
    return layer if inner is None else inner


def experts_of(layer) -> int:
    """The number of experts of a routed layer (or of the MoE inside it)."""
    return int(moe_layer_of(layer).num_experts)


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
        if positions not in ("last", "all"):
            raise ValueError(
                '`positions` must be "last" or "all". Received: '
                f"positions={positions!r}"
            )
        super().__init__(**kwargs)
        self.model = model
        self.positions = positions
        self.routed = routed_layers(model)
        if not self.routed:
            raise ValueError(
                f"model {model.name!r} has no layer with a `route()` method "
                "to explain"
            )
        # The tensors each routed layer was called with, as extra outputs of
        # the same graph (Keras records them on the layer's call node).
        self._arguments = [
            layer._inbound_nodes[0].arguments for layer in self.routed
        ]
        tensors = [t for args in self._arguments for t in args.keras_tensors]
        self._features = keras.Model(
            model.inputs, [model.outputs[0], *tensors], name="features"
        )
        self.layer_names = [layer.name for layer in self.routed]

    def call(self, contexts):
        probabilities, *values = self._features(contexts, training=False)
        values = iter(values)
        routes = []
        for layer, arguments in zip(self.routed, self._arguments):
            filled = {id(t): next(values) for t in arguments.keras_tensors}
            args, kwargs = arguments.fill_in(filled)
            kwargs = _route_kwargs(layer, args[0], kwargs, contexts)
            route = layer.route(*args, **kwargs)
            sequence = len(ops.shape(route["expert_indices"])) == 3
            if sequence and self.positions == "last":
                # A sequence: the last position is the last word.
                route = {key: value[:, -1] for key, value in route.items()}
            routes.append(route)
        return probabilities, routes


def _route_kwargs(layer, inputs, call_kwargs, contexts) -> dict:
    """The call's keyword arguments that `route()` takes, plus the mask.

    A Keras mask (e.g. from `Embedding(mask_zero=True)`) reaches a layer
    implicitly, so it is rebuilt from the contexts (0 is padding) for a
    sequence input.
    """
    accepted = inspect.signature(layer.route).parameters
    kwargs = {k: v for k, v in call_kwargs.items() if k in accepted}
    if len(ops.shape(inputs)) == 3:
        mask = ops.not_equal(contexts, 0)
        for name in ("padding_mask", "mask"):
            if name in accepted and kwargs.get(name) is None:
                kwargs[name] = mask
                break
    return kwargs


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
