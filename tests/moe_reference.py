"""Slow, obviously-correct NumPy references for the MoE layers.

Everything is a plain loop over inputs and experts, written from the papers'
definitions, sharing no code with `moe/`.
"""

import math

import numpy as np
from keras import ops


def layer_params(layer):
    """The layer's weights as NumPy arrays, by name."""
    names = ["router_kernel"]
    values = [layer.gating_network.router_kernel]
    for name in (
        "expert_in_kernel",
        "expert_in_bias",
        "expert_gate_kernel",
        "expert_gate_bias",
        "expert_out_kernel",
        "expert_out_bias",
    ):
        if hasattr(layer, name):
            names.append(name)
            values.append(getattr(layer, name))
    return {n: ops.convert_to_numpy(v) for n, v in zip(names, values)}


def _activation(name):
    return {
        "relu": lambda v: np.maximum(v, 0.0),
        "linear": lambda v: v,
        "silu": lambda v: v / (1.0 + np.exp(-v)),
    }[name]


def expert_output(params, e, x, activation="relu", gated=False):
    """Expert `e` applied to one input vector `x`."""
    act = _activation(activation)
    h = x @ params["expert_in_kernel"][e]
    if "expert_in_bias" in params:
        h = h + params["expert_in_bias"][e]
    if gated:
        g = x @ params["expert_gate_kernel"][e]
        if "expert_gate_bias" in params:
            g = g + params["expert_gate_bias"][e]
        h = act(g) * h
    else:
        h = act(h)
    y = h @ params["expert_out_kernel"][e]
    if "expert_out_bias" in params:
        y = y + params["expert_out_bias"][e]
    return y


def softmax(logits):
    z = logits - logits.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)


def route(params, tokens, routing, k):
    """Per-token choices: list of [(expert, weight), ...], best first."""
    probs = softmax(tokens.astype(np.float64) @ params["router_kernel"])
    num_experts = probs.shape[-1]
    choices = []
    for p in probs:
        if routing == "soft":
            choices.append([(e, p[e]) for e in range(num_experts)])
            continue
        order = np.argsort(-p, kind="stable")[:k]
        weights = p[order]
        if routing == "top_k":
            weights = weights / weights.sum()
        choices.append(list(zip(order.tolist(), weights.tolist())))
    return choices, probs


def moe_forward(
    params,
    inputs,
    routing="top_k",
    k=2,
    capacity_factor=None,
    mask=None,
    activation="relu",
    gated=False,
):
    """Reference MoE layer output and per-pair kept flags.

    Capacity rule: pairs are served first choices first, then second
    choices; within a choice level, in input order; an expert takes at most
    `ceil(capacity_factor * tokens * k / experts)` pairs (clipped to
    [1, tokens]).
    """
    d = inputs.shape[-1]
    tokens = inputs.reshape(-1, d)
    token_mask = (
        np.ones(len(tokens), bool) if mask is None else mask.reshape(-1)
    )
    num_experts = params["router_kernel"].shape[-1]
    choices, _ = route(params, tokens, routing, k)
    num_tokens = len(tokens)
    kept = np.zeros((num_tokens, len(choices[0])), bool)
    if capacity_factor is None or routing == "soft":
        kept[token_mask] = True
    else:
        capacity = math.ceil(capacity_factor * num_tokens * k / num_experts)
        capacity = max(1, min(num_tokens, capacity))
        used = [0] * num_experts
        for slot in range(k):
            for t in range(num_tokens):
                if not token_mask[t]:
                    continue
                e = choices[t][slot][0]
                if used[e] < capacity:
                    used[e] += 1
                    kept[t, slot] = True
    out_dim = params["expert_out_kernel"].shape[-1]
    outputs = np.zeros((num_tokens, out_dim))
    for t in range(num_tokens):
        for slot, (e, w) in enumerate(choices[t]):
            if kept[t, slot]:
                y = expert_output(params, e, tokens[t], activation, gated)
                outputs[t] += w * y
    return outputs.reshape(inputs.shape[:-1] + (out_dim,)), kept
