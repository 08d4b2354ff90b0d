import keras
from keras import ops

from moe import dispatch as dispatch_lib
from moe import losses
from moe import routing as routing_lib
from moe.gating_network import (
    GatingNetwork,
    validate_num_experts,
    validate_top_k,
)
from moe.routing import ROUTINGS

# Expert choice with `capacity_factor=None`: each expert picks
# `2 * tokens / experts` inputs, the paper's EC-CF2 setting.
EXPERT_CHOICE_CAPACITY_FACTOR = 2.0


@keras.saving.register_keras_serializable(package="moe")
class MoELayer(keras.layers.Layer):
    """Sparse Mixture-of-Experts feed-forward layer.

    A `GatingNetwork` routes each input to `top_k` of `num_experts` experts;
    each expert is a feed-forward network
    `act(x @ W_in + b_in) @ W_out + b_out` (with `gated=True`, GLU-style:
    `(act(x @ W_gate + b_gate) * (x @ W_in + b_in)) @ W_out + b_out`,
    SwiGLU with `activation="silu"`). The output is the gate-weighted sum of
    the chosen experts' outputs.

    Compute is sparse for real: an input is only ever multiplied by the
    weights of the experts it was routed to, so the cost is about `top_k`
    dense FFNs of width `hidden_dim`, whatever `num_experts` is. (The one
    exception is `routing="soft"`, the classic dense formulation, which runs
    every expert on every input.) Expert weights are stacked with the experts
    axis first, one variable per matrix (`expert_in_kernel` is
    `(num_experts, input_dim, hidden_dim)`), which is what batched expert
    matmuls and expert parallelism shard on.

    Routings:
    - `"top_k"`: each input goes to its `top_k` (default 2) most probable
      experts, weights renormalised to sum to 1.
    - `"switch"`: top-1, weight = the router probability (Switch
      Transformer); usually with a `capacity_factor` such as 1.25.
    - `"soft"`: every expert, weighted by the router probabilities.
    - `"expert_choice"` (Zhou et al., 2022): each expert picks the
      `C = ceil(capacity_factor * tokens / num_experts)` inputs (clipped to
      `[1, tokens]`) it gives the highest router probability, with
      `capacity_factor` 2.0 when unset (the paper's EC-CF2); the combine
      weight of a pick is that probability. An input may be picked by
      several experts or by none; one nobody picked gets zero output
      (counted in `<name>_dropped`). Masked positions are never picked.
      Every expert runs on exactly `C` inputs: perfectly balanced, static
      shapes, no auxiliary loss. The picks run over all the inputs of one
      call (batch x sequence), so an input's output depends on the other
      inputs, later positions of its sequence included: it is not causal,
      and unsuited as-is to autoregressive decoding, where the next token
      must not see later ones and a decoding step has one new token: use
      token-choice routing (`"top_k"`, `"switch"`) there. With a single
      input (a batch of 1 at inference) every expert picks it, so the layer
      computes the soft, dense mixture.
    - `"hash"` (Roller et al., 2021): no router; each input goes to one
      expert, a fixed hash of an integer key passed at call time,
      `layer(x, routing_key=ids)` (e.g. token ids), with weight 1. The hash
      (`moe.routing.hash_routing`) is integer arithmetic, identical on every
      backend and after saving and loading. No auxiliary or z-loss (nothing
      to train in the routing).
    - `"hierarchical"`: `num_experts` experts in `num_groups` groups of
      consecutive experts. A group router picks the `group_top_k` (default
      1) most probable groups, then an expert router, whose softmax runs
      within each group, picks `top_k` experts (default 2, or the group
      size if smaller) in each chosen group. The weight of expert `e` of
      group `g` is `p(g) * p(e | g)`; inputs are dispatched to the flat
      expert index, sparsely, like `"top_k"`.

    With `capacity_factor=c` (token-choice routings), each expert takes at
    most `ceil(c * tokens * k / num_experts)` inputs per call; pairs beyond
    that are dropped — first choices have priority over second choices,
    earlier inputs over later ones — and a dropped input gets zero output from
    that expert (the caller's residual connection carries it). With
    `capacity_factor=None` nothing is dropped.

    Shared experts (DeepSeek-MoE): `num_shared_experts=S` adds `S`
    always-on experts of the same shape, computed on every input and added
    to the routed output with weight 1, whatever the routing. Their weights
    are separate variables (`shared_expert_in_kernel` `(S, d, hidden_dim)`,
    ...), stacked experts axis first like the routed ones, so a
    distribution layout can shard them on the experts axis or replicate
    them independently of the routed experts. Fine-grained experts are
    configured with more, smaller experts and a larger `top_k` at the same
    active compute: 8 experts of width 1024 with top-2 become 32 experts of
    width 256 with top-8 (`num_experts=32, hidden_dim=256, top_k=8`), often
    with one or two shared experts of the same width
    (`num_shared_experts=2`, then `top_k=6` keeps the active compute).

    Inputs are `(batch, d)`, one routed input per row (e.g. pooled
    features), or `(batch, seq, d)` with an optional Keras mask: masked
    positions are not routed, not counted in load or losses, and output
    zeros.

    During training the layer adds the load-balancing loss
    (`aux_loss_weight`) and the router z-loss (`z_loss_weight`) with
    `add_loss`, and tracks metrics that show up in `fit()` logs and History
    with no wiring: `<name>_load_<e>` (fraction of routed assignments
    choosing expert `e`; `1 / num_experts` is balanced),
    `<name>_dropped` (fraction of assignments dropped by capacity; for
    expert choice, of inputs no expert picked) and
    `<name>_router_entropy` (nats; not for `"hash"`). `"hierarchical"` adds
    both losses at both levels — the group router's (balance over groups)
    and the expert level's (balance over all experts under the joint
    probabilities `p(g) * p(e | g)`; z-loss of each group's logits,
    averaged) — and logs `<name>_group_load_<g>` and
    `<name>_group_router_entropy`. `"expert_choice"` adds only the z-loss,
    `"hash"` neither. `route()` returns which experts each input goes to at
    inference.

    Args:
        num_experts: int >= 1, number of experts.
        hidden_dim: int >= 1, hidden width of each expert.
        output_dim: int or `None`; defaults to the input dimension.
        top_k: int or `None`; experts per input. Defaults to 2 for
            `"top_k"` (or `num_experts` if smaller), 1 for `"switch"` and
            `"hash"`, all for `"soft"`; for `"hierarchical"`, experts per
            chosen group (default 2, or the group size if smaller); unset
            for `"expert_choice"`.
        routing: `"top_k"`, `"switch"`, `"soft"`, `"expert_choice"`,
            `"hash"` or `"hierarchical"`. Defaults to `"top_k"`.
        capacity_factor: float > 0 or `None` (dropless). For
            `"expert_choice"`, the picks per expert relative to
            `tokens / num_experts`, 2.0 when `None`. Defaults to `None`.
        activation: expert activation. Defaults to `"relu"`.
        gated: bool, GLU-style experts with a gate projection. Defaults to
            `False`.
        use_bias: bool, biases in the experts. Defaults to `True`.
        aux_loss_weight: float >= 0, weight of the load-balancing loss;
            0 disables it. Defaults to `0.01`.
        z_loss_weight: float >= 0, weight of the router z-loss; 0 disables
            it. Defaults to `0.001`.
        router_noise: bool, noisy top-k gating in training. Defaults to
            `False`.
        router_jitter: float in `[0, 1)`, input jitter of the router in
            training. Defaults to `0.0`.
        dispatch: `"auto"`, `"dynamic"` or `"static"`. How the chosen
            (input, expert) pairs are laid out for the expert matmuls
            (`moe.dispatch`): `"dynamic"` groups them exactly (needs dynamic
            shapes: eager, TensorFlow graphs, PyTorch), `"static"` uses
            capacity buffers or, dropless, padded blocks. `"auto"` picks
            `"static"` when a compiler traces the call (JAX `jit`, XLA
            `jit_compile=True`, `torch.compile`), else `"dynamic"`. All
            give the same outputs. Defaults to `"auto"`.
        kernel_initializer: initializer of each expert's kernels, applied
            per expert (fans of one expert's matrix). Defaults to
            `"glorot_uniform"`.
        bias_initializer: Defaults to `"zeros"`.
        router_initializer: initializer of the router. Defaults to
            `"glorot_uniform"`.
        seed: int or `None`, seed of router noise and jitter.
        num_groups: int dividing `num_experts`, the groups of
            `"hierarchical"` routing (required there, unused otherwise).
            Defaults to `None`.
        group_top_k: int in `[1, num_groups]` or `None` (1): groups per
            input, `"hierarchical"` only. Defaults to `None`.
        num_shared_experts: int >= 0, always-on experts added to the routed
            output. Defaults to `0`.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `(batch, d)` or `(batch, seq, d)`.
        training: bool; noise, jitter, losses only when `True`.
        mask: optional bool mask of shape `inputs.shape[:-1]`.
        routing_key: integer tensor of shape `inputs.shape[:-1]`, keys
            `>= 0` (e.g. token ids); required by `"hash"` routing, refused
            by the others.

    Returns:
        `inputs.shape[:-1] + (output_dim,)` in the layer's compute dtype.

    Example:

    >>> import numpy as np
    >>> inputs = keras.Input(shape=(16,))
    >>> x = MoELayer(num_experts=8, hidden_dim=32, top_k=2)(inputs)
    >>> outputs = keras.layers.Dense(3, activation="softmax")(x)
    >>> model = keras.Model(inputs, outputs)
    >>> model.predict(np.ones((4, 16)), verbose=0).shape
    (4, 3)

    Hash routing by token id, in a functional model:

    >>> ids = keras.Input(shape=(5,), dtype="int32")
    >>> x = keras.layers.Embedding(100, 16)(ids)
    >>> x = MoELayer(8, 32, routing="hash")(x, routing_key=ids)
    >>> keras.Model(ids, x).predict(np.ones((2, 5)), verbose=0).shape
    (2, 5, 16)

    References:
        - Shazeer et al., 2017, "Outrageously Large Neural Networks: The
          Sparsely-Gated Mixture-of-Experts Layer".
        - Lepikhin et al., 2020, "GShard".
        - Fedus et al., 2021, "Switch Transformers".
        - Zoph et al., 2022, "ST-MoE".
        - Gale et al., 2022, "MegaBlocks" (dropless block layout).
        - Zhou et al., 2022, "Mixture-of-Experts with Expert Choice
          Routing".
        - Roller et al., 2021, "Hash Layers For Large Sparse Models".
        - Dai et al., 2024, "DeepSeekMoE: Towards Ultimate Expert
          Specialization in Mixture-of-Experts Language Models".
    """

    def __init__(
        self,
        num_experts,
        hidden_dim,
        output_dim=None,
        top_k=None,
        routing="top_k",
        capacity_factor=None,
        activation="relu",
        gated=False,
        use_bias=True,
        aux_loss_weight=0.01,
        z_loss_weight=0.001,
        router_noise=False,
        router_jitter=0.0,
        dispatch="auto",
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        router_initializer="glorot_uniform",
        seed=None,
        num_groups=None,
        group_top_k=None,
        num_shared_experts=0,
        **kwargs,
    ):
        validate_num_experts(num_experts)
        _validate_positive_int("hidden_dim", hidden_dim)
        if output_dim is not None:
            _validate_positive_int("output_dim", output_dim)
        if routing not in ROUTINGS:
            raise ValueError(
                f"`routing` must be one of {', '.join(map(repr, ROUTINGS))}. "
                f"Received: routing={routing!r}"
            )
        _validate_groups(routing, num_experts, num_groups, group_top_k)
        if routing == "hierarchical":
            validate_top_k(top_k, num_experts // num_groups)
        else:
            validate_top_k(top_k, num_experts)
        for single in ("switch", "hash"):
            if routing == single and top_k not in (None, 1):
                raise ValueError(
                    f"`routing='{single}'` routes each input to one expert; "
                    f"leave `top_k` unset or 1. Received: top_k={top_k}"
                )
        if routing == "expert_choice" and top_k is not None:
            raise ValueError(
                "`routing='expert_choice'` lets each expert pick its inputs "
                "(how many: `capacity_factor`); leave `top_k` unset. "
                f"Received: top_k={top_k}"
            )
        if not isinstance(num_shared_experts, int) or num_shared_experts < 0:
            raise ValueError(
                "`num_shared_experts` must be an integer >= 0. Received: "
                f"num_shared_experts={num_shared_experts}"
            )
        if routing == "soft" and top_k not in (None, num_experts):
            raise ValueError(
                "`routing='soft'` uses every expert; leave `top_k` unset. "
                f"Received: top_k={top_k}"
            )
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(
                "`capacity_factor` must be > 0, or None for dropless "
                f"routing. Received: capacity_factor={capacity_factor}"
            )
        for arg, value in (
            ("aux_loss_weight", aux_loss_weight),
            ("z_loss_weight", z_loss_weight),
        ):
            if not value >= 0:
                raise ValueError(
                    f"`{arg}` must be >= 0. Received: {arg}={value}"
                )
        if dispatch not in dispatch_lib.DISPATCH_MODES:
            raise ValueError(
                "`dispatch` must be one of "
                f"{', '.join(map(repr, dispatch_lib.DISPATCH_MODES))}. "
                f"Received: dispatch={dispatch!r}"
            )
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.hidden_dim = hidden_dim
        self.output_dim = output_dim
        self.top_k = top_k
        self.routing = routing
        self.capacity_factor = capacity_factor
        self.activation = keras.activations.get(activation)
        self.gated = gated
        self.use_bias = use_bias
        self.aux_loss_weight = aux_loss_weight
        self.z_loss_weight = z_loss_weight
        self.router_noise = router_noise
        self.router_jitter = router_jitter
        self.dispatch = dispatch
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.router_initializer = keras.initializers.get(router_initializer)
        self.seed = seed
        self.num_groups = num_groups
        self.group_top_k = group_top_k
        self.num_shared_experts = num_shared_experts
        self.supports_masking = True
        # Telemetry: Keras collects the metrics of sublayers into fit() logs.
        # Not on JAX, whose trainer cannot update metrics owned by a layer
        # inside `call` (keras-team/keras#21639): there `route()` remains.
        self.telemetry_metrics = []
        if keras.backend.backend() != "jax":
            names = [f"load_{e}" for e in range(num_experts)] + ["dropped"]
            if routing != "hash":  # hash routing has no router
                names.append("router_entropy")
            if routing == "hierarchical":
                names += [f"group_load_{g}" for g in range(num_groups)]
                names.append("group_router_entropy")
            self.telemetry_metrics = [
                keras.metrics.Mean(name=f"{self.name}_{n}") for n in names
            ]

    @property
    def experts_per_input(self):
        """The `k` each input is routed to (resolved from `top_k`).

        For `"hierarchical"`, `groups_per_input * top_k`; for
        `"expert_choice"`, which has no fixed `k`, `num_experts` (the most
        experts that can pick one input).
        """
        if self.routing in ("soft", "expert_choice"):
            return self.num_experts
        if self.routing in ("switch", "hash"):
            return 1
        if self.routing == "hierarchical":
            return self.groups_per_input * self.experts_per_group
        if self.top_k is None:
            return min(2, self.num_experts)
        return self.top_k

    @property
    def groups_per_input(self):
        """`"hierarchical"`: groups each input goes to (`group_top_k`)."""
        return self.group_top_k or 1

    @property
    def experts_per_group(self):
        """`"hierarchical"`: experts chosen within each chosen group."""
        if self.top_k is not None:
            return self.top_k
        return min(2, self.num_experts // self.num_groups)

    @property
    def expert_choice_capacity_factor(self):
        """`"expert_choice"`: the capacity factor used (2.0 when unset)."""
        if self.capacity_factor is None:
            return EXPERT_CHOICE_CAPACITY_FACTOR
        return self.capacity_factor

    def build(self, input_shape):
        if len(input_shape) not in (2, 3):
            raise ValueError(
                "`MoELayer` takes inputs of rank 2 `(batch, features)` or "
                "rank 3 `(batch, sequence, features)`. "
                f"Received: input_shape={tuple(input_shape)}"
            )
        input_dim = input_shape[-1]
        if input_dim is None:
            raise ValueError(
                "The last dimension of the inputs of `MoELayer` must be "
                f"defined. Received: input_shape={tuple(input_shape)}"
            )
        output_dim = self.output_dim or input_dim

        def router(num_experts, top_k, normalize, name, seed=self.seed):
            gating_network = GatingNetwork(
                num_experts=num_experts,
                top_k=top_k,
                normalize_top_k=normalize,
                noisy=self.router_noise,
                jitter_noise=self.router_jitter,
                kernel_initializer=self.router_initializer,
                seed=seed,
                # float32 whatever the policy: see GatingNetwork.
                dtype="float32",
                name=name,
            )
            gating_network.build((None, input_dim))
            return gating_network

        # Hash routing has no router. Expert choice and the expert level of
        # hierarchical routing need the probabilities of every expert.
        self.gating_network = None
        if self.routing != "hash":
            sparse = self.routing in ("top_k", "switch")
            self.gating_network = router(
                self.num_experts,
                self.experts_per_input if sparse else None,
                self.routing == "top_k",
                "gating_network",
            )
        if self.routing == "hierarchical":
            self.group_gating_network = router(
                self.num_groups,
                self.groups_per_input,
                False,
                "group_gating_network",
                seed=None if self.seed is None else self.seed + 1,
            )
        # Stacked expert weights, experts axis first, one variable each.
        kernel_init = _PerExpertInitializer(self.kernel_initializer)
        h = self.hidden_dim

        def add(name, num, shape, initializer):
            return self.add_weight(
                name=name, shape=(num,) + shape, initializer=initializer
            )

        for prefix, num in (
            ("expert", self.num_experts),
            ("shared_expert", self.num_shared_experts),
        ):
            if not num:
                continue
            setattr(
                self,
                f"{prefix}_in_kernel",
                add(f"{prefix}_in_kernel", num, (input_dim, h), kernel_init),
            )
            if self.gated:
                setattr(
                    self,
                    f"{prefix}_gate_kernel",
                    add(
                        f"{prefix}_gate_kernel",
                        num,
                        (input_dim, h),
                        kernel_init,
                    ),
                )
            setattr(
                self,
                f"{prefix}_out_kernel",
                add(f"{prefix}_out_kernel", num, (h, output_dim), kernel_init),
            )
            if self.use_bias:
                bias_init = self.bias_initializer
                for part, width in (("in", h), ("gate", h), ("out", None)):
                    if part == "gate" and not self.gated:
                        continue
                    name = f"{prefix}_{part}_bias"
                    shape = (width or output_dim,)
                    setattr(self, name, add(name, num, shape, bias_init))

    @property
    def expert_weights(self):
        """The stacked expert variables, experts axis first, in the order
        `expert_fn` takes them."""
        return self._stacked_weights("expert")

    @property
    def shared_expert_weights(self):
        """The stacked shared-expert variables (`[]` without shared
        experts), in the order `expert_fn` takes them."""
        if not self.num_shared_experts:
            return []
        return self._stacked_weights("shared_expert")

    def _stacked_weights(self, prefix):
        names = ["in_kernel"]
        if self.use_bias:
            names.append("in_bias")
        if self.gated:
            names.append("gate_kernel")
            if self.use_bias:
                names.append("gate_bias")
        names.append("out_kernel")
        if self.use_bias:
            names.append("out_bias")
        return [getattr(self, f"{prefix}_{n}") for n in names]

    def expert_fn(self, x, *params):
        """Run experts on `x`: `(..., n, d)` with params for the same
        leading expert axes (or one expert's params for `(n, d)`)."""
        params = list(params)
        w_in = params.pop(0)
        b_in = params.pop(0) if self.use_bias else None
        hidden = _affine(x, w_in, b_in)
        if self.gated:
            w_gate = params.pop(0)
            b_gate = params.pop(0) if self.use_bias else None
            hidden = self.activation(_affine(x, w_gate, b_gate)) * hidden
        else:
            hidden = self.activation(hidden)
        w_out = params.pop(0)
        b_out = params.pop(0) if self.use_bias else None
        return _affine(hidden, w_out, b_out)

    def _flatten(self, inputs, mask):
        # (batch, [seq,] d) -> tokens (T, d) and a bool token mask (T,).
        rank = len(inputs.shape)
        if mask is not None:
            expected = tuple(inputs.shape[:-1])
            if len(mask.shape) != rank - 1 or any(
                m is not None and s is not None and m != s
                for m, s in zip(tuple(mask.shape), expected)
            ):
                raise ValueError(
                    "`mask` must have the shape of the inputs without the "
                    f"last axis, {expected}. Received: "
                    f"mask.shape={tuple(mask.shape)}"
                )
            mask = ops.reshape(ops.cast(mask, "bool"), (-1,))
        tokens = ops.reshape(inputs, (-1, ops.shape(inputs)[-1]))
        return tokens, mask

    def _flatten_routing_key(self, routing_key, inputs):
        # `routing_key` (batch, [seq]) -> (T,) for hash routing.
        if self.routing != "hash":
            if routing_key is not None:
                raise ValueError(
                    "`routing_key` is only used by `routing='hash'`. "
                    f"Received: routing={self.routing!r} and a routing_key"
                )
            return None
        expected = tuple(inputs.shape[:-1])
        if routing_key is None:
            raise ValueError(
                "`routing='hash'` routes by an integer key per input: call "
                "the layer as `layer(x, routing_key=ids)` with `ids` of shape "
                f"{expected} (e.g. token ids). Received: routing_key=None"
            )
        shape = tuple(routing_key.shape)
        if len(shape) != len(expected) or any(
            a is not None and b is not None and a != b
            for a, b in zip(shape, expected)
        ):
            raise ValueError(
                "`routing_key` must have the shape of the inputs without the "
                f"last axis, {expected}. Received: routing_key.shape={shape}"
            )
        return ops.reshape(routing_key, (-1,))

    def _decide(self, tokens, token_mask, keys, training):
        """The routing decision for `(T, d)` tokens, as a dict.

        Token-choice routings give `expert_indices` / `expert_weights`
        `(T, k)`; routings with a router also give `router_logits` and
        `router_probs` `(T, E)`; hierarchical adds `group_indices`,
        `group_logits` and `group_probs`; expert choice gives
        `token_indices`, `pick_weights`, `picked` `(E, C)` and
        `chosen_by` `(T, E)` (1.0 where expert `e` picked token `t`).
        """
        if self.routing == "hash":
            indices, weights = routing_lib.hash_routing(keys, self.num_experts)
            return {"expert_indices": indices, "expert_weights": weights}
        decision = dict(self.gating_network(tokens, training=training))
        if self.routing == "hierarchical":
            group = self.group_gating_network(tokens, training=training)
            indices, weights, joint = routing_lib.hierarchical_routing(
                group["router_probs"],
                decision["router_logits"],
                self.groups_per_input,
                self.experts_per_group,
            )
            decision.update(
                expert_indices=indices,
                expert_weights=weights,
                router_probs=joint,
                group_indices=group["expert_indices"],
                group_logits=group["router_logits"],
                group_probs=group["router_probs"],
            )
        elif self.routing == "expert_choice":
            num_tokens = _static_dim(tokens, 0)
            capacity = routing_lib.expert_choice_capacity(
                num_tokens,
                self.num_experts,
                self.expert_choice_capacity_factor,
            )
            token_indices, pick_weights, picked = (
                routing_lib.expert_choice_routing(
                    decision["router_probs"], capacity, token_mask
                )
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
            decision.update(
                token_indices=token_indices,
                pick_weights=pick_weights,
                picked=picked,
                chosen_by=chosen_by,
            )
        return decision

    def route(self, inputs, mask=None, routing_key=None):
        """Which experts each input goes to at inference, with which weights.

        For `"expert_choice"` the answer is per input too: `k = num_experts`
        slots, the experts that picked the input first (most probable
        first), then the others with `kept=False` and weight 0. It depends
        on the other inputs of the call, as the layer's output does.

        Args:
            inputs: the layer's inputs, `(batch, d)` or `(batch, seq, d)`.
            mask: optional mask as in `call`.
            routing_key: the integer keys, for `routing="hash"`.

        Returns:
            A dict with `inputs.shape[:-1] + (k,)` tensors:
            `"expert_indices"` (int32, most probable first; for
            `"hierarchical"`, the best group's experts first),
            `"expert_weights"` (float32 combine weights) and `"kept"` (bool:
            False where the pair is dropped for capacity, or masked, or, for
            expert choice, not picked).
        """
        tokens, token_mask = self._flatten(inputs, mask)
        keys = self._flatten_routing_key(routing_key, inputs)
        decision = self._decide(tokens, token_mask, keys, training=False)
        if self.routing == "expert_choice":
            chosen_by = decision["chosen_by"]  # (T, E)
            probs = decision["router_probs"]
            # (T, E). Probabilities are <= 1: +2 ranks the picking experts
            # first, each part most probable first.
            _, indices = ops.top_k(probs + 2.0 * chosen_by, self.num_experts)
            indices = ops.cast(indices, "int32")
            kept = ops.take_along_axis(chosen_by, indices, axis=1) > 0
            weights = ops.where(
                kept, ops.take_along_axis(probs, indices, axis=1), 0.0
            )
        else:
            indices = decision["expert_indices"]
            weights = decision["expert_weights"]
            kept = self._kept_pairs(indices, token_mask)
        batch_shape = tuple(ops.shape(inputs)[:-1])
        k = self.experts_per_input
        return {
            "expert_indices": ops.reshape(indices, batch_shape + (k,)),
            "expert_weights": ops.reshape(weights, batch_shape + (k,)),
            "kept": ops.reshape(kept, batch_shape + (k,)),
        }

    def _kept_pairs(self, expert_indices, token_mask):
        # (tokens, k) bool: the pair is routed and within capacity.
        num_tokens = ops.shape(expert_indices)[0]
        k = ops.shape(expert_indices)[1]
        pair_experts, _ = dispatch_lib.flatten_pairs(
            expert_indices, expert_indices, token_mask, self.num_experts
        )
        kept = ops.less(pair_experts, self.num_experts)
        if self.capacity_factor is not None and self.routing != "soft":
            positions, _ = dispatch_lib.positions_in_expert(
                pair_experts, self.num_experts
            )
            capacity = dispatch_lib.expert_capacity(
                num_tokens, k, self.num_experts, self.capacity_factor
            )
            kept = ops.logical_and(kept, ops.less(positions, capacity))
        return ops.transpose(ops.reshape(kept, (k, num_tokens)))

    def call(self, inputs, training=None, mask=None, routing_key=None):
        tokens, token_mask = self._flatten(inputs, mask)  # (T, d), (T,)
        keys = self._flatten_routing_key(routing_key, inputs)  # (T,) or None
        decision = self._decide(tokens, token_mask, keys, training)
        if self.routing == "soft":
            outputs = dispatch_lib.soft_dispatch(
                tokens,
                decision["expert_weights"],
                self.expert_weights,
                self.expert_fn,
            )
            dropped = ops.zeros((), "float32")
        elif self.routing == "expert_choice":
            outputs = dispatch_lib.expert_choice_dispatch(
                tokens,
                decision["token_indices"],
                decision["pick_weights"],
                decision["picked"],
                self.expert_weights,
                self.expert_fn,
            )
            dropped = _unpicked_fraction(decision["chosen_by"], token_mask)
        else:
            outputs, dropped = self._sparse_dispatch(
                tokens,
                decision["expert_indices"],
                decision["expert_weights"],
                token_mask,
            )
        if self.num_shared_experts:
            outputs = outputs + dispatch_lib.dense_experts(
                tokens, self.shared_expert_weights, self.expert_fn
            )
        if token_mask is not None:
            outputs = outputs * ops.cast(token_mask, outputs.dtype)[:, None]
        outputs = ops.reshape(
            outputs, tuple(ops.shape(inputs)[:-1]) + (ops.shape(outputs)[-1],)
        )
        if training or self.telemetry_metrics:
            self._add_losses_and_telemetry(
                decision, token_mask, dropped, training
            )
        return outputs

    def _use_static_dispatch(self, tokens):
        if self.dispatch == "static":
            return True
        if not dispatch_lib.shapes_must_be_static(tokens):
            return False
        if self.dispatch == "dynamic":
            raise ValueError(
                "`dispatch='dynamic'` needs dynamic shapes, which a compiler "
                "tracing this call (JAX jit, XLA, torch.compile) does not "
                "allow. Use dispatch='auto' or 'static'. "
                f"Received: dispatch={self.dispatch!r}"
            )
        return True

    def _sparse_dispatch(self, tokens, indices, weights, token_mask):
        """Run each token through its chosen experts only.

        Returns `(outputs (T, d_out), dropped fraction)`.
        """
        k = self.experts_per_input
        experts = self.expert_weights
        static = self._use_static_dispatch(tokens)
        # (k * T,) slot-major pairs; unrouted pairs have expert `E`.
        pair_experts, pair_weights = dispatch_lib.flatten_pairs(
            indices, weights, token_mask, self.num_experts
        )
        dropped = ops.zeros((), "float32")
        if self.capacity_factor is not None or static:
            positions, counts = dispatch_lib.positions_in_expert(
                pair_experts, self.num_experts
            )
        if self.capacity_factor is not None:
            capacity = dispatch_lib.expert_capacity(
                _static_dim(tokens, 0),
                k,
                self.num_experts,
                self.capacity_factor,
            )
            routed = ops.less(pair_experts, self.num_experts)
            kept = ops.logical_and(routed, ops.less(positions, capacity))
            dropped = 1.0 - ops.sum(ops.cast(kept, "float32")) / ops.maximum(
                ops.sum(ops.cast(routed, "float32")), 1.0
            )
        if not static:
            if self.capacity_factor is not None:
                pair_experts = ops.where(kept, pair_experts, self.num_experts)
            outputs = dispatch_lib.dynamic_dispatch(
                tokens, pair_experts, pair_weights, k, experts, self.expert_fn
            )
        elif self.capacity_factor is not None:
            outputs = dispatch_lib.capacity_dispatch(
                tokens,
                pair_experts,
                positions,
                pair_weights,
                k,
                experts,
                self.expert_fn,
                self.num_experts,
                capacity,
            )
        else:
            outputs = dispatch_lib.block_dispatch(
                tokens,
                pair_experts,
                positions,
                counts,
                pair_weights,
                k,
                experts,
                self.expert_fn,
                self.num_experts,
            )
        return outputs, dropped

    def _add_losses_and_telemetry(
        self, decision, token_mask, dropped, training
    ):
        float_mask = (
            None if token_mask is None else ops.cast(token_mask, "float32")
        )
        if self.routing == "expert_choice":
            load = losses.expert_choice_load(decision["picked"])
        else:
            load = losses.expert_load(
                decision["expert_indices"],
                decision["expert_weights"],
                self.num_experts,
                float_mask,
                soft=self.routing == "soft",
            )
        values = [load[e] for e in range(self.num_experts)] + [dropped]
        if self.routing == "hash":
            # No router: nothing to balance or to keep small (the hash is
            # fixed), so no loss and no router entropy.
            self._update_telemetry(values)
            return
        probs = decision["router_probs"]
        logits = decision["router_logits"]
        values.append(losses.router_entropy(probs, float_mask))
        aux_losses, z_losses = [], []
        if self.routing == "hierarchical":
            group_probs = decision["group_probs"]
            group_load = losses.expert_load(
                decision["group_indices"],
                None,
                self.num_groups,
                float_mask,
            )
            # Both levels: balance across groups, and across all experts
            # under the joint distribution p(group) * p(expert | group).
            aux_losses.append(
                losses.load_balancing_loss(group_probs, group_load, float_mask)
            )
            z_losses.append(
                losses.router_z_loss(decision["group_logits"], float_mask)
            )
            # The expert router's softmax runs within each group: the z-loss
            # of each group's logits, averaged over the groups.
            group_size = self.num_experts // self.num_groups
            group_logits = ops.reshape(
                logits, (-1, self.num_groups, group_size)
            )
            z_losses.append(
                ops.mean(losses.router_z_loss(group_logits, float_mask))
            )
            values += [group_load[g] for g in range(self.num_groups)]
            values.append(losses.router_entropy(group_probs, float_mask))
        else:
            z_losses.append(losses.router_z_loss(logits, float_mask))
        if self.routing != "expert_choice":
            # Expert choice is balanced by construction: no auxiliary loss.
            aux_losses.append(
                losses.load_balancing_loss(probs, load, float_mask)
            )
        if training and self.aux_loss_weight:
            for loss in aux_losses:
                self.add_loss(self.aux_loss_weight * loss)
        if training and self.z_loss_weight:
            for loss in z_losses:
                self.add_loss(self.z_loss_weight * loss)
        self._update_telemetry(values)

    def _update_telemetry(self, values):
        # `values` in the order of `self.telemetry_metrics`.
        for metric, value in zip(self.telemetry_metrics, values):
            metric.update_state(value)

    def compute_mask(self, inputs, mask=None):
        return mask

    def compute_output_shape(self, input_shape):
        output_dim = self.output_dim or input_shape[-1]
        return tuple(input_shape[:-1]) + (output_dim,)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "hidden_dim": self.hidden_dim,
                "output_dim": self.output_dim,
                "top_k": self.top_k,
                "routing": self.routing,
                "capacity_factor": self.capacity_factor,
                "activation": keras.activations.serialize(self.activation),
                "gated": self.gated,
                "use_bias": self.use_bias,
                "aux_loss_weight": self.aux_loss_weight,
                "z_loss_weight": self.z_loss_weight,
                "router_noise": self.router_noise,
                "router_jitter": self.router_jitter,
                "dispatch": self.dispatch,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "bias_initializer": keras.initializers.serialize(
                    self.bias_initializer
                ),
                "router_initializer": keras.initializers.serialize(
                    self.router_initializer
                ),
                "seed": self.seed,
                "num_groups": self.num_groups,
                "group_top_k": self.group_top_k,
                "num_shared_experts": self.num_shared_experts,
            }
        )
        return config


def _affine(x, kernel, bias):
    y = ops.matmul(x, kernel)
    if bias is not None:
        y = y + ops.expand_dims(bias, -2)
    return y


def _static_dim(x, axis):
    # The Python int size of `axis` when known while tracing, else a tensor.
    size = x.shape[axis]
    return size if size is not None else ops.shape(x)[axis]


def _unpicked_fraction(chosen_by, token_mask):
    # Expert choice: the fraction of routed tokens that no expert picked.
    unpicked = ops.cast(ops.sum(chosen_by, axis=1) == 0, "float32")  # (T,)
    if token_mask is None:
        return ops.mean(unpicked)
    routed = ops.cast(token_mask, "float32")
    return ops.sum(unpicked * routed) / ops.maximum(ops.sum(routed), 1.0)


def _validate_groups(routing, num_experts, num_groups, group_top_k):
    if routing != "hierarchical":
        for name, value in (
            ("num_groups", num_groups),
            ("group_top_k", group_top_k),
        ):
            if value is not None:
                raise ValueError(
                    f"`{name}` is only used by `routing='hierarchical'`. "
                    f"Received: routing={routing!r}, {name}={value}"
                )
        return
    if (
        not isinstance(num_groups, int)
        or num_groups < 1
        or num_experts % num_groups
    ):
        raise ValueError(
            "`routing='hierarchical'` needs `num_groups`, an integer >= 1 "
            f"that divides `num_experts` ({num_experts}). "
            f"Received: num_groups={num_groups}"
        )
    if group_top_k is not None and (
        not isinstance(group_top_k, int) or not 1 <= group_top_k <= num_groups
    ):
        raise ValueError(
            f"`group_top_k` must be between 1 and `num_groups` ({num_groups})."
            f" Received: group_top_k={group_top_k}"
        )


def _validate_positive_int(name, value):
    if not isinstance(value, int) or value < 1:
        raise ValueError(
            f"`{name}` must be an integer >= 1. Received: {name}={value}"
        )


class _PerExpertInitializer:
    """Initialise a stacked `(experts, ...)` weight one expert at a time.

    Keras computes fans from all leading axes of a 3-D shape, which would
    scale a variance-scaling initializer by the number of experts. A seeded
    initializer gets `seed + e` for expert `e`, so experts differ.
    """

    def __init__(self, initializer):
        self.initializer = initializer

    def __call__(self, shape, dtype=None):
        config = self.initializer.get_config()
        slices = []
        for e in range(shape[0]):
            initializer = self.initializer
            if isinstance(config.get("seed"), int):
                initializer = self.initializer.__class__.from_config(
                    {**config, "seed": config["seed"] + e}
                )
            slices.append(initializer(shape[1:], dtype=dtype))
        return ops.stack(slices)
