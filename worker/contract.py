"""The queue contract between the API and the workers: job kinds, statuses, Redis key
names, and the JSON payload/result schemas.

Payloads and results are JSON in Redis; tensors never are: they live in the artifact
store (``worker.store``) as safetensors, referenced by their sha256 id.

Score convention carried by every influence result (docs/engine.md, Conventions):
``score[q, i] = (1/N) ∇L_qᵀ (G + λI)⁻¹ ∇L_i`` (Eqn 20/50) is the predicted change of test
loss ``q`` when training point ``i`` is removed; positive = helpful, negative = harmful.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from influence import CG, Exact, LiSSA, NystromArguments
from worker.meanings import SCORE_MEANING, SELF_INFLUENCE_MEANING

__all__ = [
    "ENGINE_VERSION",
    "GROUP",
    "MAX_LISSA_SCALE",
    "MAX_SEED",
    "SCORE_MEANING",
    "SELF_INFLUENCE_MEANING",
    "DatasetId",
    "DecompositionPayload",
    "InfluencePayload",
    "InfluenceResult",
    "JobKind",
    "JobStatus",
    "Keys",
    "ModelId",
    "ScoreShardPayload",
    "SelfInfluencePayload",
    "SelfInfluenceResult",
    "SolverSpec",
    "TestSpec",
    "VerifyPayload",
    "check_mislabel_training_set",
    "payload_model",
]

ENGINE_VERSION = "1"
"""Bumped whenever a change in influence/ or the handlers changes numbers; part of cache keys."""

GROUP = "workers"
"""Name of the Redis Streams consumer group all workers join."""


class JobKind(StrEnum):
    """What a job computes; each kind has a payload schema (``payload_model``)."""

    INFLUENCE = "influence"
    SELF_INFLUENCE = "self_influence"
    VERIFY = "verify"
    DECOMPOSITION = "decomposition"
    SCORE_SHARD = "score_shard"  # internal: one slice of an influence job's training set


class JobStatus(StrEnum):
    """Lifecycle of a job: queued → running → succeeded | failed | canceled."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        """Whether the job is finished (no further state change)."""
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


class Keys:
    """Every Redis key of one deployment, derived from its prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    @property
    def stream(self) -> str:
        """The job stream (XADD by submit, XREADGROUP/XAUTOCLAIM by workers)."""
        return f"{self.prefix}stream"

    def job(self, job_id: str) -> str:
        """Hash of one job's state (see ``worker.queue.JobRecord`` for the fields)."""
        return f"{self.prefix}job:{job_id}"

    def events(self, job_id: str) -> str:
        """Per-job stream of progress/status events (for SSE); entries carry ``data`` JSON."""
        return f"{self.prefix}events:{job_id}"

    def shards_done(self, job_id: str) -> str:
        """Hash shard index → scores artifact of a sharded influence job (HLEN = shards done)."""
        return f"{self.prefix}shards:{job_id}"

    def tenant_jobs(self, tenant: str) -> str:
        """Sorted set job id → creation time of the tenant's visible jobs (no shard jobs);
        ids of expired jobs are removed lazily (``JobQueue.list``, ``JobQueue.submit``)."""
        return f"{self.prefix}tenant:{tenant}:jobs"

    @property
    def dead_letter(self) -> str:
        """List of JSON entries {job, kind, error, attempts, time} of jobs out of attempts,
        capped at ``Settings.dead_letter_max`` (oldest dropped)."""
        return f"{self.prefix}dead"

    @property
    def workers(self) -> str:
        """Sorted set worker name → last time seen."""
        return f"{self.prefix}workers"

    def models(self, tenant: str) -> str:
        """Hash model id → JSON record, per tenant."""
        return f"{self.prefix}tenant:{tenant}:models"

    def datasets(self, tenant: str) -> str:
        """Hash dataset id → JSON record, per tenant."""
        return f"{self.prefix}tenant:{tenant}:datasets"

    def result_cache(self, tenant: str, key: str) -> str:
        """String → id of the tenant's succeeded job that answered this query."""
        return f"{self.prefix}tenant:{tenant}:cache:{key}"

    def in_flight(self, tenant: str, key: str) -> str:
        """String → id of the tenant's job submitted for this query (result-cache key)
        while it may still be queued or running; set with NX and a TTL at submit, so an
        identical query sent meanwhile joins that job. Readers check the job's status: a
        link to a failed, canceled or expired job is replaced by the next submit."""
        return f"{self.prefix}tenant:{tenant}:inflight:{key}"

    def s_test_cache(self, key: str) -> str:
        """String → artifact id of an s_test matrix (shared by tenants: content-addressed)."""
        return f"{self.prefix}stest:{key}"

    @property
    def counters(self) -> str:
        """Hash of monotone counters (cache_hits, cache_misses, dead_lettered, ...)."""
        return f"{self.prefix}counters"


ID_PATTERN = r"^[0-9a-f]{8,64}$"
_ID = Annotated[str, Field(pattern=ID_PATTERN, description="content id (hex)")]


def _content_id(what: str, listing: str) -> Any:
    """A content id of a ``what`` (the pattern of ``_ID``) whose pattern error says what an
    id is and where to find one, rather than quoting the regular expression: a name (the
    easy mistake) is not an id."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> str:
        try:
            return handler(value)
        except ValidationError as exc:
            if any(error["type"] == "string_pattern_mismatch" for error in exc.errors()):
                raise PydanticCustomError(
                    "content_id",
                    f"must be a {what} id: the content id (64 lowercase hex digits) that "
                    f"{listing} lists; names are not accepted",
                ) from None
            raise

    return Annotated[
        str,
        Field(pattern=ID_PATTERN, description=f"{what} id (hex content id, see {listing})"),
        WrapValidator(check),
    ]


ModelId = _content_id("model", "GET /models")
DatasetId = _content_id("dataset", "GET /datasets")


MAX_SEED = 2**63 - 1
"""Largest seed a job accepts (torch seeds are 64-bit integers)."""

Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class _Schema(BaseModel):
    """Strict, immutable JSON schema (unknown fields are refused; floats must be finite:
    JSON's 1e400, NaN and Infinity are refused, so every payload has canonical JSON)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


MAX_LISSA_SCALE = 1e12
"""Upper bound on LiSSA's σ: a sanity cap far above the curvature of any model this
service trains (the recursion needs σ ≥ λ_max(G) + λ, and its depth grows with σ / λ_min,
so a σ near this cap would already need ~10⁹ steps to converge)."""


def _default(solver: type, name: str) -> Any:
    """The default of a solver dataclass field: the engine's solvers are the one source of
    truth for solver defaults, so a job asks for what a library call would do."""
    return next(f.default for f in dataclasses.fields(solver) if f.name == name)


_SOLVER_FIELDS: dict[str, frozenset[str]] = {
    "tol": frozenset({"cg", "lissa"}),
    "max_iter": frozenset({"cg"}),
    "preconditioner": frozenset({"cg"}),
    "rank": frozenset({"cg"}),
    "examples": frozenset({"cg"}),
    "depth": frozenset({"lissa"}),
    "repeats": frozenset({"lissa"}),
    "batch_size": frozenset({"lissa"}),
    "scale": frozenset({"lissa"}),
    "seed": frozenset({"lissa"}),
}
"""The solvers (``SolverSpec.name``) each solver field applies to."""

_SOLVER_CLASSES: dict[str, type] = {"cg": CG, "lissa": LiSSA}


class SolverSpec(_Schema):
    """iHVP solver of ``(G + λI) x = v`` (influence.Exact / CG / LiSSA, appendix G); unset
    fields take the defaults of ``influence.CG`` and ``influence.LiSSA``. A field that does
    not apply to ``name`` must be left at its default (a ValueError names it), so one
    computation has one payload, and so one cache key."""

    name: Literal["exact", "cg", "lissa"] = "cg"
    tol: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="CG: stop at relative residual ‖r‖/‖v‖ ≤ tol (default "
        f"{_default(CG, 'tol'):g}); LiSSA: stop once the averaged estimate changes by less "
        f"than tol, relative, over one window (default {_default(LiSSA, 'tol'):g}). Omitted: "
        "the named solver's default",
    )
    max_iter: int = Field(
        _default(CG, "max_iter"), ge=1, le=100_000, description="CG iteration cap"
    )
    depth: int = Field(
        _default(LiSSA, "depth"), ge=1, le=100_000, description="LiSSA recursion depth T"
    )
    repeats: int = Field(
        _default(LiSSA, "repeats"), ge=1, le=100, description="LiSSA repeats R (averaged)"
    )
    batch_size: int = Field(
        _default(LiSSA, "batch_size"), ge=1, le=65_536, description="LiSSA minibatch size"
    )
    scale: float | None = Field(
        _default(LiSSA, "scale"),
        gt=0,
        le=MAX_LISSA_SCALE,
        description="LiSSA σ (above the largest eigenvalue of G + λI); None: estimated by a "
        "short Lanczos run",
    )
    seed: Seed = Field(_default(LiSSA, "seed"), description="LiSSA minibatch seed")
    preconditioner: Literal["none", "nystrom"] = Field(
        "none",
        description="CG only: 'nystrom' fits a randomized Nyström preconditioner of G "
        "(influence.NystromArguments) before the solve; fewer iterations on large models",
    )
    rank: int = Field(
        _default(NystromArguments, "rank"),
        ge=1,
        le=4096,
        description="Nyström sketch size s (preconditioner='nystrom')",
    )
    examples: int | None = Field(
        _default(NystromArguments, "examples"),
        ge=1,
        description="Nyström: sketch G on this many highest-curvature training examples; "
        "None: all of them",
    )

    @model_validator(mode="before")
    @classmethod
    def _named_solvers_tolerance(cls, data: Any) -> Any:
        """An omitted ``tol`` becomes the named solver's own default."""
        if isinstance(data, dict) and data.get("tol") is None:
            solver = _SOLVER_CLASSES.get(data.get("name", "cg"))
            if solver is not None:
                data = {**data, "tol": _default(solver, "tol")}
        return data

    @field_validator(*_SOLVER_FIELDS, mode="after")
    @classmethod
    def _field_fits_the_solver(cls, value: Any, info: ValidationInfo) -> Any:
        """A field given for a solver it does not apply to must hold its default (fields
        are validated in order, so ``name`` and ``preconditioner`` are known here)."""
        field, name = info.field_name, info.data.get("name")
        solvers = _SOLVER_FIELDS[field]
        applies = name in solvers
        need = "solver.name " + " or ".join(repr(s) for s in sorted(solvers))
        if field in ("rank", "examples"):
            applies = applies and info.data.get("preconditioner") == "nystrom"
            need += " with solver.preconditioner='nystrom'"
        # tol's default depends on the solver: set by _named_solvers_tolerance
        default = None if field == "tol" else cls.model_fields[field].default
        if name is not None and not applies and value != default:
            raise ValueError(
                f"applies only to {need} (got solver.name={name!r}"
                + (
                    f", solver.preconditioner={info.data.get('preconditioner')!r}"
                    if field in ("rank", "examples")
                    else ""
                )
                + "): leave it out"
            )
        return value

    def build(self) -> Exact | CG | LiSSA:
        """The engine solver these settings describe."""
        if self.name == "exact":
            return Exact()
        if self.name == "cg":
            recipe = None
            if self.preconditioner == "nystrom":
                recipe = NystromArguments(rank=self.rank, examples=self.examples)
            return CG(tol=self.tol, max_iter=self.max_iter, preconditioner=recipe)
        return LiSSA(
            tol=self.tol,
            depth=self.depth,
            repeats=self.repeats,
            batch_size=self.batch_size,
            scale=self.scale,
            seed=self.seed,
        )


class TestSpec(_Schema):
    """Test points: a stored tensor artifact (``inputs``, ``targets``) or rows of a dataset."""

    __test__ = False  # not a pytest class

    artifact: _ID | None = Field(None, description="artifact id of safetensors {inputs, targets}")
    dataset: DatasetId | None = Field(None, description="dataset id (with indices)")
    indices: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_form(self) -> TestSpec:
        if (self.artifact is None) == (self.dataset is None):
            raise ValueError("test: give exactly one of 'artifact' or 'dataset' (+ 'indices')")
        if self.dataset is not None and self.indices is None:
            raise ValueError("test: 'dataset' needs 'indices'")
        if self.artifact is not None and self.indices is not None:
            raise ValueError("test: 'indices' only goes with 'dataset'")
        return self


class _EngineSpec(_Schema):
    model: ModelId = Field(description="checkpoint id (models.checkpoint_id; GET /models)")
    train: DatasetId = Field(description="training dataset id (GET /datasets)")
    loss: Literal["cross_entropy", "mse", "bce"] = "cross_entropy"
    hessian: Literal["gnh", "full"] = "gnh"
    damping: float = Field(1e-3, ge=0, description="λ of G + λI")
    weight_decay: float = Field(0.0, ge=0, description="wd of the training cost")
    solver: SolverSpec = SolverSpec()

    @model_validator(mode="after")
    def _nystrom_needs_gnh(self) -> _EngineSpec:
        if self.solver.preconditioner == "nystrom" and self.hessian != "gnh":
            raise ValueError(
                "solver.preconditioner='nystrom' needs hessian='gnh' (it sketches a positive "
                "semi-definite curvature); with hessian='full' use preconditioner='none'"
            )
        return self


class InfluencePayload(_EngineSpec):
    """Scores of every training point for each test point (one job for all of them)."""

    test: TestSpec


class SelfInfluencePayload(_EngineSpec):
    """``(1/N) ∇L_iᵀ (G+λI)⁻¹ ∇L_i`` for every training point (mislabel ranking)."""


class VerifyPayload(_Schema):
    """Ground-truth check of a finished influence job's top-k helpful and harmful points:
    each is removed and the response objective re-solved (influence.response.verify)."""

    job: str = Field(description="id of the succeeded influence job")
    top: int = Field(10, ge=1, le=100, description="k helpful and k harmful points per test row")
    method: Literal["pbrf", "warm", "linearized"] = "pbrf"
    test: int | None = Field(None, ge=0, description="test point (row of the job); None: all")
    steps: int = Field(50, ge=1, le=1000, description="full-batch L-BFGS steps per retraining")


class DecompositionPayload(_Schema):
    """The paper's decomposition (Table 5 gaps) on an uploaded checkpoint with its training
    recipe (no recorded θ⁰, so no cold start / warm-start gap), optionally with the test-loss
    correlations of Tables 6-8 on the given test points and the mislabel-detection curves of
    Figure 6."""

    model: ModelId
    train: DatasetId
    recipe: dict = Field(description="models.Recipe fields of the base training (validated there)")
    damping: float = Field(1e-3, ge=0, description="λ of G + λI and of the proximity term")
    response: dict = Field(
        default_factory=dict,
        description="influence.response.ResponseArguments fields besides damping, e.g. "
        '{"optimizer": "lbfgs", "lbfgs_steps": 25} (validated there)',
    )
    arguments: dict = Field(
        default_factory=dict,
        description="influence.decomposition.DecompositionArguments fields (validated there)",
    )
    test: TestSpec | None = Field(None, description="test points for the correlations")
    correlation: dict | None = Field(
        None,
        description="influence.experiments.config.CorrelationArguments fields; needs test",
    )
    mislabel: dict | None = Field(
        None,
        description="influence.experiments.config.MislabelArguments fields, e.g. "
        '{"fraction": 0.1, "seed": 0, "solver": "exact"}: also corrupt that fraction of the '
        "labels, retrain from scratch and return the Figure 6 detection curves "
        "(classification training sets only)",
    )

    @field_validator("recipe", "response", "arguments", "correlation", "mislabel")
    @classmethod
    def _finite_numbers(cls, value: dict | None, info: Any) -> dict | None:
        """Free-form settings are validated by the library later; non-finite numbers (which
        JSON cannot carry back out) are refused here, naming the entry."""
        bad = _non_finite(value, info.field_name)
        if bad is not None:
            raise ValueError(f"{bad} must be a finite number")
        return value

    @field_validator("correlation")
    @classmethod
    def _correlation_needs_test(cls, value: dict | None, info: ValidationInfo) -> dict | None:
        """Correlations need test points (an error under ``correlation``; ``test`` comes
        first, so it is known here unless it was itself invalid, which is reported)."""
        if value is not None and "test" in info.data and info.data["test"] is None:
            raise ValueError("correlation needs test points: give 'test' (dataset, indices)")
        return value


class ScoreShardPayload(_EngineSpec):
    """Internal: scores of training rows ``[start, stop)`` against a stored s_test."""

    parent: str
    index: int = Field(ge=0)
    start: int = Field(ge=0)
    stop: int = Field(gt=0)
    s_test: _ID = Field(description="artifact id of {s_test: [k, d]}")


def _non_finite(value: Any, path: str) -> str | None:
    """Path of the first non-finite float in a JSON value (None: all finite)."""
    if isinstance(value, float) and not math.isfinite(value):
        return path
    if isinstance(value, Mapping):
        items = ((f"{path}.{k}", v) for k, v in value.items())
    elif isinstance(value, list | tuple):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    return next((bad for p, v in items if (bad := _non_finite(v, p)) is not None), None)


def check_mislabel_training_set(metadata: Mapping[str, Any], dataset_id: str) -> None:
    """ValueError unless a training set can run mislabel detection (Figure 6), which
    corrupts class labels: its ``task`` must be ``classification`` with ``num_classes``.
    ``metadata`` is a dataset's metadata or its registry record (same keys). The API
    checks this at submit (422 naming ``mislabel``), the worker again before training."""
    if metadata.get("task") != "classification" or not metadata.get("num_classes"):
        kind = metadata.get("task") or "not a classification set"
        raise ValueError(
            "mislabel detection corrupts class labels and needs a classification training "
            f"set with num_classes; dataset {dataset_id} is {kind}"
        )


_PAYLOADS: dict[JobKind, type[_Schema]] = {
    JobKind.INFLUENCE: InfluencePayload,
    JobKind.SELF_INFLUENCE: SelfInfluencePayload,
    JobKind.VERIFY: VerifyPayload,
    JobKind.DECOMPOSITION: DecompositionPayload,
    JobKind.SCORE_SHARD: ScoreShardPayload,
}


def payload_model(kind: JobKind | str) -> type[_Schema]:
    """The payload schema of a job kind (unknown kind → ValueError listing the valid ones)."""
    try:
        return _PAYLOADS[JobKind(kind)]
    except ValueError:
        valid = ", ".join(k.value for k in JobKind)
        raise ValueError(f"unknown job kind {kind!r}; valid kinds: {valid}") from None


class InfluenceResult(_Schema):
    """Result of an influence job; the matrix is artifact ``scores`` = {scores: [k, N]}."""

    scores: _ID
    s_test: _ID
    num_test: int
    num_train: int
    test_targets: list[Any] = Field(
        description="target of each test point: a number, or a nested list for vector targets"
    )
    meaning: str = SCORE_MEANING


class SelfInfluenceResult(_Schema):
    """Result of a self-influence job; artifact ``scores`` = {scores: [N]}."""

    scores: _ID
    num_train: int
    meaning: str = SELF_INFLUENCE_MEANING
