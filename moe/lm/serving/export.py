"""Export a bundle as a TensorFlow SavedModel that takes raw strings.

The SavedModel's serving signature (`serving_default`, also `serve`) takes
`texts`, a batch of UTF-8 strings, and returns `word` (the most probable
next word, a string) and `probability` (float32), with the whole pipeline
in the graph, so TensorFlow Serving (or any TF runtime) needs nothing
else:

1. tokenization with `tf.strings`, mirroring `moe.lm.text.tokenizer` exactly
   (lowercase, curly apostrophes to `'`, words are runs of letters and
   digits with inner apostrophes, everything else separates words),
2. word ids through a `tf.lookup.StaticHashTable` built from the bundle's
   vocabulary (unknown words get the OOV id),
3. the last `max_seq_len` words as the context, built by
   `moe.lm.text.examples.contexts` (the one definition of a context),
4. the Keras model, then the best real word (padding and OOV are never
   predicted). A text with no words answers `""` with probability 0.

Written with `keras.export.ExportArchive`; TensorFlow backend only.

Example:
    export_saved_model("saved_model", "export/moe/1")
    served = tf.saved_model.load("export/moe/1")
    served.signatures["serving_default"](texts=tf.constant(["how are"]))
    # {"word": [b"you"], "probability": [0.33]}
"""

import os
import shutil
import tempfile
from pathlib import Path

import keras

from moe.lm.bundle.save_load import load_bundle
from moe.lm.errors import ExportError
from moe.lm.text.tokenizer import NUM_RESERVED, OOV_ID, Tokenizer


def graph_words(texts, rules: "TokenizerRules | None" = None):
    """The words of each text, exactly as `Tokenizer.encode` splits them.

    Args:
        texts: string tensor `(batch,)`.
        rules: the character tables (default: built on first use).

    Returns:
        A `tf.RaggedTensor` of words, `(batch, None)`.
    """
    import tensorflow as tf

    rules = rules or TokenizerRules.get()
    # str.lower(): a capital sigma ending a word becomes the final form.
    texts = tf.strings.regex_replace(texts, rules.final_sigma, r"\1ς\2")
    for capital, lower in rules.multi_char_lower.items():  # "İ" -> "i̇"
        texts = tf.strings.regex_replace(texts, capital, lower)
    # Then the one-code-point lowercase mappings, from a table.
    chars = tf.strings.unicode_decode(texts, "UTF-8", errors="replace")
    lowered = tf.ragged.map_flat_values(rules.lower_table.lookup, chars)
    chars = chars.with_flat_values(
        tf.where(
            lowered.flat_values < 0, chars.flat_values, lowered.flat_values
        )
    )
    texts = tf.strings.unicode_encode(chars, "UTF-8")
    texts = tf.strings.regex_replace(texts, "[\u2019\u2018`]", "'")
    # Keep the words, turn every other character into a space, then split.
    spaced = tf.strings.regex_replace(texts, f"({rules.word})|(?s:.)", r" \1 ")
    return tf.strings.split(spaced)


class TokenizerRules:
    r"""`moe.lm.text.tokenizer`'s text rules as TensorFlow-ready tables.

    Built from this Python's own Unicode database (the one the tokenizer
    uses), not TensorFlow's, whose Unicode version differs:

    - `word`: an RE2 word pattern; its letter class is exactly the
      characters Python's `[^\W_]` matches,
    - `lower_table`: code point -> `str.lower()` for the one-character
      mappings, `multi_char_lower` for the others ("İ" -> "i̇"),
    - `final_sigma`: where `str.lower()` writes a capital sigma as "ς"
      (after a cased letter, not before one, case-ignorables skipped),
      found by asking `str.lower()` about every character.
    """

    _instance = None

    @classmethod
    def get(cls) -> "TokenizerRules":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def __init__(self):
        import re

        import tensorflow as tf

        # Python does each step on all code points at once (C speed); the
        # separator "\0" is neither cased nor case-ignorable.
        # "\0" itself is left out: a plain "other" character.
        codes = [c for c in range(1, 0x110000) if not 0xD800 <= c <= 0xDFFF]
        chars = [chr(c) for c in codes]
        text = "\0".join(chars)
        letters = [ord(c) for c in re.findall(r"[^\W_]", text)]
        lower_from, lower_to = [], []
        self.multi_char_lower = {}
        for code, char, lower in zip(codes, chars, text.lower().split("\0")):
            if len(lower) > 1:
                self.multi_char_lower[char] = lower
            elif lower != char:
                lower_from.append(code)
                lower_to.append(ord(lower))
        # "ΑΣx": final "ς" unless x is cased; "ΑΣxΑ": "σ" if x is
        # case-ignorable (skipped) or cased.
        before_end = "\0".join("ΑΣ" + c for c in chars).lower().split("\0")
        before_alpha = "\0".join("ΑΣ" + c + "Α" for c in chars)
        before_alpha = before_alpha.lower().split("\0")
        cased, ignorable, other = [], [], [0]
        for code, end, alpha in zip(codes, before_end, before_alpha):
            if end[1] == "σ":
                cased.append(code)
            elif alpha[1] == "σ":
                ignorable.append(code)
            else:
                other.append(code)
        letter = _char_class(letters)
        self.word = f"{letter}+(?:'{letter}+)*"
        c, i, o = (_char_class(x) for x in (cased, ignorable, other))
        self.final_sigma = f"({c}{i}*)Σ({i}*(?:{o}|$))"
        self.lower_table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(lower_from, tf.int32),
                tf.constant(lower_to, tf.int32),
            ),
            default_value=-1,
        )


def _char_class(codes: list[int]) -> str:
    """An RE2 character class matching exactly `codes` (sorted)."""
    ranges, start = [], None
    for previous, code in zip([None, *codes], [*codes, None]):
        if start is None:
            start = code
        elif code is None or code != previous + 1:
            ranges.append((start, previous))
            start = code
    parts = [
        f"\\x{{{a:x}}}" if a == b else f"\\x{{{a:x}}}-\\x{{{b:x}}}"
        for a, b in ranges
    ]
    return "[" + "".join(parts) + "]"


class _NextWord:
    """The serving function and the resources it uses."""

    def __init__(self, model, tokenizer: Tokenizer, max_seq_len: int):
        import tensorflow as tf

        self.model = model
        self.max_seq_len = max_seq_len
        ids = range(NUM_RESERVED, NUM_RESERVED + len(tokenizer.vocabulary))
        self.table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(tokenizer.vocabulary, tf.string),
                tf.constant(list(ids), tf.int64),
            ),
            default_value=OOV_ID,
        )
        self.words = tf.constant(tokenizer.vocabulary, tf.string)
        self.rules = TokenizerRules.get()

    def __call__(self, texts):
        import tensorflow as tf

        from moe.lm.text.examples import contexts

        words = graph_words(texts, self.rules)
        ids = tf.ragged.map_flat_values(self.table.lookup, words)
        flat = tf.cast(ids.flat_values, tf.int32)
        ends = tf.cast(ids.row_limits(), tf.int32)
        begins = tf.cast(ids.row_starts(), tf.int32)
        # A text with no words gets a one-OOV context (appended to the
        # stream), so the model never sees an all-padding row.
        empty = tf.equal(ends, begins)
        size = tf.size(flat)
        stream = tf.concat([flat, [OOV_ID]], axis=0)
        ends = tf.where(empty, size + 1, ends)
        begins = tf.where(empty, size, begins)
        inputs = contexts(stream, ends, begins, self.max_seq_len)
        probs = self.model(inputs, training=False)[:, NUM_RESERVED:]
        best = tf.argmax(probs, axis=-1, output_type=tf.int32)
        return {
            "word": tf.where(empty, "", tf.gather(self.words, best)),
            "probability": tf.where(
                empty, 0.0, tf.cast(tf.reduce_max(probs, axis=-1), tf.float32)
            ),
        }


def export_saved_model(model_dir: str | Path, export_dir: str | Path) -> Path:
    """Writes the bundle in `model_dir` as a SavedModel to `export_dir`.

    The SavedModel is written into a temporary directory beside
    `export_dir` and renamed into place when complete, so a failed export
    leaves nothing behind. `export_dir` must not exist or be empty: an
    export never replaces files (TensorFlow Serving reads numbered
    versions, so a new model goes to a new directory, e.g.
    `export/moe/2`).

    Returns:
        The path of the SavedModel.

    Raises:
        ExportError: not the TensorFlow backend, or `export_dir` is a file
            or a non-empty directory.
        moe.lm.bundle.layout.BundleError: the bundle is missing or invalid.
    """
    if keras.backend.backend() != "tensorflow":
        raise ExportError(
            "--export writes a TensorFlow SavedModel and needs the "
            "TensorFlow backend; run it with KERAS_BACKEND=tensorflow "
            f"(now: {keras.backend.backend()})"
        )
    target = Path(export_dir).absolute()
    _check_target(target)
    bundle = load_bundle(model_dir)
    import tensorflow as tf

    next_word = _NextWord(bundle.model, bundle.tokenizer, bundle.max_seq_len)
    archive = keras.export.ExportArchive()
    archive.track(bundle.model)
    archive.track(next_word.table)
    archive.track(next_word.rules.lower_table)
    archive.add_endpoint(
        "serve",
        next_word,
        input_signature=[tf.TensorSpec([None], tf.string, name="texts")],
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    )
    try:
        archive.write_out(str(staging), verbose=False)
        _check_target(target)  # still free after the (slow) write
        if target.exists():
            target.rmdir()  # empty, checked
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _check_target(target: Path) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ExportError(
            f"{target} already exists and is not empty; export to a new "
            "directory (e.g. the next version number, export/moe/2)"
        )
