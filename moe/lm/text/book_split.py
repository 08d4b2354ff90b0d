"""Whole-book splits of a folder of books: validate on one, test on one.

Held-out text should be text the model has never seen a line of: a random
sample of lines shares characters, names and phrases with the training
part and flatters every model. `split_books` keeps books whole: one book
validates (early stopping, choices), one tests (reported once), the rest
train. Pure Python; no TensorFlow.
"""

from pathlib import Path
from typing import NamedTuple

from moe.lm.errors import CorpusError


class BookSplit(NamedTuple):
    """The training books, the validation book and the test book."""

    train: list[Path]
    validate: Path
    test: Path


def split_books(
    folder: str | Path, validate: str | None = None, test: str | None = None
) -> BookSplit:
    """Splits the `*.txt` books of `folder` by whole book.

    Args:
        folder: a folder of one text file per book.
        validate, test: the validation and test books, by file name with or
            without `.txt`; by default the last two books by name (the
            second-to-last validates).

    Raises:
        CorpusError: not a folder, fewer than 3 books, an unknown or a
            repeated book name.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CorpusError(f"{folder} is not a folder of books")
    books = sorted(p for p in folder.glob("*.txt") if p.is_file())
    if len(books) < 3:
        raise CorpusError(
            f"{folder} has {len(books)} book(s) (*.txt); a whole-book split "
            "needs at least 3: train, validate, test"
        )
    by_name = {p.stem: p for p in books}
    chosen = []
    for role, name, default in (
        ("validation", validate, books[-2]),
        ("test", test, books[-1]),
    ):
        if name is None:
            chosen.append(default)
            continue
        stem = name.removesuffix(".txt")
        if stem not in by_name:
            raise CorpusError(
                f"no {role} book {name!r} in {folder}; books: "
                + ", ".join(sorted(by_name))
            )
        chosen.append(by_name[stem])
    if chosen[0] == chosen[1]:
        raise CorpusError(
            f"the validation and test books must differ ({chosen[0].name})"
        )
    train = [p for p in books if p not in chosen]
    return BookSplit(train, chosen[0], chosen[1])
