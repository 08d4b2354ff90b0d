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
JSON body. Bodies are always valid JSON (never a bare `NaN`). The one
exception: a request aiohttp cannot parse (malformed line or headers, a
header over 8190 bytes) gets aiohttp's own plain-text 400, before the
application sees it (docs/http.md).

Slow or many clients cannot pile up: a request must arrive whole (line and
headers) within `header_timeout_s` of its connection opening (or of the
previous response on a kept-alive connection), its body within
`body_timeout_s` and, after `body_grace_s`, at `min_body_rate` bytes/s on
average (408 otherwise); past `max_pending` requests in progress, new ones
get 503, past `max_pending_per_client` from one address, 429. Request
bodies are decoded and tokenized off the event loop, so large requests do
not delay `/healthz`.

This module wires the application (handlers, JSON errors, the serving
loop); its parts: `server_config` (limits and batching, checked without
aiohttp), `requests` (a request body -> texts, or a 4xx),
`batcher` (`MicroBatcher`).

Example:
    app = create_app(NextWordPredictor.load("saved_model"))
    asyncio.run(serve(app, "127.0.0.1", 8000))
"""

import asyncio
import json
import logging
import signal
from collections.abc import Callable

from aiohttp import web

from moe.lm.errors import ModelOutputError
from moe.lm.serving.batcher import MicroBatcher
from moe.lm.serving.requests import RequestError, parse_predict
from moe.lm.serving.server_config import ServerConfig, check_port
from moe.lm.text.tokenizer import NUM_RESERVED

# Also importable from here, where they are used.
__all__ = [
    "BATCHER", "CONFIG", "HEALTH_PATH", "METADATA_PATH", "PREDICT_PATH",
    "MicroBatcher", "RequestError", "ServerConfig", "check_port",
    "create_app", "model_metadata", "run", "serve", "warm_up",
]  # fmt: skip

MODEL_NAME = "moe"
PREDICT_PATH = f"/v1/models/{MODEL_NAME}:predict"
METADATA_PATH = f"/v1/models/{MODEL_NAME}"
HEALTH_PATH = "/healthz"
ROUTES = f"POST {PREDICT_PATH}, GET {METADATA_PATH}, GET {HEALTH_PATH}"
log = logging.getLogger("moe.lm.serving.server")
BATCHER = web.AppKey("batcher", "MicroBatcher")
CONFIG = web.AppKey("config", "ServerConfig")


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
    by_client: dict[str, int] = {}  # remote address -> requests in progress

    async def predict(request: web.Request) -> web.Response:
        nonlocal pending
        if pending >= config.max_pending:
            raise RequestError(
                f"the server is busy ({pending} requests in progress); "
                "retry shortly",
                status=503,
            )
        client = request.remote or ""
        if by_client.get(client, 0) >= config.max_pending_per_client:
            raise RequestError(
                f"too many requests in progress from {client} (at most "
                f"{config.max_pending_per_client}); retry when they finish",
                status=429,
            )
        pending += 1
        by_client[client] = by_client.get(client, 0) + 1
        try:
            body = await _read_body(request, config)
            # Decoding and tokenizing a large body takes a while: off the
            # event loop, in the loop's default thread pool.
            texts, top = await asyncio.get_running_loop().run_in_executor(
                None, parse_predict, body, predictor, config, max_top
            )
            predictions = await batcher.submit(texts, top)
        finally:
            pending -= 1
            by_client[client] -= 1
            if not by_client[client]:
                del by_client[client]
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
    from moe.lm.model.routed_layers import routed_layers

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
    from moe.lm.model.routed_layers import moe_layer_of

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


async def _read_body(request: web.Request, config: ServerConfig) -> bytes:
    """The body, decoded as its Content-Encoding says; a `RequestError` if it
    is too large (413), too slow (408) or cannot be decoded (400)."""
    limit = config.max_body_bytes
    too_large = RequestError(
        f"the body is larger than {limit} bytes", status=413, close=True
    )
    if (request.content_length or 0) > limit:
        raise too_large
    loop = asyncio.get_running_loop()
    start = loop.time()
    chunks, size = [], 0
    while True:
        # Whole within body_timeout_s; after body_grace_s, at min_body_rate.
        by_rate = start + config.body_grace_s + size / config.min_body_rate
        by_total = start + config.body_timeout_s
        try:
            chunk = await asyncio.wait_for(
                request.content.readany(), min(by_rate, by_total) - loop.time()
            )
        except asyncio.TimeoutError:
            if by_rate < by_total:
                rate = config.min_body_rate
                message = f"the body arrived slower than {rate} bytes/s"
            else:
                seconds = config.body_timeout_s
                message = f"the body did not arrive within {seconds:g} s"
            raise RequestError(message, status=408, close=True) from None
        except web.RequestPayloadError as e:
            # A body that is not what its Content-Encoding says (e.g. "gzip"
            # on plain JSON), or broken chunked framing, found while reading.
            # aiohttp's message: "400, message:\n  Can not decode content-...".
            detail = str(e).strip().splitlines()[-1].strip()
            # The rest is never read: without the end marked, aiohttp would
            # read on after the answer and log the error again.
            request.content.feed_eof()
            raise RequestError(
                f"the body cannot be read ({detail}); send it as its "
                "Content-Encoding and Transfer-Encoding headers say",
                close=True,
            ) from None
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:  # decoded (e.g. gunzipped) past the limit
            raise too_large
        chunks.append(chunk)


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
        response = _error(e.status, e.message)
        if e.close:
            response.force_close()
        return response
    except web.HTTPMethodNotAllowed as e:
        allowed = ", ".join(sorted(e.allowed_methods))
        return _error(
            405,
            f"{request.method} is not allowed on {request.path}; use {allowed}",
            headers={"Allow": allowed},
        )
    except web.HTTPNotFound:
        return _error(404, f"no route {request.path}; routes: {ROUTES}")
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
    from moe.lm.serving.predictor import BUCKETS

    word = predictor.tokenizer.vocabulary[0]
    for size in BUCKETS:
        predictor.explain([word] * size)
        if size >= max_batch:
            break
