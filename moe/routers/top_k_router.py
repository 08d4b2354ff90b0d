import keras
from keras import ops

from moe import losses, routing, validation
from moe.decisions import TokenChoice
from moe.routers.router import (
    LearnedRouter,
    float_mask,
    validate_groups,
)


@keras.saving.register_keras_serializable(package="moe")
class TopKRouter(LearnedRouter):
    """Token choice: each input goes to its `top_k` best-scoring experts.

    The router of `routing="top_k"` and `"switch"`, and of the open models'
    MoE blocks (Mixtral, Qwen-MoE, OLMoE, DeepSeek): float32 scores, an
    optional selection bias and group-limited selection to choose the
    experts, the unbiased scores (renormalised or not, scaled) as combine
    weights (`moe.routing.top_k_selection`); auxiliary-loss-free balancing
    moves the bias in training. Losses: load balancing and z-loss. See
    `docs/layers.md` ("Routings", "Router options", "Balancing").

    Args:
        num_experts: int >= 1.
        top_k: int in `[1, num_experts]` or `None` (2, or `num_experts` if
            smaller).
        score_function: `"softmax"` or `"sigmoid"`. Defaults to
            `"softmax"`.
        normalize_top_k: bool or `None` (True): renormalise the chosen
            scores to sum to 1. Defaults to `None`.
        routed_scaling_factor: float > 0, multiplies the combine weights.
            Defaults to `1.0`.
        num_groups: int dividing `num_experts`, or `None`: group-limited
            selection over groups of consecutive experts. Defaults to
            `None`.
        groups_per_token: int in `[1, num_groups]` or `None` (1): groups
            each token chooses its experts from. Defaults to `None`.
        group_score: `"max"` (a group's best expert's score, DeepSeek-V2) or
            `"top2_sum"` (the sum of its two best, DeepSeek-V3), computed on
            the selection scores (bias included). Defaults to `"max"`.
        selection_bias: bool, add the per-expert selection bias. Defaults
            to `False`.
        bias_update_rate: float >= 0, the step of auxiliary-loss-free
            balancing; > 0 needs `selection_bias=True`. Defaults to `0.0`.
        **kwargs: the `Router` arguments (`capacity_factor`, loss weights,
            noise, jitter, initializer, seed) and base layer arguments.

    References:
        - Shazeer et al., 2017, "Outrageously Large Neural Networks".
        - Fedus et al., 2021, "Switch Transformers".
        - DeepSeek-AI, 2024, "DeepSeek-V2" and "DeepSeek-V3 Technical
          Report" (group-limited routing, sigmoid scores, bias).
        - Wang et al., 2024, "Auxiliary-Loss-Free Load Balancing Strategy
          for Mixture-of-Experts".
    """

    def __init__(
        self,
        num_experts,
        top_k=None,
        score_function="softmax",
        normalize_top_k=None,
        routed_scaling_factor=1.0,
        num_groups=None,
        groups_per_token=None,
        group_score="max",
        selection_bias=False,
        bias_update_rate=0.0,
        **kwargs,
    ):
        validation.integer("num_experts", num_experts)
        validation.top_k(top_k, num_experts)
        validation.one_of(
            "score_function", score_function, routing.SCORE_FUNCTIONS
        )
        if normalize_top_k is not None:
            validation.boolean("normalize_top_k", normalize_top_k)
        validation.number(
            "routed_scaling_factor",
            routed_scaling_factor,
            minimum=0,
            min_open=True,
        )
        validation.one_of("group_score", group_score, routing.GROUP_SCORES)
        validation.boolean("selection_bias", selection_bias)
        validation.number("bias_update_rate", bias_update_rate, minimum=0)
        if num_groups is not None:
            validate_groups(num_experts, num_groups, groups_per_token)
            _validate_top_k_within_groups(
                top_k, num_experts, num_groups, groups_per_token
            )
        elif groups_per_token is not None:
            raise ValueError(
                "`groups_per_token` needs `num_groups`. Received: "
                f"groups_per_token={groups_per_token}, num_groups=None"
            )
        if bias_update_rate and not selection_bias:
            raise ValueError(
                "`bias_update_rate` moves the selection bias: it needs "
                "`selection_bias=True`. Received: "
                f"bias_update_rate={bias_update_rate}, selection_bias=False"
            )
        super().__init__(num_experts, **kwargs)
        self.top_k = top_k
        self.score_function = score_function
        self.normalize_top_k = normalize_top_k
        self.routed_scaling_factor = routed_scaling_factor
        self.num_groups = num_groups
        self.groups_per_token = groups_per_token
        self.group_score = group_score
        self.use_selection_bias = selection_bias
        self.bias_update_rate = bias_update_rate
        self.selection_bias = None  # the variable, created in build()

    @property
    def experts_per_input(self):
        if self.top_k is None:
            return min(2, self.num_experts)
        return self.top_k

    def build(self, input_shape):
        super().build(input_shape)
        if self.use_selection_bias:
            self.selection_bias = self.add_weight(
                name="selection_bias",
                shape=(self.num_experts,),
                initializer="zeros",
                dtype="float32",
                trainable=False,
                aggregation="mean",
            )

    def call(self, tokens, token_mask=None, routing_key=None, training=None):
        # (T, E) float32 each.
        logits, scores, distribution = self.scores(
            tokens, training, self.score_function
        )
        indices, weights = routing.top_k_selection(
            scores,
            self.experts_per_input,
            normalize=True
            if self.normalize_top_k is None
            else self.normalize_top_k,
            selection_bias=self.selection_bias,
            num_groups=self.num_groups,
            groups_per_token=self.groups_per_token or 1,
            group_score=self.group_score,
            scaling_factor=self.routed_scaling_factor,
        )
        mask = float_mask(token_mask)
        load = losses.expert_load(indices, None, self.num_experts, mask)
        if training:
            self.add_router_losses(
                [losses.load_balancing_loss(distribution, load, mask)],
                [losses.router_z_loss(logits, mask)],
            )
            if self.bias_update_rate:
                # Under-loaded experts (load below the mean) move up.
                step = ops.sign(ops.mean(load) - load)
                self.selection_bias.assign(
                    self.selection_bias + self.bias_update_rate * step
                )
        return TokenChoice(indices, weights, load, scores)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "top_k": self.top_k,
                "score_function": self.score_function,
                "normalize_top_k": self.normalize_top_k,
                "routed_scaling_factor": self.routed_scaling_factor,
                "num_groups": self.num_groups,
                "groups_per_token": self.groups_per_token,
                "group_score": self.group_score,
                "selection_bias": self.use_selection_bias,
                "bias_update_rate": self.bias_update_rate,
            }
        )
        return config


def _validate_top_k_within_groups(
    top_k, num_experts, num_groups, groups_per_token
):
    reachable = (groups_per_token or 1) * (num_experts // num_groups)
    if (top_k or min(2, num_experts)) > reachable:
        raise ValueError(
            "`top_k` must be at most the experts of the chosen groups, "
            f"`groups_per_token` ({groups_per_token or 1}) x the group size "
            f"({num_experts // num_groups}). Received: top_k={top_k}"
        )
