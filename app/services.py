"""What a running API process holds: Redis clients and the worker/ layer's objects.

Built once per app by :func:`Services.connect` and reached from routes through the typed
dependencies in ``app.deps``. Artifacts are immutable (named by content), so the
in-process cache of sorted score rows and dataset targets can never serve stale data. It
holds only what rankings need — one sorted row per (matrix, test point, direction), never
a whole score matrix or dataset — and is bounded by bytes (``api_cache_bytes``). A cached
ranking read costs three Redis round-trips on the async client (rate limit, job record,
dataset record), no sort and no thread hop; a miss reads one row of the score matrix
through a memory map in the thread pool.

The query work of the influence routes lives here too (routes validate and delegate):
the registry look-ups that answer 404, the submit-time compatibility check of model,
training set and loss (:func:`compatibility_problem`), turning a request's test points
into a queue ``TestSpec``, and :meth:`Services.submit_query` — the result cache, then
the in-flight link that lets identical concurrent queries share one job. Failures are
:class:`ServiceError`s, which ``app.main`` answers with their status and detail.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
import torch
from starlette.concurrency import run_in_threadpool
from torch import Tensor

import models
from app.auth import ApiKeys
from app.limits import RateLimiter
from app.schemas import DatasetTest, InlineTest
from models.architectures import ARCHITECTURES, input_shape
from models.checkpoints import canonical_json
from worker.cache import result_key
from worker.contract import JobKind, JobStatus, TestSpec
from worker.main import REDIS_SOCKET_TIMEOUT_S, connect
from worker.queue import JobQueue, JobRecord
from worker.settings import Settings
from worker.store import ArtifactStore, Registry

__all__ = [
    "ByteLRU",
    "ConflictError",
    "NotFoundError",
    "ServiceError",
    "Services",
    "Submission",
    "UnprocessableError",
    "compatibility_problem",
]

log = logging.getLogger(__name__)


class ByteLRU:
    """A thread-safe least-recently-used map bounded by the bytes of its values."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.size = 0
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        """The value for ``key`` (now the most recent), or None."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        """Keep ``value`` (``nbytes`` large), evicting the least recent entries to stay
        within capacity; a value larger than the whole capacity is not kept."""
        if nbytes > self.capacity:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.size -= old[1]
            self._items[key] = (value, nbytes)
            self.size += nbytes
            while self.size > self.capacity:
                _, (_, freed) = self._items.popitem(last=False)
                self.size -= freed


def _nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# -- errors ------------------------------------------------------------------------------


class ServiceError(Exception):
    """A request the services refuse: ``app.main`` answers ``status_code`` with
    ``{"detail": detail}``."""

    status_code = 400

    def __init__(self, detail: Any) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFoundError(ServiceError):
    """404: no such model, dataset or job for this tenant."""

    status_code = 404


class ConflictError(ServiceError):
    """409: the request conflicts with the current state of what it names (e.g. a job whose
    training set has been deleted since); the caller can resolve it and retry."""

    status_code = 409


class UnprocessableError(ServiceError):
    """422 shaped like FastAPI's validation errors: ``loc`` names the field."""

    status_code = 422

    def __init__(self, loc: Sequence[str | int], msg: str) -> None:
        super().__init__([{"loc": list(loc), "msg": msg, "type": "value_error"}])


# -- model / dataset / loss compatibility --------------------------------------------------


@functools.lru_cache(maxsize=256)
def _output_shape(
    config_json: str, input_shape: tuple[int, ...], tokens: bool
) -> tuple[int, ...] | str | None:
    """Per-example output shape of the model a config describes on one example of
    ``input_shape`` (int64 token ids when ``tokens``, else real values), from a forward
    pass on the meta device (shapes only: no weights, no data, microseconds to
    milliseconds); the error text when the shapes do not fit; None when the meta device
    cannot tell (a config that does not build, an operation without a meta kernel)."""
    try:
        with torch.device("meta"):
            model = models.build(json.loads(config_json))
    except Exception:  # stored configs were built at upload; unknown: no check
        return None
    dtype = torch.int64 if tokens else torch.float32
    try:
        with torch.no_grad():
            outputs = model(torch.empty((1, *input_shape), dtype=dtype, device="meta"))
    except NotImplementedError:
        return None
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if not isinstance(outputs, Tensor):
        return None
    return tuple(outputs.shape[1:])


def _is_real(dtype_name: str) -> bool:
    return getattr(torch, dtype_name).is_floating_point


def compatibility_problem(
    model_id: str,
    config: dict[str, Any],
    dataset: dict[str, Any],
    layout: dict[str, dict[str, Any]],
    loss: str,
) -> tuple[str, str] | None:
    """Why a model cannot run on a dataset with a loss, judged from what the registry
    records (the model's config; the dataset's per-example ``layout``, ``task`` and
    ``num_classes``) and a forward pass on the meta device: ``("inputs", message)`` when
    the model cannot take the dataset's inputs, ``("loss", message)`` when the loss
    cannot pair the model's outputs with the dataset's targets, None when it fits or
    cannot be told without the data. Only failures that are certain are reported (each
    one would fail the job in the worker), so a query that passes may still fail there."""
    name = config.get("architecture")
    if name not in ARCHITECTURES:
        return None
    arch = ARCHITECTURES[name]
    what = f"model {model_id} ({name})"
    data_id = dataset.get("id", "?")
    in_shape = tuple(int(d) for d in layout["inputs"]["shape"])
    in_dtype = layout["inputs"]["dtype"]
    tokens = arch.input_kind == "tokens"
    if tokens == _is_real(in_dtype):
        wanted = "int64 token ids" if tokens else "real-valued inputs"
        return "inputs", f"{what} takes {wanted}; dataset {data_id} has {in_dtype} inputs"
    expected = list(input_shape(config))
    if tokens:
        context = expected[0]
        if len(in_shape) != 1 or in_shape[0] > context:
            return "inputs", (
                f"{what} takes sequences of at most {context} token ids per example; dataset "
                f"{data_id} has inputs of per-example shape {list(in_shape)}"
            )
    outputs = _output_shape(canonical_json(config), in_shape, tokens)
    if isinstance(outputs, str):
        return "inputs", (
            f"{what} cannot take the inputs of dataset {data_id}: per-example shape "
            f"{list(in_shape)}, the model is built for {expected} ({outputs})"
        )
    if outputs is None:
        return None
    out = list(outputs)
    targets = [int(d) for d in layout["targets"]["shape"]]
    real_targets = _is_real(layout["targets"]["dtype"])
    if loss == "cross_entropy":
        if real_targets:
            kind = "is a regression set with" if dataset.get("task") == "regression" else "has"
            return "loss", (
                f"cross_entropy needs integer class-index targets; dataset {data_id} {kind} "
                f"real-valued targets ({layout['targets']['dtype']}; use mse or bce)"
            )
        if out and targets != out[:-1]:
            return "loss", (
                f"cross_entropy needs one class index per output position: {what} gives "
                f"outputs of per-example shape {out}, so targets of shape {out[:-1]}; "
                f"dataset {data_id} has targets of shape {targets}"
            )
        classes = dataset.get("num_classes")
        if out and classes and classes > out[-1]:
            return "loss", (
                f"dataset {data_id} has {classes} classes but {what} gives {out[-1]} "
                "logit(s) per example"
            )
        return None
    if math.prod(targets) != math.prod(out):
        hint = " (class labels: use cross_entropy)" if not real_targets else ""
        return "loss", (
            f"{loss} compares outputs with targets value by value: {what} gives "
            f"{math.prod(out)} value(s) per example (shape {out}); dataset {data_id} has "
            f"{math.prod(targets)} target value(s) per example (shape {targets}){hint}"
        )
    return None


# -- submitting queries --------------------------------------------------------------------

_TOKEN_ID_LIMIT = 2**53  # integers a float64 holds exactly

IN_FLIGHT_PENDING = "pending:"
"""Value prefix of an in-flight link whose job is being submitted right now."""
IN_FLIGHT_PENDING_TTL_S = 30
"""TTL of a pending link: a submit takes milliseconds; an API process that died in between
leaves a link that expires after this."""
IN_FLIGHT_QUEUE_ALLOWANCE_S = 24 * 3600
"""The in-flight link lives for every attempt's time limit plus this long in the queue."""
IN_FLIGHT_WAIT_S = 2.0
"""How long a submit waits for a concurrent identical submit to name its job, before it
submits its own job (no link)."""

# compare-and-delete / compare-and-set of an in-flight link (KEYS[1]); ARGV[1] = the value
# it must still hold.
_UNLINK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RELINK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
"""


def _first_bad_row(bad: Tensor) -> int | None:
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None


@dataclass(frozen=True)
class Submission:
    """What ``submit_query`` did: ``cached`` is the finished job that answers the query
    (HTTP 200, no new job); else ``job`` is queued or running (HTTP 202): a new job, or
    the job an identical query submitted earlier and still in flight."""

    job: str
    status: JobStatus
    cached: JobRecord | None = None


@dataclass
class Services:
    """The API's handles on Redis, the job queue, the artifact store and the registry."""

    settings: Settings
    redis: redis.Redis
    aredis: redis.asyncio.Redis
    queue: JobQueue
    store: ArtifactStore
    registry: Registry
    api_keys: ApiKeys
    limiter: RateLimiter

    @classmethod
    def connect(cls, settings: Settings) -> Services:
        """Connect to ``settings.redis_url`` (required: ``serve`` fills it in when it starts
        the embedded Redis) and open the artifact store under ``data_dir``."""
        client = connect(settings)
        store = ArtifactStore.for_settings(settings)
        aclient = redis.asyncio.Redis.from_url(  # the event streams' XREADs block 0.5 s
            str(settings.redis_url),
            decode_responses=True,
            socket_timeout=REDIS_SOCKET_TIMEOUT_S,
            socket_connect_timeout=REDIS_SOCKET_TIMEOUT_S,
        )
        return cls(
            settings=settings,
            redis=client,
            aredis=aclient,
            queue=JobQueue(client, settings),
            store=store,
            registry=Registry(client, settings, store),
            api_keys=ApiKeys(settings.api_keys, settings.default_tenant),
            limiter=RateLimiter(
                aclient,
                settings.key_prefix,
                rate_per_s=settings.rate_limit_per_s,
                burst=settings.rate_limit_burst,
            ),
        )

    def __post_init__(self) -> None:
        self.stopping = threading.Event()
        """Set when the server begins to shut down (``serve`` sets it on Ctrl-C or SIGTERM):
        open event streams end instead of holding the shutdown up."""
        self._cache = ByteLRU(self.settings.api_cache_bytes)
        self._unlink = self.redis.register_script(_UNLINK)
        self._relink = self.redis.register_script(_RELINK)

    # -- registry look-ups (404) -------------------------------------------------------

    def owned_model(self, tenant: str, model_id: str) -> dict[str, Any]:
        """The tenant's registry record of a model; NotFoundError otherwise."""
        record = self.registry.get_model(tenant, model_id)
        if record is None:
            raise NotFoundError(f"model {model_id} not found")
        return record

    def owned_dataset(self, tenant: str, dataset_id: str) -> dict[str, Any]:
        """The tenant's registry record of a dataset; NotFoundError otherwise."""
        record = self.registry.get_dataset(tenant, dataset_id)
        if record is None:
            raise NotFoundError(f"dataset {dataset_id} not found")
        return record

    def deleted_inputs(self, tenant: str, payload: dict[str, Any]) -> list[str]:
        """What a query job's payload names that the tenant has deleted since — ``"model
        <id>"``, ``"training set <id>"``, ``"test dataset <id>"`` — in that order; empty when
        all are still registered (a job that retrains on them, like verify, needs them)."""
        gone = []
        if self.registry.get_model(tenant, payload["model"]) is None:
            gone.append(f"model {payload['model']}")
        if self.registry.get_dataset(tenant, payload["train"]) is None:
            gone.append(f"training set {payload['train']}")
        test = (payload.get("test") or {}).get("dataset")
        if test and test != payload["train"] and self.registry.get_dataset(tenant, test) is None:
            gone.append(f"test dataset {test}")
        return gone

    # -- queries -----------------------------------------------------------------------

    def engine_inputs(
        self,
        tenant: str,
        model_id: str,
        train_id: str,
        loss: str,
        *,
        loss_loc: Sequence[str | int] = ("body", "loss"),
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The caller's model and training-set records (404 unless both are theirs),
        checked to fit each other and ``loss`` (:func:`compatibility_problem`): 422 naming
        ``train`` when the model cannot take the training inputs, ``loss_loc`` when the
        loss cannot pair the model's outputs with the training targets."""
        model = self.owned_model(tenant, model_id)
        train = self.owned_dataset(tenant, train_id)
        problem = compatibility_problem(
            model_id, model.get("config") or {}, train, self.layout(train), loss
        )
        if problem is not None:
            which, msg = problem
            raise UnprocessableError(("body", "train") if which == "inputs" else loss_loc, msg)
        return model, train

    def inline_test(
        self, model_record: dict[str, Any], train_record: dict[str, Any], test: InlineTest
    ) -> TestSpec:
        """Store inline test points as a tensor artifact shaped and typed like the training
        set, whose layout comes from its registry record (the data are not loaded). Values
        that the cast would silently change are a 422 naming the row: non-integer or
        out-of-vocabulary token ids, class indices outside the classes, targets of the
        wrong width. Errors are under ``test.inline``, like the schema's for inline points."""
        loc = ("body", "test", "inline")
        layout = self.layout(train_record)
        in_shape = layout["inputs"]["shape"]
        in_dtype = getattr(torch, layout["inputs"]["dtype"])
        out_shape = layout["targets"]["shape"]
        out_dtype = getattr(torch, layout["targets"]["dtype"])
        vocab = (model_record.get("config") or {}).get("vocab_size")
        width = math.prod(in_shape)
        for row, values in enumerate(test.inputs):
            if len(values) != width:
                raise UnprocessableError(
                    (*loc, "inputs", row),
                    f"has {len(values)} values; the training inputs have {width} "
                    f"(shape {in_shape})",
                )
        inputs = torch.tensor(test.inputs, dtype=torch.float64)
        if not in_dtype.is_floating_point:  # token ids
            limit = vocab or _TOKEN_ID_LIMIT
            row = _first_bad_row((inputs != inputs.round()) | (inputs < 0) | (inputs >= limit))
            if row is not None:
                bound = vocab if vocab else "∞"
                raise UnprocessableError(
                    (*loc, "inputs", row),
                    f"must hold integer token ids in [0, {bound})",
                )
        out_width = math.prod(out_shape)
        for row, value in enumerate(test.targets):
            count = len(value) if isinstance(value, list) else 1
            if count != out_width:
                raise UnprocessableError(
                    (*loc, "targets", row),
                    f"has {count} value(s); the training targets have {out_width} per example "
                    f"(shape {out_shape})",
                )
        targets = torch.tensor(
            [v if isinstance(v, list) else [v] for v in test.targets], dtype=torch.float64
        )
        if not out_dtype.is_floating_point:
            classes = train_record.get("num_classes") or vocab
            limit = classes or _TOKEN_ID_LIMIT
            row = _first_bad_row((targets != targets.round()) | (targets < 0) | (targets >= limit))
            if row is not None:
                raise UnprocessableError(
                    (*loc, "targets", row),
                    f"must be a class index in [0, {classes or '∞'})",
                )
        inputs = inputs.to(in_dtype).reshape(-1, *in_shape)
        targets = targets.to(out_dtype).reshape(-1, *out_shape)
        return TestSpec(artifact=self.store.put_tensors({"inputs": inputs, "targets": targets}))

    def dataset_test(
        self,
        tenant: str,
        test: DatasetTest,
        train_record: dict[str, Any] | None = None,
        *,
        loc: Sequence[str | int] = ("body", "test"),
    ) -> TestSpec:
        """Rows of one of the caller's datasets: 404 if not theirs, 422 naming
        ``indices`` out of range, and with ``train_record`` 422 naming ``dataset`` unless
        its examples are shaped and typed like the training set's (the worker refuses
        anything else). ``loc`` is where the request's schema reports ``test``'s fields:
        ``("body", "test", "dataset")`` where ``test`` may also be inline points."""
        record = self.owned_dataset(tenant, test.dataset)
        size = record["size"]
        bad = [i for i in test.indices if i >= size]
        if bad:
            raise UnprocessableError(
                (*loc, "indices"),
                f"{bad[:5]} out of range for dataset {test.dataset} of size {size}",
            )
        if train_record is not None and test.dataset != train_record["id"]:
            mine, theirs = self.layout(record), self.layout(train_record)
            for name in ("inputs", "targets"):
                got, want = mine[name], theirs[name]
                if list(got["shape"]) != list(want["shape"]) or _is_real(got["dtype"]) != _is_real(
                    want["dtype"]
                ):
                    raise UnprocessableError(
                        (*loc, "dataset"),
                        f"dataset {test.dataset} has {name} of per-example shape "
                        f"{list(got['shape'])} ({got['dtype']}); the training set "
                        f"{train_record['id']} has {list(want['shape'])} ({want['dtype']})",
                    )
        return TestSpec(dataset=test.dataset, indices=test.indices)

    def _result_present(self, record: JobRecord) -> bool:
        """Whether a succeeded job's score matrix is still in the artifact store."""
        scores = (record.result or {}).get("scores")
        if scores is None or self.store.exists(scores):
            return True
        log.warning("job %s: its scores artifact %s is missing from the store", record.id, scores)
        return False

    @property
    def in_flight_ttl(self) -> int:
        """Lifetime of an in-flight link: every attempt's time limit plus a day queued."""
        s = self.settings
        return math.ceil(s.max_attempts * s.job_time_limit_seconds) + IN_FLIGHT_QUEUE_ALLOWANCE_S

    def submit_query(self, tenant: str, kind: JobKind, payload: dict[str, Any]) -> Submission:
        """Answer an influence or self-influence query: the tenant's finished job for the
        same query (result cache; its scores still stored), else the job an identical
        query submitted that is still queued or running, else a new job.

        De-duplication: the new job's id is linked under ``Keys.in_flight`` (SET NX, with
        a TTL) while it is submitted; a concurrent identical submit that finds the link
        returns that job. A link whose job failed, was canceled (or asked to cancel) or
        expired is removed (compare-and-delete) and the query is submitted afresh."""
        key = result_key(kind, payload)
        cached = self.queue.cached_job(tenant, key, self._result_present)
        if cached is not None:
            return Submission(cached.id, cached.status, cached)
        link = self.queue.keys.in_flight(tenant, key)
        deadline = time.monotonic() + IN_FLIGHT_WAIT_S
        while time.monotonic() < deadline:
            token = f"{IN_FLIGHT_PENDING}{uuid.uuid4().hex}"
            if self.redis.set(link, token, nx=True, ex=IN_FLIGHT_PENDING_TTL_S):
                try:
                    job = self.queue.submit(kind, payload, tenant=tenant, cache_key=key)
                except BaseException:
                    self._unlink(keys=[link], args=[token])
                    raise
                # the link now names the job (unless its pending TTL ran out meanwhile)
                self._relink(keys=[link], args=[token, job, self.in_flight_ttl])
                return Submission(job, JobStatus.QUEUED)
            current = self.redis.get(link)
            if current is None:  # went away between SET and GET: try again
                continue
            if current.startswith(IN_FLIGHT_PENDING):  # being submitted right now
                time.sleep(0.02)
                continue
            record = self.queue.get(current, tenant)
            if record is not None and not record.cancel_requested:
                if record.status in (JobStatus.QUEUED, JobStatus.RUNNING):
                    return Submission(record.id, record.status)
                if record.status == JobStatus.SUCCEEDED and self._result_present(record):
                    return Submission(record.id, record.status, record)
            self._unlink(keys=[link], args=[current])  # failed, canceled or gone
        log.warning("in-flight link %s stayed pending %.1f s; submitting", link, IN_FLIGHT_WAIT_S)
        job = self.queue.submit(kind, payload, tenant=tenant, cache_key=key)
        return Submission(job, JobStatus.QUEUED)

    async def job(self, job_id: str, tenant: str) -> JobRecord | None:
        """The tenant's job, read without a thread hop (the hot path of cached rankings and
        of SSE streams); None for a missing job or another tenant's."""
        fields = await self.aredis.hgetall(self.queue.keys.job(job_id))
        if not fields or fields.get("tenant") != tenant:
            return None
        return JobRecord.from_hash(job_id, fields)

    async def dataset_record(self, tenant: str, dataset_id: str) -> dict[str, Any] | None:
        """The tenant's registry record of a dataset (async twin of Registry.get_dataset)."""
        raw = await self.aredis.hget(self.queue.keys.datasets(tenant), dataset_id)
        return json.loads(raw) if raw else None

    def dataset_row(self, record: dict[str, Any], index: int) -> models.Dataset:
        """Row ``index`` of the dataset a registry record points to, as a one-example
        Dataset with the file's metadata; only that row is read (memory map)."""
        artifact = record["artifact"]
        metadata, _ = self.store.describe(artifact)
        return models.Dataset(
            self.store.get_tensor(artifact, "inputs", index)[None],
            self.store.get_tensor(artifact, "targets", index)[None],
            json.loads(metadata.get("metadata") or "{}"),
        )

    def layout(self, record: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Per-example shape and dtype of a dataset's ``inputs`` and ``targets``: stored
        in the record at registration, else read from the file header (older records)."""
        if "tensors" in record:
            return record["tensors"]
        _, layout = self.store.describe(record["artifact"])
        return {
            name: {"shape": layout[name]["shape"][1:], "dtype": layout[name]["dtype"]}
            for name in ("inputs", "targets")
        }

    async def ranked(
        self, scores_artifact: str, row: int, descending: bool
    ) -> tuple[Tensor, Tensor]:
        """(sorted scores, training indices) of one test row of a score matrix: from the
        cache, else read and sorted in the thread pool (and cached)."""
        key = ("ranked", scores_artifact, row, descending)
        hit = self._cache.get(key)
        if hit is not None and not self.store.exists(scores_artifact):
            hit = None  # its file was removed since: answer as for an uncached row (410)
        if hit is None:
            hit = await run_in_threadpool(self._rank, scores_artifact, row, descending)
            self._cache.put(key, hit, _nbytes(*hit))
        return hit

    def _rank(self, scores_artifact: str, row: int, descending: bool) -> tuple[Tensor, Tensor]:
        _, layout = self.store.describe(scores_artifact)
        matrix = len(layout["scores"]["shape"]) == 2
        values = self.store.get_tensor(scores_artifact, "scores", row if matrix else None)
        return values.sort(descending=descending, stable=True)

    async def targets(self, record: dict[str, Any]) -> Tensor:
        """The targets of the dataset a registry record points to (cached; inputs are
        never loaded)."""
        key = ("targets", record["artifact"])
        hit = self._cache.get(key)
        if hit is None:
            hit = await run_in_threadpool(self.store.get_tensor, record["artifact"], "targets")
            self._cache.put(key, hit, _nbytes(hit))
        return hit

    async def aclose(self) -> None:
        """Close both Redis clients."""
        await self.aredis.aclose()
        self.redis.close()
