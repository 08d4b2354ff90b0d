"""The limits of text generation (`NextWordPredictor.generate_words`).

No TensorFlow: `serve.py` checks `--generate` and `--temperature` with
`check_generation` before the model loads.
"""

import math

from moe.lm.errors import QueryError

# The most words one `generate` call continues a text by: each is a model
# call, one after the other.
MAX_GENERATE = 10_000


def check_generation(
    num_words: int | None = None, temperature: float | None = None
) -> None:
    """Raises `QueryError` (a `ValueError`) unless `num_words` is between 1 and
    `MAX_GENERATE` and `temperature` is a finite number > 0 (`None`: not
    given, not checked)."""
    if num_words is not None and not 1 <= num_words <= MAX_GENERATE:
        raise QueryError(
            f"`num_words` must be between 1 and {MAX_GENERATE}. "
            f"Received: num_words={num_words}"
        )
    if temperature is not None and not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise QueryError(
            "`temperature` must be a finite number > 0. Received: "
            f"temperature={temperature}"
        )
