"""Qwen-MoE, OLMoE and Jamba: softmax top-k, optionally renormalised, and
an optional shared expert with a sigmoid gate."""

from moe import validation
from moe.convert.config import (
    count,
    non_negative,
    read,
    top_k_arguments,
)
from moe.convert.family import Family


def softmax_top_k(hidden_dim_key, aux_default, normalize_default=False):
    """Qwen-MoE, OLMoE, Jamba: softmax, top-k renormalised if
    `norm_topk_prob` (Qwen3.5-MoE has no such key: always), a shared expert
    with a sigmoid gate if `shared_expert_intermediate_size`."""

    def arguments(config):
        model_type = config["model_type"]
        normalize = read(
            config,
            model_type,
            "norm_topk_prob",
            default=normalize_default,
            check=validation.boolean,
        )
        aux = read(
            config,
            model_type,
            "router_aux_loss_coef",
            default=aux_default,
            check=non_negative,
        )
        result = top_k_arguments(config, hidden_dim_key, normalize, aux)
        shared = read(
            config,
            model_type,
            "shared_expert_intermediate_size",
            default=0,
            check=count,
        )
        if shared:
            result.update(
                num_shared_experts=1,
                shared_expert_hidden_dim=shared,
                shared_expert_gate=True,
            )
        return result

    return arguments


_QWEN_MOE = Family(
    softmax_top_k("moe_intermediate_size", 0.001),
    shared_experts="shared_expert",
    shared_expert_gate="shared_expert_gate",
)
_OLMOE = Family(softmax_top_k("intermediate_size", 0.01))

FAMILIES = {
    "qwen2_moe": _QWEN_MOE,
    "qwen3_next": _QWEN_MOE,
    # Qwen3.5-MoE's text model (`config["text_config"]` of a `qwen3_5_moe`
    # checkpoint): Qwen3-Next's block, always renormalised.
    "qwen3_5_moe_text": Family(
        softmax_top_k("moe_intermediate_size", 0.001, normalize_default=True),
        shared_experts="shared_expert",
        shared_expert_gate="shared_expert_gate",
    ),
    "qwen3_moe": Family(softmax_top_k("moe_intermediate_size", 0.001)),
    "olmoe": _OLMOE,
    "flex_olmo": _OLMOE,
    "jamba": Family(
        softmax_top_k("intermediate_size", 0.001), router="router.weight"
    ),
}
