"""Walking a next-word model's layers: which route, and their MoE layers.

Used by training (fine-tuning, freezing, upcycling, the expert reports)
and by serving (explanations, model metadata) alike.
"""


def routed_layers(model) -> list:
    """The top-level layers of a functional `model` that route to experts,
    input first.

    A layer routes if it has a `route()` method (`moe.MoELayer`, the MoE
    Transformer block).
    """
    return [
        layer
        for layer in model.layers
        if callable(getattr(layer, "route", None))
    ]


def moe_layer_of(layer):
    """The `moe.MoELayer` of a routed layer: itself, or a block's `.moe`."""
    inner = getattr(layer, "moe", None)
    return layer if inner is None else inner


def experts_of(layer) -> int:
    """The number of experts of a routed layer (or of the MoE inside it)."""
    return int(moe_layer_of(layer).num_experts)
