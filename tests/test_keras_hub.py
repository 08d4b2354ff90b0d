"""`moe.keras_hub`: keras-hub's MoE models, sparse, against keras-hub itself.

Tiny backbones of every family are built from their constructors and every
variable is re-drawn from a seeded distribution (some keras-hub banks start
at zero, which would make parity trivial). The sparsified model must
compute what keras-hub computes: each block to 1e-5, the backbone to 1e-4,
and greedy `generate()` the same token ids. test_backends.py reruns two
families on JAX.
"""

import keras
import numpy as np
import pytest
from keras import ops

keras_hub = pytest.importorskip("keras_hub")
moe_keras_hub = pytest.importorskip("moe.keras_hub")

BACKEND = keras.backend.backend()
COMMON = dict(
    vocabulary_size=40, num_layers=2, num_query_heads=4, hidden_dim=16,
    num_key_value_heads=2,
)  # fmt: skip
BACKBONES = {
    "mixtral": lambda: keras_hub.models.MixtralBackbone(
        intermediate_dim=24, num_experts=4, top_k=2, **COMMON
    ),
    "qwen3_moe": lambda: keras_hub.models.Qwen3MoeBackbone(
        intermediate_dim=24,
        moe_intermediate_dim=8,
        num_experts=8,
        top_k=2,
        head_dim=4,
        norm_top_k_prob=True,
        **COMMON,
    ),  # fmt: skip
    "qwen_moe": lambda: keras_hub.models.QwenMoeBackbone(
        intermediate_dim=24,
        moe_intermediate_dim=8,
        num_experts=8,
        top_k=3,
        shared_expert_intermediate_dim=12,
        **COMMON,
    ),  # fmt: skip
    "gpt_oss": lambda: keras_hub.models.GptOssBackbone(
        intermediate_dim=8, num_experts=4, top_k=2, head_dim=4, **COMMON
    ),
    "qwen3_5_moe": lambda: keras_hub.models.Qwen3_5MoeBackbone(
        head_dim=4,
        moe_intermediate_dim=8,
        shared_expert_intermediate_size=12,
        num_experts=8,
        top_k=2,
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        linear_key_head_dim=4,
        linear_value_head_dim=4,
        **COMMON,
    ),  # fmt: skip
}
CAUSAL_LMS = {
    "mixtral": keras_hub.models.MixtralCausalLM,
    "qwen3_moe": keras_hub.models.Qwen3MoeCausalLM,
    "qwen_moe": keras_hub.models.QwenMoeCausalLM,
    "gpt_oss": keras_hub.models.GptOssCausalLM,
}


def redraw(model, seed=0):
    """Every variable from a seeded normal distribution."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        scale = 1.0 if "layernorm" in variable.path else 0.3
        value = (
            1.0 + 0.1 * rng.normal(size=variable.shape)
            if scale == 1.0
            else (scale * rng.normal(size=variable.shape))
        )
        variable.assign(value.astype(variable.dtype))


def tiny_backbone(family, seed=0):
    keras.utils.set_random_seed(seed)
    backbone = BACKBONES[family]()
    redraw(backbone, seed)
    return backbone


def inputs(batch=2, length=7, padded=2, seed=1):
    rng = np.random.default_rng(seed)
    padding = np.ones((batch, length), "int32")
    padding[-1, length - padded :] = 0
    return {
        "token_ids": rng.integers(1, 40, (batch, length)).astype("int32"),
        "padding_mask": padding,
    }


def to_numpy(x):
    return ops.convert_to_numpy(x)


@pytest.mark.parametrize("family", sorted(BACKBONES))
def test_each_block_and_the_backbone_equal_keras_hub(family):
    backbone = tiny_backbone(family)
    x = inputs()
    blocks = [
        (owner, attribute, block)
        for owner, attribute, block in moe_keras_hub._blocks_of(
            backbone, tuple(moe_keras_hub._FAMILY_OF)
        )
    ]
    assert len(blocks) == COMMON["num_layers"]
    hidden = np.random.default_rng(2).normal(size=(2, 5, 16)).astype("float32")
    dense_blocks = [to_numpy(block(hidden)[0]) for _, _, block in blocks]
    before = to_numpy(backbone(x))

    assert moe_keras_hub.sparsify(backbone) is backbone
    sparse = moe_keras_hub.sparse_blocks(backbone)
    assert [type(b).__name__ for _, _, b in sparse] == [
        f"Sparse{type(block).__name__}" for _, _, block in blocks
    ]
    for (_, _, block), expected in zip(sparse, dense_blocks):
        out, logits = block(hidden)
        np.testing.assert_allclose(to_numpy(out), expected, atol=1e-5)
        assert logits is None  # the decoders do not ask for them
    real = x["padding_mask"].astype(bool)
    after = to_numpy(backbone(x))
    np.testing.assert_allclose(after[real], before[real], atol=1e-4)
    # keras-hub's dense banks are gone: only the sparse layers hold experts.
    assert not any("expert_feedforward" in v.path for v in backbone.weights)


def test_a_non_selected_expert_changes_nothing():
    backbone = tiny_backbone("mixtral")
    moe_keras_hub.sparsify(backbone)
    _, _, block = moe_keras_hub.sparse_blocks(backbone)[0]
    hidden = np.random.default_rng(3).normal(size=(1, 1, 16)).astype("float32")
    route = block.moe.route(hidden)
    chosen = set(to_numpy(route["expert_indices"]).ravel().tolist())
    (unused,) = [e for e in range(4) if e not in chosen][:1]
    before = to_numpy(block(hidden)[0])
    kernel = block.moe.experts.expert_out_kernel
    value = to_numpy(kernel)
    value[unused] += 100.0
    kernel.assign(value)
    np.testing.assert_array_equal(to_numpy(block(hidden)[0]), before)


@pytest.mark.parametrize("family", sorted(CAUSAL_LMS))
def test_greedy_generate_gives_the_same_tokens(family):
    # Two identical models, each generating once: keras-hub's own generate
    # can differ from its first answer once its traced function is remade,
    # so the dense answer comes from a model of its own.
    prompt = inputs(batch=2, length=10, padded=6)
    prompt["padding_mask"][0, 4:] = 0  # both prompts 4 tokens long
    dense = CAUSAL_LMS[family](tiny_backbone(family), preprocessor=None)
    dense.compile(sampler="greedy")
    expected = to_numpy(
        dense.generate(prompt, stop_token_ids=None)["token_ids"]
    )
    sparse = CAUSAL_LMS[family](tiny_backbone(family), preprocessor=None)
    sparse.compile(sampler="greedy")
    moe_keras_hub.sparsify(sparse)
    assert isinstance(sparse.backbone, moe_keras_hub._SparseModel)
    got = to_numpy(sparse.generate(prompt, stop_token_ids=None)["token_ids"])
    np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(got[:, 4:], prompt["token_ids"][:, 4:])


def test_keras_file_round_trip_and_the_way_back(tmp_path):
    backbone = tiny_backbone("qwen_moe")
    x = inputs()
    real = x["padding_mask"].astype(bool)
    original = to_numpy(backbone(x))
    causal_lm = keras_hub.models.QwenMoeCausalLM(backbone, preprocessor=None)
    moe_keras_hub.sparsify(causal_lm)
    path = tmp_path / "sparse.keras"
    causal_lm.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.backbone).__name__ == "SparseQwenMoeBackbone"
    np.testing.assert_array_equal(
        to_numpy(loaded.backbone(x)), to_numpy(causal_lm.backbone(x))
    )
    # Fine-tuned weights go back into keras-hub's own blocks.
    _, _, block = moe_keras_hub.sparse_blocks(loaded)[0]
    tuned = to_numpy(block.moe.experts.expert_in_kernel) * 1.5
    block.moe.experts.expert_in_kernel.assign(tuned)
    tuned_out = to_numpy(loaded.backbone(x))
    moe_keras_hub.unsparsify(loaded)
    assert type(loaded.backbone) is keras_hub.models.QwenMoeBackbone
    assert not moe_keras_hub.sparse_blocks(loaded)
    np.testing.assert_allclose(
        to_numpy(loaded.backbone(x))[real], tuned_out[real], atol=1e-4
    )
    preset = tmp_path / "preset"
    loaded.backbone.save_to_preset(str(preset))
    plain = keras_hub.models.Backbone.from_preset(str(preset))
    assert type(plain) is keras_hub.models.QwenMoeBackbone
    np.testing.assert_allclose(
        to_numpy(plain(x))[real], tuned_out[real], atol=1e-4
    )
    assert not np.allclose(tuned_out[real], original[real], atol=1e-3)


def test_int8_quantizes_the_experts_and_reloads(tmp_path):
    backbone = tiny_backbone("mixtral")
    x = inputs()
    moe_keras_hub.sparsify(backbone)
    _, _, block = moe_keras_hub.sparse_blocks(backbone)[0]
    hidden = np.random.default_rng(4).normal(size=(2, 5, 16)).astype("float32")
    block_before = to_numpy(block(hidden)[0])
    backbone.quantize("int8")
    kernel = block.moe.experts.expert_in_kernel
    assert keras.backend.standardize_dtype(kernel.dtype) == "int8"
    router = block.moe.gating_network.router_kernel
    assert keras.backend.standardize_dtype(router.dtype) == "float32"
    block_after = to_numpy(block(hidden)[0])
    error = np.linalg.norm(block_after - block_before)
    assert 0 < error < 0.02 * np.linalg.norm(block_before)
    after = to_numpy(backbone(x))
    path = tmp_path / "int8.keras"
    backbone.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(to_numpy(loaded(x)), after, atol=1e-6)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_the_balancing_loss_counts_real_tokens_only(family):
    backbone = tiny_backbone(family)
    moe_keras_hub.sparsify(backbone)
    short = inputs(batch=1, length=5, padded=0)
    padded = {
        "token_ids": np.concatenate(
            [short["token_ids"], np.full((1, 3), 7, "int32")], axis=1
        ),
        "padding_mask": np.concatenate(
            [short["padding_mask"], np.zeros((1, 3), "int32")], axis=1
        ),
    }

    def balancing_loss(x):
        backbone(x, training=True)
        return sum(float(to_numpy(loss)) for loss in backbone.losses)

    expected = balancing_loss(short)
    assert expected > 0
    np.testing.assert_allclose(balancing_loss(padded), expected, rtol=1e-5)


def test_fit_with_frozen_experts_trains_the_rest_only():
    causal_lm = keras_hub.models.MixtralCausalLM(
        tiny_backbone("mixtral"), preprocessor=None
    )
    moe_keras_hub.sparsify(causal_lm)
    experts = [
        b.moe.experts for _, _, b in moe_keras_hub.sparse_blocks(causal_lm)
    ]
    for layer in experts:
        layer.trainable = False
    frozen = [to_numpy(v) for layer in experts for v in layer.weights]
    router = [b.moe.gating_network.router_kernel for _, _, b in
              moe_keras_hub.sparse_blocks(causal_lm)]  # fmt: skip
    router_before = [to_numpy(v) for v in router]
    x = inputs(batch=4, length=6, padded=2)
    y = np.roll(x["token_ids"], -1, axis=1)
    causal_lm.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = causal_lm.fit(
        x, y, sample_weight=x["padding_mask"], epochs=2, verbose=0
    )
    assert np.isfinite(history.history["loss"]).all()
    for before, variable in zip(
        frozen, [v for layer in experts for v in layer.weights]
    ):
        np.testing.assert_array_equal(to_numpy(variable), before)
    assert any(
        not np.array_equal(to_numpy(v), b)
        for v, b in zip(router, router_before)
    )


def test_a_model_without_keras_hub_moe_blocks_is_refused():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="holds none"):
        moe_keras_hub.sparsify(model)


def test_lora_on_the_experts_fine_tunes_merges_and_goes_back(tmp_path):
    backbone = tiny_backbone("mixtral")
    causal_lm = keras_hub.models.MixtralCausalLM(backbone, preprocessor=None)
    moe_keras_hub.sparsify(causal_lm)
    x = inputs(batch=4, length=6, padded=2)
    real = x["padding_mask"].astype(bool)
    before = to_numpy(backbone(x))
    # keras-hub's own call: every layer frozen, LoRA on the layers named
    # "experts" (each sparse block's `moe.experts`).
    backbone.enable_lora(2, target_layer_names=["experts"])
    np.testing.assert_allclose(to_numpy(backbone(x)), before, atol=1e-6)
    adapters = [v for v in causal_lm.weights if "lora" in v.path]
    assert {v.path for v in causal_lm.trainable_weights} == {
        v.path for v in adapters
    }
    # Per expert, A (16, 2) and B (2, 24) for the in and gate kernels,
    # A (24, 2) and B (2, 16) for the out kernel: 4 * 3 * 80 per layer.
    trainable = sum(int(np.prod(v.shape)) for v in adapters)
    assert trainable == COMMON["num_layers"] * 4 * 3 * 80
    total = sum(int(np.prod(v.shape)) for v in causal_lm.weights)
    assert trainable < 0.2 * total
    frozen = {
        v.path: to_numpy(v) for v in causal_lm.weights if "lora" not in v.path
    }
    y = np.roll(x["token_ids"], -1, axis=1)
    causal_lm.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    causal_lm.fit(x, y, sample_weight=x["padding_mask"], epochs=3, verbose=0)
    for variable in causal_lm.weights:
        if variable.path in frozen:
            np.testing.assert_array_equal(
                to_numpy(variable), frozen[variable.path]
            )
    adapted = to_numpy(backbone(x))
    assert not np.allclose(adapted[real], before[real], atol=1e-3)
    with pytest.raises(ValueError, match="merge_lora"):
        moe_keras_hub.unsparsify(causal_lm)
    # Saved: the merged kernels; the file loads sparse, without adapters.
    path = tmp_path / "lora.keras"
    causal_lm.save(path)
    loaded = keras.saving.load_model(path)
    assert not any("lora" in v.path for v in loaded.weights)
    np.testing.assert_allclose(to_numpy(loaded.backbone(x)), adapted, atol=1e-5)
    # Merged in place, then back to keras-hub's own blocks.
    moe_keras_hub.merge_lora(causal_lm)
    assert not any("lora" in v.path for v in causal_lm.weights)
    np.testing.assert_allclose(to_numpy(backbone(x)), adapted, atol=1e-5)
    with pytest.raises(ValueError, match="no LoRA adapters|holds LoRA"):
        moe_keras_hub.merge_lora(causal_lm)
    moe_keras_hub.unsparsify(causal_lm)
    assert type(causal_lm.backbone) is keras_hub.models.MixtralBackbone
    np.testing.assert_allclose(
        to_numpy(causal_lm.backbone(x))[real], adapted[real], atol=1e-4
    )


def tiny_tokenizer():
    """A byte-pair tokenizer of 39 ids, built in memory: the special
    tokens, single characters and a few merged words."""
    vocabulary = {"<|im_end|>": 0, "<|endoftext|>": 1}
    for piece in [*"abcdefghijklmnopqrstuvwxyz.", "Ġ"]:
        vocabulary[piece] = len(vocabulary)
    merges = ["t h", "th e", "Ġ the", "Ġ f", "Ġf o", "Ġfo x", "Ġ d", "Ġd o",
              "Ġdo g"]  # fmt: skip
    for merge in merges:
        vocabulary[merge.replace(" ", "")] = len(vocabulary)
    return keras_hub.models.Qwen3MoeTokenizer(
        vocabulary=vocabulary, merges=merges
    )


TEXTS = [
    "the quick fox jumps over the lazy dog.",
    "the dog sleeps. the fox runs off.",
    "a fox, a dog",
]


def test_expert_usage_over_a_text_equals_a_per_token_reference(monkeypatch):
    tokenizer = tiny_tokenizer()
    assert tokenizer.vocabulary_size() <= COMMON["vocabulary_size"]
    # The reference: keras-hub's own model, the inputs of each of its MoE
    # blocks recorded, routed token by token in NumPy (softmax, top 2).
    block_class = moe_keras_hub._block_class(
        moe_keras_hub.FAMILIES["qwen3_moe"]
    )
    seen = []
    original_call = block_class.call

    def recording_call(self, hidden_states, *args, **kwargs):
        seen.append((self, to_numpy(hidden_states)))
        return original_call(self, hidden_states, *args, **kwargs)

    dense = tiny_backbone("qwen3_moe")
    monkeypatch.setattr(block_class, "call", recording_call)
    counts = {}  # (block index, expert) -> {token id: count}
    for text in TEXTS:
        ids = np.asarray(tokenizer(text), "int32")
        seen.clear()
        dense({"token_ids": ids[None], "padding_mask": np.ones((1, len(ids)))})
        assert len(seen) == COMMON["num_layers"]
        for layer, (block, hidden) in enumerate(seen):
            kernel = to_numpy(block._sparse_feedforward_gate_dense.kernel)
            for token, h in zip(ids, hidden[0]):
                logits = h.astype("float64") @ kernel
                for expert in np.argsort(-logits)[: block.top_k]:
                    per_token = counts.setdefault((layer, expert), {})
                    per_token[token] = per_token.get(token, 0) + 1
    monkeypatch.undo()

    sparse = tiny_backbone("qwen3_moe")
    causal_lm = keras_hub.models.Qwen3MoeCausalLM(
        sparse,
        preprocessor=keras_hub.models.Qwen3MoeCausalLMPreprocessor(tokenizer),
    )
    moe_keras_hub.sparsify(causal_lm)
    usage = moe_keras_hub.expert_usage(causal_lm, TEXTS, top_tokens=3)
    assert list(usage) == ["transformer_layer_0", "transformer_layer_1"]
    pairs = sum(len(tokenizer(text)) for text in TEXTS) * 2  # top 2
    for layer, experts in enumerate(usage.values()):
        assert [info["expert"] for info in experts] == list(range(8))
        np.testing.assert_allclose(
            sum(info["load"] for info in experts), 1.0, rtol=1e-12
        )
        for info in experts:
            want = counts.get((layer, info["expert"]), {})
            assert info["tokens_taken"] == sum(want.values())
            assert info["load"] == sum(want.values()) / pairs
            best = sorted(want.items(), key=lambda item: (-item[1], item[0]))
            assert info["top_tokens"] == [
                [tokenizer.detokenize([int(t)]), n, n / sum(want.values())]
                for t, n in best[:3]
            ]
    listed = [len(info["top_tokens"]) for info in usage["transformer_layer_0"]]
    assert max(listed) == 3
    with pytest.raises(ValueError, match="pass `tokenizer=`"):
        moe_keras_hub.expert_usage(sparse, TEXTS)
    with pytest.raises(ValueError, match="sparsify"):
        moe_keras_hub.expert_usage(tiny_backbone("mixtral"), TEXTS, tokenizer)


def test_gemma4_moe_path_is_an_moe_layer_with_folded_scales():
    # Not sparsified yet (its router and expert bank are two sublayers of
    # the decoder block). The maths, at inference, is a plain MoELayer on
    # the expert bank's input `n(x) * w` (`pre_ffw_norm_moe`): the router
    # reads `n(x) * d**-0.5 * p`, so its kernel folds to
    # `diag(d**-0.5 * p / w) @ P`, and the per-expert output scale folds
    # into each expert's out kernel.
    gemma4 = pytest.importorskip("keras_hub.src.models.gemma4.gemma4_moe")
    from keras_hub.src.models.gemma4.gemma4_layers import RMSNormalization

    from moe import MoELayer

    experts, d, hidden, k = 8, 16, 8, 2
    keras.utils.set_random_seed(0)
    router = gemma4.Gemma4Router(experts, k, layer_norm_epsilon=1e-6)
    bank = gemma4.Gemma4MoEBlock(experts, d, hidden)
    norm = RMSNormalization(epsilon=1e-6)
    for layer in (router, bank, norm):
        layer.build((None, d))
        redraw(layer)
    rng = np.random.default_rng(2)
    for scale in (norm.scale, router.per_dim_scale, bank.per_expert_scale):
        scale.assign(1.0 + 0.2 * rng.normal(size=scale.shape))
    x = np.random.default_rng(1).normal(size=(12, d)).astype("float32")
    want = to_numpy(bank(norm(x), router(x)))

    layer = MoELayer(
        experts,
        hidden,
        top_k=k,
        gated=True,
        use_bias=False,
        normalize_top_k=True,
        activation=lambda t: keras.activations.gelu(t, approximate=True),
    )
    layer.build((None, d))
    w = to_numpy(norm.scale)
    p = to_numpy(router.per_dim_scale)
    layer.gating_network.router_kernel.assign(
        (d**-0.5 * p / w)[:, None] * to_numpy(router.proj.kernel)
    )
    layer.experts.expert_gate_kernel.assign(to_numpy(bank.gate_proj))
    layer.experts.expert_in_kernel.assign(to_numpy(bank.up_proj))
    scale = to_numpy(bank.per_expert_scale)[:, None, None]
    layer.experts.expert_out_kernel.assign(to_numpy(bank.down_proj) * scale)
    np.testing.assert_allclose(to_numpy(layer(norm(x))), want, atol=1e-5)
