import keras
from keras import ops

from moe import dispatch as dispatch_lib
from moe import losses
from moe.gating_network import (
    GatingNetwork,
    validate_num_experts,
    validate_top_k,
)
from moe.routing import ROUTINGS


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

    With `capacity_factor=c`, each expert takes at most
    `ceil(c * tokens * top_k / num_experts)` inputs per call; pairs beyond
    that are dropped — first choices have priority over second choices,
    earlier inputs over later ones — and a dropped input gets zero output from
    that expert (the caller's residual connection carries it). With
    `capacity_factor=None` nothing is dropped.

    Inputs are `(batch, d)`, one routed input per row (e.g. pooled
    features), or `(batch, seq, d)` with an optional Keras mask: masked
    positions are not routed, not counted in load or losses, and output
    zeros.

    During training the layer adds the load-balancing loss
    (`aux_loss_weight`) and the router z-loss (`z_loss_weight`) with
    `add_loss`, and tracks metrics that show up in `fit()` logs and History
    with no wiring: `<name>_load_<e>` (fraction of routed assignments
    choosing expert `e`; `1 / num_experts` is balanced),
    `<name>_dropped` (fraction of assignments dropped by capacity) and
    `<name>_router_entropy` (nats). `route()` returns which experts each
    input goes to at inference.

    Args:
        num_experts: int >= 1, number of experts.
        hidden_dim: int >= 1, hidden width of each expert.
        output_dim: int or `None`; defaults to the input dimension.
        top_k: int or `None`; experts per input. Defaults to 2 for
            `"top_k"` (or `num_experts` if smaller), 1 for `"switch"`, all
            for `"soft"`.
        routing: `"top_k"`, `"switch"` or `"soft"`. Defaults to `"top_k"`.
        capacity_factor: float > 0 or `None` (dropless). Defaults to `None`.
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
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `(batch, d)` or `(batch, seq, d)`.
        training: bool; noise, jitter, losses only when `True`.
        mask: optional bool mask of shape `inputs.shape[:-1]`.

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

    References:
        - Shazeer et al., 2017, "Outrageously Large Neural Networks: The
          Sparsely-Gated Mixture-of-Experts Layer".
        - Lepikhin et al., 2020, "GShard".
        - Fedus et al., 2021, "Switch Transformers".
        - Zoph et al., 2022, "ST-MoE".
        - Gale et al., 2022, "MegaBlocks" (dropless block layout).
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
        validate_top_k(top_k, num_experts)
        if routing == "switch" and top_k not in (None, 1):
            raise ValueError(
                "`routing='switch'` routes each input to one expert; leave "
                f"`top_k` unset or 1. Received: top_k={top_k}"
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
        self.supports_masking = True
        # Telemetry: Keras collects the metrics of sublayers into fit() logs.
        # Not on JAX, whose trainer cannot update metrics owned by a layer
        # inside `call` (keras-team/keras#21639): there `route()` remains.
        self.telemetry_metrics = []
        if keras.backend.backend() != "jax":
            self.telemetry_metrics = [
                keras.metrics.Mean(name=f"{self.name}_load_{e}")
                for e in range(num_experts)
            ] + [
                keras.metrics.Mean(name=f"{self.name}_dropped"),
                keras.metrics.Mean(name=f"{self.name}_router_entropy"),
            ]

    @property
    def experts_per_input(self):
        """The `k` each input is routed to (resolved from `top_k`)."""
        if self.routing == "soft":
            return self.num_experts
        if self.routing == "switch":
            return 1
        if self.top_k is None:
            return min(2, self.num_experts)
        return self.top_k

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
        self.gating_network = GatingNetwork(
            num_experts=self.num_experts,
            top_k=None if self.routing == "soft" else self.experts_per_input,
            normalize_top_k=self.routing == "top_k",
            noisy=self.router_noise,
            jitter_noise=self.router_jitter,
            kernel_initializer=self.router_initializer,
            seed=self.seed,
            # float32 whatever the policy: see GatingNetwork.
            dtype="float32",
            name="gating_network",
        )
        self.gating_network.build((None, input_dim))
        # Stacked expert weights, experts axis first, one variable each.
        kernel_init = _PerExpertInitializer(self.kernel_initializer)
        e, h = self.num_experts, self.hidden_dim

        def add(name, shape, initializer):
            return self.add_weight(
                name=name, shape=(e,) + shape, initializer=initializer
            )

        self.expert_in_kernel = add(
            "expert_in_kernel", (input_dim, h), kernel_init
        )
        if self.gated:
            self.expert_gate_kernel = add(
                "expert_gate_kernel", (input_dim, h), kernel_init
            )
        self.expert_out_kernel = add(
            "expert_out_kernel", (h, output_dim), kernel_init
        )
        if self.use_bias:
            bias_init = self.bias_initializer
            self.expert_in_bias = add("expert_in_bias", (h,), bias_init)
            if self.gated:
                self.expert_gate_bias = add("expert_gate_bias", (h,), bias_init)
            self.expert_out_bias = add(
                "expert_out_bias", (output_dim,), bias_init
            )

    @property
    def expert_weights(self):
        """The stacked expert variables, experts axis first, in the order
        `expert_fn` takes them."""
        weights = [self.expert_in_kernel]
        if self.use_bias:
            weights.append(self.expert_in_bias)
        if self.gated:
            weights.append(self.expert_gate_kernel)
            if self.use_bias:
                weights.append(self.expert_gate_bias)
        weights.append(self.expert_out_kernel)
        if self.use_bias:
            weights.append(self.expert_out_bias)
        return weights

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

    def route(self, inputs, mask=None):
        """Which experts each input goes to at inference, with which weights.

        Args:
            inputs: the layer's inputs, `(batch, d)` or `(batch, seq, d)`.
            mask: optional mask as in `call`.

        Returns:
            A dict with `inputs.shape[:-1] + (k,)` tensors:
            `"expert_indices"` (int32, most probable first),
            `"expert_weights"` (float32 combine weights) and `"kept"` (bool:
            False where the pair is dropped for capacity, or masked).
        """
        tokens, token_mask = self._flatten(inputs, mask)
        decision = self.gating_network(tokens, training=False)
        kept = self._kept_pairs(decision["expert_indices"], token_mask)
        batch_shape = tuple(ops.shape(inputs)[:-1])
        k = self.experts_per_input
        return {
            "expert_indices": ops.reshape(
                decision["expert_indices"], batch_shape + (k,)
            ),
            "expert_weights": ops.reshape(
                decision["expert_weights"], batch_shape + (k,)
            ),
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

    def call(self, inputs, training=None, mask=None):
        tokens, token_mask = self._flatten(inputs, mask)  # (T, d), (T,)
        decision = self.gating_network(tokens, training=training)
        indices = decision["expert_indices"]  # (T, k) int32
        weights = decision["expert_weights"]  # (T, k) float32
        if self.routing == "soft":
            outputs = dispatch_lib.soft_dispatch(
                tokens, weights, self.expert_weights, self.expert_fn
            )
            dropped = ops.zeros((), "float32")
        else:
            outputs, dropped = self._sparse_dispatch(
                tokens, indices, weights, token_mask
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
        probs = decision["router_probs"]
        load = losses.expert_load(
            decision["expert_indices"],
            decision["expert_weights"],
            self.num_experts,
            float_mask,
            soft=self.routing == "soft",
        )
        if training and self.aux_loss_weight:
            self.add_loss(
                self.aux_loss_weight
                * losses.load_balancing_loss(probs, load, float_mask)
            )
        if training and self.z_loss_weight:
            self.add_loss(
                self.z_loss_weight
                * losses.router_z_loss(decision["router_logits"], float_mask)
            )
        if self.telemetry_metrics:
            values = [load[e] for e in range(self.num_experts)] + [
                dropped,
                losses.router_entropy(probs, float_mask),
            ]
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
