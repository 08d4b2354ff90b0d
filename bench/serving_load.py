"""Load test of the HTTP server: throughput and latency, batching on / off.

Starts two `serve.py --http` servers on loopback ports — micro-batching on
(the defaults) and off (`--max-batch 1`: one model call per request) — then,
for each number of concurrent clients, runs the same load against one and
then the other (interleaved). Each client sends its requests one after
another (one text each, `top` 1-3, random words of the vocabulary) and
checks every answer is a 200 with one prediction.

Usage:
    python bench/serving_load.py                    # 32 clients x 2000 req
    python bench/serving_load.py --quick            # a few seconds of load
    python bench/serving_load.py --clients 1 4 16 32 --requests 500
    python bench/serving_load.py --json results.json

Reports requests/s, p50 / p99 latency (ms) and model calls per request
(from the server's `/healthz` counters). Timings are machine-dependent: the
clients share the CPU with the server.
"""

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aiohttp import ClientSession, TCPConnector

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="saved_model")
    parser.add_argument("--clients", type=int, nargs="+", default=[32])
    parser.add_argument("--requests", type=int, default=2000,
                        help="requests per client")  # fmt: skip
    parser.add_argument("--batch-wait-ms", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true",
                        help="8 clients x 100 requests")  # fmt: skip
    parser.add_argument("--json", metavar="PATH", help="write results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.requests = [8], 100
    return args


def start_server(model_dir: str, *flags: str):
    """`(process, predict URL)` of a `serve.py --http` on a free port."""
    log = tempfile.TemporaryFile("w+")  # its stderr, shown if it fails
    process = subprocess.Popen(
        [sys.executable, "serve.py", "--http", "--port", "0",
         "--model-dir", model_dir, *flags],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log, text=True,
    )  # fmt: skip
    line = process.stdout.readline()
    if not line.startswith("serving "):
        process.kill()
        log.seek(0)
        sys.exit(
            f"serving_load.py: the server did not start: {line!r}\n"
            + log.read()[-2000:]
        )
    return process, line.split()[1]


async def load(url: str, clients: int, requests: int, texts) -> dict:
    """Runs `clients` x `requests` requests; latencies and counters."""
    health = url.replace("/v1/models/moe:predict", "/healthz")
    latencies, errors = [], 0

    async def client(session, seed):
        nonlocal errors
        rng = random.Random(seed)
        for _ in range(requests):
            body = {"instances": [rng.choice(texts)], "top": rng.randint(1, 3)}
            start = time.perf_counter()
            async with session.post(url, json=body) as response:
                payload = await response.json()
            latencies.append(time.perf_counter() - start)
            if response.status != 200 or len(payload["predictions"]) != 1:
                errors += 1

    connector = TCPConnector(limit=clients)
    async with ClientSession(connector=connector) as session:
        async with session.get(health) as r:
            before = await r.json()
        start = time.perf_counter()
        await asyncio.gather(*(client(session, i) for i in range(clients)))
        wall = time.perf_counter() - start
        async with session.get(health) as r:
            after = await r.json()
    calls = after["model_calls"] - before["model_calls"]
    served = after["requests"] - before["requests"]
    latencies.sort()
    return {
        "clients": clients,
        "requests": clients * requests,
        "errors": errors,
        "seconds": round(wall, 2),
        "requests_per_s": round(clients * requests / wall, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 2),
        "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 2),
        "model_calls": calls,
        "calls_per_request": round(calls / served, 3),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    # The vocabulary straight from tokenizer.json: importing `moe` would
    # load TensorFlow into the load generator.
    tokenizer = Path(args.model_dir) / "tokenizer.json"
    words = json.loads(tokenizer.read_text(encoding="utf-8"))["vocabulary"]
    rng = random.Random(0)
    words = words[:500]
    texts = [
        " ".join(rng.choices(words, k=rng.randint(1, 6))) for _ in range(1000)
    ]
    servers = {
        "batching": start_server(
            args.model_dir, "--batch-wait-ms", str(args.batch_wait_ms)
        ),
        "no batching": start_server(args.model_dir, "--max-batch", "1"),
    }
    results = []
    try:
        for _, url in servers.values():  # warm up connections and caches
            asyncio.run(load(url, 4, 20, texts))
        for clients in args.clients:
            for name, (_, url) in servers.items():
                result = asyncio.run(load(url, clients, args.requests, texts))
                results.append({"server": name, **result})
                print(
                    f"{name:>12} | {clients:3d} clients x {args.requests} | "
                    f"{result['requests_per_s']:7.1f} req/s | p50 "
                    f"{result['p50_ms']:6.2f} ms | p99 "
                    f"{result['p99_ms']:6.2f} ms | "
                    f"{result['calls_per_request']:.3f} model calls/request"
                    f" | errors {result['errors']}",
                    flush=True,
                )
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=60)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
