"""What `model.py` and `serve.py` share: flags, errors, TensorFlow, Ctrl-C.

Nothing here imports TensorFlow: the command lines parse and check their
input, and report a mistake, before it loads.
"""

import argparse
import contextlib
import dataclasses
import os
import re
import signal
import sys
import threading
from collections.abc import Iterable

from moe.lm.training.config import TrainingConfig


def training_parser() -> argparse.ArgumentParser:
    """`model.py`'s flags: one per `TrainingConfig` field, with its help."""
    parser = argparse.ArgumentParser(
        prog="model.py",
        description="Train the next-word MoE model.",
        formatter_class=_HelpFormatter,
    )
    for field in dataclasses.fields(TrainingConfig):
        options = dict(field.metadata)
        if field.default is not None and not {"nargs", "choices"} & set(
            options
        ):
            options.setdefault("type", type(field.default))
        parser.add_argument(flag(field.name), default=field.default, **options)
    return parser


def parse_training_args(argv: list[str] | None = None) -> TrainingConfig:
    """The `TrainingConfig` of `model.py`'s command line `argv`."""
    return TrainingConfig(**vars(training_parser().parse_args(argv)))


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" unless the help already explains the default."""

    def _get_help_string(self, action):
        if action.default is None or "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def flag(name: str) -> str:
    """The flag of a setting: `top_k` -> `--top-k`."""
    return "--" + name.replace("_", "-")


def flag_message(
    message: str, names: Iterable[str], renames: dict | None = None
) -> str:
    """A library message about `` `argument` ``s, in terms of flags.

    The library names arguments in backticks (`` `top_k` must be ... ``);
    on the command line the user knows them as flags (`--top-k`).

    Args:
        names: the arguments that are flags of the same name.
        renames: `{argument: flag name}` for the others.
    """
    flags = {name: flag(name) for name in names}
    flags.update({k: flag(v) for k, v in (renames or {}).items()})
    return re.sub(
        r"`(\w+)`", lambda m: flags.get(m.group(1), m.group(0)), message
    )


def error(prog: str, message: str | OSError) -> int:
    """Prints `prog: error: message` on stderr (one line); returns 1."""
    if isinstance(message, OSError) and message.strerror:
        where = message.filename
        message = f"{where}: {message.strerror}" if where else message.strerror
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 1


@contextlib.contextmanager
def loading_tensorflow():
    """Hides the C++ log lines TensorFlow prints while it loads.

    Only when `TF_CPP_MIN_LOG_LEVEL` is "3" (the scripts' default): a user
    who asks for another level sees everything. TensorFlow is imported, and
    its devices set up, inside.
    """
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") != "3":
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


@contextlib.contextmanager
def ctrl_c_stops_training():
    """Makes Ctrl-C stop `moe.lm.training.train.train`; yields its event.

    Ctrl-C raises `KeyboardInterrupt` and also sets the event, which
    `train(interrupted=event)` checks after every step and before saving:
    Python prints and drops a `KeyboardInterrupt` raised inside a
    finalizer (`__del__`), and training would otherwise go on to save.
    Those dropped interrupts are not reported as errors meanwhile.
    """
    event = threading.Event()

    def on_sigint(signum, frame):
        event.set()
        raise KeyboardInterrupt

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, on_sigint)
    previous_hook = sys.unraisablehook
    sys.unraisablehook = ignore_dropped_interrupts
    try:
        yield event
    finally:
        sys.unraisablehook = previous_hook
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def ignore_dropped_interrupts(unraisable) -> None:
    """`sys.unraisablehook` that is quiet about dropped interrupts only."""
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):
        sys.__unraisablehook__(unraisable)


def typed_lines():
    """Lines typed at a `> ` prompt, until end of input or Ctrl-C."""
    while True:
        try:
            yield input("> ")
        except UnicodeDecodeError as e:
            print(f"not valid text ({e.reason}); try again")
        except (EOFError, KeyboardInterrupt):
            print()
            return


def piped_lines(binary, encoding: str, prog: str):
    """The lines of a binary stream as text; an undecodable one as "".

    A bad line is named on stderr and stands as an empty line, so that a
    line-per-line answer stays aligned with the input.
    """
    for number, raw in enumerate(binary, start=1):
        try:
            yield raw.decode(encoding)
        except UnicodeDecodeError as e:
            print(
                f"{prog}: line {number} is not {encoding} text (byte "
                f"{e.start}); skipped",
                file=sys.stderr,
            )
            yield ""
