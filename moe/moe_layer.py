import keras
from keras import ops

from moe import activations, quantization, routers, validation
from moe import dispatch as dispatch_lib
from moe import telemetry as telemetry_lib
from moe.decisions import EveryExpert
from moe.experts import Experts, check_output_width, make_experts
from moe.layer_compat import MoELayerCompat

# Arguments renamed since earlier versions: old name -> new name (configs
# that still use the old one load).
RENAMED_ARGUMENTS = {"group_top_k": "groups_per_token"}


class _RouterArgument:
    # A router argument of `MoELayer`, read from its router (the owner):
    # read-only, the layer keeps no copy.
    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, layer, owner=None):
        if layer is None:
            return self
        return routers.router_argument(layer.router, self.name)

    def __set__(self, layer, value):
        raise AttributeError(
            f"`{self.name}` is the router's (`layer.router.{self.name}`), "
            "set when the layer is made"
        )


@keras.saving.register_keras_serializable(package="moe")
class MoELayer(MoELayerCompat, keras.layers.Layer):
    """Sparse Mixture-of-Experts feed-forward layer.

    A router (`moe.routers`) sends each input to some of `num_experts`
    experts; the output is the weighted sum of the chosen experts' outputs,
    plus the always-on shared experts. Compute is sparse for real: an input
    meets only the weights of the experts routed to it (except
    `routing="soft"`). The experts (`moe.Experts`) are FFNs, GLU with
    `gated=True`, weights stacked experts axis first (`expert_in_kernel` is
    `(num_experts, d, hidden_dim)`), or any Keras layers (`experts=[...]`).
    Inputs are `(batch, d)` or `(batch, seq, d)`; masked positions are not
    routed, not counted, and output zeros. In training the router adds its
    losses and updates its balancing state; `fit()` logs the telemetry
    (`moe.telemetry`). `route()` tells where each input goes.
    `docs/layers.md` describes every routing and option.

    Args:
        num_experts: int >= 1 (`len(experts)` with `experts`).
        hidden_dim: int >= 1, each expert's hidden width.
        output_dim: int or `None` (the input width).
        routing: `"top_k"`, `"switch"`, `"soft"`, `"expert_choice"`,
            `"hash"`, `"hierarchical"`, or a `moe.routers.Router` (then the
            router arguments stay unset, or equal the router's). Defaults
            to `"top_k"`.
        top_k, capacity_factor, aux_loss_weight, z_loss_weight,
            router_noise, router_jitter, router_initializer,
            router_use_bias, seed,
            num_groups, groups_per_token, score_function, normalize_top_k,
            routed_scaling_factor, group_score, selection_bias,
            bias_update_rate: the router's arguments, documented and
            validated by the router of `routing` (`moe.routers`), which
            owns them: `layer.top_k`, ... read the router's values.
        activation, gated, use_bias, glu_limit, glu_linear_offset,
            kernel_initializer, bias_initializer: the experts'
            (`moe.Experts`).
        dispatch: `"auto"`, `"dynamic"`, `"static"`, `"grouped"` or
            `"gather"`, the layout of the sparse dispatch (`moe.dispatch`;
            `"auto"` picks by token count and backend); all give the same
            outputs.
        num_shared_experts: int >= 0, always-on experts (weight 1).
        shared_expert_hidden_dim: int or `None` (`hidden_dim`), their width.
        shared_expert_gate: bool, scale their output per input by
            `sigmoid(x @ shared_gate_kernel)` (Qwen2-MoE), a float32
            `(d, 1)` weight.
        experts: `None`, or a list of Keras layers, one per expert
            (`moe.LayerExperts`; the expert arguments then shape only the
            shared experts).
        telemetry: `"summary"`, `"full"` or `"none"` (`moe.telemetry`).
            Defaults to `"summary"`.
        **kwargs: base layer arguments; `name` defaults to `"moe"`.

    Call arguments:
        inputs: `(batch, d)` or `(batch, seq, d)`.
        training: bool; noise, jitter, losses and bias updates only then.
        mask: optional bool mask of shape `inputs.shape[:-1]`.
        routing_key: integer tensor of shape `inputs.shape[:-1]`, the keys
            in `[0, 2**31)` of `routing="hash"` (e.g. token ids); refused
            by other routings.

    Returns:
        `inputs.shape[:-1] + (output_dim,)` in the layer's compute dtype.

    Example:

    >>> import numpy as np
    >>> inputs = keras.Input(shape=(16,))
    >>> x = MoELayer(num_experts=8, hidden_dim=32, top_k=2)(inputs)
    >>> model = keras.Model(inputs, keras.layers.Dense(3)(x))
    >>> model.predict(np.ones((4, 16)), verbose=0).shape
    (4, 3)

    References:
        Shazeer et al., 2017, "Outrageously Large Neural Networks"; Dai et
        al., 2024, "DeepSeekMoE" (shared, fine-grained experts).
    """

    def __init__(
        self,
        num_experts=None,
        hidden_dim=None,
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
        router_use_bias=False,
        seed=None,
        num_groups=None,
        groups_per_token=None,
        num_shared_experts=0,
        score_function="softmax",
        normalize_top_k=None,
        routed_scaling_factor=1.0,
        group_score="max",
        selection_bias=False,
        bias_update_rate=0.0,
        shared_expert_hidden_dim=None,
        shared_expert_gate=False,
        experts=None,
        telemetry="summary",
        glu_limit=None,
        glu_linear_offset=0.0,
        **kwargs,
    ):
        # Which sublayers `model.quantize` quantized (`moe.quantization`).
        quantized_sublayers = kwargs.pop("quantized_sublayers", None)
        if "group_top_k" in kwargs:  # see RENAMED_ARGUMENTS
            groups_per_token = kwargs.pop("group_top_k")
        routing = routers.get(routing)  # a name, or a (deserialized) router
        routed, shared = make_experts(
            num_experts=num_experts,
            hidden_dim=hidden_dim,
            output_dim=output_dim,
            activation=activation,
            gated=gated,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            num_shared_experts=num_shared_experts,
            shared_expert_hidden_dim=shared_expert_hidden_dim,
            shared_expert_gate=shared_expert_gate,
            experts=experts,
            seed=seed,
            glu_limit=glu_limit,
            glu_linear_offset=glu_linear_offset,
            dtype=kwargs.get("dtype"),
        )
        validation.one_of("dispatch", dispatch, dispatch_lib.DISPATCH_MODES)
        validation.one_of("telemetry", telemetry, telemetry_lib.MODES)
        # The router validates and owns its arguments; the layer reads them
        # back through properties (`top_k`, `capacity_factor`, ...).
        router = routers.router_for(
            routing,
            routed.num_experts,
            name="router",
            top_k=top_k,
            capacity_factor=capacity_factor,
            aux_loss_weight=aux_loss_weight,
            z_loss_weight=z_loss_weight,
            router_noise=router_noise,
            router_jitter=router_jitter,
            router_initializer=router_initializer,
            router_use_bias=router_use_bias,
            seed=seed,
            num_groups=num_groups,
            groups_per_token=groups_per_token,
            score_function=score_function,
            normalize_top_k=normalize_top_k,
            routed_scaling_factor=routed_scaling_factor,
            group_score=group_score,
            selection_bias=selection_bias,
            bias_update_rate=bias_update_rate,
        )
        # Earlier versions made their own copy of the router initializer
        # here, which draws a seed from Python's `random` when unseeded;
        # drawing it still keeps every seeded model initialised as before.
        keras.initializers.get(router_initializer)
        if kwargs.get("name") is None:
            uid = keras.backend.get_uid("moe")
            kwargs["name"] = "moe" if uid == 1 else f"moe_{uid - 1}"
        super().__init__(**kwargs)
        self.num_experts = routed.num_experts
        self.hidden_dim = hidden_dim
        self.output_dim = output_dim
        self.routing = routing
        self.activation = activations.get(activation)
        self.gated = gated
        self.use_bias = use_bias
        self.glu_limit = glu_limit
        self.glu_linear_offset = glu_linear_offset
        self.dispatch = dispatch
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.num_shared_experts = num_shared_experts
        self.shared_expert_hidden_dim = shared_expert_hidden_dim
        self.shared_expert_gate = shared_expert_gate
        self.telemetry = telemetry
        self.router = router
        self.experts = routed
        self.shared_experts = shared
        self.quantized_sublayers = quantized_sublayers
        self.supports_masking = True
        self.input_spec = keras.InputSpec(min_ndim=2, max_ndim=3)
        self._telemetry_names = telemetry_lib.metric_names(telemetry, router)
        self.telemetry_metrics = telemetry_lib.make_metrics(
            self._telemetry_names, router, self.name
        )

    # The router's arguments, read from the router (`moe.routers`); the
    # router's `selection_bias` variable is `layer.selection_bias`
    # (`MoELayerCompat`), the flag `use_selection_bias`.
    top_k = _RouterArgument()
    capacity_factor = _RouterArgument()
    aux_loss_weight = _RouterArgument()
    z_loss_weight = _RouterArgument()
    router_noise = _RouterArgument()
    router_jitter = _RouterArgument()
    router_initializer = _RouterArgument()
    router_use_bias = _RouterArgument()
    seed = _RouterArgument()
    num_groups = _RouterArgument()
    groups_per_token = _RouterArgument()
    score_function = _RouterArgument()
    normalize_top_k = _RouterArgument()
    routed_scaling_factor = _RouterArgument()
    group_score = _RouterArgument()
    bias_update_rate = _RouterArgument()

    @property
    def use_selection_bias(self):
        """Whether the router adds a selection bias (`selection_bias`)."""
        return routers.router_argument(self.router, "selection_bias")

    def build(self, input_shape):
        input_dim = input_shape[-1]
        if input_dim is None:
            raise ValueError(
                "The last dimension of the inputs of `MoELayer` must be "
                f"defined. Received: input_shape={tuple(input_shape)}"
            )
        tokens_shape = (None, input_dim)
        for part in (self.router, self.experts, self.shared_experts):
            if part is not None and not part.built:
                part.build(tokens_shape)
        check_output_width(
            self.experts, self.shared_experts, tokens_shape, self.output_dim
        )
        if self.shared_expert_gate:
            # float32 like a router; not cast to a mixed compute dtype.
            self.shared_gate_kernel = self.add_weight(
                name="shared_gate_kernel",
                shape=(input_dim, 1),
                initializer=self.kernel_initializer,
                dtype="float32",
                autocast=False,
            )
        self.input_spec = keras.InputSpec(
            min_ndim=2, max_ndim=3, axes={-1: input_dim}
        )
        quantization.restore_sublayers(self, self.quantized_sublayers)

    def call(self, inputs, training=None, mask=None, routing_key=None):
        tokens, token_mask = self._flatten(inputs, mask)  # (T, d), (T,)
        keys = self.router.routing_key_tokens(routing_key, inputs)  # (T,)
        decision = self.router(
            tokens, token_mask=token_mask, routing_key=keys, training=training
        )
        self.router.check_decision(decision, tokens)
        if tokens.shape[0] == 0:  # nothing to dispatch (an empty batch)
            width = self.compute_output_shape(tokens.shape)[-1]
            outputs, dropped = ops.zeros((0, width), tokens.dtype), 0.0
        else:
            outputs, dropped = dispatch_lib.run_experts(
                decision,
                self.experts,
                tokens,
                token_mask=token_mask,
                capacity_factor=self.capacity_factor,
                mode=self.dispatch,
                training=training,
            )
        if self.shared_experts is not None:
            shared, _ = dispatch_lib.run_experts(
                EveryExpert(), self.shared_experts, tokens
            )  # (T, d_out)
            if self.shared_expert_gate:
                gate = ops.matmul(
                    ops.cast(tokens, "float32"), self.shared_gate_kernel
                )
                shared = shared * ops.cast(ops.sigmoid(gate), shared.dtype)
            outputs = outputs + shared
        if token_mask is not None:
            outputs = outputs * ops.cast(token_mask, outputs.dtype)[:, None]
        if self.telemetry_metrics:
            values = self.router.telemetry_values(
                decision, token_mask, dropped, self.telemetry == "full"
            )
            for name, metric in zip(
                self._telemetry_names, self.telemetry_metrics
            ):
                metric.update_state(values[name])
        return ops.reshape(
            outputs, tuple(ops.shape(inputs)[:-1]) + (ops.shape(outputs)[-1],)
        )

    def route(self, inputs, mask=None, routing_key=None):
        """Where each input goes at inference: a dict of `inputs.shape[:-1]
        + (k,)` tensors `"expert_indices"` (int32, best first),
        `"expert_weights"` (float32) and `"kept"` (bool: False where masked,
        dropped for capacity or, for expert choice, not picked; there `k =
        num_experts`, the picking experts first)."""
        tokens, token_mask = self._flatten(inputs, mask)
        keys = self.router.routing_key_tokens(routing_key, inputs)
        decision = self.router(
            tokens, token_mask=token_mask, routing_key=keys, training=False
        )
        self.router.check_decision(decision, tokens)
        values = self.router.per_token(decision, token_mask)
        batch_shape = tuple(ops.shape(inputs)[:-1])
        names = ("expert_indices", "expert_weights", "kept")
        return {
            name: ops.reshape(value, batch_shape + (ops.shape(value)[-1],))
            for name, value in zip(names, values)
        }

    def enable_lora(
        self,
        rank,
        lora_alpha=None,
        a_initializer="he_uniform",
        b_initializer="zeros",
        train_router=False,
    ):
        """LoRA on every expert: `moe.Experts.enable_lora` on the routed
        experts and the shared ones, whose kernels are then frozen.

        Args:
            rank, lora_alpha, a_initializer, b_initializer: as
                `moe.Experts.enable_lora`.
            train_router: bool; `False` freezes the router (and the shared
                experts' gate) too, so that the adapters (and the experts'
                biases) are all that trains. Defaults to `False`.
        """
        validation.boolean("train_router", train_router)
        if not isinstance(self.experts, Experts):
            raise ValueError(
                "LoRA adapts stacked `Experts`; this layer's experts are "
                "Keras layers of their own (call `enable_lora` on each). "
                f"Received: experts={type(self.experts).__name__}"
            )
        for part in (self.experts, self.shared_experts):
            if part is not None:
                part.enable_lora(rank, lora_alpha, a_initializer, b_initializer)
        if not train_router:
            self.router.trainable = False
            if self.shared_expert_gate:
                self.shared_gate_kernel.trainable = False

    def merge_lora(self):
        """`moe.Experts.merge_lora` on the experts holding adapters: the
        adapters are written into the kernels and dropped; the kernels are
        trainable again (the router keeps its `trainable`)."""
        parts = [
            part
            for part in (self.experts, self.shared_experts)
            if getattr(part, "lora_enabled", False)
        ]
        if not parts:
            raise ValueError(
                f"{self.name!r} has no LoRA adapters to merge; "
                "`enable_lora(rank)` adds them. Received: lora_enabled=False"
            )
        for part in parts:
            part.merge_lora()

    def _flatten(self, inputs, mask):
        # (batch, [seq,] d) -> tokens (T, d) and a bool token mask (T,).
        if mask is not None:
            expected = tuple(inputs.shape[:-1])
            if not validation.same_shape(tuple(mask.shape), expected):
                raise ValueError(
                    "`mask` must have the shape of the inputs without the "
                    f"last axis, {expected}. Received: "
                    f"mask.shape={tuple(mask.shape)}"
                )
            mask = ops.reshape(ops.cast(mask, "bool"), (-1,))
        return ops.reshape(inputs, (-1, ops.shape(inputs)[-1])), mask

    def compute_mask(self, inputs, mask=None):
        return mask

    def compute_output_shape(self, input_shape):
        output_dim = self.experts.compute_output_shape(input_shape)[-1]
        return tuple(input_shape[:-1]) + (output_dim,)

    def get_config(self):
        config = super().get_config()
        layers = getattr(self.experts, "expert_layers", None)
        ser = keras.saving.serialize_keras_object
        config.update(
            num_experts=self.num_experts,
            hidden_dim=self.hidden_dim,
            output_dim=self.output_dim,
            routing=routers.serialize(self.routing),
            activation=activations.serialize(self.activation),
            gated=self.gated,
            use_bias=self.use_bias,
            glu_limit=self.glu_limit,
            glu_linear_offset=self.glu_linear_offset,
            dispatch=self.dispatch,
            kernel_initializer=ser(self.kernel_initializer),
            bias_initializer=ser(self.bias_initializer),
            num_shared_experts=self.num_shared_experts,
            shared_expert_hidden_dim=self.shared_expert_hidden_dim,
            shared_expert_gate=self.shared_expert_gate,
            experts=None if layers is None else [ser(la) for la in layers],
            telemetry=self.telemetry,
            # The router's arguments, as the router holds them.
            top_k=self.top_k,
            capacity_factor=self.capacity_factor,
            aux_loss_weight=self.aux_loss_weight,
            z_loss_weight=self.z_loss_weight,
            router_noise=self.router_noise,
            router_jitter=self.router_jitter,
            router_initializer=ser(self.router_initializer),
            router_use_bias=self.router_use_bias,
            seed=self.seed,
            num_groups=self.num_groups,
            groups_per_token=self.groups_per_token,
            score_function=self.score_function,
            normalize_top_k=self.normalize_top_k,
            routed_scaling_factor=self.routed_scaling_factor,
            group_score=self.group_score,
            selection_bias=self.use_selection_bias,
            bias_update_rate=self.bias_update_rate,
        )
        quantized = quantization.quantized_sublayers(self)
        if quantized:
            config["quantized_sublayers"] = quantized
        return config
