"""Mixtral and MiniMax: softmax top-k, renormalised, SwiGLU experts."""

from moe.convert.config import non_negative, read, top_k_arguments
from moe.convert.family import ExpertNames, Family


def arguments(config):
    aux = read(
        config,
        config["model_type"],
        "router_aux_loss_coef",
        default=0.001,
        check=non_negative,
    )
    return top_k_arguments(config, "intermediate_size", True, aux)


_EXPERTS = ExpertNames(("experts.{e}.w1", "experts.{e}.w3", "experts.{e}.w2"))

FAMILIES = {
    "mixtral": Family(arguments, experts=_EXPERTS),
    "minimax": Family(arguments, experts=_EXPERTS),
}
