"""Token stream -> streaming `tf.data` pipelines of next-word examples.

Two pipelines over the same stream:
- `make_dataset`: `(context, next word)` pairs, one per target position:
  what serving predicts, and how the pooled model trains.
- `make_window_dataset`: `(window, next word at every slot)`: a causal
  model trains on every position of a window at once, each target once per
  epoch (the Transformer's default).

Nothing here materialises the padded contexts: the datasets hold the token
stream and the target positions (memory grows with the corpus only) and
`contexts()` slices each batch's windows out of the stream on the fly.
`contexts()` is the one definition of a context, used by training, by
`serve.py --eval` and by every prediction.
"""

import numpy as np
import tensorflow as tf


def contexts(tokens, ends, begins, max_seq_len: int):
    """Left-padded contexts ending just before `ends`.

    Context `b` is `tokens[max(begins[b], ends[b] - max_seq_len):ends[b]]`,
    left-padded with 0 to `max_seq_len`.

    Args:
        tokens: int32 `(stream,)`, the token stream.
        ends: int32 `(batch,)`, position of the word to predict (one past
            the context).
        begins: int32 `(batch,)`, first position the context may use (the
            start of the sentence).
        max_seq_len: context window.

    Returns:
        int32 `(batch, max_seq_len)`.
    """
    tokens = tf.convert_to_tensor(tokens, tf.int32)
    ends = tf.convert_to_tensor(ends, tf.int32)
    begins = tf.convert_to_tensor(begins, tf.int32)
    # (batch, max_seq_len): stream index of each slot, right-aligned at end.
    index = ends[:, None] + tf.range(-max_seq_len, 0, dtype=tf.int32)
    window = tf.gather(tokens, tf.maximum(index, 0))
    return tf.where(index >= begins[:, None], window, tf.zeros_like(window))


def make_dataset(
    tokens: np.ndarray,
    starts: np.ndarray,
    positions: np.ndarray,
    max_seq_len: int,
    batch_size: int,
    shuffle_seed: int | None = None,
) -> tf.data.Dataset:
    """Batches of `(contexts (batch, max_seq_len), next word ids (batch,))`.

    Args:
        tokens, starts: the stream from `corpus.token_stream`.
        positions: target positions to visit (e.g. the training part).
        shuffle_seed: shuffle positions (reshuffled every epoch,
            deterministically for a given seed); `None` keeps stream order.
    """
    tokens = tf.constant(tokens, tf.int32)
    starts = tf.constant(starts, tf.int32)
    positions = tf.constant(np.asarray(positions, np.int32))
    if shuffle_seed is None:
        dataset = tf.data.Dataset.from_tensor_slices(positions)
    else:
        dataset = _epoch_seeds(shuffle_seed).flat_map(
            lambda seed: tf.data.Dataset.from_tensor_slices(
                tf.random.experimental.stateless_shuffle(positions, seed)
            )
        )

    def to_pairs(batch_positions):
        begins = tf.gather(starts, batch_positions)
        inputs = contexts(tokens, batch_positions, begins, max_seq_len)
        return inputs, tf.gather(tokens, batch_positions)

    steps = -(-int(positions.shape[0]) // batch_size)
    dataset = dataset.batch(batch_size)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(steps))
    dataset = dataset.map(
        to_pairs, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    return dataset.prefetch(tf.data.AUTOTUNE)


def _epoch_seeds(shuffle_seed: int) -> tf.data.Dataset:
    """One stateless-RNG seed per epoch (per iteration), reproducible.

    A shuffled epoch permutes its positions as one tensor with it:
    `Dataset.shuffle` over the positions would buffer each as an element
    of its own, about a hundred bytes per position, memory that grows
    with the corpus (bench/memory.py).
    """
    seeds = tf.data.Dataset.random(
        seed=shuffle_seed, rerandomize_each_iteration=True
    ).take(1)
    return seeds.map(
        lambda r: tf.stack([r, tf.constant(shuffle_seed, tf.int64)])
    )


def window_ends(positions, starts, window: int, offset):
    """The windows of one epoch over the target `positions`.

    The targets split into runs of consecutive positions (a sentence less
    its first word, clipped to the part of the corpus `positions` covers).
    A window ends at every run's last target and at every target `p` with
    `(p + offset) % window == 0`: consecutive ends in a run are at most
    `window` apart, and each target belongs to exactly one window, the one
    ending at the first end at or after it.

    Args:
        positions: sorted int32 `(n,)` target positions.
        starts: int32, the stream's sentence starts (`token_stream`).
        window: the window length (`max_seq_len`).
        offset: int32 scalar in `[0, window)`, where the windows are cut; a
            random one per epoch gives each target other context lengths.

    Returns:
        `(ends, firsts)`, int32 tensors: each window's last target and its
        first one (the window's earlier words are context only).
    """
    positions = tf.convert_to_tensor(positions, tf.int32)
    starts = tf.convert_to_tensor(starts, tf.int32)
    run_end = tf.concat([positions[1:] != positions[:-1] + 1, [True]], 0)
    at_cut = (positions + offset) % window == 0
    ends = tf.boolean_mask(positions, run_end | at_cut)
    previous_ends = tf.concat([positions[:1] - 1, ends[:-1]], 0)
    firsts = tf.maximum(previous_ends + 1, tf.gather(starts, ends) + 1)
    return ends, firsts


def window_count(positions, starts, window: int, shuffled=True) -> int:
    """Windows in an epoch of `make_window_dataset`.

    The fewest a shuffled epoch has (over every offset), or, with
    `shuffled=False`, those of stream order (offset 0).
    """
    return min(
        int(tf.size(window_ends(positions, starts, window, offset)[0]))
        for offset in (range(window) if shuffled else [0])
    )


def make_window_dataset(
    tokens: np.ndarray,
    starts: np.ndarray,
    positions: np.ndarray,
    max_seq_len: int,
    batch_size: int,
    shuffle_seed: int | None = None,
) -> tf.data.Dataset:
    """Batches of `(windows, targets, weights)`, each `(batch, max_seq_len)`.

    A window is the context of its last target (`contexts`); slot `j`'s
    target is the word after slot `j`, so a causal model predicts every
    target of the window from the words before it in the window (the same
    words, at most `max_seq_len`, that serving would see, or fewer where
    the window was cut). Targets that belong to another window, and the
    padding, have target 0 and weight 0. In stream order every position in
    `positions` is a target exactly once, as in `make_dataset`; a shuffled
    epoch has the batches of `window_count` windows, and leaves the few
    windows past them for another epoch.

    Args:
        tokens, starts: the stream from `corpus.token_stream`.
        positions: sorted target positions (e.g. the training part).
        shuffle_seed: cut the windows at a random offset each epoch and
            shuffle them (both reproducible for a given seed); `None` cuts
            at offset 0 and keeps stream order.
    """
    tokens = tf.constant(tokens, tf.int32)
    starts = tf.constant(starts, tf.int32)
    positions = tf.constant(np.asarray(positions, np.int32))

    def epoch_windows(offset, seed=None):
        ends, firsts = window_ends(positions, starts, max_seq_len, offset)
        if seed is not None:  # shuffled as one tensor (`_epoch_seeds`)
            order = tf.random.experimental.stateless_shuffle(
                tf.range(tf.size(ends)), seed
            )
            ends, firsts = tf.gather(ends, order), tf.gather(firsts, order)
        return tf.data.Dataset.from_tensor_slices((ends, firsts))

    if shuffle_seed is None:
        offsets = tf.data.Dataset.from_tensors(tf.constant(0, tf.int32))
        dataset = offsets.flat_map(epoch_windows)
    else:
        dataset = _epoch_seeds(shuffle_seed).flat_map(
            lambda seed: epoch_windows(
                tf.cast(seed[0] % max_seq_len, tf.int32), seed
            )
        )

    def to_windows(ends, firsts):
        begins = tf.gather(starts, ends)
        windows = contexts(tokens, ends, begins, max_seq_len)
        targets = contexts(tokens, ends + 1, begins + 1, max_seq_len)
        # (batch, max_seq_len): stream position of each slot's target.
        target_positions = ends[:, None] + tf.range(
            1 - max_seq_len, 1, dtype=tf.int32
        )
        mine = target_positions >= firsts[:, None]
        targets = tf.where(mine, targets, tf.zeros_like(targets))
        return windows, targets, tf.cast(targets != 0, tf.float32)

    # The cut moves the number of windows a little from epoch to epoch;
    # Keras needs a fixed number of steps, the batches of the fewest: the
    # few windows past them (shuffled, so different ones) wait an epoch.
    windows = window_count(
        positions, starts, max_seq_len, shuffled=shuffle_seed is not None
    )
    steps = -(-windows // batch_size)
    dataset = dataset.batch(batch_size).take(steps)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(steps))
    dataset = dataset.map(
        to_windows, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    return dataset.prefetch(tf.data.AUTOTUNE)
