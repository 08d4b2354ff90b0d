"""Layouts without token-choice pairs: soft (every expert, weighted),
expert choice (each expert's own picks) and always-on shared experts."""

from keras import ops

from moe.dispatch.pairs import pad_row


def soft_dispatch(tokens, expert_weights, experts, expert_fn):
    """Every expert on every token, combined by the gate weights (dense)."""
    y = expert_fn(tokens[None], *experts)  # (E, tokens, d_out)
    weights = ops.cast(ops.transpose(expert_weights), y.dtype)  # (E, tokens)
    return ops.sum(y * weights[:, :, None], axis=0)


def expert_choice_dispatch(
    tokens, token_indices, weights, picked, experts, expert_fn
):
    """Expert-choice dispatch: each expert runs on the tokens it picked.

    The picks are already a static `(experts, capacity)` layout (from
    `moe.routing.expert_choice_routing`), so this is the capacity buffer
    without the drop rule: gather, one 2-D matmul chain per expert, weight,
    scatter-add back. A pick with `picked=False` (only possible on a masked
    token) reads a zero row and is added to a discarded row.

    Args:
        tokens: `(tokens, d)`.
        token_indices: int32 `(experts, capacity)`, the token of each pick.
        weights: `(experts, capacity)` combine weights.
        picked: bool `(experts, capacity)`.
        experts: the stacked expert parameters, experts axis first.
        expert_fn: `expert_fn(x, *params) -> y` for one expert's params.

    Returns:
        `(tokens, d_out)`: for each token, the weighted sum of the outputs
        of the experts that picked it (zeros if none did).
    """
    num_tokens = ops.shape(tokens)[0]
    # (E, C): a pick that is not real reads and writes row `num_tokens`.
    rows = ops.where(picked, token_indices, num_tokens)
    x = ops.take(pad_row(tokens), rows, axis=0)  # (E, C, d)
    per_expert = zip(
        ops.unstack(x, axis=0),
        *[ops.unstack(ops.convert_to_tensor(p), axis=0) for p in experts],
    )
    y = ops.stack([expert_fn(*args) for args in per_expert])  # (E, C, d_out)
    y = y * ops.cast(weights, y.dtype)[:, :, None]
    out = ops.segment_sum(
        ops.reshape(y, (-1, ops.shape(y)[-1])),
        ops.reshape(rows, (-1,)),
        num_segments=num_tokens + 1,
    )
    return out[:num_tokens]


def dense_experts(tokens, experts, expert_fn):
    """Sum of every expert's output on every token, unweighted.

    The always-on shared experts (DeepSeek-MoE): `(tokens, d)` ->
    `(tokens, d_out)`.
    """
    y = expert_fn(tokens[None], *experts)  # (S, tokens, d_out)
    return ops.sum(y, axis=0)
