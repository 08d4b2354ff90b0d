"""Copying a trained model's weights into a freshly built one.

`copy_weights(source, target)` copies every weight layer by layer (the
builders name every top-level layer), for a model continued as it is
(`--init-from`). With `upcycle=True` it upcycles a dense model (one expert
per MoE layer) into a Mixture of Experts (sparse upcycling): every expert
of `target` starts as a copy of the dense feed-forward network, the shared
experts and every other weight are copied, and the router keeps its fresh
initialization. With routing weights that sum to 1 (top-k routing
normalizes the chosen scores by default), the upcycled model's output is
at first exactly the dense one's: each token's experts are identical, so
their weighted sum is the dense network's output.

References:
    Komatsuzaki et al., 2022, "Sparse Upcycling: Training Mixture-of-Experts
    from Dense Checkpoints".
"""

import numpy as np

from moe.lm.model.routed_layers import moe_layer_of, routed_layers


def copy_weights(source, target, upcycle: bool = False) -> None:
    """Sets `target`'s weights from `source`'s, layer by layer.

    Args:
        source: the trained model.
        target: a model built by the same builder with the same settings
            (with `upcycle`, the same but for the MoE settings).
        upcycle: `source` is dense: tile its single expert over `target`'s
            experts, and leave `target`'s routers as they are.

    Raises:
        ValueError: the models differ (a layer missing, another shape).
    """
    routed = {id(layer) for layer in routed_layers(target)}
    for layer in target.layers:
        if not layer.weights:
            continue
        try:
            old = source.get_layer(layer.name)
        except ValueError:
            raise ValueError(f"it has no layer {layer.name!r}") from None
        if id(layer) not in routed:
            _copy(old.weights, layer.weights)
            continue
        new_moe, old_moe = moe_layer_of(layer), moe_layer_of(old)
        parts = [(new_moe.experts, old_moe.experts)]
        if new_moe.shared_experts is not None:
            if old_moe.shared_experts is None:
                raise ValueError(f"{layer.name!r} has no shared experts")
            parts.append((new_moe.shared_experts, old_moe.shared_experts))
        if not upcycle:
            parts.append((new_moe.router, old_moe.router))
        covered = {id(w) for new, _ in parts for w in new.weights}
        covered |= {id(w) for w in new_moe.router.weights}
        for new, old_part in parts:
            tile = upcycle and new is new_moe.experts
            _copy(old_part.weights, new.weights, tile=tile)
        old_parts = (old_moe.experts, old_moe.shared_experts, old_moe.router)
        old_covered = {
            id(w)
            for part in old_parts
            if part is not None
            for w in part.weights
        }
        # The rest of the layer: a block's attention and norms, a gate.
        _copy(
            [w for w in old.weights if id(w) not in old_covered],
            [w for w in layer.weights if id(w) not in covered],
        )


def _copy(old_weights, new_weights, tile: bool = False) -> None:
    if len(old_weights) != len(new_weights):
        raise ValueError(
            f"{len(old_weights)} weights where {len(new_weights)} are "
            f"expected ({', '.join(w.path for w in new_weights)})"
        )
    for old, new in zip(old_weights, new_weights):
        value = np.asarray(old.numpy())
        if tile and value.shape[0] == 1:
            # (1, ...) -> (num_experts, ...): every expert the dense FFN.
            value = np.repeat(value, new.shape[0], axis=0)
        if tuple(value.shape) != tuple(new.shape):
            raise ValueError(
                f"{new.path} has shape {tuple(new.shape)}, the saved model's "
                f"{tuple(value.shape)}"
            )
        new.assign(value)
