"""Token stream -> streaming `tf.data` pipeline of (context, next word).

Nothing here materialises the padded contexts: the dataset holds the token
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
    dataset = tf.data.Dataset.from_tensor_slices(
        np.asarray(positions, np.int32)
    )
    if shuffle_seed is not None:
        dataset = dataset.shuffle(
            len(positions), seed=shuffle_seed, reshuffle_each_iteration=True
        )

    def to_pairs(batch_positions):
        begins = tf.gather(starts, batch_positions)
        inputs = contexts(tokens, batch_positions, begins, max_seq_len)
        return inputs, tf.gather(tokens, batch_positions)

    dataset = dataset.batch(batch_size).map(
        to_pairs, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    return dataset.prefetch(tf.data.AUTOTUNE)
