"""Router losses and routing statistics, all computed in float32.

`token_mask` is a float 0/1 vector `(tokens,)` marking the tokens that are
routed (padding is 0); `None` means every token is routed.
"""

from keras import ops


def _masked_mean(values, token_mask):
    # values: (tokens, ...) -> mean over the routed tokens; 0 when there are
    # none (an empty batch), never NaN.
    if token_mask is None:
        count = ops.cast(ops.shape(values)[0], "float32")
        return ops.sum(values, axis=0) / ops.maximum(count, 1.0)
    weights = ops.reshape(
        token_mask, (-1,) + (1,) * (len(ops.shape(values)) - 1)
    )
    total = ops.maximum(ops.sum(token_mask), 1.0)
    return ops.sum(values * weights, axis=0) / total


def expert_load(
    expert_indices, expert_weights, num_experts, token_mask=None, soft=False
):
    """Fraction of the routed assignments that each expert receives.

    For sparse routing this counts the router's choices (before any capacity
    drop): entry `e` is the share of the routed `(token, slot)` pairs that
    chose expert `e`, so the entries sum to 1 and `1 / num_experts` each is
    perfectly balanced. For soft routing every expert sees every token, and
    the load is the mean gate weight instead.

    Returns:
        float32 tensor `(num_experts,)`.
    """
    if soft:
        return _masked_mean(ops.cast(expert_weights, "float32"), token_mask)
    # (tokens, k, num_experts) -> (tokens, num_experts): how often each token
    # chose each expert (0 or 1 each, since top-k picks distinct experts).
    chosen = ops.sum(ops.one_hot(expert_indices, num_experts), axis=1)
    k = ops.shape(expert_indices)[-1]
    return _masked_mean(chosen, token_mask) / ops.cast(k, "float32")


def expert_choice_load(picked):
    """Expert choice: the fraction of the real picks made by each expert.

    Args:
        picked: bool `(num_experts, capacity)` from
            `moe.routing.expert_choice_routing`.

    Returns:
        float32 tensor `(num_experts,)`; `1 / num_experts` each unless
        masked tokens left some picks empty.
    """
    picks = ops.sum(ops.cast(picked, "float32"), axis=1)
    return picks / ops.maximum(ops.sum(picks), 1.0)


def load_balancing_loss(router_probs, load, token_mask=None):
    """Switch Transformer auxiliary loss: `E * sum_e f_e * P_e`.

    `f_e` is the fraction of assignments routed to expert `e` (`load`, no
    gradient) and `P_e` the mean router probability of expert `e`. It is 1 for
    a perfectly balanced router and `E` when every token goes to one expert.

    References:
        Fedus et al., 2021, "Switch Transformers", eq. (4);
        Lepikhin et al., 2020, "GShard".
    """
    num_experts = ops.shape(router_probs)[-1]
    mean_probs = _masked_mean(router_probs, token_mask)  # (num_experts,)
    return ops.cast(num_experts, "float32") * ops.sum(
        ops.stop_gradient(load) * mean_probs
    )


def router_z_loss(router_logits, token_mask=None):
    """ST-MoE router z-loss: mean of `logsumexp(logits) ** 2` over tokens.

    It keeps router logits small, which keeps the softmax out of the range
    where float rounding changes the routing.

    References:
        Zoph et al., 2022, "ST-MoE: Designing Stable and Transferable Sparse
        Expert Models", eq. (5).
    """
    log_z = ops.logsumexp(router_logits, axis=-1)  # (tokens,)
    return _masked_mean(ops.square(log_z), token_mask)


def router_entropy(router_probs, token_mask=None):
    """Mean entropy (nats) of the router distribution over the tokens."""
    plogp = router_probs * ops.log(ops.maximum(router_probs, 1e-9))
    return _masked_mean(-ops.sum(plogp, axis=-1), token_mask)
