import keras
from keras import ops

from moe import dispatch as dispatch_lib
from moe import losses, routing, validation
from moe.decisions import ExpertChoice
from moe.routers.router import LearnedRouter, float_mask

# With `capacity_factor=None` each expert picks `2 * tokens / experts`
# inputs, the paper's EC-CF2 setting.
DEFAULT_CAPACITY_FACTOR = 2.0


@keras.saving.register_keras_serializable(package="moe")
class ExpertChoiceRouter(LearnedRouter):
    """Each expert picks its inputs (Zhou et al., 2022).

    `routing="expert_choice"`: each expert takes the inputs it scores
    highest, `expert_capacity(tokens, 1, num_experts, capacity_factor)` of
    them (`capacity_factor` 2.0 when unset), weighted by that score; an
    input may be picked by several experts or none. Balanced by
    construction (no load-balancing loss; the z-loss applies), and not
    causal: the picks run over all the inputs of a call. See
    `docs/layers.md`.

    Args:
        num_experts: int >= 1.
        score_function: `"softmax"` or `"sigmoid"`. Defaults to
            `"softmax"`.
        **kwargs: the `Router` arguments and base layer arguments.

    References:
        Zhou et al., 2022, "Mixture-of-Experts with Expert Choice Routing".
    """

    def __init__(self, num_experts, score_function="softmax", **kwargs):
        validation.one_of(
            "score_function", score_function, routing.SCORE_FUNCTIONS
        )
        super().__init__(num_experts, **kwargs)
        self.score_function = score_function

    @property
    def experts_per_input(self):
        # No fixed k: at most every expert picks an input.
        return self.num_experts

    @property
    def expert_choice_capacity_factor(self):
        """The capacity factor used (2.0 when unset)."""
        if self.capacity_factor is None:
            return DEFAULT_CAPACITY_FACTOR
        return self.capacity_factor

    def call(self, tokens, token_mask=None, routing_key=None, training=None):
        logits, scores, _ = self.scores(tokens, training, self.score_function)
        num_tokens = dispatch_lib.static_dim(tokens, 0)
        # Expert choice's picks per expert: the capacity rule with k = 1.
        capacity = dispatch_lib.expert_capacity(
            num_tokens, 1, self.num_experts, self.expert_choice_capacity_factor
        )
        token_indices, pick_weights, picked = routing.expert_choice_routing(
            scores, capacity, token_mask
        )
        # (T, E): which experts picked each token (picks are distinct).
        experts = ops.broadcast_to(
            ops.arange(self.num_experts, dtype="int32")[:, None],
            ops.shape(token_indices),
        )
        rows = ops.where(picked, token_indices, num_tokens)
        chosen_by = ops.scatter(
            ops.stack(
                [ops.reshape(rows, (-1,)), ops.reshape(experts, (-1,))],
                axis=1,
            ),
            ops.ones((ops.size(rows),), "float32"),
            (num_tokens + 1, self.num_experts),
        )[:num_tokens]
        mask = float_mask(token_mask)
        if training:
            self.add_router_losses(
                z_losses=[losses.router_z_loss(logits, mask)]
            )
        return ExpertChoice(
            token_indices,
            pick_weights,
            picked,
            chosen_by,
            losses.expert_choice_load(picked),
            scores,
        )

    def per_token(self, decision, token_mask):
        # (T, E). Scores are <= 1 (softmax or sigmoid): +2 ranks the
        # picking experts first, each part best first.
        chosen_by = decision.chosen_by
        scores = decision.router_scores
        _, indices = ops.top_k(scores + 2.0 * chosen_by, self.num_experts)
        indices = ops.cast(indices, "int32")
        kept = ops.take_along_axis(chosen_by, indices, axis=1) > 0
        weights = ops.where(
            kept, ops.take_along_axis(scores, indices, axis=1), 0.0
        )
        return indices, weights, kept

    def get_config(self):
        config = super().get_config()
        config["score_function"] = self.score_function
        return config
