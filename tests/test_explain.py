"""Routing explanations (`moe.lm.model.explain`, `NextWordPredictor.explain`,
`serve.py --explain`) on the pooled and the Transformer models."""

import keras
import numpy as np
import pytest
from conftest import load_script

from moe.lm.model import architectures
from moe.lm.model.explain import ExplainedModel, experts_by_row
from moe.lm.serving.predictor import NextWordPredictor
from moe.lm.text.tokenizer import Tokenizer

MAX_SEQ_LEN = 4
CONTEXTS = np.array(
    [[0, 0, 2, 3], [4, 5, 6, 7], [0, 0, 0, 9], [3, 3, 3, 3], [0, 8, 1, 2]],
    np.int32,
)
WORDS = [f"w{i}" for i in range(10)]


def transformer(routing="top_k"):
    return architectures.build_transformer_model(
        vocab_size=12, max_seq_len=MAX_SEQ_LEN, embed_dim=8, num_layers=2,
        num_heads=2, num_experts=4, hidden_dim=8, top_k=2 if routing ==
        "top_k" else None, routing=routing, seed=3,
    )  # fmt: skip


def pooled(routing="top_k"):
    return architectures.build_model(
        vocab_size=12, max_seq_len=MAX_SEQ_LEN, embed_dim=8, num_experts=4,
        hidden_dim=8, routing=routing, seed=3,
    )  # fmt: skip


def reference_routes(model, contexts):
    """Each block's `route()` on its inputs, one context at a time, at the
    last position (contexts are right-aligned)."""
    routes = []
    for block in (la for la in model.layers if la.name.startswith("block")):
        inputs = keras.Model(model.input, block.input[0])  # (x, mask)
        rows = []
        for context in contexts:
            x = inputs(context[None])
            route = block.route(x, padding_mask=context[None] != 0)
            rows.append({k: np.asarray(v)[0, -1] for k, v in route.items()})
        routes.append({k: np.stack([r[k] for r in rows]) for k in rows[0]})
    return routes


def test_transformer_explanation_is_each_blocks_route_at_the_last_word():
    model = transformer()
    probs, routes = ExplainedModel(model)(CONTEXTS)
    np.testing.assert_allclose(probs, model(CONTEXTS), atol=1e-6)
    expected = reference_routes(model, CONTEXTS)
    assert len(routes) == 2
    for route, want in zip(routes, expected):
        np.testing.assert_array_equal(route["expert_indices"],
                                      want["expert_indices"])  # fmt: skip
        np.testing.assert_allclose(
            route["expert_weights"], want["expert_weights"], rtol=1e-5
        )
        np.testing.assert_array_equal(route["kept"], want["kept"])
    # The last word's routing in block 1 depends on earlier words
    # (attention), not on padding: change an earlier word, it changes.
    changed = CONTEXTS.copy()
    changed[1, 0] = 9
    _, routes_changed = ExplainedModel(model)(changed)
    assert not np.allclose(
        routes[1]["expert_weights"][1], routes_changed[1]["expert_weights"][1]
    )
    np.testing.assert_allclose(
        routes[1]["expert_weights"][0],
        routes_changed[1]["expert_weights"][0],
        rtol=1e-5,
    )


def test_all_positions_leave_padding_out():
    model = transformer()
    _, routes = ExplainedModel(model, positions="all")(CONTEXTS)
    kept = np.asarray(routes[0]["kept"])  # (batch, seq, k)
    assert kept.shape == (len(CONTEXTS), MAX_SEQ_LEN, 2)
    np.testing.assert_array_equal(kept.any(-1), CONTEXTS != 0)


@pytest.mark.parametrize("routing", ["top_k", "switch", "soft", "hash"])
def test_pooled_explanation_is_the_moe_layers_route(routing):
    model = pooled(routing)
    _, routes = ExplainedModel(model)(CONTEXTS)
    layer = model.get_layer("moe")
    if routing == "hash":  # called with (pooled, routing_key=...)
        x, key = keras.Model(model.input, layer.input)(CONTEXTS)
        want = layer.route(x, routing_key=key)
    else:
        want = layer.route(keras.Model(model.input, layer.input)(CONTEXTS))
    for key in ("expert_indices", "expert_weights", "kept"):
        np.testing.assert_allclose(routes[0][key], want[key], rtol=1e-6)


def test_explained_model_needs_a_routed_layer():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    with pytest.raises(ValueError, match="route"):
        ExplainedModel(model)
    with pytest.raises(ValueError, match="positions"):
        ExplainedModel(pooled(), positions="first")


class _ScaledRouter(keras.layers.Layer):
    def call(self, inputs, scale=None):
        return inputs * scale

    def route(self, inputs, mask=None, routing_key=None):
        raise AssertionError("never reached")


def test_a_call_tensor_that_is_no_route_argument_is_refused():
    # Besides its input, route() takes a bool mask and an integer key: a
    # float tensor the layer was called with has no place there.
    inputs, scale = keras.Input((3,)), keras.Input((3,))
    model = keras.Model(
        [inputs, scale], _ScaledRouter(name="scaled")(inputs, scale=scale)
    )
    with pytest.raises(ValueError, match="cannot explain layer 'scaled'"):
        ExplainedModel(model)


def test_experts_by_row_keeps_kept_pairs_heaviest_first():
    route = {
        "expert_indices": np.array([[3, 1, 0]]),
        "expert_weights": np.array([[0.2, 0.5, 0.3]]),
        "kept": np.array([[True, True, False]]),
    }
    assert experts_by_row(route, 0) == [[1, 0.5], [3, 0.2]]


def test_predictor_explain_per_layer_for_a_transformer():
    model = transformer()
    predictor = NextWordPredictor(model, Tokenizer(WORDS), MAX_SEQ_LEN)
    texts = ["w1 w2", "w3 w4 w5 w6 w7", "unknown"]
    results = predictor.explain(texts, top=3)
    probs = predictor.probabilities(texts)
    for result, row in zip(results, probs):
        assert set(result) == {"word", "top", "experts_by_layer"}
        assert list(result["experts_by_layer"]) == ["block_0", "block_1"]
        assert result["word"] == result["top"][0][0]
        for word, p in result["top"]:
            assert p == pytest.approx(row[predictor.tokenizer.word_id(word)])
        for pairs in result["experts_by_layer"].values():
            assert len(pairs) == 2
            assert sum(w for _, w in pairs) == pytest.approx(1.0, rel=1e-5)


def test_cli_explain(lm_trained, lm_predictor, capsys):
    serve = load_script("serve.py")

    texts = ["how are", "the cat"]
    assert serve.main(["--explain", "--model-dir", str(lm_trained[0]),
                       *texts]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    for line, result in zip(lines, lm_predictor.explain(texts), strict=True):
        word, experts = line.split(" | experts: ")
        assert word == result["word"]
        assert experts == ", ".join(
            f"{e} {w:.3f}" for e, w in result["experts"]
        )
    assert serve.main(["--explain", "--top", "2", "--model-dir",
                       str(lm_trained[0]), "how are"]) == 0  # fmt: skip
    (line,) = capsys.readouterr().out.splitlines()
    assert len(line.split(" | ")[0].split("  ")) == 2
