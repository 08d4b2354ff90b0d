"""Token-choice sparse dispatch: picks the layout for the call."""

from moe.dispatch.backend import (
    has_grouped_matmul,
    on_accelerator,
    shapes_must_be_static,
)
from moe.dispatch.dynamic import dynamic_dispatch
from moe.dispatch.gather import gather_dispatch
from moe.dispatch.grouped import grouped_dispatch
from moe.dispatch.pairs import (
    drop_over_capacity,
    flatten_pairs,
    positions_in_expert,
    static_dim,
)
from moe.dispatch.static import capacity_dispatch, fitted_dispatch

DISPATCH_MODES = ("auto", "dynamic", "static", "grouped", "gather")


def use_static_layout(tokens, mode):
    """Whether the token-choice dispatch uses a static layout.

    `mode` is the layer's `dispatch` argument: `"static"` always,
    `"dynamic"` never (an error under a compiler, which needs static
    shapes), `"auto"` (and `"grouped"` and `"gather"`, for layers without
    stacked weights) when a compiler traces the call.
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


def choose_layout(tokens, top_k, num_experts, mode, capacity_factor=None):
    """The layout of one token-choice call: the one place `"auto"` decides.

    Args:
        tokens: `(T, d)`, the call's tokens (their static shape and the
            tracing context decide).
        top_k: int, pairs per token.
        num_experts: int.
        mode: the layer's `dispatch` argument (`DISPATCH_MODES`).
        capacity_factor: float or `None` (dropless).

    Returns:
        `"gather"` (`gather_dispatch`), `"grouped"` (`grouped_dispatch`),
        `"dynamic"` (`dynamic_dispatch`), `"capacity"`
        (`capacity_dispatch`), `"blocks"` (`block_dispatch`) or
        `"fitted"` (`capacity_dispatch` when every expert's load fits a
        buffer (`moe.dispatch.static`), else `block_dispatch`: one
        `ops.cond`, one branch runs, dropless either way).

    `"auto"` takes, in order: a grouped matmul on an accelerator; dynamic
    groups where shapes may be dynamic (TensorFlow graphs and eager,
    PyTorch eager: no copies of the weights, only the chosen experts'
    slices are read); under a compiler, the per-pair gather while the
    token count is known and `top_k * T <= num_experts` (decode: it reads
    `k * T` experts' weights where the padded blocks read at least `E`;
    measured crossover in `bench/README.md`); else a capacity buffer with
    `capacity_factor`, and without one `"fitted"` (no weight gathers
    when the loads fit; `"static"` always takes the padded blocks).
    """
    if mode == "gather":
        return "gather"
    if use_grouped_layout(tokens, mode):
        return "grouped"
    if not use_static_layout(tokens, mode):
        return "dynamic"
    num_tokens = tokens.shape[0]
    if (
        mode == "auto"
        and isinstance(num_tokens, int)
        and num_tokens * top_k <= num_experts
    ):
        return "gather"
    if capacity_factor is not None:
        return "capacity"
    return "fitted" if mode == "auto" else "blocks"


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
        mode: `"auto"`, `"dynamic"`, `"static"`, `"grouped"` or
            `"gather"` (`choose_layout`).

    Returns:
        `(outputs (T, d_out), dropped)`: `dropped` is the float32 fraction
        of routed pairs dropped for capacity.
    """
    k = expert_indices.shape[1]
    num_experts = experts[0].shape[0]
    layout = choose_layout(tokens, k, num_experts, mode, capacity_factor)
    # (k * T,) slot-major pairs; unrouted pairs have expert `E`.
    pair_experts, pair_weights = flatten_pairs(
        expert_indices, expert_weights, token_mask, num_experts
    )
    # Dropped pairs get expert `E` too (dropless: nothing changes).
    pair_experts, positions, capacity, dropped = drop_over_capacity(
        pair_experts, static_dim(tokens, 0), k, num_experts, capacity_factor
    )
    if layout in ("blocks", "fitted"):  # dropless: ranks and loads
        positions, counts = positions_in_expert(pair_experts, num_experts)
    if layout == "gather":
        outputs = gather_dispatch(
            tokens, pair_experts, pair_weights, k, experts, expert_fn
        )
    elif layout == "grouped":
        outputs = grouped_dispatch(
            tokens, pair_experts, pair_weights, experts, expert_fn
        )
    elif layout == "dynamic":
        outputs = dynamic_dispatch(
            tokens, pair_experts, pair_weights, k, experts, expert_fn
        )
    elif layout == "capacity":
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
        outputs = fitted_dispatch(
            tokens,
            pair_experts,
            positions,
            counts,
            pair_weights,
            k,
            experts,
            expert_fn,
            num_experts,
            fitted=layout == "fitted",
        )
    return outputs, dropped
