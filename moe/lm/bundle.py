"""The model bundle (`saved_model/`): atomic save, load and validation.

A bundle is a directory holding

- `model.keras`: the Keras v3 model,
- `tokenizer.json`: the versioned tokenizer (`Tokenizer.to_json`),
- `max_seq_len.txt`: the context window, one integer,
- `training.json`: settings, metrics, library versions, trained-at time,
- optionally the pictures `training.png` (loss and accuracy curves) and
  `experts.png` (per-expert load over training), for people.

`save_bundle` writes into a fresh temporary directory beside the target and
swaps it in only once complete, so an interrupted or failing run leaves the
previous bundle as it was.
"""

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from moe.lm.tokenizer import Tokenizer

MODEL_FILE = "model.keras"
TOKENIZER_FILE = "tokenizer.json"
MAX_SEQ_LEN_FILE = "max_seq_len.txt"
TRAINING_FILE = "training.json"
TRAINING_FIGURE = "training.png"
EXPERTS_FIGURE = "experts.png"
# What serving needs; training.json and the pictures are for people.
REQUIRED_FILES = (MODEL_FILE, TOKENIZER_FILE, MAX_SEQ_LEN_FILE)
OPTIONAL_FILES = (TRAINING_FILE, TRAINING_FIGURE, EXPERTS_FIGURE)


class BundleError(ValueError):
    """The bundle is missing, incomplete, corrupt or inconsistent."""


@dataclasses.dataclass
class Bundle:
    model: Any  # keras.Model
    tokenizer: Tokenizer
    max_seq_len: int
    training: dict


def save_bundle(
    directory: str | Path,
    model,
    tokenizer: Tokenizer,
    max_seq_len: int,
    training: dict,
    figures: dict[str, bytes] | None = None,
) -> Path:
    """Writes the bundle to `directory` atomically; returns its path.

    Files go to `.<name>.tmp-*` beside `directory`; when all are written, the
    old bundle is renamed aside (`.<name>.old-*`), the new one renamed in and
    the old one deleted. Leftovers of killed runs are cleaned up.

    Args:
        figures: optional `{file name: PNG bytes}`, names among
            `TRAINING_FIGURE` and `EXPERTS_FIGURE`.
    """
    figures = figures or {}
    unknown = set(figures) - {TRAINING_FIGURE, EXPERTS_FIGURE}
    if unknown:
        raise ValueError(
            f"`figures` may hold {TRAINING_FIGURE} and {EXPERTS_FIGURE}. "
            f"Received: {sorted(unknown)}"
        )
    target = Path(directory).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(target)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    )
    try:
        model.save(staging / MODEL_FILE)
        (staging / TOKENIZER_FILE).write_text(
            tokenizer.to_json(), encoding="utf-8"
        )
        (staging / MAX_SEQ_LEN_FILE).write_text(f"{max_seq_len}\n")
        (staging / TRAINING_FILE).write_text(
            json.dumps(training, indent=1, default=str) + "\n",
            encoding="utf-8",
        )
        for name, png in figures.items():
            (staging / name).write_bytes(png)
        _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _swap_in(staging: Path, target: Path) -> None:
    if not target.exists():
        os.rename(staging, target)
        return
    old = Path(
        tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent)
    )
    os.rename(target, old / target.name)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old / target.name, target)
        raise
    finally:
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)


def _remove_leftovers(target: Path) -> None:
    """Deletes temp dirs of killed runs (an `old-` one only once unneeded)."""
    for path in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(path, ignore_errors=True)
    if target.exists():
        for path in target.parent.glob(f".{target.name}.old-*"):
            shutil.rmtree(path, ignore_errors=True)


def check_files(directory: str | Path) -> Path:
    """Checks that the bundle's files exist (cheap: no TensorFlow).

    Raises:
        BundleError: no bundle, or an incomplete one.
    """
    directory = Path(directory)
    missing = [f for f in REQUIRED_FILES if not (directory / f).is_file()]
    if len(missing) == len(REQUIRED_FILES):
        raise BundleError(
            f"no trained model in {directory}/ — run `python model.py` first"
        )
    if missing:
        raise BundleError(
            f"incomplete model in {directory}/ (missing "
            f"{', '.join(missing)}) — run `python model.py` again"
        )
    return directory


def load_bundle(directory: str | Path) -> Bundle:
    """Loads and validates a bundle.

    Raises:
        BundleError: missing, incomplete, corrupt or inconsistent files; the
            message says which and what is wrong.
    """
    directory = check_files(directory)
    tokenizer = _load_tokenizer(directory / TOKENIZER_FILE)
    max_seq_len = _load_max_seq_len(directory / MAX_SEQ_LEN_FILE)
    model = _load_model(directory / MODEL_FILE)
    training = _load_training(directory / TRAINING_FILE)
    validate(model, tokenizer, max_seq_len, directory)
    return Bundle(model, tokenizer, max_seq_len, training)


def validate(model, tokenizer: Tokenizer, max_seq_len: int, directory) -> None:
    """Checks that the parts of a bundle belong together."""
    input_shape = tuple(model.input_shape)
    output_shape = tuple(model.output_shape)
    if len(input_shape) != 2 or len(output_shape) != 2:
        raise BundleError(
            f"{directory}/{MODEL_FILE} is not a next-word model (input "
            f"{input_shape}, output {output_shape})"
        )
    if output_shape[-1] != tokenizer.vocab_size:
        raise BundleError(
            f"bundle mismatch in {directory}/: {TOKENIZER_FILE} has "
            f"{tokenizer.vocab_size} ids but {MODEL_FILE} predicts "
            f"{output_shape[-1]} — retrain with `python model.py`"
        )
    if input_shape[1] != max_seq_len:
        raise BundleError(
            f"bundle mismatch in {directory}/: {MAX_SEQ_LEN_FILE} says "
            f"{max_seq_len} but {MODEL_FILE} takes contexts of "
            f"{input_shape[1]} — retrain with `python model.py`"
        )


def _load_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_json(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"corrupt {path}: {e}") from None


def _load_max_seq_len(path: Path) -> int:
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    if not text.isdigit() or int(text) < 1:
        raise BundleError(
            f"corrupt {path}: expected a positive integer, found {text[:20]!r}"
        )
    return int(text)


def _load_model(path: Path):
    import keras

    import moe

    try:
        return keras.saving.load_model(
            path,
            custom_objects=moe.custom_objects(),
            compile=False,
            safe_mode=True,
        )
    except Exception as e:  # Keras raises many types for a corrupt file.
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        reason = reason or type(e).__name__
        raise BundleError(f"cannot load {path}: {reason[:200]}") from None


def _load_training(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
