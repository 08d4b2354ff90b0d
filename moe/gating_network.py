import keras
from keras import ops

from moe import quantization, routing, validation


@keras.saving.register_keras_serializable(package="moe")
class GatingNetwork(keras.layers.Layer):
    """Router of a Mixture of Experts: inputs -> which experts, what weights.

    A linear map gives one logit per expert, `logits = x @ W_g` (`+ b_g`
    with `use_bias=True`, as GPT-OSS's and some Switch routers); a softmax
    turns them into router probabilities. With `top_k=None` every expert is
    chosen, weighted by its probability (soft gating, the classic dense
    formulation). With `top_k=k` each input keeps its `k` most probable
    experts, with weights renormalised to sum to 1 (or the raw probabilities
    with `normalize_top_k=False`, as Switch routing does), by
    `moe.routing.top_k_selection`, the selection of the routers. The routers
    of `moe.routers` build theirs with `top_k=None` and choose the experts
    themselves (with their options: score function, selection bias,
    groups); `top_k` is for a `GatingNetwork` used on its own.

    Noisy top-k gating (Shazeer et al., 2017) adds learned, input-dependent
    Gaussian noise to the logits during training,
    `logits += N(0, 1) * softplus(x @ W_noise)`, which spreads the load while
    the router is young. Jitter (Switch Transformer) multiplies the inputs by
    `U(1 - eps, 1 + eps)` during training. Neither is applied at inference.

    The router always computes in float32, also under a mixed-precision
    policy: a softmax and a top-k over float16 logits flip routing decisions.

    Args:
        num_experts: int, number of experts to route between.
        top_k: int or `None`. Experts kept per input; `None` keeps all of
            them (soft gating). Defaults to `None`.
        normalize_top_k: bool. Renormalise the kept probabilities to sum to
            1. Defaults to `True`.
        noisy: bool. Noisy top-k gating during training. Defaults to `False`.
        jitter_noise: float in `[0, 1)`. Multiplicative input jitter during
            training. Defaults to `0.0`.
        kernel_initializer: initializer of `W_g` (and `W_noise`). Defaults to
            `"glorot_uniform"`.
        use_bias: bool, add a learned bias `router_bias` `(num_experts,)`
            (zeros at first) to the logits. Defaults to `False`.
        seed: int or `None`, seed of the noise and jitter.
        **kwargs: base layer arguments (`name`, ...). `dtype` defaults to
            `"float32"` whatever the global policy.

    Call arguments:
        inputs: float tensor `(..., d)`.
        training: bool, whether noise and jitter apply.

    Returns:
        A dict of float32/int32 tensors, `k = top_k` (or `num_experts` for
        soft gating):
        - `"router_logits"`: `(..., num_experts)` float32, noise included.
        - `"router_probs"`: `(..., num_experts)` float32, softmax of logits.
        - `"expert_indices"`: `(..., k)` int32, chosen experts, most probable
          first (for soft gating: `0 .. num_experts - 1`).
        - `"expert_weights"`: `(..., k)` float32, combine weights.

    Example:

    >>> router = GatingNetwork(num_experts=4, top_k=2)
    >>> decision = router(keras.ops.ones((3, 8)))
    >>> tuple(decision["expert_indices"].shape)
    (3, 2)
    >>> tuple(decision["router_probs"].shape)
    (3, 4)

    References:
        - Shazeer et al., 2017, "Outrageously Large Neural Networks: The
          Sparsely-Gated Mixture-of-Experts Layer".
        - Fedus et al., 2021, "Switch Transformers".
    """

    def __init__(
        self,
        num_experts,
        top_k=None,
        normalize_top_k=True,
        noisy=False,
        jitter_noise=0.0,
        kernel_initializer="glorot_uniform",
        seed=None,
        use_bias=False,
        **kwargs,
    ):
        validation.integer("num_experts", num_experts)
        validation.top_k(top_k, num_experts)
        validation.boolean("normalize_top_k", normalize_top_k)
        validation.boolean("noisy", noisy)
        validation.number("jitter_noise", jitter_noise, 0, 1, max_open=True)
        validation.boolean("use_bias", use_bias)
        if seed is not None:
            validation.integer("seed", seed, minimum=0)
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.top_k = top_k
        self.normalize_top_k = normalize_top_k
        self.noisy = noisy
        self.jitter_noise = jitter_noise
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.seed = seed
        self.use_bias = use_bias
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        input_dim = input_shape[-1]
        if input_dim is None:
            raise ValueError(
                "The last dimension of the inputs of `GatingNetwork` must be "
                f"defined. Received: input_shape={input_shape}"
            )
        self.router_kernel = self.add_weight(
            name="router_kernel",
            shape=(input_dim, self.num_experts),
            initializer=self.kernel_initializer,
        )
        if self.use_bias:
            self.router_bias = self.add_weight(
                name="router_bias",
                shape=(self.num_experts,),
                initializer="zeros",
            )
        if self.noisy:
            self.noise_kernel = self.add_weight(
                name="noise_kernel",
                shape=(input_dim, self.num_experts),
                initializer=self.kernel_initializer,
            )

    def call(self, inputs, training=None):
        x = ops.cast(inputs, "float32")
        if training and self.jitter_noise > 0:
            x = x * keras.random.uniform(
                ops.shape(x),
                minval=1.0 - self.jitter_noise,
                maxval=1.0 + self.jitter_noise,
                seed=self.seed_generator,
            )
        logits = ops.matmul(x, self.router_kernel)  # (..., num_experts)
        if self.use_bias:
            logits = logits + self.router_bias
        if training and self.noisy:
            noise_scale = ops.softplus(ops.matmul(x, self.noise_kernel))
            logits = logits + noise_scale * keras.random.normal(
                ops.shape(logits), seed=self.seed_generator
            )
        probs = ops.softmax(logits, axis=-1)
        if self.top_k is None:
            flat = ops.reshape(probs, (-1, self.num_experts))
            indices, weights = routing.soft_routing(flat)
            indices = ops.reshape(indices, ops.shape(probs))
            weights = probs
        else:
            # The routers' own selection (`moe.routers.TopKRouter`).
            indices, weights = routing.top_k_selection(
                probs, self.top_k, normalize=self.normalize_top_k
            )
        return {
            "router_logits": logits,
            "router_probs": probs,
            "expert_indices": indices,
            "expert_weights": weights,
        }

    def compute_output_spec(self, inputs, training=None):
        batch_shape = tuple(inputs.shape[:-1])
        k = self.num_experts if self.top_k is None else self.top_k
        return {
            "router_logits": keras.KerasTensor(
                batch_shape + (self.num_experts,), "float32"
            ),
            "router_probs": keras.KerasTensor(
                batch_shape + (self.num_experts,), "float32"
            ),
            "expert_indices": keras.KerasTensor(batch_shape + (k,), "int32"),
            "expert_weights": keras.KerasTensor(batch_shape + (k,), "float32"),
        }

    def quantize(self, mode=None, type_check=True, config=None):
        """Routers stay float32 (`moe.quantization`): checks `mode`, does
        nothing else."""
        quantization.keep_float(self, mode)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "top_k": self.top_k,
                "normalize_top_k": self.normalize_top_k,
                "noisy": self.noisy,
                "jitter_noise": self.jitter_noise,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "seed": self.seed,
                "use_bias": self.use_bias,
            }
        )
        return config
