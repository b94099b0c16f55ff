"""Errors and warnings raised by the influence solvers.

Every failure mode of an inverse-curvature solve has its own class, so callers (the
worker, the API) can tell "your model has negative curvature" apart from "the
solver's step size was too large" without parsing messages.
"""

from __future__ import annotations

__all__ = [
    "ConvergenceWarning",
    "NegativeCurvatureError",
    "NonFiniteError",
    "SolverDivergedError",
    "SolverError",
]


class SolverError(RuntimeError):
    """Base class: a solve of ``(G + λI) x = v`` could not return a trustworthy answer."""


class SolverDivergedError(SolverError):
    """An iterative solver's iterates grew without bound (e.g. LiSSA scale too small)."""


class NegativeCurvatureError(SolverError):
    """The damped curvature ``G + λI`` is not positive definite (a direction p has
    ``pᵀ(G + λI)p ≤ 0``), so the influence system has no meaningful solution."""

    def __init__(self, message: str, *, value: float, iteration: int | None = None) -> None:
        super().__init__(message)
        self.value = value
        self.iteration = iteration


class NonFiniteError(SolverError):
    """A NaN or infinity appeared in the inputs, the curvature products or the solution."""


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped at its iteration limit before reaching its tolerance."""
