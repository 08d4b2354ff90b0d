"""Dropless grouped-matmul dispatch (`jax.lax.ragged_dot`,
`torch._grouped_mm`): the standard layout on accelerators."""

from keras import ops

from moe.dispatch import backend


def grouped_dispatch(tokens, pair_experts, pair_weights, experts, expert_fn):
    """Sort the pairs by expert, gather their tokens once, and run every
    expert matmul as one grouped matmul over the sorted rows.

    Exactly `k * tokens` rows with static shapes: the group sizes are data,
    not shapes, so compilers accept it. Unrouted pairs (expert id
    `num_experts`) sort last and join the last expert's group with weight
    0: every row is computed on finite values and adds nothing.

    Args:
        tokens: `(tokens, d)`.
        pair_experts: int32 `(k * tokens,)` slot-major pair experts.
        pair_weights: `(k * tokens,)` combine weights.
        experts: the stacked expert parameters, experts axis first.
        expert_fn: `expert_fn(x, *params, affine=...)`, which applies each
            `x @ kernel + bias` through `affine` (`moe.Experts.expert_fn`).
    """
    num_tokens = ops.shape(tokens)[0]
    num_experts = ops.shape(experts[0])[0]
    order = ops.argsort(pair_experts)
    sorted_experts = ops.take(pair_experts, order)
    sorted_tokens = ops.cast(order % num_tokens, "int32")  # p = slot*T + t
    routed = ops.less(sorted_experts, num_experts)
    weights = ops.where(routed, ops.take(pair_weights, order), 0.0)
    row_experts = ops.minimum(sorted_experts, num_experts - 1)
    # A segment sum, not `bincount`: its length is static under `jit`.
    group_sizes = ops.segment_sum(
        ops.ones_like(row_experts), row_experts, num_segments=num_experts
    )

    def affine(x, kernel, bias):
        y = backend.grouped_matmul(x, kernel, group_sizes)
        if bias is not None:
            y = y + ops.take(bias, row_experts, axis=0)
        return y

    x = ops.take(tokens, sorted_tokens, axis=0)
    params = [ops.convert_to_tensor(p) for p in experts]
    y = expert_fn(x, *params, affine=affine)
    return ops.segment_sum(
        y * ops.cast(weights, y.dtype)[:, None],
        sorted_tokens,
        num_segments=num_tokens,
    )
