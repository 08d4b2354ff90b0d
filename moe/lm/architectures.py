"""The next-word model and its metrics.

`pooled`: Embedding(mask_zero) -> GlobalAveragePooling1D -> MoELayer ->
Dense softmax over the vocabulary. The mask keeps left padding out of the
average; the MoE layer routes each pooled context to its experts.
"""

import keras
from keras import ops

import moe
from moe.lm.tokenizer import NUM_RESERVED


def build_model(
    vocab_size: int,
    max_seq_len: int,
    embed_dim: int,
    num_experts: int,
    hidden_dim: int,
    top_k: int | None = None,
    routing: str = "top_k",
    capacity_factor: float | None = None,
    aux_loss_weight: float = 0.01,
    seed: int | None = None,
) -> keras.Model:
    """Builds the (uncompiled) pooled next-word model.

    Returns:
        A model mapping int32 contexts `(batch, max_seq_len)` to next-word
        probabilities `(batch, vocab_size)`.
    """
    inputs = keras.Input((max_seq_len,), dtype="int32", name="context")
    x = keras.layers.Embedding(
        vocab_size, embed_dim, mask_zero=True, name="embedding"
    )(inputs)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    x = moe.MoELayer(
        num_experts=num_experts,
        hidden_dim=hidden_dim,
        top_k=top_k,
        routing=routing,
        capacity_factor=capacity_factor,
        aux_loss_weight=aux_loss_weight,
        seed=seed,
        name="moe",
    )(x)
    outputs = keras.layers.Dense(
        vocab_size, activation="softmax", name="next_word"
    )(x)
    return keras.Model(inputs, outputs, name="pooled_moe_lm")


def compile_model(model: keras.Model, learning_rate: float) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=[
            keras.metrics.MeanMetricWrapper(
                real_word_top_k_hits, name="accuracy", k=1
            ),
            keras.metrics.MeanMetricWrapper(
                real_word_top_k_hits, name="top5_accuracy", k=5
            ),
            Perplexity(),
        ],
    )


def real_word_top_k_hits(y_true, y_pred, k=1):
    """1.0 where the target is among the `k` most probable real words.

    Padding and out-of-vocabulary never count as predictions (as in
    serving), and an out-of-vocabulary target is always a miss.
    """
    y_true = ops.cast(ops.reshape(y_true, (-1,)), "int32")
    num_classes = ops.shape(y_pred)[-1]
    reserved = ops.arange(num_classes) < NUM_RESERVED  # (vocab,)
    # Probabilities are >= 0, so -1 ranks pad/OOV below every real word.
    scores = ops.where(reserved[None, :], -1.0, y_pred)
    hits = ops.logical_and(
        ops.in_top_k(y_true, scores, k), y_true >= NUM_RESERVED
    )
    return ops.cast(hits, "float32")


class Perplexity(keras.metrics.Mean):
    """exp(mean cross-entropy of the next word), from probabilities."""

    def __init__(self, name="perplexity", **kwargs):
        super().__init__(name=name, **kwargs)

    def update_state(self, y_true, y_pred, sample_weight=None):
        losses = keras.losses.sparse_categorical_crossentropy(y_true, y_pred)
        super().update_state(losses, sample_weight=sample_weight)

    def result(self):
        return ops.exp(super().result())
