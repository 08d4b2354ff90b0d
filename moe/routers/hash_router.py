import keras

from moe import losses, routing
from moe.decisions import TokenChoice
from moe.routers.router import Router, float_mask


@keras.saving.register_keras_serializable(package="moe")
class HashRouter(Router):
    """Each input to one expert, a fixed hash of an integer key.

    `routing="hash"` (Roller et al., 2021): no learned router; the layer is
    called as `layer(x, routing_key=ids)` and key `n` goes to expert
    `moe.routing.hash_routing(n)` with weight 1, the same on every backend.
    `capacity_factor` applies; no losses, and the learned-router arguments
    (loss weights, noise, jitter, initializer, bias, seed) have no effect.
    See `docs/layers.md`.

    Args:
        num_experts: int >= 1.
        **kwargs: the `Router` arguments and base layer arguments.

    References:
        Roller et al., 2021, "Hash Layers For Large Sparse Models".
    """

    uses_routing_key = True

    @property
    def experts_per_input(self):
        return 1

    def call(self, tokens, token_mask=None, routing_key=None, training=None):
        indices, weights = routing.hash_routing(routing_key, self.num_experts)
        load = losses.expert_load(
            indices, None, self.num_experts, float_mask(token_mask)
        )
        return TokenChoice(indices, weights, load)
