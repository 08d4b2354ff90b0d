"""Every token-choice dispatch layout against a NumPy per-token loop.

The layouts (`moe.dispatch`) must compute one function: each routed
(token, expert) pair within capacity adds `weight * expert(token)`, nothing
else. Outputs and gradients (tokens, combine weights, every expert weight)
are compared with a plain loop; the other backends rerun this file in a
subprocess.
"""

import keras
import numpy as np
import pytest
from keras import ops

import moe
from moe import dispatch

LAYOUTS = ("dynamic", "static", "grouped", "gather")
NUM_TOKENS, DIM, HIDDEN, NUM_EXPERTS, TOP_K = 24, 8, 12, 4, 2


def _routing(rng, unused_expert=None, masked=True):
    experts = [e for e in range(NUM_EXPERTS) if e != unused_expert]
    indices = np.stack(
        [rng.choice(experts, TOP_K, replace=False) for _ in range(NUM_TOKENS)]
    ).astype("int32")
    weights = rng.uniform(0.1, 1.0, (NUM_TOKENS, TOP_K)).astype("float32")
    mask = rng.uniform(size=NUM_TOKENS) > 0.2 if masked else None
    return indices, weights, mask


def _kept(indices, mask, capacity_factor):
    # GShard's priority: first choices before second, earlier tokens first.
    kept = np.ones(indices.shape, bool) if mask is None else mask[:, None]
    kept = np.broadcast_to(kept, indices.shape).copy()
    if capacity_factor is None:
        return kept
    capacity = dispatch.expert_capacity(
        NUM_TOKENS, TOP_K, NUM_EXPERTS, capacity_factor
    )
    used = np.zeros(NUM_EXPERTS, int)
    for slot in range(TOP_K):
        for t in range(NUM_TOKENS):
            if kept[t, slot]:
                e = indices[t, slot]
                kept[t, slot] = used[e] < capacity
                used[e] += 1
    return kept


def _reference(x, indices, weights, kept, params, upstream):
    """Outputs and gradients of `sum(outputs * upstream)`, token by token."""
    w1, b1, w2, b2 = params
    out = np.zeros((NUM_TOKENS, DIM))
    grads = [np.zeros_like(x), np.zeros_like(weights)]
    grads += [np.zeros_like(p) for p in params]
    for t in range(NUM_TOKENS):
        for j in range(TOP_K):
            if not kept[t, j]:
                continue
            e = indices[t, j]
            pre = x[t] @ w1[e] + b1[e]
            hidden = np.maximum(pre, 0)
            y = hidden @ w2[e] + b2[e]
            out[t] += weights[t, j] * y
            g = weights[t, j] * upstream[t]  # d loss / d y
            grads[1][t, j] += y @ upstream[t]
            grads[4][e] += np.outer(hidden, g)
            grads[5][e] += g
            dpre = (g @ w2[e].T) * (pre > 0)
            grads[2][e] += np.outer(x[t], dpre)
            grads[3][e] += dpre
            grads[0][t] += dpre @ w1[e].T
    return out, grads


def _value_and_grads(fn, args):
    """`fn(*args)` and the gradients of `sum(fn(*args))` on any backend."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        args = [tf.constant(a) for a in args]
        with tf.GradientTape() as tape:
            tape.watch(args)
            out = fn(*args)
            loss = tf.reduce_sum(out)
        grads = tape.gradient(loss, args)
        return out.numpy(), [tf.convert_to_tensor(g).numpy() for g in grads]
    if backend == "jax":
        import jax

        # Under `jit`, as training runs: every shape must be static.
        out = jax.jit(fn)(*args)
        loss = jax.jit(jax.grad(lambda *a: fn(*a).sum(), range(len(args))))
        grads = loss(*args)
        return np.asarray(out), [np.asarray(g) for g in grads]
    import torch

    args = [torch.tensor(a, requires_grad=True) for a in args]
    out = fn(*args)
    out.sum().backward()
    return out.detach().numpy(), [a.grad.numpy() for a in args]


def _experts():
    layer = moe.Experts(NUM_EXPERTS, HIDDEN, bias_initializer="he_normal")
    layer.build((None, DIM))
    return layer


def _dispatch(layer, indices, mask, layout, capacity_factor, upstream):
    def fn(x, weights, *params):
        out, _ = dispatch.sparse_dispatch(
            x,
            ops.convert_to_tensor(indices),
            weights,
            None if mask is None else ops.convert_to_tensor(mask),
            list(params),
            layer.expert_fn,
            capacity_factor=capacity_factor,
            mode=layout,
        )
        return out * ops.convert_to_tensor(upstream)

    return fn


@pytest.mark.parametrize("capacity_factor", [None, 0.6])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_per_token_loop(layout, capacity_factor):
    if layout == "dynamic" and keras.backend.backend() == "jax":
        pytest.skip("JAX differentiates by tracing: static shapes only")
    rng = np.random.default_rng(3)
    layer = _experts()
    params = [ops.convert_to_numpy(p) for p in layer.stacked_weights]
    x = rng.normal(size=(NUM_TOKENS, DIM)).astype("float32")
    indices, weights, mask = _routing(rng)
    upstream = rng.normal(size=(NUM_TOKENS, DIM)).astype("float32")
    kept = _kept(indices, mask, capacity_factor)
    if capacity_factor is not None:
        assert 0 < kept.sum() < (mask[:, None] & np.ones_like(kept)).sum()
    fn = _dispatch(layer, indices, mask, layout, capacity_factor, upstream)
    out, grads = _value_and_grads(fn, [x, weights, *params])
    ref_out, ref_grads = _reference(x, indices, weights, kept, params, upstream)
    np.testing.assert_allclose(out, ref_out * upstream, rtol=1e-4, atol=1e-5)
    names = ["tokens", "weights", "in_kernel", "in_bias", "out_kernel"]
    for name, grad, ref in zip(names + ["out_bias"], grads, ref_grads):
        np.testing.assert_allclose(
            grad, ref, rtol=1e-4, atol=1e-5, err_msg=name
        )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unselected_expert_changes_nothing(layout):
    rng = np.random.default_rng(5)
    layer = _experts()
    params = [ops.convert_to_numpy(p) for p in layer.stacked_weights]
    x = rng.normal(size=(NUM_TOKENS, DIM)).astype("float32")
    indices, weights, _ = _routing(rng, unused_expert=1, masked=False)
    upstream = np.ones((NUM_TOKENS, DIM), "float32")
    fn = _dispatch(layer, indices, None, layout, None, upstream)
    out = ops.convert_to_numpy(fn(x, weights, *params))
    perturbed = [p.copy() for p in params]
    for p in perturbed:
        p[1] += 1e3
    out_perturbed = ops.convert_to_numpy(fn(x, weights, *perturbed))
    np.testing.assert_array_equal(out, out_perturbed)


@pytest.mark.parametrize("num_tokens", [1, 3])
@pytest.mark.parametrize("capacity_factor", [None, 0.6])
def test_few_tokens_every_layout_agrees(num_tokens, capacity_factor):
    # Decode-sized calls: the gather layout `"auto"` picks there against
    # every other layout, outputs and gradients.
    rng = np.random.default_rng(11)
    layer = _experts()
    params = [ops.convert_to_numpy(p) for p in layer.stacked_weights]
    x = rng.normal(size=(num_tokens, DIM)).astype("float32")
    indices = np.stack(
        [rng.choice(NUM_EXPERTS, TOP_K, replace=False) for _ in x]
    ).astype("int32")
    weights = rng.uniform(0.1, 1.0, (num_tokens, TOP_K)).astype("float32")
    mask = np.arange(num_tokens) != 1  # token 1, if any, is masked
    upstream = rng.normal(size=(num_tokens, DIM)).astype("float32")
    results = {}
    for layout in ("auto",) + LAYOUTS:
        if layout == "dynamic" and keras.backend.backend() == "jax":
            continue
        fn = _dispatch(layer, indices, mask, layout, capacity_factor, upstream)
        results[layout] = _value_and_grads(fn, [x, weights, *params])
    out, grads = results.pop("gather")
    for layout, (other_out, other_grads) in results.items():
        np.testing.assert_allclose(out, other_out, atol=1e-5, err_msg=layout)
        for grad, other in zip(grads, other_grads):
            np.testing.assert_allclose(grad, other, atol=1e-5, err_msg=layout)


def test_auto_picks_gather_for_few_tokens_under_a_compiler_only():
    def layouts(num_tokens, mode="auto"):
        # (eager, traced): the layout `choose_layout` picks for the call.
        tokens = np.zeros((num_tokens, DIM), "float32")

        def choose(t):
            return dispatch.choose_layout(t, TOP_K, NUM_EXPERTS, mode)

        backend = keras.backend.backend()
        if backend == "tensorflow":
            import tensorflow as tf

            traced = []
            tf.function(lambda t: traced.append(choose(t)), jit_compile=True)(
                tokens
            )
            return choose(tf.constant(tokens)), traced[0]
        if backend == "jax":
            import jax

            traced = []
            jax.jit(lambda t: traced.append(choose(t)))(tokens)
            return choose(ops.convert_to_tensor(tokens)), traced[0]
        return choose(ops.convert_to_tensor(tokens)), None

    few = NUM_EXPERTS // TOP_K  # k * T <= E: gather
    if keras.backend.backend() != "torch":
        assert layouts(1)[1] == layouts(few)[1] == "gather"
        assert layouts(few + 1)[1] == "fitted"
        assert layouts(1, "static")[1] == "blocks"
    # Without a compiler the dynamic groups read only the chosen experts.
    assert layouts(1)[0] == "dynamic"
    assert layouts(1, "gather")[0] == "gather"


@pytest.mark.parametrize("balanced", [True, False])
def test_auto_under_a_compiler_is_exact_whether_loads_fit_or_not(balanced):
    # Under XLA / JAX `jit`, `"auto"` runs a capacity buffer when every
    # expert's load fits it and the padded blocks when not (`ops.cond`):
    # dropless and exact either way, outputs and gradients.
    backend = keras.backend.backend()
    if backend == "torch":
        pytest.skip("no compiler on this path (torch.compile is slow)")
    rng = np.random.default_rng(13)
    layer = _experts()
    params = [ops.convert_to_numpy(p) for p in layer.stacked_weights]
    x = rng.normal(size=(NUM_TOKENS, DIM)).astype("float32")
    t = np.arange(NUM_TOKENS)
    # Balanced: 12 pairs an expert, under the buffer's 16 rows; skewed:
    # every routed token's first choice is expert 0 (19 pairs).
    first = t % NUM_EXPERTS if balanced else np.zeros_like(t)
    indices = np.stack([first, (first + 1 + t % 3) % NUM_EXPERTS], 1)
    indices = indices.astype("int32")
    weights = rng.uniform(0.1, 1.0, (NUM_TOKENS, TOP_K)).astype("float32")
    mask = t % 5 != 0
    upstream = rng.normal(size=(NUM_TOKENS, DIM)).astype("float32")
    fn = _dispatch(layer, indices, mask, "auto", None, upstream)
    args = [x, weights, *params]
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def value_and_grads(*args):
            with tf.GradientTape() as tape:
                tape.watch(args)
                out = fn(*args)
                loss = tf.reduce_sum(out)
            grads = tape.gradient(loss, args)
            return out, [tf.convert_to_tensor(g) for g in grads]

        out, grads = value_and_grads(*[tf.constant(a) for a in args])
        out, grads = out.numpy(), [g.numpy() for g in grads]
    else:
        out, grads = _value_and_grads(fn, args)
    kept = _kept(indices, mask, None)
    ref_out, ref_grads = _reference(x, indices, weights, kept, params, upstream)
    np.testing.assert_allclose(out, ref_out * upstream, rtol=1e-4, atol=1e-5)
    for grad, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-5)


def test_auto_keeps_the_cpu_layouts_on_cpu():
    tokens = ops.zeros((4, DIM))
    assert not dispatch.use_grouped_layout(tokens, "auto")
    assert dispatch.use_grouped_layout(tokens, "grouped")


@pytest.mark.parametrize("num_tokens", [1, 64])
def test_auto_under_xla_and_graph_equals_eager(num_tokens):
    # `"auto"` decides from the static token count while tracing: under XLA
    # gather for one token and padded blocks for more, dynamic groups in a
    # graph.
    if keras.backend.backend() != "tensorflow":
        pytest.skip("TensorFlow graphs and XLA")
    import tensorflow as tf

    layer = moe.MoELayer(NUM_EXPERTS, HIDDEN, top_k=TOP_K, gated=True)
    x = np.random.default_rng(7).normal(size=(num_tokens, DIM))
    x = x.astype("float32")
    eager = moe.MoELayer.from_config(
        {**layer.get_config(), "dispatch": "dynamic"}
    )
    eager(x)
    layer(x)
    eager.set_weights(layer.get_weights())
    expected = ops.convert_to_numpy(eager(x))
    for jit_compile in (False, True):
        out = tf.function(layer, jit_compile=jit_compile)(x)
        np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)


def test_grouped_under_xla_is_refused_on_tensorflow():
    if keras.backend.backend() != "tensorflow":
        pytest.skip("TensorFlow only: JAX and PyTorch have grouped matmuls")
    import tensorflow as tf

    layer = moe.MoELayer(NUM_EXPERTS, HIDDEN, dispatch="grouped")
    x = np.ones((NUM_TOKENS, DIM), "float32")
    layer(x)
    with pytest.raises(ValueError, match="needs a grouped matmul"):
        tf.function(layer, jit_compile=True)(x)


# --- The entry point: decisions, stacked and layer experts -------------------


def _layer_experts(params):
    # `moe.LayerExperts` whose expert `e` is stacked expert `e`: a Dense
    # chain holding the same weights.
    w1, b1, w2, b2 = params
    layers = []
    for e in range(NUM_EXPERTS):
        expert = keras.Sequential(
            [
                keras.layers.Dense(HIDDEN, activation="relu"),
                keras.layers.Dense(DIM),
            ]
        )
        expert.build((None, DIM))
        expert.set_weights([w1[e], b1[e], w2[e], b2[e]])
        layers.append(expert)
    experts = moe.LayerExperts(layers)
    experts.build((None, DIM))
    return experts


@pytest.mark.parametrize("capacity_factor", [None, 0.6])
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_run_experts_on_layer_experts_matches_per_token_loop(
    mode, capacity_factor
):
    # The per-layer loop applies the same capacity rule as the layouts.
    rng = np.random.default_rng(3)
    stacked = _experts()
    params = [ops.convert_to_numpy(p) for p in stacked.stacked_weights]
    layers = _layer_experts(params)
    x = rng.normal(size=(NUM_TOKENS, DIM)).astype("float32")
    indices, weights, mask = _routing(rng)
    kept = _kept(indices, mask, capacity_factor)
    decision = moe.routers.TokenChoice(
        ops.convert_to_tensor(indices), ops.convert_to_tensor(weights)
    )
    ref_out, _ = _reference(
        x, indices, weights, kept, params, np.ones((NUM_TOKENS, DIM))
    )
    results = {}
    for name, experts in (("stacked", stacked), ("layers", layers)):
        out, dropped = dispatch.run_experts(
            decision,
            experts,
            ops.convert_to_tensor(x),
            token_mask=ops.convert_to_tensor(mask),
            capacity_factor=capacity_factor,
            mode=mode,
        )
        np.testing.assert_allclose(
            ops.convert_to_numpy(out), ref_out, rtol=1e-4, atol=1e-5
        )
        results[name] = float(ops.convert_to_numpy(dropped))
    want = 1.0 - kept.sum() / (mask[:, None] & np.ones_like(kept)).sum()
    assert results["stacked"] == results["layers"]
    np.testing.assert_allclose(results["stacked"], want, rtol=1e-6)


def test_run_experts_matches_on_the_decision_type():
    # Soft, expert choice and every expert, stacked and layer experts,
    # against a NumPy loop over the experts.
    rng = np.random.default_rng(4)
    stacked = _experts()
    params = [ops.convert_to_numpy(p) for p in stacked.stacked_weights]
    layers = _layer_experts(params)
    x = rng.normal(size=(NUM_TOKENS, DIM)).astype("float32")

    def expert(e, rows):
        w1, b1, w2, b2 = (p[e] for p in params)
        return np.maximum(rows @ w1 + b1, 0.0) @ w2 + b2

    every = np.stack([expert(e, x) for e in range(NUM_EXPERTS)])  # (E, T, d)
    soft = rng.uniform(size=(NUM_TOKENS, NUM_EXPERTS)).astype("float32")
    capacity = 5
    picks = np.stack(
        [rng.choice(NUM_TOKENS, capacity, replace=False) for _ in range(4)]
    ).astype("int32")
    pick_weights = rng.uniform(size=picks.shape).astype("float32")
    picked = np.ones(picks.shape, bool)
    picked[0, -1] = False  # not a real pick: adds nothing
    chosen_by = np.zeros((NUM_TOKENS, NUM_EXPERTS), "float32")
    chosen = np.zeros((NUM_TOKENS, DIM))
    for e in range(NUM_EXPERTS):
        for t, w, real in zip(picks[e], pick_weights[e], picked[e]):
            if real:
                chosen_by[t, e] = 1.0
                chosen[t] += w * every[e, t]
    tensor = ops.convert_to_tensor
    cases = [
        (moe.routers.EveryExpert(), every.sum(0), 0.0),
        (
            moe.routers.SoftChoice(tensor(soft), None, None),
            np.einsum("etd,te->td", every, soft),
            0.0,
        ),
        (
            moe.routers.ExpertChoice(
                tensor(picks),
                tensor(pick_weights),
                tensor(picked),
                tensor(chosen_by),
                None,
                None,
            ),
            chosen,
            np.mean(chosen_by.sum(1) == 0),
        ),
    ]
    for decision, want, want_dropped in cases:
        for experts in (stacked, layers):
            out, dropped = dispatch.run_experts(decision, experts, tensor(x))
            np.testing.assert_allclose(
                ops.convert_to_numpy(out),
                want,
                rtol=1e-4,
                atol=1e-5,
                err_msg=type(decision).__name__,
            )
            np.testing.assert_allclose(
                float(ops.convert_to_numpy(dropped)), want_dropped, rtol=1e-6
            )
