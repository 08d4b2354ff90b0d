"""Grouped dispatch with dynamic group sizes (TensorFlow graphs and eager,
PyTorch): exactly `k * tokens` expert rows, no padding."""

from keras import ops

from moe.dispatch import backend


def dynamic_dispatch(tokens, pair_experts, pair_weights, k, experts, expert_fn):
    """Grouped dispatch with dynamic group sizes (see module docstring).

    The pairs are sorted by expert once, their tokens gathered once and cut
    into one contiguous group per expert by a single split; each expert runs
    on its group, and one weighted `segment_sum` adds the results back to
    their tokens. The ops that do not scale with the number of experts stay
    out of the per-expert loop (with 64 experts of ~128 pairs each, per-expert
    selection ops and their gradients cost as much as the matmuls).

    Args:
        tokens: `(tokens, d)`.
        pair_experts: int32 `(k * tokens,)`; an id past the last expert
            (unrouted or dropped) is never computed.
        pair_weights: `(k * tokens,)` combine weights.
        experts: the stacked expert parameters, a list of tensors whose
            first axis is the expert axis.
        expert_fn: `expert_fn(x, *params) -> y` for one expert's params.
    """
    num_tokens = ops.shape(tokens)[0]
    num_experts = ops.shape(experts[0])[0]
    # Unrouted pairs carry id `num_experts` and sort last, into a group
    # that is never computed. A token meets an expert at most once, so
    # the order inside a group (argsort need not be stable) cannot change
    # any token's sum.
    pair_experts = ops.minimum(pair_experts, num_experts)
    order = ops.argsort(pair_experts)
    counts = ops.bincount(pair_experts, minlength=num_experts + 1)
    sorted_tokens = ops.cast(order % num_tokens, "int32")  # p = slot*T + t
    groups = backend.split_rows(
        ops.take(tokens, sorted_tokens, axis=0), counts, num_experts + 1
    )
    # Unstacking once gives each expert its slice with a cheap gradient (one
    # stack), where indexing the variable per expert would not.
    per_expert = zip(
        groups,
        *[ops.unstack(ops.convert_to_tensor(p), axis=0) for p in experts],
    )
    y = ops.concatenate([expert_fn(*args) for args in per_expert], axis=0)
    num_routed = ops.shape(y)[0]
    weights = ops.take(pair_weights, order[:num_routed], axis=0)
    return ops.segment_sum(
        y * ops.cast(weights, y.dtype)[:, None],
        sorted_tokens[:num_routed],
        num_segments=num_tokens,
    )
