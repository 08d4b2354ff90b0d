"""Reading corpora and turning them into one token stream (pure Python).

Kept free of TensorFlow so that both CLIs reject a bad corpus in a fraction
of a second, before loading it.
"""

import importlib.resources
from pathlib import Path

import numpy as np

from moe.lm.errors import CorpusError
from moe.lm.text.tokenizer import Tokenizer

DEFAULT_CORPUS = "default_corpus.txt"


def default_corpus_text() -> str:
    """The built-in corpus shipped as package data (`moe/lm/text/`)."""
    resource = importlib.resources.files("moe.lm.text") / DEFAULT_CORPUS
    return resource.read_text(encoding="utf-8")


def read_text(path: str | Path, encoding: str = "utf-8") -> str:
    """Reads one text file.

    Raises:
        CorpusError: missing, unreadable, binary or not in `encoding`.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorpusError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise CorpusError(f"{path} is a directory, not a text file") from None
    except OSError as e:
        raise CorpusError(f"cannot read {path}: {e.strerror}") from None
    try:
        text = data.decode(encoding)
    except LookupError:
        raise CorpusError(f"unknown text encoding: {encoding!r}") from None
    except UnicodeDecodeError as e:
        raise CorpusError(
            f"{path} is not valid {encoding} text (byte {e.start}); "
            "pass `encoding` if it uses another encoding"
        ) from None
    # After decoding: UTF-16 and UTF-32 text is full of NUL bytes.
    if "\x00" in text:
        raise CorpusError(
            f"{path} looks like a binary file, not {encoding} text (pass "
            "`encoding` if it is text in another encoding, e.g. utf-16)"
        )
    return text


def token_stream(
    tokenizer: Tokenizer, texts: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Encodes `texts` into one stream of ids.

    Returns:
        `(tokens, starts)`, two int32 arrays of the stream's length:
        `tokens[i]` is the id of word `i` and `starts[i]` the index of the
        first word of its sentence (a context never reaches before it).
        Separate texts are separate sentences.
    """
    tokens, starts = [], []
    for text in texts:
        for sentence in tokenizer.encode_sentences(text):
            starts.extend([len(tokens)] * len(sentence))
            tokens.extend(sentence)
    return np.asarray(tokens, np.int32), np.asarray(starts, np.int32)


def pair_positions(starts: np.ndarray) -> np.ndarray:
    """Positions that are targets: those with at least one context word."""
    return np.flatnonzero(np.arange(len(starts)) > starts).astype(np.int32)
