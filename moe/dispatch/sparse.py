"""Token-choice sparse dispatch: picks the layout for the call."""

from keras import ops

from moe.dispatch.backend import (
    has_grouped_matmul,
    on_accelerator,
    shapes_must_be_static,
)
from moe.dispatch.dynamic import dynamic_dispatch
from moe.dispatch.grouped import grouped_dispatch
from moe.dispatch.pairs import (
    expert_capacity,
    flatten_pairs,
    positions_in_expert,
    static_dim,
)
from moe.dispatch.static import block_dispatch, capacity_dispatch

DISPATCH_MODES = ("auto", "dynamic", "static", "grouped")


def use_static_layout(tokens, mode):
    """Whether the token-choice dispatch uses a static layout.

    `mode` is the layer's `dispatch` argument: `"static"` always,
    `"dynamic"` never (an error under a compiler, which needs static
    shapes), `"auto"` (and `"grouped"`, for layers without stacked
    weights) when a compiler traces the call.
    """
    if mode == "static":
        return True
    if not shapes_must_be_static(tokens):
        return False
    if mode == "dynamic":
        raise ValueError(
            "`dispatch='dynamic'` needs dynamic shapes, which a compiler "
            "tracing this call (JAX jit, XLA, torch.compile) does not "
            "allow. Use dispatch='auto' or 'static'. "
            f"Received: dispatch={mode!r}"
        )
    return True


def use_grouped_layout(tokens, mode):
    """Whether the token-choice dispatch runs on a grouped matmul.

    `"grouped"` always (an error where no grouped matmul exists under a
    compiler: TensorFlow XLA); `"auto"` on a GPU or TPU of a backend with
    one (JAX, PyTorch). On CPU the buffer layouts measure faster
    (`bench/README.md`), so `"auto"` keeps them.
    """
    if mode == "grouped":
        if not has_grouped_matmul() and shapes_must_be_static(tokens):
            raise ValueError(
                "`dispatch='grouped'` needs a grouped matmul, which this "
                "backend lacks under a compiler (TensorFlow XLA). Use "
                f"dispatch='auto' or 'static'. Received: dispatch={mode!r}"
            )
        return True
    return mode == "auto" and has_grouped_matmul() and on_accelerator(tokens)


def sparse_dispatch(
    tokens,
    expert_indices,
    expert_weights,
    token_mask,
    experts,
    expert_fn,
    capacity_factor=None,
    mode="auto",
):
    """Run each token through its chosen experts only (token choice).

    Args:
        tokens: `(T, d)`.
        expert_indices: int32 `(T, k)`, the experts of each token.
        expert_weights: `(T, k)` combine weights.
        token_mask: bool `(T,)` or `None`; unrouted tokens get zeros.
        experts: the stacked expert parameters, experts axis first.
        expert_fn: `expert_fn(x, *params) -> y`.
        capacity_factor: float or `None` (dropless): each expert takes at
            most `expert_capacity(...)` pairs, first choices first.
        mode: `"auto"`, `"dynamic"`, `"static"` (`use_static_layout`) or
            `"grouped"` (`use_grouped_layout`).

    Returns:
        `(outputs (T, d_out), dropped)`: `dropped` is the float32 fraction
        of routed pairs dropped for capacity.
    """
    k = ops.shape(expert_indices)[1]
    num_experts = ops.shape(experts[0])[0]
    grouped = use_grouped_layout(tokens, mode)
    static = not grouped and use_static_layout(tokens, mode)
    # (k * T,) slot-major pairs; unrouted pairs have expert `E`.
    pair_experts, pair_weights = flatten_pairs(
        expert_indices, expert_weights, token_mask, num_experts
    )
    dropped = ops.zeros((), "float32")
    if capacity_factor is not None or static:
        positions, counts = positions_in_expert(pair_experts, num_experts)
    if capacity_factor is not None:
        capacity = expert_capacity(
            static_dim(tokens, 0), k, num_experts, capacity_factor
        )
        routed = ops.less(pair_experts, num_experts)
        kept = ops.logical_and(routed, ops.less(positions, capacity))
        dropped = 1.0 - ops.sum(ops.cast(kept, "float32")) / ops.maximum(
            ops.sum(ops.cast(routed, "float32")), 1.0
        )
    if not static and capacity_factor is not None:
        pair_experts = ops.where(kept, pair_experts, num_experts)
    if grouped:
        outputs = grouped_dispatch(
            tokens, pair_experts, pair_weights, experts, expert_fn
        )
    elif not static:
        outputs = dynamic_dispatch(
            tokens, pair_experts, pair_weights, k, experts, expert_fn
        )
    elif capacity_factor is not None:
        outputs = capacity_dispatch(
            tokens,
            pair_experts,
            positions,
            pair_weights,
            k,
            experts,
            expert_fn,
            num_experts,
            capacity,
        )
    else:
        outputs = block_dispatch(
            tokens,
            pair_experts,
            positions,
            counts,
            pair_weights,
            k,
            experts,
            expert_fn,
            num_experts,
        )
    return outputs, dropped
