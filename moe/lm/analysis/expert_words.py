"""What the experts learned: the words each expert takes most often.

At the end of training, every validation context is routed once through
the trained model (`moe.lm.model.explain.ExplainedModel`, the routers' own
`route()`), and each kept (word, expert) pair is counted, per MoE layer.
The word of a context is its last one: the pooled model routes the whole
context, which ends with it; the Transformer routes each position, and the
last one holds the last word (the one serving routes too). Every
validation word is so counted once per expert it goes to.

`training.json` records, for each layer and expert, the number of words it
took, its share of the layer's load, and its most frequent words with the
share of its load each makes up (`expert_words`); `serve.py
--expert-words` prints it (`format_table`) and `expert_words.png` draws it
(`moe.lm.analysis.plots.expert_words_png`).
"""

import json
from pathlib import Path

import numpy as np

from moe.lm.bundle.layout import (
    TRAINING_FILE,
)
from moe.lm.errors import BundleError

# The words kept per expert in `training.json`.
TOP_WORDS = 10
# The most validation contexts routed at the end of training.
MAX_CONTEXTS = 50_000
KEY = "expert_words"


def count_words(model, contexts, batch_size: int = 1024) -> dict:
    """`{layer: counts}`: `counts[e, w]`, how often word `w` went to expert `e`.

    Args:
        model: a next-word model with routed layers.
        contexts: int32 `(n, max_seq_len)`, right-aligned; the last column
            is the word counted.
    """
    import keras

    from moe.lm.model.explain import ExplainedModel
    from moe.lm.model.routed_layers import experts_of

    explained = ExplainedModel(model, positions="last")
    vocab_size = int(model.output_shape[-1])
    counts = {
        name: np.zeros((experts_of(layer), vocab_size), np.int64)
        for name, layer in zip(explained.layer_names, explained.routed)
    }
    contexts = np.asarray(contexts, np.int32)
    for start in range(0, len(contexts), batch_size):
        batch = contexts[start : start + batch_size]
        _, routes = explained.predict_on_batch(batch)
        routes = keras.tree.map_structure(keras.ops.convert_to_numpy, routes)
        for name, route in zip(explained.layer_names, routes):
            kept = np.asarray(route["kept"], bool)  # (batch, k)
            experts = np.asarray(route["expert_indices"])[kept]
            words = np.broadcast_to(batch[:, -1:], kept.shape)[kept]
            np.add.at(counts[name], (experts, words), 1)
    return counts


def summarize(counts: dict, tokenizer, top: int = TOP_WORDS) -> dict:
    """What `training.json` records of `count_words`'s counts.

    Returns:
        `{layer: [{"expert", "words_taken", "load", "top_words": [[word,
        count, share of the expert's words], ...]}, ...]}`, `load` being
        the expert's share of the layer's (word, expert) pairs.
    """
    summary = {}
    for name, table in counts.items():
        total = int(table.sum())
        experts = []
        for expert, row in enumerate(table):
            taken = int(row.sum())
            best = np.argsort(-row, kind="stable")[:top]
            experts.append({
                "expert": expert,
                "words_taken": taken,
                "load": taken / total if total else 0.0,
                "top_words": [
                    [tokenizer.decode([int(w)])[0], int(row[w]),
                     float(row[w] / taken)]
                    for w in best if row[w] > 0
                ],
            })  # fmt: skip
        summary[name] = experts
    return summary


def expert_words(model, tokenizer, contexts, top: int = TOP_WORDS) -> dict:
    """`summarize(count_words(model, contexts), tokenizer, top)`."""
    return summarize(count_words(model, contexts), tokenizer, top)


def read(directory: str | Path) -> dict:
    """The `expert_words` a bundle's `training.json` records, checked.

    Raises:
        moe.lm.errors.BundleError: the bundle has no such record (trained
            before it was kept, or without `training.json`), or it is not
            what `summarize` writes (edited by hand; the message names the
            field).
    """
    path = Path(directory) / TRAINING_FILE
    try:
        words = json.loads(path.read_text(encoding="utf-8"))[KEY]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise BundleError(
            f"{path} records no expert words (the bundle was trained before "
            "model.py kept them); train it again with model.py"
        ) from None
    _check_record(words, path)
    return words


def _check_record(words, path: Path) -> None:
    """What `format_table` reads is there, of the type `summarize` writes."""

    def refuse(field: str, expected: str, found) -> None:
        shown = json.dumps(found)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise BundleError(
            f"corrupt {path}: field {field} must be {expected}, found "
            f"{shown} — train the bundle again with model.py"
        )

    if not isinstance(words, dict):
        refuse(KEY, "an object {layer: [expert, ...]}", words)
    for layer, experts in words.items():
        field = f"{KEY}.{layer}"
        if not isinstance(experts, list):
            refuse(field, "a list of experts", experts)
        for i, info in enumerate(experts):
            at = f"{field}[{i}]"
            if not isinstance(info, dict):
                refuse(at, 'an object {"expert", "load", "top_words"}', info)
            for name, expected, ok in (
                ("expert", "a whole number", _is_int),
                ("load", "a number", _is_number),
                ("top_words", "a list", lambda v: isinstance(v, list)),
            ):
                if not ok(info.get(name)):
                    refuse(f"{at}.{name}", expected, info.get(name))
            for j, entry in enumerate(info["top_words"]):
                if not (
                    isinstance(entry, list)
                    and len(entry) == 3
                    and isinstance(entry[0], str)
                    and _is_number(entry[1])
                    and _is_number(entry[2])
                ):
                    refuse(f"{at}.top_words[{j}]", "[word, count, share]",
                           entry)  # fmt: skip


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def format_table(words: dict, top: int) -> str:
    """One line per expert: its load, then its `top` words with shares."""
    lines = []
    for layer, experts in words.items():
        for info in experts:
            shown = "  ".join(
                f"{word} {share:.0%}"
                for word, _, share in info["top_words"][:top]
            )
            lines.append(
                f"{layer} expert {info['expert']} ({info['load']:.0%} of "
                f"the load): {shown}"
            )
    return "\n".join(lines)
