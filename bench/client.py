"""The benchmark's client side, run inside the client namespace (no proxy variables).

Each subcommand prints one JSON object. Times are in milliseconds.
    client.py latency  URL CACERT --n N --fresh      per-request latency (new connection each time)
    client.py stream   URL CACERT --repeat R         TTFB and per-chunk delay (server-stamped events)
    client.py load     URL CACERT --concurrency C --requests M
    client.py download URL CACERT                    MB/s of one large body
    client.py first    URL CACERT                    a fresh process's first request (connect included)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import time
from typing import Any

import httpx


def context(cacert: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cacert)


REQUEST = {"model": "claude-sonnet-4-5", "max_tokens": 256,
           "messages": [{"role": "user", "content": "Say hello."}]}
STREAMED = {**REQUEST, "stream": True}
HEADERS = {"x-api-key": "bench", "anthropic-version": "2023-06-01"}


def sent_at(line: str) -> float | None:
    """The send time a bench text delta carries, or None for any other line."""
    if not line.startswith("data: ") or "text_delta" not in line:
        return None
    return float(json.loads(line[6:])["delta"]["text"])


def latency(url: str, cacert: str, n: int, fresh: bool) -> dict[str, Any]:
    ctx = context(cacert)
    times = []
    client = httpx.Client(verify=ctx)
    for i in range(n + 5):
        if fresh:
            client.close()
            client = httpx.Client(verify=ctx)
        start = time.perf_counter()
        client.post(url, json=REQUEST, headers=HEADERS).raise_for_status()
        if i >= 5:  # warm-up: imports, first handshake, the proxy's first certificate
            times.append((time.perf_counter() - start) * 1000)
    client.close()
    return {"ms": times}


def stream_once(client: httpx.Client, url: str) -> tuple[float, list[float]]:
    start = time.time()
    ttfb = -1.0
    delays = []
    with client.stream("POST", url, json=STREAMED, headers=HEADERS) as response:
        for line in response.iter_lines():
            now = time.time()
            if ttfb < 0:
                ttfb = (now - start) * 1000
            if (sent := sent_at(line)) is not None:
                delays.append((now - sent) * 1000)
    return ttfb, delays


def stream(url: str, cacert: str, repeat: int) -> dict[str, Any]:
    with httpx.Client(verify=context(cacert)) as client:
        stream_once(client, url)  # warm-up
        ttfbs, delays = [], []
        for _ in range(repeat):
            ttfb, chunk_delays = stream_once(client, url)
            ttfbs.append(ttfb)
            delays += chunk_delays
    return {"ttfb_ms": ttfbs, "chunk_delay_ms": delays}


async def load(url: str, cacert: str, concurrency: int, requests: int) -> dict[str, Any]:
    ctx = context(cacert)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    delays: list[float] = []
    failures = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal failures
        while not queue.empty():
            queue.get_nowait()
            try:
                async with client.stream("POST", url, json=STREAMED, headers=HEADERS) as response:
                    async for line in response.aiter_lines():
                        if (sent := sent_at(line)) is not None:
                            delays.append((time.time() - sent) * 1000)
            except httpx.HTTPError:
                failures += 1

    async with httpx.AsyncClient(verify=ctx, limits=limits, timeout=60) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "requests": requests, "failures": failures,
            "chunk_delay_ms": delays}


def first(url: str, cacert: str) -> dict[str, Any]:
    """What an SDK script run pays: its first request, on a new connection (DNS, TCP, TLS)."""
    client = httpx.Client(verify=context(cacert))
    start = time.perf_counter()
    try:
        ok = client.post(url, json=REQUEST, headers=HEADERS).is_success
    except httpx.HTTPError:
        ok = False
    elapsed = (time.perf_counter() - start) * 1000
    client.close()
    return {"ms": [elapsed] if ok else [], "failures": 0 if ok else 1}


def download(url: str, cacert: str) -> dict[str, Any]:
    size = 0
    with httpx.Client(verify=context(cacert), timeout=120) as client:
        start = time.perf_counter()
        with client.stream("GET", url) as response:
            for chunk in response.iter_raw(1 << 16):
                size += len(chunk)
        elapsed = time.perf_counter() - start
    return {"bytes": size, "seconds": elapsed, "mb_per_s": size / elapsed / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["latency", "stream", "load", "download", "first"])
    parser.add_argument("url")
    parser.add_argument("cacert")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--requests", type=int, default=100)
    args = parser.parse_args()
    if args.command == "latency":
        result = latency(args.url, args.cacert, args.n, args.fresh)
    elif args.command == "stream":
        result = stream(args.url, args.cacert, args.repeat)
    elif args.command == "load":
        result = asyncio.run(load(args.url, args.cacert, args.concurrency, args.requests))
    elif args.command == "first":
        result = first(args.url, args.cacert)
    else:
        result = download(args.url, args.cacert)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
