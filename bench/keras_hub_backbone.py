"""Whole keras-hub MoE models before and after `moe.keras_hub.sparsify`.

Two causal LMs of one family hold the same random weights; one is
sparsified. Timed, interleaved, medians:
- forward: the backbone on `(1, --prompt-tokens)` token ids, compiled the
  way Keras's `predict` compiles it (TensorFlow: XLA; JAX: `jit`);
- generate: greedy `generate()` of `--new-tokens` tokens after an
  8-token prompt (keras-hub compiles it: XLA on TensorFlow, `jit` on JAX;
  one token per step, so the blocks see one token each: decode).

Each model is first checked to give the other's token ids and (to 1e-3)
logits, so the two contenders compute the same function. Tiny but real
shapes (issue 24): d 512, 2 layers, Mixtral-like (E 8, k 2, expert width
1024) and Qwen3-MoE-like (E 128, k 8, expert width 256); TensorFlow and
JAX, each in its own process.

Usage:
    python bench/keras_hub_backbone.py                  # ~10 min
    python bench/keras_hub_backbone.py --backend jax --families mixtral
    python bench/keras_hub_backbone.py --quick          # tiny, seconds
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ATTENTION = dict(num_query_heads=8, num_key_value_heads=2, vocabulary_size=4096)
FAMILIES = {
    "mixtral": dict(
        hidden_dim=512, intermediate_dim=1024, num_experts=8, top_k=2
    ),
    "qwen3_moe": dict(
        hidden_dim=512,
        intermediate_dim=1024,
        moe_intermediate_dim=256,
        num_experts=128,
        top_k=8,
        head_dim=64,
        norm_top_k_prob=True,
    ),
}
QUICK = dict(hidden_dim=32, intermediate_dim=32, vocabulary_size=64)
PROMPT = 8  # the prompt of generate()


def causal_lm(family, quick, seed=0):
    """A random causal LM of `family`, every weight drawn from `seed`."""
    import keras
    import keras_hub
    import numpy as np

    classes = {
        "mixtral": (
            keras_hub.models.MixtralBackbone,
            keras_hub.models.MixtralCausalLM,
        ),
        "qwen3_moe": (
            keras_hub.models.Qwen3MoeBackbone,
            keras_hub.models.Qwen3MoeCausalLM,
        ),
    }
    backbone_class, lm_class = classes[family]
    config = {**ATTENTION, **FAMILIES[family], "num_layers": 2}
    if quick:
        config.update(QUICK)
        if family == "qwen3_moe":
            config.update(moe_intermediate_dim=8, num_experts=16, head_dim=8)
    keras.utils.set_random_seed(seed)
    backbone = backbone_class(**config)
    rng = np.random.default_rng(seed)
    for variable in backbone.weights:  # keras-hub starts some banks at zero
        if "layernorm" in variable.path:
            value = 1.0 + 0.1 * rng.normal(size=variable.shape)
        else:
            fan_in = variable.shape[-2] if len(variable.shape) > 1 else 1
            value = rng.normal(size=variable.shape) / np.sqrt(fan_in)
        variable.assign(value.astype(variable.dtype))
    model = lm_class(backbone, preprocessor=None)
    model.compile(sampler="greedy")
    return model, config


def median_seconds(calls, repeats):
    """Median seconds of each call, the contenders interleaved, after one
    warm-up call each (compilation)."""
    for call in calls.values():
        call()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def run_backend(args):
    import keras
    import numpy as np

    from moe import keras_hub as moe_keras_hub

    backend = keras.backend.backend()
    rows = []
    for family in args.families:
        dense, config = causal_lm(family, args.quick)
        sparse, _ = causal_lm(family, args.quick)
        moe_keras_hub.sparsify(sparse)
        rng = np.random.default_rng(1)
        vocabulary = config["vocabulary_size"]
        length = PROMPT + args.new_tokens
        prompt = {
            "token_ids": rng.integers(1, vocabulary, (1, length)).astype(
                "int32"
            ),
            "padding_mask": (np.arange(length) < PROMPT)[None].astype("int32"),
        }
        forward_input = {
            "token_ids": rng.integers(
                1, vocabulary, (1, args.prompt_tokens)
            ).astype("int32"),
            "padding_mask": np.ones((1, args.prompt_tokens), "int32"),
        }
        tokens = {}
        logits = {}
        for name, model in (("keras_hub", dense), ("moe", sparse)):
            tokens[name] = np.asarray(
                model.generate(prompt, stop_token_ids=None)["token_ids"]
            )
            logits[name] = np.asarray(model.predict_on_batch(forward_input))
        if not np.array_equal(tokens["keras_hub"], tokens["moe"]):
            raise SystemExit(f"{family}: generate() gives different tokens")
        diff = float(np.abs(logits["keras_hub"] - logits["moe"]).max())
        if diff > 1e-3 * max(1.0, float(np.abs(logits["keras_hub"]).max())):
            raise SystemExit(f"{family}: logits differ by {diff:.2e}")
        timings = {
            "forward": median_seconds(
                {
                    name: lambda m=model, x=forward_input: m.predict_on_batch(x)
                    for name, model in (("keras_hub", dense), ("moe", sparse))
                },
                args.repeats,
            ),
            "generate": median_seconds(
                {
                    name: lambda m=model, p=prompt: m.generate(
                        p, stop_token_ids=None
                    )
                    for name, model in (("keras_hub", dense), ("moe", sparse))
                },
                args.repeats,
            ),
        }
        counts = {"forward": args.prompt_tokens, "generate": args.new_tokens}
        for what, seconds in timings.items():
            row = {
                "backend": backend,
                "family": family,
                "what": what,
                "tokens": counts[what],
                "tokens_per_s": {
                    name: counts[what] / s for name, s in seconds.items()
                },
                "speedup": seconds["keras_hub"] / seconds["moe"],
                "max_abs_logit_diff": diff,
            }
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def format_row(row):
    rate = row["tokens_per_s"]
    return (
        f"{row['backend']:<11}{row['family']:<10}{row['what']:<9}"
        f"{row['tokens']:>5} tokens  keras-hub {rate['keras_hub']:>9.1f}/s  "
        f"moe {rate['moe']:>9.1f}/s  {row['speedup']:>5.2f}x"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("tensorflow", "jax"))
    parser.add_argument(
        "--families",
        nargs="+",
        choices=sorted(FAMILIES),
        default=list(FAMILIES),
    )
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny shapes")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if args.backend is None:  # each backend in its own process
        forwarded = list(sys.argv[1:] if argv is None else argv)
        for backend in ("tensorflow", "jax"):
            subprocess.run(
                [sys.executable, __file__, "--backend", backend, *forwarded],
                check=True,
            )
        return
    os.environ["KERAS_BACKEND"] = args.backend
    print(f"# load average {os.getloadavg()[0]:.1f}; medians of {args.repeats}")
    rows = run_backend(args)
    if args.json:
        with open(f"{args.json}.{args.backend}", "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
