"""The MoE blocks of open models, as `MoELayer`s holding their weights.

`from_transformers(config, weights)` reads a Hugging Face config (a plain
dict, as in `config.json`) and the state dict of one MoE block (NumPy arrays,
names relative to the block, as in a safetensors file) and returns a built
`MoELayer` that computes what the Hugging Face block computes. NumPy in,
Keras out: neither torch nor transformers is imported.

Each supported `model_type` is one entry of `FAMILIES`, collected from one
module per model family: a function from the config to `MoELayer`
arguments, and the names of the block's weights (`moe.convert.family`). The
experts are read in either layout checkpoints hold: fused and stacked
(`experts.gate_up_proj` `(E, 2h, d)`, `experts.down_proj` `(E, d, h)`, the
layout of transformers 5) or one matrix per expert (`experts.0.w1.weight`,
`experts.0.gate_proj.weight`, ..., transformers 4 and most checkpoints);
GPT-OSS's fused ones are `(E, d, 2h)` and `(E, h, d)`, gate and up
interleaved, with biases. Hugging Face stores linear weights `(out, in)`;
Keras kernels are `(in, out)`.
"""

from moe.convert import deepseek, gpt_oss, mixtral, qwen, switch
from moe.convert.config import read
from moe.convert.weights import WeightReader, assign, layer_values
from moe.moe_layer import MoELayer
from moe.validation import integer

__all__ = ["from_transformers"]

# model_type -> how its MoE block maps onto `MoELayer`.
FAMILIES = {
    **mixtral.FAMILIES,
    **qwen.FAMILIES,
    **deepseek.FAMILIES,
    **switch.FAMILIES,
    **gpt_oss.FAMILIES,
}


def from_transformers(config, weights, **layer_arguments):
    """Converts a Hugging Face MoE block into a built `MoELayer`.

    The layer computes what the block computes (inference; float32 to
    1e-5), and its training losses are the ones Hugging Face adds for that
    block: `aux_loss_weight` is set so that the layer's load-balancing loss
    equals `router_aux_loss_coef` times Hugging Face's (whose top-k form
    counts `k` choices per token: `k` when balanced, where `MoELayer`'s is
    1), the z-loss is only Switch Transformers'. See `docs/convert.md` for
    the supported models and what each maps to.

    Args:
        config: the model's Hugging Face config as a dict (`config.json`,
            or `PretrainedConfig.to_dict()`), with its `model_type`.
        weights: the MoE block's state dict: a mapping from names relative
            to the block, exactly as Hugging Face names them
            (`"gate.weight"`, `"experts.gate_up_proj"`, ...), to NumPy
            arrays, e.g. read with `safetensors.numpy.load_file` and the
            layer's prefix (`"model.layers.3.mlp."`) removed.
        **layer_arguments: further `MoELayer` arguments (`name`, `dtype`,
            `capacity_factor`, `dispatch`, `aux_loss_weight`, ...); they
            override the converted ones.

    Returns:
        A built `MoELayer` holding the block's weights, for inputs
        `(batch, d)` or `(batch, seq, d)`.

    Raises:
        ValueError: for a `model_type` or config value that has no
            equivalent here or is of the wrong kind (a count that is not an
            integer), a missing or unknown weight, a weight whose shape does
            not fit the config, or one that is not finite real floats
            (integer, bool, float8, complex; NaN or infinite).

    Example:

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> config = {"model_type": "mixtral", "hidden_size": 8,
    ...           "intermediate_size": 16, "num_local_experts": 4,
    ...           "num_experts_per_tok": 2, "hidden_act": "silu"}
    >>> weights = {
    ...     "gate.weight": rng.normal(size=(4, 8)),
    ...     "experts.gate_up_proj": rng.normal(size=(4, 32, 8)),
    ...     "experts.down_proj": rng.normal(size=(4, 8, 16)),
    ... }
    >>> layer = from_transformers(config, weights)
    >>> tuple(layer(np.ones((2, 5, 8), "float32")).shape)
    (2, 5, 8)
    """
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            "`from_transformers` converts the MoE blocks of "
            f"{', '.join(map(repr, sorted(FAMILIES)))}. "
            f"Received: config['model_type']={model_type!r}"
        )
    family = FAMILIES[model_type]
    arguments = {**family.arguments(config), **layer_arguments}
    model_dim = read(
        config, model_type, "hidden_size", "d_model", check=integer
    )
    reader = WeightReader(
        weights,
        model_type,
        dims={
            "E": arguments["num_experts"],
            "d": model_dim,
            "h": arguments["hidden_dim"],
            "s": arguments.get("shared_expert_hidden_dim")
            or arguments["hidden_dim"],
        },
    )
    values = layer_values(
        family, reader, arguments.get("router_use_bias", False)
    )
    reader.check_allread()
    layer = MoELayer(**arguments)
    layer.build((None, model_dim))
    assign(layer, values)
    return layer
