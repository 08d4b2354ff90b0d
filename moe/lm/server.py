"""HTTP JSON API for a trained bundle, in TensorFlow Serving's REST shape.

Routes:

- `POST /v1/models/moe:predict`: `{"instances": ["how are", ...],
  "top": 3}` -> `{"predictions": [{"word": "you", "top": [["you", 0.33],
  ...], "experts": [[2, 0.6], [0, 0.4]]}, ...]}` (`top` is optional,
  default 1; a model with several routed layers answers
  `"experts_by_layer": {layer: [[expert, weight], ...]}` instead of
  `"experts"`, see `NextWordPredictor.explain`).
- `GET /v1/models/moe`: metadata (vocabulary size, `max_seq_len`, experts,
  routing, architecture, trained-at, validation metrics, limits).
- `GET /healthz`: `{"status": "ok"}` and request / model-call counters.

Concurrent requests share model calls: `MicroBatcher` queues each request's
instances, gathers what arrives within `batch_wait_ms` of the oldest waiting
request (or until `max_batch` instances wait), runs ONE predictor call in a
single worker thread (off the event loop) and hands each request its rows.

Every client error is a 4xx with a JSON body `{"error": "..."}` and the
server keeps serving; a bug, or a model that produces NaN, is a 500 with a
JSON body. Bodies are always valid JSON (never a bare `NaN`).

Slow or many clients cannot pile up: a request must arrive whole (line and
headers) within `header_timeout_s` of its connection opening (or of the
previous response on a kept-alive connection), its body within
`body_timeout_s`; past `max_pending` requests in progress, new ones get
503. Request bodies are decoded and tokenized off the event loop, so large
requests do not delay `/healthz`.

Example:
    app = create_app(NextWordPredictor.load("saved_model"))
    asyncio.run(serve(app, "127.0.0.1", 8000))
"""

import asyncio
import collections
import concurrent.futures
import dataclasses
import json
import logging
import signal
from collections.abc import Callable

from aiohttp import web

from moe.lm.bundle import ModelOutputError
from moe.lm.tokenizer import NUM_RESERVED

MODEL_NAME = "moe"
PREDICT_PATH = f"/v1/models/{MODEL_NAME}:predict"
METADATA_PATH = f"/v1/models/{MODEL_NAME}"
HEALTH_PATH = "/healthz"
ROUTES = f"POST {PREDICT_PATH}, GET {METADATA_PATH}, GET {HEALTH_PATH}"
# The most digits of a number in a request body.
MAX_DIGITS = 18

log = logging.getLogger("moe.lm.server")
BATCHER = web.AppKey("batcher", "MicroBatcher")
CONFIG = web.AppKey("config", "ServerConfig")


@dataclasses.dataclass
class ServerConfig:
    """Limits and batching of the HTTP server.

    Args:
        max_instances: most instances in one request.
        max_body_bytes: largest request body.
        max_top: largest `"top"` a request may ask for.
        max_batch: most instances in one model call; 1 disables combining
            requests (each request is then its own call).
        batch_wait_ms: longest a request waits for others to share its
            model call.
        max_pending: most predict requests in progress at once; more get
            503 ("busy, retry").
        header_timeout_s: longest wait for a whole request line and headers.
        body_timeout_s: longest wait for a request body.
    """

    max_instances: int = 64
    max_body_bytes: int = 1 << 20
    max_top: int = 100
    max_batch: int = 64
    batch_wait_ms: float = 2.0
    max_pending: int = 256
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0

    def __post_init__(self):
        for name in ("max_instances", "max_body_bytes", "max_top", "max_batch",
                     "max_pending"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(
                    f"`{name}` must be at least 1. Received: "
                    f"{name}={getattr(self, name)}"
                )
        if not 0 <= self.batch_wait_ms <= 1000:
            raise ValueError(
                "`batch_wait_ms` must be between 0 and 1000. Received: "
                f"batch_wait_ms={self.batch_wait_ms}"
            )
        for name in ("header_timeout_s", "body_timeout_s"):
            if not 0 < getattr(self, name) <= 3600:
                raise ValueError(
                    f"`{name}` must be > 0 and at most 3600. Received: "
                    f"{name}={getattr(self, name)}"
                )


def check_port(port: int) -> None:
    """Raises `ValueError` unless `port` is a TCP port (0: any free one)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"`port` must be 0-65535. Received: port={port}")


class RequestError(Exception):
    """A client error: answered with `status` and `{"error": message}`."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


@dataclasses.dataclass
class _Pending:
    texts: list[str]
    top: int
    future: asyncio.Future
    arrived: float


class MicroBatcher:
    """Runs the queries of concurrent requests in shared model calls.

    A request waits at most `max_wait_s` (counted from the oldest waiting
    request) for others to join its call, or less once `max_batch`
    instances wait; a request's instances are never split across calls.
    Calls run one at a time in a single worker thread, so the event loop
    keeps accepting requests while the model runs, and requests arriving
    meanwhile form the next call.

    Args:
        predict: `(texts, top) -> list of per-text results` (blocking), e.g.
            `NextWordPredictor.explain`; each result's `"top"` list is cut
            to the request's own `top`.
        max_batch: most instances per call.
        max_wait_s: longest wait for a call to fill.

    Example:
        batcher = MicroBatcher(predictor.explain, 64, 0.002)
        batcher.start()
        results = await batcher.submit(["how are"], top=3)
        await batcher.stop()
    """

    def __init__(self, predict: Callable, max_batch: int, max_wait_s: float):
        self.predict = predict
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.requests = 0
        self.instances = 0
        self.model_calls = 0
        self._pending: collections.deque[_Pending] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def start(self) -> None:
        """Starts the batching task (inside the running event loop)."""
        self._wakeup = asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="moe-predict"
        )
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stops the task; requests still waiting get an error."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for pending in self._pending:
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("server stopping"))
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def submit(self, texts: list[str], top: int) -> list[dict]:
        """The results of `texts`, computed in a shared model call."""
        future = asyncio.get_running_loop().create_future()
        loop_time = asyncio.get_running_loop().time()
        self._pending.append(_Pending(texts, top, future, loop_time))
        self.requests += 1
        self.instances += len(texts)
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            if not self._pending:
                self._wakeup.clear()
                continue
            # Wait for company, bounded from the oldest request's arrival.
            deadline = self._pending[0].arrived + self.max_wait_s
            while self._waiting_instances() < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = self._take_batch()
            if not self._pending:
                self._wakeup.clear()
            await self._compute(loop, batch)

    def _waiting_instances(self) -> int:
        return sum(len(p.texts) for p in self._pending)

    def _take_batch(self) -> list[_Pending]:
        batch = [self._pending.popleft()]  # always at least one request
        size = len(batch[0].texts)
        while self._pending and size + len(self._pending[0].texts) <= (
            self.max_batch
        ):
            batch.append(self._pending.popleft())
            size += len(batch[-1].texts)
        return batch

    async def _compute(self, loop, batch: list[_Pending]) -> None:
        texts = [text for pending in batch for text in pending.texts]
        top = max(pending.top for pending in batch)
        self.model_calls += 1
        try:
            results = await loop.run_in_executor(
                self._executor, self.predict, texts, top
            )
        except Exception as e:  # a bug: every request of the call gets it
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(e)
            return
        start = 0
        for pending in batch:
            rows = results[start : start + len(pending.texts)]
            start += len(pending.texts)
            if pending.top < top:
                rows = [{**r, "top": r["top"][: pending.top]} for r in rows]
            if not pending.future.done():  # not given up by the client
                pending.future.set_result(rows)


def create_app(
    predictor,
    training: dict | None = None,
    config: ServerConfig | None = None,
) -> web.Application:
    """The aiohttp application serving `predictor`.

    Args:
        predictor: a `NextWordPredictor`.
        training: the bundle's `training.json` (for the metadata).
        config: limits and batching; defaults to `ServerConfig()`.

    Returns:
        An `aiohttp.web.Application`; its batcher starts and stops with it
        (`app[BATCHER]`).
    """
    config = config or ServerConfig()
    metadata = model_metadata(predictor, training or {}, config)
    real_words = predictor.tokenizer.vocab_size - NUM_RESERVED
    max_top = min(config.max_top, real_words)
    batcher = MicroBatcher(
        predictor.explain, config.max_batch, config.batch_wait_ms / 1000
    )

    pending = 0

    async def predict(request: web.Request) -> web.Response:
        nonlocal pending
        if pending >= config.max_pending:
            raise RequestError(
                f"the server is busy ({pending} requests in progress); "
                "retry shortly",
                status=503,
            )
        pending += 1
        try:
            body = await _read_body(request, config.body_timeout_s)
            # Decoding and tokenizing a large body takes a while: off the
            # event loop, in the loop's default thread pool.
            texts, top = await asyncio.get_running_loop().run_in_executor(
                None, _parse_predict, body, predictor, config, max_top
            )
            predictions = await batcher.submit(texts, top)
        finally:
            pending -= 1
        return _json({"predictions": predictions})

    async def model_info(request: web.Request) -> web.Response:
        return _json(metadata)

    async def health(request: web.Request) -> web.Response:
        return _json(
            {
                "status": "ok",
                "requests": batcher.requests,
                "instances": batcher.instances,
                "model_calls": batcher.model_calls,
                "pending": pending,
            }
        )

    async def start_batcher(app):
        batcher.start()

    async def stop_batcher(app):
        await batcher.stop()

    app = web.Application(
        client_max_size=config.max_body_bytes, middlewares=[_json_errors]
    )
    app[BATCHER] = batcher
    app[CONFIG] = config
    app.router.add_post(PREDICT_PATH, predict)
    app.router.add_get(METADATA_PATH, model_info)
    app.router.add_get(HEALTH_PATH, health)
    app.on_startup.append(start_batcher)
    app.on_cleanup.append(stop_batcher)  # after in-flight requests finish
    return app


def model_metadata(predictor, training: dict, config: ServerConfig) -> dict:
    """What `GET /v1/models/moe` answers."""
    from moe.lm.explain import routed_layers

    # training.json is optional and for people: use what is well-formed.
    training = training if isinstance(training, dict) else {}
    settings = training.get("config")
    settings = settings if isinstance(settings, dict) else {}
    layers = [_layer_info(layer) for layer in routed_layers(predictor.model)]
    first = layers[0] if layers else {}
    return {
        "name": MODEL_NAME,
        "architecture": settings.get("architecture", "pooled"),
        "vocab_size": predictor.tokenizer.vocab_size,
        "max_seq_len": predictor.max_seq_len,
        "num_experts": first.get("num_experts"),
        "experts_per_input": first.get("experts_per_input"),
        "routing": first.get("routing"),
        "moe_layers": layers,
        "trained_at": training.get("trained_at"),
        "validation": training.get("validation"),
        "limits": {
            "max_instances": config.max_instances,
            "max_body_bytes": config.max_body_bytes,
            "max_top": min(
                config.max_top, predictor.tokenizer.vocab_size - NUM_RESERVED
            ),
        },
        "batching": {
            "max_batch": config.max_batch,
            "batch_wait_ms": config.batch_wait_ms,
        },
    }


def _layer_info(layer) -> dict:
    """Name, experts and routing of a routed layer (or the MoE inside)."""
    from moe.lm.explain import moe_layer_of

    moe_layer = moe_layer_of(layer)
    routing = moe_layer.routing  # a name, or a router object
    return {
        "name": layer.name,
        "num_experts": int(moe_layer.num_experts),
        "experts_per_input": int(moe_layer.experts_per_input),
        "routing": routing
        if isinstance(routing, str)
        else type(routing).__name__,
        "capacity_factor": moe_layer.capacity_factor,
    }


async def _read_body(request: web.Request, timeout_s: float) -> bytes:
    try:
        # 413 past client_max_size
        return await asyncio.wait_for(request.read(), timeout_s)
    except asyncio.TimeoutError:
        raise RequestError(
            f"the body did not arrive within {timeout_s:g} s", status=408
        ) from None


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


def _parse_predict(body, predictor, config, max_top) -> tuple[list, int]:
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
        if not predictor.tokenizer.encode(text):
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


def _json(data, status: int = 200, headers=None) -> web.Response:
    # `allow_nan=False`: a NaN raises here (a 500) instead of going out as
    # a bare `NaN`, which is not JSON.
    return web.json_response(
        data, status=status, headers=headers, dumps=_strict_dumps
    )


def _strict_dumps(data) -> str:
    return json.dumps(data, allow_nan=False)


def _error(status: int, message: str, headers=None) -> web.Response:
    return _json({"error": message}, status=status, headers=headers)


@web.middleware
async def _json_errors(request: web.Request, handler) -> web.StreamResponse:
    """Every error as JSON: 4xx for the client's, 500 only for a bug."""
    try:
        return await handler(request)
    except RequestError as e:
        return _error(e.status, e.message)
    except web.HTTPMethodNotAllowed as e:
        allowed = ", ".join(sorted(e.allowed_methods))
        return _error(
            405,
            f"{request.method} is not allowed on {request.path}; use {allowed}",
            headers={"Allow": allowed},
        )
    except web.HTTPNotFound:
        return _error(404, f"no route {request.path}; routes: {ROUTES}")
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONFIG].max_body_bytes
        return _error(413, f"the body is larger than {limit} bytes")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _error(e.status, e.reason)
    except ModelOutputError as e:  # a broken model, not a bug
        log.error("%s %s: %s", request.method, request.path, e)
        return _error(500, str(e))
    except Exception:
        log.exception("error answering %s %s", request.method, request.path)
        return _error(500, "internal server error")


async def serve(
    app: web.Application,
    host: str = "127.0.0.1",
    port: int = 8000,
    ready: Callable[[str], None] = print,
    stop: asyncio.Event | None = None,
) -> None:
    """Serves `app` until SIGINT / SIGTERM (or `stop` is set).

    Shutdown is graceful: the server stops accepting connections, lets
    in-flight requests finish, then stops the batcher.

    Args:
        ready: called with the base URL once listening (port 0 picks a
            free port; the URL has the real one).
    """
    # aiohttp closes a connection on which no whole request arrived within
    # `keepalive_timeout` of its opening or of the last response.
    check_port(port)
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=10.0,
        keepalive_timeout=app[CONFIG].header_timeout_s,
    )
    await runner.setup()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        if ":" in bound_host:
            bound_host = f"[{bound_host}]"
        ready(f"http://{bound_host}:{bound_port}")
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await runner.cleanup()


def run(
    predictor,
    training: dict,
    config: ServerConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    ready: Callable[[str], None] = print,
) -> None:
    """Warms the predictor up, then serves it until SIGINT / SIGTERM."""
    warm_up(predictor, config.max_batch)
    app = create_app(predictor, training, config)
    asyncio.run(serve(app, host, port, ready=ready))


def warm_up(predictor, max_batch: int) -> None:
    """Traces the compiled call for every batch size serving can use."""
    from moe.lm.predictor import BUCKETS

    word = predictor.tokenizer.vocabulary[0]
    for size in BUCKETS:
        predictor.explain([word] * size)
        if size >= max_batch:
            break
