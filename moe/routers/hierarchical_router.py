import keras
from keras import ops

from moe import losses, routing, validation
from moe.decisions import HierarchicalChoice
from moe.routers.router import Router, float_mask, validate_groups


@keras.saving.register_keras_serializable(package="moe")
class HierarchicalRouter(Router):
    """Two routers: the best groups of experts, then experts within them.

    `routing="hierarchical"`: a group router (`group_gating_network`) picks
    each input's `groups_per_token` groups of consecutive experts, an
    expert router (`gating_network`, softmax within each group) its `top_k`
    experts in each; weight `p(group) * p(expert | group)`. Losses at both
    levels; telemetry adds the group loads and entropy. See
    `docs/layers.md`.

    Args:
        num_experts: int >= 1.
        num_groups: int >= 1 dividing `num_experts` (required).
        groups_per_token: int in `[1, num_groups]` or `None` (1).
        top_k: experts per chosen group, in `[1, group size]`, or `None`
            (2, or the group size if smaller).
        **kwargs: the `Router` arguments and base layer arguments.
    """

    def __init__(
        self,
        num_experts,
        num_groups=None,
        groups_per_token=None,
        top_k=None,
        **kwargs,
    ):
        validation.integer("num_experts", num_experts)
        if num_groups is None:
            raise ValueError(
                "`routing='hierarchical'` needs `num_groups`, an integer >= 1 "
                f"that divides `num_experts` ({num_experts}). "
                "Received: num_groups=None"
            )
        validate_groups(num_experts, num_groups, groups_per_token)
        group_size = num_experts // num_groups
        if top_k is not None:
            validation.integer(
                "top_k",
                top_k,
                maximum=group_size,
                what="between 1 and the experts of a group, `num_experts` "
                f"// `num_groups` ({group_size})",
            )
        super().__init__(num_experts, **kwargs)
        self.num_groups = num_groups
        self.groups_per_token = groups_per_token
        self.top_k = top_k

    @property
    def groups_per_input(self):
        """Groups each input goes to."""
        return self.groups_per_token or 1

    @property
    def experts_per_group(self):
        """Experts chosen within each chosen group."""
        if self.top_k is not None:
            return self.top_k
        return min(2, self.num_experts // self.num_groups)

    @property
    def experts_per_input(self):
        return self.groups_per_input * self.experts_per_group

    @property
    def telemetry_names(self):
        groups = [f"group_load_{g}" for g in range(self.num_groups)]
        return ("router_entropy", *groups, "group_router_entropy")

    def build(self, input_shape):
        self.gating_network = self.make_gating_network(
            self.num_experts, input_shape[-1], "gating_network", self.seed
        )
        self.group_gating_network = self.make_gating_network(
            self.num_groups,
            input_shape[-1],
            "group_gating_network",
            None if self.seed is None else self.seed + 1,
        )

    def call(self, tokens, token_mask=None, routing_key=None, training=None):
        experts = self.gating_network(tokens, training=training)
        groups = self.group_gating_network(tokens, training=training)
        group_probs = groups["router_probs"]  # (T, G)
        indices, weights, joint = routing.hierarchical_routing(
            group_probs,
            experts["router_logits"],
            self.groups_per_input,
            self.experts_per_group,
        )
        _, group_indices = ops.top_k(group_probs, self.groups_per_input)
        group_indices = ops.cast(group_indices, "int32")
        mask = float_mask(token_mask)
        load = losses.expert_load(indices, None, self.num_experts, mask)
        group_load = losses.expert_load(
            group_indices, None, self.num_groups, mask
        )
        if training:
            # The expert router's softmax runs within each group: the
            # z-loss of each group's logits, averaged over the groups.
            group_size = self.num_experts // self.num_groups
            within = ops.reshape(
                experts["router_logits"], (-1, self.num_groups, group_size)
            )
            self.add_router_losses(
                [
                    losses.load_balancing_loss(group_probs, group_load, mask),
                    losses.load_balancing_loss(joint, load, mask),
                ],
                [
                    losses.router_z_loss(groups["router_logits"], mask),
                    ops.mean(losses.router_z_loss(within, mask)),
                ],
            )
        return HierarchicalChoice(
            indices,
            weights,
            load,
            joint,
            group_indices,
            group_probs,
            group_load,
        )

    def telemetry(self, decision, token_mask):
        mask = float_mask(token_mask)
        values = super().telemetry(decision, token_mask)
        for g in range(self.num_groups):
            values[f"group_load_{g}"] = decision.group_load[g]
        values["group_router_entropy"] = losses.router_entropy(
            decision.group_scores, mask
        )
        return values

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_groups": self.num_groups,
                "groups_per_token": self.groups_per_token,
                "top_k": self.top_k,
            }
        )
        return config
