"""GPT-OSS: a router with a bias, softmax over the top-k logits, clamped
SwiGLU experts with biases."""

from moe.convert.config import read, top_k_arguments
from moe.convert.family import ExpertNames, Family

# GPT-OSS's gate activation `x * sigmoid(alpha * x)`, `moe.activations`'s
# "quick_gelu".
_ALPHA = 1.702


def arguments(config):
    # A softmax over the k largest logits is the renormalised top-k of the
    # softmax over all of them. Each expert computes
    # `(clip(up, -l, l) + 1) * quick_gelu(min(gate, l))`, biases included.
    model_type = config["model_type"]
    alpha = read(config, model_type, "swiglu_alpha", default=_ALPHA)
    if abs(alpha - _ALPHA) > 1e-9:
        raise ValueError(
            "`MoELayer`'s GPT-OSS experts use `swiglu_alpha=1.702` "
            f"(`activation='quick_gelu'`). Received: swiglu_alpha={alpha}"
        )
    aux = read(config, model_type, "router_aux_loss_coef", default=0.001)
    result = top_k_arguments(config, "intermediate_size", True, aux)
    result.update(
        activation="quick_gelu",
        use_bias=True,
        glu_limit=float(read(config, model_type, "swiglu_limit", default=7.0)),
        glu_linear_offset=1.0,
        router_use_bias=True,
    )
    return result


FAMILIES = {
    "gpt_oss": Family(
        arguments,
        router="router.weight",
        router_bias="router.bias",
        # transformers' `GptOssExperts`: `gate_up_proj` `(E, d, 2h)`, gate
        # and up interleaved; `down_proj` `(E, h, d)`; biases beside.
        experts=ExpertNames(None, in_out=True, interleaved=True, biases=True),
    ),
}
