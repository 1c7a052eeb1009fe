"""Load test of `atomlab hub serve`: concurrent clients pushing and pulling bundles, beside a file copy.

    python benchmarks/hub_load.py [--clients 20] [--seconds 60] [--megabytes 50]

Starts a hub (SQLite and a local store in a temporary folder) in a subprocess, then `--clients`
threads each push a bundle of `--megabytes` (fresh content every time, so every push really
uploads) and pull it back, checking every file, until `--seconds` have passed. Beside it, on the
same disk, the same number of threads copy files of the same size with shutil for the same time.
Reports errors, MB/s through the hub (pushed + pulled) and through the plain copy, their ratio, the
median push and pull times, and the CPU seconds the server and the clients spent per GB moved (on a
small machine the hub is CPU-bound: every byte is hashed by the server and by the client, and crosses
Python's HTTP stack twice, where the copy is one sendfile in the kernel). Writes
benchmarks/results/hub_load.json.

Making a bundle is not the hub's work, so it costs as little as it can: the weights are the same random
bytes with a fresh suffix each time, whose sha256 is the saved hash state of the common part extended by
the suffix, so the manifest is written without reading the file back.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from atomlab.hub.client import HubClient
from atomlab.steps import cpu_model, sha256_file, write_json

RESULTS = Path(__file__).parent / "results" / "hub_load.json"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_bundle(folder: Path, weights: bytes, weights_hash: hashlib._Hash, tag: str) -> int:
    folder.mkdir(parents=True)
    # a fresh suffix makes the weights a new file with a new sha256 at every push
    suffix = tag.encode().ljust(64)
    with open(folder / "model.safetensors", "wb") as out:
        out.write(weights)
        out.write(suffix)
    digest = weights_hash.copy()
    digest.update(suffix)
    write_json(folder / "config.json", {"tag": tag})
    outputs = {
        "config.json": {
            "sha256": sha256_file(folder / "config.json"),
            "bytes": (folder / "config.json").stat().st_size,
        },
        "model.safetensors": {"sha256": digest.hexdigest(), "bytes": len(weights) + len(suffix)},
    }
    write_json(folder / "manifest.json", {"step": "release", "outputs": outputs, "summary": {}})
    return sum(p.stat().st_size for p in folder.iterdir())


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hub_clients(url: str, token: str, clients: int, seconds: float, weights: bytes, scratch: Path, server: int) -> dict:
    moved, errors, push_times, pull_times = [0], [], [], []
    weights_hash = hashlib.sha256(weights)
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def work(index: int) -> None:
        with HubClient(url, token) as client:
            iteration = 0
            while time.perf_counter() < deadline:
                folder = scratch / f"c{index}-{iteration}"
                try:
                    size = make_bundle(
                        folder / "bundle", weights, weights_hash, f"{index}-{iteration}-{time.time_ns()}"
                    )
                    started = time.perf_counter()
                    client.push(folder / "bundle", f"lab/load-{index}")
                    pushed = time.perf_counter()
                    client.pull(f"lab/load-{index}", folder / "pulled")
                    done = time.perf_counter()
                    with lock:
                        moved[0] += 2 * size
                        push_times.append(pushed - started)
                        pull_times.append(done - pushed)
                except Exception as exc:  # counted, and the load goes on
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                shutil.rmtree(folder, ignore_errors=True)
                iteration += 1

    started = time.perf_counter()
    server_cpu, client_cpu = cpu_seconds(server), cpu_seconds(os.getpid())
    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    gigabytes = moved[0] / 1e9 or float("nan")
    return {
        "seconds": round(elapsed, 1),
        "server_cpu_s_per_gb": round((cpu_seconds(server) - server_cpu) / gigabytes, 2),
        "clients_cpu_s_per_gb": round((cpu_seconds(os.getpid()) - client_cpu) / gigabytes, 2),
        "pushes": len(push_times),
        "errors": len(errors),
        "error_examples": errors[:3],
        "mb_per_s": round(moved[0] / elapsed / 1e6, 1),
        "push_p50_s": round(statistics.median(push_times), 2) if push_times else None,
        "pull_p50_s": round(statistics.median(pull_times), 2) if pull_times else None,
    }


def plain_copy(clients: int, seconds: float, weights: bytes, scratch: Path) -> dict:
    moved = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def work(index: int) -> None:
        source = scratch / f"copy-source-{index}"
        source.write_bytes(weights)
        iteration = 0
        while time.perf_counter() < deadline:
            target = scratch / f"copy-{index}-{iteration}"
            shutil.copyfile(source, target)  # the same bytes written once, and read back once, as a pull
            with open(target, "rb") as handle:
                while handle.read(1 << 20):
                    pass
            target.unlink()
            with lock:
                moved[0] += 2 * len(weights)
            iteration += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return {"seconds": round(elapsed, 1), "mb_per_s": round(moved[0] / elapsed / 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--megabytes", type=float, default=50)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    load_before = [round(x, 1) for x in os.getloadavg()]  # the machine's load before this adds its own
    weights = os.urandom(int(args.megabytes * 1e6))
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as scratch_name:  # the disk the user works on
        scratch = Path(scratch_name)
        database, store = str(scratch / "hub.db"), str(scratch / "store")
        made = subprocess.run(
            [sys.executable, "-m", "atomlab.cli", "hub", "institution", "lab", "--db", database],
            capture_output=True,
            text=True,
            check=True,
        )
        token = made.stdout.strip().splitlines()[-1]
        port = free_port()
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "atomlab.cli",
                "hub",
                "serve",
                "--db",
                database,
                "--store",
                store,
                "--port",
                str(port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    urllib.request.urlopen(f"{url}/api/health", timeout=2)
                    break
                except OSError:
                    time.sleep(0.2)
            hub = hub_clients(url, token, args.clients, args.seconds, weights, scratch, server.pid)
        finally:
            server.terminate()
            server.wait(timeout=60)
        copy = plain_copy(args.clients, args.seconds, weights, scratch)
    load_after = [round(x, 1) for x in os.getloadavg()]
    result = {
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": load_after,
        },
        "http_parser": "httptools" if importlib.util.find_spec("httptools") else "h11",
        "clients": args.clients,
        "bundle_mb": args.megabytes,
        "hub": hub,
        "plain_copy": copy,
        "hub_vs_copy": round(hub["mb_per_s"] / copy["mb_per_s"], 3) if copy["mb_per_s"] else None,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
