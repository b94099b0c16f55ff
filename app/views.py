"""Response models of the HTTP API: what ``GET``s return and ``POST``s acknowledge.

Pydantic only (torch appears in annotations alone), so ``app.client`` and the CLI load
them without torch; ``app.schemas`` re-exports them next to the request models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from worker.meanings import SCORE_MEANING, SELF_INFLUENCE_MEANING

if TYPE_CHECKING:
    from torch import Tensor

    import models

__all__ = [
    "MEANING_DESCRIPTION",
    "DatasetItem",
    "DatasetRecord",
    "Item",
    "JobAccepted",
    "JobList",
    "JobView",
    "ModelRecord",
    "Ranking",
    "Target",
    "meaning_of",
    "target_value",
]


class ModelRecord(BaseModel):
    """A registered checkpoint (``GET /models``)."""

    id: str
    architecture: str
    parameters: int
    name: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)


class DatasetRecord(BaseModel):
    """A registered dataset (``GET /datasets``): task, classes, shapes in ``metadata``."""

    id: str
    size: int
    name: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


Target = int | float | list[float]


def target_value(target: Tensor) -> Target:
    """A dataset target as JSON: class index, scalar value, or a vector."""
    if target.dim() == 0 or target.numel() == 1:
        value = target.reshape(()).item()
        return int(value) if not target.is_floating_point() else float(value)
    return [float(v) for v in target.reshape(-1).tolist()]


class DatasetItem(BaseModel):
    """One dataset row's target and class name (``GET /datasets/{id}/items/{i}``)."""

    index: int
    target: Target
    label: str | None = Field(None, description="class name (classification with class_names)")

    @classmethod
    def of(cls, dataset: models.Dataset, row: int, *, index: int | None = None) -> DatasetItem:
        """The item for ``dataset``'s row ``row``, reported as dataset row ``index``
        (default ``row``; differs when ``dataset`` holds only that row)."""
        target = target_value(dataset.targets[row])
        names = dataset.metadata.get("class_names")
        label = names[target] if isinstance(target, int) and names and target < len(names) else None
        return cls(index=row if index is None else index, target=target, label=label)


MEANING_DESCRIPTION = (
    "what the job's scores mean: influence and self-influence jobs; null for other kinds "
    "(verify, decomposition), whose results are not scores"
)


def meaning_of(kind: str) -> str | None:
    """The ``meaning`` shown with a job of ``kind``: its score convention, or None for
    kinds whose results are not influence scores."""
    return {"influence": SCORE_MEANING, "self_influence": SELF_INFLUENCE_MEANING}.get(str(kind))


class JobAccepted(BaseModel):
    """A job was queued: poll ``GET /jobs/{job}`` or stream its events."""

    job: str
    status: str
    meaning: str | None = Field(None, description=MEANING_DESCRIPTION)

    @property
    def job_id(self) -> str:
        """The job's id (``JobView.job_id`` names the same thing)."""
        return self.job


class JobView(BaseModel):
    """A job as ``GET /jobs/{id}`` shows it; ``result`` is null until it succeeded."""

    id: str
    kind: str
    status: Literal["queued", "running", "succeeded", "failed", "canceled"]
    cancel_requested: bool = Field(
        False,
        description="a running job was asked to cancel; it becomes canceled when its "
        "worker next reports progress",
    )
    progress: float = Field(description="0–1, never decreases")
    phase: str
    attempts: int
    max_attempts: int
    error: str | None = None
    created: float
    started: float | None = None
    finished: float | None = None
    payload: dict[str, Any]
    result: dict[str, Any] | None = None
    report: dict[str, Any] | None = Field(None, description="solver report")
    cached: bool = Field(False, description="answered from the result cache (no new job)")
    links: dict[str, str] = Field(
        default_factory=dict, description="ranking and scores URLs (influence jobs)"
    )
    meaning: str | None = Field(None, description=MEANING_DESCRIPTION)

    @property
    def job_id(self) -> str:
        """The job's id (``JobAccepted.job_id`` names the same thing)."""
        return self.id


class JobList(BaseModel):
    """A page of the caller's jobs, newest first."""

    items: list[JobView]


class Item(BaseModel):
    """One training point of a ranking."""

    index: int = Field(description="row of the training set")
    score: float
    target: Target | None = Field(None, description="training target (null if deleted)")


class Ranking(BaseModel):
    """One page of training points ordered by score for one test point."""

    job: str
    test: int
    direction: Literal["helpful", "harmful"]
    items: list[Item]
    total: int
    offset: int
    report: dict[str, Any] | None = None
    meaning: str = SCORE_MEANING
    warning: str | None = Field(
        None,
        description="set when part of the page could not be filled in, e.g. the job's "
        "training set was deleted, so every item's target is null; null otherwise",
    )
