import inspect

import keras
from keras import ops

from moe import activations, quantization, routers, validation
from moe.moe_layer import RENAMED_ARGUMENTS, MoELayer


@keras.saving.register_keras_serializable(package="moe")
class MoETransformerBlock(keras.layers.Layer):
    """Pre-norm causal Transformer block with a Mixture of Experts as FFN.

    The decoder block of GPT-2 / Switch Transformer / Mixtral, with the
    feed-forward network replaced by a sparse `moe.MoELayer`:

    ```
    x = x + dropout(self_attention(layer_norm(x)))   # causal, padding-masked
    x = x + dropout(moe(layer_norm(x)))              # each position routed
    ```

    Every position is routed to its own experts. Attention is causal (a
    position only sees itself and earlier positions) and never attends to
    padding; padded positions are not routed, so they take no expert
    capacity and do not count in the load-balancing loss or telemetry. The
    block's outputs at padded positions carry no meaning (a padded position
    has nothing to attend to, and the attention then averages over every
    position, later ones included); they never reach a real position, and
    the mask travels with them.

    The MoE layer's own settings (`capacity_factor`, `aux_loss_weight`,
    `z_loss_weight`, `gated`, `router_noise`, `dispatch`, `seed`, and the
    routings' extra arguments) go in `moe_kwargs`, so the block follows
    `MoELayer` without re-listing its arguments; the ones that shape the
    block (`num_experts`, `intermediate_dim`, `top_k`, `routing`,
    `activation`, initializers) are arguments of the block itself.

    Args:
        num_heads: int >= 1, attention heads; the input width must be a
            multiple of it (head size = width / `num_heads`).
        intermediate_dim: int >= 1, hidden width of each expert (keras-hub's
            name for the feed-forward width).
        num_experts: int >= 1, experts in the MoE layer.
        top_k: int or `None`, experts per position (see `MoELayer`).
            Defaults to `None`, the routing's default.
        routing: `MoELayer` routing. Defaults to `"top_k"`.
        dropout: float in `[0, 1)`, dropout of the attention weights and of
            both residual branches. Defaults to `0.0`.
        activation: expert activation. Defaults to `"relu"`.
        layer_norm_epsilon: float > 0, epsilon of both layer norms.
            Defaults to `1e-5`.
        kernel_initializer: initializer of the attention projections and
            the expert kernels. Defaults to `"glorot_uniform"`.
        bias_initializer: initializer of their biases. Defaults to
            `"zeros"`.
        moe_kwargs: dict or `None`, further `MoELayer` arguments, e.g.
            `{"capacity_factor": 1.25, "aux_loss_weight": 0.01}`.
            Defaults to `None`.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: float `(batch, seq, width)`.
        padding_mask: optional bool `(batch, seq)`, `True` for real
            positions. Defaults to the Keras mask of `inputs` (e.g. from
            `Embedding(mask_zero=True)`); without either, nothing is
            padding.
        routing_key: optional int `(batch, seq)`, the keys of
            `routing="hash"` (e.g. the token ids), passed to the MoE layer.
        training: bool; dropout, router noise and the MoE losses only
            when `True`.

    Returns:
        `(batch, seq, width)`, in the layer's compute dtype.

    Example:

    >>> import numpy as np
    >>> tokens = keras.Input((10,), dtype="int32")
    >>> x = keras.layers.Embedding(100, 32, mask_zero=True)(tokens)
    >>> x = MoETransformerBlock(
    ...     num_heads=4, intermediate_dim=64, num_experts=4, top_k=2
    ... )(x)
    >>> model = keras.Model(tokens, x)
    >>> model.predict(np.ones((2, 10), "int32"), verbose=0).shape
    (2, 10, 32)

    References:
        - Vaswani et al., 2017, "Attention Is All You Need".
        - Radford et al., 2019, "Language Models are Unsupervised
          Multitask Learners" (GPT-2, pre-norm).
        - Fedus et al., 2021, "Switch Transformers".
        - Jiang et al., 2024, "Mixtral of Experts".
    """

    def __init__(
        self,
        num_heads,
        intermediate_dim,
        num_experts,
        top_k=None,
        routing="top_k",
        dropout=0.0,
        activation="relu",
        layer_norm_epsilon=1e-5,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        moe_kwargs=None,
        **kwargs,
    ):
        validation.integer("num_heads", num_heads)
        validation.integer("intermediate_dim", intermediate_dim)
        validation.number("dropout", dropout, 0, 1, max_open=True)
        validation.number(
            "layer_norm_epsilon", layer_norm_epsilon, 0, min_open=True
        )
        moe_kwargs = dict(moe_kwargs or {})
        _validate_moe_kwargs(moe_kwargs)
        # Which sublayers `model.quantize` quantized (`moe.quantization`).
        quantized_sublayers = kwargs.pop("quantized_sublayers", None)
        super().__init__(**kwargs)
        self.quantized_sublayers = quantized_sublayers
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.routing = routers.get(routing)
        self.dropout = dropout
        self.activation = activations.get(activation)
        self.layer_norm_epsilon = layer_norm_epsilon
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.moe_kwargs = moe_kwargs
        self.supports_masking = True
        # Created here rather than in build() so that invalid MoE settings
        # fail at construction, like the block's own arguments; its weights
        # are still created in build(). Named after the block: its telemetry
        # metrics (`<name>_max_load`, ...) share one namespace in fit() logs
        # with those of the other blocks.
        self.moe = MoELayer(
            num_experts=num_experts,
            hidden_dim=intermediate_dim,
            top_k=top_k,
            routing=self.routing,
            activation=activation,
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer,
            dtype=self.dtype_policy,
            name=f"{self.name}_moe",
            **moe_kwargs,
        )

    def build(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(
                "`MoETransformerBlock` takes inputs of rank 3 "
                "`(batch, sequence, features)`. "
                f"Received: input_shape={tuple(input_shape)}"
            )
        width = input_shape[-1]
        if width is None or width % self.num_heads:
            raise ValueError(
                "The last dimension of the inputs must be defined and a "
                f"multiple of `num_heads` ({self.num_heads}). "
                f"Received: input_shape={tuple(input_shape)}"
            )
        self.self_attention_layer_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon,
            dtype=self.dtype_policy,
            name="self_attention_layer_norm",
        )
        self.self_attention_layer_norm.build(input_shape)
        self.self_attention = keras.layers.MultiHeadAttention(
            num_heads=self.num_heads,
            key_dim=width // self.num_heads,
            dropout=self.dropout,
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer,
            dtype=self.dtype_policy,
            name="self_attention",
        )
        self.self_attention.build(input_shape, input_shape)
        self.self_attention_dropout = keras.layers.Dropout(
            self.dropout, dtype=self.dtype_policy, name="self_attention_dropout"
        )
        self.feedforward_layer_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon,
            dtype=self.dtype_policy,
            name="feedforward_layer_norm",
        )
        self.feedforward_layer_norm.build(input_shape)
        self.moe.build(input_shape)
        self.feedforward_dropout = keras.layers.Dropout(
            self.dropout, dtype=self.dtype_policy, name="feedforward_dropout"
        )
        quantization.restore_sublayers(self, self.quantized_sublayers)

    def _attend(self, inputs, padding_mask, training):
        # (batch, seq, width): inputs + the causal self-attention branch.
        x = self.self_attention_layer_norm(inputs)
        attention_mask = None
        if padding_mask is not None:
            # (batch, 1, seq): no position attends to padding; the layer
            # adds the causal mask.
            attention_mask = ops.expand_dims(padding_mask, 1)
        x = self.self_attention(
            query=x,
            value=x,
            attention_mask=attention_mask,
            use_causal_mask=True,
            training=training,
        )
        return inputs + self.self_attention_dropout(x, training=training)

    def call(
        self,
        inputs,
        padding_mask=None,
        routing_key=None,
        training=None,
        mask=None,
    ):
        padding_mask = _padding_mask(padding_mask, mask)
        x = self._attend(inputs, padding_mask, training)
        # (batch, seq, width); padded positions are not routed (zeros).
        y = self.moe(
            self.feedforward_layer_norm(x),
            mask=padding_mask,
            training=training,
            **_routing_args(routing_key),
        )
        return x + self.feedforward_dropout(y, training=training)

    def route(self, inputs, padding_mask=None, routing_key=None):
        """Which experts the MoE layer sends each position to (inference).

        Runs the attention half of the block in inference mode and returns
        `MoELayer.route()` of what the MoE layer receives.

        Args:
            inputs: the block's inputs, `(batch, seq, width)`.
            padding_mask: optional bool `(batch, seq)` as in `call`.
            routing_key: optional int `(batch, seq)` as in `call`.

        Returns:
            The dict of `MoELayer.route()` with `(batch, seq, k)` tensors:
            `"expert_indices"`, `"expert_weights"` and `"kept"` (False for
            padded positions and pairs dropped for capacity).
        """
        inputs = ops.convert_to_tensor(inputs, self.compute_dtype)
        padding_mask = _padding_mask(padding_mask, None)
        x = self._attend(inputs, padding_mask, training=False)
        return self.moe.route(
            self.feedforward_layer_norm(x),
            mask=padding_mask,
            **_routing_args(routing_key),
        )

    def compute_mask(self, inputs, mask=None):
        return mask

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "intermediate_dim": self.intermediate_dim,
                "num_experts": self.num_experts,
                "top_k": self.top_k,
                "routing": routers.serialize(self.routing),
                "dropout": self.dropout,
                "activation": activations.serialize(self.activation),
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "bias_initializer": keras.initializers.serialize(
                    self.bias_initializer
                ),
                "moe_kwargs": dict(self.moe_kwargs),
            }
        )
        quantized = quantization.quantized_sublayers(self)
        if quantized:
            config["quantized_sublayers"] = quantized
        return config


# MoELayer arguments that the block sets itself, and the block's name for
# them (None: fixed by the block, e.g. the output width is the input width).
_OWN_ARGUMENTS = {
    "num_experts": "num_experts",
    "hidden_dim": "intermediate_dim",
    "top_k": "top_k",
    "routing": "routing",
    "activation": "activation",
    "kernel_initializer": "kernel_initializer",
    "bias_initializer": "bias_initializer",
    "output_dim": None,
    "name": None,
    "dtype": None,
}


def _validate_moe_kwargs(moe_kwargs):
    accepted = set(inspect.signature(MoELayer.__init__).parameters)
    accepted |= set(RENAMED_ARGUMENTS)
    accepted -= {"self", "kwargs", *_OWN_ARGUMENTS}
    for key in moe_kwargs:
        if key in _OWN_ARGUMENTS:
            own = _OWN_ARGUMENTS[key]
            what = (
                f"pass it as the block's `{own}`"
                if own
                else "the block sets it"
            )
            raise ValueError(
                f"`moe_kwargs` cannot hold `{key}`: {what}. "
                f"Received: moe_kwargs={moe_kwargs}"
            )
        if key not in accepted:
            raise ValueError(
                f"`moe_kwargs` takes `MoELayer` arguments "
                f"({', '.join(sorted(accepted))}); `{key}` is not one. "
                f"Received: moe_kwargs={moe_kwargs}"
            )


def _routing_args(routing_key):
    # Only hash routing takes a key; the MoE layer rejects one otherwise.
    return {} if routing_key is None else {"routing_key": routing_key}


def _padding_mask(padding_mask, keras_mask):
    # bool (batch, seq) or None; the explicit padding mask wins.
    mask = padding_mask if padding_mask is not None else keras_mask
    return None if mask is None else ops.cast(mask, "bool")
