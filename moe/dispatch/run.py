"""`run_experts`: the one entry point from a routing decision to the
experts' outputs. It matches on the decision's type (`moe.decisions`) and
on the experts' kind, and calls the layout that fits."""

from keras import ops

from moe.decisions import EveryExpert, ExpertChoice, SoftChoice
from moe.dispatch.dense import (
    dense_experts,
    expert_choice_dispatch,
    soft_dispatch,
)
from moe.dispatch.layer_loop import (
    layer_dense,
    layer_expert_choice,
    layer_soft,
    layer_token_choice,
)
from moe.dispatch.sparse import sparse_dispatch


def run_experts(
    decision,
    experts,
    tokens,
    token_mask=None,
    capacity_factor=None,
    mode="auto",
    training=None,
):
    """Run the experts on the tokens the decision routes to them.

    Stacked experts (`moe.Experts`, anything with `stacked_weights` and
    `expert_fn`) run in the layouts of `moe.dispatch`; experts that are
    Keras layers (`moe.LayerExperts`, with `num_experts` and `run_expert`)
    one after the other (`moe.dispatch.layer_loop`).

    Args:
        decision: a `TokenChoice` (or any decision with `expert_indices`
            and `expert_weights`, e.g. a `HierarchicalChoice`), a
            `SoftChoice`, an `ExpertChoice` or `EveryExpert()`.
        experts: a `moe.Experts` or `moe.LayerExperts`.
        tokens: `(T, d)`.
        token_mask: bool `(T,)` or `None`; unrouted tokens get zeros (token
            choice; the other decisions carry their own mask).
        capacity_factor: float or `None` (dropless), token choice's capacity
            (`moe.dispatch.drop_over_capacity`).
        mode: the layer's `dispatch` argument (`DISPATCH_MODES`).
        training: bool, passed to expert layers.

    Returns:
        `(outputs (T, d_out), dropped)`: `dropped` is the float32 fraction
        of routed pairs dropped for capacity (for expert choice, of the
        routed tokens no expert picked; 0 for soft and every-expert).
    """
    stacked = hasattr(experts, "stacked_weights")
    none_dropped = ops.zeros((), "float32")
    if isinstance(decision, EveryExpert):
        if stacked:
            outputs = dense_experts(
                tokens, experts.stacked_weights, experts.expert_fn
            )
        else:
            outputs = layer_dense(tokens, experts, training)
        return outputs, none_dropped
    if isinstance(decision, SoftChoice):
        weights = decision.expert_weights  # (T, E)
        if stacked:
            outputs = soft_dispatch(
                tokens, weights, experts.stacked_weights, experts.expert_fn
            )
        else:
            outputs = layer_soft(tokens, weights, experts, training)
        return outputs, none_dropped
    if isinstance(decision, ExpertChoice):
        picks = (decision.token_indices, decision.pick_weights, decision.picked)
        if stacked:
            outputs = expert_choice_dispatch(
                tokens, *picks, experts.stacked_weights, experts.expert_fn
            )
        else:
            outputs = layer_expert_choice(tokens, *picks, experts, training)
        return outputs, unpicked_fraction(decision.chosen_by, token_mask)
    # Token choice.
    indices, weights = decision.expert_indices, decision.expert_weights
    if stacked:
        return sparse_dispatch(
            tokens,
            indices,
            weights,
            token_mask,
            experts.stacked_weights,
            experts.expert_fn,
            capacity_factor,
            mode,
        )
    return layer_token_choice(
        tokens,
        indices,
        weights,
        token_mask,
        experts,
        capacity_factor,
        mode,
        training,
    )


def unpicked_fraction(chosen_by, token_mask):
    """Expert choice's `dropped`: the fraction of routed tokens that no
    expert picked, from `chosen_by` `(T, E)`."""
    unpicked = ops.cast(ops.sum(chosen_by, axis=1) == 0, "float32")  # (T,)
    routed = (
        ops.ones_like(unpicked)
        if token_mask is None
        else ops.cast(token_mask, "float32")
    )
    return ops.sum(unpicked * routed) / ops.maximum(ops.sum(routed), 1.0)
