"""MoETransformerBlock: causality, padding, routing, saving, training.

Runs on the backend KERAS_BACKEND names; test_backends.py (the backend
matrix) reruns its backend-dependent tests on the others. The next-word
model built from the block and its CLI are in test_transformer_lm.py.
"""

import keras
import numpy as np
import pytest
from keras import ops
from layer_contract import check_layer_contract
from moe_reference import expert_output, layer_params

import moe

WIDTH, SEQ = 8, 6


def make_block(**kwargs):
    keras.utils.set_random_seed(0)
    kwargs.setdefault("num_heads", 2)
    kwargs.setdefault("intermediate_dim", 6)
    kwargs.setdefault("num_experts", 4)
    kwargs.setdefault("top_k", 2)
    block = moe.MoETransformerBlock(**kwargs)
    block.build((None, SEQ, WIDTH))
    return block


def random_inputs(shape=(3, SEQ, WIDTH), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def left_padding_mask(lengths, seq=SEQ):
    """bool (batch, seq): the last `lengths[b]` positions are real."""
    return np.arange(seq)[None, :] >= seq - np.asarray(lengths)[:, None]


def to_numpy(x):
    return ops.convert_to_numpy(x)


# --- Construction and build errors -------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_heads=0), "`num_heads` .* Received: num_heads=0"),
        (dict(intermediate_dim=0), "Received: intermediate_dim=0"),
        (dict(dropout=1.0), "Received: dropout=1.0"),
        (dict(layer_norm_epsilon=0), "Received: layer_norm_epsilon=0"),
        (
            dict(layer_norm_epsilon=float("inf")),
            "Received: layer_norm_epsilon=inf",
        ),
        (dict(dropout=float("nan")), "Received: dropout=nan"),
        (dict(num_heads="2"), "Received: num_heads='2'"),
        (dict(top_k=5), r"`num_experts` \(4\). Received: top_k=5"),
        (dict(routing="nope"), "Received: routing='nope'"),
        (
            dict(moe_kwargs={"hidden_dim": 4}),
            "cannot hold `hidden_dim`: pass it as the block's "
            "`intermediate_dim`",
        ),
        (dict(moe_kwargs={"output_dim": 4}), "the block sets it"),
        (dict(moe_kwargs={"capacity": 2}), "`capacity` is not one"),
        (
            dict(moe_kwargs={"capacity_factor": -1}),
            "Received: capacity_factor=-1",
        ),
    ],
)
def test_invalid_arguments_raise_at_construction(kwargs, message):
    arguments = dict(num_heads=2, intermediate_dim=6, num_experts=4)
    with pytest.raises(ValueError, match=message):
        moe.MoETransformerBlock(**{**arguments, **kwargs})


@pytest.mark.parametrize(
    "shape, message",
    [((None, 8), "rank 3"), ((None, SEQ, 7), r"multiple of `num_heads` \(2\)")],
)
def test_invalid_input_shapes_raise_at_build(shape, message):
    block = moe.MoETransformerBlock(2, 6, 4)
    with pytest.raises(ValueError, match=message):
        block.build(shape)


# --- Behaviour ---------------------------------------------------------------


def test_output_shape_and_weights():
    block = make_block()
    x = random_inputs()
    assert tuple(block(x).shape) == x.shape
    assert block.compute_output_shape(x.shape) == x.shape
    paths = {w.path.split("/", 1)[1] for w in block.weights}
    moe_name = block.moe.name
    assert f"{moe_name}/experts/expert_in_kernel" in paths
    assert "self_attention/query/kernel" in paths
    assert "feedforward_layer_norm/gamma" in paths
    expert_kernel = block.moe.expert_in_kernel
    assert tuple(expert_kernel.shape) == (4, WIDTH, 6)


def test_causal_later_tokens_cannot_change_earlier_outputs():
    block = make_block()
    x = random_inputs()
    changed = x.copy()
    changed[:, 4:] = random_inputs((3, SEQ - 4, WIDTH), seed=1)
    before, after = to_numpy(block(x)), to_numpy(block(changed))
    np.testing.assert_allclose(before[:, :4], after[:, :4], atol=1e-5)
    assert not np.allclose(before[:, 4:], after[:, 4:], atol=1e-3)


@pytest.mark.parametrize("via", ["padding_mask", "keras_mask"])
def test_padding_cannot_change_real_positions(via):
    keras.utils.set_random_seed(0)
    tokens = keras.Input((SEQ,), dtype="int32")
    embedding = keras.layers.Embedding(20, WIDTH, mask_zero=True)
    x = embedding(tokens)
    block = moe.MoETransformerBlock(2, 6, 4, top_k=2)
    if via == "padding_mask":
        x = block(x, padding_mask=ops.not_equal(tokens, 0))
    else:
        x = block(x)  # the Embedding's mask
    model = keras.Model(tokens, x)
    ids = np.random.default_rng(0).integers(1, 20, (3, SEQ)).astype("int32")
    ids[0, :3] = 0  # left padding, as moe.lm.text.examples.contexts makes
    ids[1, :1] = 0
    real = ids != 0
    before = to_numpy(model(ids))
    # A different embedding for the padding id: what padded slots hold.
    table = to_numpy(embedding.embeddings).copy()
    table[0] = np.random.default_rng(1).normal(size=WIDTH) * 10
    embedding.embeddings.assign(table)
    after = to_numpy(model(ids))
    np.testing.assert_allclose(before[real], after[real], atol=1e-5)
    assert not np.allclose(before[~real], after[~real], atol=1e-3)


def test_padding_is_not_routed_or_counted_in_losses():
    block = make_block(moe_kwargs={"capacity_factor": 1.0})
    x = random_inputs()
    mask = left_padding_mask([SEQ, 3, 1])
    changed = np.where(mask[..., None], x, random_inputs(seed=2) * 10)
    routing = block.route(x, padding_mask=mask)
    assert not to_numpy(routing["kept"])[~mask].any()
    outputs, losses = [], []
    for inputs in (x, changed):
        outputs.append(
            to_numpy(block(inputs, padding_mask=mask, training=True))
        )
        losses.append([float(to_numpy(v)) for v in block.losses])
    # Padding takes no capacity and does not enter the router losses.
    np.testing.assert_allclose(outputs[0][mask], outputs[1][mask], atol=1e-5)
    assert len(losses[0]) == 2  # load balancing + router z-loss
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_route_describes_what_the_layer_computes():
    # 0.5: 5 slots per expert, fewer than the 24 pairs of 12 real positions.
    block = make_block(moe_kwargs={"capacity_factor": 0.5})
    x = random_inputs()
    mask = left_padding_mask([SEQ, 4, 2])
    routing = {k: to_numpy(v) for k, v in block.route(x, mask).items()}
    assert routing["expert_indices"].shape == (3, SEQ, 2)
    assert routing["kept"][mask].sum() < mask.sum() * 2  # some dropped
    # The attention half, from the block's public sublayers.
    normed = block.self_attention_layer_norm(x)
    attended = x + to_numpy(
        block.self_attention(
            normed,
            normed,
            attention_mask=mask[:, None, :],
            use_causal_mask=True,
        )
    )
    moe_inputs = to_numpy(block.feedforward_layer_norm(attended))
    params = layer_params(block.moe)
    expected = attended.copy()
    for b, s in zip(*np.nonzero(mask)):
        for e, w, kept in zip(
            routing["expert_indices"][b, s],
            routing["expert_weights"][b, s],
            routing["kept"][b, s],
        ):
            if kept:
                expected[b, s] += w * expert_output(params, e, moe_inputs[b, s])
    outputs = to_numpy(block(x, padding_mask=mask))
    np.testing.assert_allclose(outputs[mask], expected[mask], atol=1e-4)


def test_dropout_only_in_training():
    block = make_block(dropout=0.5)
    x = random_inputs()
    np.testing.assert_allclose(
        to_numpy(block(x)), to_numpy(block(x)), atol=1e-6
    )
    assert not np.allclose(
        to_numpy(block(x, training=True)), to_numpy(block(x)), atol=1e-3
    )


# --- Serialization and training ----------------------------------------------


def test_get_config_round_trip():
    block = make_block(
        dropout=0.1,
        activation="gelu",
        layer_norm_epsilon=1e-6,
        moe_kwargs={"capacity_factor": 1.25, "aux_loss_weight": 0.02},
    )
    config = block.get_config()
    assert config["moe_kwargs"] == {
        "capacity_factor": 1.25,
        "aux_loss_weight": 0.02,
    }
    clone = moe.MoETransformerBlock.from_config(config)
    assert clone.get_config() == config
    assert clone.moe.capacity_factor == 1.25


def tiny_language_model(num_layers, seq=SEQ, vocab=12):
    keras.utils.set_random_seed(0)
    tokens = keras.Input((seq,), dtype="int32")
    x = keras.layers.Embedding(vocab, WIDTH, mask_zero=True)(tokens)
    for i in range(num_layers):
        x = moe.MoETransformerBlock(
            2, 6, 4, top_k=2, moe_kwargs={"seed": i}, name=f"block_{i}"
        )(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(vocab, activation="softmax")(x)
    return keras.Model(tokens, outputs)


def test_keras_round_trip(tmp_path):
    model = tiny_language_model(num_layers=1)
    ids = np.random.default_rng(0).integers(0, 12, (4, SEQ)).astype("int32")
    expected = to_numpy(model(ids))
    path = tmp_path / "model.keras"
    model.save(path)
    for kwargs in ({}, {"custom_objects": moe.custom_objects()}):
        reloaded = keras.saving.load_model(path, **kwargs)  # safe mode
        np.testing.assert_allclose(to_numpy(reloaded(ids)), expected, atol=1e-6)
        block = reloaded.get_layer("block_0")
        assert isinstance(block, moe.MoETransformerBlock)
        assert block.moe.name == "block_0_moe"


def test_training_decreases_loss():
    # Predict the first token of the sequence: needs attention to reach
    # back to position 0 from everywhere.
    model = tiny_language_model(num_layers=1)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 12, (128, SEQ)).astype("int32")
    model.compile(
        keras.optimizers.Adam(0.03), "sparse_categorical_crossentropy"
    )
    history = model.fit(ids, ids[:, 0], batch_size=32, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize(
    "moe_kwargs",
    [{"capacity_factor": 2.0}, {"num_shared_experts": 1, "gated": True}],
)
def test_layer_contract(tmp_path, moe_kwargs):
    check_layer_contract(
        lambda: moe.MoETransformerBlock(
            2, 6, 4, top_k=2, moe_kwargs=moe_kwargs, name="block"
        ),
        random_inputs(),
        call_args={"padding_mask": left_padding_mask([SEQ, 3, 1])},
        mask="padding_mask",
        tmp_path=tmp_path,
    )
