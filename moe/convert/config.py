"""Reading Hugging Face configs: the helpers every family shares."""

from moe import validation

# Hugging Face's `hidden_act` names -> Keras activations computing the same.
ACTIVATIONS = {"silu": "silu", "swish": "silu", "relu": "relu", "gelu": "gelu"}
REQUIRED = object()


def read(config, model_type, *keys, default=REQUIRED, check=None):
    # The first of `keys` in `config`: transformers renamed some keys
    # (Qwen3-MoE's config.json `num_experts` is `num_local_experts` in its
    # `to_dict()`). `default` is the Hugging Face config class's default.
    # `check(name, value)` (a `moe.validation` function) checks a value the
    # config gives, so that an error names the config's field, not the
    # layer argument it becomes.
    for key in keys:
        if config.get(key) is not None:
            if check is not None:
                check(f"config['{key}']", config[key])
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
    num_experts = read(
        config,
        model_type,
        "num_local_experts",
        "num_experts",
        "n_routed_experts",
        check=validation.integer,
    )

    def check_top_k(name, value):
        validation.integer(
            name,
            value,
            maximum=num_experts,
            what=f"between 1 and the number of experts ({num_experts})",
        )

    top_k = read(config, model_type, "num_experts_per_tok", check=check_top_k)
    return {
        "num_experts": num_experts,
        "hidden_dim": read(
            config, model_type, hidden_dim_key, check=validation.integer
        ),
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


def count(name, value):
    """An integer >= 0 (how many shared experts, their width; 0 is none)."""
    validation.integer(name, value, minimum=0)


def non_negative(name, value):
    """A finite number >= 0 (loss coefficients)."""
    validation.number(name, value, minimum=0)


def positive(name, value):
    """A finite number > 0 (scaling factors)."""
    validation.number(name, value, minimum=0, min_open=True)
