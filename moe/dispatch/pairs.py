"""Routing pairs: the `(tokens, k)` decision flattened to slot-major
(token, expert) pairs, their ranks per expert, capacities, and the gather /
combine steps the buffer layouts share."""

import math

from keras import ops


def positions_in_expert(pair_experts, num_experts):
    """Rank of each pair among the pairs that chose the same expert.

    Args:
        pair_experts: int32 `(pairs,)`, the expert of each pair, or
            `num_experts` for a pair that is not routed (padding).
        num_experts: int.

    Returns:
        `(positions, counts)`: int32 `(pairs,)` with `-1` for unrouted pairs,
        and int32 `(num_experts,)` the number of pairs per expert.
    """
    # (pairs, num_experts); the extra column absorbs unrouted pairs.
    one_hot = ops.one_hot(pair_experts, num_experts + 1, dtype="int32")
    one_hot = one_hot[:, :num_experts]
    positions = ops.sum(ops.cumsum(one_hot, axis=0) * one_hot, axis=1) - 1
    return positions, ops.sum(one_hot, axis=0)


def expert_capacity(num_tokens, top_k, num_experts, capacity_factor):
    """Slots per expert: `ceil(capacity_factor * tokens * k / experts)`.

    Never more than `num_tokens` (an expert cannot receive a token twice) and
    at least 1 when there are tokens (0 for none). `num_tokens` may be a
    Python int or a scalar tensor. With `top_k=1` it is also expert choice's
    picks per expert.
    """
    if isinstance(num_tokens, int):
        capacity = math.ceil(capacity_factor * num_tokens * top_k / num_experts)
        return min(num_tokens, max(1, capacity))
    capacity = ops.cast(
        ops.ceil(
            capacity_factor
            * ops.cast(num_tokens * top_k, "float32")
            / num_experts
        ),
        "int32",
    )
    return ops.minimum(num_tokens, ops.maximum(1, capacity))


def flatten_pairs(expert_indices, expert_weights, token_mask, num_experts):
    """`(tokens, k)` routing -> slot-major `(k * tokens,)` pair vectors.

    Pair `p = slot * tokens + token`. Returns `(pair_experts, pair_weights)`;
    the expert of a token outside `token_mask` (bool `(tokens,)` or `None`)
    is replaced by `num_experts`, which every dispatch skips.
    """
    k = ops.shape(expert_indices)[1]
    pair_experts = ops.reshape(ops.transpose(expert_indices), (-1,))
    pair_weights = ops.reshape(ops.transpose(expert_weights), (-1,))
    if token_mask is not None:
        pair_routed = ops.tile(token_mask, (k,))
        pair_experts = ops.where(pair_routed, pair_experts, num_experts)
    return pair_experts, pair_weights


def pad_row(x):
    # Append one zero row: index `len(x)` then reads zeros.
    return ops.concatenate([x, ops.zeros_like(x[:1])], axis=0)


def fill_slots(dest, pair_tokens, num_slots, pad_token):
    # Inverse of `dest`: for each of `num_slots` buffer rows, the token that
    # fills it, or `pad_token` (a zero row) if none does. Pairs sent to
    # `dest == num_slots` (dropped or unrouted) land in a discarded slot.
    slots = ops.full((num_slots + 1,), pad_token, dtype="int32")
    slots = ops.scatter_update(slots, ops.expand_dims(dest, 1), pair_tokens)
    return slots[:num_slots]


def combine(expert_rows, dest, pair_weights, num_tokens, k):
    # expert_rows: (rows, d_out); dest: (pairs,) row of each pair, `rows` if
    # the pair was dropped. Returns (tokens, d_out) = sum_k weight * row.
    rows = ops.take(pad_row(expert_rows), dest, axis=0)
    rows = rows * ops.cast(pair_weights, rows.dtype)[:, None]
    return ops.sum(ops.reshape(rows, (k, num_tokens, -1)), axis=0)


def static_dim(x, axis):
    """The Python int size of `axis` when known while tracing, else a
    tensor."""
    size = x.shape[axis]
    return size if size is not None else ops.shape(x)[axis]


def drop_over_capacity(
    pair_experts, num_tokens, k, num_experts, capacity_factor
):
    """The capacity rule, the one place it is written.

    With `capacity_factor=None` (dropless) nothing changes. Else each expert
    keeps the first `expert_capacity(num_tokens, k, num_experts,
    capacity_factor)` of the pairs routed to it, in pair order (first
    choices before second choices, earlier tokens before later ones:
    GShard's rule), and the others are dropped: their expert becomes
    `num_experts`, which every layout skips.

    Args:
        pair_experts: int32 `(k * tokens,)` slot-major pair experts
            (`flatten_pairs`), `num_experts` for unrouted pairs.
        num_tokens: int or scalar tensor.
        k: pairs per token.
        num_experts: int.
        capacity_factor: float or `None`.

    Returns:
        `(pair_experts, positions, capacity, dropped)`: the pair experts
        with the dropped ones at `num_experts`; each pair's rank within its
        expert (`positions_in_expert`) and the capacity, `None` when
        dropless; and `dropped`, the float32 fraction of routed pairs
        dropped.
    """
    if capacity_factor is None:
        return pair_experts, None, None, ops.zeros((), "float32")
    positions, _ = positions_in_expert(pair_experts, num_experts)
    capacity = expert_capacity(num_tokens, k, num_experts, capacity_factor)
    routed = ops.less(pair_experts, num_experts)
    kept = ops.logical_and(routed, ops.less(positions, capacity))
    dropped = 1.0 - ops.sum(ops.cast(kept, "float32")) / ops.maximum(
        ops.sum(ops.cast(routed, "float32")), 1.0
    )
    pair_experts = ops.where(kept, pair_experts, num_experts)
    return pair_experts, positions, capacity, dropped


def kept_pairs(expert_indices, token_mask, num_experts, capacity_factor):
    """`(tokens, k)` bool: the pair is routed and within capacity."""
    num_tokens = ops.shape(expert_indices)[0]
    k = ops.shape(expert_indices)[1]
    pair_experts, _ = flatten_pairs(
        expert_indices, expert_indices, token_mask, num_experts
    )
    pair_experts, _, _, _ = drop_over_capacity(
        pair_experts, num_tokens, k, num_experts, capacity_factor
    )
    kept = ops.less(pair_experts, num_experts)
    return ops.transpose(ops.reshape(kept, (k, num_tokens)))
