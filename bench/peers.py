"""The reference problems run through peer libraries (captum, pyDVL, kronfluence).

Each runner takes a float32 model, the training set and the queries, and returns the
scores ``[k, N]`` plus the wall-clock seconds of the whole computation after the model
is loaded. All three peers return ``∇L_qᵀ H⁻¹ ∇L_i`` up to a positive factor (pyDVL's
``InfluenceMode.Up`` included; checked: its Direct answer has Pearson +0.94 with our exact
GNH scores), which is the sign of ours; Pearson is scale-free, so each peer's own
normalisation (sum vs mean loss, 1/N) does not matter.

Peers install from ``bench/requirements-peers.txt``; a peer that is not installed is
reported as skipped, never faked.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


@dataclass(frozen=True)
class PeerMethod:
    """One peer configuration: a label, the curvature it uses, and how to run it."""

    name: str
    package: str
    curvature: str
    run: Callable[[nn.Module, tuple[Tensor, Tensor], tuple[Tensor, Tensor], float], Tensor]

    def available(self) -> bool:
        return importlib.util.find_spec(self.package) is not None


def _timed(fn: Callable[[], Tensor]) -> Callable[[], tuple[Tensor, float]]:
    def run() -> tuple[Tensor, float]:
        start = time.perf_counter()
        scores = fn()
        return scores.detach().to(torch.float64), time.perf_counter() - start

    return run


def _captum_naive(model, train, test, damping):
    from captum.influence import NaiveInfluenceFunction

    model = copy.deepcopy(model)
    d = sum(p.numel() for p in model.parameters())
    method = NaiveInfluenceFunction(
        model,
        TensorDataset(*train),
        checkpoint="in-memory",
        checkpoints_load_func=lambda _model, _path: 1.0,  # weights are already loaded
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
        batch_size=len(train[0]),
        projection_dim=d,  # full rank: the exact damped full-Hessian answer
        hessian_reg=damping * len(train[0]),  # captum's Hessian is the SUM over examples
        hessian_inverse_tol=0.0,
    )
    return method.influence(test)


def _pydvl(kind: str, **kwargs):
    def run(model, train, test, damping):
        from pydvl.influence import InfluenceMode
        from pydvl.influence.torch import (
            ArnoldiInfluence,
            CgInfluence,
            DirectInfluence,
            LissaInfluence,
        )

        classes = {
            "direct": DirectInfluence,
            "cg": CgInfluence,
            "lissa": LissaInfluence,
            "arnoldi": ArnoldiInfluence,
        }
        model = copy.deepcopy(model)
        method = classes[kind](model, F.cross_entropy, regularization=damping, **kwargs)
        method = method.fit(DataLoader(TensorDataset(*train), batch_size=len(train[0])))
        return method.influences(*test, *train, mode=InfluenceMode.Up)

    return run


def _kronfluence(strategy: str):
    def run(model, train, test, damping):
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task

        class CrossEntropyTask(Task):
            def compute_train_loss(self, batch, model, sample=False):
                inputs, labels = batch
                logits = model(inputs)
                if sample:
                    with torch.no_grad():
                        probs = torch.softmax(logits.detach(), dim=-1)
                        labels = torch.multinomial(probs, 1).flatten()
                return F.cross_entropy(logits, labels, reduction="sum")

            def compute_measurement(self, batch, model):
                inputs, labels = batch
                return F.cross_entropy(model(inputs), labels, reduction="sum")

        logging.getLogger("kronfluence").setLevel(logging.ERROR)
        task = CrossEntropyTask()
        model = prepare_model(copy.deepcopy(model), task)
        with tempfile.TemporaryDirectory() as out:
            analyzer = Analyzer("bench", model, task, cpu=True, disable_tqdm=True, output_dir=out)
            analyzer.fit_all_factors(
                "factors",
                TensorDataset(*train),
                per_device_batch_size=len(train[0]),
                factor_args=FactorArguments(strategy=strategy),
            )
            analyzer.compute_pairwise_scores(
                "scores",
                "factors",
                TensorDataset(*test),
                TensorDataset(*train),
                per_device_query_batch_size=len(test[0]),
                per_device_train_batch_size=len(train[0]),
                score_args=ScoreArguments(damping_factor=damping),
            )
            return analyzer.load_pairwise_scores("scores")["all_modules"]

    return run


PEERS: list[PeerMethod] = [
    PeerMethod(
        "kronfluence EK-FAC", "kronfluence", "sampled Fisher, EK-FAC", _kronfluence("ekfac")
    ),
    PeerMethod("kronfluence K-FAC", "kronfluence", "sampled Fisher, K-FAC", _kronfluence("kfac")),
    PeerMethod("captum Naive", "captum", "full Hessian", _captum_naive),
    PeerMethod("pyDVL Direct", "pydvl", "full Hessian", _pydvl("direct")),
    PeerMethod("pyDVL CG", "pydvl", "full Hessian", _pydvl("cg")),
    PeerMethod("pyDVL LiSSA", "pydvl", "full Hessian", _pydvl("lissa")),
    PeerMethod("pyDVL Arnoldi (rank 100)", "pydvl", "full Hessian", _pydvl("arnoldi", rank=100)),
]


def run_peer(
    peer: PeerMethod,
    model: nn.Module,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    damping: float,
) -> tuple[Tensor, float]:
    """Scores ``[k, N]`` and seconds."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _timed(lambda: peer.run(model, train, test, damping))()


def run_isolated(problem_name: str, peer: PeerMethod, damping: float) -> tuple[Tensor, float]:
    """:func:`run_peer` in a fresh interpreter, so that a peer's crash is a result."""
    with tempfile.TemporaryDirectory() as out:
        path = Path(out) / "scores.safetensors"
        proc = subprocess.run(
            [sys.executable, "-m", "bench.peers", problem_name, peer.name, str(path), str(damping)],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent.parent,
        )
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"exit code {proc.returncode}: {last[:200]}")
        tensors = load_file(path)
        return tensors["scores"], float(tensors["seconds"])


def _main() -> None:
    from bench import reference

    name, peer_name, path, damping = sys.argv[1:5]
    problem = reference.load(name)
    peer = next(p for p in PEERS if p.name == peer_name)
    scores, seconds = run_peer(peer, problem.model, problem.train, problem.queries, float(damping))
    save_file({"scores": scores.contiguous(), "seconds": torch.tensor(seconds)}, path)


if __name__ == "__main__":
    _main()
