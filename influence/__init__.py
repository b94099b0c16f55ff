"""Influence functions for trained PyTorch models (Bae et al., NeurIPS 2022).

Pure PyTorch: curvature products (``functional``, ``operators``), inverse-curvature
solvers with reports (``solvers``), scoring (``scoring``) and the public
``InfluenceEngine`` (``engine``). See docs/engine.md.
"""

from influence.engine import InfluenceEngine
from influence.errors import (
    ConvergenceWarning,
    NegativeCurvatureError,
    NonFiniteError,
    SolverDivergedError,
    SolverError,
)
from influence.nystrom import NystromArguments, NystromPreconditioner
from influence.operators import DampedCurvature
from influence.scoring import JVP_MAX_DIRECTIONS, ScoreResult, TopK, top_k
from influence.solvers import CG, Exact, Lanczos, LiSSA, SolverReport

__all__ = [
    "CG",
    "JVP_MAX_DIRECTIONS",
    "ConvergenceWarning",
    "DampedCurvature",
    "Exact",
    "InfluenceEngine",
    "Lanczos",
    "LiSSA",
    "NegativeCurvatureError",
    "NonFiniteError",
    "NystromArguments",
    "NystromPreconditioner",
    "ScoreResult",
    "SolverDivergedError",
    "SolverError",
    "SolverReport",
    "TopK",
    "top_k",
]
