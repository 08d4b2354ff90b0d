"""The decisions a router returns: small typed results the layer hands to
`moe.dispatch.run_experts`, which matches on their type.

They live apart from the routers (which make them) and the dispatch (which
reads them), so that neither imports the other. `moe.routers` re-exports
them.
"""

from typing import Any, NamedTuple


class TokenChoice(NamedTuple):
    """Token choice: each token's `k` experts and their combine weights.

    Attributes:
        expert_indices: int32 `(tokens, k)`, distinct experts per token.
        expert_weights: float32 `(tokens, k)`, the combine weights.
        load: float32 `(num_experts,)` or `None`: the share of the routed
            `(token, slot)` pairs choosing each expert, before capacity
            (`moe.losses.expert_load`); computed from `expert_indices` when
            `None`.
        router_scores: float32 `(tokens, num_experts)` or `None`: the
            router's scores (softmax or sigmoid), for the router entropy
            telemetry (of the scores normalised per token).
    """

    expert_indices: Any
    expert_weights: Any
    load: Any = None
    router_scores: Any = None


class HierarchicalChoice(NamedTuple):
    """Two-level token choice: groups, then experts within them.

    Dispatched as token choice (its first two fields are a `TokenChoice`'s).

    Attributes:
        expert_indices: int32 `(tokens, k)`, flat expert ids, group-major.
        expert_weights: float32 `(tokens, k)`, `p(group) * p(expert | group)`.
        load: float32 `(num_experts,)`, the share of assignments per expert.
        router_scores: float32 `(tokens, num_experts)`, the joint
            distribution `p(group) * p(expert | group)`.
        group_indices: int32 `(tokens, groups_per_token)`.
        group_scores: float32 `(tokens, num_groups)`, the group router's
            softmax.
        group_load: float32 `(num_groups,)`.
    """

    expert_indices: Any
    expert_weights: Any
    load: Any
    router_scores: Any
    group_indices: Any
    group_scores: Any
    group_load: Any


class SoftChoice(NamedTuple):
    """Soft routing: every expert on every token, with a weight each.

    Attributes:
        expert_weights: float32 `(tokens, num_experts)`.
        load: float32 `(num_experts,)`, the mean weight of each expert.
        router_scores: float32 `(tokens, num_experts)`, for the entropy.
    """

    expert_weights: Any
    load: Any
    router_scores: Any


class ExpertChoice(NamedTuple):
    """Expert choice: the tokens each expert picked.

    Attributes:
        token_indices: int32 `(num_experts, capacity)`.
        pick_weights: float32 `(num_experts, capacity)`, 0 where not picked.
        picked: bool `(num_experts, capacity)`: a real pick (False only when
            masked tokens leave an expert fewer than `capacity` choices).
        chosen_by: float32 `(tokens, num_experts)`, 1 where expert `e`
            picked token `t`.
        load: float32 `(num_experts,)`, the share of the picks per expert.
        router_scores: float32 `(tokens, num_experts)`, the scores.
    """

    token_indices: Any
    pick_weights: Any
    picked: Any
    chosen_by: Any
    load: Any
    router_scores: Any


class EveryExpert(NamedTuple):
    """Every expert on every token, weight 1, outputs summed: the always-on
    shared experts (DeepSeek-MoE). No router makes it; `MoELayer` hands it
    to the dispatch with its shared experts."""


# The decisions that are not token choice (each has its own layout).
OTHER_DECISIONS = (SoftChoice, ExpertChoice, EveryExpert)
