"""Experts that are Keras layers (`moe.LayerExperts`): one expert at a
time, a Python loop of `num_experts` calls.

The same routing pairs and capacity rule as the stacked layouts
(`moe.dispatch.pairs`); each expert runs only on the rows routed to it.
With dynamic shapes (eager, TensorFlow graphs, PyTorch) an expert gets
exactly its rows; under a compiler a static buffer of `capacity` rows (all
the tokens when dropless) whose unused rows are zeros, and a masking expert
(a nested `MoELayer`) is told which rows are real.
"""

from keras import ops

from moe.dispatch.pairs import (
    drop_over_capacity,
    flatten_pairs,
    pad_row,
    positions_in_expert,
    static_dim,
)
from moe.dispatch.sparse import use_static_layout


def layer_token_choice(
    tokens,
    expert_indices,
    expert_weights,
    token_mask,
    experts,
    capacity_factor=None,
    mode="auto",
    training=None,
):
    """Token choice over expert layers; the arguments and result of
    `sparse_dispatch`, with `experts` a `moe.LayerExperts`."""
    num_tokens = static_dim(tokens, 0)
    k = ops.shape(expert_indices)[1]
    num_experts = experts.num_experts
    pair_experts, pair_weights = flatten_pairs(
        expert_indices, expert_weights, token_mask, num_experts
    )
    pair_experts, positions, capacity, dropped = drop_over_capacity(
        pair_experts, num_tokens, k, num_experts, capacity_factor
    )
    pair_tokens = ops.tile(ops.arange(num_tokens, dtype="int32"), (k,))
    if not use_static_layout(tokens, mode):
        outputs = 0.0
        for e in range(num_experts):
            (pairs,) = ops.nonzero(ops.equal(pair_experts, e))
            owners = ops.take(pair_tokens, pairs, axis=0)
            y = experts.run_expert(
                e, ops.take(tokens, owners, axis=0), None, training
            )
            y = y * ops.cast(ops.take(pair_weights, pairs), y.dtype)[:, None]
            outputs = outputs + ops.segment_sum(
                y, owners, num_segments=num_tokens
            )
        return outputs, dropped
    if capacity is None:
        # A token meets an expert at most once: dropless, `tokens` rows.
        positions, _ = positions_in_expert(pair_experts, num_experts)
        capacity = num_tokens
    # (E, C) the token of each buffer row, `num_tokens` if unused.
    num_slots = num_experts * capacity
    dest = ops.where(
        ops.less(pair_experts, num_experts),
        pair_experts * capacity + positions,
        num_slots,
    )
    slots = ops.scatter_update(
        ops.full((num_slots + 1,), num_tokens, dtype="int32"),
        dest[:, None],
        pair_tokens,
    )[:num_slots]
    slots = ops.reshape(slots, (num_experts, capacity))
    rows = []
    for e in range(num_experts):
        real = ops.less(slots[e], num_tokens)
        x = ops.take(pad_row(tokens), slots[e], axis=0)
        rows.append(experts.run_expert(e, x, real, training))
    # Each pair reads its buffer row; pairs are summed per token.
    rows = ops.take(pad_row(ops.concatenate(rows, axis=0)), dest, axis=0)
    rows = rows * ops.cast(pair_weights, rows.dtype)[:, None]
    return ops.sum(ops.reshape(rows, (k, num_tokens, -1)), axis=0), dropped


def layer_soft(tokens, expert_weights, experts, training=None):
    """Every expert layer on every token, weighted by `(T, E)`."""
    outputs = 0.0
    for e in range(experts.num_experts):
        y = experts.run_expert(e, tokens, None, training)
        outputs = outputs + y * ops.cast(expert_weights[:, e : e + 1], y.dtype)
    return outputs


def layer_expert_choice(
    tokens, token_indices, weights, picked, experts, training=None
):
    """Each expert layer on the `(E, C)` tokens it picked."""
    num_tokens = ops.shape(tokens)[0]
    outputs = 0.0
    for e in range(experts.num_experts):
        rows = ops.where(picked[e], token_indices[e], num_tokens)
        x = ops.take(pad_row(tokens), rows, axis=0)
        y = experts.run_expert(e, x, picked[e], training)
        y = y * ops.cast(weights[e], y.dtype)[:, None]
        outputs = (
            outputs
            + ops.segment_sum(y, rows, num_segments=num_tokens + 1)[:num_tokens]
        )
    return outputs


def layer_dense(tokens, experts, training=None):
    """Every expert layer on every token, summed (weight 1)."""
    outputs = 0.0
    for e in range(experts.num_experts):
        outputs = outputs + experts.run_expert(e, tokens, None, training)
    return outputs
