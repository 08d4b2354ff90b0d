"""Reading Hugging Face configs: the helpers every family shares."""

# Hugging Face's `hidden_act` names -> Keras activations computing the same.
ACTIVATIONS = {"silu": "silu", "swish": "silu", "relu": "relu", "gelu": "gelu"}
REQUIRED = object()


def read(config, model_type, *keys, default=REQUIRED):
    # The first of `keys` in `config`: transformers renamed some keys
    # (Qwen3-MoE's config.json `num_experts` is `num_local_experts` in its
    # `to_dict()`). `default` is the Hugging Face config class's default.
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if default is REQUIRED:
        raise ValueError(
            f"A {model_type} config needs `{keys[0]}`. "
            f"Received: a config with keys {sorted(config)}"
        )
    return default


def activation(config, model_type, key="hidden_act"):
    name = read(config, model_type, key, default="silu")
    if name not in ACTIVATIONS:
        raise ValueError(
            f"`{key}` must be one of {', '.join(map(repr, ACTIVATIONS))} to "
            f"convert a {model_type} block. Received: {key}={name!r}"
        )
    return ACTIVATIONS[name]


def top_k_arguments(config, hidden_dim_key, normalize, aux_loss_coef=0.0):
    """The arguments shared by the top-k SwiGLU blocks."""
    model_type = config["model_type"]
    top_k = read(config, model_type, "num_experts_per_tok")
    return {
        "num_experts": read(
            config,
            model_type,
            "num_local_experts",
            "num_experts",
            "n_routed_experts",
        ),
        "hidden_dim": read(config, model_type, hidden_dim_key),
        "top_k": top_k,
        "routing": "top_k",
        "normalize_top_k": normalize,
        "activation": activation(config, model_type),
        "gated": True,
        "use_bias": False,
        # Hugging Face's top-k loss counts k choices per token, ours 1.
        "aux_loss_weight": aux_loss_coef * top_k,
        "z_loss_weight": 0.0,
    }
