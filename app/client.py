"""A typed, synchronous Python client for every endpoint of the HTTP API (httpx).

>>> client = InfluenceClient("http://127.0.0.1:8000", api_key=None)
>>> job = client.influence({"model": m, "train": t, "test": {"dataset": d, "indices": [0]}})
>>> client.wait(job).status        # a queued job (JobAccepted) or a cached one (JobView)
'succeeded'
>>> client.ranking(job, direction="harmful", limit=5).items

Every method that takes a job takes its id or the ``JobAccepted`` / ``JobView`` that
named it. Importing this module needs no torch: ``scores`` imports it when called.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import httpx
from pydantic import BaseModel

from app.views import (
    DatasetItem,
    DatasetRecord,
    JobAccepted,
    JobList,
    JobView,
    ModelRecord,
    Ranking,
)

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "ApiError",
    "DatasetItem",
    "DatasetRecord",
    "InfluenceClient",
    "JobAccepted",
    "JobList",
    "JobRef",
    "JobView",
    "ModelRecord",
    "Ranking",
    "WaitTimeoutError",
]

JobRef = str | JobAccepted | JobView
"""A job: its id, or the answer that named it (``JobAccepted.job`` / ``JobView.id``)."""

TERMINAL = frozenset({"succeeded", "failed", "canceled"})
STREAM_READ_TIMEOUT_S = 30.0
"""Longest silence ``wait`` accepts on an event stream before it reconnects (the server
sends a keep-alive every 10 s)."""
DEADLINE_SLACK_S = 1.0
"""``wait`` reconnects its stream when a read could end more than this past its deadline."""


class ApiError(RuntimeError):
    """A non-2xx answer: ``status`` and the server's ``detail``."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class WaitTimeoutError(TimeoutError):
    """``InfluenceClient.wait`` ran out of its ``timeout`` before the job finished; the job
    itself goes on (``last`` is its latest state seen, if any)."""

    def __init__(self, job_id: str, timeout: float, last: JobView | None = None) -> None:
        state = f" (last seen {last.status}, progress {last.progress:.2f})" if last else ""
        super().__init__(f"job {job_id} did not finish within {timeout:g} s{state}")
        self.job_id = job_id
        self.timeout = timeout
        self.last = last


def _body(data: BaseModel | dict[str, Any] | None) -> dict[str, Any] | None:
    if isinstance(data, BaseModel):
        return data.model_dump(mode="json", exclude_none=True)
    return data


def _id_of(job: JobRef) -> str:
    """The id of a job given as an id or as the ``JobAccepted`` / ``JobView`` naming it."""
    if isinstance(job, JobAccepted):
        return job.job
    if isinstance(job, JobView):
        return job.id
    if isinstance(job, str):
        return job
    raise TypeError(f"a job id or JobAccepted / JobView, got {type(job).__name__}")


def _bytes(source: bytes | str | os.PathLike) -> bytes:
    return source if isinstance(source, bytes) else Path(source).read_bytes()


class InfluenceClient:
    """One method per endpoint; errors raise :class:`ApiError`."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(
            base_url=base_url, headers=headers, timeout=timeout, transport=transport
        )

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self.http.close()

    def __enter__(self) -> InfluenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self.http.request(method, path, **kwargs)
        if response.is_error:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ApiError(response.status_code, detail)
        return response

    # -- operations --------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: status, Redis, number of live workers."""
        return self._request("GET", "/healthz").json()

    def metrics(self) -> str:
        """``GET /metrics``: Prometheus text."""
        return self._request("GET", "/metrics").text

    # -- models ------------------------------------------------------------------------

    def upload_model(
        self,
        weights: bytes | str | os.PathLike,
        config: dict[str, Any] | None = None,
        *,
        name: str | None = None,
    ) -> ModelRecord:
        """Upload a safetensors checkpoint (config separately, or embedded in the file)."""
        data = {
            k: v for k, v in {"config": config and json.dumps(config), "name": name}.items() if v
        }
        files = {"weights": ("checkpoint.safetensors", _bytes(weights))}
        return ModelRecord.model_validate(
            self._request("POST", "/models", data=data, files=files).json()
        )

    def models(self) -> list[ModelRecord]:
        """The caller's models."""
        return [ModelRecord.model_validate(m) for m in self._request("GET", "/models").json()]

    def model(self, model_id: str) -> ModelRecord:
        """One model (ApiError 404 if not the caller's)."""
        return ModelRecord.model_validate(self._request("GET", f"/models/{model_id}").json())

    def delete_model(self, model_id: str) -> None:
        """Forget a model."""
        self._request("DELETE", f"/models/{model_id}")

    # -- datasets ----------------------------------------------------------------------

    def upload_dataset(
        self, data: bytes | str | os.PathLike, *, name: str | None = None
    ) -> DatasetRecord:
        """Upload a safetensors dataset (tensors ``inputs`` and ``targets``)."""
        files = {"file": ("dataset.safetensors", _bytes(data))}
        form = {"name": name} if name else None
        return DatasetRecord.model_validate(
            self._request("POST", "/datasets", data=form, files=files).json()
        )

    def builtin_dataset(
        self, name: Literal["breast_cancer", "digits", "diabetes"], split: str = "train"
    ) -> DatasetRecord:
        """Register a built-in scikit-learn dataset split."""
        body = {"builtin": name, "split": split}
        return DatasetRecord.model_validate(self._request("POST", "/datasets", json=body).json())

    def datasets(self) -> list[DatasetRecord]:
        """The caller's datasets."""
        return [DatasetRecord.model_validate(d) for d in self._request("GET", "/datasets").json()]

    def dataset(self, dataset_id: str) -> DatasetRecord:
        """One dataset (ApiError 404 if not the caller's)."""
        return DatasetRecord.model_validate(self._request("GET", f"/datasets/{dataset_id}").json())

    def delete_dataset(self, dataset_id: str) -> None:
        """Forget a dataset."""
        self._request("DELETE", f"/datasets/{dataset_id}")

    def dataset_item(self, dataset_id: str, index: int) -> DatasetItem:
        """A row's target and class name."""
        path = f"/datasets/{dataset_id}/items/{index}"
        return DatasetItem.model_validate(self._request("GET", path).json())

    def thumbnail(self, dataset_id: str, index: int) -> bytes:
        """PNG bytes of an image dataset's row."""
        return self._request("GET", f"/datasets/{dataset_id}/items/{index}.png").content

    # -- influence ---------------------------------------------------------------------

    def _submit(self, path: str, request: BaseModel | dict[str, Any]) -> JobAccepted | JobView:
        response = self._request("POST", path, json=_body(request))
        if response.status_code == 200:
            return JobView.model_validate(response.json())
        return JobAccepted.model_validate(response.json())

    def influence(self, request: BaseModel | dict[str, Any]) -> JobAccepted | JobView:
        """``POST /influence`` (an ``app.schemas.InfluenceRequest`` or its dict): a queued
        job, or the finished job (``cached=True``) when the same query was answered before."""
        return self._submit("/influence", request)

    def self_influence(self, request: BaseModel | dict[str, Any]) -> JobAccepted | JobView:
        """``POST /self-influence``: queued, or the cached finished job."""
        return self._submit("/self-influence", request)

    def verify(
        self,
        job: JobRef,
        *,
        top: int = 10,
        method: str = "pbrf",
        test: int | None = None,
        steps: int = 50,
    ) -> JobAccepted:
        """Retrain for the job's top-k helpful and harmful points; predicted vs actual."""
        body = {"top": top, "method": method, "test": test, "steps": steps}
        response = self._request("POST", f"/influence/{_id_of(job)}/verify", json=body)
        return JobAccepted.model_validate(response.json())

    def decomposition(self, request: BaseModel | dict[str, Any]) -> JobAccepted:
        """``POST /decompositions``: a queued decomposition job."""
        response = self._request("POST", "/decompositions", json=_body(request))
        return JobAccepted.model_validate(response.json())

    def ranking(
        self,
        job: JobRef,
        *,
        test: int = 0,
        direction: Literal["helpful", "harmful"] = "helpful",
        limit: int = 10,
        offset: int = 0,
    ) -> Ranking:
        """One page of the job's training points ordered by score."""
        params = {"test": test, "direction": direction, "limit": limit, "offset": offset}
        response = self._request("GET", f"/influence/{_id_of(job)}/ranking", params=params)
        return Ranking.model_validate(response.json())

    def scores(self, job: JobRef) -> Tensor:
        """The score matrix [k, N] (self-influence: [N])."""
        import safetensors.torch  # imports torch: only here

        data = self._request("GET", f"/influence/{_id_of(job)}/scores").content
        return safetensors.torch.load(data)["scores"]

    # -- jobs --------------------------------------------------------------------------

    def job(self, job_id: JobRef) -> JobView:
        """``GET /jobs/{id}``: the job's current state."""
        return JobView.model_validate(self._request("GET", f"/jobs/{_id_of(job_id)}").json())

    def jobs(self, *, status: str | None = None, limit: int = 50, offset: int = 0) -> JobList:
        """The caller's jobs, newest first."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status is not None:
            params["status"] = status
        return JobList.model_validate(self._request("GET", "/jobs", params=params).json())

    def cancel(self, job_id: JobRef) -> JobView:
        """Cancel a job (queued: at once; running: at its next progress report)."""
        path = f"/jobs/{_id_of(job_id)}"
        return JobView.model_validate(self._request("DELETE", path).json())

    def _stream(
        self, job_id: str, *, read_timeout: float | None, last_event_id: str | None = None
    ) -> Iterator[tuple[str | None, JobView | None]]:
        """(event id, job view) for each SSE frame of the job, and (None, None) for every
        other line (keep-alives, blank lines), so a caller can look at the clock; resumes
        after ``last_event_id``."""
        headers = {"Last-Event-ID": last_event_id} if last_event_id else None
        timeout = httpx.Timeout(read_timeout, connect=10.0)
        with self.http.stream(
            "GET", f"/jobs/{job_id}/events", headers=headers, timeout=timeout
        ) as response:
            if response.is_error:
                response.read()
                raise ApiError(response.status_code, response.text)
            event_id: str | None = None
            for line in response.iter_lines():
                if line.startswith("id: "):
                    event_id = line.removeprefix("id: ")
                elif line.startswith("data: "):
                    yield event_id, JobView.model_validate_json(line.removeprefix("data: "))
                    continue
                yield None, None

    def events(self, job_id: JobRef, *, timeout: float | None = None) -> Iterator[JobView]:
        """The job's state after each progress event (SSE), ending with the finished job
        (or earlier, without it, when the server shuts down: then call :meth:`wait`).
        ``timeout`` bounds each read (the server sends a keep-alive every 10 s), not the
        whole stream: use :meth:`wait` for an overall limit."""
        for _, view in self._stream(_id_of(job_id), read_timeout=timeout):
            if view is not None:
                yield view

    def wait(
        self,
        job_id: JobRef,
        *,
        timeout: float | None = None,
        progress: Callable[[JobView], None] | None = None,
    ) -> JobView:
        """Follow the job's events until it is finished; returns the final state. ``job_id``
        is the job's id or the answer of a submission: a queued job (``JobAccepted``) or a
        finished one from the cache (``JobView``, returned at once).

        ``timeout`` is an overall deadline in seconds for the whole wait, reconnections
        included (None: wait as long as it takes). When it passes before the job
        finishes, :class:`WaitTimeoutError` (a ``TimeoutError``) naming the job and the
        timeout is raised; the job itself keeps running (cancel it with :meth:`cancel`).
        A dropped stream is resumed after the last event seen (the job's state lives in
        Redis, not in the stream); no read waits more than about a second
        (``DEADLINE_SLACK_S``) past the deadline."""
        if isinstance(job_id, JobView) and job_id.status in TERMINAL:
            if progress is not None:
                progress(job_id)
            return job_id
        job_id = _id_of(job_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        last: JobView | None = None
        last_event_id: str | None = None

        def left() -> float | None:
            """Seconds to the deadline (None: no deadline); raises once it has passed."""
            if deadline is None:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeoutError(job_id, timeout or 0.0, last)
            return remaining

        while True:
            remaining = left()
            read = (
                STREAM_READ_TIMEOUT_S
                if remaining is None
                else min(remaining, STREAM_READ_TIMEOUT_S)
            )
            frames = self._stream(job_id, read_timeout=read, last_event_id=last_event_id)
            try:
                with contextlib.closing(frames):
                    for event_id, view in frames:
                        last_event_id = event_id or last_event_id
                        if view is not None:
                            last = view
                            if progress is not None:
                                progress(view)
                            if view.status in TERMINAL:
                                return view
                        remaining = left()
                        if remaining is not None and remaining < read - DEADLINE_SLACK_S:
                            break  # reconnect with a read timeout that ends by the deadline
            except httpx.TransportError:
                pass
            remaining = left()
            try:
                response = self._request(
                    "GET",
                    f"/jobs/{job_id}",
                    timeout=self.http.timeout if remaining is None else remaining,
                )
            except httpx.TimeoutException:
                left()  # past the deadline: WaitTimeoutError
                raise
            last = JobView.model_validate(response.json())
            if last.status in TERMINAL:
                return last
