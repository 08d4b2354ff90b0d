"""Static-shape layouts for compilers (XLA, JAX `jit`): a capacity buffer
(drops past capacity), dropless padded blocks, and the buffer when the
loads fit it with the blocks as the fallback."""

import math

from keras import ops

from moe.dispatch.pairs import combine, expert_capacity, fill_slots, pad_row

# Under a compiler `"auto"` runs a dropless call in a capacity buffer of
# `ceil(FITTED_CAPACITY_FACTOR * k * T / E)` rows per expert when every
# expert's load fits, else in padded blocks (`bench/README.md`: 1.25 beat
# 2.0 at 512 and 2048 tokens).
FITTED_CAPACITY_FACTOR = 1.25
FITTED_MIN_ROWS = 16


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

    `positions` come from `positions_in_expert`; every routed pair fits
    (`positions < capacity`: `drop_over_capacity` has set the others'
    expert to `num_experts`, or every load fits), and pairs with
    `pair_experts == num_experts` are skipped.
    """
    num_tokens = ops.shape(tokens)[0]
    pair_tokens = ops.tile(ops.arange(num_tokens, dtype="int32"), (k,))
    num_slots = num_experts * capacity
    routed = ops.less(pair_experts, num_experts)
    # (pairs,) buffer row of each pair; `num_slots` = not computed.
    dest = ops.where(routed, pair_experts * capacity + positions, num_slots)
    slot_tokens = fill_slots(dest, pair_tokens, num_slots, num_tokens)
    x = ops.take(pad_row(tokens), slot_tokens, axis=0)
    x = ops.reshape(x, (num_experts, capacity, -1))  # (E, C, d)
    # One 2-D matmul chain per expert: compilers run these faster than the
    # equivalent batched (E, C, d) x (E, d, h) matmul on CPU.
    per_expert = zip(
        ops.unstack(x, axis=0),
        *[ops.unstack(ops.convert_to_tensor(p), axis=0) for p in experts],
    )
    y = ops.stack([expert_fn(*args) for args in per_expert])  # (E, C, d_out)
    y = ops.reshape(y, (num_slots, -1))
    return combine(y, dest, pair_weights, num_tokens, k)


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
    slot_tokens = fill_slots(dest, pair_tokens, num_rows, num_tokens)
    x = ops.take(pad_row(tokens), slot_tokens, axis=0)
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
    return combine(y, dest, pair_weights, num_tokens, k)


def fitted_dispatch(
    tokens,
    pair_experts,
    positions,
    counts,
    pair_weights,
    k,
    experts,
    expert_fn,
    num_experts,
    fitted=True,
):
    """Dropless static dispatch: a capacity buffer when every expert's
    load fits one (`fitted`), else padded blocks.

    The buffer's per-expert matmuls read the weights in place; the blocks
    copy one expert's weights per block (`bench/README.md`). Both compute
    the same function when nothing is dropped, so the choice is data:
    one `ops.cond`, one branch runs.
    """
    args = (tokens, pair_experts, positions)

    def blocks():
        return block_dispatch(
            *args, counts, pair_weights, k, experts, expert_fn, num_experts
        )

    num_tokens = tokens.shape[0]
    if not fitted or not isinstance(num_tokens, int):
        return blocks()
    # At least `FITTED_MIN_ROWS` rows an expert (never more than the
    # tokens): a few tokens' loads then always fit, and the buffer reads
    # each expert's weights once where the blocks would copy them.
    capacity = min(
        num_tokens,
        max(
            FITTED_MIN_ROWS,
            expert_capacity(num_tokens, k, num_experts, FITTED_CAPACITY_FACTOR),
        ),
    )

    def buffer():
        return capacity_dispatch(
            *args, pair_weights, k, experts, expert_fn, num_experts, capacity
        )

    return ops.cond(ops.all(ops.less_equal(counts, capacity)), buffer, blocks)
