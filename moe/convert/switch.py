"""Switch Transformers: top-1, the router's probability as the weight,
ReLU feed-forward experts."""

from moe import validation
from moe.convert.config import activation, non_negative, read
from moe.convert.family import ExpertNames, Family


def arguments(config):
    # Top-1 with the router's probability as the weight; ReLU FFN experts.
    # Hugging Face drops the tokens beyond `expert_capacity` per sequence;
    # the converted layer keeps them all (see docs/convert.md).
    model_type = "switch_transformers"
    return {
        "num_experts": read(
            config, model_type, "num_experts", check=validation.integer
        ),
        "hidden_dim": read(
            config, model_type, "d_ff", check=validation.integer
        ),
        "routing": "switch",
        "router_use_bias": bool(
            read(config, model_type, "router_bias", default=False)
        ),
        "capacity_factor": None,
        "activation": activation(config, model_type, "dense_act_fn"),
        "gated": False,
        "use_bias": False,
        "aux_loss_weight": read(
            config,
            model_type,
            "router_aux_loss_coef",
            default=0.001,
            check=non_negative,
        ),
        "z_loss_weight": read(
            config,
            model_type,
            "router_z_loss_coef",
            default=0.001,
            check=non_negative,
        ),
        "router_jitter": read(
            config,
            model_type,
            "router_jitter_noise",
            default=0.01,
            check=_jitter,
        ),
    }


def _jitter(name, value):
    validation.number(name, value, minimum=0, maximum=1, max_open=True)


FAMILIES = {
    "switch_transformers": Family(
        arguments,
        router="router.classifier.weight",
        router_bias="router.classifier.bias",
        experts=ExpertNames(
            (None, "experts.expert_{e}.wi", "experts.expert_{e}.wo"),
            fused=False,
        ),
    ),
}
