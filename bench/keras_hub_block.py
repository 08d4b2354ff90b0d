"""keras-hub's own MoE blocks against `moe.MoELayer` holding the same weights.

keras-hub's `MixtralSparseMoeBlock` and `Qwen3SparseMoeBlock` compute every
expert on every token (one einsum over all E experts, then a mask);
`MoELayer` runs each token through its k experts only. Both hold the same
random weights: drawn in NumPy, assigned to the keras-hub block's variables,
and given to `moe.convert.from_transformers` under their Hugging Face names.
Before timing, each compiled contender's outputs are checked against the
other's (max abs difference <= 1e-5, or the script stops).

Forward (inference) time of one block call on `(1, tokens, d)`, median of
interleaved calls, at a Mixtral-like shape (d 512, E 8, k 2, expert width
1024) and a Qwen3-MoE-like one (d 512, E 128, k 8, expert width 256), for
1, 8, 512 and 2048 tokens, in TensorFlow graph mode (`tf.function`), TF XLA
(`jit_compile=True`) and JAX `jit` (a second process: the Keras backend is
chosen at import). Target (issue 24): `MoELayer` >= 0.5 x E/k faster than
keras-hub's block (2x at Mixtral-like, 8x at Qwen3-like), never slower.

`--crossover` times instead `MoELayer` with the few-token layout
(`dispatch="gather"`) against the layout `"auto"` takes without it
(dynamic groups in graph mode, padded blocks under XLA and JAX) at 1..64
tokens: where `moe.dispatch.choose_layout`'s rule comes from (gather under
a compiler while `k * tokens <= E`).

Usage:
    python bench/keras_hub_block.py                  # both backends, ~10 min
    python bench/keras_hub_block.py --backend tensorflow --tokens 1 8
    python bench/keras_hub_block.py --crossover      # gather vs the rest
    python bench/keras_hub_block.py --quick          # tiny shapes, seconds
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# name: (d, experts, top_k, expert width, keras-hub block)
SHAPES = {
    "mixtral": (512, 8, 2, 1024, "mixtral"),
    "qwen3_moe": (512, 128, 8, 256, "qwen3_moe"),
}
QUICK_SHAPES = {
    "mixtral": (16, 4, 2, 32, "mixtral"),
    "qwen3_moe": (16, 8, 4, 8, "qwen3_moe"),
}
TOKENS = (1, 8, 512, 2048)
CROSSOVER_TOKENS = (1, 2, 4, 8, 16, 32, 64)
MODES = {"tensorflow": ("graph", "xla"), "jax": ("jit",)}
TOLERANCE = 1e-5


def draw_weights(d, experts, top_k, width, seed=0):
    """Random block weights in Hugging Face's names and layout (transformers
    5: fused `gate_up_proj` `(E, 2h, d)`, `down_proj` `(E, d, h)`), scaled
    so that the outputs are of order one."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def normal(shape, fan_in):
        return (rng.normal(size=shape) / np.sqrt(fan_in)).astype("float32")

    return {
        "gate.weight": normal((experts, d), 1.0),
        "experts.gate_up_proj": normal((experts, 2 * width, d), d),
        "experts.down_proj": normal((experts, d, width), width),
    }


def hf_config(family, d, experts, top_k, width):
    if family == "mixtral":
        return {
            "model_type": "mixtral",
            "hidden_size": d,
            "intermediate_size": width,
            "num_local_experts": experts,
            "num_experts_per_tok": top_k,
            "hidden_act": "silu",
        }
    return {
        "model_type": "qwen3_moe",
        "hidden_size": d,
        "moe_intermediate_size": width,
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "norm_topk_prob": True,
        "hidden_act": "silu",
    }


def keras_hub_block(family, d, experts, top_k, width, weights):
    """keras-hub's block, built, holding `weights` (Hugging Face names)."""
    if family == "mixtral":
        from keras_hub.src.models.mixtral.mixtral_decoder import (
            MixtralSparseMoeBlock,
        )

        block = MixtralSparseMoeBlock(
            hidden_dim=d,
            intermediate_dim=width,
            num_experts=experts,
            top_k=top_k,
        )
    else:
        from keras_hub.src.models.qwen3_moe.qwen3_moe_decoder import (
            Qwen3SparseMoeBlock,
        )

        block = Qwen3SparseMoeBlock(
            hidden_dim=d,
            moe_intermediate_dim=width,
            num_experts=experts,
            top_k=top_k,
            norm_top_k_prob=True,
        )
    block.build((None, None, d))
    gate_up = weights["experts.gate_up_proj"]  # (E, 2h, d): gate, then up
    gate, up = gate_up[:, :width], gate_up[:, width:]
    down = weights["experts.down_proj"].transpose(0, 2, 1)  # (E, h, d)
    block._sparse_feedforward_gate_dense.kernel.assign(weights["gate.weight"].T)
    bank = block.expert_bank
    if family == "mixtral":
        bank._expert_feedforward_gate_dense.assign(gate.transpose(0, 2, 1))
        bank._expert_feedforward_intermediate_dense.assign(
            up.transpose(0, 2, 1)
        )
    else:  # one (E, d, 2h) kernel, split into gate and up after the einsum
        bank._expert_feedforward_gate_dense.assign(gate_up.transpose(0, 2, 1))
    bank._expert_feedforward_output_dense.assign(down)
    return block


def compiled_call(layer, mode, first_output):
    """`f(x)`: one compiled forward call of `layer`, its result ready."""
    if mode in ("graph", "xla"):
        import tensorflow as tf

        fn = tf.function(
            lambda x: first_output(layer(x, training=False)),
            jit_compile=mode == "xla",
            autograph=False,
        )
        return lambda x: fn(x).numpy()
    import jax

    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    @jax.jit
    def fn(trainable, non_trainable, x):
        out, _ = layer.stateless_call(
            trainable, non_trainable, x, training=False
        )
        return first_output(out)

    return lambda x: jax.device_get(fn(trainable, non_trainable, x))


def median_times(calls, x, repeats, warmup=1):
    """Median seconds per call, the contenders interleaved."""
    outputs = {name: call(x) for name, call in calls.items()}
    for _ in range(warmup):
        for call in calls.values():
            call(x)
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call(x)
            times[name].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items()}, outputs


def run_backend(args):
    """Times every shape, token count and mode of this process's backend."""
    import keras
    import numpy as np

    from moe import dispatch
    from moe.convert import from_transformers

    backend = keras.backend.backend()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    tokens_list = args.tokens or (
        (1, 8) if args.quick else CROSSOVER_TOKENS if args.crossover else TOKENS
    )
    rows = []
    for name in args.shapes:
        d, experts, top_k, width, family = shapes[name]
        weights = draw_weights(d, experts, top_k, width)
        config = hf_config(family, d, experts, top_k, width)
        # The first contender is the baseline: `speedup` is its time over
        # the second's.
        if args.crossover:
            # What `"auto"` takes without the gather layout.
            contenders = {
                mode: {
                    "other": from_transformers(
                        config,
                        weights,
                        dispatch="dynamic" if mode == "graph" else "static",
                    ),
                    "gather": from_transformers(
                        config, weights, dispatch="gather"
                    ),
                }
                for mode in MODES[backend]
            }
        else:
            both = {
                "keras_hub": keras_hub_block(
                    family, d, experts, top_k, width, weights
                ),
                "moe": from_transformers(config, weights),
            }
            contenders = {mode: both for mode in MODES[backend]}
        for num_tokens in tokens_list:
            x = np.random.default_rng(1).normal(size=(1, num_tokens, d))
            x = keras.ops.convert_to_tensor(x.astype("float32"))
            for mode in MODES[backend]:
                layers = contenders[mode]
                chosen = {}

                def moe_output(
                    out, chosen=chosen, top_k=top_k, experts=experts
                ):
                    # Traced once: which layout `"auto"` takes here.
                    flat = keras.ops.reshape(out, (-1, out.shape[-1]))
                    chosen["auto"] = dispatch.choose_layout(
                        flat, top_k, experts, "auto"
                    )
                    return out

                calls = {}
                for label, layer in layers.items():
                    if label == "keras_hub":
                        first = lambda out: out[0]  # noqa: E731
                    else:
                        first = moe_output
                    calls[label] = compiled_call(layer, mode, first)
                repeats = args.repeats or (
                    1 if args.quick else 3 if num_tokens >= 2048 else 5
                )
                seconds, outputs = median_times(calls, x, repeats)
                labels = list(calls)
                a, b = (np.asarray(outputs[n]) for n in labels)
                diff = float(np.abs(a - b).max())
                if diff > TOLERANCE * max(1.0, float(np.abs(a).max())):
                    raise SystemExit(
                        f"{name} {num_tokens} tokens {mode}: outputs differ "
                        f"by {diff:.2e}; not timing different functions"
                    )
                row = {
                    "shape": name,
                    "d": d,
                    "experts": experts,
                    "top_k": top_k,
                    "width": width,
                    "tokens": num_tokens,
                    "mode": mode,
                    "auto_layout": chosen.get("auto"),
                    "max_abs_diff": diff,
                    "ms": {n: s * 1e3 for n, s in seconds.items()},
                    "speedup": seconds[labels[0]] / seconds[labels[1]],
                }
                rows.append(row)
                print(format_row(row, args.crossover), flush=True)
    return rows


def format_row(row, crossover=False):
    names = list(row["ms"])
    what = "other / gather" if crossover else "keras_hub / moe"
    return (
        f"{row['shape']:<10}{row['tokens']:>6}  {row['mode']:<6}"
        + "".join(f"{row['ms'][n]:>11.2f}" for n in names)
        + f"{row['speedup']:>9.2f}x  ({what}; auto={row['auto_layout']}, "
        f"diff {row['max_abs_diff']:.1e})"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes")
    parser.add_argument(
        "--backend",
        choices=sorted(MODES),
        help="run this backend in this process (default: each in its own)",
    )
    parser.add_argument(
        "--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES)
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--crossover",
        action="store_true",
        help="MoELayer gather layout vs the other layouts, 1..64 tokens",
    )
    parser.add_argument("--json", type=Path, help="write results here")
    args = parser.parse_args(argv)

    if args.backend is not None:
        os.environ["KERAS_BACKEND"] = args.backend
        rows = run_backend(args)
    else:
        rows = []
        for backend in MODES:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "rows.json"
                forwarded = list(sys.argv[1:] if argv is None else argv)
                if "--json" in forwarded:
                    i = forwarded.index("--json")
                    del forwarded[i : i + 2]
                subprocess.run(
                    [sys.executable, __file__, "--backend", backend]
                    + forwarded
                    + ["--json", str(out)],
                    check=True,
                )
                rows += json.loads(out.read_text())["results"]
    header = (
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} "
        f"cores, load average {os.getloadavg()[0]:.1f}; forward, median of "
        "interleaved calls"
    )
    if args.backend is None:
        print(header)
        for row in rows:
            print(format_row(row, args.crossover))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "header": header,
                    "crossover": args.crossover,
                    "quick": args.quick,
                    "results": rows,
                },
                indent=2,
            )
        )
    return rows


if __name__ == "__main__":
    main()
