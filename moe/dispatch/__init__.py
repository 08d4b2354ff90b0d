"""Sparse dispatch: run each token through only the experts it was routed to.

The routing decision arrives as `(tokens, k)` expert indices and weights. It
is flattened to `k * tokens` (token, expert) *pairs* in slot-major order
(every token's first choice, then every token's second choice, ...), which is
also the priority order when an expert is full: first choices before second
choices, earlier tokens before later ones (GShard's rule).

The layouts compute exactly the same function; they differ in cost and in
what the backend needs (one module each):

- `dynamic_dispatch` (grouped): sort the pairs by expert, gather their
  tokens once, cut them into one dynamically sized group per expert, run
  each expert on its group, scatter the weighted results back. Exactly
  `k * tokens` expert rows, no padding. Needs dynamic shapes: TensorFlow
  graphs and eager, PyTorch.
- `capacity_dispatch`: a static `(experts, capacity, d)` buffer; pairs past an
  expert's capacity are dropped (zero output). `experts * capacity` rows.
- `block_dispatch` (dropless, static): pairs grouped by expert into blocks
  of `block_size` rows, each group padded to whole blocks; each block is
  multiplied by its own expert's weights. At most
  `k * tokens + experts * (block_size - 1)` rows, static shapes, no drops
  (the layout of MegaBlocks, Gale et al., 2022). Used by compilers (XLA/JAX)
  when `capacity_factor=None` and the loads do not fit a buffer.
- `fitted_dispatch` (dropless, static): what `"auto"` runs under a
  compiler: a capacity buffer of `FITTED_CAPACITY_FACTOR` when every
  expert's load fits (per-expert matmuls, no weight copies), else the
  padded blocks; one `ops.cond`, one branch runs.
- `grouped_dispatch` (dropless, static): the sorted rows of the dynamic
  layout, every expert matmul one grouped matmul (`jax.lax.ragged_dot`,
  `torch._grouped_mm`). Exactly `k * tokens` rows; what `"auto"` picks on
  a GPU or TPU.
- `gather_dispatch` (few tokens, static): each pair gathers its own
  expert's weights, `(pairs, d, h)`, and runs as one row of a batched
  matmul; a one-token call reads `k` experts' weights instead of `E`.
  What `"auto"` picks under a compiler when `k * tokens` is known and at
  most `experts` (`choose_layout`: decode).

`run_experts` (`moe.dispatch.run`) is the one entry point: `MoELayer`
hands it the router's decision and the experts, and it matches on the
decision's type (token choice, soft, expert choice, every expert) and on
the experts' kind (stacked `moe.Experts`, or `moe.LayerExperts`, whose loop
is `moe.dispatch.layer_loop`). `choose_layout` is the one place the layout
of a token-choice call is decided, and `drop_over_capacity` the one place
the capacity rule (capacity, kept, dropped) is written.

A non-chosen expert is never computed on a token: buffer rows that no pair
fills hold zeros and are never read back. `moe.dispatch.backend` is the
seam: the one place outside `keras.ops` that touches a backend directly.
"""

from moe.dispatch.backend import (
    has_grouped_matmul,
    has_values,
    on_accelerator,
    shapes_must_be_static,
)
from moe.dispatch.dense import (
    dense_experts,
    expert_choice_dispatch,
    soft_dispatch,
)
from moe.dispatch.dynamic import dynamic_dispatch
from moe.dispatch.gather import gather_dispatch
from moe.dispatch.grouped import grouped_dispatch
from moe.dispatch.layer_loop import (
    layer_dense,
    layer_expert_choice,
    layer_soft,
    layer_token_choice,
)
from moe.dispatch.pairs import (
    drop_over_capacity,
    expert_capacity,
    flatten_pairs,
    kept_pairs,
    positions_in_expert,
    static_dim,
)
from moe.dispatch.run import run_experts, unpicked_fraction
from moe.dispatch.sparse import (
    DISPATCH_MODES,
    choose_layout,
    sparse_dispatch,
    use_grouped_layout,
    use_static_layout,
)
from moe.dispatch.static import (
    FITTED_CAPACITY_FACTOR,
    block_dispatch,
    block_size_for,
    capacity_dispatch,
    fitted_dispatch,
)

__all__ = [
    "DISPATCH_MODES",
    "FITTED_CAPACITY_FACTOR",
    "block_dispatch",
    "block_size_for",
    "capacity_dispatch",
    "choose_layout",
    "dense_experts",
    "drop_over_capacity",
    "dynamic_dispatch",
    "expert_capacity",
    "expert_choice_dispatch",
    "fitted_dispatch",
    "flatten_pairs",
    "gather_dispatch",
    "grouped_dispatch",
    "has_grouped_matmul",
    "has_values",
    "kept_pairs",
    "layer_dense",
    "layer_expert_choice",
    "layer_soft",
    "layer_token_choice",
    "on_accelerator",
    "positions_in_expert",
    "run_experts",
    "shapes_must_be_static",
    "soft_dispatch",
    "sparse_dispatch",
    "static_dim",
    "unpicked_fraction",
    "use_grouped_layout",
    "use_static_layout",
]
