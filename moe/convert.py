"""The MoE blocks of open models, as `MoELayer`s holding their weights.

`from_transformers(config, weights)` reads a Hugging Face config (a plain
dict, as in `config.json`) and the state dict of one MoE block (NumPy arrays,
names relative to the block, as in a safetensors file) and returns a built
`MoELayer` that computes what the Hugging Face block computes. NumPy in,
Keras out: neither torch nor transformers is imported.

Each supported `model_type` is one entry of `_FAMILIES`: a function from the
config to `MoELayer` arguments, and the names of the block's weights. The
experts are read in either layout checkpoints hold: fused and stacked
(`experts.gate_up_proj` `(E, 2h, d)`, `experts.down_proj` `(E, d, h)`, the
layout of transformers 5) or one matrix per expert (`experts.0.w1.weight`,
`experts.0.gate_proj.weight`, ..., transformers 4 and most checkpoints).
Hugging Face stores linear weights `(out, in)`; Keras kernels are `(in, out)`.
"""

import dataclasses
from collections.abc import Callable

import numpy as np

from moe.moe_layer import MoELayer

# Hugging Face's `hidden_act` names -> Keras activations computing the same.
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "relu": "relu", "gelu": "gelu"}
_REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class _Experts:
    """Where a block keeps its routed experts.

    `per_expert` are the names of expert `e`'s `(gate, up, down)` linear
    weights in the one-matrix-per-expert layout (`gate` is `None` for
    experts without a gate projection); `fused` says whether the block also
    comes as transformers 5's `experts.gate_up_proj` / `experts.down_proj`.
    """

    per_expert: tuple
    fused: bool = True


@dataclasses.dataclass(frozen=True)
class _Family:
    """One model family: how its config and weights map onto `MoELayer`.

    `arguments(config)` gives the `MoELayer` arguments; the other fields name
    the block's weights: the router's `(E, d)` matrix, the selection bias
    `(E,)`, the experts, the always-on shared MLP (the prefix of its
    `gate_proj` / `up_proj` / `down_proj`) and its sigmoid gate `(1, d)`.
    """

    arguments: Callable[[dict], dict]
    router: str = "gate.weight"
    experts: _Experts = _Experts(
        (
            "experts.{e}.gate_proj",
            "experts.{e}.up_proj",
            "experts.{e}.down_proj",
        )
    )
    selection_bias: str | None = None
    shared_experts: str | None = None
    shared_expert_gate: str | None = None


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
            equivalent here, a missing or unknown weight, or a weight whose
            shape does not fit the config.

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
    if model_type not in _FAMILIES:
        raise ValueError(
            "`from_transformers` converts the MoE blocks of "
            f"{', '.join(map(repr, sorted(_FAMILIES)))}. "
            f"Received: config['model_type']={model_type!r}"
        )
    family = _FAMILIES[model_type]
    arguments = {**family.arguments(config), **layer_arguments}
    model_dim = _read(config, model_type, "hidden_size", "d_model")
    reader = _WeightReader(
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
    values = _layer_values(family, reader)
    reader.check_all_read()
    layer = MoELayer(**arguments)
    layer.build((None, model_dim))
    _assign(layer, values)
    return layer


def _layer_values(family, reader):
    """The layer's variable values, by variable name, from the block's."""
    values = {"router_kernel": reader.read(family.router, "Ed").T}
    if family.selection_bias:
        values["selection_bias"] = reader.read(family.selection_bias, "E")
    values.update(_expert_values(family.experts, reader))
    if family.shared_experts:
        prefix = family.shared_experts
        # One shared MLP: a stack of one expert.
        for part, variable in (
            ("gate_proj", "shared_expert_gate_kernel"),
            ("up_proj", "shared_expert_in_kernel"),
        ):
            kernel = reader.read(f"{prefix}.{part}.weight", "sd").T
            values[variable] = kernel[None]
        down = reader.read(f"{prefix}.down_proj.weight", "ds").T
        values["shared_expert_out_kernel"] = down[None]
    if family.shared_expert_gate:
        gate = reader.read(f"{family.shared_expert_gate}.weight", "1d")
        values["shared_gate_kernel"] = gate.T  # (d, 1)
    return values


def _expert_values(experts, reader):
    # Stacked `(E, in, out)` kernels from either layout.
    if experts.fused and reader.has("experts.gate_up_proj"):
        gate_up = reader.read("experts.gate_up_proj", "E2d")  # (E, 2h, d)
        gate, up = np.split(gate_up, 2, axis=1)
        down = reader.read("experts.down_proj", "Edh")
    else:
        gate_name, up_name, down_name = experts.per_expert
        up = reader.stack(up_name, "hd")
        down = reader.stack(down_name, "dh")
        gate = None if gate_name is None else reader.stack(gate_name, "hd")
    values = {
        "expert_in_kernel": np.swapaxes(up, 1, 2),
        "expert_out_kernel": np.swapaxes(down, 1, 2),
    }
    if gate is not None:
        values["expert_gate_kernel"] = np.swapaxes(gate, 1, 2)
    return values


def _assign(layer, values):
    variables = {}
    for variable in layer.weights:
        if variable.name in variables:
            raise RuntimeError(  # a layer change conversion must follow
                f"`MoELayer` has two variables named {variable.name!r}"
            )
        variables[variable.name] = variable
    unfilled = sorted(set(variables) - set(values))
    unknown = sorted(set(values) - set(variables))
    if unfilled or unknown:
        raise ValueError(
            "The converted layer does not fit the block: the layer arguments "
            f"leave {unfilled} without a weight and have no variable for "
            f"{unknown}. Received: layer variables {sorted(variables)}"
        )
    for name, value in values.items():
        variable = variables[name]
        if tuple(variable.shape) != value.shape:
            raise ValueError(
                f"The layer variable {name!r} has shape "
                f"{tuple(variable.shape)}, the block's weights give "
                f"{value.shape}: check the layer arguments you passed. "
                f"Received: {name} of shape {value.shape}"
            )
        variable.assign(value)


class _WeightReader:
    """Reads the block's weights by name, checking each shape, and finally
    that every weight was read: a weight nobody reads would be silently
    missing from the layer.

    Shapes are strings of dimension letters: `E` experts, `d` model width,
    `h` expert width, `s` shared-experts width, `2` twice the expert width
    (fused gate and up), `1` one.
    """

    def __init__(self, weights, model_type, dims):
        self.weights = weights
        self.model_type = model_type
        self.dims = {**dims, "2": 2 * dims["h"], "1": 1}
        self.read_names = set()

    def has(self, name):
        return name in self.weights

    def read(self, name, shape):
        if name not in self.weights:
            raise ValueError(
                f"The {self.model_type} block needs the weight {name!r}. "
                "Pass the block's state dict with names relative to the block "
                f"(e.g. 'gate.weight'). Received: {_names(self.weights)}"
            )
        # float32 whatever the checkpoint's dtype: the router computes in
        # float32, and assigning casts the rest to the layer's dtype.
        value = np.asarray(self.weights[name], dtype="float32")
        expected = tuple(self.dims[letter] for letter in shape)
        if value.shape != expected:
            raise ValueError(
                f"The weight {name!r} of a {self.model_type} block with this "
                f"config ({self._dims_text()}) has shape {expected}. "
                f"Received: {name} of shape {value.shape}"
            )
        self.read_names.add(name)
        return value

    def stack(self, pattern, shape):
        # Per-expert `<pattern>.weight` for e = 0 .. E - 1 -> (E, ...).
        return np.stack(
            [
                self.read(f"{pattern.format(e=e)}.weight", shape)
                for e in range(self.dims["E"])
            ]
        )

    def check_all_read(self):
        unknown = sorted(set(self.weights) - self.read_names)
        if unknown:
            raise ValueError(
                f"A {self.model_type} block with this config "
                f"({self._dims_text()}) has no weight named "
                f"{', '.join(map(repr, unknown))}: pass the weights of one MoE "
                "block, with names relative to the block. Received: "
                f"{_names(self.weights)}"
            )

    def _dims_text(self):
        names = {"E": "experts", "d": "width", "h": "expert width"}
        return ", ".join(f"{names[k]} {self.dims[k]}" for k in names)


def _names(weights):
    names = sorted(weights)
    shown = ", ".join(map(repr, names[:8]))
    return f"weights {shown}" + (
        f" and {len(names) - 8} more" if names[8:] else ""
    )


# --- Configs -> MoELayer arguments -------------------------------------------


def _read(config, model_type, *keys, default=_REQUIRED):
    # The first of `keys` in `config`: transformers renamed some keys
    # (Qwen3-MoE's config.json `num_experts` is `num_local_experts` in its
    # `to_dict()`). `default` is the Hugging Face config class's default.
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if default is _REQUIRED:
        raise ValueError(
            f"A {model_type} config needs `{keys[0]}`. "
            f"Received: a config with keys {sorted(config)}"
        )
    return default


def _activation(config, model_type, key="hidden_act"):
    name = _read(config, model_type, key, default="silu")
    if name not in _ACTIVATIONS:
        raise ValueError(
            f"`{key}` must be one of {', '.join(map(repr, _ACTIVATIONS))} to "
            f"convert a {model_type} block. Received: {key}={name!r}"
        )
    return _ACTIVATIONS[name]


def _top_k_arguments(config, hidden_dim_key, normalize, aux_loss_coef=0.0):
    """The arguments shared by the top-k SwiGLU blocks."""
    model_type = config["model_type"]
    top_k = _read(config, model_type, "num_experts_per_tok")
    return {
        "num_experts": _read(
            config,
            model_type,
            "num_local_experts",
            "num_experts",
            "n_routed_experts",
        ),
        "hidden_dim": _read(config, model_type, hidden_dim_key),
        "top_k": top_k,
        "routing": "top_k",
        "normalize_top_k": normalize,
        "activation": _activation(config, model_type),
        "gated": True,
        "use_bias": False,
        # Hugging Face's top-k loss counts k choices per token, ours 1.
        "aux_loss_weight": aux_loss_coef * top_k,
        "z_loss_weight": 0.0,
    }


def _mixtral(config):
    aux = _read(
        config, config["model_type"], "router_aux_loss_coef", default=0.001
    )
    return _top_k_arguments(config, "intermediate_size", True, aux)


def _softmax_top_k(hidden_dim_key, aux_default):
    """Qwen-MoE, OLMoE, Jamba: softmax, top-k renormalised if
    `norm_topk_prob`, a shared expert with a sigmoid gate if
    `shared_expert_intermediate_size`."""

    def arguments(config):
        model_type = config["model_type"]
        normalize = _read(config, model_type, "norm_topk_prob", default=False)
        aux = _read(
            config, model_type, "router_aux_loss_coef", default=aux_default
        )
        result = _top_k_arguments(config, hidden_dim_key, normalize, aux)
        shared = config.get("shared_expert_intermediate_size")
        if shared:
            result.update(
                num_shared_experts=1,
                shared_expert_hidden_dim=shared,
                shared_expert_gate=True,
            )
        return result

    return arguments


def _deepseek(config, group_score, score_function, normalize):
    """DeepSeek-V2/V3 and their kin: scaled routed weights, group-limited
    selection, one shared MLP as wide as `n_shared_experts` experts."""
    model_type = config["model_type"]
    result = _top_k_arguments(config, "moe_intermediate_size", normalize)
    result.update(
        score_function=score_function,
        routed_scaling_factor=float(
            _read(config, model_type, "routed_scaling_factor", default=1.0)
        ),
    )
    num_groups = config.get("n_group")
    if group_score and num_groups and num_groups > 1:
        result.update(
            num_groups=num_groups,
            groups_per_token=_read(config, model_type, "topk_group"),
            group_score=group_score,
        )
    shared = config.get("n_shared_experts")
    if shared:
        result.update(
            num_shared_experts=1,
            shared_expert_hidden_dim=shared * result["hidden_dim"],
        )
    return result


def _deepseek_v3(normalize_default):
    """DeepSeek-V3, GLM-4-MoE, dots1: sigmoid scores, chosen with
    `e_score_correction_bias`, groups scored by their two best experts."""

    def arguments(config):
        normalize = _read(
            config,
            config["model_type"],
            "norm_topk_prob",
            default=normalize_default,
        )
        result = _deepseek(config, "top2_sum", "sigmoid", normalize)
        result["selection_bias"] = True
        return result

    return arguments


def _deepseek_v2(config):
    # Softmax scores; Hugging Face's DeepSeek-V2 never renormalises them
    # (it ignores `norm_topk_prob`); groups scored by their best expert.
    method = config.get("topk_method", "greedy")
    if config.get("mlp_bias"):
        raise ValueError(
            "A deepseek_v2 block with `mlp_bias=True` has biases in its "
            "shared experts only, which `MoELayer` does not express. "
            "Received: mlp_bias=True"
        )
    methods = {"greedy": None, "group_limited_greedy": "max"}
    if method not in methods:
        raise ValueError(
            "`topk_method` must be 'greedy' or 'group_limited_greedy' to "
            f"convert a deepseek_v2 block. Received: topk_method={method!r}"
        )
    return _deepseek(config, methods[method], "softmax", False)


def _switch_transformers(config):
    # Top-1 with the router's probability as the weight; ReLU FFN experts.
    # Hugging Face drops the tokens beyond `expert_capacity` per sequence;
    # the converted layer keeps them all (see docs/convert.md).
    if config.get("router_bias"):
        raise ValueError(
            "`MoELayer`'s router has no bias: a switch_transformers block "
            "needs `router_bias=False`. Received: router_bias=True"
        )
    model_type = "switch_transformers"
    return {
        "num_experts": _read(config, model_type, "num_experts"),
        "hidden_dim": _read(config, model_type, "d_ff"),
        "routing": "switch",
        "capacity_factor": None,
        "activation": _activation(config, model_type, "dense_act_fn"),
        "gated": False,
        "use_bias": False,
        "aux_loss_weight": _read(
            config, model_type, "router_aux_loss_coef", default=0.001
        ),
        "z_loss_weight": _read(
            config, model_type, "router_z_loss_coef", default=0.001
        ),
        "router_jitter": _read(
            config, model_type, "router_jitter_noise", default=0.01
        ),
    }


_MIXTRAL_EXPERTS = _Experts(
    ("experts.{e}.w1", "experts.{e}.w3", "experts.{e}.w2")
)
_DEEPSEEK_V3 = dict(
    selection_bias="gate.e_score_correction_bias",
    shared_experts="shared_experts",
)
_QWEN_MOE = _Family(
    _softmax_top_k("moe_intermediate_size", 0.001),
    shared_experts="shared_expert",
    shared_expert_gate="shared_expert_gate",
)
_OLMOE = _Family(_softmax_top_k("intermediate_size", 0.01))

# model_type -> how its MoE block maps onto `MoELayer`.
_FAMILIES = {
    "mixtral": _Family(_mixtral, experts=_MIXTRAL_EXPERTS),
    "minimax": _Family(_mixtral, experts=_MIXTRAL_EXPERTS),
    "qwen2_moe": _QWEN_MOE,
    "qwen3_next": _QWEN_MOE,
    "qwen3_moe": _Family(_softmax_top_k("moe_intermediate_size", 0.001)),
    "olmoe": _OLMOE,
    "flex_olmo": _OLMOE,
    "jamba": _Family(
        _softmax_top_k("intermediate_size", 0.001), router="router.weight"
    ),
    "deepseek_v2": _Family(_deepseek_v2, shared_experts="shared_experts"),
    # The Hugging Face config classes' `norm_topk_prob` defaults differ.
    "deepseek_v3": _Family(_deepseek_v3(True), **_DEEPSEEK_V3),
    "glm4_moe": _Family(_deepseek_v3(True), **_DEEPSEEK_V3),
    "dots1": _Family(_deepseek_v3(False), **_DEEPSEEK_V3),
    "switch_transformers": _Family(
        _switch_transformers,
        router="router.classifier.weight",
        experts=_Experts(
            (None, "experts.expert_{e}.wi", "experts.expert_{e}.wo"),
            fused=False,
        ),
    ),
}
