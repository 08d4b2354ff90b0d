"""Routing rules: pure functions from router probabilities to a decision.

Every rule returns `(expert_indices, expert_weights)`, both of shape
`(tokens, k)`: for each token, the `k` experts it is sent to and the weight
each expert's output gets when the outputs are combined. Soft routing is the
special case `k = num_experts`, every expert with its probability.
"""

from keras import ops

ROUTINGS = ("soft", "top_k", "switch")


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


def top_k_routing(router_probs, k, normalize=True):
    """Each token goes to its `k` most probable experts.

    With `normalize=True` the `k` weights are renormalised to sum to 1
    (Shazeer et al., 2017; Mixtral); with `normalize=False` they are the raw
    router probabilities (Switch Transformer keeps `p_i` so that the router
    is trained by the task loss even when `k = 1`).
    """
    expert_weights, expert_indices = ops.top_k(router_probs, k)
    if normalize:
        expert_weights = expert_weights / ops.sum(
            expert_weights, axis=-1, keepdims=True
        )
    return ops.cast(expert_indices, "int32"), expert_weights
