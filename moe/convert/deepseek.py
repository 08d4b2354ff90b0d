"""DeepSeek-V2/V3, GLM-4-MoE and dots1: scaled routed weights,
group-limited selection, a shared MLP."""

from moe import validation
from moe.convert.config import count, positive, read, top_k_arguments
from moe.convert.family import Family


def _deepseek(config, group_score, score_function, normalize):
    """DeepSeek-V2/V3 and their kin: scaled routed weights, group-limited
    selection, one shared MLP as wide as `n_shared_experts` experts."""
    model_type = config["model_type"]
    result = top_k_arguments(config, "moe_intermediate_size", normalize)
    result.update(
        score_function=score_function,
        routed_scaling_factor=float(
            read(
                config,
                model_type,
                "routed_scaling_factor",
                default=1.0,
                check=positive,
            )
        ),
    )
    num_groups = read(
        config, model_type, "n_group", default=1, check=validation.integer
    )
    if group_score and num_groups > 1:
        result.update(
            num_groups=num_groups,
            groups_per_token=read(
                config, model_type, "topk_group", check=validation.integer
            ),
            group_score=group_score,
        )
    shared = read(
        config, model_type, "n_shared_experts", default=0, check=count
    )
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
        normalize = read(
            config,
            config["model_type"],
            "norm_topk_prob",
            default=normalize_default,
            check=validation.boolean,
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


_V3 = dict(
    selection_bias="gate.e_score_correction_bias",
    shared_experts="shared_experts",
)

FAMILIES = {
    "deepseek_v2": Family(_deepseek_v2, shared_experts="shared_experts"),
    # The Hugging Face config classes' `norm_topk_prob` defaults differ.
    "deepseek_v3": Family(_deepseek_v3(True), **_V3),
    "glm4_moe": Family(_deepseek_v3(True), **_V3),
    "dots1": Family(_deepseek_v3(False), **_V3),
}
