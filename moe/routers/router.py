"""The `Router` base class and the decisions routers return."""

import keras
from keras import ops

from moe import dispatch as dispatch_lib
from moe import losses, quantization, routing, validation
from moe.decisions import (
    OTHER_DECISIONS,
    TokenChoice,  # noqa: F401 (the example's)
)
from moe.gating_network import GatingNetwork


@keras.saving.register_keras_serializable(package="moe")
class Router(keras.layers.Layer):
    """Base class of the routers of `moe.MoELayer`.

    A router decides which experts compute on which inputs, and nothing
    more: it never calls the experts. `MoELayer` flattens its inputs to
    tokens `(T, d)` and calls its router with them; the router returns a
    decision (a small typed result of `moe.decisions`), adds its own losses
    (`add_loss`, in training) and keeps any balancing state (non-trainable
    variables). The layer hands the decision, with the experts, to
    `moe.dispatch.run_experts`, which matches on the decision's type, and
    asks the router for the `telemetry` of the call.

    To write a token-choice router (each token picks its experts), subclass
    `Router`, create any weights in `build(input_shape)` (`input_shape` is
    `(T, d)`), and implement `call` returning a `TokenChoice` and the
    property `experts_per_input` (its `k`); the dispatch, the capacity rule
    (`capacity_factor`), `route()` and telemetry then work as for the
    library's routers. Register the class with
    `@keras.saving.register_keras_serializable()` and return your own
    arguments from `get_config()` (chained to `super()`), and an
    `MoELayer(routing=YourRouter(...))` saves and reloads like any layer.
    `MoELayer` checks the decision (`check_decision`) before dispatching it:
    its dtypes and shapes wherever they are known while tracing, the index
    values only eagerly (under a compiler an index outside `[0, E)` is not
    caught, and the output is wrong).

    The arguments below are the ones every router takes; a router documents
    which of them have no effect for it (a hash router has no learned
    router, so no noise, no losses).

    Args:
        num_experts: int >= 1.
        capacity_factor: float > 0 or `None` (dropless): each expert takes at
            most `ceil(capacity_factor * tokens * k / num_experts)` of the
            pairs routed to it, first choices first, earlier tokens first.
            Defaults to `None`.
        aux_loss_weight: float >= 0, weight of the load-balancing loss.
            Defaults to `0.01`.
        z_loss_weight: float >= 0, weight of the router z-loss. Defaults to
            `0.001`.
        router_noise: bool, noisy top-k gating in training (see
            `GatingNetwork`). Defaults to `False`.
        router_jitter: float in `[0, 1)`, multiplicative input jitter in
            training. Defaults to `0.0`.
        router_initializer: initializer of the router kernels. Defaults to
            `"glorot_uniform"`.
        router_use_bias: bool, the router's linear map has a learned bias
            (`GatingNetwork(use_bias=True)`; GPT-OSS). Defaults to `False`.
        seed: int or `None`, seed of the noise and jitter.
        **kwargs: base layer arguments. `dtype` defaults to `"float32"`:
            routing decisions are made in float32 whatever the policy.

    Call arguments:
        tokens: `(T, d)`.
        token_mask: bool `(T,)` or `None`: only `True` tokens are routed,
            counted and enter the losses.
        routing_key: int `(T,)` or `None`, for routers that route by a key
            (`uses_routing_key`).
        training: bool; noise, jitter, losses and balancing updates only
            when `True`.

    Returns:
        A decision, e.g. a `TokenChoice`.

    Example, a router that sends token `t` to expert `t mod E`:

    >>> class RoundRobin(Router):
    ...     experts_per_input = 1
    ...     def call(self, tokens, token_mask=None, routing_key=None,
    ...              training=None):
    ...         t = ops.arange(ops.shape(tokens)[0], dtype="int32")
    ...         indices = (t % self.num_experts)[:, None]
    ...         return TokenChoice(indices, ops.ones(ops.shape(indices)))
    >>> from moe import MoELayer
    >>> layer = MoELayer(4, 8, routing=RoundRobin(num_experts=4))
    >>> tuple(layer(ops.ones((6, 3))).shape)
    (6, 3)
    """

    # Whether `call` needs a `routing_key` (hash routing).
    uses_routing_key = False

    def __init__(
        self,
        num_experts,
        capacity_factor=None,
        aux_loss_weight=0.01,
        z_loss_weight=0.001,
        router_noise=False,
        router_jitter=0.0,
        router_initializer="glorot_uniform",
        router_use_bias=False,
        seed=None,
        **kwargs,
    ):
        validation.integer("num_experts", num_experts)
        if capacity_factor is not None:
            validation.number(
                "capacity_factor", capacity_factor, minimum=0, min_open=True
            )
        validation.number("aux_loss_weight", aux_loss_weight, minimum=0)
        validation.number("z_loss_weight", z_loss_weight, minimum=0)
        validation.boolean("router_noise", router_noise)
        validation.boolean("router_use_bias", router_use_bias)
        validation.number(
            "router_jitter", router_jitter, minimum=0, maximum=1, max_open=True
        )
        if seed is not None:
            validation.integer("seed", seed, minimum=0)
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.aux_loss_weight = aux_loss_weight
        self.z_loss_weight = z_loss_weight
        self.router_noise = router_noise
        self.router_jitter = router_jitter
        self.router_initializer = keras.initializers.get(router_initializer)
        self.router_use_bias = router_use_bias
        self.seed = seed

    @property
    def experts_per_input(self):
        """The `k` experts each input is routed to (at most)."""
        raise NotImplementedError(
            f"{type(self).__name__} must define `experts_per_input`"
        )

    @property
    def telemetry_names(self):
        """Names of the extra statistics `telemetry()` returns."""
        return ()

    def quantize(self, mode=None, type_check=True, config=None):
        """Routers stay float32 (`moe.quantization`): checks `mode`, does
        nothing else."""
        quantization.keep_float(self, mode)

    def call(self, tokens, token_mask=None, routing_key=None, training=None):
        raise NotImplementedError(f"{type(self).__name__} must define `call`")

    def routing_key_tokens(self, routing_key, inputs):
        """The layer's `routing_key` `(batch, [seq])` flattened to `(T,)`,
        or `None`; checked against `uses_routing_key` and the inputs'
        shape."""
        expected = tuple(inputs.shape[:-1])
        if not self.uses_routing_key:
            if routing_key is not None:
                raise ValueError(
                    "`routing_key` is only used by `routing='hash'`. "
                    f"Received: a routing_key for {type(self).__name__}"
                )
            return None
        if routing_key is None:
            raise ValueError(
                "`routing='hash'` routes by an integer key per input: call "
                "the layer as `layer(x, routing_key=ids)` with `ids` of shape "
                f"{expected} (e.g. token ids). Received: routing_key=None"
            )
        if not validation.same_shape(tuple(routing_key.shape), expected):
            raise ValueError(
                "`routing_key` must have the shape of the inputs without the "
                f"last axis, {expected}. Received: "
                f"routing_key.shape={tuple(routing_key.shape)}"
            )
        dtype = keras.backend.standardize_dtype(routing_key.dtype)
        if not dtype.startswith(("int", "uint")):
            # A float key would be truncated, a bool one is no key.
            raise ValueError(
                "`routing_key` must be an integer tensor (keys >= 0, e.g. "
                f"token ids). Received: routing_key.dtype={dtype}"
            )
        keys = ops.reshape(routing_key, (-1,))
        # Values only eagerly: in a compiled graph the check would cost a
        # device-to-host sync per call (see docs/layers.md).
        if keys.shape[0] and dispatch_lib.has_values(keys):
            low = int(ops.convert_to_numpy(ops.min(keys)))
            high = int(ops.convert_to_numpy(ops.max(keys)))
            if low < 0 or high >= 2**31:
                raise ValueError(
                    "`routing_key` must hold integers in [0, 2**31) (the "
                    "hash computes in int32). Received: routing_key from "
                    f"{low} to {high}"
                )
        return keys

    def check_decision(self, decision, tokens):
        """Refuse a token-choice decision the dispatch would misuse.

        Checks token-choice decisions (a `SoftChoice` or `ExpertChoice` is
        the library's routers' own, correct by construction). Shapes and
        dtypes are
        checked wherever they are known while tracing: `expert_indices` an
        integer `(T, k)` with `k = experts_per_input`, `expert_weights` a
        float of the same shape, one row per token. The index values (in
        `[0, num_experts)`) are checked only for a `call` that is not the
        library's and only where they exist without a compiler (eager; see
        `moe.dispatch.has_values`): in a compiled graph a check would add a
        device-to-host sync, so there an index out of range is not caught
        (the output is wrong), nor are rows or `k` a symbolic shape hides.
        """
        if isinstance(decision, OTHER_DECISIONS):
            return
        who = f"`{type(self).__name__}.call`"
        if not all(
            hasattr(decision, name)
            for name in ("expert_indices", "expert_weights")
        ):
            raise ValueError(
                f"{who} must return a `TokenChoice` (or another decision of "
                "`moe.decisions`). Received: a "
                f"{type(decision).__name__}"
            )
        indices, weights = decision.expert_indices, decision.expert_weights
        try:
            k = self.experts_per_input
        except NotImplementedError:
            k = None
        expected = (tokens.shape[0], k)  # None where unknown: not checked
        for name, value, kinds, what in (
            ("expert_indices", indices, ("int", "uint"), "an integer"),
            ("expert_weights", weights, ("float", "bfloat"), "a float"),
        ):
            dtype = keras.backend.standardize_dtype(value.dtype)
            if not dtype.startswith(kinds):
                raise ValueError(
                    f"{who} must return `{name}` of {what} dtype. "
                    f"Received: {name}.dtype={dtype}"
                )
            shape = tuple(value.shape)
            if not validation.same_shape(shape, expected):
                raise ValueError(
                    f"{who} must return `{name}` of shape (tokens, "
                    f"experts_per_input) = {expected}: one row per token, in "
                    f"the order of the tokens. Received: {name}.shape={shape}"
                )
        # The library's own routers give indices in range by construction:
        # no host sync for them. (`__module__` is None for code run by
        # `exec`.)
        module = getattr(type(self).call, "__module__", None) or ""
        if (
            module.startswith("moe.")
            or 0 in indices.shape
            or not dispatch_lib.has_values(indices)
        ):
            return
        low = int(ops.convert_to_numpy(ops.min(indices)))
        high = int(ops.convert_to_numpy(ops.max(indices)))
        if low < 0 or high >= self.num_experts:
            raise ValueError(
                f"{who} must return `expert_indices` in [0, num_experts) = "
                f"[0, {self.num_experts}). Received: expert_indices from "
                f"{low} to {high}"
            )

    def per_token(self, decision, token_mask):
        """`(expert_indices, expert_weights, kept)`, each `(T, k)`, for
        `MoELayer.route()`; `kept` is False for pairs that are masked or
        dropped for capacity."""
        kept = dispatch_lib.kept_pairs(
            decision.expert_indices,
            token_mask,
            self.num_experts,
            self.capacity_factor,
        )
        return decision.expert_indices, decision.expert_weights, kept

    def load(self, decision, token_mask):
        """float32 `(num_experts,)`: the share of the routed assignments
        each expert received (`1 / num_experts` each is balanced)."""
        if decision.load is not None:
            return decision.load
        return losses.expert_load(
            decision.expert_indices,
            None,
            self.num_experts,
            float_mask(token_mask),
        )

    def telemetry_values(self, decision, token_mask, dropped, full=False):
        """The statistics `moe.telemetry` logs for one call: `max_load` (the
        load vector) and `dropped`; with `full`, also `load_<e>` and
        `telemetry()`'s."""
        load = self.load(decision, token_mask)  # (num_experts,)
        values = {"max_load": load, "dropped": dropped}
        if full:
            for e in range(self.num_experts):
                values[f"load_{e}"] = load[e]
            values.update(self.telemetry(decision, token_mask))
        return values

    def telemetry(self, decision, token_mask):
        """A dict `name -> float32 scalar` for `telemetry_names`."""
        if decision.router_scores is None:
            return {}
        return {
            "router_entropy": losses.router_entropy(
                normalized(decision.router_scores), float_mask(token_mask)
            )
        }

    # --- helpers for subclasses -------------------------------------------

    def make_gating_network(self, num_experts, input_dim, name, seed=None):
        """A built float32 `GatingNetwork` with this router's settings."""
        gating_network = GatingNetwork(
            num_experts=num_experts,
            noisy=self.router_noise,
            jitter_noise=self.router_jitter,
            kernel_initializer=self.router_initializer,
            use_bias=self.router_use_bias,
            seed=seed,
            dtype="float32",
            name=name,
        )
        gating_network.build((None, input_dim))
        return gating_network

    def scores(self, tokens, training, score_function="softmax"):
        """`(logits, scores, distribution)`, float32 `(T, E)` each, from
        `self.gating_network`: the logits (noise included), the scores
        (`moe.routing.expert_scores`) and the scores normalised per token
        (the same tensor for softmax)."""
        decision = self.gating_network(tokens, training=training)
        logits, scores = decision["router_logits"], decision["router_probs"]
        if score_function == "softmax":
            return logits, scores, scores
        scores = routing.expert_scores(logits, score_function)
        return logits, scores, normalized(scores)

    def add_router_losses(self, aux_losses=(), z_losses=()):
        """`add_loss` each loss times its weight (zero weights add none)."""
        for weight, terms in (
            (self.aux_loss_weight, aux_losses),
            (self.z_loss_weight, z_losses),
        ):
            if weight:
                for loss in terms:
                    self.add_loss(weight * loss)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "capacity_factor": self.capacity_factor,
                "aux_loss_weight": self.aux_loss_weight,
                "z_loss_weight": self.z_loss_weight,
                "router_noise": self.router_noise,
                "router_jitter": self.router_jitter,
                "router_initializer": keras.initializers.serialize(
                    self.router_initializer
                ),
                "router_use_bias": self.router_use_bias,
                "seed": self.seed,
            }
        )
        return config


class LearnedRouter(Router):
    """A `Router` with one learned `GatingNetwork` over the experts
    (`self.gating_network`, built in `build`), and `router_entropy` among
    its telemetry: the base of the top-k, soft and expert-choice routers."""

    @property
    def telemetry_names(self):
        return ("router_entropy",)

    def build(self, input_shape):
        self.gating_network = self.make_gating_network(
            self.num_experts, input_shape[-1], "gating_network", self.seed
        )


def normalized(scores):
    """Scores `(T, E)` divided by their sum per token: a distribution for
    the load-balancing loss and the entropy (unchanged for softmax)."""
    return scores / ops.maximum(ops.sum(scores, axis=-1, keepdims=True), 1e-20)


def float_mask(token_mask):
    """The float 0/1 mask `moe.losses` takes, from a bool one (or None)."""
    return None if token_mask is None else ops.cast(token_mask, "float32")


def validate_groups(num_experts, num_groups, groups_per_token):
    """`num_groups` divides `num_experts`; `groups_per_token` (or `None`)
    is in `[1, num_groups]`."""
    validation.integer("num_groups", num_groups)
    if num_experts % num_groups:
        raise ValueError(
            "`num_groups` must be an integer >= 1 that divides `num_experts` "
            f"({num_experts}). Received: num_groups={num_groups}"
        )
    if groups_per_token is not None:
        validation.integer(
            "groups_per_token",
            groups_per_token,
            maximum=num_groups,
            what=f"between 1 and `num_groups` ({num_groups})",
        )
