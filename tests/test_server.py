"""The HTTP JSON API (`moe.lm.serving.server`): answers, batching, bad requests,
load, graceful shutdown. Loopback only, on a tiny trained bundle."""

import asyncio
import gzip
import json
import random
import signal
import subprocess
import sys
import threading
import time
import types

import aiohttp
import keras
import numpy as np
import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from conftest import REPO_ROOT, load_script, script_env

from moe.lm.bundle.layout import TRAINING_FILE
from moe.lm.serving import requests
from moe.lm.serving.batcher import MicroBatcher
from moe.lm.serving.server import (
    BATCHER,
    HEALTH_PATH,
    METADATA_PATH,
    PREDICT_PATH,
    create_app,
    serve,
)
from moe.lm.serving.server_config import ServerConfig
from moe.lm.text.tokenizer import NUM_RESERVED

QUERIES = [
    "the cat",
    "How are",
    "i am fine, thank",
    "zzz qqq",  # only unknown words
    "don't worry about the",
    "one two three four five six seven the dog sat on the",  # > max_seq_len
    "the 3 dogs' mat?",
]


@pytest.fixture(scope="module")
def training(lm_trained):
    return json.loads((lm_trained[0] / TRAINING_FILE).read_text())


def run_with_server(predictor, training, body, config=None):
    """Runs `await body(session, app)` against a live loopback server."""

    async def main():
        app = create_app(predictor, training, config)
        async with TestServer(app, host="127.0.0.1") as server:
            async with ClientSession(str(server.make_url(""))) as session:
                return await body(session, app)

    return asyncio.run(main())


def reference_route(predictor, text):
    """Kept (expert, weight) pairs from `MoELayer.route` on one hand-built
    context (last max_seq_len ids, 0-padded), heaviest first."""
    model = predictor.model
    ids = predictor.tokenizer.encode(text)[-predictor.max_seq_len :]
    context = [0] * (predictor.max_seq_len - len(ids)) + ids
    layer = model.get_layer("moe")
    pooled = keras.Model(model.input, layer.input)(np.array([context]))
    route = layer.route(pooled)
    pairs = [
        (int(e), float(w))
        for e, w, kept in zip(
            np.asarray(route["expert_indices"])[0],
            np.asarray(route["expert_weights"])[0],
            np.asarray(route["kept"])[0],
        )
        if kept
    ]
    return sorted(pairs, key=lambda pair: -pair[1])


def stand_in(predictor, **changes):
    """`predictor` with some of what the server uses replaced."""
    parts = {
        "model": predictor.model,
        "tokenizer": predictor.tokenizer,
        "max_seq_len": predictor.max_seq_len,
        "explain": predictor.explain,
    }
    return types.SimpleNamespace(**{**parts, **changes})


def check_prediction(predictor, text, top, answer, probs=None):
    """`answer` agrees with `NextWordPredictor` on `text` (ties allowed).

    `probs`: the predictor's probabilities for `text`, if already known.
    """
    if probs is None:
        probs = predictor.probabilities([text])[0]
    real = probs[NUM_RESERVED:]
    assert answer["word"] == answer["top"][0][0]
    assert len(answer["top"]) == min(top, len(real))
    listed = []
    for word, p in answer["top"]:
        word_id = predictor.tokenizer.word_id(word)
        assert word_id >= NUM_RESERVED  # never padding or OOV
        assert p == pytest.approx(probs[word_id], rel=1e-4, abs=1e-6)
        listed.append(word_id - NUM_RESERVED)
    # The listed words are the likeliest: none left out is more probable.
    rest = np.delete(real, listed)
    if len(rest):
        assert answer["top"][-1][1] >= rest.max() - 1e-6
    ps = [p for _, p in answer["top"]]
    assert ps == sorted(ps, reverse=True)


def test_predict_matches_the_predictor_and_the_layer_route(
    lm_predictor, training
):
    async def body(session, app):
        async with session.post(
            PREDICT_PATH, json={"instances": QUERIES, "top": 3}
        ) as r:
            assert r.status == 200
            assert r.content_type == "application/json"
            return await r.json()

    predictions = run_with_server(lm_predictor, training, body)["predictions"]
    assert len(predictions) == len(QUERIES)
    assert [p["word"] for p in predictions] == lm_predictor.predict_next(
        QUERIES
    )
    for text, answer in zip(QUERIES, predictions):
        check_prediction(lm_predictor, text, 3, answer)
        expected = reference_route(lm_predictor, text)
        assert [e for e, _ in answer["experts"]] == [e for e, _ in expected]
        np.testing.assert_allclose(
            [w for _, w in answer["experts"]],
            [w for _, w in expected],
            rtol=1e-5,
        )
        assert set(answer) == {"word", "top", "experts"}
    # Routing depends on the query: the tiny model does not send all the
    # queries to the same experts with the same weights.
    assert len({json.dumps(p["experts"]) for p in predictions}) > 1


def test_top_defaults_to_one(lm_predictor, training):
    async def body(session, app):
        async with session.post(
            PREDICT_PATH, json={"instances": ["how are"]}
        ) as r:
            return await r.json()

    (answer,) = run_with_server(lm_predictor, training, body)["predictions"]
    assert len(answer["top"]) == 1
    check_prediction(lm_predictor, "how are", 1, answer)


def test_metadata_and_health(lm_predictor, training):
    async def body(session, app):
        async with session.get(METADATA_PATH) as r:
            assert r.status == 200
            metadata = await r.json()
        async with session.get(HEALTH_PATH) as r:
            assert r.status == 200
            return metadata, await r.json()

    metadata, health = run_with_server(lm_predictor, training, body)
    assert metadata["vocab_size"] == lm_predictor.tokenizer.vocab_size
    assert metadata["max_seq_len"] == lm_predictor.max_seq_len
    assert metadata["num_experts"] == training["config"]["num_experts"]
    assert metadata["routing"] == training["config"]["routing"]
    assert metadata["architecture"] == "pooled"
    assert metadata["trained_at"] == training["trained_at"]
    assert metadata["moe_layers"][0]["name"] == "moe"
    assert health == {
        "status": "ok",
        "requests": 0,
        "instances": 0,
        "model_calls": 0,
        "pending": 0,
    }


BAD_REQUESTS = [
    # (method, path, raw body, status, words of the error message)
    ("POST", PREDICT_PATH, b'{"instances": ["how are"', 400, "not valid JSON"),
    ("POST", PREDICT_PATH, b"", 400, "not valid JSON"),
    ("POST", PREDICT_PATH, b'["how are"]', 400, "JSON object"),
    ("POST", PREDICT_PATH, b"{}", 400, "missing"),
    ("POST", PREDICT_PATH, b'{"instances": []}', 400, "empty"),
    ("POST", PREDICT_PATH, b'{"instances": "how are"}', 400, "list"),
    ("POST", PREDICT_PATH, b'{"instances": null}', 400, "list"),
    ("POST", PREDICT_PATH, b'{"instances": ["a", 3]}', 400, "instances[1]"),
    ("POST", PREDICT_PATH, b'{"instances": [["a"]]}', 400, "string"),
    ("POST", PREDICT_PATH, b'{"instances": ["a", "?!"]}', 400, "no words"),
    ("POST", PREDICT_PATH, b'{"instance": ["a"]}', 400, "unknown field"),
    ("POST", PREDICT_PATH, b'{"instances": ["a"], "top": "3"}', 400, "top"),
    ("POST", PREDICT_PATH, b'{"instances": ["a"], "top": 0}', 400, "top"),
    ("POST", PREDICT_PATH, b'{"instances": ["a"], "top": 1.5}', 400, "top"),
    ("POST", PREDICT_PATH, b'{"instances": ["a"], "top": true}', 400, "top"),
    ("POST", PREDICT_PATH, b'{"instances": ["a"], "top": 99999}', 400, "top"),
    ("POST", PREDICT_PATH, b'{"instances": ["a"], "top": NaN}', 400, "NaN"),
    ("POST", PREDICT_PATH, b'{"instances": ["caf\xe9"]}', 400, "UTF-8"),
    ("POST", PREDICT_PATH, b"[" * 1500 + b"]" * 1500, 400, "nested"),
    ("POST", PREDICT_PATH, b"[" + b"1" * 19 + b"]", 400, "at most 18"),
    (
        "POST",
        PREDICT_PATH,
        b'{"instances": ' + b'["a"' + b', "b"' * 8 + b"]}",
        413,
        "too many instances",
    ),  # fmt: skip
    (
        "POST",
        PREDICT_PATH,
        b'{"instances": ["' + b"a " * 3000 + b'"]}',
        413,
        "larger than 4096 bytes",
    ),  # fmt: skip
    ("GET", "/v1/models/other", b"", 404, "no route"),
    ("POST", "/v1/models/other:predict", b"{}", 404, "no route"),
    ("GET", "/", b"", 404, "no route"),
    ("GET", PREDICT_PATH, b"", 405, "use POST"),
    ("DELETE", HEALTH_PATH, b"", 405, "use GET"),
    ("PUT", METADATA_PATH, b"{}", 405, "not allowed"),
]


def test_bad_requests_get_a_json_4xx_and_the_server_keeps_serving(
    lm_predictor, training
):
    config = ServerConfig(max_instances=8, max_body_bytes=4096)

    async def body(session, app):
        answers = []
        for method, path, data, _, _ in BAD_REQUESTS:
            async with session.request(method, path, data=data) as r:
                answers.append(
                    (r.status, r.content_type, await r.json(), r.headers)
                )
            # Still serving after each bad request.
            async with session.post(
                PREDICT_PATH, json={"instances": ["how are"]}
            ) as r:
                assert r.status == 200, await r.text()
        return answers

    answers = run_with_server(lm_predictor, training, body, config)
    for (method, path, _, status, words), answer in zip(BAD_REQUESTS, answers):
        got_status, content_type, payload, headers = answer
        case = f"{method} {path}: {payload}"
        assert got_status == status, case
        assert content_type == "application/json", case
        assert set(payload) == {"error"} and words in payload["error"], case
        if status == 405:
            assert headers["Allow"] in payload["error"]


def test_a_body_that_is_not_its_content_encoding_is_a_json_400(
    lm_predictor, training, caplog
):
    text = json.dumps({"instances": ["how are"]}).encode()

    async def body(session, app):
        answers = []
        for data in (text, gzip.compress(text)):
            async with session.post(
                PREDICT_PATH, data=data, headers={"Content-Encoding": "gzip"}
            ) as r:
                answers.append((r.status, await r.json()))
        return answers

    (status, payload), (gzip_status, _) = run_with_server(
        lm_predictor, training, body
    )
    assert status == 400, payload
    assert "the body cannot be read" in payload["error"]
    assert "content-encoding: gzip" in payload["error"].lower()
    assert gzip_status == 200  # a real gzip body is decoded
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_a_bug_is_a_500_with_a_json_body(lm_predictor, training):
    def broken_explain(texts, top):
        raise RuntimeError("bug")

    predictor = stand_in(lm_predictor, explain=broken_explain)

    async def body(session, app):
        async with session.post(
            PREDICT_PATH, json={"instances": ["how are"]}
        ) as r:
            return r.status, await r.json()

    status, payload = run_with_server(predictor, training, body)
    assert status == 500 and payload == {"error": "internal server error"}


def fake_predict(calls):
    """A predictor stand-in recording each call's texts."""

    def predict(texts, top):
        calls.append(list(texts))
        return [
            {"word": t, "top": [[t, 1.0 / (i + 1)] for i in range(top)]}
            for t in texts
        ]

    return predict


@pytest.mark.parametrize("max_batch", [1, 3, 64])
def test_micro_batcher_shares_calls_and_routes_rows_back(max_batch):
    requests = [[f"r{i}-{j}" for j in range(1 + i % 3)] for i in range(12)]

    async def main():
        calls = []
        batcher = MicroBatcher(fake_predict(calls), max_batch, 0.05)
        batcher.start()
        answers = await asyncio.gather(
            *(
                batcher.submit(texts, 1 + i % 4)
                for i, texts in enumerate(requests)
            )  # fmt: skip
        )
        await batcher.stop()
        return calls, answers, batcher

    calls, answers, batcher = asyncio.run(main())
    for i, (texts, rows) in enumerate(zip(requests, answers)):
        assert [r["word"] for r in rows] == texts  # its own rows, in order
        assert all(len(r["top"]) == 1 + i % 4 for r in rows)
    # Every text computed once; a request's texts never split across calls.
    flat = [t for call in calls for t in call]
    assert sorted(flat) == sorted(t for texts in requests for t in texts)
    for texts in requests:
        assert any(call[i : i + len(texts)] == texts for call in calls
                   for i in range(len(call)))  # fmt: skip
    assert batcher.model_calls == len(calls)
    assert batcher.requests == len(requests)
    if max_batch == 1:
        assert len(calls) == len(requests)  # no batching
    else:
        assert all(len(c) <= max_batch for c in calls)
        assert len(calls) < len(requests)
    if max_batch == 64:
        assert len(calls) == 1  # all arrived within the wait


def test_micro_batcher_waits_at_most_the_bounded_wait():
    async def main():
        calls = []
        batcher = MicroBatcher(fake_predict(calls), 64, 0.02)
        batcher.start()
        first = asyncio.create_task(batcher.submit(["a"], 1))
        await asyncio.sleep(0.5)  # far past the wait: "a" ran alone
        second = await batcher.submit(["b"], 1)
        await batcher.stop()
        return calls, await first, second

    calls, first, second = asyncio.run(main())
    assert calls == [["a"], ["b"]]
    assert first[0]["word"] == "a" and second[0]["word"] == "b"


def test_micro_batcher_survives_a_failing_call():
    async def main():
        calls = []
        ok = fake_predict(calls)

        def predict(texts, top):
            if "boom" in texts:
                raise RuntimeError("boom")
            return ok(texts, top)

        batcher = MicroBatcher(predict, 64, 0.01)
        batcher.start()
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.submit(["boom"], 1)
        answer = await batcher.submit(["fine"], 1)
        await batcher.stop()
        return answer

    assert asyncio.run(main())[0]["word"] == "fine"


def test_load_16_clients_x_200_requests(lm_predictor, training):
    """16 concurrent clients x 200 requests: no errors, every answer right,
    and concurrent requests shared model calls."""
    rng = random.Random(0)
    words = [*lm_predictor.tokenizer.vocabulary, "zzz", "Don't", "42"]
    texts = [
        " ".join(rng.choices(words, k=rng.randint(1, 6))) for _ in range(300)
    ]
    plans = [
        [(rng.choice(texts), rng.randint(1, 3)) for _ in range(200)]
        for _ in range(16)
    ]

    async def client(session, plan):
        answers = []
        for text, top in plan:
            async with session.post(
                PREDICT_PATH, json={"instances": [text], "top": top}
            ) as r:
                answers.append((r.status, await r.json()))
        return answers

    async def body(session, app):
        results = await asyncio.gather(*(client(session, p) for p in plans))
        async with session.get(HEALTH_PATH) as r:
            return results, await r.json()

    results, health = run_with_server(lm_predictor, training, body)
    # The expected answers, straight from the predictor (batched).
    texts = sorted({text for plan in plans for text, _ in plan})
    probs = dict(zip(texts, lm_predictor.probabilities(texts)))
    expected = dict(zip(texts, lm_predictor.explain(texts)))
    for plan, answers in zip(plans, results):
        for (text, top), (status, payload) in zip(plan, answers):
            assert status == 200, payload
            (answer,) = payload["predictions"]
            check_prediction(lm_predictor, text, top, answer, probs[text])
            want = expected[text]["experts"]
            assert [e for e, _ in answer["experts"]] == [e for e, _ in want]
            np.testing.assert_allclose(
                [w for _, w in answer["experts"]],
                [w for _, w in want],
                rtol=1e-5,
            )
    assert health["requests"] == 16 * 200
    assert health["model_calls"] < health["requests"]


def test_graceful_shutdown_finishes_in_flight_requests(lm_predictor, training):
    started = threading.Event()

    def slow_explain(texts, top):
        started.set()
        time.sleep(0.5)
        return lm_predictor.explain(texts, top)

    predictor = stand_in(lm_predictor, explain=slow_explain)

    async def main():
        app = create_app(predictor, training)
        stop, urls = asyncio.Event(), []
        server = asyncio.create_task(
            serve(app, "127.0.0.1", 0, ready=urls.append, stop=stop)
        )
        while not urls:
            await asyncio.sleep(0.01)
        async with ClientSession(urls[0]) as session:
            request = asyncio.create_task(
                session.post(PREDICT_PATH, json={"instances": ["how are"]})
            )
            while not started.is_set():
                await asyncio.sleep(0.01)
            stop.set()  # as SIGTERM does
            response = await request
            payload = await response.json()
            await server
            with pytest.raises(OSError):  # no longer listening
                await session.get(HEALTH_PATH)
        return response.status, payload

    status, payload = asyncio.run(main())
    assert status == 200
    check_prediction(lm_predictor, "how are", 1, payload["predictions"][0])


def test_cli_http_serves_and_stops_on_sigterm(lm_trained):
    process = subprocess.Popen(
        [sys.executable, "serve.py", "--http", "--port", "0", "--max-batch",
         "8", "--model-dir", str(lm_trained[0])],
        cwd=REPO_ROOT, env=script_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = process.stdout.readline()
        assert line.startswith("serving http://127.0.0.1:"), (
            line + process.stderr.read()
        )
        url = line.split()[1]

        async def ask():
            async with ClientSession() as session:
                async with session.post(
                    url, json={"instances": ["how are"], "top": 2}
                ) as r:
                    return r.status, await r.json()

        status, payload = asyncio.run(ask())
        assert status == 200 and len(payload["predictions"][0]["top"]) == 2
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        assert out.strip() == "stopped" and "Traceback" not in err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--http", "--port", "70000"], "--port"),
        (["--http", "--max-batch", "0"], "--max-batch"),
        (["--http", "--batch-wait-ms", "-1"], "--batch-wait-ms"),
        (["--http", "how are"], "takes no TEXT"),
        (["--http", "--eval", "x.txt"], "one of"),
    ],
)
def test_cli_http_bad_flags(flags, words, capsys):
    serve = load_script("serve.py")

    assert serve.main(flags) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("serve.py: error: ") and words in line


# --- a broken model, slow clients, many clients ------------------------------


def test_a_huge_integer_is_a_400_not_a_500(lm_predictor, training):
    # Python refuses to convert integers of over 4300 digits (ValueError).
    async def body(session, app):
        data = b'{"instances": ["a"], "top": ' + b"9" * 5000 + b"}"
        async with session.post(PREDICT_PATH, data=data) as r:
            return r.status, await r.json()

    status, payload = run_with_server(lm_predictor, training, body)
    assert status == 400
    assert payload["error"].startswith("the body has a number of 5000 digits")


def test_a_model_that_outputs_nan_answers_a_json_500(lm_predictor, training):
    from test_predictor import nan_predictor

    async def body(session, app):
        async with session.post(
            PREDICT_PATH, json={"instances": ["how are"]}
        ) as r:
            return r.status, json.loads(await r.text())  # strict JSON

    status, payload = run_with_server(nan_predictor(lm_predictor), training,
                                      body)  # fmt: skip
    assert status == 500
    assert "NaN or infinite probabilities" in payload["error"]


def test_answers_are_always_valid_json(lm_predictor):
    # A NaN in training.json cannot reach a client as a bare `NaN`.
    async def body(session, app):
        async with session.get(METADATA_PATH) as r:
            return r.status, json.loads(
                await r.text(), parse_constant=pytest.fail
            )

    training = {"validation": {"loss": float("nan")}}
    status, payload = run_with_server(lm_predictor, training, body)
    assert status == 500 and payload == {"error": "internal server error"}


@pytest.mark.parametrize("training", [[1, 2], {"config": "x"}, None])
def test_a_malformed_training_json_leaves_the_metadata_working(
    lm_predictor, training
):
    async def body(session, app):
        async with session.get(METADATA_PATH) as r:
            return r.status, await r.json()

    status, metadata = run_with_server(lm_predictor, training, body)
    assert status == 200 and metadata["architecture"] == "pooled"


def run_with_live_server(predictor, body, config):
    """`await body(host, port)` against `serve()` (timeouts included)."""

    async def main():
        app = create_app(predictor, {}, config)
        stop, urls = asyncio.Event(), []
        task = asyncio.create_task(
            serve(app, "127.0.0.1", 0, ready=urls.append, stop=stop)
        )
        while not urls:
            await asyncio.sleep(0.01)
        host, port = urls[0].removeprefix("http://").rsplit(":", 1)
        try:
            return await body(host, int(port))
        finally:
            stop.set()
            await task

    return asyncio.run(main())


async def read_all(reader, limit_s=10.0):
    """What the server sends until it closes the connection."""
    data = b""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while loop.time() < deadline:
        try:
            chunk = await asyncio.wait_for(reader.read(4096), 0.1)
        except asyncio.TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def test_a_slow_body_gets_408_and_the_server_keeps_serving(lm_predictor):
    config = ServerConfig(body_timeout_s=0.5)

    async def body(host, port):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            f"POST {PREDICT_PATH} HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n"
            '\r\n{"inst'.encode()
        )
        await writer.drain()
        answer = await read_all(reader)
        writer.close()
        async with ClientSession() as session:
            async with session.get(f"http://{host}:{port}{HEALTH_PATH}") as r:
                return answer, r.status

    answer, health = run_with_live_server(lm_predictor, body, config)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"error": "the body did not arrive within 0.5 s"' in answer
    assert health == 200


async def start_slow_body(host, port):
    """A predict request whose body's first byte arrives, and no more."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"POST {PREDICT_PATH} HTTP/1.1\r\nHost: x\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n"
        "\r\n{".encode()
    )
    await writer.drain()
    return reader, writer


def test_one_address_cannot_hold_every_request_slot(lm_predictor):
    config = ServerConfig(max_pending=3, max_pending_per_client=2)

    async def body(host, port):
        slow = [await start_slow_body(host, port) for _ in range(3)]
        # The third of one address is refused at once; the two others hold.
        third = await read_all(slow[2][0], 5.0)
        # Another address still gets answers.
        other = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with ClientSession(connector=other) as session:
            async with session.post(
                f"http://{host}:{port}{PREDICT_PATH}",
                json={"instances": ["how are"]},
            ) as r:
                status = r.status
        for _, writer in slow:
            writer.close()
        return third, status

    third, status = run_with_live_server(lm_predictor, body, config)
    assert third.startswith(b"HTTP/1.1 429"), third[:200]
    assert b"too many requests in progress from 127.0.0.1" in third
    assert status == 200


def test_a_trickled_body_is_cut_off_at_the_minimum_rate(lm_predictor):
    config = ServerConfig(
        body_timeout_s=30, body_grace_s=0.5, min_body_rate=100
    )

    async def body(host, port):
        loop = asyncio.get_running_loop()
        started = loop.time()
        reader, writer = await start_slow_body(host, port)
        answer = b""
        for _ in range(90):  # one byte every 0.05 s: 20 bytes/s
            try:
                writer.write(b" ")
                await writer.drain()
            except ConnectionError:
                break
            answer += await read_all(reader, 0.05)
            if answer or reader.at_eof():
                break
        answer += await read_all(reader, 2.0)
        writer.close()
        return answer, loop.time() - started

    answer, seconds = run_with_live_server(lm_predictor, body, config)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"the body arrived slower than 100 bytes/s" in answer
    assert seconds < 3.0


def test_trickled_headers_are_cut_off(lm_predictor):
    config = ServerConfig(header_timeout_s=0.5)

    async def body(host, port):
        reader, writer = await asyncio.open_connection(host, port)
        loop = asyncio.get_running_loop()
        started = loop.time()
        writer.write(f"GET {HEALTH_PATH} HTTP/1.1\r\n".encode())
        closed = False
        for _ in range(50):  # one header byte every 0.1 s, never finished
            try:
                writer.write(b"X")
                await writer.drain()
            except ConnectionError:
                closed = True
                break
            if await read_all(reader, 0.1) == b"" and reader.at_eof():
                closed = True
                break
        writer.close()
        return closed, loop.time() - started

    closed, seconds = run_with_live_server(lm_predictor, body, config)
    assert closed and seconds < 4.0


def test_requests_aiohttp_cannot_parse_get_its_plain_text_400(lm_predictor):
    # The documented exception to "every answer is JSON" (docs/http.md):
    # aiohttp answers these itself, before the application sees them.
    requests = [
        f"GET {HEALTH_PATH} HTTP/1.1\r\nX: {'a' * 9000}\r\n\r\n",
        "GARBAGE\r\n\r\n",
        f"POST {PREDICT_PATH} HTTP/1.1\r\nContent-Length: x\r\n\r\n",
        f"POST {PREDICT_PATH} HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
        "\r\nzz\r\n",
    ]

    async def body(host, port):
        answers = []
        for request in requests:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request.encode())
            await writer.drain()
            answers.append(await read_all(reader))
            writer.close()
        async with ClientSession() as session:
            async with session.get(f"http://{host}:{port}{HEALTH_PATH}") as r:
                return answers, r.status

    answers, health = run_with_live_server(lm_predictor, body, ServerConfig())
    for answer in answers:
        assert answer.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")), answer
        assert b"Content-Type: text/plain" in answer, answer
    assert health == 200


def test_past_max_pending_requests_get_503(lm_predictor):
    release = threading.Event()

    def held_explain(texts, top):
        release.wait(10)
        return lm_predictor.explain(texts, top)

    predictor = stand_in(lm_predictor, explain=held_explain)
    config = ServerConfig(max_pending=2, max_batch=1)

    async def body(session, app):
        async def ask():
            async with session.post(
                PREDICT_PATH, json={"instances": ["how are"]}
            ) as r:
                return r.status, await r.json()

        first = [asyncio.create_task(ask()) for _ in range(2)]
        while app[BATCHER].requests < 2:
            await asyncio.sleep(0.01)
        busy = await ask()
        async with session.get(HEALTH_PATH) as r:
            health = await r.json()
        release.set()
        return busy, health, [await t for t in first]

    busy, health, first = run_with_server(predictor, {}, body, config)
    assert busy[0] == 503 and "the server is busy" in busy[1]["error"]
    assert health["pending"] == 2
    assert [status for status, _ in first] == [200, 200]


def test_request_texts_are_tokenized_once_off_the_event_loop(
    lm_predictor, monkeypatch
):
    # Tokenizing holds the GIL: on the event loop, or twice per text, it
    # delays /healthz while large requests run.
    loop_threads, encode_threads, check_threads = [], [], []
    encode = lm_predictor.tokenizer.encode
    has_words = requests.has_words

    def recording_encode(text):
        encode_threads.append(threading.get_ident())
        return encode(text)

    def recording_has_words(text):
        check_threads.append(threading.get_ident())
        return has_words(text)

    monkeypatch.setattr(lm_predictor.tokenizer, "encode", recording_encode)
    monkeypatch.setattr(requests, "has_words", recording_has_words)

    async def body(session, app):
        loop_threads.append(threading.get_ident())
        async with session.post(
            PREDICT_PATH, json={"instances": ["how are", "the cat"]}
        ) as r:
            return r.status

    assert run_with_server(lm_predictor, {}, body) == 200
    assert len(encode_threads) == 2  # once per text: the model call's
    assert len(check_threads) == 2
    assert loop_threads[0] not in encode_threads + check_threads
