"""A predict request's body -> `(texts, top)`, or a `RequestError` saying
what is wrong with it (the 4xx answer)."""

import json

from moe.lm.errors import UserError
from moe.lm.text.tokenizer import has_words

# The most digits of a number in a request body.
MAX_DIGITS = 18


class RequestError(UserError):
    """A client error: answered with `status` and `{"error": message}`;
    `close`: then the connection is closed (its bytes cannot be trusted)."""

    def __init__(self, message: str, status: int = 400, close: bool = False):
        super().__init__(message)
        self.message = message
        self.status = status
        self.close = close


def _decode_json(body: bytes):
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(
            f"the body is not UTF-8 (bad byte at {e.start})"
        ) from None
    try:
        return json.loads(
            text, parse_constant=_reject_constant, parse_int=_parse_int
        )
    except json.JSONDecodeError as e:
        raise RequestError(f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError("the body's JSON is nested too deeply") from None


def _parse_int(digits: str) -> int:
    # Python refuses to convert more than 4300 digits (a ValueError); no
    # field here needs more than a few.
    if len(digits.lstrip("-")) > MAX_DIGITS:
        raise RequestError(
            f"the body has a number of {len(digits)} digits; numbers here "
            f"have at most {MAX_DIGITS}"
        )
    return int(digits)


def _reject_constant(name: str):
    raise RequestError(f"the body is not valid JSON: {name} is not allowed")


def parse_predict(body, predictor, config, max_top) -> tuple[list, int]:
    """`(texts, top)` of a predict request body; `RequestError` if invalid."""
    body = _decode_json(body)
    if not isinstance(body, dict):
        raise RequestError(
            'the body must be a JSON object such as {"instances": ["how are"]}'
        )
    unknown = sorted(set(body) - {"instances", "top"})
    if unknown:
        raise RequestError(
            f"unknown field {unknown[0]!r}; allowed: instances, top"
        )
    if "instances" not in body:
        raise RequestError('missing "instances": a list of texts')
    texts = body["instances"]
    if not isinstance(texts, list):
        raise RequestError(
            f'"instances" must be a list of texts, not {_json_type(texts)}'
        )
    if not texts:
        raise RequestError('"instances" is empty: give at least one text')
    if len(texts) > config.max_instances:
        raise RequestError(
            f"too many instances: {len(texts)} > {config.max_instances}; "
            "split the request",
            status=413,
        )
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RequestError(
                f"instances[{i}] must be a string, not {_json_type(text)}"
            )
        # Not tokenized here: the model call tokenizes each text once, and
        # tokenizing holds the GIL the event loop needs.
        if not has_words(text):
            raise RequestError(f"instances[{i}] has no words: {text[:50]!r}")
    top = body.get("top", 1)
    if isinstance(top, bool) or not isinstance(top, int):
        raise RequestError(f'"top" must be an integer, not {_json_type(top)}')
    if not 1 <= top <= max_top:
        raise RequestError(
            f'"top" must be between 1 and {max_top}. Received: {top}'
        )
    return texts, top


def _json_type(value) -> str:
    """How a decoded JSON value is called in error messages."""
    names = {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)
