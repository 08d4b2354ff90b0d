"""Routing rules: pure functions from router probabilities to a decision.

Token-choice rules (`soft`, `top_k`, `switch`, `hash`, `hierarchical`) return
`(expert_indices, expert_weights)`, both of shape `(tokens, k)`: for each
token, the `k` experts it is sent to and the weight each expert's output gets
when the outputs are combined. Soft routing is the special case
`k = num_experts`, every expert with its probability.

Expert choice turns this around: each expert picks its `capacity` tokens, so
`expert_choice_routing` returns `(token_indices, weights, picked)` of shape
`(num_experts, capacity)`.
"""

from keras import ops

# The routing names `MoELayer(routing=...)` accepts (`moe.routers` maps each
# to its router).
ROUTINGS = ("top_k", "switch", "soft", "expert_choice", "hash", "hierarchical")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")


def soft_routing(router_probs):
    """Every token goes to every expert, weighted by its router probability.

    This is the classic dense formulation (Jacobs et al., 1991): it computes
    every expert on every token, so it costs `num_experts` times a dense
    layer. Kept for compatibility and as a reference.
    """
    num_tokens = ops.shape(router_probs)[0]
    num_experts = ops.shape(router_probs)[-1]
    # (tokens, num_experts): row t is [0, 1, ..., num_experts - 1].
    expert_indices = ops.broadcast_to(
        ops.arange(num_experts, dtype="int32")[None, :],
        (num_tokens, num_experts),
    )
    return expert_indices, router_probs


def expert_scores(router_logits, score_function="softmax"):
    """Router logits -> expert scores, in float32.

    `"softmax"`: a distribution over the experts (most routers);
    `"sigmoid"`: an independent score in (0, 1) per expert (DeepSeek-V3).
    """
    logits = ops.cast(router_logits, "float32")
    if score_function == "sigmoid":
        return ops.sigmoid(logits)
    return ops.softmax(logits, axis=-1)


def limit_to_groups(scores, num_groups, groups_per_token, group_score="max"):
    """Group-limited selection (DeepSeek-V2/V3): keep the best groups only.

    The experts form `num_groups` groups of consecutive experts. A group's
    score is its best expert's score (`"max"`, DeepSeek-V2) or the sum of
    its two best (`"top2_sum"`, DeepSeek-V3); each token keeps its
    `groups_per_token` best groups, and the scores of the experts of the
    other groups become `-inf`, so a top-k afterwards picks only within the
    kept groups.

    Args:
        scores: float32 `(tokens, num_experts)`, the selection scores.

    Returns:
        float32 `(tokens, num_experts)`.
    """
    num_experts = ops.shape(scores)[-1]
    group_size = num_experts // num_groups
    grouped = ops.reshape(scores, (-1, num_groups, group_size))  # (T, G, S)
    # (T, G): the best one or two scores of each group (top_k rather than
    # max, which refuses an empty batch on TensorFlow).
    best, _ = ops.top_k(grouped, 2 if group_score == "top2_sum" else 1)
    per_group = ops.sum(best, axis=-1)
    _, groups = ops.top_k(per_group, groups_per_token)  # (T, g)
    # (T, G): 1 for the kept groups.
    kept = ops.sum(ops.one_hot(groups, num_groups), axis=1) > 0
    kept = ops.repeat(kept, group_size, axis=-1)  # (T, E)
    return ops.where(kept, scores, float("-inf"))


def top_k_selection(
    scores,
    k,
    normalize=True,
    selection_bias=None,
    num_groups=None,
    groups_per_token=None,
    group_score="max",
    scaling_factor=1.0,
):
    """Each token's `k` experts by score, with the open models' options.

    The experts are chosen on the selection scores `scores + selection_bias`
    (limited to the best groups when `num_groups` is set, see
    `limit_to_groups`); the combine weights are the unbiased `scores` of the
    chosen experts, divided by their sum when `normalize` (Mixtral,
    Qwen3-MoE, DeepSeek-V3) or raw (Switch, OLMoE, Qwen2-MoE), then times
    `scaling_factor` (DeepSeek's routed scaling factor).

    Args:
        scores: float32 `(tokens, num_experts)`.
        k: experts per token.
        normalize: bool.
        selection_bias: float32 `(num_experts,)` or `None`.
        num_groups, groups_per_token, group_score: group-limited
            selection, or `None`.
        scaling_factor: float.

    Returns:
        `(expert_indices, expert_weights)`: int32 and float32
        `(tokens, k)`, best first.
    """
    selection = scores
    if selection_bias is not None:
        selection = selection + ops.cast(selection_bias, "float32")[None, :]
    if num_groups is not None:
        selection = limit_to_groups(
            selection, num_groups, groups_per_token, group_score
        )
    if selection is scores:
        weights, indices = ops.top_k(scores, k)
    else:
        _, indices = ops.top_k(selection, k)
        weights = ops.take_along_axis(scores, indices, axis=-1)
    if normalize:
        # The epsilon only matters for sigmoid scores that all underflow.
        weights = weights / (ops.sum(weights, axis=-1, keepdims=True) + 1e-20)
    if scaling_factor != 1.0:
        weights = weights * scaling_factor
    return ops.cast(indices, "int32"), weights


def expert_choice_routing(router_probs, capacity, token_mask=None):
    """Each expert picks the `capacity` tokens it gives the highest probability.

    Expert-choice routing (Zhou et al., 2022): the top-k runs over the token
    axis of the transposed `(experts, tokens)` scores, so every expert gets
    exactly `capacity` tokens (perfect load balance by construction); a token
    may be picked by several experts or by none. The combine weight of a
    pick is the token's router probability for that expert.

    Args:
        router_probs: float32 `(tokens, num_experts)`.
        capacity: int (or scalar tensor) in `[1, tokens]`.
        token_mask: optional bool `(tokens,)`; masked tokens are never
            picked (a pick that can only fall on a masked token, because
            fewer tokens than `capacity` are routed, is marked not picked).

    Returns:
        `(token_indices, weights, picked)`, each `(num_experts, capacity)`:
        int32 token ids, float32 combine weights (0 where not picked) and
        bool `picked`.
    """
    scores = ops.transpose(router_probs)  # (experts, tokens)
    if token_mask is not None:
        # Probabilities are >= 0: -1 ranks masked tokens after every routed
        # one.
        scores = ops.where(token_mask[None, :], scores, -1.0)
    weights, token_indices = ops.top_k(scores, capacity)  # (E, C)
    token_indices = ops.cast(token_indices, "int32")
    picked = ops.greater_equal(weights, 0.0)
    weights = ops.where(picked, weights, 0.0)
    return token_indices, weights, picked


# Hash of routing keys: int32 arithmetic only, so that no backend overflows
# (JAX has no int64 by default), and every product stays below 2**31.
_HASH_PRIME = 46337  # the largest prime p with p * p < 2**31
_HASH_MULTIPLIERS = (28411, 17389)
_HASH_OFFSETS = (9241, 31607)


def hash_routing(routing_keys, num_experts):
    """A fixed pseudo-random expert for each integer key (Roller et al., 2021).

    The same key always goes to the same expert, on every backend and after
    save / load: the hash is plain integer arithmetic (not Python's salted
    `hash`). A key `n >= 0` is written `n = q * p + r` with `p = 46337`
    (prime), mixed as `h = (a1 * r + a2 * (q mod p) + b1) mod p`, then
    `h = (h * h + b2) mod p`, and sent to expert `h mod num_experts`, with
    `a1 = 28411`, `a2 = 17389`, `b1 = 9241`, `b2 = 31607`. Every
    intermediate product is below `2**31`, so int32 never overflows.

    Args:
        routing_keys: integer tensor `(tokens,)`, e.g. token ids, `>= 0`.
        num_experts: int.

    Returns:
        `(expert_indices, expert_weights)`: int32 `(tokens, 1)` and float32
        ones `(tokens, 1)`.
    """
    keys = ops.cast(routing_keys, "int32")
    high = ops.mod(ops.floor_divide(keys, _HASH_PRIME), _HASH_PRIME)
    low = ops.mod(keys, _HASH_PRIME)
    h = (
        ops.mod(low * _HASH_MULTIPLIERS[0], _HASH_PRIME)
        + ops.mod(high * _HASH_MULTIPLIERS[1], _HASH_PRIME)
        + _HASH_OFFSETS[0]
    )
    h = ops.mod(h, _HASH_PRIME)
    h = ops.mod(h * h + _HASH_OFFSETS[1], _HASH_PRIME)
    expert_indices = ops.mod(h, num_experts)[:, None]
    return ops.cast(expert_indices, "int32"), ops.ones(
        ops.shape(expert_indices), "float32"
    )


def hierarchical_routing(group_probs, expert_logits, group_k, expert_k):
    """Two-level routing: top groups, then top experts within each group.

    Args:
        group_probs: float32 `(tokens, num_groups)`, the group router's
            softmax.
        expert_logits: float32 `(tokens, num_experts)`, the expert router's
            logits; expert `e` belongs to group `e // (num_experts //
            num_groups)`, and the softmax runs within each group.
        group_k: groups per token.
        expert_k: experts per chosen group.

    Returns:
        `(expert_indices, expert_weights, expert_probs)`:
        `expert_indices` int32 `(tokens, group_k * expert_k)`, flat expert
        ids, group-major (best group's experts first); `expert_weights`
        float32, `p(group) * p(expert | group)`, the raw probabilities of
        both levels; `expert_probs` float32 `(tokens, num_experts)`, the
        joint distribution `p(group) * p(expert | group)` (sums to 1).
    """
    num_groups = ops.shape(group_probs)[-1]
    num_experts = ops.shape(expert_logits)[-1]
    group_size = num_experts // num_groups
    # (tokens, G, E/G): softmax within each group.
    within = ops.softmax(
        ops.reshape(expert_logits, (-1, num_groups, group_size)), axis=-1
    )
    group_weights, groups = ops.top_k(group_probs, group_k)  # (T, gk)
    groups = ops.cast(groups, "int32")
    # (T, gk, E/G): the chosen groups' within-group distributions.
    chosen = ops.take_along_axis(within, groups[:, :, None], axis=1)
    weights, members = ops.top_k(chosen, expert_k)  # (T, gk, ek)
    indices = groups[:, :, None] * group_size + ops.cast(members, "int32")
    weights = weights * group_weights[:, :, None]
    joint = ops.reshape(within * group_probs[:, :, None], (-1, num_experts))
    k = group_k * expert_k
    return (
        ops.reshape(indices, (-1, k)),
        ops.reshape(weights, (-1, k)),
        joint,
    )
