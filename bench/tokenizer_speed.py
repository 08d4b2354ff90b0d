"""`moe.lm.text.tokenizer.Tokenizer` against `keras.layers.TextVectorization`.

Why the next-word app has its own small tokenizer: the time to build the
vocabulary from a corpus (`Tokenizer.fit` against `TextVectorization.adapt`)
and to encode one query (`Tokenizer.encode` against one eager
`TextVectorization` call; serving answers one query in a few
milliseconds), medians of interleaved repeats, and what each makes of
`don't`.

Usage:
    python bench/tokenizer_speed.py --corpus alice.txt
    python bench/tokenizer_speed.py                  # the built-in corpus
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BUILT_IN_CORPUS = (
    Path(__file__).resolve().parent.parent
    / "moe"
    / "lm"
    / "text"
    / "default_corpus.txt"
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=BUILT_IN_CORPUS)
    parser.add_argument("--vocab-size", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--json", type=Path, help="also write results here")
    args = parser.parse_args(argv)

    import keras

    from moe.lm.text.tokenizer import Tokenizer

    text = args.corpus.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip()]
    query = "how are"
    fit_s, adapt_s, encode_s, call_s = [], [], [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        tokenizer = Tokenizer.fit([text], args.vocab_size)
        fit_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        vectorizer = keras.layers.TextVectorization(max_tokens=args.vocab_size)
        vectorizer.adapt(lines)
        adapt_s.append(time.perf_counter() - start)
        vectorizer([query])  # the first call traces
        start = time.perf_counter()
        for _ in range(args.calls):
            tokenizer.encode(query)
        encode_s.append((time.perf_counter() - start) / args.calls)
        start = time.perf_counter()
        for _ in range(args.calls):
            vectorizer([query])
        call_s.append((time.perf_counter() - start) / args.calls)

    def ms(values):
        return f"{1000 * statistics.median(values):.1f} ms"

    def us(values):
        return f"{1e6 * statistics.median(values):.1f} us"

    print(f"corpus {args.corpus.name}, {len(text.split())} words")
    print(f"vocabulary: Tokenizer.fit {ms(fit_s)}, adapt {ms(adapt_s)}")
    print(f"one query: encode {us(encode_s)}, eager call {us(call_s)}")
    words = vectorizer.get_vocabulary()
    ours = tokenizer.decode(tokenizer.encode("don't"))
    theirs = [str(words[i]) for i in vectorizer(["don't"]).numpy()[0] if i]
    print("don't:", ours, "against", theirs)
    if args.json:
        results = {
            "corpus": str(args.corpus),
            "repeats": args.repeats,
            "calls": args.calls,
            "fit_s": statistics.median(fit_s),
            "adapt_s": statistics.median(adapt_s),
            "encode_s": statistics.median(encode_s),
            "text_vectorization_call_s": statistics.median(call_s),
            "dont": {"tokenizer": ours, "text_vectorization": theirs},
        }
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
