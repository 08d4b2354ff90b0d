"""`NextWordPredictor`: a trained bundle behind a batched, compiled call."""

from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np

from moe.lm.bundle.save_load import load_bundle
from moe.lm.errors import CorpusError, ModelOutputError, QueryError
from moe.lm.model.metrics import EPSILON, next_word_metrics
from moe.lm.serving.generation import check_generation
from moe.lm.text.corpus import pair_positions, token_stream
from moe.lm.text.examples import contexts
from moe.lm.text.tokenizer import NUM_RESERVED, OOV_ID, Tokenizer

# Batch sizes the compiled call sees: a batch is padded up to the next one,
# so at most len(BUCKETS) traces ever happen. Bigger batches are chunked.
BUCKETS = (1, 8, 64, 512)


class NextWordPredictor:
    """Predicts the next word of a text with a trained model.

    The context of a query is its last `max_seq_len` words (see
    `moe.lm.text.examples.contexts`, shared with training). Padding and the
    out-of-vocabulary token are never predicted; a query of only unknown
    words still gets the best real word.

    Example:
        predictor = NextWordPredictor.load("saved_model")
        predictor.predict_next("how are")          # "you"
        predictor.predict_next(["how are", "the"])  # ["you", "cat"]
        predictor.top("how are", 3)  # [("you", 0.61), ("we", 0.1), ...]
    """

    def __init__(self, model: keras.Model, tokenizer: Tokenizer, max_seq_len):
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_len = int(max_seq_len)
        self._predict = _compiled(model, self.max_seq_len)
        self._explained_fn = None

    @classmethod
    def load(cls, model_dir: str | Path = "saved_model") -> "NextWordPredictor":
        """Loads and validates a bundle written by `model.py`.

        Raises:
            moe.lm.bundle.layout.BundleError: what is missing or wrong.
        """
        bundle = load_bundle(model_dir)
        return cls(bundle.model, bundle.tokenizer, bundle.max_seq_len)

    def encode(self, text: str) -> list[int]:
        """Word ids of `text`.

        Raises:
            QueryError: the text has no words.
        """
        if not isinstance(text, str):
            raise TypeError(f"a query must be a string, got {type(text)}")
        ids = self.tokenizer.encode(text)
        if not ids:
            raise QueryError(f"empty query: no words in {text!r}")
        return ids

    def probabilities(self, texts: list[str]) -> np.ndarray:
        """Next-word probabilities `(len(texts), vocab_size)`, batched."""
        # Only the last max_seq_len words can be in a context.
        queries = [self.encode(t)[-self.max_seq_len :] for t in texts]
        if not queries:
            return np.zeros((0, self.tokenizer.vocab_size), np.float32)
        size = BUCKETS[-1]
        return np.concatenate(
            [
                self._probabilities(queries[i : i + size])
                for i in range(0, len(queries), size)
            ]
        )

    def _probabilities(self, queries: list[list[int]]) -> np.ndarray:
        """Lays the queries end to end as one stream and runs the model."""
        return _finite(self._predict(*self._stream(queries))[: len(queries)])

    def _stream(self, queries: list[list[int]]):
        """`(tokens, ends, begins)` of queries padded to a bucket."""
        n = len(queries)
        batch = next(b for b in BUCKETS if b >= n)
        width = self.max_seq_len
        tokens = np.full(batch * width, OOV_ID, np.int32)
        begins = np.arange(batch, dtype=np.int32) * width
        # Padding rows get a one-word (OOV) context: harmless, never NaN.
        ends = begins + 1
        for row, ids in enumerate(queries):
            tokens[begins[row] : begins[row] + len(ids)] = ids
            ends[row] = begins[row] + len(ids)
        return tokens, ends, begins

    def predict_next(self, text: str | list[str]) -> str | list[str]:
        """The most probable next word of `text` (or of each text)."""
        single = isinstance(text, str)
        probs = self.probabilities([text] if single else list(text))
        ids = np.argmax(probs[:, NUM_RESERVED:], axis=-1) + NUM_RESERVED
        words = self.tokenizer.decode(ids.tolist())
        return words[0] if single else words

    def top(self, text: str, n: int = 5) -> list[tuple[str, float]]:
        """The `n` most probable next words with their probabilities.

        Raises:
            QueryError: `n` is not between 1 and the number of real words.
        """
        self._check_top("n", n)
        probs = self.probabilities([text])[0, NUM_RESERVED:]
        order = np.argsort(-probs, kind="stable")[:n]
        words = self.tokenizer.decode((order + NUM_RESERVED).tolist())
        return [(w, float(probs[i])) for w, i in zip(words, order, strict=True)]

    def explain(self, texts: list[str], top: int = 1) -> list[dict]:
        """Next word, likeliest words and routing of each text, in one call.

        The probabilities and the routing come from the same batched model
        call (`moe.lm.model.explain.ExplainedModel`).

        Args:
            texts: the queries.
            top: how many likeliest words to list, >= 1.

        Returns:
            One dict per text: `"word"` (the most probable next word),
            `"top"` (`[[word, probability], ...]`, most probable first) and,
            for a model with one routed layer, `"experts"`
            (`[[expert, gate weight], ...]`, heaviest first; dropped pairs
            left out) or, with several, `"experts_by_layer"`
            (`{layer name: [[expert, weight], ...]}`, input side first).

        Raises:
            QueryError: a text has no words, or `top` < 1.
        """
        from moe.lm.model.explain import experts_by_row

        self._check_top("top", top)
        queries = [self.encode(t)[-self.max_seq_len :] for t in texts]
        explained, names = self._explained()
        results, size = [], BUCKETS[-1]
        for start in range(0, len(queries), size):
            chunk = queries[start : start + size]
            probs, routes = explained(*self._stream(chunk))
            probs = _finite(probs[: len(chunk)])[:, NUM_RESERVED:]
            for row in range(len(chunk)):
                order = np.argsort(-probs[row], kind="stable")[:top]
                words = self.tokenizer.decode((order + NUM_RESERVED).tolist())
                result = {
                    "word": words[0],
                    "top": [
                        [w, float(probs[row, i])]
                        for w, i in zip(words, order, strict=True)
                    ],
                }
                experts = [experts_by_row(route, row) for route in routes]
                if len(experts) == 1:
                    result["experts"] = experts[0]
                else:
                    result["experts_by_layer"] = dict(zip(names, experts))
                results.append(result)
        return results

    def _check_top(self, name: str, n: int) -> None:
        real_words = self.tokenizer.vocab_size - NUM_RESERVED
        if not 1 <= n <= real_words:
            raise QueryError(
                f"`{name}` must be between 1 and {real_words} (the real "
                f"words of the vocabulary). Received: {name}={n}"
            )

    def _explained(self):
        """`(tokens, ends, begins) -> (probabilities, routes)` (NumPy), names.

        Built on first use and kept (compiled as the plain prediction is).
        """
        if self._explained_fn is None:
            from moe.lm.model.explain import ExplainedModel

            model = ExplainedModel(self.model)
            self._explained_fn = (
                _compiled(model, self.max_seq_len),
                model.layer_names,
            )
        return self._explained_fn

    def generate(
        self,
        text: str,
        num_words: int,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> list[str]:
        """Continues `text` by `num_words` words (see `generate_words`)."""
        return list(self.generate_words(text, num_words, temperature, seed))

    def generate_words(
        self,
        text: str,
        num_words: int,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> Iterator[str]:
        """The words continuing `text`, one at a time as they are predicted.

        Greedy by default; with `temperature > 0`, samples from the real-word
        probabilities sharpened (< 1) or flattened (> 1) by `temperature`.

        Raises:
            QueryError: `text` has no words, `num_words` is not between 1 and
                `moe.lm.serving.generation.MAX_GENERATE`, or `temperature` is
                not a finite number > 0 (checked at once, before the first
                word).
        """
        check_generation(num_words, temperature)
        ids = self.encode(text)
        return self._continue(ids, num_words, temperature, seed)

    def _continue(self, ids, num_words, temperature, seed) -> Iterator[str]:
        rng = np.random.default_rng(seed)
        for _ in range(num_words):
            context = [ids[-self.max_seq_len :]]
            probs = self._probabilities(context)[0, NUM_RESERVED:]
            if temperature:
                index = rng.choice(len(probs), p=_sharpened(probs, temperature))
            else:
                index = int(np.argmax(probs))
            ids.append(index + NUM_RESERVED)
            yield self.tokenizer.decode([ids[-1]])[0]

    def evaluate(self, text: str) -> dict:
        """Next-word top-1 / top-5 accuracy and perplexity on `text`.

        Pairs are built exactly as in training (`contexts`, sentence
        boundaries included). An out-of-vocabulary target is a miss.

        Raises:
            CorpusError: the text gives no (context, next word) pair.
        """
        tokens, starts = token_stream(self.tokenizer, [text])
        positions = pair_positions(starts)
        if len(positions) == 0:
            raise CorpusError(
                "nothing to evaluate: the text needs a sentence of at least "
                "2 words"
            )
        probs, size = [], BUCKETS[-1]
        for i in range(0, len(positions), size):
            ends = positions[i : i + size]
            n = len(ends)
            # Pad to a bucket by repeating the first pair.
            ends = np.resize(ends, next(b for b in BUCKETS if b >= n))
            probs.append(self._predict(tokens, ends, starts[ends])[:n])
        return next_word_metrics(np.concatenate(probs), tokens[positions])


def _sharpened(probs: np.ndarray, temperature: float) -> np.ndarray:
    """`probs ** (1 / temperature)`, normalised, without overflow.

    In log space relative to the largest probability: every value is at
    most 0 before the division, so no temperature turns it into NaN.
    """
    logits = np.log(np.maximum(probs.astype(np.float64), EPSILON))
    weights = np.exp((logits - logits.max()) / temperature)
    return weights / weights.sum()


def _finite(probs: np.ndarray) -> np.ndarray:
    if not np.isfinite(probs).all():
        raise ModelOutputError(
            "the model produced NaN or infinite probabilities, so it has no "
            "answer — retrain it with `python model.py`"
        )
    return probs


def _compiled(model, max_seq_len: int):
    """`(tokens, ends, begins) -> model(contexts)`, in and out NumPy.

    TensorFlow: one concrete function for every batch size, so a call skips
    `tf.function`'s signature matching (`bench/serving_latency.py` times a
    call). Other backends: contexts on the host, then Keras's compiled
    (jitted on JAX) predict step.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        spec = tf.TensorSpec([None], tf.int32)

        @tf.function(
            input_signature=[spec] * 3, jit_compile=False, autograph=False
        )
        def call(tokens, ends, begins):
            inputs = contexts(tokens, ends, begins, max_seq_len)
            return model(inputs, training=False)

        concrete = call.get_concrete_function()

        def run(*args):
            # Tensors made here: the concrete function's own conversion of
            # NumPy arguments takes a slower, generic path.
            tensors = [tf.constant(np.asarray(a, np.int32)) for a in args]
            outputs = concrete(*tensors)
            return tf.nest.map_structure(lambda t: t.numpy(), outputs)

        return run

    def run(tokens, ends, begins):
        inputs = contexts(tokens, ends, begins, max_seq_len).numpy()
        outputs = model.predict_on_batch(inputs)
        return keras.tree.map_structure(keras.ops.convert_to_numpy, outputs)

    return run
