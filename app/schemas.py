"""Request and response bodies of the HTTP API (pydantic lives here, at the edge).

Request models extend the queue contract's payload schemas (``worker.contract``) with
the bounds a public endpoint needs: every number has a range, so a bad value is a 422
that names the field instead of a job that fails later. The score convention travels
in every influence response as ``meaning``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

import models
from app.views import (
    DatasetRecord,
    Item,
    JobAccepted,
    JobList,
    JobView,
    ModelRecord,
    Ranking,
    meaning_of,
)
from influence.decomposition import DecompositionArguments
from influence.experiments.config import CorrelationArguments, MislabelArguments, build_dataclass
from influence.response import ResponseArguments
from worker.contract import (
    MAX_SEED,
    SCORE_MEANING,
    SELF_INFLUENCE_MEANING,
    DatasetId,
    DecompositionPayload,
    InfluencePayload,
    SelfInfluencePayload,
    SolverSpec,
    VerifyPayload,
)
from worker.settings import MAX_TEST_POINTS

__all__ = [
    "MAX_LISSA_WORK",
    "MAX_RETRAIN_WORK",
    "MAX_TEST_POINTS",
    "SCORE_MEANING",
    "SELF_INFLUENCE_MEANING",
    "BuiltinDatasetRequest",
    "DatasetRecord",
    "DatasetTest",
    "DecompositionRequest",
    "InfluenceRequest",
    "InlineTest",
    "Item",
    "JobAccepted",
    "JobList",
    "JobView",
    "ModelRecord",
    "Ranking",
    "SelfInfluenceRequest",
    "SolverRequest",
    "TestPoints",
    "VerifyRequest",
    "meaning_of",
]

MAX_LISSA_WORK = 1_000_000
"""Bound on LiSSA depth × repeats (each step is one minibatch curvature product)."""
MAX_REMOVED_SETS = 200
"""Most removed points (each one a set of retrainings) a decomposition job may sample."""
MAX_RETRAIN_EPOCHS = 10_000
MAX_LBFGS_STEPS = 1_000
MAX_LBFGS_ITER = 1_000
"""Bound on ``recipe.lbfgs_max_iter`` (iterations per L-BFGS step; torch's default is 20)."""
MAX_LBFGS_HISTORY = 1_000
"""Bound on ``recipe.lbfgs_history`` (L-BFGS keeps 2 × history vectors of the model's size)."""
MAX_MILESTONES = 100
MAX_SOLVER_ITER = 100_000
"""Bound on CG iterations and on LiSSA's depth, as for the influence queries' solver."""
MAX_RETRAIN_WORK = 1_000_000
"""Bound on the total retraining of a decomposition job, in passes over the training set
(an epoch, or one L-BFGS iteration): removed sets × retrainings per set × passes per
retraining, over the decomposition, its correlations and a mislabel run."""
DECOMPOSITION_RETRAININGS = 4
"""Retrainings per removed set of a checkpoint's decomposition: warm, proximal, PBRF and
linearized PBRF (no cold start without a recorded run)."""
CHECKPOINT_CORRELATION_METHODS = tuple(m for m in CorrelationArguments().methods if m != "cold")
"""``correlation.methods`` when a request leaves it out: the library's default methods
that a checkpoint can run (no cold start without a recorded run)."""

Damping = Annotated[
    float, Field(gt=0, le=1e6, description="λ of the damped curvature G + λI (must be > 0)")
]


class SolverRequest(SolverSpec):
    """The solver settings of ``worker.contract.SolverSpec``, with LiSSA's total work bounded."""

    @model_validator(mode="after")
    def _bounded_lissa(self) -> SolverRequest:
        if self.name == "lissa" and self.depth * self.repeats > MAX_LISSA_WORK:
            raise ValueError(
                f"solver.depth × solver.repeats = {self.depth * self.repeats} exceeds "
                f"{MAX_LISSA_WORK}"
            )
        return self


class _Body(BaseModel):
    """A request body: unknown fields are refused, and so are non-finite numbers (JSON's
    1e400, NaN, Infinity), like the queue contract's payloads."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class InlineTest(_Body):
    """Test points sent in the request: one row per point, flattened in C order."""

    __test__ = False  # not a pytest class

    inputs: list[list[float]] = Field(
        min_length=1,
        max_length=MAX_TEST_POINTS,
        description="one row per point: real values, or integer token ids for a language "
        "model (each in [0, vocab_size))",
    )
    targets: list[float | list[float]] = Field(
        min_length=1,
        max_length=MAX_TEST_POINTS,
        description="per point: a class index (classification), a value (single-output "
        "regression), or a list as wide as one training target (multi-output regression, "
        "next-token targets)",
    )

    @model_validator(mode="after")
    def _same_length(self) -> InlineTest:
        if len(self.inputs) != len(self.targets):
            raise ValueError(
                f"test.inputs has {len(self.inputs)} rows but test.targets has {len(self.targets)}"
            )
        return self


class DatasetTest(_Body):
    """Test points taken from a stored dataset by row index."""

    __test__ = False

    dataset: DatasetId
    indices: list[Annotated[int, Field(ge=0, le=10**9)]] = Field(
        min_length=1, max_length=MAX_TEST_POINTS
    )


def _test_shape(value: Any) -> str | None:
    """Which shape of test points a request means: ``dataset`` when it names a dataset,
    else ``inline``; None (an error naming both shapes) for a value that is no object."""
    if isinstance(value, dict):
        return "dataset" if "dataset" in value else "inline"
    if isinstance(value, DatasetTest | InlineTest):
        return "dataset" if isinstance(value, DatasetTest) else "inline"
    return None


TestPoints = Annotated[
    Annotated[InlineTest, Tag("inline")] | Annotated[DatasetTest, Tag("dataset")],
    Discriminator(
        _test_shape,
        custom_error_type="test_shape",
        custom_error_message="test must be an object: {inputs, targets} (inline points) or "
        "{dataset, indices} (rows of a stored dataset)",
    ),
]
"""Test points of a query, told apart by the presence of ``dataset``: a mistake is
reported for the shape the request meant only, under ``test.inline`` or ``test.dataset``."""


class InfluenceRequest(InfluencePayload):
    """``POST /influence``: scores of every training point for each test point."""

    test: TestPoints
    damping: Damping = 1e-3
    weight_decay: float = Field(0.0, ge=0, le=1e3, description="wd of the training cost")
    solver: SolverRequest = SolverRequest()


class SelfInfluenceRequest(SelfInfluencePayload):
    """``POST /self-influence``: ``(1/N) ∇L_iᵀ (G+λI)⁻¹ ∇L_i`` for every training point."""

    damping: Damping = 1e-3
    weight_decay: float = Field(0.0, ge=0, le=1e3, description="wd of the training cost")
    solver: SolverRequest = SolverRequest()


class VerifyRequest(_Body):
    """``POST /influence/{job}/verify``: the query job comes from the path; ``test`` must
    be a row of that job's test points (checked against the job, 422 naming ``test``)."""

    top: int = Field(10, ge=1, le=50, description="top-k helpful and top-k harmful points")
    method: Literal["pbrf", "warm", "linearized"] = "pbrf"
    test: int | None = Field(None, ge=0, lt=MAX_TEST_POINTS, description="test row; None: all")
    steps: int = Field(50, ge=1, le=MAX_LBFGS_STEPS, description="L-BFGS steps per retraining")

    def payload(self, job: str) -> VerifyPayload:
        """The queue payload checking influence job ``job``."""
        return VerifyPayload(job=job, **self.model_dump())


def _validated(build: Callable[[dict[str, Any]], Any], value: dict[str, Any], what: str) -> Any:
    """Build the library's validated argument object from a JSON dict (errors → 422)."""
    try:
        return build(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid {what}: {exc}") from None


def _at_most(value: int | None, bound: int, name: str) -> None:
    """ValueError naming ``name`` when ``value`` exceeds ``bound``."""
    if value is not None and value > bound:
        raise ValueError(f"{name} = {value} exceeds {bound}")


def _seed(value: int, name: str) -> None:
    """ValueError naming ``name`` unless ``value`` is a seed torch takes: in [0, 2⁶³ − 1]
    (a larger one would fail the job late, when the worker seeds its generator)."""
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"{name} = {value} must be in [0, {MAX_SEED}]")


class DecompositionRequest(DecompositionPayload):
    """``POST /decompositions``: the paper's gap decomposition on a stored checkpoint. The
    nested settings are checked here with the library's own argument classes, and the
    number of retrainings is bounded."""

    test: DatasetTest | None = None  # type: ignore[assignment]
    damping: Damping = 1e-3

    @field_validator("recipe")
    @classmethod
    def _recipe(cls, value: dict[str, Any]) -> dict[str, Any]:
        recipe = _validated(models.Recipe.from_dict, value, "training recipe")
        _at_most(recipe.epochs, MAX_RETRAIN_EPOCHS, "recipe.epochs")
        _at_most(recipe.lbfgs_max_iter, MAX_LBFGS_ITER, "recipe.lbfgs_max_iter")
        _at_most(recipe.lbfgs_history, MAX_LBFGS_HISTORY, "recipe.lbfgs_history")
        _at_most(len(recipe.milestones), MAX_MILESTONES, "the number of recipe.milestones")
        _seed(recipe.seed, "recipe.seed")
        return value

    @field_validator("response")
    @classmethod
    def _response(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "damping" in value:
            raise ValueError("give damping at the top level, not in response")
        if "device" in value:
            raise ValueError("response.device is the worker's (INFLUENCE_DEVICE), not a job's")
        response = _validated(lambda v: ResponseArguments(**v), value, "response arguments")
        _at_most(response.epochs, MAX_RETRAIN_EPOCHS, "response.epochs")
        _at_most(response.lbfgs_steps, MAX_LBFGS_STEPS, "response.lbfgs_steps")
        _at_most(response.cg_max_iter, MAX_SOLVER_ITER, "response.cg_max_iter")
        _at_most(response.lissa_depth, MAX_SOLVER_ITER, "response.lissa_depth")
        _at_most(
            response.lissa_depth * response.lissa_repeats,
            MAX_LISSA_WORK,
            "response.lissa_depth × response.lissa_repeats",
        )
        return value

    @field_validator("arguments")
    @classmethod
    def _arguments(cls, value: dict[str, Any]) -> dict[str, Any]:
        arguments = _validated(
            lambda v: DecompositionArguments(**v), value, "decomposition arguments"
        )
        _at_most(arguments.num_points, MAX_REMOVED_SETS, "arguments.num_points")
        _seed(arguments.seed, "arguments.seed")
        return value

    @field_validator("correlation")
    @classmethod
    def _correlation(
        cls, value: dict[str, Any] | None, info: ValidationInfo
    ) -> dict[str, Any] | None:
        """Valid ``CorrelationArguments`` within bounds, no cold start (a checkpoint has no
        recorded run; left out, ``methods`` is CHECKPOINT_CORRELATION_METHODS), and at most
        as many test points drawn as ``test`` gives."""
        if value is None:
            return None
        if "methods" not in value:
            value = {**value, "methods": list(CHECKPOINT_CORRELATION_METHODS)}
        correlation = _validated(
            lambda v: CorrelationArguments(**v), value, "correlation arguments"
        )
        _at_most(correlation.num_points, MAX_REMOVED_SETS, "correlation.num_points")
        _at_most(correlation.num_test, MAX_TEST_POINTS, "correlation.num_test")
        _seed(correlation.seed, "correlation.seed")
        if "cold" in correlation.methods:
            raise ValueError(
                "correlation.methods: 'cold' needs the recorded training run (θ⁰ and "
                "batch orders), which a checkpoint does not have; choose from warm, "
                "proximal, pbrf, linearized, two_stage"
            )
        test = info.data.get("test")
        if test is not None and correlation.num_test > len(test.indices):
            raise ValueError(
                f"correlation.num_test = {correlation.num_test} exceeds the "
                f"{len(test.indices)} test points given in test.indices"
            )
        return value

    @field_validator("mislabel")
    @classmethod
    def _mislabel(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        mislabel = _validated(
            lambda v: build_dataclass(MislabelArguments, v, "mislabel"), value, "mislabel"
        )
        _at_most(mislabel.pbrf_points, MAX_REMOVED_SETS, "mislabel.pbrf_points")
        _seed(mislabel.seed, "mislabel.seed")
        return value

    @model_validator(mode="after")
    def _bounded_retraining(self) -> DecompositionRequest:
        """Total retraining = removed sets × retrainings × passes over the training set per
        retraining (epochs, or L-BFGS steps × iterations per step), at most
        MAX_RETRAIN_WORK (each field may be within its own bound and the product not)."""
        recipe = models.Recipe.from_dict(self.recipe)
        response = ResponseArguments(**{**self.response, "damping": self.damping})
        if response.optimizer == "lbfgs":
            epochs, per = response.lbfgs_steps, "response.lbfgs_steps"
        elif response.epochs is not None:
            epochs, per = response.epochs, "response.epochs"
        else:
            epochs, per = max(1, recipe.epochs // 2), "recipe.epochs / 2"
        per = f"{per} ({epochs})"
        # an L-BFGS step (the recipe's, or the response's, which keeps the recipe's
        # lbfgs_max_iter) is up to lbfgs_max_iter iterations, each about one pass
        lbfgs = f" × recipe.lbfgs_max_iter ({recipe.lbfgs_max_iter})"
        if response.optimizer == "lbfgs" or recipe.optimizer == "lbfgs":
            epochs, per = epochs * recipe.lbfgs_max_iter, per + lbfgs
        points = DecompositionArguments(**self.arguments).num_points
        retrainings = points * DECOMPOSITION_RETRAININGS
        terms = f"arguments.num_points ({points}) × {DECOMPOSITION_RETRAININGS} responses"
        if self.correlation is not None:
            correlation = CorrelationArguments(**self.correlation)
            # two_stage trains twice per point, plus once for the shared full-data warm start
            per_point = sum(2 if m == "two_stage" else 1 for m in correlation.methods)
            extra = int("two_stage" in correlation.methods)
            retrainings += correlation.num_points * per_point + extra
            terms += (
                f" + correlation.num_points ({correlation.num_points}) × {per_point} "
                "retrainings of correlation.methods" + (" + 1" if extra else "")
            )
        work = retrainings * epochs
        terms = f"({terms}) × {per}"
        if self.mislabel is not None:
            # one training from scratch on the corrupted labels, one PBRF retraining per
            # mislabel.pbrf_points
            pbrf_points = MislabelArguments(**self.mislabel).pbrf_points
            scratch = recipe.epochs * (recipe.lbfgs_max_iter if recipe.optimizer == "lbfgs" else 1)
            work += scratch + pbrf_points * epochs
            terms += f" + mislabel retraining: recipe.epochs ({recipe.epochs})"
            terms += lbfgs if recipe.optimizer == "lbfgs" else ""
            if pbrf_points:
                terms += f" + mislabel.pbrf_points ({pbrf_points}) × {per}"
        if work > MAX_RETRAIN_WORK:
            raise ValueError(
                f"retraining work in passes over the training set, {terms} = {work}, "
                f"exceeds {MAX_RETRAIN_WORK}; lower the number of points or the epochs"
            )
        return self


class BuiltinDatasetRequest(_Body):
    """``POST /datasets`` as JSON: one of the built-in scikit-learn datasets."""

    builtin: Literal["breast_cancer", "digits", "diabetes"]
    split: Literal["train", "test"] = "train"
