"""Tiny, seeded Hugging Face MoE blocks: the references of test_convert.py.

`hf_block(case)` builds the MoE block of one open model with `transformers`
(float32, CPU, every parameter and buffer drawn from a seeded normal
distribution: freshly constructed blocks hold `torch.empty` memory), runs it on
seeded inputs and returns what a user would have: the config as a plain dict
(carrying `model_type`), the block's state dict as NumPy arrays (names
relative to the block, as Hugging Face names them), plus the inputs, the
outputs and the router's decision. `hf_load_balancing_loss` and
`hf_router_z_loss` compute Hugging Face's own training losses for a block.

torch and transformers are imported lazily, so that importing this module
costs nothing when the tests that need them are skipped.
"""

import dataclasses
import importlib

import numpy as np

# Small, but each with more than one group, shared expert or capacity rule.
_ATTENTION = dict(num_attention_heads=2, num_key_value_heads=2)
_MIXTRAL = dict(
    hidden_size=16,
    intermediate_size=12,
    num_local_experts=8,
    num_experts_per_tok=2,
    **_ATTENTION,
)
_QWEN = dict(
    hidden_size=16,
    moe_intermediate_size=8,
    num_experts=8,
    num_experts_per_tok=3,
    **_ATTENTION,
)
_DEEPSEEK = dict(
    hidden_size=16,
    moe_intermediate_size=8,
    n_routed_experts=16,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    n_shared_experts=2,
    **_ATTENTION,
)
_OLMOE = dict(
    hidden_size=16,
    intermediate_size=8,
    num_experts=8,
    num_experts_per_tok=3,
    **_ATTENTION,
)


@dataclasses.dataclass(frozen=True)
class _Case:
    """How to build one tiny block: its modules, config and router."""

    module: str  # transformers.models.<module>.modeling_<module>
    config_class: str
    block_class: str
    config: dict
    router: str  # attribute of the block holding the router
    top_k_router: bool = True  # False: Switch's Top1Router and its outputs


CASES = {
    "mixtral": _Case(
        "mixtral", "MixtralConfig", "MixtralSparseMoeBlock", _MIXTRAL, "gate"
    ),
    "minimax": _Case(
        "minimax", "MiniMaxConfig", "MiniMaxSparseMoeBlock", _MIXTRAL, "gate"
    ),
    "qwen2_moe": _Case(
        "qwen2_moe",
        "Qwen2MoeConfig",
        "Qwen2MoeSparseMoeBlock",
        dict(_QWEN, shared_expert_intermediate_size=24),
        "gate",
    ),
    "qwen3_moe": _Case(
        "qwen3_moe",
        "Qwen3MoeConfig",
        "Qwen3MoeSparseMoeBlock",
        dict(_QWEN, norm_topk_prob=True),
        "gate",
    ),
    "qwen3_next": _Case(
        "qwen3_next",
        "Qwen3NextConfig",
        "Qwen3NextSparseMoeBlock",
        dict(_QWEN, shared_expert_intermediate_size=12, norm_topk_prob=True),
        "gate",
    ),
    "qwen3_5_moe_text": _Case(
        "qwen3_5_moe",
        "Qwen3_5MoeTextConfig",
        "Qwen3_5MoeSparseMoeBlock",
        dict(_QWEN, shared_expert_intermediate_size=12),
        "gate",
    ),
    "olmoe": _Case(
        "olmoe", "OlmoeConfig", "OlmoeSparseMoeBlock", _OLMOE, "gate"
    ),
    "flex_olmo": _Case(
        "flex_olmo",
        "FlexOlmoConfig",
        "FlexOlmoSparseMoeBlock",
        dict(_OLMOE, norm_topk_prob=True),
        "gate",
    ),
    "jamba": _Case(
        "jamba", "JambaConfig", "JambaSparseMoeBlock", _OLMOE, "router"
    ),
    "deepseek_v3": _Case(
        "deepseek_v3",
        "DeepseekV3Config",
        "DeepseekV3MoE",
        dict(_DEEPSEEK, routed_scaling_factor=2.5, norm_topk_prob=True),
        "gate",
    ),
    "glm4_moe": _Case(
        "glm4_moe",
        "Glm4MoeConfig",
        "Glm4MoeMoE",
        dict(_DEEPSEEK, n_shared_experts=1, routed_scaling_factor=1.5),
        "gate",
    ),
    "dots1": _Case(
        "dots1",
        "Dots1Config",
        "Dots1MoE",
        dict(_DEEPSEEK, routed_scaling_factor=0.5, norm_topk_prob=False),
        "gate",
    ),
    "deepseek_v2": _Case(
        "deepseek_v2",
        "DeepseekV2Config",
        "DeepseekV2Moe",
        dict(
            _DEEPSEEK,
            topk_method="group_limited_greedy",
            routed_scaling_factor=1.5,
        ),
        "gate",
    ),
    "deepseek_v2_greedy": _Case(
        "deepseek_v2",
        "DeepseekV2Config",
        "DeepseekV2Moe",
        dict(_DEEPSEEK, topk_method="greedy", n_group=None, topk_group=None),
        "gate",
    ),
    "gpt_oss": _Case(
        "gpt_oss",
        "GptOssConfig",
        "GptOssMLP",
        # A limit the test block's pre-activations cross, so that both
        # clamps act.
        dict(_MIXTRAL, swiglu_limit=1.0),
        "router",
    ),
    "switch_transformers": _Case(
        "switch_transformers",
        "SwitchTransformersConfig",
        "SwitchTransformersSparseMLP",
        # A capacity no expert reaches with 8 tokens per sequence: dropless.
        dict(d_model=16, d_ff=12, num_experts=4, expert_capacity=8, d_kv=8),
        "router",
        top_k_router=False,
    ),
}


@dataclasses.dataclass(frozen=True)
class HFBlock:
    """A Hugging Face MoE block as NumPy data, with one forward pass.

    `expert_indices` are the experts Hugging Face chose per token (for
    Switch, its top-1 before the capacity rule), `kept` whether the token got
    its expert's output (False only where Switch's capacity dropped it).
    """

    config: dict
    weights: dict
    inputs: np.ndarray  # (batch, seq, d)
    outputs: np.ndarray  # (batch, seq, d)
    router_logits: np.ndarray  # (batch * seq, num_experts)
    expert_indices: np.ndarray  # (batch * seq, k)
    kept: np.ndarray  # (batch * seq,)


def hf_block(case, batch=2, seq=8, seed=0, **config_overrides):
    """Builds, initialises and runs the tiny block of `CASES[case]`."""
    import torch

    spec = CASES[case]
    modeling = _modeling(spec.module)
    config_class = getattr(modeling, spec.config_class)
    config = config_class(
        **{**spec.config, **config_overrides}, experts_implementation="eager"
    )
    block = getattr(modeling, spec.block_class)(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in block.state_dict().items():
            # ~N(0, 1) activations and router logits, a spread selection
            # bias; `state_dict()` shares storage with the module.
            scale = 0.1 if name.endswith("bias") else tensor.shape[-1] ** -0.5
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * scale)
    d = config.hidden_size
    inputs = np.random.default_rng(seed).normal(size=(batch, seq, d))
    inputs = inputs.astype("float32")
    # The decision as the experts receive it: routers' return values
    # changed across transformers 5 releases, the experts' arguments did not.
    calls = []
    hooked = block.experts if spec.top_k_router else getattr(block, spec.router)
    hooked.register_forward_hook(
        lambda module, args, kwargs, output: calls.append(
            (*args, *kwargs.values(), output)
        ),
        with_kwargs=True,
    )
    with torch.no_grad():
        outputs = block(torch.from_numpy(inputs))
    if isinstance(outputs, tuple):  # GPT-OSS: (outputs, router scores)
        outputs = outputs[0]
    (call,) = calls
    weights = {k: v.numpy().copy() for k, v in block.state_dict().items()}
    if spec.top_k_router:
        # (hidden_states, top_k_index, top_k_weights, output); the logits
        # are the router's linear map (float32, as Hugging Face's).
        indices = call[1].numpy()
        router = weights[f"{spec.router}.weight"]
        logits = inputs.reshape(batch * seq, d) @ router.T
        logits = logits + weights.get(f"{spec.router}.bias", 0.0)
        kept = np.ones(batch * seq, bool)
    else:  # Switch: (hidden_states, (one-hot within capacity, prob, logits))
        within_capacity, _, logits = call[-1]
        logits = logits.reshape(batch * seq, -1).numpy()
        indices = logits.argmax(-1)[:, None]
        kept = within_capacity.reshape(batch * seq, -1).sum(-1).numpy() > 0
    return HFBlock(
        config=config.to_dict(),
        weights=weights,
        inputs=inputs,
        outputs=outputs.numpy(),
        router_logits=logits,
        expert_indices=indices,
        kept=kept,
    )


def hf_load_balancing_loss(case, block):
    """Hugging Face's auxiliary loss of one block, by its own function.

    Mixtral-style models pass the block's logits to the model file's
    `load_balancing_loss_func` (top-k counts: `k` when balanced); Switch
    passes per-sequence probabilities and top-1 choices to its own one.
    `None` for the models Hugging Face trains without one (DeepSeek-V2/V3,
    GLM-4-MoE, dots1).
    """
    import torch

    modeling = _modeling(CASES[case].module)
    if not hasattr(modeling, "load_balancing_loss_func"):
        return None
    logits = torch.from_numpy(block.router_logits)
    if not CASES[case].top_k_router:
        batch, seq, _ = block.inputs.shape
        probs = torch.softmax(logits, -1).reshape(batch, seq, -1)
        indices = torch.from_numpy(block.expert_indices).reshape(batch, seq)
        return float(modeling.load_balancing_loss_func(probs, indices))
    num_experts = logits.shape[-1]
    top_k = block.expert_indices.shape[-1]
    return float(
        modeling.load_balancing_loss_func((logits,), num_experts, top_k)
    )


def hf_router_z_loss(case, block):
    """Switch's router z-loss of one block, by its own function."""
    import torch

    batch, seq, _ = block.inputs.shape
    logits = torch.from_numpy(block.router_logits).reshape(batch, seq, -1)
    return float(_modeling(CASES[case].module).router_z_loss_func(logits))


def per_expert_weights(case, weights):
    """The block's experts in the per-expert layout of older checkpoints.

    The inverse of transformers' own loading conversion
    (`conversion_mapping.py`: per-expert matrices merged on a new first axis,
    gate and up concatenated on axis 1): Mixtral names them `w1` (gate), `w3`
    (up), `w2` (down), the Qwen family `gate_proj`, `up_proj`, `down_proj`.
    """
    names = ("w1", "w3", "w2") if case in ("mixtral", "minimax") else None
    names = names or ("gate_proj", "up_proj", "down_proj")
    converted = {
        k: v for k, v in weights.items() if not k.startswith("experts.")
    }
    gate_up = weights["experts.gate_up_proj"]
    gate, up = np.split(gate_up, 2, axis=1)
    for e in range(gate_up.shape[0]):
        for name, stacked in zip(
            names, (gate, up, weights["experts.down_proj"])
        ):
            converted[f"experts.{e}.{name}.weight"] = stacked[e]
    return converted


def _modeling(module):
    return importlib.import_module(
        f"transformers.models.{module}.modeling_{module}"
    )
