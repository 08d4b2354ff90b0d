"""Predict the next word with the model `model.py` trained.

Usage:
    python serve.py "how are"                  # the most likely next word
    python serve.py "how are" "good"           # one line per text
    python serve.py --top 5 "how are"          # 5 words with probabilities
    python serve.py --generate 8 "once upon"   # continue the text (greedy)
    python serve.py --generate 8 --temperature 0.8 --seed 1 "once upon"
    python serve.py --eval held_out.txt        # top-1/top-5 accuracy, ppl
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
    from moe.lm.bundle import BundleError
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
    if any(not text.strip() for text in args.texts):
        raise ValueError("empty query: give some words")


def answer(predictor: NextWordPredictor, args, texts: list[str]) -> list[str]:
    """One output line per text, in the format the flags ask for."""
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
        predictor = NextWordPredictor.load(args.model_dir)
        if args.eval:
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
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
