"""Predict the next word with the model `model.py` trained.

Usage:
    python serve.py "how are"                  # the most likely next word
    python serve.py "how are" "good"           # one line per text
    python serve.py --top 5 "how are"          # 5 words with probabilities
    python serve.py --generate 8 "once upon"   # continue the text (greedy)
    python serve.py --generate 8 --temperature 0.8 --seed 1 "once upon"
    python serve.py --eval held_out.txt        # top-1/top-5 accuracy, ppl
    python serve.py --explain "how are"        # + experts and gate weights
    python serve.py --expert-words 5           # each expert's top 5 words
    python serve.py --http [--port 8000]       # HTTP JSON API (docs/http.md)
    python serve.py --export export/moe/1      # TF SavedModel, strings in
    python serve.py                            # prompt (or one query per
    cat queries.txt | python serve.py          #   stdin line when piped)

Python: `moe.lm.NextWordPredictor.load("saved_model").predict_next("how are")`.
"""

import argparse
import os
import sys

# TensorFlow's C++ start-up log is noise to a user (a level they set stays).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from moe.lm import cli  # noqa: E402
from moe.lm.analysis import expert_words  # noqa: E402
from moe.lm.bundle import save_load  # noqa: E402
from moe.lm.errors import ConfigError, QueryError, UserError  # noqa: E402
from moe.lm.model.quantize_model import QUANTIZE_MODES  # noqa: E402
from moe.lm.serving import generation, server_config  # noqa: E402
from moe.lm.text import corpus  # noqa: E402

# Library arguments that are flags of another name.
RENAMES = {"n": "top", "num_words": "generate", "max_body_bytes": "max_body_kb"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="serve.py",
        description="Predict the next word with a trained MoE model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # fmt: off
    add = parser.add_argument
    add("texts", nargs="*", metavar="TEXT",
        help="texts to continue; none: read queries from the prompt/stdin")
    add("--top", type=int, metavar="N", help="show the N likeliest words")
    add("--generate", type=int, metavar="N",
        help="continue the text N words, printed as they come")
    add("--temperature", type=float,
        help="sample --generate words at this temperature (default: greedy)")
    add("--seed", type=int, help="seed for sampling")
    add("--model-dir", default="saved_model", metavar="DIR",
        help="the bundle model.py wrote")
    add("--eval", metavar="FILE",
        help="report top-1/top-5 accuracy and perplexity on a text file")
    add("--encoding", default="utf-8",
        help="text encoding of --eval FILE and of queries on stdin")
    add("--explain", action="store_true",
        help="also show the experts each text went to, with gate weights")
    add("--quantize", default="none", choices=QUANTIZE_MODES,
        help="quantize a float bundle in memory before serving, as "
        "model.py --quantize would have (the bundle stays as it is)")
    add("--expert-words", type=int, nargs="?", const=5, metavar="N",
        help="print the N words each expert took most often on the "
        "validation text (recorded at training), then exit")
    add("--export", metavar="DIR",
        help="write a TensorFlow SavedModel (raw strings in, next word and "
        "probability out) to the new folder DIR, e.g. export/moe/1")
    http = parser.add_argument_group("HTTP server (--http)").add_argument
    http("--http", action="store_true", help="serve the JSON API over HTTP")
    http("--host", default="127.0.0.1", help="address")
    http("--port", type=int, default=8000, help="port, 0: any free one")
    http("--batch-wait-ms", type=float, default=2.0, metavar="MS",
         help="longest a request waits to share a model call")
    http("--max-batch", type=int, default=64, metavar="N",
         help="most texts per model call; 1: no batching")
    http("--max-instances", type=int, default=64, metavar="N",
         help="most texts per request")
    http("--max-body-kb", type=int, default=1024, metavar="KB",
         help="largest request body in KiB")
    # fmt: on
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> server_config.ServerConfig:
    """The HTTP settings; raises `ConfigError` for flags that cannot work."""
    if args.top is not None and args.generate is not None:
        raise ConfigError("use --top or --generate, not both")
    if args.explain and (args.generate is not None or args.eval):
        raise ConfigError("--explain goes with texts or --top, not with "
                         "--generate or --eval")  # fmt: skip
    if args.quantize != "none" and args.export:
        raise ConfigError("--quantize goes with serving, not with --export")
    modes = [f for f in ("http", "export", "eval") if getattr(args, f)]
    if args.expert_words is not None:
        if args.expert_words < 1:
            raise ConfigError("--expert-words must be at least 1. Received: "
                             f"{args.expert_words}")  # fmt: skip
        modes.insert(0, "expert-words")
    if len(modes) > 1:
        raise ConfigError(f"use one of --{' or --'.join(modes)}")
    query_flags = (args.top, args.generate)
    if (args.http or args.export or args.expert_words) and (
        args.texts or args.explain or query_flags != (None, None)
    ):
        raise ConfigError(
            f"--{modes[0]} takes no TEXT, --top, --generate or --explain"
        )
    if any(not text.strip() for text in args.texts):
        raise ConfigError("empty query: give some words")
    generation.check_generation(args.generate, args.temperature)
    try:  # the library's own checks, which name its arguments
        server_config.check_port(args.port)
        return server_config.ServerConfig(
            max_instances=args.max_instances,
            max_body_bytes=args.max_body_kb * 1024,
            max_batch=args.max_batch,
            batch_wait_ms=args.batch_wait_ms,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None


def answer(predictor, args, text: str) -> None:
    """Prints the answer to one text in the format the flags ask for."""
    if args.generate is not None:
        words = predictor.generate_words(
            text, args.generate, args.temperature, args.seed
        )
        print(text.strip(), end="", flush=True)
        for word in words:  # as they come: a long run shows its progress
            print(f" {word}", end="", flush=True)
        print()
    elif args.explain:
        top = 1 if args.top is None else args.top
        (result,) = predictor.explain([text], top)
        print(format_explained(result, args.top), flush=True)
    elif args.top is not None:
        top = predictor.top(text, args.top)
        print("  ".join(f"{w} {p:.3f}" for w, p in top), flush=True)
    else:
        print(predictor.predict_next(text), flush=True)


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


def run_stream(predictor, args, lines, interactive: bool) -> None:
    """One answer per query line (a prompt's, or stdin's when piped)."""
    for line in lines:
        try:
            answer(predictor, args, line)
        except QueryError as e:  # a line with no words: an empty answer
            print(e if interactive else "", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = check_args(args)
        # What can be checked before TensorFlow loads.
        save_load.check_bundle(args.model_dir)
        if args.expert_words is not None:
            words = expert_words.read(args.model_dir)
            print(expert_words.format_table(words, args.expert_words))
            return 0
        text = corpus.read_text(args.eval, args.encoding) if args.eval else ""
        with cli.loading_tensorflow():
            from moe.lm.serving.predictor import NextWordPredictor
        if args.export:
            from moe.lm.serving.export import export_saved_model

            path = export_saved_model(args.model_dir, args.export)
            print(f"exported to {path}")
            return 0
        loaded = save_load.load_bundle(args.model_dir)
        if args.quantize != "none":
            from moe.lm.model import quantize_model

            if quantize_model.is_quantized(loaded.model):
                raise ConfigError(
                    f"{args.model_dir} is quantized already; serve it "
                    "without `--quantize`"
                )
            quantize_model.quantize_model(loaded.model, args.quantize)
        predictor = NextWordPredictor(
            loaded.model, loaded.tokenizer, loaded.max_seq_len
        )
        if args.http:
            from moe.lm.serving import server

            server.run(predictor, loaded.training, config, args.host,
                       args.port, ready=serving)  # fmt: skip
            print("stopped", flush=True)
        elif args.eval:
            m = predictor.evaluate(text)
            print(
                f"{args.eval}: {m['pairs']} pairs | top-1 accuracy "
                f"{m['accuracy']:.4f} | top-5 accuracy "
                f"{m['top5_accuracy']:.4f} | perplexity {m['perplexity']:.2f}"
            )
        elif args.texts:
            for query in args.texts:
                answer(predictor, args, query)
        elif sys.stdin.isatty():
            run_stream(predictor, args, cli.typed_lines(), interactive=True)
        else:
            lines = cli.piped_lines(sys.stdin.buffer, args.encoding, "serve.py")
            run_stream(predictor, args, lines, interactive=False)
    except KeyboardInterrupt:
        return 130
    except OSError as e:  # e.g. --http port in use, --export not writable
        return cli.error("serve.py", e)
    except UserError as e:  # flags, bundle, corpus, export, a broken model
        return cli.error("serve.py", cli.flag_message(str(e), vars(args),
                                                      RENAMES))  # fmt: skip
    return 0


def serving(url: str) -> None:
    from moe.lm.serving.server import PREDICT_PATH

    print(f"serving {url}{PREDICT_PATH} (Ctrl-C stops)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
