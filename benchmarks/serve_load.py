"""Load test of `atomlab serve`: concurrent streaming clients on loopback, bounded and self-stopping.

    python benchmarks/serve_load.py --bundle runs/release-X [--clients 50] [--seconds 60]
    python benchmarks/serve_load.py --bundle runs/release-X --batching continuous  # one of the two only

For each batching (continuous, then static: `atomlab serve --batching`), starts the server in a
subprocess, runs `--clients` clients that each send streaming chat requests back to back until
`--seconds` have passed (requests already sent finish; none is sent after), then stops the server.
Reports failed requests, p50/p99 latency (whole request) and time to first token, and generated
tokens/s (the completion tokens the server reports in each stream's usage chunk), then the ratios
continuous / static. Writes benchmarks/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from atomlab.steps import cpu_model

RESULTS = Path(__file__).parent / "results" / "serve_load.json"
PROMPTS = ["Speak, friend.", "Who is there?", "What news?", "Tell me of the king.", "Sing of the sea."]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def client(url: str, index: int, deadline: float, max_tokens: int, results: list[dict]) -> None:
    async with httpx.AsyncClient(timeout=120) as http:
        request = 0
        while time.perf_counter() < deadline:
            body = {
                "messages": [{"role": "user", "content": PROMPTS[(index + request) % len(PROMPTS)]}],
                "max_tokens": max_tokens,
                "temperature": 0.8,
                "seed": index * 1000 + request,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            start, first, pieces, tokens, ok = time.perf_counter(), None, 0, 0, False
            try:
                async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                    ok = response.status_code == 200
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            ok = False
                        elif chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
                        elif chunk["choices"][0]["delta"].get("content"):
                            first = first or time.perf_counter()
                            pieces += 1
            except httpx.HTTPError:
                ok = False
            end = time.perf_counter()
            ok = ok and tokens > 0
            results.append(
                {"ok": ok, "latency": end - start, "first": (first or end) - start, "pieces": pieces, "tokens": tokens}
            )
            request += 1


async def load(url: str, clients: int, seconds: float, max_tokens: int) -> tuple[list[dict], float]:
    results: list[dict] = []
    start = time.perf_counter()
    await asyncio.gather(*(client(url, i, start + seconds, max_tokens, results) for i in range(clients)))
    return results, time.perf_counter() - start


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def serve_and_load(options: argparse.Namespace, batching: str) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "atomlab.cli", "serve", str(options.bundle), "--port", str(port)]
    command += ["--max-batch", str(options.max_batch), "--batching", batching]
    env = {**os.environ, "OMP_NUM_THREADS": str(options.server_threads)}
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise SystemExit(f"server did not start: {server.stderr.read()}")
        results, elapsed = asyncio.run(load(url, options.clients, options.seconds, options.max_tokens))
        health = httpx.get(f"{url}/health").json()
    finally:
        server.terminate()
        server.wait(timeout=30)
    done = [r for r in results if r["ok"]]
    return {
        "batching": batching,
        "seconds": round(elapsed, 1),
        "requests": len(results),
        "failed": len(results) - len(done),
        "latency_p50_s": round(percentile([r["latency"] for r in done], 0.5), 3),
        "latency_p99_s": round(percentile([r["latency"] for r in done], 0.99), 3),
        "first_token_p50_s": round(percentile([r["first"] for r in done], 0.5), 3),
        "first_token_p99_s": round(percentile([r["first"] for r in done], 0.99), 3),
        "tokens_per_s": round(sum(r["tokens"] for r in done) / elapsed, 1),
        "median_tokens_per_request": statistics.median(r["tokens"] for r in done),
        "mean_batch_per_step": health["mean_batch"],
        "largest_batch": health["largest_batch"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=64, help="the servers' --max-batch")
    parser.add_argument("--batching", nargs="+", default=["continuous", "static"], choices=["continuous", "static"])
    # on a busy shared machine 2 threads decoded a batch of 50 ten times slower than 1 (a thread waits on a
    # descheduled sibling at every op): the servers get 1 by default, both alike
    parser.add_argument("--server-threads", type=int, default=1, help="the servers' torch threads (OMP_NUM_THREADS)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    options = parser.parse_args()
    report: dict = {
        "machine": {"cpus": os.cpu_count(), "processor": cpu_model(), "load_average_before": os.getloadavg()},
        "clients": options.clients,
        "seconds": options.seconds,
        "max_tokens": options.max_tokens,
        "max_batch": options.max_batch,
        "server_threads": options.server_threads,
        "servers": [serve_and_load(options, batching) for batching in options.batching],
    }
    by_batching = {server["batching"]: server for server in report["servers"]}
    if {"continuous", "static"} <= set(by_batching):
        new, old = by_batching["continuous"], by_batching["static"]
        report["static_over_continuous"] = {  # above 1: continuous is better
            "first_token_p50": round(old["first_token_p50_s"] / new["first_token_p50_s"], 2),
            "first_token_p99": round(old["first_token_p99_s"] / new["first_token_p99_s"], 2),
            "latency_p50": round(old["latency_p50_s"] / new["latency_p50_s"], 2),
            "latency_p99": round(old["latency_p99_s"] / new["latency_p99_s"], 2),
        }
        report["continuous_over_static_tokens_per_s"] = round(new["tokens_per_s"] / old["tokens_per_s"], 2)
    options.output.parent.mkdir(exist_ok=True)
    options.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))




if __name__ == "__main__":
    main()
