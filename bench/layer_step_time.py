"""Forward + backward step time of MoELayer against the layers it replaces.

Contenders, all on the same tokens, median of interleaved runs:
- `moe_top2`: MoELayer, top-2 of E experts (sparse dispatch).
- `dense_ffn`: a dense FFN with the same *active* parameters
  (hidden width = top_k x expert hidden).
- `all_experts`: the same E experts all computed on every token, then
  weighted by the top-2 gates (what most Keras MoE code does).
- `soft`: MoELayer(routing="soft"), every expert weighted by its probability.

Targets (issue #2): moe_top2 <= 1.2x dense_ffn, and >= 4x faster than
all_experts, on TensorFlow CPU graph mode at 4096 tokens, d=256, hidden 1024,
8 experts.

Usage:
    python bench/layer_step_time.py            # full run, ~2 min
    python bench/layer_step_time.py --quick    # tiny shapes, seconds
    python bench/layer_step_time.py --jit      # TensorFlow XLA
    KERAS_BACKEND=jax python bench/layer_step_time.py
    python bench/layer_step_time.py --scaling  # E = 8, 16, 32, 64, top-2

`--scaling` times MoELayer alone at E = 8, 16, 32, 64 (top-2, 4096 tokens
as (4096, 256), hidden 1024), with parameters; target (issues #5, #16):
E=64 <= 1.3x the step time of E=8. At E = 64 each stacked expert kernel's
gradient is a 64 MiB tensor. TensorFlow's default CPU allocator is glibc's
malloc, which maps every allocation over 32 MiB fresh from the kernel and
unmaps it when freed, so each step page-faults those buffers again; its
BFC allocator (`TF_CPU_ALLOCATOR_USE_BFC=true`, read when TensorFlow
starts) keeps and reuses them. Like `model.py`, this script chooses BFC
unless the environment sets the variable; `--malloc` runs glibc's malloc
instead, to compare. The header line says which allocator ran; `cpu ms` is
the process CPU time, steadier than wall time on a shared machine.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def choose_allocator(argv):
    """TensorFlow's CPU allocator, set before TensorFlow loads: BFC unless
    the environment chose, glibc malloc with `--malloc`."""
    if "--malloc" in argv:
        os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "false"
    else:
        os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")


choose_allocator(sys.argv[1:])

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

import moe  # noqa: E402
from moe.dispatch import DISPATCH_MODES  # noqa: E402


class AllExpertsTopK(keras.layers.Layer):
    """The dense formulation: every expert on every token, top-k weighted."""

    def __init__(self, num_experts, hidden_dim, top_k, **kwargs):
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.hidden_dim = hidden_dim
        self.top_k = top_k

    def build(self, input_shape):
        d, e, h = input_shape[-1], self.num_experts, self.hidden_dim
        self.router = self.add_weight(shape=(d, e), name="router")
        self.w_in = self.add_weight(shape=(e, d, h), name="w_in")
        self.b_in = self.add_weight(shape=(e, h), initializer="zeros")
        self.w_out = self.add_weight(shape=(e, h, d), name="w_out")
        self.b_out = self.add_weight(shape=(e, d), initializer="zeros")

    def call(self, inputs, training=None):
        x = ops.reshape(inputs, (-1, ops.shape(inputs)[-1]))
        probs = ops.softmax(ops.matmul(x, self.router))
        top, _ = ops.top_k(probs, self.top_k)
        gates = ops.where(probs >= top[:, -1:], probs, 0.0)
        gates = gates / ops.sum(gates, axis=-1, keepdims=True)  # (T, E)
        h = ops.relu(
            ops.einsum("td,edh->eth", x, self.w_in) + self.b_in[:, None]
        )
        y = ops.einsum("eth,ehd->etd", h, self.w_out) + self.b_out[:, None]
        y = ops.einsum("etd,te->td", y, gates)
        return ops.reshape(y, ops.shape(inputs))


def dense_ffn(hidden_dim, output_dim):
    return keras.Sequential(
        [
            keras.layers.Dense(hidden_dim, activation="relu"),
            keras.layers.Dense(output_dim),
        ]
    )


def make_step(layer, x, jit):
    """A compiled forward + backward step on the current backend."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=jit, autograph=False)
        def step(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(layer(x, training=True)))
            return loss, tape.gradient(loss, layer.trainable_variables)

        # The call returns once every gradient is computed; copying them to
        # NumPy would add an E-proportional cost that no training step pays.
        return lambda: step(x)[0].numpy()
    if backend == "jax":
        import jax

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss_fn(trainable, x):
            y, _ = layer.stateless_call(
                trainable, non_trainable, x, training=True
            )
            return jax.numpy.mean(jax.numpy.square(y))

        grad = jax.jit(jax.grad(loss_fn))
        return lambda: jax.block_until_ready(grad(trainable, x))
    if backend == "torch":
        import torch

        def step():
            for v in layer.trainable_variables:
                v.value.grad = None
            loss = torch.mean(torch.square(layer(x, training=True)))
            loss.backward()

        return step
    raise ValueError(f"Unsupported backend: {backend}")


def time_contenders(contenders, repeats, warmup=2):
    """Median seconds per step, contenders interleaved in each repeat."""
    for step in contenders.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in contenders}
    cpu_times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, step in contenders.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    return (
        {name: statistics.median(t) for name, t in times.items()},
        {name: statistics.median(t) for name, t in cpu_times.items()},
    )


def count_params(layer):
    return int(sum(np.prod(v.shape) for v in layer.trainable_variables))


def run_shape(
    shape,
    experts,
    hidden,
    top_k,
    jit,
    repeats,
    include_dense,
    capacity_factor=None,
    dispatch="auto",
):
    keras.utils.set_random_seed(0)
    x = ops.convert_to_tensor(
        np.random.default_rng(0).normal(size=shape).astype("float32")
    )
    d = shape[-1]
    layers = {}
    for e in experts:
        layers[f"moe_top{top_k}_E{e}"] = moe.MoELayer(
            e,
            hidden,
            top_k=top_k,
            capacity_factor=capacity_factor,
            dispatch=dispatch,
            aux_loss_weight=0,
            z_loss_weight=0,
        )
    if include_dense:
        layers["dense_ffn"] = dense_ffn(top_k * hidden, d)
        layers["all_experts"] = AllExpertsTopK(experts[0], hidden, top_k)
        layers["soft"] = moe.MoELayer(
            experts[0],
            hidden,
            routing="soft",
            aux_loss_weight=0,
            z_loss_weight=0,
        )
    for layer in layers.values():
        layer(x)  # build
    steps = {name: make_step(layer, x, jit) for name, layer in layers.items()}
    seconds, cpu_seconds = time_contenders(steps, repeats)
    params = {name: count_params(layer) for name, layer in layers.items()}
    return seconds, cpu_seconds, params


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes")
    parser.add_argument("--jit", action="store_true", help="TF XLA")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--experts",
        type=int,
        nargs="+",
        default=None,
        help="expert counts of the MoE layers (default: 8; with --scaling "
        "8 16 32 64)",
    )
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="MoE layers only (no dense contenders), one shape (tokens, d)",
    )
    parser.add_argument(
        "--capacity-factor",
        type=float,
        default=None,
        help="MoELayer capacity factor (default: dropless)",
    )
    parser.add_argument(
        "--malloc",
        action="store_true",
        help="TensorFlow CPU allocator: glibc malloc instead of BFC (read "
        "when the script starts, before TensorFlow loads)",
    )
    parser.add_argument(
        "--dispatch",
        default="auto",
        choices=DISPATCH_MODES,
        help="MoELayer dispatch layout (default: auto)",
    )
    parser.add_argument("--json", type=Path, help="write results here")
    args = parser.parse_args(argv)

    if args.experts is None:
        args.experts = [8, 16, 32, 64] if args.scaling else [8]
    if args.quick:
        tokens, d, hidden, repeats = 256, 32, 64, args.repeats or 3
        shapes = [(tokens, d), (8, tokens // 8, d)]
    else:
        tokens, d, hidden, repeats = 4096, 256, 1024, args.repeats or 15
        shapes = [(tokens, d), (32, tokens // 32, d)]
    if args.scaling:
        shapes = shapes[:1]
    top_k = 2
    backend = keras.backend.backend()
    allocator = "n/a"  # only TensorFlow reads the variable
    if backend == "tensorflow":
        use_bfc = os.environ.get("TF_CPU_ALLOCATOR_USE_BFC", "").lower()
        allocator = "bfc" if use_bfc in ("1", "true") else "malloc"
    mode = "XLA" if args.jit else "graph"
    if backend != "tensorflow":
        mode = "jit" if backend == "jax" else "eager"
    print(
        f"# backend={backend} mode={mode} tokens={tokens} d={d} "
        f"hidden={hidden} top_k={top_k} experts={args.experts} "
        f"capacity_factor={args.capacity_factor} dispatch={args.dispatch} "
        f"median of {repeats} interleaved steps (forward + backward); "
        f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; TensorFlow CPU allocator: {allocator}"
    )
    results = []
    for shape in shapes:
        seconds, cpu_seconds, params = run_shape(
            shape,
            args.experts,
            hidden,
            top_k,
            args.jit,
            repeats,
            include_dense=not args.scaling,
            capacity_factor=args.capacity_factor,
            dispatch=args.dispatch,
        )
        moe_name = f"moe_top{top_k}_E{args.experts[0]}"
        base = moe_name if args.scaling else "dense_ffn"
        print(f"\nshape {shape}")
        print(
            f"{'layer':<18}{'ms/step':>10}{'cpu ms':>10}{'params':>12}"
            f"{'vs ' + base:>22}"
        )
        for name in seconds:
            print(
                f"{name:<18}{seconds[name] * 1e3:>10.2f}"
                f"{cpu_seconds[name] * 1e3:>10.2f}{params[name]:>12,}"
                f"{seconds[name] / seconds[base]:>21.2f}x"
            )
        ratios = {}
        if not args.scaling:
            ratios = {
                "moe_vs_dense_ffn": seconds[moe_name] / seconds["dense_ffn"],
                "all_experts_vs_moe": seconds["all_experts"]
                / seconds[moe_name],
                "soft_vs_moe": seconds["soft"] / seconds[moe_name],
            }
        if len(args.experts) > 1:
            first = f"moe_top{top_k}_E{args.experts[0]}"
            for e in args.experts[1:]:
                ratios[f"E{e}_vs_E{args.experts[0]}"] = (
                    seconds[f"moe_top{top_k}_E{e}"] / seconds[first]
                )
                # Process CPU time: steadier than wall time when shared.
                ratios[f"E{e}_vs_E{args.experts[0]}_cpu"] = (
                    cpu_seconds[f"moe_top{top_k}_E{e}"] / cpu_seconds[first]
                )
        print("ratios: " + ", ".join(f"{k}={v:.2f}" for k, v in ratios.items()))
        results.append(
            {
                "shape": list(shape),
                "ms": {k: v * 1e3 for k, v in seconds.items()},
                "cpu_ms": {k: v * 1e3 for k, v in cpu_seconds.items()},
                "params": params,
                "ratios": ratios,
            }
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "backend": backend,
                    "mode": mode,
                    "tokens": tokens,
                    "d": d,
                    "hidden": hidden,
                    "top_k": top_k,
                    "experts": args.experts,
                    "capacity_factor": args.capacity_factor,
                    "dispatch": args.dispatch,
                    "repeats": repeats,
                    "tf_cpu_allocator": allocator,
                    "results": results,
                },
                indent=2,
            )
        )
    return results


if __name__ == "__main__":
    main()
