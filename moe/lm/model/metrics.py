"""Next-word metrics: top-1 / top-5 accuracy over real words, perplexity.

Written twice on purpose, with one definition: as Keras metrics for `fit`
and `evaluate` (`real_word_top_k_hits`, `Perplexity`) and in NumPy for
`serve.py --eval` (`next_word_metrics`); the tests hold them equal.

- Padding and out-of-vocabulary are never predictions (as in serving), and
  an out-of-vocabulary target is always a miss.
- Ties count as hits, as in `keras.ops.in_top_k`: the target is a hit when
  fewer than `k` real words score strictly higher.
- A row with a non-finite probability (a diverged model) is a miss: NaN
  compares false with everything, so it would otherwise rank first.
- Perplexity is `exp(mean -log p(target))`, `p` clipped to Keras's epsilon
  as `keras.losses.sparse_categorical_crossentropy` clips.
"""

import keras
import numpy as np
from keras import ops

from moe.lm.text.tokenizer import NUM_RESERVED

# Keras's cross-entropy clips probabilities the same way.
EPSILON = 1e-7


def real_word_top_k_hits(y_true, y_pred, k=1):
    """1.0 where the target is among the `k` most probable real words.

    One comparison per word, cheaper than a top-k (see the module
    docstring for the rules).
    """
    y_true = _targets(y_true, y_pred)
    target_scores = ops.take_along_axis(y_pred, y_true[..., None], axis=-1)
    higher = ops.greater(y_pred[..., NUM_RESERVED:], target_scores)
    rank = ops.sum(ops.cast(higher, "int32"), axis=-1)  # among real words
    finite = ops.all(ops.isfinite(y_pred), axis=-1)
    hits = ops.logical_and(rank < k, y_true >= NUM_RESERVED)
    return ops.cast(ops.logical_and(hits, finite), "float32")


class Perplexity(keras.metrics.Mean):
    """exp(mean cross-entropy of the next word), from probabilities.

    One gathered probability per target rather than a second full
    cross-entropy.
    """

    def __init__(self, name="perplexity", **kwargs):
        super().__init__(name=name, **kwargs)

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = _targets(y_true, y_pred)
        target_probs = ops.take_along_axis(y_pred, y_true[..., None], axis=-1)
        epsilon = keras.config.epsilon()
        target_probs = ops.clip(target_probs[..., 0], epsilon, 1.0 - epsilon)
        super().update_state(-ops.log(target_probs), sample_weight)

    def result(self):
        return ops.exp(super().result())


def _targets(y_true, y_pred):
    # int32 targets shaped like `y_pred` less its vocabulary axis (Keras may
    # hand pairs' targets over as `(batch, 1)`).
    y_true = ops.cast(y_true, "int32")
    if len(y_true.shape) == len(y_pred.shape):
        y_true = ops.squeeze(y_true, axis=-1)
    return y_true


def next_word_metrics(probs: np.ndarray, targets: np.ndarray) -> dict:
    """Accuracy, top-5 accuracy and perplexity from probabilities (NumPy)."""
    rows = np.arange(len(targets))
    scores = probs.copy()
    scores[:, :NUM_RESERVED] = -1.0
    target_scores = scores[rows, targets]
    rank = np.sum(scores > target_scores[:, None], axis=-1)
    real = (targets >= NUM_RESERVED) & np.all(np.isfinite(probs), axis=-1)
    p = np.clip(probs[rows, targets], EPSILON, 1.0 - EPSILON)
    return {
        "pairs": int(len(targets)),
        "accuracy": float(np.mean(real & (rank < 1))),
        "top5_accuracy": float(np.mean(real & (rank < 5))),
        "perplexity": float(np.exp(np.mean(-np.log(p)))),
    }
