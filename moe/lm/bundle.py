"""The model bundle (`saved_model/`): safe save, load and validation.

A bundle is a folder holding

- `model.keras`: the Keras v3 model,
- `tokenizer.json`: the versioned tokenizer (`Tokenizer.to_json`),
- `max_seq_len.txt`: the context window, one integer,
- `training.json`: settings, metrics, library versions, trained-at time,
- optionally the pictures `training.png` (loss and accuracy curves),
  `experts.png` (per-expert load over training) and `expert_words.png`
  (the words each expert takes most), for people.

Nothing a user has is lost or half-overwritten:

- The output rule (`check_output`): a bundle is written only to a folder
  that does not exist, is empty, or holds a bundle and nothing else but a
  `README.md` (`KEPT_FILES`, carried over into every new bundle); any other
  file there, a plain file in its place, the current folder or one above
  it, or a place that cannot be written, is refused up front.
- The lock (`OutputLock`): `.<name>.lock` beside the folder, held with
  `fcntl.flock` by the run that writes it, so two runs never interleave;
  the kernel releases it when the process ends, however it ends.
- The swap (`save_bundle`): files go to `.<name>.tmp-*` beside the folder
  and are flushed to disk; then the old bundle is renamed aside
  (`.<name>.old-*`), the new one renamed in, and the old one deleted. A run
  killed between the two renames leaves the old bundle aside: the next
  save, or the next load, puts it back.
- A symlinked folder is written through (the link keeps pointing at the
  bundle); the folder's permissions follow the umask.
"""

import dataclasses
import json
import os
import re
import secrets
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from moe.lm.architectures import MAX_SEQ_LEN
from moe.lm.tokenizer import Tokenizer

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked against each other
    fcntl = None

MODEL_FILE = "model.keras"
TOKENIZER_FILE = "tokenizer.json"
MAX_SEQ_LEN_FILE = "max_seq_len.txt"
TRAINING_FILE = "training.json"
TRAINING_FIGURE = "training.png"
EXPERTS_FIGURE = "experts.png"
EXPERT_WORDS_FIGURE = "expert_words.png"
FIGURES = (TRAINING_FIGURE, EXPERTS_FIGURE, EXPERT_WORDS_FIGURE)
# What serving needs; training.json and the pictures are for people.
REQUIRED_FILES = (MODEL_FILE, TOKENIZER_FILE, MAX_SEQ_LEN_FILE)
OPTIONAL_FILES = (TRAINING_FILE, *FIGURES)
BUNDLE_FILES = REQUIRED_FILES + OPTIONAL_FILES
# Files of the user's that a bundle folder may also hold: never written by a
# save, carried over into the new bundle by each one.
KEPT_FILES = ("README.md",)
# How long a load waits for a bundle another process is swapping in.
SWAP_WAIT_S = 5.0


class BundleError(ValueError):
    """The bundle is missing, corrupt or inconsistent, or may not be written."""


class BundleBusyError(BundleError):
    """Another process holds the lock on the bundle folder."""


class ModelOutputError(BundleError):
    """The model produced NaN or infinite probabilities: it cannot serve."""


@dataclasses.dataclass
class Bundle:
    model: Any  # keras.Model
    tokenizer: Tokenizer
    max_seq_len: int
    training: dict


def check_output(directory: str | Path) -> Path:
    """Checks that a bundle may be written to `directory` (the output rule).

    Cheap, and leaves nothing behind. Symlinks are followed.

    Returns:
        The folder's real path.

    Raises:
        BundleError: what is in the way, and what to do.
    """
    path = Path(directory)
    target = _real(path)
    if Path.cwd().resolve().is_relative_to(target):
        raise BundleError(
            f"cannot write a bundle to {path}: it is the current folder or "
            "one above it; name a new folder such as saved_model"
        )
    if target.exists() and not target.is_dir():
        raise BundleError(
            f"{path} is a file, not a bundle folder; choose a new folder"
        )
    if target.is_dir():
        foreign = sorted(
            entry.name
            for entry in target.iterdir()
            if entry.name not in BUNDLE_FILES + KEPT_FILES
            or entry.is_symlink()
            or not entry.is_file()
        )
        if foreign:
            shown = ", ".join(foreign[:3]) + (
                ", ..." if len(foreign) > 3 else ""
            )
            raise BundleError(
                f"{path} holds files that are not part of a model bundle "
                f"({shown}); a new bundle replaces the whole folder, so "
                "choose a new or empty folder"
            )
    existing = next(p for p in [target, *target.parents] if p.exists())
    if existing == target:
        existing = target.parent
    if not _writable(existing):
        raise BundleError(
            f"cannot write a bundle to {path}: {existing} is not a writable "
            "folder"
        )
    return target


def _writable(folder: Path) -> bool:
    """Whether a file can be created in `folder` (tried: permissions alone
    do not tell a read-only mount, or `/proc` to root)."""
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return False
    return True


class OutputLock:
    """An exclusive, non-blocking lock on a bundle folder.

    `.<name>.lock` beside the folder (it stays there; it is empty apart from
    the holder's process id). Taking it also tidies up after killed runs:
    a bundle left aside by a killed swap is put back, temporary folders are
    deleted.

    Example:
        with OutputLock("saved_model") as lock:
            ...  # train
            save_bundle("saved_model", ..., lock=lock)

    Raises:
        BundleBusyError: another process holds it.
        BundleError: the lock file cannot be created.
    """

    def __init__(self, directory: str | Path):
        self.target = _real(Path(directory))
        self.path = self.target.parent / f".{self.target.name}.lock"
        self._file = None

    def acquire(self) -> None:
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            file = open(self.path, "a+")
        except OSError as e:
            raise BundleError(
                f"cannot write to {self.target.parent}: {e.strerror}"
            ) from None
        if fcntl is not None:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.seek(0)
                holder = file.read().strip() or "unknown"
                file.close()
                raise BundleBusyError(
                    f"{self.target} is being written by another run (process "
                    f"{holder}); wait for it to finish or choose another "
                    "output folder"
                ) from None
        file.truncate(0)
        file.write(f"{os.getpid()}\n")
        file.flush()
        self._file = file
        _restore_interrupted_swap(self.target)
        _remove_leftovers(self.target)

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file releases the flock
            self._file = None

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def save_bundle(
    directory: str | Path,
    model,
    tokenizer: Tokenizer,
    max_seq_len: int,
    training: dict,
    figures: dict[str, bytes] | None = None,
    lock: OutputLock | None = None,
) -> Path:
    """Writes the bundle to `directory` safely (module docstring); its path.

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
    parts = (model, tokenizer, max_seq_len, training, figures)
    target = check_output(directory)
    own_lock = lock is None
    if own_lock:
        lock = OutputLock(target)
        try:
            lock.acquire()
        except BundleBusyError as e:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            kept = target.parent / f"{target.name}.unsaved-{stamp}"
            _write_parts(_new_folder(kept), *parts)
            raise BundleBusyError(f"{e}; this bundle is in {kept}") from None
    try:
        staging = _new_folder(target.parent / f".{target.name}.tmp-")
        try:
            _write_parts(staging, *parts)
            for name in KEPT_FILES:
                if (target / name).is_file():
                    shutil.copy2(target / name, staging / name)
            _swap_in(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        if own_lock:
            lock.release()
    return target


def _write_parts(folder, model, tokenizer, max_seq_len, training, figures):
    model.save(folder / MODEL_FILE)
    (folder / TOKENIZER_FILE).write_text(tokenizer.to_json(), encoding="utf-8")
    (folder / MAX_SEQ_LEN_FILE).write_text(f"{max_seq_len}\n")
    (folder / TRAINING_FILE).write_text(
        json.dumps(training, indent=1, default=str) + "\n", encoding="utf-8"
    )
    for name, png in figures.items():
        (folder / name).write_bytes(png)
    # On disk before the swap: a crash just after it must not leave empty
    # files where the old bundle was.
    for path in folder.iterdir():
        _sync(path)
    _sync(folder)


def _new_folder(prefix: Path) -> Path:
    """A new folder named `prefix` plus a random suffix (mode from umask)."""
    while True:
        path = prefix.with_name(f"{prefix.name}{secrets.token_hex(4)}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _swap_in(staging: Path, target: Path) -> None:
    if not target.exists():
        os.rename(staging, target)
    else:
        old = target.parent / f".{target.name}.old-{time.time_ns()}"
        os.rename(target, old)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _sync(target.parent)


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _set_aside(target: Path) -> list[Path]:
    """Old bundles a killed swap left beside `target`, newest last."""
    return sorted(target.parent.glob(f".{target.name}.old-*"))


def _restore_interrupted_swap(target: Path) -> None:
    # Under the lock: no swap is under way.
    aside = _set_aside(target)
    if aside and not target.exists():
        os.rename(aside[-1], target)


def _remove_leftovers(target: Path) -> None:
    # Under the lock: every temporary folder is a dead run's.
    for path in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(path, ignore_errors=True)
    if target.exists():
        for path in _set_aside(target):
            shutil.rmtree(path, ignore_errors=True)


def _recover(target: Path) -> None:
    """Puts back a bundle a killed swap left aside, before a load."""
    if target.exists() or not _set_aside(target):
        return
    lock = OutputLock(target)
    try:
        lock.acquire()  # restores it
    except BundleBusyError:  # a run is swapping its bundle in right now
        deadline = time.monotonic() + SWAP_WAIT_S
        while not target.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    except BundleError:  # cannot write here: the message below says where
        pass
    else:
        lock.release()


def weights_are_finite(model) -> bool:
    """Whether every weight of `model` is finite (no NaN, no infinity)."""
    return all(np.isfinite(w).all() for w in model.get_weights())


def check_files(directory: str | Path) -> Path:
    """Checks that the bundle's files exist (cheap: no TensorFlow).

    Raises:
        BundleError: no bundle, or an incomplete one.
    """
    directory = Path(directory)
    _recover(_real(directory))
    missing = [f for f in REQUIRED_FILES if not (directory / f).is_file()]
    if len(missing) == len(REQUIRED_FILES):
        aside = _set_aside(_real(directory))
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

    Raises:
        BundleError: missing, incomplete, corrupt or inconsistent files; the
            message says which and what is wrong.
    """
    directory = check_bundle(directory)
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


def _check_archive(path: Path) -> None:
    """`model.keras` is a whole zip archive holding a Keras model."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
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
