"""Train the next-word Mixture-of-Experts model and save it to `saved_model/`.

Usage:
    python model.py                                # built-in corpus, < 1 min
    python model.py --corpus book.txt notes.txt --epochs 40
    python model.py --routing switch --capacity-factor 1.25 --num-experts 8
    python model.py --architecture transformer --num-layers 2 --num-heads 4
    TF_CONFIG='{"cluster": ...}' python model.py --strategy multi-worker
    python model.py --help                         # every setting

Writes `model.keras`, `tokenizer.json`, `max_seq_len.txt`, `training.json`
and the pictures `training.png` and `experts.png` into `--output` (default
`saved_model/`): a new or empty folder, or one holding a bundle, replaced
only once the new one is complete. A run that is interrupted, fails or
diverges leaves the previous bundle as it was. Serve it with
`python serve.py "some text"`. The library behind it: `moe.lm.training.train`.
"""

import os
import signal
import sys


def stop_quietly(signum, frame):
    """Ctrl-C outside the run's own handler (`cli.ctrl_c_stops_training`),
    as the libraries load: exit 130 at once, without a traceback.

    `os._exit`: an exception raised here, inside a C extension's import,
    comes out as that import's `ImportError`.
    """
    print("model.py: interrupted", file=sys.stderr, flush=True)
    os._exit(130)


if __name__ == "__main__":  # first: the imports below take a while
    signal.signal(signal.SIGINT, stop_quietly)

import dataclasses  # noqa: E402

# TensorFlow's C++ start-up log is noise to a user (a level they set stays).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# glibc malloc page-faults the large per-step gradient buffers of
# many-expert layers afresh every step; TensorFlow's BFC allocator reuses
# them. Read once, when TensorFlow starts.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

from moe.lm import cli  # noqa: E402
from moe.lm.errors import UserError  # noqa: E402
from moe.lm.training import data_parallel, train  # noqa: E402
from moe.lm.training.datasets import (  # noqa: E402
    load_corpus,
    load_validation_corpus,
)
from moe.lm.training.resolve import validate  # noqa: E402
from moe.lm.training.summary import summary_line  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    config = cli.parse_training_args(argv)
    try:
        with cli.ctrl_c_stops_training() as interrupted:
            # Settings, corpus and output folder, before TensorFlow loads.
            validate(config)
            train.check_size(config)
            texts = load_corpus(config)
            held_out = load_validation_corpus(config, texts)
            with cli.loading_tensorflow():
                # A cluster is joined before TensorFlow sets up its devices.
                strategy = data_parallel.make_strategy(config.strategy)
            summary = train.train(
                config, strategy=strategy, interrupted=interrupted,
                texts=texts, held_out=held_out,
            )  # fmt: skip
    except UserError as e:  # anything else is a bug: its traceback shows
        names = [f.name for f in dataclasses.fields(config)]
        return cli.error("model.py", cli.flag_message(str(e), names))
    except OSError as e:  # e.g. the disk filled up while saving
        return cli.error("model.py", e)
    except KeyboardInterrupt:
        print(
            f"model.py: interrupted; {config.output} left unchanged",
            file=sys.stderr,
        )
        return 130
    print(summary_line(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
