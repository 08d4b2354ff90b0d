"""Few-token dispatch (decode): each (token, expert) pair gathers its own
expert's weights, so a call reads `k * tokens` experts' weights, not all
`E`."""

from keras import ops


def gather_dispatch(tokens, pair_experts, pair_weights, k, experts, expert_fn):
    """Each pair runs on its own copy of its expert's weights.

    The stacked weights are gathered per pair, `(pairs, d, h)`, and every
    pair is one row of a batched matmul: no sort, no buffer, no padding,
    static shapes. It moves `pairs` experts' weights, so it pays while
    `k * tokens` is small next to the work of the other layouts (decode);
    `moe.dispatch.sparse.choose_layout` decides when. Unrouted or dropped
    pairs (expert id `num_experts`) run on the last expert with weight 0:
    finite values that add nothing, and a zero gradient.

    Args:
        tokens: `(tokens, d)`.
        pair_experts: int32 `(k * tokens,)` slot-major pair experts.
        pair_weights: `(k * tokens,)` combine weights.
        k: the pairs per token.
        experts: the stacked expert parameters, experts axis first.
        expert_fn: `expert_fn(x, *params)` with params stacked on the
            leading axes of `x` (`moe.Experts.expert_fn`).

    Returns:
        `(tokens, d_out)`.
    """
    num_tokens = ops.shape(tokens)[0]
    num_experts = ops.shape(experts[0])[0]
    routed = ops.less(pair_experts, num_experts)
    rows = ops.minimum(pair_experts, num_experts - 1)
    # (pairs, 1, d): pair p = slot * T + t reads token t.
    x = ops.expand_dims(ops.tile(tokens, (k, 1)), 1)
    params = [ops.take(p, rows, axis=0) for p in experts]  # (pairs, ...)
    y = ops.squeeze(expert_fn(x, *params), 1)  # (pairs, d_out)
    weights = ops.where(routed, pair_weights, ops.zeros_like(pair_weights))
    y = y * ops.cast(weights, y.dtype)[:, None]
    return ops.sum(ops.reshape(y, (k, num_tokens, -1)), axis=0)
