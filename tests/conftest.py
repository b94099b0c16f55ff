"""Shared test settings: tolerances, error helpers, determinism, and the ``slow`` marker."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

# Tolerances shared by the numerical tests (float64 unless stated).
RTOL_EXACT = 1e-10  # products checked against dense matrices
RTOL_SOLVE = 1e-8  # Exact / CG solves against a dense float64 solve
RTOL_F32 = 1e-6  # float32 paths that must agree with each other


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` (Frobenius), b being the reference."""
    return float((a - b).norm() / b.norm())


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two equally sized tensors, flattened."""
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow") or os.environ.get("RUN_SLOW") == "1":
        return
    skip_slow = pytest.mark.skip(reason="slow experiment test: use --runslow or RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _deterministic_torch() -> None:
    torch.manual_seed(0)
    # One thread: the suite is dominated by small torch.func ops, which run several
    # times faster single-threaded on a 2-core machine (workers run as subprocesses).
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis: ``REDIS_URL`` when set (tests use their own key prefixes and delete
    their keys), else the service's own embedded server for this test session."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    from app.embedded import EmbeddedRedis

    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server.url
