"""The next-word models, their per-architecture defaults, and compiling.

`pooled`: Embedding(mask_zero) -> GlobalAveragePooling1D -> MoELayer ->
Dense softmax over the vocabulary. The mask keeps left padding out of the
average; the MoE layer routes each pooled context to its experts.

`transformer`: token + position embeddings -> N `moe.MoETransformerBlock`s
(causal self-attention, MoE feed-forward routed per position) -> layer norm
-> the last position -> Dense softmax.

Keras is imported inside the builders: `ARCHITECTURES` is read by the
command line's checks, which answer before TensorFlow loads.
"""

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras


@dataclasses.dataclass(frozen=True)
class ArchitectureDefaults:
    """What an architecture uses for the settings left unset.

    Attributes:
        max_seq_len: the context window. The pooled trunk averages its
            context, so words before the last one blur it; the Transformer
            attends by position and uses a longer context.
        train_positions: `"all"`: a causal Transformer learns the next word
            at every position of a window in one step; `"last"`: one
            prediction per context (the pooled trunk has no other).
        learning_rate: the (peak) learning rate.
        optimizer, weight_decay, clip_norm, warmup_steps, lr_schedule, ema:
            the optimiser recipe (`moe.lm.training.recipe`), chosen by
            measurement (bench/README.md, "quality.py").
    """

    max_seq_len: int
    train_positions: str
    learning_rate: float
    optimizer: str = "adam"
    weight_decay: float = 0.0
    clip_norm: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    ema: float = 0.0


ARCHITECTURES = {
    "pooled": ArchitectureDefaults(1, "last", 3e-3),
    "transformer": ArchitectureDefaults(
        8, "all", 2e-3, optimizer="adamw", weight_decay=0.1, clip_norm=1.0,
        warmup_steps=200, lr_schedule="cosine", ema=0.999,
    ),
}  # fmt: skip
TRAIN_POSITIONS = ("all", "last")


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
    num_groups: int | None = None,
    num_shared_experts: int = 0,
) -> "keras.Model":
    """Builds the (uncompiled) pooled next-word model.

    With `routing="hash"` the MoE layer routes each context by the id of its
    last word (contexts are left-padded, so the last slot is the most recent
    word), computed inside the model: serving needs nothing extra.

    Returns:
        A model mapping int32 contexts `(batch, max_seq_len)` to next-word
        probabilities `(batch, vocab_size)`.
    """
    import keras

    import moe

    inputs = keras.Input((max_seq_len,), dtype="int32", name="context")
    x = keras.layers.Embedding(
        vocab_size, embed_dim, mask_zero=True, name="embedding"
    )(inputs)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    routing_args = {}
    if routing == "hash":
        routing_args["routing_key"] = inputs[:, -1]  # (batch,) last word
    x = moe.MoELayer(
        num_experts=num_experts,
        hidden_dim=hidden_dim,
        top_k=top_k,
        routing=routing,
        capacity_factor=capacity_factor,
        aux_loss_weight=aux_loss_weight,
        seed=seed,
        num_groups=num_groups,
        num_shared_experts=num_shared_experts,
        name="moe",
    )(x, **routing_args)
    outputs = keras.layers.Dense(
        vocab_size, activation="softmax", name="next_word"
    )(x)
    return keras.Model(inputs, outputs, name="pooled_moe_lm")


def build_transformer_model(
    vocab_size: int,
    max_seq_len: int,
    embed_dim: int,
    num_layers: int,
    num_heads: int,
    num_experts: int,
    hidden_dim: int,
    top_k: int | None = None,
    routing: str = "top_k",
    dropout: float = 0.0,
    seed: int | None = None,
    **moe_kwargs,
) -> "keras.Model":
    """Builds the (uncompiled) causal MoE Transformer next-word model.

    Token + learned position embeddings, `num_layers`
    `moe.MoETransformerBlock`s (pre-norm causal self-attention, an MoE
    layer with `num_experts` experts of width `hidden_dim` as the
    feed-forward network), a final layer norm, and a softmax over the
    vocabulary from the representation at the last position: contexts are
    left-padded, so the last slot is always the most recent word, and causal
    attention lets it see the whole context. Padding (id 0) is masked out
    of attention and not routed, and positions count from the first real
    word. With `routing="hash"` each position is routed by its token id.
    `every_position_model` makes the model that trains it on every
    position at once.

    Args:
        moe_kwargs: further `moe.MoELayer` arguments (`capacity_factor`,
            `aux_loss_weight`, ...), the same for every block.

    Returns:
        A model mapping int32 contexts `(batch, max_seq_len)` to next-word
        probabilities `(batch, vocab_size)`, like `build_model`'s.
    """
    import keras
    from keras import ops

    import moe

    inputs = keras.Input((max_seq_len,), dtype="int32", name="context")
    padding_mask = ops.not_equal(inputs, 0)  # (batch, max_seq_len)
    # Positions count from the first real word (padding gets 0, and is
    # masked): a prefix has the same positions right-aligned in a serving
    # context as at the start of a training window (`every_position_model`).
    positions = ops.maximum(
        ops.cumsum(ops.cast(padding_mask, "int32"), axis=1) - 1, 0
    )
    token_embedding = keras.layers.Embedding(
        vocab_size, embed_dim, name="token_embedding"
    )
    position_embedding = keras.layers.Embedding(
        max_seq_len, embed_dim, name="position_embedding"
    )
    x = token_embedding(inputs) + position_embedding(positions)
    x = keras.layers.Dropout(dropout, name="embedding_dropout")(x)
    routing_args = {"routing_key": inputs} if routing == "hash" else {}
    for i in range(num_layers):
        x = moe.MoETransformerBlock(
            num_heads=num_heads,
            intermediate_dim=hidden_dim,
            num_experts=num_experts,
            top_k=top_k,
            routing=routing,
            dropout=dropout,
            moe_kwargs=dict(
                moe_kwargs, seed=None if seed is None else seed + i
            ),
            name=f"block_{i}",
        )(x, padding_mask=padding_mask, **routing_args)
    x = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")(x)
    x = x[:, -1, :]  # (batch, embed_dim): the most recent word
    outputs = keras.layers.Dense(
        vocab_size, activation="softmax", name="next_word"
    )(x)
    return keras.Model(inputs, outputs, name="transformer_moe_lm")


def every_position_model(model: "keras.Model") -> "keras.Model":
    """The Transformer `model` predicting the next word at every position.

    Shares every layer (and so every weight) with `model`, and maps a window
    `(batch, max_seq_len)` to probabilities `(batch, max_seq_len,
    vocab_size)`: slot `j`'s are those `model` gives for the words up to
    slot `j` as its context (causal attention, positions from the first
    real word). Training it on `examples.make_window_dataset` trains `model` on
    every target of a window in one step instead of on the last one only.

    Args:
        model: a model from `build_transformer_model`.
    """
    import keras

    final_norm = model.get_layer("final_norm").output
    outputs = model.get_layer("next_word")(final_norm)
    return keras.Model(model.input, outputs, name=f"{model.name}_windows")


def compile_model(
    model: "keras.Model",
    learning_rate: float | None = None,
    steps_per_execution: int = 1,
    jit_compile: bool | str = "auto",
    optimizer=None,
) -> None:
    """An optimizer, sparse cross-entropy and the next-word metrics.

    Works for `(context, next word)` pairs and for weighted windows
    (`examples.make_window_dataset` with `every_position_model`, whose output
    has a position axis): there target 0 (padding, or another window's
    target) is left out of the loss, a mean over the batch's targets, and
    the metrics are weighted.

    Args:
        model: the model to compile.
        learning_rate: Adam's learning rate, when no `optimizer` is given;
            neither: no optimizer, for a model that is only evaluated.
        steps_per_execution: training steps per compiled call: > 1 saves
            the per-step Python round trip of `fit`, which dominates a
            small model's step (`bench/training_throughput.py`).
        jit_compile: XLA-compile the train step (`keras.Model.compile`).
            `"auto"` (Keras's rule) leaves XLA off on CPU-only TensorFlow
            and under `tf.distribute`.
        optimizer: a Keras optimizer to use instead of
            `Adam(learning_rate)` (`moe.lm.training.recipe.make_optimizer`).
    """
    import keras

    from moe.lm.model.metrics import Perplexity, real_word_top_k_hits

    if optimizer is None and learning_rate is not None:
        optimizer = keras.optimizers.Adam(learning_rate)
    loss = "sparse_categorical_crossentropy"
    if len(model.output.shape) == 3:  # (batch, positions, vocabulary)
        loss = keras.losses.SparseCategoricalCrossentropy(ignore_class=0)
    model.compile(
        steps_per_execution=steps_per_execution,
        jit_compile=jit_compile,
        optimizer=optimizer,
        loss=loss,
        weighted_metrics=[
            keras.metrics.MeanMetricWrapper(
                real_word_top_k_hits, name="accuracy", k=1
            ),
            keras.metrics.MeanMetricWrapper(
                real_word_top_k_hits, name="top5_accuracy", k=5
            ),
            Perplexity(),
        ],
    )


def count_parameters(
    architecture: str,
    vocab_size: int,
    max_seq_len: int,
    embed_dim: int,
    num_experts: int,
    hidden_dim: int,
    num_shared_experts: int = 0,
    num_layers: int = 1,
    **unused,
) -> int:
    """About how many weights `architecture`'s model has, without building it.

    The large matrices only (embeddings, attention, experts, the output
    layer); `model.count_params()` is a little higher. Other arguments of
    the builders are accepted and ignored.
    """
    experts = (num_experts + num_shared_experts) * 2 * embed_dim * hidden_dim
    ends = vocab_size * embed_dim * 2 + vocab_size  # embedding, next_word
    if architecture == "transformer":
        attention = 4 * embed_dim * embed_dim
        positions = max_seq_len * embed_dim
        return ends + positions + num_layers * (attention + experts)
    return ends + experts
