"""Word-level tokenizer shared by `model.py` and `serve.py`.

Text is lowercased; a word is a run of letters or digits, with apostrophes
kept inside words ("don't", "alice's"); all other punctuation is dropped
(hyphens split words: "daisy-chain" -> "daisy", "chain"). Sentence-final
punctuation (`.`, `!`, `?`) and blank lines end a sentence, so training
contexts never reach back into the previous sentence (single line breaks are
only whitespace, so wrapped prose such as a novel keeps its sentences whole).

Ids: 0 is padding, 1 is the out-of-vocabulary token, then words by
descending count, ties broken alphabetically, so the same text always gives
the same vocabulary. `tokenizer.json` alone reconstructs the tokenizer; it is
plain, versioned JSON (no pickle).

Pure Python on purpose: it imports nothing heavy, so both CLIs can check
their input before loading TensorFlow, and a query is encoded without a
TensorFlow call.
"""

import collections
import json
import re
from collections.abc import Iterable

# The file format's name in tokenizer.json (the module's old path; kept so
# that saved bundles load).
FORMAT = "moe.lm.tokenizer"
FORMAT_VERSION = 1
PAD_ID = 0
OOV_ID = 1
PAD_TOKEN = ""
OOV_TOKEN = "[UNK]"
NUM_RESERVED = 2

# A word, or a sentence boundary: sentence-final punctuation or a blank line.
_TOKEN_RE = re.compile(r"([^\W_]+(?:'[^\W_]+)*)|[.!?]+|\n[^\S\n]*\n")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'"})


def split_sentences(text: str) -> list[list[str]]:
    """Lowercased words of `text`, grouped into non-empty sentences."""
    sentences, current = [], []
    for match in _TOKEN_RE.finditer(text.lower().translate(_APOSTROPHES)):
        word = match.group(1)
        if word:
            current.append(word)
        elif current:
            sentences.append(current)
            current = []
    if current:
        sentences.append(current)
    return sentences


def has_words(text: str) -> bool:
    """Whether `split_words(text)` is not empty (it stops at the first
    word: cheap on a long text)."""
    lowered = text.lower().translate(_APOSTROPHES)
    return any(match.group(1) for match in _TOKEN_RE.finditer(lowered))


def split_words(text: str) -> list[str]:
    """Lowercased words of `text`, ignoring sentence boundaries."""
    return [word for sentence in split_sentences(text) for word in sentence]


def check_vocab_size(vocab_size: int) -> None:
    """Raises `ValueError` unless `vocab_size` leaves room for a real word."""
    if vocab_size < NUM_RESERVED + 1:
        raise ValueError(
            f"`vocab_size` must be at least {NUM_RESERVED + 1}. "
            f"Received: vocab_size={vocab_size}"
        )


class Tokenizer:
    """Maps words to ids and back.

    Args:
        vocabulary: the words, in id order from id 2 (ids 0 and 1 are the
            padding and out-of-vocabulary tokens).
    """

    def __init__(self, vocabulary: Iterable[str]):
        vocabulary = list(vocabulary)
        if len(set(vocabulary)) != len(vocabulary):
            raise ValueError("the vocabulary has duplicate words")
        bad = [w for w in vocabulary if split_words(w) != [w]]
        if bad:
            raise ValueError(
                f"the vocabulary has entries that are not words: {bad[:3]}"
            )
        self.vocabulary = vocabulary
        self._ids = {w: i + NUM_RESERVED for i, w in enumerate(vocabulary)}
        self._words = [PAD_TOKEN, OOV_TOKEN, *vocabulary]

    @classmethod
    def fit(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Builds the vocabulary from `texts`.

        Args:
            texts: strings to count words in.
            vocab_size: the most ids, padding and out-of-vocabulary included.
        """
        check_vocab_size(vocab_size)
        counts = collections.Counter()
        for text in texts:
            counts.update(split_words(text))
        ranked = sorted(counts, key=lambda w: (-counts[w], w))
        return cls(ranked[: vocab_size - NUM_RESERVED])

    @property
    def vocab_size(self) -> int:
        """Number of ids, padding and out-of-vocabulary included."""
        return len(self._words)

    def word_id(self, word: str) -> int:
        return self._ids.get(word, OOV_ID)

    def encode(self, text: str) -> list[int]:
        """Ids of the words of `text` (sentence boundaries ignored)."""
        return [self._ids.get(w, OOV_ID) for w in split_words(text)]

    def encode_sentences(self, text: str) -> list[list[int]]:
        """Ids of the words of `text`, one list per sentence."""
        return [
            [self._ids.get(w, OOV_ID) for w in sentence]
            for sentence in split_sentences(text)
        ]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self._words[i] for i in ids]

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "config": {
                    "lowercase": True,
                    "pad_token": PAD_TOKEN,
                    "oov_token": OOV_TOKEN,
                },
                "vocabulary": self.vocabulary,
            },
            ensure_ascii=False,
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> "Tokenizer":
        """Rebuilds a tokenizer from `to_json()` output.

        Raises:
            ValueError: the JSON is malformed, of another format or version.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON ({e})") from None
        except RecursionError:
            raise ValueError("not valid JSON (nested too deeply)") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a tokenizer file (format != {FORMAT!r})")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"tokenizer format version {version!r} is not supported "
                f"(this code reads version {FORMAT_VERSION})"
            )
        vocabulary = data.get("vocabulary")
        if not isinstance(vocabulary, list) or not all(
            isinstance(w, str) for w in vocabulary
        ):
            raise ValueError("`vocabulary` must be a list of strings")
        return cls(vocabulary)
