"""``influence-service``: run the API and workers, or query a running service.

- ``serve [--host --port --workers N --data-dir --demo/--no-demo]``: the API. Without
  ``REDIS_URL`` it starts an embedded Redis (append-only file under the data directory),
  one local worker, and registers the built-in demo (digits MLP + digits train/test) for
  the default tenant. Without API keys it binds to loopback only.
- ``worker [--device cuda]``: one worker joining the queue at ``REDIS_URL``.
- ``query`` / ``rank``: submit an influence query and print rankings, with a progress bar.

Settings come from the environment (``REDIS_URL``, ``INFLUENCE_*``; see worker.settings).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

import httpx
import uvicorn
from tqdm import tqdm

import models
from app.client import ApiError, InfluenceClient
from app.embedded import EmbeddedRedis, EmbeddedRedisError
from app.main import create_app
from app.schemas import JobView, Ranking
from models.training import resolve_device
from worker.__main__ import CONFIG_ERROR
from worker.__main__ import main as worker_main
from worker.main import connect
from worker.settings import Settings
from worker.store import ArtifactStore, Registry

__all__ = ["bootstrap_demo", "main"]

DEMO_MODEL_NAME = "demo-digits-mlp"
DEMO_TRAIN_NAME = "digits-train"
DEMO_TEST_NAME = "digits-test"

log = logging.getLogger("influence-service")


def _fail(message: str) -> NoReturn:
    """Exit with status 1 and the message on stderr."""
    raise SystemExit(f"influence-service: error: {message}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bootstrap_demo(settings: Settings) -> dict[str, str]:
    """Register the demo checkpoint and the digits splits for the default tenant
    (idempotent: records are keyed by content id, and the demo is trained only once)."""
    checkpoint, _, _ = models.demo_checkpoint(settings.data_dir / "demo")
    registry = Registry(connect(settings), settings, ArtifactStore.for_settings(settings))
    tenant = settings.default_tenant
    model = registry.put_model(tenant, None, checkpoint.read_bytes(), DEMO_MODEL_NAME)
    train = registry.put_builtin_dataset(tenant, "digits", "train")
    test = registry.put_builtin_dataset(tenant, "digits", "test")
    return {"model": model["id"], "train": train["id"], "test": test["id"]}


def _worker_command(settings: Settings) -> tuple[list[str], dict[str, str]]:
    """Command line and environment of a local worker sharing this process's settings."""
    env = {
        **os.environ,
        "REDIS_URL": str(settings.redis_url),
        "INFLUENCE_DATA_DIR": str(settings.data_dir),
        "INFLUENCE_KEY_PREFIX": settings.key_prefix,
    }
    return [sys.executable, "-m", "worker", "--device", settings.device], env


def _stop_workers(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # finish the current job, then exit
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class WorkerSupervisor:
    """``serve``'s local worker processes, each restarted when it exits unexpectedly (a
    crash, an OOM kill: a non-zero status): otherwise, with the embedded default of one
    worker, jobs would queue forever. A restart waits ``backoff_min`` s, doubling up to
    ``backoff_max`` s while the process keeps dying within ``stable_s`` s of its start.
    Not restarted: a worker that exits 0 (it was stopped by SIGTERM/SIGINT, e.g. Ctrl-C
    reaching the whole process group) or with ``CONFIG_ERROR`` (it cannot start as
    configured, e.g. no CUDA). ``stop`` ends the restarts, then SIGTERMs the workers
    (each finishes its job)."""

    def __init__(
        self,
        command: list[str],
        env: dict[str, str] | None,
        count: int,
        *,
        poll_s: float = 1.0,
        backoff_min: float = 1.0,
        backoff_max: float = 30.0,
        stable_s: float = 60.0,
    ) -> None:
        self.command, self.env, self.count = command, env, count
        self.poll_s, self.backoff_min, self.backoff_max = poll_s, backoff_min, backoff_max
        self.stable_s = stable_s
        self.processes: list[subprocess.Popen[bytes] | None] = []
        self.restarts = 0
        self._started: list[float] = []
        self._due: list[float | None] = []  # restart time of an exited worker
        self._delay: list[float] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> WorkerSupervisor:
        """Start the workers and the thread that watches them."""
        with self._lock:
            for _ in range(self.count):
                self.processes.append(self._spawn())
                self._started.append(time.monotonic())
                self._due.append(None)
                self._delay.append(self.backoff_min)
        if self.count:
            self._thread = threading.Thread(target=self._watch, name="worker-supervisor")
            self._thread.daemon = True
            self._thread.start()
        return self

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.command, env=self.env)

    def _watch(self) -> None:
        while not self._stopping.wait(self.poll_s):
            self.check()

    def check(self) -> None:
        """One pass: note workers that exited, restart those whose backoff has passed."""
        with self._lock:
            if self._stopping.is_set():
                return
            now = time.monotonic()
            for slot, process in enumerate(self.processes):
                if process is None or process.poll() is None:
                    continue
                if self._due[slot] is None:
                    code = process.returncode
                    if code in (0, CONFIG_ERROR):
                        log.log(
                            logging.INFO if code == 0 else logging.ERROR,
                            "worker %d (pid %d) %s (exit status %d); not restarting it",
                            slot, process.pid,
                            "was stopped" if code == 0 else "cannot start as configured",
                            code,
                        )  # fmt: skip
                        self.processes[slot] = None
                        continue
                    if now - self._started[slot] >= self.stable_s:
                        self._delay[slot] = self.backoff_min
                    self._due[slot] = now + self._delay[slot]
                    log.warning(
                        "worker %d (pid %d) exited unexpectedly (status %d); restarting in %g s",
                        slot, process.pid, code, self._delay[slot],
                    )  # fmt: skip
                    self._delay[slot] = min(2 * self._delay[slot], self.backoff_max)
                due = self._due[slot]
                if due is not None and now >= due:
                    self.processes[slot] = self._spawn()
                    self._started[slot] = time.monotonic()
                    self._due[slot] = None
                    self.restarts += 1

    def stop(self) -> None:
        """Stop restarting, then stop the workers (SIGTERM; SIGKILL after 30 s)."""
        with self._lock:
            self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        _stop_workers([p for p in self.processes if p is not None])


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def serve(args: argparse.Namespace) -> None:
    """Start the API (and, without REDIS_URL, an embedded Redis, local workers and the demo)."""
    overrides: dict[str, Any] = {"data_dir": args.data_dir} if args.data_dir else {}
    settings = Settings(**overrides)
    if not settings.api_keys and not _is_loopback(args.host):
        _fail(
            f"refusing to bind to {args.host}: no API keys are configured, so anyone who can "
            "reach the port could use the service. Set INFLUENCE_API_KEYS='key:tenant,...' "
            "or bind to 127.0.0.1."
        )
    embedded = None
    if not settings.redis_url:
        embedded = EmbeddedRedis(settings.data_dir / "redis")
        try:
            settings = settings.model_copy(update={"redis_url": embedded.start()})
        except EmbeddedRedisError as exc:
            _fail(str(exc))
        print(f"embedded Redis at {embedded.url} (append-only, {embedded.directory})")
    workers = args.workers if args.workers is not None else (1 if embedded else 0)
    demo = args.demo if args.demo is not None else embedded is not None
    supervisor: WorkerSupervisor | None = None
    try:
        if workers:
            try:
                resolve_device(settings.device, "INFLUENCE_DEVICE", ValueError)
            except ValueError as exc:
                _fail(str(exc))
        if demo:
            ids = bootstrap_demo(settings)
            print(f"demo for tenant {settings.default_tenant!r}: {ids}")
        supervisor = WorkerSupervisor(*_worker_command(settings), workers).start()
        print(f"serving on http://{args.host}:{args.port} (OpenAPI at /docs)")
        # uvicorn re-raises SIGTERM after its graceful shutdown; with the default handler
        # that would kill this process before the workers and embedded Redis are stopped.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="warning")
    finally:
        if supervisor is not None:
            supervisor.stop()
        if embedded is not None:
            embedded.stop()


def worker(args: argparse.Namespace) -> None:
    """Join the queue at REDIS_URL as one worker process."""
    worker_main(["--device", args.device] if args.device else [])


def _client(args: argparse.Namespace) -> InfluenceClient:
    return InfluenceClient(args.url, api_key=args.api_key)


def _by_name(records: list[Any], name: str, what: str) -> str:
    for record in records:
        if record.name == name:
            return record.id
    _fail(f"no {what} given and no {what} named {name!r} on the server (--{what} ID)")


def _print_ranking(ranking: Ranking, row: int | None = None) -> None:
    where = f" (row {row})" if row is not None else ""
    print(
        f"test point {ranking.test}{where}: most {ranking.direction} of {ranking.total} "
        "training points"
    )
    print(f"{'rank':>5} {'index':>7} {'target':>8} {'score':>14}")
    for rank, item in enumerate(ranking.items, start=ranking.offset + 1):
        print(f"{rank:>5} {item.index:>7} {item.target!s:>8} {item.score:>14.6e}")


def _follow(client: InfluenceClient, job: str) -> JobView:
    with tqdm(total=1.0, bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}") as bar:

        def update(view: JobView) -> None:
            bar.update(view.progress - bar.n)
            bar.set_description_str(f"{view.status} {view.phase}")

        return client.wait(job, progress=update)


def query(args: argparse.Namespace) -> None:
    """Submit an influence query, follow its progress and print the rankings."""
    with _client(args) as client:
        model = args.model or _by_name(client.models(), DEMO_MODEL_NAME, "model")
        datasets = client.datasets() if not (args.train and args.test) else []
        train = args.train or _by_name(datasets, DEMO_TRAIN_NAME, "train")
        test = args.test or _by_name(datasets, DEMO_TEST_NAME, "test")
        request = {
            "model": model,
            "train": train,
            "loss": args.loss,
            "test": {"dataset": test, "indices": args.indices},
            "damping": args.damping,
            "solver": {"name": args.solver},
        }
        answer = client.influence(request)
        if isinstance(answer, JobView):
            print(f"job {answer.id} (from the cache)")
            view = answer
        else:
            print(f"job {answer.job} queued")
            view = _follow(client, answer.job)
        if view.status != "succeeded":
            _fail(f"job {view.id} {view.status}: {view.error}")
        print(view.meaning)
        for test, row in enumerate(args.indices):
            ranking = client.ranking(view.id, test=test, direction=args.direction, limit=args.limit)
            _print_ranking(ranking, row)


def rank(args: argparse.Namespace) -> None:
    """Print one page of a finished job's ranking."""
    with _client(args) as client:
        view = client.job(args.job)
        if view.status not in ("succeeded", "failed", "canceled"):
            view = _follow(client, args.job)
        if view.status != "succeeded":
            _fail(f"job {view.id} {view.status}: {view.error or 'no ranking'}")
        ranking = client.ranking(
            args.job, test=args.test, direction=args.direction, limit=args.limit, offset=args.offset
        )
        print(ranking.meaning)
        _print_ranking(ranking)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="influence-service", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the API (and, by default, the embedded Redis + a worker)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--workers", type=int, help="local worker processes (default: 1 with the embedded Redis)"
    )
    p.add_argument("--data-dir", type=Path, help="artifacts and embedded Redis data")
    p.add_argument(
        "--demo",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="register the digits demo (default: on with the embedded Redis)",
    )
    p.set_defaults(run=serve)

    p = sub.add_parser("worker", help="run one worker on the queue at REDIS_URL")
    p.add_argument("--device", help="torch device: cpu, cuda, cuda:1 (default: INFLUENCE_DEVICE)")
    p.set_defaults(run=worker)

    for name, run, help_text in (
        ("query", query, "ask which training points helped/harmed test points"),
        ("rank", rank, "print the ranking of a finished influence job"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--url", default=os.environ.get("INFLUENCE_URL", "http://127.0.0.1:8000"))
        p.add_argument("--api-key", default=os.environ.get("INFLUENCE_API_KEY"))
        p.add_argument("--direction", choices=["helpful", "harmful"], default="helpful")
        p.add_argument("--limit", type=int, default=10)
        p.set_defaults(run=run)
    query_parser = sub.choices["query"]
    query_parser.add_argument("--model", help=f"model id (default: the {DEMO_MODEL_NAME!r} demo)")
    query_parser.add_argument("--train", help="training dataset id (default: the demo's)")
    query_parser.add_argument("--test", help="dataset holding the test points (default: demo's)")
    query_parser.add_argument("--indices", type=int, nargs="+", default=[0], help="test rows")
    query_parser.add_argument(
        "--loss", default="cross_entropy", choices=["cross_entropy", "mse", "bce"]
    )
    query_parser.add_argument("--damping", type=float, default=1e-3)
    query_parser.add_argument("--solver", default="cg", choices=["cg", "exact", "lissa"])
    rank_parser = sub.choices["rank"]
    rank_parser.add_argument("job", help="influence job id")
    rank_parser.add_argument("--test", type=int, default=0, help="test row of the job")
    rank_parser.add_argument("--offset", type=int, default=0)
    return parser


def _api_error_message(exc: ApiError) -> str:
    """One line for an error answer: FastAPI's validation details become ``loc: msg``."""
    detail = exc.detail
    if isinstance(detail, list) and all(isinstance(d, dict) for d in detail):
        detail = "; ".join(
            f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg', d)}" for d in detail
        )
    return " ".join(f"HTTP {exc.status}: {detail}".split())


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``influence-service`` command. An error answer of the API, or an
    unreachable API, ends it with one line on stderr and exit status 1."""
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except ApiError as exc:
        _fail(_api_error_message(exc))
    except httpx.TransportError as exc:
        _fail(f"cannot reach the service at {getattr(args, 'url', '?')}: {exc}")
