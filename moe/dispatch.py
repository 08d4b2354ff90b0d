"""Sparse dispatch: run each token through only the experts it was routed to.

The routing decision arrives as `(tokens, k)` expert indices and weights. It
is flattened to `k * tokens` (token, expert) *pairs* in slot-major order
(every token's first choice, then every token's second choice, ...), which is
also the priority order when an expert is full: first choices before second
choices, earlier tokens before later ones (GShard's rule).

Three layouts compute exactly the same function; they differ in cost and in
what the backend needs:

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
  when `capacity_factor=None`.

A non-chosen expert is never computed on a token: buffer rows that no pair
fills hold zeros and are never read back.
"""

import math

import keras
from keras import ops

DISPATCH_MODES = ("auto", "dynamic", "static")


def shapes_must_be_static(x):
    """Whether `x` is being traced by a compiler that needs static shapes.

    JAX does while tracing (`jit`, `grad`, `eval_shape`: `x` is a tracer);
    TensorFlow inside an XLA (`jit_compile=True`) function; PyTorch under
    `torch.compile`. This is the one place that asks the backend directly:
    `keras.ops` has no such query.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf
        from tensorflow.python.ops import control_flow_util

        graph = tf.compat.v1.get_default_graph()
        return control_flow_util.GraphOrParentsInXlaContext(graph)
    if backend == "jax":
        import jax

        return isinstance(x, jax.core.Tracer)
    if backend == "torch":
        import torch

        return torch.compiler.is_compiling()
    return True


def positions_in_expert(pair_experts, num_experts):
    """Rank of each pair among the pairs that chose the same expert.

    Args:
        pair_experts: int32 `(pairs,)`, the expert of each pair, or
            `num_experts` for a pair that is not routed (padding).
        num_experts: int.

    Returns:
        `(positions, counts)`: int32 `(pairs,)` with `-1` for unrouted pairs,
        and int32 `(num_experts,)` the number of pairs per expert.
    """
    # (pairs, num_experts); the extra column absorbs unrouted pairs.
    one_hot = ops.one_hot(pair_experts, num_experts + 1, dtype="int32")
    one_hot = one_hot[:, :num_experts]
    positions = ops.sum(ops.cumsum(one_hot, axis=0) * one_hot, axis=1) - 1
    return positions, ops.sum(one_hot, axis=0)


def expert_capacity(num_tokens, top_k, num_experts, capacity_factor):
    """Slots per expert: `ceil(capacity_factor * tokens * k / experts)`.

    Never more than `num_tokens` (an expert cannot receive a token twice) and
    at least 1 when there are tokens (0 for none). `num_tokens` may be a
    Python int or a scalar tensor. With `top_k=1` it is also expert choice's
    picks per expert.
    """
    if isinstance(num_tokens, int):
        capacity = math.ceil(capacity_factor * num_tokens * top_k / num_experts)
        return min(num_tokens, max(1, capacity))
    capacity = ops.cast(
        ops.ceil(
            capacity_factor
            * ops.cast(num_tokens * top_k, "float32")
            / num_experts
        ),
        "int32",
    )
    return ops.minimum(num_tokens, ops.maximum(1, capacity))


def flatten_pairs(expert_indices, expert_weights, token_mask, num_experts):
    """`(tokens, k)` routing -> slot-major `(k * tokens,)` pair vectors.

    Pair `p = slot * tokens + token`. Returns `(pair_experts, pair_weights)`;
    the expert of a token outside `token_mask` (bool `(tokens,)` or `None`)
    is replaced by `num_experts`, which every dispatch skips.
    """
    k = ops.shape(expert_indices)[1]
    pair_experts = ops.reshape(ops.transpose(expert_indices), (-1,))
    pair_weights = ops.reshape(ops.transpose(expert_weights), (-1,))
    if token_mask is not None:
        pair_routed = ops.tile(token_mask, (k,))
        pair_experts = ops.where(pair_routed, pair_experts, num_experts)
    return pair_experts, pair_weights


def _pad_row(x):
    # Append one zero row: index `len(x)` then reads zeros.
    return ops.concatenate([x, ops.zeros_like(x[:1])], axis=0)


def _fill_slots(dest, pair_tokens, num_slots, pad_token):
    # Inverse of `dest`: for each of `num_slots` buffer rows, the token that
    # fills it, or `pad_token` (a zero row) if none does. Pairs sent to
    # `dest == num_slots` (dropped or unrouted) land in a discarded slot.
    slots = ops.full((num_slots + 1,), pad_token, dtype="int32")
    slots = ops.scatter_update(slots, ops.expand_dims(dest, 1), pair_tokens)
    return slots[:num_slots]


def _combine(expert_rows, dest, pair_weights, num_tokens, k):
    # expert_rows: (rows, d_out); dest: (pairs,) row of each pair, `rows` if
    # the pair was dropped. Returns (tokens, d_out) = sum_k weight * row.
    rows = ops.take(_pad_row(expert_rows), dest, axis=0)
    rows = rows * ops.cast(pair_weights, rows.dtype)[:, None]
    return ops.sum(ops.reshape(rows, (k, num_tokens, -1)), axis=0)


def dynamic_dispatch(tokens, pair_experts, pair_weights, k, experts, expert_fn):
    """Grouped dispatch with dynamic group sizes (see module docstring).

    The pairs are sorted by expert once, their tokens gathered once and cut
    into one contiguous group per expert by a single split; each expert runs
    on its group, and one weighted `segment_sum` adds the results back to
    their tokens. The ops that do not scale with the number of experts stay
    out of the per-expert loop (with 64 experts of ~128 pairs each, per-expert
    selection ops and their gradients cost as much as the matmuls).

    Args:
        tokens: `(tokens, d)`.
        pair_experts: int32 `(k * tokens,)`; an id past the last expert
            (unrouted or dropped) is never computed.
        pair_weights: `(k * tokens,)` combine weights.
        experts: the stacked expert parameters, a list of tensors whose
            first axis is the expert axis.
        expert_fn: `expert_fn(x, *params) -> y` for one expert's params.
    """
    num_tokens = ops.shape(tokens)[0]
    num_experts = ops.shape(experts[0])[0]
    # Unrouted pairs carry id `num_experts` and sort last, into a group
    # that is never computed. A token meets an expert at most once, so
    # the order inside a group (argsort need not be stable) cannot change
    # any token's sum.
    pair_experts = ops.minimum(pair_experts, num_experts)
    order = ops.argsort(pair_experts)
    counts = ops.bincount(pair_experts, minlength=num_experts + 1)
    sorted_tokens = ops.cast(order % num_tokens, "int32")  # p = slot*T + t
    groups = _split_rows(
        ops.take(tokens, sorted_tokens, axis=0), counts, num_experts + 1
    )
    # Unstacking once gives each expert its slice with a cheap gradient (one
    # stack), where indexing the variable per expert would not.
    per_expert = zip(
        groups,
        *[ops.unstack(ops.convert_to_tensor(p), axis=0) for p in experts],
    )
    y = ops.concatenate([expert_fn(*args) for args in per_expert], axis=0)
    num_routed = ops.shape(y)[0]
    weights = ops.take(pair_weights, order[:num_routed], axis=0)
    return ops.segment_sum(
        y * ops.cast(weights, y.dtype)[:, None],
        sorted_tokens[:num_routed],
        num_segments=num_tokens,
    )


def _split_rows(x, sizes, num):
    # `x` cut into `num` consecutive groups of `sizes` rows. `keras.ops.split`
    # needs a static row count, which a TensorFlow graph may not have.
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.split(x, sizes, num=num, axis=0)
    return ops.split(x, ops.cumsum(sizes)[:-1], axis=0)


def capacity_dispatch(
    tokens,
    pair_experts,
    positions,
    pair_weights,
    k,
    experts,
    expert_fn,
    num_experts,
    capacity,
):
    """Static `(experts, capacity, d)` buffer dispatch (see module docstring).

    `positions` come from `positions_in_expert`; pairs with
    `positions >= capacity` or `pair_experts == num_experts` are dropped.
    """
    num_tokens = ops.shape(tokens)[0]
    pair_tokens = ops.tile(ops.arange(num_tokens, dtype="int32"), (k,))
    num_slots = num_experts * capacity
    kept = ops.logical_and(
        ops.less(pair_experts, num_experts), ops.less(positions, capacity)
    )
    # (pairs,) buffer row of each pair; `num_slots` = dropped.
    dest = ops.where(kept, pair_experts * capacity + positions, num_slots)
    slot_tokens = _fill_slots(dest, pair_tokens, num_slots, num_tokens)
    x = ops.take(_pad_row(tokens), slot_tokens, axis=0)
    x = ops.reshape(x, (num_experts, capacity, -1))  # (E, C, d)
    # One 2-D matmul chain per expert: compilers run these faster than the
    # equivalent batched (E, C, d) x (E, d, h) matmul on CPU.
    per_expert = zip(
        ops.unstack(x, axis=0),
        *[ops.unstack(ops.convert_to_tensor(p), axis=0) for p in experts],
    )
    y = ops.stack([expert_fn(*args) for args in per_expert])  # (E, C, d_out)
    y = ops.reshape(y, (num_slots, -1))
    return _combine(y, dest, pair_weights, num_tokens, k)


def block_size_for(num_pairs, num_experts):
    """Rows per block for `block_dispatch`.

    Padding costs up to `num_experts * (block_size - 1)` rows, and every block
    gathers one expert's weights; `sqrt(16 * pairs / experts)` balances the
    two (weight gathers cost about 16 rows each on CPU), rounded to a power
    of two in [8, 256].
    """
    if not isinstance(num_pairs, int):
        return 64
    ideal = math.sqrt(16 * num_pairs / num_experts)
    return int(min(256, max(8, 2 ** round(math.log2(max(ideal, 1))))))


def block_dispatch(
    tokens,
    pair_experts,
    positions,
    counts,
    pair_weights,
    k,
    experts,
    expert_fn,
    num_experts,
):
    """Dropless dispatch with static shapes (see module docstring)."""
    num_tokens = ops.shape(tokens)[0]
    num_pairs = ops.shape(pair_experts)[0]
    pair_tokens = ops.tile(ops.arange(num_tokens, dtype="int32"), (k,))
    block_size = block_size_for(num_pairs, num_experts)
    # Static upper bound on the padded rows, in whole blocks.
    num_blocks = (num_pairs + num_experts * (block_size - 1)) // block_size + 1
    num_rows = num_blocks * block_size
    # (E,) each expert's group, padded to whole blocks, laid end to end.
    padded = (counts + block_size - 1) // block_size * block_size
    group_end = ops.cumsum(padded)
    group_start = group_end - padded
    routed = ops.less(pair_experts, num_experts)
    start = ops.take(group_start, ops.minimum(pair_experts, num_experts - 1))
    dest = ops.where(routed, start + positions, num_rows)  # (pairs,)
    slot_tokens = _fill_slots(dest, pair_tokens, num_rows, num_tokens)
    x = ops.take(_pad_row(tokens), slot_tokens, axis=0)
    x = ops.reshape(x, (num_blocks, block_size, -1))  # (blocks, b, d)
    # (blocks,) the expert owning each block; trailing unused blocks get the
    # last expert and compute on zero rows that are never read back.
    block_first_row = ops.arange(num_blocks, dtype="int32") * block_size
    block_experts = ops.minimum(
        ops.searchsorted(group_end, block_first_row, side="right"),
        num_experts - 1,
    )
    block_params = [ops.take(p, block_experts, axis=0) for p in experts]
    y = expert_fn(x, *block_params)  # (blocks, b, d_out)
    y = ops.reshape(y, (num_rows, -1))
    return _combine(y, dest, pair_weights, num_tokens, k)


def soft_dispatch(tokens, expert_weights, experts, expert_fn):
    """Every expert on every token, combined by the gate weights (dense)."""
    y = expert_fn(tokens[None], *experts)  # (E, tokens, d_out)
    weights = ops.cast(ops.transpose(expert_weights), y.dtype)  # (E, tokens)
    return ops.sum(y * weights[:, :, None], axis=0)


def expert_choice_dispatch(
    tokens, token_indices, weights, picked, experts, expert_fn
):
    """Expert-choice dispatch: each expert runs on the tokens it picked.

    The picks are already a static `(experts, capacity)` layout (from
    `moe.routing.expert_choice_routing`), so this is the capacity buffer
    without the drop rule: gather, one 2-D matmul chain per expert, weight,
    scatter-add back. A pick with `picked=False` (only possible on a masked
    token) reads a zero row and is added to a discarded row.

    Args:
        tokens: `(tokens, d)`.
        token_indices: int32 `(experts, capacity)`, the token of each pick.
        weights: `(experts, capacity)` combine weights.
        picked: bool `(experts, capacity)`.
        experts: the stacked expert parameters, experts axis first.
        expert_fn: `expert_fn(x, *params) -> y` for one expert's params.

    Returns:
        `(tokens, d_out)`: for each token, the weighted sum of the outputs
        of the experts that picked it (zeros if none did).
    """
    num_tokens = ops.shape(tokens)[0]
    # (E, C): a pick that is not real reads and writes row `num_tokens`.
    rows = ops.where(picked, token_indices, num_tokens)
    x = ops.take(_pad_row(tokens), rows, axis=0)  # (E, C, d)
    per_expert = zip(
        ops.unstack(x, axis=0),
        *[ops.unstack(ops.convert_to_tensor(p), axis=0) for p in experts],
    )
    y = ops.stack([expert_fn(*args) for args in per_expert])  # (E, C, d_out)
    y = y * ops.cast(weights, y.dtype)[:, :, None]
    out = ops.segment_sum(
        ops.reshape(y, (-1, ops.shape(y)[-1])),
        ops.reshape(rows, (-1,)),
        num_segments=num_tokens + 1,
    )
    return out[:num_tokens]


def dense_experts(tokens, experts, expert_fn):
    """Sum of every expert's output on every token, unweighted.

    The always-on shared experts (DeepSeek-MoE): `(tokens, d)` ->
    `(tokens, d_out)`.
    """
    y = expert_fn(tokens[None], *experts)  # (S, tokens, d_out)
    return ops.sum(y, axis=0)


def use_static_layout(tokens, mode):
    """Whether the token-choice dispatch uses a static layout.

    `mode` is the layer's `dispatch` argument: `"static"` always,
    `"dynamic"` never (an error under a compiler, which needs static
    shapes), `"auto"` when a compiler traces the call.
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


def static_dim(x, axis):
    """The Python int size of `axis` when known while tracing, else a
    tensor."""
    size = x.shape[axis]
    return size if size is not None else ops.shape(x)[axis]


def kept_pairs(expert_indices, token_mask, num_experts, capacity_factor):
    """`(tokens, k)` bool: the pair is routed and within capacity."""
    num_tokens = ops.shape(expert_indices)[0]
    k = ops.shape(expert_indices)[1]
    pair_experts, _ = flatten_pairs(
        expert_indices, expert_indices, token_mask, num_experts
    )
    kept = ops.less(pair_experts, num_experts)
    if capacity_factor is not None:
        positions, _ = positions_in_expert(pair_experts, num_experts)
        capacity = expert_capacity(num_tokens, k, num_experts, capacity_factor)
        kept = ops.logical_and(kept, ops.less(positions, capacity))
    return ops.transpose(ops.reshape(kept, (k, num_tokens)))


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
        mode: `"auto"`, `"dynamic"` or `"static"` (`use_static_layout`).

    Returns:
        `(outputs (T, d_out), dropped)`: `dropped` is the float32 fraction
        of routed pairs dropped for capacity.
    """
    k = ops.shape(expert_indices)[1]
    num_experts = ops.shape(experts[0])[0]
    static = use_static_layout(tokens, mode)
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
    if not static:
        if capacity_factor is not None:
            pair_experts = ops.where(kept, pair_experts, num_experts)
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
