"""The reference problems run through peer libraries (captum, pyDVL, kronfluence).

Each runner takes a float32 model, the training set and the queries, and returns the
scores ``[k, N]`` plus the wall-clock seconds of the whole computation after the model
is loaded. All three peers return ``∇L_qᵀ H⁻¹ ∇L_i`` up to a positive factor (pyDVL's
``InfluenceMode.Up`` included; checked: its Direct answer has Pearson +0.94 with our exact
GNH scores), which is the sign of ours; Pearson is scale-free, so each peer's own
normalisation (sum vs mean loss, 1/N) does not matter.

Timing: each peer runs in a fresh interpreter with the parent's torch thread count and
the parent's trained weights (a checkpoint; no retraining). Its library is imported
before any timing, then it runs once untimed (warm-up: lazy imports, allocator, caches)
and ``repeats`` times timed; the parent reports the median, as for our own methods.

Peers install from ``bench/requirements-peers.txt``; a peer that is not installed is
reported as skipped, never faked.
"""

from __future__ import annotations

import copy
import importlib
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
    modules: tuple[str, ...] = ()
    """What ``run`` imports: imported by :meth:`load` before anything is timed."""

    def available(self) -> bool:
        return importlib.util.find_spec(self.package) is not None

    def load(self) -> None:
        for module in self.modules:
            importlib.import_module(module)


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


_KRONFLUENCE = ("kronfluence.analyzer", "kronfluence.arguments", "kronfluence.task")
_CAPTUM = ("captum.influence",)
_PYDVL = ("pydvl.influence", "pydvl.influence.torch")

PEERS: list[PeerMethod] = [
    PeerMethod(
        "kronfluence EK-FAC",
        "kronfluence",
        "sampled Fisher, EK-FAC",
        _kronfluence("ekfac"),
        _KRONFLUENCE,
    ),
    PeerMethod(
        "kronfluence K-FAC",
        "kronfluence",
        "sampled Fisher, K-FAC",
        _kronfluence("kfac"),
        _KRONFLUENCE,
    ),
    PeerMethod("captum Naive", "captum", "full Hessian", _captum_naive, _CAPTUM),
    PeerMethod("pyDVL Direct", "pydvl", "full Hessian", _pydvl("direct"), _PYDVL),
    PeerMethod("pyDVL CG", "pydvl", "full Hessian", _pydvl("cg"), _PYDVL),
    PeerMethod("pyDVL LiSSA", "pydvl", "full Hessian", _pydvl("lissa"), _PYDVL),
    PeerMethod(
        "pyDVL Arnoldi (rank 100)", "pydvl", "full Hessian", _pydvl("arnoldi", rank=100), _PYDVL
    ),
]


def run_peer(
    peer: PeerMethod,
    model: nn.Module,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    damping: float,
    repeats: int = 3,
) -> tuple[Tensor, list[float]]:
    """Scores ``[k, N]`` (of the last run) and the seconds of each of ``repeats`` timed
    runs, after the peer's imports and one untimed warm-up run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer.load()
        peer.run(model, train, test, damping)  # warm-up
        seconds = []
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            scores = peer.run(model, train, test, damping)
            seconds.append(time.perf_counter() - start)
    return scores.detach().to(torch.float64), seconds


def run_isolated(
    problem_name: str,
    peer: PeerMethod,
    damping: float,
    *,
    weights: str | Path,
    threads: int,
    repeats: int = 3,
) -> tuple[Tensor, list[float]]:
    """:func:`run_peer` in a fresh interpreter, so that a peer's crash is a result; it
    runs at ``threads`` torch threads on the trained weights of the checkpoint
    ``weights`` (:meth:`bench.reference.ReferenceProblem.save`). The median of the
    returned seconds is the peer's time."""
    with tempfile.TemporaryDirectory() as out:
        path = Path(out) / "scores.safetensors"
        command = [
            sys.executable, "-m", "bench.peers", problem_name, peer.name, str(path),
            str(damping), "--weights", str(weights), "--threads", str(threads),
            "--repeats", str(repeats),
        ]  # fmt: skip
        proc = subprocess.run(
            command, capture_output=True, text=True, cwd=Path(__file__).parent.parent
        )
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"exit code {proc.returncode}: {last[:200]}")
        tensors = load_file(path)
        return tensors["scores"], [float(s) for s in tensors["seconds"]]


def _main() -> None:
    import argparse

    from bench import reference

    parser = argparse.ArgumentParser(description="one peer on one reference problem")
    parser.add_argument("problem", choices=["A", "B"])
    parser.add_argument("peer", choices=[p.name for p in PEERS])
    parser.add_argument("out", help="safetensors file for the scores and seconds")
    parser.add_argument("damping", type=float)
    parser.add_argument("--weights", required=True, help="checkpoint of the trained model")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    problem = reference.load(args.problem, weights=args.weights)
    peer = next(p for p in PEERS if p.name == args.peer)
    scores, seconds = run_peer(
        peer, problem.model, problem.train, problem.queries, args.damping, args.repeats
    )
    save_file(
        {"scores": scores.contiguous(), "seconds": torch.tensor(seconds, dtype=torch.float64)},
        args.out,
    )


if __name__ == "__main__":
    _main()
