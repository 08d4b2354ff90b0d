"""Writing a bundle folder so that nothing a user has is lost.

- The output rule (`check_output`): a bundle is written only to a folder
  that does not exist, is empty, or holds a bundle and nothing else but a
  `README.md` (`KEPT_FILES`, carried over into every new bundle); any other
  file there, a plain file in its place, the current folder or one above
  it, or a place that cannot be written, is refused up front.
- The lock (`OutputLock`): `.<name>.lock` beside the folder, held with
  `fcntl.flock` by the run that writes it, so two runs never interleave;
  the kernel releases it when the process ends, however it ends.
- The swap (`write_folder`): files go to `.<name>.tmp-*` beside the folder
  and are flushed to disk; then the old bundle is renamed aside
  (`.<name>.old-*`), the new one renamed in, and the old one deleted. A run
  killed between the two renames leaves the old bundle aside: the next
  save, or the next load (`recover`), puts it back.
- A symlinked folder is written through (the link keeps pointing at the
  bundle); the folder's permissions follow the umask.
- A load reads one bundle, whole (`FolderPin`): a swap while it reads is
  seen afterwards, and the load reads again.
"""

import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from moe.lm.bundle.layout import (
    BUNDLE_FILES,
    KEPT_FILES,
    SWAP_WAIT_S,
)
from moe.lm.errors import BundleBusyError, BundleError

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked against each other
    fcntl = None


def check_output(directory: str | Path) -> Path:
    """Checks that a bundle may be written to `directory` (the output rule).

    Cheap, and leaves nothing behind. Symlinks are followed.

    Returns:
        The folder's real path.

    Raises:
        BundleError: what is in the way, and what to do.
    """
    path = Path(directory)
    target = real_path(path)
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
        self.target = real_path(Path(directory))
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
        self._flock(file)
        file.truncate(0)
        file.write(f"{os.getpid()}\n")
        file.flush()
        self._file = file
        _restore_interrupted_swap(self.target)
        _remove_leftovers(self.target)

    def check_free(self) -> None:
        """Raises `BundleBusyError` if another process holds the lock.

        Takes nothing and creates nothing: a run checks it before loading
        TensorFlow, and takes the lock once it trains.
        """
        try:
            file = open(self.path)
        except OSError:
            return  # no lock file: nobody holds it (or it cannot be read)
        with file:
            self._flock(file)  # raises if held; closing releases it

    def _flock(self, file) -> None:
        """Locks `file` (non-blocking); closes it and raises if it is held."""
        if fcntl is None:
            return
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

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file releases the flock
            self._file = None

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def write_folder(
    directory: str | Path,
    write: Callable[[Path], None],
    lock: OutputLock | None = None,
) -> Path:
    """Replaces the bundle folder `directory` with what `write` writes.

    `write(folder)` fills a new, empty folder; it is flushed to disk and
    swapped in for `directory` (module docstring), with the user's
    `KEPT_FILES` carried over. Its path is returned.

    Args:
        lock: the caller's `OutputLock` on `directory`, if it holds one;
            else one is taken for the write.

    Raises:
        BundleError: the output rule refuses `directory`.
        BundleBusyError: another process holds the lock; what `write`
            writes is then saved beside it, in a folder the message names.
    """
    target = check_output(directory)
    own_lock = lock is None
    if own_lock:
        lock = OutputLock(target)
        try:
            lock.acquire()
        except BundleBusyError as e:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            kept = target.parent / f"{target.name}.unsaved-{stamp}"
            _fill(_new_folder(kept), write)
            raise BundleBusyError(f"{e}; this bundle is in {kept}") from None
    try:
        staging = _new_folder(target.parent / f".{target.name}.tmp-")
        try:
            _fill(staging, write)
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


def _fill(folder: Path, write: Callable[[Path], None]) -> None:
    write(folder)
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


class FolderPin:
    """Tells whether `directory` still names the folder it named when pinned.

    A load reads the bundle's files one after another; a save may swap
    another folder in between two reads. Pinned before the reads and asked
    after them (`replaced()`), it tells whether all came from one folder.
    The folder is held open meanwhile: its inode number, which is compared,
    cannot go to a new folder while it is held.

    Example:
        with FolderPin(directory) as pin:
            ...  # read the files
            if pin.replaced():
                ...  # read them again

    Raises:
        FileNotFoundError: `directory` does not exist (a swap is under way).
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        try:
            self._fd = os.open(self.directory, os.O_RDONLY)
            pinned = os.fstat(self._fd)
        except (IsADirectoryError, PermissionError):  # not POSIX: not held
            self._fd = None
            pinned = os.stat(self.directory)
        self._identity = (pinned.st_dev, pinned.st_ino)

    def replaced(self) -> bool:
        try:
            now = os.stat(self.directory)
        except OSError:
            return True
        return (now.st_dev, now.st_ino) != self._identity

    def __enter__(self) -> "FolderPin":
        return self

    def __exit__(self, *exc_info) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def real_path(path: Path) -> Path:
    return Path(os.path.realpath(path))


def set_aside(target: Path) -> list[Path]:
    """Old bundles a killed swap left beside `target`, newest last."""
    return sorted(target.parent.glob(f".{target.name}.old-*"))


def _restore_interrupted_swap(target: Path) -> None:
    # Under the lock: no swap is under way.
    aside = set_aside(target)
    if aside and not target.exists():
        os.rename(aside[-1], target)


def _remove_leftovers(target: Path) -> None:
    # Under the lock: every temporary folder is a dead run's.
    for path in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(path, ignore_errors=True)
    if target.exists():
        for path in set_aside(target):
            shutil.rmtree(path, ignore_errors=True)


def recover(target: Path) -> None:
    """Puts back a bundle a killed swap left aside, before a load."""
    if target.exists() or not set_aside(target):
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
