"""``influence-service``: run the API and workers, or query a running service.

- ``serve [--host --port --workers N --data-dir --demo/--no-demo]``: the API. Without
  ``REDIS_URL`` it starts an embedded Redis (append-only file under the data directory),
  one local worker, and registers the built-in demo (digits MLP + digits train/test) for
  the default tenant. Without API keys it binds to loopback only.
- ``worker [--device cuda]``: one worker joining the queue at ``REDIS_URL``.
- ``query`` / ``rank``: submit an influence query and print rankings, with a progress bar.

Settings come from the environment (``REDIS_URL``, ``INFLUENCE_*``; see worker.settings).

Heavy imports (torch, uvicorn, the app and the worker) happen inside the commands that
need them, so ``--help``, argument errors, ``query`` and ``rank`` start quickly.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from types import FrameType

    from app.client import InfluenceClient
    from app.embedded import EmbeddedRedis
    from app.views import JobView, Ranking
    from worker.settings import Settings

__all__ = ["bootstrap_demo", "main"]

DEMO_MODEL_NAME = "demo-digits-mlp"
DEMO_TRAIN_NAME = "digits-train"
DEMO_TEST_NAME = "digits-test"

# The API's bounds, checked before anything is submitted (a bad --limit would otherwise
# be refused only after the job ran). tests/worker/test_cli.py checks they match the API.
MAX_RANKING_LIMIT = 1000
"""``limit`` of ``GET /influence/{job}/ranking`` (app/routes/influence.py)."""
MAX_OFFSET = 10**9
"""``offset`` of the ranking."""
MAX_TEST_POINTS = 256
"""Test points per request (``app.schemas.MAX_TEST_POINTS``; a deployment may set a lower
``INFLUENCE_MAX_TEST_POINTS``, which the API reports)."""
MAX_ROW = 10**9
"""A test row of a stored dataset (``app.schemas.DatasetTest.indices``)."""
MAX_DAMPING = 1e6
"""``damping`` is in (0, MAX_DAMPING] (``app.schemas.Damping``)."""

WORKER_STOP_TIMEOUT_S = 30.0
"""How long ``WorkerSupervisor.stop`` waits by default for the workers to finish their jobs
before it kills them (``serve`` waits up to the job time limit instead). A killed attempt
is taken up again once its lease expires."""
GRACEFUL_SHUTDOWN_S = 3.0
"""On shutdown the API finishes its requests in flight for at most this long. Open event
streams (``GET /jobs/{id}/events``, the dashboard) end by themselves within
``app.routes.jobs.STOP_POLL_MS`` once ``serve`` is asked to stop."""
PARENT_POLL_S = 1.0
"""How often a local worker checks that ``serve`` is still its parent."""

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
    import models
    from worker.main import connect
    from worker.store import ArtifactStore, Registry

    checkpoint, _, _ = models.demo_checkpoint(settings.data_dir / "demo")
    registry = Registry(connect(settings), settings, ArtifactStore.for_settings(settings))
    tenant = settings.default_tenant
    model = registry.put_model(tenant, None, checkpoint.read_bytes(), DEMO_MODEL_NAME)
    train = registry.put_builtin_dataset(tenant, "digits", "train")
    test = registry.put_builtin_dataset(tenant, "digits", "test")
    return {"model": model["id"], "train": train["id"], "test": test["id"]}


def _worker_command(settings: Settings) -> tuple[list[str], dict[str, str]]:
    """Command line and environment of a local worker sharing this process's settings. It
    watches this process (``--parent-pid``) and stops when it is gone, e.g. killed hard."""
    env = {
        **os.environ,
        "REDIS_URL": str(settings.redis_url),
        "INFLUENCE_DATA_DIR": str(settings.data_dir),
        "INFLUENCE_KEY_PREFIX": settings.key_prefix,
    }
    command = [sys.executable, "-m", "app.cli", "worker", "--device", settings.device]
    return [*command, "--parent-pid", str(os.getpid())], env


def _stop_workers(
    processes: list[subprocess.Popen[bytes]],
    *,
    timeout: float = WORKER_STOP_TIMEOUT_S,
    hurry: threading.Event | None = None,
) -> None:
    """SIGTERM each worker (it finishes its current job, then exits) and wait for all of
    them; one still running after ``timeout`` s, or once ``hurry`` is set, is killed."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in processes:
        while process.poll() is None:
            if (hurry is not None and hurry.is_set()) or time.monotonic() >= deadline:
                process.kill()
                process.wait()
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=0.1)  # short waits: a second Ctrl-C is seen at once


class WorkerSupervisor:
    """``serve``'s local worker processes, each restarted when it exits unexpectedly (a
    crash, an OOM kill: a non-zero status): otherwise, with the embedded default of one
    worker, jobs would queue forever. A restart waits ``backoff_min`` s, doubling up to
    ``backoff_max`` s while the process keeps dying within ``stable_s`` s of its start.
    Not restarted: a worker that exits 0 (it was stopped by SIGTERM/SIGINT) or with
    ``CONFIG_ERROR`` (it cannot start as configured, e.g. no CUDA). Each worker runs in a
    session of its own, so a terminal's Ctrl-C reaches ``serve`` only; ``stop`` ends the
    restarts, then SIGTERMs the workers (each finishes its job)."""

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
        # A session of its own: the terminal's SIGINT (Ctrl-C goes to the whole foreground
        # process group) must not stop a worker in the middle of its job; serve stops it.
        return subprocess.Popen(self.command, env=self.env, start_new_session=True)

    def _watch(self) -> None:
        while not self._stopping.wait(self.poll_s):
            self.check()

    def check(self) -> None:
        """One pass: note workers that exited, restart those whose backoff has passed."""
        from worker.__main__ import CONFIG_ERROR

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

    def running(self) -> int:
        """How many workers are running now."""
        return sum(1 for p in self.processes if p is not None and p.poll() is None)

    def stop(
        self, *, timeout: float = WORKER_STOP_TIMEOUT_S, hurry: threading.Event | None = None
    ) -> None:
        """Stop restarting, then stop the workers: SIGTERM (each finishes its job), SIGKILL
        after ``timeout`` s or once ``hurry`` is set."""
        with self._lock:
            self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        _stop_workers([p for p in self.processes if p is not None], timeout=timeout, hurry=hurry)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _shutdown(
    supervisor: WorkerSupervisor | None, embedded: EmbeddedRedis | None, worker_timeout: float
) -> None:
    """``serve``'s shutdown, after the API stopped taking requests: the workers finish
    their jobs (for at most ``worker_timeout`` s; a second Ctrl-C or SIGTERM kills them at
    once), then the embedded Redis shuts down, flushing its append-only file — in that
    order, so no job loses its Redis in the middle."""
    hurry = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: hurry.set())
    if supervisor is not None:
        if supervisor.running():
            print(
                "stopping: the local worker(s) finish their job first (Ctrl-C again: stop "
                "them now; an interrupted job runs again after the next start)",
                file=sys.stderr,
                flush=True,
            )
        supervisor.stop(timeout=worker_timeout, hurry=hurry)
    if embedded is not None:
        embedded.stop()


def serve(args: argparse.Namespace) -> None:
    """Start the API (and, without REDIS_URL, an embedded Redis, local workers and the demo)."""
    import uvicorn

    from app.embedded import EmbeddedRedis, EmbeddedRedisError
    from app.main import create_app
    from models.training import resolve_device
    from worker.settings import load_settings

    overrides: dict[str, Any] = {"data_dir": args.data_dir} if args.data_dir else {}
    try:
        settings = load_settings(**overrides)
    except ValueError as exc:
        _fail(str(exc))
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
        # From here a Ctrl-C (SIGINT) or SIGTERM unwinds to the orderly shutdown below.
        # uvicorn installs its own handlers while it serves (it stops taking requests and
        # finishes those in flight) and re-raises the signal afterwards, reaching these.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _exit_on_signal)
        if workers:
            try:
                resolve_device(settings.device, "INFLUENCE_DEVICE", ValueError)
            except ValueError as exc:
                _fail(str(exc))
        if demo:
            try:
                ids = bootstrap_demo(settings)
            except ValueError as exc:  # e.g. a dataset cap below the demo's size
                _fail(f"cannot register the demo: {exc} (or start with --no-demo)")
            print(f"demo for tenant {settings.default_tenant!r}: {ids}")
        supervisor = WorkerSupervisor(*_worker_command(settings), workers).start()
        print(f"serving on http://{args.host}:{args.port} (OpenAPI at /docs)", flush=True)
        api = create_app(settings)
        stopping = api.state.services.stopping

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: FrameType | None) -> None:
                stopping.set()  # open event streams end, so the shutdown need not cut them
                super().handle_exit(sig, frame)

        Server(
            uvicorn.Config(
                api,
                host=args.host,
                port=args.port,
                log_level="warning",
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            )
        ).run()
    finally:
        _shutdown(supervisor, embedded, settings.job_time_limit_seconds)


def _stop_with_parent(parent: int, poll_s: float = PARENT_POLL_S) -> None:
    """A daemon thread that SIGTERMs this process once ``parent`` is no longer its parent
    (``serve`` was killed hard): the worker finishes its job, if it can, and exits."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        log.warning("serve (pid %d) is gone; stopping this worker", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def worker(args: argparse.Namespace) -> None:
    """Join the queue at REDIS_URL as one worker process."""
    from worker.__main__ import main as worker_main

    if args.parent_pid is not None:
        _stop_with_parent(args.parent_pid)
    worker_main(["--device", args.device] if args.device else [], prog="influence-service worker")


def _client(args: argparse.Namespace) -> InfluenceClient:
    from app.client import InfluenceClient

    return InfluenceClient(args.url, api_key=args.api_key)


def _by_name(records: list[Any], name: str, what: str) -> str:
    for record in records:
        if record.name == name:
            return record.id
    _fail(f"no {what} given and no {what} named {name!r} on the server (--{what} ID)")


def _print_ranking(ranking: Ranking, row: int | None = None, kind: str = "influence") -> None:
    if kind == "self_influence":  # one row: every training point's own score
        order = "highest" if ranking.direction == "helpful" else "lowest"
        print(f"{order} self-influence of {ranking.total} training points")
    else:
        where = f" (row {row})" if row is not None else ""
        print(
            f"test point {ranking.test}{where}: most {ranking.direction} of {ranking.total} "
            "training points"
        )
    print(f"{'rank':>5} {'index':>7} {'target':>8} {'score':>14}")
    for rank, item in enumerate(ranking.items, start=ranking.offset + 1):
        print(f"{rank:>5} {item.index:>7} {item.target!s:>8} {item.score:>14.6e}")
    if ranking.warning:
        print(f"warning: {ranking.warning}", file=sys.stderr)


def _report_line(report: dict[str, Any] | None) -> str:
    """The solver report in one line: method, iterations, relative residual, converged."""
    if not report:
        return "solver: no report"
    parts = [f"solver: {report.get('method', '?')}"]
    if report.get("iterations") is not None:
        parts.append(f"{report['iterations']} iterations")
    if report.get("relative_residual") is not None:
        parts.append(f"relative residual {report['relative_residual']:.2e}")
    if report.get("converged") is not None:
        parts.append(f"converged: {'yes' if report['converged'] else 'NO'}")
    return ", ".join(parts)


def _follow(client: InfluenceClient, job: str) -> JobView:
    """Wait for the job with a progress bar on stderr, which ends with a newline."""
    from tqdm import tqdm

    with tqdm(total=1.0, bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}") as bar:

        def update(view: JobView) -> None:
            bar.update(view.progress - bar.n)
            bar.set_description_str(f"{view.status} {view.phase}")

        return client.wait(job, progress=update)


def query(args: argparse.Namespace) -> None:
    """Submit an influence query, follow its progress and print the rankings."""
    from app.client import JobView

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
            state = "queued" if answer.status == "queued" else f"{answer.status} (joined)"
            print(f"job {answer.job} {state}", flush=True)
            view = _follow(client, answer.job)
        if view.status != "succeeded":
            _fail(f"job {view.id} {view.status}: {view.error}")
        print(view.meaning)
        for test, row in enumerate(args.indices):
            ranking = client.ranking(view.id, test=test, direction=args.direction, limit=args.limit)
            _print_ranking(ranking, row)
        print(_report_line(view.report))


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
        _print_ranking(ranking, kind=view.kind)
        print(_report_line(ranking.report or view.report))


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (high None: no upper bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"≥ {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {text}")
        return value

    return parse


def _positive_float(high: float) -> Callable[[str], float]:
    """An argparse type: a finite number in (0, high] (``float`` alone takes nan and inf,
    which JSON cannot carry)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if not 0 < value <= high:
            raise argparse.ArgumentTypeError(f"must be in (0, {high:g}], got {text}")
        return value

    return parse


class _AtMost(argparse.Action):
    """``nargs="+"`` with at most ``MAX_TEST_POINTS`` values."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        if len(values) > MAX_TEST_POINTS:
            raise argparse.ArgumentError(
                self, f"at most {MAX_TEST_POINTS} test rows per query, got {len(values)}"
            )
        setattr(namespace, self.dest, values)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="influence-service", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the API (and, by default, the embedded Redis + a worker)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_int_in(0, 65535), default=8000)
    p.add_argument(
        "--workers",
        type=_int_in(0),
        help="local worker processes (default: 1 with the embedded Redis)",
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
    p.add_argument("--parent-pid", type=_int_in(1), help=argparse.SUPPRESS)  # serve's workers
    p.set_defaults(run=worker)

    for name, run, help_text in (
        ("query", query, "ask which training points helped/harmed test points"),
        ("rank", rank, "print the ranking of a finished influence or self-influence job"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--url", default=os.environ.get("INFLUENCE_URL", "http://127.0.0.1:8000"))
        p.add_argument("--api-key", default=os.environ.get("INFLUENCE_API_KEY"))
        p.add_argument("--direction", choices=["helpful", "harmful"], default="helpful")
        p.add_argument(
            "--limit",
            type=_int_in(1, MAX_RANKING_LIMIT),
            default=10,
            help=f"training points to print (1-{MAX_RANKING_LIMIT})",
        )
        p.set_defaults(run=run)
    query_parser = sub.choices["query"]
    query_parser.add_argument("--model", help=f"model id (default: the {DEMO_MODEL_NAME!r} demo)")
    query_parser.add_argument("--train", help="training dataset id (default: the demo's)")
    query_parser.add_argument("--test", help="dataset holding the test points (default: demo's)")
    query_parser.add_argument(
        "--indices",
        type=_int_in(0, MAX_ROW),
        nargs="+",
        action=_AtMost,
        default=[0],
        help=f"test rows (at most {MAX_TEST_POINTS})",
    )
    query_parser.add_argument(
        "--loss", default="cross_entropy", choices=["cross_entropy", "mse", "bce"]
    )
    query_parser.add_argument(
        "--damping",
        type=_positive_float(MAX_DAMPING),
        default=1e-3,
        help=f"λ of G + λI, in (0, {MAX_DAMPING:g}]",
    )
    query_parser.add_argument("--solver", default="cg", choices=["cg", "exact", "lissa"])
    rank_parser = sub.choices["rank"]
    rank_parser.add_argument("job", help="influence or self-influence job id")
    rank_parser.add_argument(
        "--test", type=_int_in(0, MAX_TEST_POINTS - 1), default=0, help="test row of the job"
    )
    rank_parser.add_argument("--offset", type=_int_in(0, MAX_OFFSET), default=0)
    return parser


def _api_error_message(exc: Any) -> str:
    """One line for an error answer (``ApiError``): FastAPI's validation details become
    ``loc: msg``."""
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
    if args.command not in ("query", "rank"):
        args.run(args)
        return
    import httpx

    from app.client import ApiError

    try:
        args.run(args)
    except ApiError as exc:
        _fail(_api_error_message(exc))
    except httpx.TransportError as exc:
        _fail(f"cannot reach the service at {getattr(args, 'url', '?')}: {exc}")
    except KeyboardInterrupt:
        raise SystemExit(130) from None  # the job, if submitted, goes on in the service


if __name__ == "__main__":  # `python -m app.cli`: how serve starts its local workers
    main()
