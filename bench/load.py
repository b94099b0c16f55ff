"""Load and scaling benchmarks of the service (loopback only, bounded in time).

``rate``: against a running server (``influence-service serve``), make one influence
query cached, GET each of its rankings once (warm-up, untimed), then fire
``GET /influence/{job}/ranking`` at fixed rates (open loop: each request has a scheduled
start; latency = completion − scheduled start, so a server that falls behind is charged
for the queueing it causes). Reports p50/p99 per rate and the highest rate that meets the
target (p50 ≤ 5 ms, p99 ≤ 25 ms, ≥ 95 % of the rate achieved). Raise the server's rate
limit for the run (INFLUENCE_RATE_LIMIT_PER_S).

``scaling``: the same scoring job with 1 and with 2 worker processes (one torch thread
each) on an embedded Redis: the training set is the digits train split tiled to N points,
split into shards of ``--shard-size``; the s_test solve is done once beforehand (it is
cached by content), so the timed jobs are the sharded scoring that workers share.

    .venv/bin/python -m bench.load rate --url http://127.0.0.1:8000 --rates 100 250 500 750
    .venv/bin/python -m bench.load scaling --tile 40 --shard-size 8192 --test-points 100
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import torch

import models
from app.cli import DEMO_MODEL_NAME, DEMO_TEST_NAME, DEMO_TRAIN_NAME
from app.client import InfluenceClient
from app.embedded import EmbeddedRedis
from app.schemas import JobView
from worker.contract import JobKind
from worker.main import connect
from worker.queue import JobQueue
from worker.settings import Settings
from worker.store import ArtifactStore, Registry

REPO = Path(__file__).resolve().parents[1]

P50_TARGET_MS = 5.0
P99_TARGET_MS = 25.0
MAX_SECONDS = 60.0
MAX_RATE = 5000.0
CONNECTIONS = 32
TEST_ROWS = list(range(10))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _require_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"load.py only targets loopback servers, not {host!r}")


def _demo_job(client: InfluenceClient) -> str:
    """A finished (cached) influence job on the demo, for the first 10 test points."""
    model = next(m.id for m in client.models() if m.name == DEMO_MODEL_NAME)
    datasets = {d.name: d.id for d in client.datasets()}
    query = {
        "model": model,
        "train": datasets[DEMO_TRAIN_NAME],
        "test": {"dataset": datasets[DEMO_TEST_NAME], "indices": TEST_ROWS},
    }
    answer = client.influence(query)
    job = answer.id if isinstance(answer, JobView) else answer.job
    final = client.wait(job, timeout=600)
    if final.status != "succeeded":
        raise SystemExit(f"demo query {job} {final.status}: {final.error}")
    return job


async def _get(
    connection: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: bytes
) -> int:
    """One HTTP/1.1 keep-alive GET on a raw connection; returns the status code. (A
    minimal client, so the load generator costs little of the 2 shared cores.)"""
    reader, writer = connection
    writer.write(request)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def _fire(url: str, api_key: str | None, job: str, rate: float, seconds: float) -> dict:
    """Open-loop load at ``rate`` req/s for ``seconds`` over a pool of keep-alive
    connections; latency is measured from each request's scheduled start."""
    parts = urlsplit(url)
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    requests = [
        (
            f"GET /influence/{job}/ranking?test={row}&direction=helpful&limit=10 HTTP/1.1\r\n"
            f"Host: {parts.netloc}\r\n{auth}\r\n"
        ).encode()
        for row in range(len(TEST_ROWS))
    ]
    pool: asyncio.Queue = asyncio.Queue()
    for _ in range(CONNECTIONS):
        pool.put_nowait(await asyncio.open_connection(parts.hostname, parts.port or 80))
    count = int(rate * seconds)
    latencies: list[float] = []
    errors = 0

    async def one(i: int, scheduled: float) -> None:
        nonlocal errors
        await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
        connection = await pool.get()
        try:
            ok = await _get(connection, requests[i % len(requests)]) == 200
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
            ok = False
            connection = await asyncio.open_connection(parts.hostname, parts.port or 80)
        pool.put_nowait(connection)
        if ok:
            latencies.append(time.perf_counter() - scheduled)
        else:
            errors += 1

    start = time.perf_counter() + 0.2
    await asyncio.gather(*(one(i, start + i / rate) for i in range(count)))
    elapsed = time.perf_counter() - start
    while not pool.empty():
        pool.get_nowait()[1].close()
    ms = [1000 * v for v in latencies]
    return {
        "rate": rate,
        "requests": count,
        "errors": errors,
        "achieved_rate": round(len(ms) / elapsed, 1),
        "p50_ms": round(_percentile(ms, 0.50), 2) if ms else None,
        "p99_ms": round(_percentile(ms, 0.99), 2) if ms else None,
        "mean_ms": round(statistics.fmean(ms), 2) if ms else None,
    }


def _meets_target(row: dict) -> bool:
    return (
        row["errors"] == 0
        and row["p50_ms"] is not None
        and row["p50_ms"] <= P50_TARGET_MS
        and row["p99_ms"] <= P99_TARGET_MS
        and row["achieved_rate"] >= 0.95 * row["rate"]
    )


def rate_benchmark(args: argparse.Namespace) -> dict:
    _require_loopback(args.url)
    seconds = min(args.seconds, MAX_SECONDS)
    with InfluenceClient(args.url, api_key=args.api_key) as client:
        job = _demo_job(client)
        for row in TEST_ROWS:  # warm-up: each ranking the timed requests ask for, once
            client.ranking(job, test=row, direction="helpful", limit=10)
    rows = []
    for rate in sorted(min(r, MAX_RATE) for r in args.rates):
        row = asyncio.run(_fire(args.url, args.api_key, job, rate, seconds))
        row["meets_target"] = _meets_target(row)
        print(json.dumps(row), flush=True)
        rows.append(row)
    sustainable = [r["rate"] for r in rows if r["meets_target"]]
    return {
        "benchmark": "cached ranking GET",
        "seconds_per_rate": seconds,
        "target": {"p50_ms": P50_TARGET_MS, "p99_ms": P99_TARGET_MS},
        "rows": rows,
        "max_sustainable_rate": max(sustainable) if sustainable else None,
    }


def _worker_processes(count: int, env: dict[str, str]) -> list[subprocess.Popen[bytes]]:
    command = [sys.executable, "-m", "worker"]
    return [subprocess.Popen(command, env=env, cwd=REPO) for _ in range(count)]


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait(timeout=60)


def scaling_benchmark(args: argparse.Namespace) -> dict:
    with (
        tempfile.TemporaryDirectory(prefix="infl-bench-", dir="/tmp") as tmp,
        EmbeddedRedis(Path(tmp) / "redis") as redis_server,
    ):
        settings = Settings(
            redis_url=redis_server.url,
            data_dir=Path(tmp),
            key_prefix="bench:",
            shard_size=args.shard_size,
        )
        env = {
            **os.environ,
            "REDIS_URL": redis_server.url,
            "INFLUENCE_DATA_DIR": tmp,
            "INFLUENCE_KEY_PREFIX": settings.key_prefix,
            "INFLUENCE_SHARD_SIZE": str(args.shard_size),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
        }
        client = connect(settings)
        queue = JobQueue(client, settings)
        registry = Registry(client, settings, ArtifactStore.for_settings(settings))
        checkpoint, train, _ = models.demo_checkpoint(Path(tmp) / "demo")
        tiled = models.Dataset(
            train.inputs.repeat(args.tile, 1), train.targets.repeat(args.tile), train.metadata
        )
        models.save_dataset(Path(tmp) / "tiled.safetensors", tiled)
        ids = {}
        for tenant in ("1-cold", "1-warm", "2-cold", "2-warm"):
            ids["model"] = registry.put_model(tenant, None, checkpoint.read_bytes())["id"]
            ids["train"] = registry.put_dataset(
                tenant, (Path(tmp) / "tiled.safetensors").read_bytes()
            )["id"]
            ids["test"] = registry.put_builtin_dataset(tenant, "digits", "test")["id"]
        payload = {
            "model": ids["model"],
            "train": ids["train"],
            "test": {"dataset": ids["test"], "indices": list(range(args.test_points))},
            # a loose solve: the timed runs reuse the cached s_test and measure scoring only
            "solver": {"name": "cg", "tol": 1e-2},
        }

        def run(tenant: str) -> float:
            start = time.perf_counter()
            job = queue.submit(JobKind.INFLUENCE, payload, tenant=tenant)
            while not (record := queue.get(job)).status.terminal:
                time.sleep(0.05)
            if record.status != "succeeded":
                raise SystemExit(f"job {job} {record.status}: {record.error}")
            return time.perf_counter() - start

        def timed(workers: int) -> tuple[float, float]:
            """(first job: includes loading model and data, second job: warm workers)."""
            client.delete(queue.keys.workers)
            processes = _worker_processes(workers, env)
            try:
                while len(queue.workers_alive()) < workers:  # imported and polling
                    time.sleep(0.1)
                return run(f"{workers}-cold"), run(f"{workers}-warm")
            finally:
                _stop(processes)

        run_with_one_worker = timed(1)  # its first job also fills the s_test cache
        two_workers = timed(2)
    result = {
        "benchmark": "sharded scoring, s_test cached",
        "train_points": len(tiled),
        "test_points": args.test_points,
        "shard_size": args.shard_size,
        "shards": -(-len(tiled) // args.shard_size),
        "one_worker_first_job_with_solve_s": round(run_with_one_worker[0], 2),
        "one_worker_s": round(run_with_one_worker[1], 2),
        "two_workers_first_job_s": round(two_workers[0], 2),
        "two_workers_s": round(two_workers[1], 2),
        "speedup": round(run_with_one_worker[1] / two_workers[1], 2),
    }
    print(json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("rate", help="cached ranking GETs at fixed rates")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=os.environ.get("INFLUENCE_API_KEY"))
    p.add_argument("--rates", type=float, nargs="+", default=[100, 250, 500, 750, 1000])
    p.add_argument("--seconds", type=float, default=5.0, help=f"per rate (≤ {MAX_SECONDS:g})")
    p.set_defaults(run=rate_benchmark)
    p = sub.add_parser("scaling", help="one scoring job with 1 vs 2 workers")
    p.add_argument("--tile", type=int, default=40, help="copies of the digits train split")
    p.add_argument("--shard-size", type=int, default=8192)
    p.add_argument("--test-points", type=int, default=100, help="scoring cost grows with it")
    p.set_defaults(run=scaling_benchmark)
    p = parser.parse_args(argv)
    result = p.run(p)
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / f"load-{p.command}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
