"""Slow, obviously-correct NumPy references for the MoE layers.

Everything is a plain loop over inputs and experts, written from the papers'
definitions, sharing no code with `moe/`.
"""

import math

import numpy as np
from keras import ops


def layer_params(layer):
    """The layer's weights as NumPy arrays, by name (`router_kernel`,
    `group_router_kernel`, `expert_*`, `shared_expert_*`)."""
    names, values = [], []
    if getattr(layer, "gating_network", None) is not None:
        names.append("router_kernel")
        values.append(layer.gating_network.router_kernel)
        if layer.gating_network.use_bias:
            names.append("router_bias")
            values.append(layer.gating_network.router_bias)
    if hasattr(layer, "group_gating_network"):
        names.append("group_router_kernel")
        values.append(layer.group_gating_network.router_kernel)
    if getattr(layer, "shared_gate_kernel", None) is not None:
        names.append("shared_gate_kernel")
        values.append(layer.shared_gate_kernel)
    if getattr(layer, "selection_bias", None) is not None:
        names.append("selection_bias")
        values.append(layer.selection_bias)
    for prefix in ("expert", "shared_expert"):
        for part in (
            "in_kernel",
            "in_bias",
            "gate_kernel",
            "gate_bias",
            "out_kernel",
            "out_bias",
        ):
            name = f"{prefix}_{part}"
            if hasattr(layer, name):
                names.append(name)
                values.append(getattr(layer, name))
    return {n: ops.convert_to_numpy(v) for n, v in zip(names, values)}


def router_options(layer):
    """The `route()` options of a top-k / switch layer's router."""
    router = layer.router
    groups = None
    if getattr(router, "num_groups", None) and router.__class__.__name__ == (
        "TopKRouter"
    ):
        groups = (router.num_groups, router.groups_per_token or 1)
        groups += (router.group_score,)
    return dict(
        score_function=getattr(router, "score_function", "softmax"),
        normalize=getattr(router, "normalize_top_k", None),
        scaling=getattr(router, "routed_scaling_factor", 1.0),
        groups=groups,
    )


def _activation(name):
    return {
        "relu": lambda v: np.maximum(v, 0.0),
        "linear": lambda v: v,
        "silu": lambda v: v / (1.0 + np.exp(-v)),
        "quick_gelu": lambda v: v / (1.0 + np.exp(-1.702 * v)),
    }[name]


def expert_output(
    params,
    e,
    x,
    activation="relu",
    gated=False,
    prefix="expert",
    glu_limit=None,
    glu_linear_offset=0.0,
):
    """Expert `e` (of the `prefix` stack) applied to one input vector `x`;
    with `glu_limit`, GPT-OSS's clamps: the gate at most the limit, the
    linear half within +-limit, then `glu_linear_offset` added to it."""
    act = _activation(activation)
    h = x @ params[f"{prefix}_in_kernel"][e]
    if f"{prefix}_in_bias" in params:
        h = h + params[f"{prefix}_in_bias"][e]
    if gated:
        g = x @ params[f"{prefix}_gate_kernel"][e]
        if f"{prefix}_gate_bias" in params:
            g = g + params[f"{prefix}_gate_bias"][e]
        if glu_limit is not None:
            g = np.minimum(g, glu_limit)
            h = np.clip(h, -glu_limit, glu_limit)
        h = act(g) * (h + glu_linear_offset)
    else:
        h = act(h)
    y = h @ params[f"{prefix}_out_kernel"][e]
    if f"{prefix}_out_bias" in params:
        y = y + params[f"{prefix}_out_bias"][e]
    return y


def softmax(logits):
    z = logits - logits.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)


def sigmoid(logits):
    return 1.0 / (1.0 + np.exp(-logits))


def top_k_choice(scores, k, normalize, scaling, bias=None, groups=None):
    """One token's top-k: `[(expert, weight), ...]`, best first.

    The experts are ranked by `scores + bias`; with `groups =
    (num_groups, groups_per_token, group_score)` only the experts of the
    token's best groups compete, a group scoring its best expert
    (`"max"`) or its two best together (`"top2_sum"`). The weights are the
    unbiased scores, divided by their sum when `normalize`, times
    `scaling`.
    """
    selection = scores + (0.0 if bias is None else bias)
    candidates = list(range(len(scores)))
    if groups is not None:
        num_groups, per_token, group_score = groups
        size = len(scores) // num_groups
        totals = []
        for g in range(num_groups):
            members = sorted(selection[g * size : (g + 1) * size])[::-1]
            totals.append(
                members[0] if group_score == "max" else sum(members[:2])
            )
        kept = np.argsort(-np.array(totals), kind="stable")[:per_token]
        candidates = [e for e in candidates if e // size in kept]
    candidates.sort(key=lambda e: -selection[e])  # stable: ties by index
    chosen = candidates[:k]
    weights = np.array([scores[e] for e in chosen])
    if normalize:
        weights = weights / weights.sum()
    return list(zip(chosen, (weights * scaling).tolist()))


def hash_expert(key, num_experts):
    """The expert of one integer key, from the formula in `hash_routing`'s
    docstring, in Python integers (which never overflow)."""
    p = 46337
    q, r = divmod(int(key), p)
    h = (28411 * r + 17389 * (q % p) + 9241) % p
    h = (h * h + 31607) % p
    return h % num_experts


def route(
    params,
    tokens,
    routing,
    k,
    routing_keys=None,
    num_groups=None,
    group_k=1,
    score_function="softmax",
    normalize=None,
    scaling=1.0,
    groups=None,
):
    """Per-token choices: list of [(expert, weight), ...], best first.

    `hierarchical`: `group_k` groups by the group router's probability,
    then `k` experts within each by the softmax within the group; weight
    `p(group) * p(expert | group)`, group-major. `hash`: one expert per key,
    weight 1. `top_k` / `switch`: `top_k_choice` on the `score_function`
    scores (softmax or sigmoid), with the layer's `selection_bias` and
    `groups`; `normalize=None` is the routing's default (True for top-k,
    False for switch).
    """
    if routing == "hash":
        return [[(hash_expert(key, k), 1.0)] for key in routing_keys], None
    if routing == "hierarchical":
        x = tokens.astype(np.float64)
        group_probs = softmax(x @ params["group_router_kernel"])
        logits = x @ params["router_kernel"]
        size = logits.shape[-1] // num_groups
        choices = []
        for t in range(len(tokens)):
            pairs = []
            for g in np.argsort(-group_probs[t], kind="stable")[:group_k]:
                within = softmax(logits[t, g * size : (g + 1) * size])
                for m in np.argsort(-within, kind="stable")[:k]:
                    pairs.append(
                        (int(g * size + m), group_probs[t, g] * within[m])
                    )
            choices.append(pairs)
        return choices, group_probs
    logits = tokens.astype(np.float64) @ params["router_kernel"]
    logits = logits + params.get("router_bias", 0.0)
    probs = softmax(logits) if score_function == "softmax" else sigmoid(logits)
    num_experts = probs.shape[-1]
    if normalize is None:
        normalize = routing == "top_k"
    choices = []
    for p in probs:
        if routing == "soft":
            choices.append([(e, p[e]) for e in range(num_experts)])
            continue
        choices.append(
            top_k_choice(
                p, k, normalize, scaling, params.get("selection_bias"), groups
            )
        )
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
    routing_keys=None,
    num_groups=None,
    group_k=1,
    expert_fns=None,
    glu=None,
    **options,
):
    """Reference MoE layer output and per-pair kept flags.

    Capacity rule: pairs are served first choices first, then second
    choices; within a choice level, in input order; an expert takes at most
    `ceil(capacity_factor * tokens * k / experts)` pairs (clipped to
    [1, tokens]). For `hierarchical`, `k` is the experts per group and a
    token has `group_k * k` choices; for `hash`, `k` is the number of
    experts. Shared experts in `params` are added to every unmasked output.
    `expert_fns`, one `(d,) -> (d_out,)` callable per expert, replaces the
    stacked experts. `glu` is `expert_output`'s `glu_limit` and
    `glu_linear_offset` as a dict. `options` are `route()`'s top-k options.
    """
    d = inputs.shape[-1]
    tokens = inputs.reshape(-1, d)
    token_mask = (
        np.ones(len(tokens), bool) if mask is None else mask.reshape(-1)
    )
    expert = _experts(params, activation, gated, expert_fns, glu)
    num_experts = len(expert)
    if routing_keys is not None:
        routing_keys = np.asarray(routing_keys).reshape(-1)
    choices, _ = route(
        params, tokens, routing, num_experts if routing == "hash" else k,
        routing_keys, num_groups, group_k, **options,
    )  # fmt: skip
    if routing == "hash":
        k = 1
    elif routing == "hierarchical":
        k = group_k * k
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
    out_dim = len(expert[0](tokens[0]))
    outputs = np.zeros((num_tokens, out_dim))
    for t in range(num_tokens):
        for slot, (e, w) in enumerate(choices[t]):
            if kept[t, slot]:
                outputs[t] += w * expert[e](tokens[t])
    _add_shared(params, tokens, token_mask, outputs, activation, gated)
    return outputs.reshape(inputs.shape[:-1] + (out_dim,)), kept


def _experts(params, activation, gated, expert_fns, glu=None):
    # One callable per expert: (d,) -> (d_out,). `expert_fns` stands for
    # experts that are arbitrary layers.
    if expert_fns is not None:
        return expert_fns
    return [
        lambda x, e=e: expert_output(
            params, e, x, activation, gated, **(glu or {})
        )
        for e in range(len(params["expert_in_kernel"]))
    ]


def _add_shared(params, tokens, token_mask, outputs, activation, gated):
    # Every shared expert, weight 1, on every unmasked token; with an output
    # gate, their sum times sigmoid(x @ w) (Qwen2-MoE).
    if "shared_expert_in_kernel" not in params:
        return
    gate = params.get("shared_gate_kernel")
    for t in np.flatnonzero(token_mask):
        total = 0.0
        for s in range(len(params["shared_expert_in_kernel"])):
            total = total + expert_output(
                params, s, tokens[t], activation, gated, "shared_expert"
            )
        if gate is not None:
            total = total * sigmoid(tokens[t] @ gate[:, 0])
        outputs[t] += total


def expert_choice_forward(
    params,
    inputs,
    capacity_factor=2.0,
    mask=None,
    activation="relu",
    gated=False,
    expert_fns=None,
):
    """Reference expert-choice output and the `(tokens, experts)` picks.

    Each expert, in turn, takes the `ceil(capacity_factor * tokens /
    experts)` (clipped to [1, tokens]) unmasked tokens it gives the highest
    router probability; a picked token gets that probability times the
    expert's output.
    """
    d = inputs.shape[-1]
    tokens = inputs.reshape(-1, d)
    num_tokens = len(tokens)
    token_mask = np.ones(num_tokens, bool) if mask is None else mask.reshape(-1)
    logits = tokens.astype(np.float64) @ params["router_kernel"]
    probs = softmax(logits + params.get("router_bias", 0.0))
    num_experts = probs.shape[-1]
    capacity = math.ceil(capacity_factor * num_tokens / num_experts)
    capacity = max(1, min(num_tokens, capacity))
    picked = np.zeros((num_tokens, num_experts), bool)
    for e in range(num_experts):
        candidates = [t for t in range(num_tokens) if token_mask[t]]
        candidates.sort(key=lambda t: -probs[t, e])
        picked[candidates[:capacity], e] = True
    expert = _experts(params, activation, gated, expert_fns)
    outputs = np.zeros((num_tokens, len(expert[0](tokens[0]))))
    for t in range(num_tokens):
        for e in np.flatnonzero(picked[t]):
            outputs[t] += probs[t, e] * expert[e](tokens[t])
    _add_shared(params, tokens, token_mask, outputs, activation, gated)
    return outputs.reshape(inputs.shape[:-1] + (-1,)), picked
