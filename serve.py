"""Predict the next word with the model `model.py` trained.

Usage:
    python serve.py "how are"                  # the most likely next word
    python serve.py "how are" "good"           # one line per text
    python serve.py --top 5 "how are"          # 5 words with probabilities
    python serve.py --generate 8 "once upon"   # continue the text (greedy)
    python serve.py --generate 8 --temperature 0.8 --seed 1 "once upon"
    python serve.py --eval held_out.txt        # top-1/top-5 accuracy, ppl
    python serve.py --explain "how are"        # + experts and gate weights
    python serve.py --http [--port 8000]       # HTTP JSON API (see README)
    python serve.py --export export/moe/1      # TF SavedModel, strings in
    python serve.py                            # prompt (or one query per
    cat queries.txt | python serve.py          #   stdin line when piped)

Python:
    from serve import NextWordPredictor
    predictor = NextWordPredictor.load("saved_model")
    predictor.predict_next("how are")
"""

import argparse
import contextlib
import os
import sys

# Silence TensorFlow's C++ start-up log unless the user asked for it.
_QUIET_TF = "TF_CPP_MIN_LOG_LEVEL" not in os.environ
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@contextlib.contextmanager
def _quiet_stderr():
    """Hides the C++ log lines TensorFlow prints while it loads."""
    if not _QUIET_TF:
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
        import tensorflow as tf

        tf.config.list_logical_devices()  # device set-up logs here
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


with _quiet_stderr():
    from moe.lm.bundle import BundleError, load_bundle
    from moe.lm.corpus import CorpusError, read_text
    from moe.lm.predictor import NextWordPredictor

__all__ = ["NextWordPredictor", "main"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Predict the next word with a trained MoE model."
    )
    parser.add_argument(
        "texts",
        nargs="*",
        metavar="TEXT",
        help="texts to continue; none: read queries from the prompt/stdin",
    )
    parser.add_argument(
        "--top", type=int, metavar="N", help="show the N likeliest words"
    )
    parser.add_argument(
        "--generate", type=int, metavar="N", help="continue the text N words"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        help="sample --generate words at this temperature (default: greedy)",
    )
    parser.add_argument("--seed", type=int, help="seed for sampling")
    parser.add_argument(
        "--model-dir",
        default="saved_model",
        metavar="DIR",
        help="the bundle model.py wrote (default: saved_model)",
    )
    parser.add_argument(
        "--eval",
        metavar="FILE",
        help="report top-1/top-5 accuracy and perplexity on a text file",
    )
    parser.add_argument(
        "--encoding",
        default="utf-8",
        help="text encoding of --eval FILE (default: utf-8)",
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="also show the experts each text went to, with gate weights",
    )
    parser.add_argument(
        "--export",
        metavar="DIR",
        help="write a TensorFlow SavedModel (raw strings in, next word and "
        "probability out) to the new directory DIR, e.g. export/moe/1",
    )
    http = parser.add_argument_group("HTTP server (--http)")
    http.add_argument(
        "--http", action="store_true", help="serve the JSON API over HTTP"
    )
    http.add_argument(
        "--host", default="127.0.0.1", help="address (default: 127.0.0.1)"
    )
    http.add_argument(
        "--port", type=int, default=8000, help="port, 0: any (default: 8000)"
    )
    http.add_argument(
        "--batch-wait-ms",
        type=float,
        default=2.0,
        metavar="MS",
        help="longest a request waits to share a model call (default: 2)",
    )
    http.add_argument(
        "--max-batch",
        type=int,
        default=64,
        metavar="N",
        help="most texts per model call; 1: no batching (default: 64)",
    )
    http.add_argument(
        "--max-instances",
        type=int,
        default=64,
        metavar="N",
        help="most texts per request (default: 64)",
    )
    http.add_argument(
        "--max-body-kb",
        type=int,
        default=1024,
        metavar="KB",
        help="largest request body in KiB (default: 1024)",
    )
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Raises ValueError for settings or queries that cannot work."""
    if args.top is not None and args.top < 1:
        raise ValueError(f"--top must be at least 1. Received: {args.top}")
    if args.generate is not None and args.generate < 1:
        raise ValueError(
            f"--generate must be at least 1. Received: {args.generate}"
        )
    if args.temperature is not None and args.temperature <= 0:
        raise ValueError(
            f"--temperature must be positive. Received: {args.temperature}"
        )
    if args.top is not None and args.generate is not None:
        raise ValueError("use --top or --generate, not both")
    if args.explain and (args.generate or args.eval):
        raise ValueError("--explain goes with texts or --top, not with "
                         "--generate or --eval")  # fmt: skip
    modes = [f for f in ("http", "export", "eval") if getattr(args, f)]
    if len(modes) > 1:
        raise ValueError(f"use one of --{' or --'.join(modes)}")
    if (args.http or args.export) and (
        args.texts or args.top or args.generate or args.explain
    ):
        raise ValueError(
            f"--{modes[0]} takes no TEXT, --top, --generate or --explain"
        )
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be 0-65535. Received: {args.port}")
    if not 0 <= args.batch_wait_ms <= 1000:
        raise ValueError(
            f"--batch-wait-ms must be 0-1000. Received: {args.batch_wait_ms}"
        )
    for name in ("max_batch", "max_instances", "max_body_kb"):
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"{flag} must be at least 1. Received: {getattr(args, name)}"
            )
    if any(not text.strip() for text in args.texts):
        raise ValueError("empty query: give some words")


def answer(predictor: NextWordPredictor, args, texts: list[str]) -> list[str]:
    """One output line per text, in the format the flags ask for."""
    if args.explain:
        return [
            format_explained(r, args.top)
            for r in predictor.explain(texts, args.top or 1)
        ]
    if args.top:
        return [
            "  ".join(f"{w} {p:.3f}" for w, p in predictor.top(t, args.top))
            for t in texts
        ]
    if args.generate:
        return [
            " ".join(
                [
                    t.strip(),
                    *predictor.generate(
                        t, args.generate, args.temperature, args.seed
                    ),
                ]
            )
            for t in texts
        ]
    return predictor.predict_next(texts)


def format_explained(result: dict, top: int | None) -> str:
    """`word | experts: 2 0.600, 0 0.400` (`--top`: the words with probs)."""
    if top:
        words = "  ".join(f"{w} {p:.3f}" for w, p in result["top"])
    else:
        words = result["word"]
    layers = result.get("experts_by_layer") or {"experts": result["experts"]}
    routes = " | ".join(
        f"{name}: " + ", ".join(f"{e} {w:.3f}" for e, w in pairs)
        for name, pairs in layers.items()
    )
    return f"{words} | {routes}"


def run_http(predictor: NextWordPredictor, training: dict, args) -> None:
    """Serves the JSON API until Ctrl-C / SIGTERM (`moe.lm.server`)."""
    import asyncio

    from moe.lm import server

    config = server.ServerConfig(
        max_instances=args.max_instances,
        max_body_bytes=args.max_body_kb * 1024,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
    )
    server.warm_up(predictor, config.max_batch)
    app = server.create_app(predictor, training, config)

    def ready(url: str) -> None:
        print(f"serving {url}{server.PREDICT_PATH} (Ctrl-C stops)", flush=True)

    asyncio.run(server.serve(app, args.host, args.port, ready=ready))
    print("stopped", flush=True)


def run_stream(predictor, args, stream, interactive: bool) -> None:
    """One answer per query line (a prompt when `interactive`)."""
    while True:
        if interactive:
            try:
                line = input("> ")
            except (EOFError, KeyboardInterrupt):
                print()
                return
        else:
            line = stream.readline()
            if not line:
                return
        try:
            (reply,) = answer(predictor, args, [line])
        except ValueError as e:  # a line with no words
            if interactive:
                print(e)
                continue
            reply = ""  # keep one output line per input line
        print(reply, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        if args.export:
            from moe.lm.export import export_saved_model

            path = export_saved_model(args.model_dir, args.export)
            print(f"exported to {path}")
            return 0
        bundle = load_bundle(args.model_dir)
        predictor = NextWordPredictor(
            bundle.model, bundle.tokenizer, bundle.max_seq_len
        )
        if args.http:
            run_http(predictor, bundle.training, args)
        elif args.eval:
            text = read_text(args.eval, args.encoding)
            m = predictor.evaluate(text)
            print(
                f"{args.eval}: {m['pairs']} pairs | top-1 accuracy "
                f"{m['accuracy']:.4f} | top-5 accuracy "
                f"{m['top5_accuracy']:.4f} | perplexity {m['perplexity']:.2f}"
            )
        elif args.texts:
            for line in answer(predictor, args, args.texts):
                print(line)
        else:
            run_stream(predictor, args, sys.stdin, sys.stdin.isatty())
    except (BundleError, CorpusError, ValueError) as e:
        print(f"serve.py: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. --http port in use, --export not writable
        print(f"serve.py: error: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
