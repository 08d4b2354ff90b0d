"""The model bundle (`saved_model/`): save, load and validation.

A bundle is a folder holding

- `model.keras`: the Keras v3 model,
- `tokenizer.json`: the versioned tokenizer (`Tokenizer.to_json`),
- `max_seq_len.txt`: the context window, one integer,
- `training.json`: settings, metrics, library versions, trained-at time,
- optionally the pictures `training.png` (loss and accuracy curves),
  `experts.png` (per-expert load over training) and `expert_words.png`
  (the words each expert takes most), for people.

Nothing a user has is lost or half-overwritten: a save goes through
`moe.lm.bundle.folder` (the output rule `check_output`, the `OutputLock`,
the atomic swap); a load first puts back a bundle a killed swap left aside.
The file names and the errors are in `moe.lm.bundle.layout`.
"""

import dataclasses
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from moe.lm.bundle.folder import (
    FolderPin,
    OutputLock,
    real_path,
    recover,
    set_aside,
    write_folder,
)
from moe.lm.bundle.layout import (
    FIGURES,
    MAX_SEQ_LEN,
    MAX_SEQ_LEN_FILE,
    MODEL_FILE,
    REQUIRED_FILES,
    TOKENIZER_FILE,
    TRAINING_FILE,
)
from moe.lm.errors import BundleError
from moe.lm.text.tokenizer import Tokenizer


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
    lock: OutputLock | None = None,
) -> Path:
    """Writes the bundle to `directory` safely (`folder.write_folder`);
    its path.

    Args:
        figures: optional `{file name: PNG bytes}`, names among
            `FIGURES`.
        lock: the caller's `OutputLock` on `directory`, if it holds one
            (a training holds it from start to end); else one is taken for
            the save.

    Raises:
        BundleError: the output rule refuses `directory`.
        BundleBusyError: another process holds the lock; the new bundle is
            then saved beside it, in a folder the message names.
    """
    figures = figures or {}
    unknown = set(figures) - set(FIGURES)
    if unknown:
        raise ValueError(
            f"`figures` may hold {', '.join(FIGURES)}. "
            f"Received: {sorted(unknown)}"
        )
    return write_folder(
        directory,
        lambda folder: _write_parts(
            folder, model, tokenizer, max_seq_len, training, figures
        ),
        lock,
    )


def _write_parts(folder, model, tokenizer, max_seq_len, training, figures):
    model.save(folder / MODEL_FILE)
    (folder / TOKENIZER_FILE).write_text(tokenizer.to_json(), encoding="utf-8")
    (folder / MAX_SEQ_LEN_FILE).write_text(f"{max_seq_len}\n")
    (folder / TRAINING_FILE).write_text(
        json.dumps(training, indent=1, default=str) + "\n", encoding="utf-8"
    )
    for name, png in figures.items():
        (folder / name).write_bytes(png)


def weights_are_finite(model) -> bool:
    """Whether every weight of `model` is finite (no NaN, no infinity)."""
    return all(np.isfinite(w).all() for w in model.get_weights())


def check_files(directory: str | Path) -> Path:
    """Checks that the bundle's files exist (cheap: no TensorFlow).

    Raises:
        BundleError: no bundle, or an incomplete one.
    """
    directory = Path(directory)
    recover(real_path(directory))
    missing = [f for f in REQUIRED_FILES if not (directory / f).is_file()]
    if len(missing) == len(REQUIRED_FILES):
        aside = set_aside(real_path(directory))
        if aside:
            raise BundleError(
                f"no trained model in {directory}/, but an interrupted save "
                f"left the previous one in {aside[-1]}: rename it to "
                f"{directory}"
            )
        raise BundleError(
            f"no trained model in {directory}/ — run `python model.py` first"
        )
    if missing:
        raise BundleError(
            f"incomplete model in {directory}/ (missing "
            f"{', '.join(missing)}) — run `python model.py` again"
        )
    return directory


def check_bundle(directory: str | Path) -> Path:
    """Checks every file of a bundle that can be checked without TensorFlow.

    The files exist; `tokenizer.json` and `max_seq_len.txt` parse;
    `model.keras` is a complete, undamaged Keras archive.

    Raises:
        BundleError: what is missing or wrong, and where.
    """
    directory = check_files(directory)
    _load_tokenizer(directory / TOKENIZER_FILE)
    _load_max_seq_len(directory / MAX_SEQ_LEN_FILE)
    _check_archive(directory / MODEL_FILE)
    return directory


def load_bundle(directory: str | Path) -> Bundle:
    """Loads and validates a bundle.

    The files come from one bundle: a save that swaps a new bundle in while
    they are read (`FolderPin` tells) has them read again, once.

    Raises:
        BundleError: missing, incomplete, corrupt or inconsistent files; the
            message says which and what is wrong.
    """
    for _ in range(2):
        directory = check_files(directory)  # waits for a swap under way
        try:
            pin = FolderPin(directory)
        except FileNotFoundError:  # swapped out since: read again
            continue
        with pin:
            try:
                loaded = _load_parts(directory)
            except (BundleError, OSError):
                if pin.replaced():  # what failed may be a mix of two
                    continue
                raise
            if not pin.replaced():
                return loaded
    raise BundleError(
        f"{directory}/ was replaced by another save twice while it loaded "
        "(a training is saving to it): load it again when the save is done"
    )


def _load_parts(directory: Path) -> Bundle:
    check_bundle(directory)
    tokenizer = _load_tokenizer(directory / TOKENIZER_FILE)
    max_seq_len = _load_max_seq_len(directory / MAX_SEQ_LEN_FILE)
    model = _load_model(directory / MODEL_FILE)
    training = _load_training(directory / TRAINING_FILE)
    validate(model, tokenizer, max_seq_len, directory)
    return Bundle(model, tokenizer, max_seq_len, training)


def validate(model, tokenizer: Tokenizer, max_seq_len: int, directory) -> None:
    """Checks that the parts of a bundle belong together, and the weights."""
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
    if not weights_are_finite(model):
        raise BundleError(
            f"{directory}/{MODEL_FILE} has weights that are NaN or infinite "
            "(its training diverged) — retrain with `python model.py`"
        )


def _load_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_json(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"corrupt {path}: {e}") from None


def _load_max_seq_len(path: Path) -> int:
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    if not re.fullmatch("[0-9]{1,9}", text) or not (
        1 <= int(text) <= MAX_SEQ_LEN
    ):
        raise BundleError(
            f"corrupt {path}: expected a whole number from 1 to "
            f"{MAX_SEQ_LEN}, found {text[:20]!r}"
        )
    return int(text)


# The weights inside `model.keras`; its other members (config.json,
# metadata.json) hold settings.
WEIGHTS_MEMBER = "model.weights.h5"
# The settings of a model are kilobytes (a layer's arguments, not its
# weights): they may expand to a quarter of the weights, and at least this
# much (a tiny model's settings outweigh its weights).
SETTINGS_FLOOR = 4 << 20
# Keras stores the weights uncompressed, and trained float weights shrink by
# less than 2x when zipped; a deflate bomb expands up to ~1000x.
MAX_EXPANSION = 20


def _check_archive(path: Path) -> None:
    """`model.keras` is a whole zip archive holding a Keras model, whose
    members expand to sizes a model can have (checked before anything is
    expanded: Keras reads config.json whole into memory)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            _check_expanded_sizes(path, archive.infolist())
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError):
        raise BundleError(
            f"corrupt {path}: not a complete .keras archive (truncated or "
            "damaged) — copy it again or retrain with `python model.py`"
        ) from None
    if damaged is not None:
        raise BundleError(f"corrupt {path}: its {damaged} is damaged")
    if "config.json" not in names:
        raise BundleError(f"{path} is not a Keras model (no config.json)")


def _check_expanded_sizes(path: Path, members: list) -> None:
    weights = [m for m in members if m.filename == WEIGHTS_MEMBER]
    others = [m for m in members if m.filename != WEIGHTS_MEMBER]
    weights_size = sum(m.file_size for m in weights)
    stored = sum(m.compress_size for m in weights)
    if weights_size > MAX_EXPANSION * max(stored, 1 << 20):
        raise BundleError(
            f"{path} is refused: its {WEIGHTS_MEMBER} expands from "
            f"{_mib(stored)} to {_mib(weights_size)}, more than weights "
            f"expand (at most {MAX_EXPANSION}x) — it is not a model.py "
            "bundle; copy it again or retrain with `python model.py`"
        )
    settings_size = sum(m.file_size for m in others)
    cap = max(SETTINGS_FLOOR, weights_size // 4)
    if settings_size > cap:
        largest = max(others, key=lambda m: m.file_size)
        raise BundleError(
            f"{path} is refused: its {largest.filename} expands to "
            f"{_mib(largest.file_size)}, more than a model's settings need "
            f"({_mib(cap)}: a quarter of its weights, at least "
            f"{_mib(SETTINGS_FLOOR)}) — it is not a model.py bundle; copy "
            "it again or retrain with `python model.py`"
        )


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


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
        raise BundleError(f"cannot load {path}: {_reason(e)}") from None


def _reason(error: BaseException) -> str:
    """What went wrong inside Keras's nested deserialization errors.

    Keras wraps a layer's own `ValueError` (e.g. an unknown `routing`) in
    generic "could not be deserialized" errors: the innermost one says
    what is wrong, the one naming a class says where.
    """
    chain = []
    while error is not None and len(chain) < 50:
        chain.append(error)
        error = error.__cause__ or error.__context__
    reason = str(chain[-1]).strip().splitlines()
    reason = reason[0][:300] if reason else type(chain[-1]).__name__
    classes = [
        m.group(1)
        for e in chain
        if (m := re.search(r"deserializing class '(\w+)'", str(e)))
    ]
    if len(chain) > 1 and classes:
        return f"its {classes[-1]} cannot be rebuilt: {reason}"
    return reason


def _load_training(path: Path) -> dict:
    """`training.json` (optional, for people): `{}` unless a JSON object."""
    try:
        training = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return training if isinstance(training, dict) else {}
