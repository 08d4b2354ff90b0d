import keras
from keras import ops

from moe import losses, routing, validation
from moe.decisions import SoftChoice
from moe.routers.router import LearnedRouter, float_mask


@keras.saving.register_keras_serializable(package="moe")
class SoftRouter(LearnedRouter):
    """Every input to every expert, weighted by the router's scores.

    `routing="soft"`, the dense mixture: every expert runs on every input
    (`num_experts` times the compute); `capacity_factor` has no effect.
    Losses: load balancing (the mean weights as the load) and z-loss. See
    `docs/layers.md`.

    Args:
        num_experts: int >= 1.
        top_k: `None` or `num_experts` (every expert). Defaults to `None`.
        score_function: `"softmax"` (weights sum to 1) or `"sigmoid"`.
            Defaults to `"softmax"`.
        **kwargs: the `Router` arguments and base layer arguments.
    """

    def __init__(
        self, num_experts, top_k=None, score_function="softmax", **kwargs
    ):
        if top_k not in (None, num_experts):
            raise ValueError(
                "`routing='soft'` uses every expert; leave `top_k` unset. "
                f"Received: top_k={top_k}"
            )
        validation.one_of(
            "score_function", score_function, routing.SCORE_FUNCTIONS
        )
        super().__init__(num_experts, **kwargs)
        self.top_k = top_k
        self.score_function = score_function

    @property
    def experts_per_input(self):
        return self.num_experts

    def call(self, tokens, token_mask=None, routing_key=None, training=None):
        logits, scores, distribution = self.scores(
            tokens, training, self.score_function
        )
        mask = float_mask(token_mask)
        # The load of soft routing: each expert's mean share of the weight.
        load = losses.expert_load(
            None, distribution, self.num_experts, mask, soft=True
        )
        if training:
            self.add_router_losses(
                [losses.load_balancing_loss(distribution, load, mask)],
                [losses.router_z_loss(logits, mask)],
            )
        return SoftChoice(scores, load, scores)

    def per_token(self, decision, token_mask):
        indices, weights = routing.soft_routing(decision.expert_weights)
        kept = ops.ones(ops.shape(weights), "bool")
        if token_mask is not None:
            kept = ops.logical_and(kept, token_mask[:, None])
        return indices, weights, kept

    def get_config(self):
        config = super().get_config()
        config.update(
            {"top_k": self.top_k, "score_function": self.score_function}
        )
        return config
