"""Benchmark on the reference problems of docs/benchmarks.md (not run in CI).

    .venv/bin/python -m bench.scoring [--problems A B] [--parts scoring k-sweep solvers]
        [--no-peers] [--slow-peers-on-b] [--threads 2] [--repeats 3] [--pairs 15]

Prints Markdown tables and writes them, with every figure, to
``bench/results/scoring-<UTC time>.json``:

(a) scoring cost, always on model B's architecture (trained B; loaded whatever
    ``--problems`` says): time to score every training point against one s_test, divided
    by one plain (no-grad) forward pass over the same points in the same batches, for
    the eager JVP, the compiled JVP (``compile_scoring``; also without its graph pass,
    and also divided by a ``torch.compile``d forward pass), a hand-written tangent
    (ReLU MLPs only) and the multiply-add count; each ratio is the median over
    ``--pairs`` interleaved rounds (forward, then each path, timed back to back) of that
    round's path ÷ forward, after one untimed warm-up (and compiling) call of each. The
    per-example-gradient path: median of ``--repeats`` runs after a warm-up. Peak extra
    memory (RSS, measured in a fresh process) at N = 1,437 and a synthetic N = 20,000;
(d) ``k-sweep``: compiled vs eager JVP scoring for k = 1…10 test points at N = 20,000,
    medians over ``--k-pairs`` interleaved rounds;
(b) s_test for 10 queries: time, iterations and relative residual of each solver;
(c) all methods and the peers side by side: time for 10 queries × all training points
    (after the model is loaded) and Pearson against the reference scores (A: dense
    float64 GNH solve; B: CG on the GNH to a relative residual of 1e-4).

Timing of (b, c): every method, ours and each peer's, runs once untimed (warm-up) and
then ``--repeats`` times; the median is reported. Peers run in their own process at the
same ``--threads``, on this process's trained weights (handed over as a checkpoint), with
their library imported before the warm-up.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bench import peers, reference
from influence import CG, Exact, InfluenceEngine, LiSSA, SolverError
from influence.compiled import CompiledDirectional
from influence.functional import per_example_directional
from influence.kfac import KFAC
from influence.nystrom import NystromArguments

RESULTS = Path(__file__).parent / "results"
LARGE_N = 20_000
DEFAULT_REPEATS = 3  # timed runs after one warm-up; the median is reported
DEFAULT_PAIRS = 15  # interleaved forward / scoring rounds of (a)
DEFAULT_K_PAIRS = 5  # interleaved rounds per k of (d)
K_MAX = 10
REFERENCE_TOL_B = 1e-4  # float32 CG on B's GNH; 1e-4 is near float32's floor there
# Tolerances of the float32 solves, for Pearson ≥ 0.9999 (A) / ≥ 0.99 (B).
CG_TOL = {"A": 1e-4, "B": 1e-2}
LISSA_DEPTH = {"A": 5000, "B": 2000}
# Nyström sketch for PCG: s test vectors on the examples of largest curvature trace.
NYSTROM_RANK, NYSTROM_EXAMPLES = 100, 256
_DENSE = "not run: a dense Hessian of 301k parameters needs 363 GB"
# Peers not run on B (each would take minutes, ×(1 + repeats)). The figures quoted are
# NOT from this run: they come from the sources named. --slow-peers-on-b runs the three
# that can run.
PEERS_SKIPPED_ON_B: dict[str, tuple[bool, str]] = {
    "captum Naive": (False, _DENSE),
    "pyDVL Direct": (False, _DENSE),
    "pyDVL CG": (
        True,
        "not run (--slow-peers-on-b runs it); not a figure of this run: the reference "
        "specification's peer table gives 129 s, Pearson 0.145 (indefinite, only a warning)",
    ),
    "pyDVL LiSSA": (
        True,
        "not run (--slow-peers-on-b runs it); not a figure of this run: the reference "
        "specification's peer table gives 293 s, Pearson 0.853",
    ),
    "pyDVL Arnoldi (rank 100)": (
        True,
        "not run (--slow-peers-on-b runs it); not a figure of this run: 145 s, Pearson 0.615 "
        "in a one-off development run (one shot, cold) of 2026-11-29 21:38 UTC (reference "
        "specification: 43 s)",
    ),
}


def _median_seconds(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    """Median wall-clock seconds of ``repeats`` calls after one untimed warm-up call."""
    fn()
    seconds = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), seconds


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def _synthetic_train(n: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(n, 64, generator=generator), torch.randint(0, 10, (n,), generator=generator)


# ------------------------------------------------------------------ (a) scoring cost


def scoring_cost(
    problem: reference.ReferenceProblem,
    n: int,
    device: str,
    *,
    pairs: int,
    repeats: int,
    weights: Path,
) -> dict[str, Any]:
    """Scoring time ÷ forward time for one s_test at training-set size n."""
    train = problem.train if n == len(problem.train[0]) else _synthetic_train(n)
    engine = InfluenceEngine(problem.model, train=train, device=device)
    direction = engine.gradients(*problem.queries)[:1]
    batch, inputs = engine.operator.batch_size, engine.operator.inputs
    compiled_model = torch.compile(engine.model, dynamic=False)

    def forward(model: nn.Module = engine.model) -> None:
        with torch.no_grad():
            for lo in range(0, n, batch):
                model(inputs[lo : lo + batch])
        _synchronize(device)

    row: dict[str, Any] = {"N": n, "model": problem.describe(), "pairs": pairs}
    started = time.perf_counter()
    forward(compiled_model)
    row["forward_compile_s"] = time.perf_counter() - started
    compiled = InfluenceEngine(problem.model, train=train, device=device, compile_scoring=True)
    no_pass = InfluenceEngine(problem.model, train=train, device=device, compile_scoring=True)
    _without_graph_pass(no_pass)
    for name, scorer in (("jvp_compiled", compiled), ("jvp_no_pass", no_pass)):
        started = time.perf_counter()
        scorer.scores_from_s_test(direction, method="jvp")
        _synchronize(device)
        row[f"{name}_compile_s"] = time.perf_counter() - started
        row[f"{name}_status"] = scorer.compiled_scoring.status

    def scorer_of(e: InfluenceEngine, method: str = "jvp") -> Callable[[], None]:
        def score() -> None:
            e.scores_from_s_test(direction, method=method)
            _synchronize(device)

        return score

    paths: dict[str, Callable[[], Any]] = {
        "forward": forward,
        "forward_compiled": lambda: forward(compiled_model),
        "jvp": scorer_of(engine),
        "jvp_compiled": scorer_of(compiled),
        "jvp_no_pass": scorer_of(no_pass),
    }
    op = engine.operator
    floor = _tangent_floor(engine.model, inputs, op.targets, direction[0], batch)
    if floor is not None:
        directional = per_example_directional(
            op.fmodel, op.loss, op.theta, inputs, op.targets, direction, batch_size=batch
        )[0]
        error = float((floor() - directional).norm() / directional.norm())
        assert error < 1e-4, f"hand-written tangent disagrees with the engine: {error:.1e}"
        paths["floor"] = floor
    for fn in paths.values():  # warm-up (the compiling calls were above)
        fn()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(pairs):  # interleaved: forward, then every path, back to back
        for name, fn in paths.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    for name, seconds in times.items():
        row[f"{name}_s"] = statistics.median(seconds)
    for name, unit in (
        ("jvp", "forward"),
        ("jvp_compiled", "forward"),
        ("jvp_no_pass", "forward"),
        ("floor", "forward"),
        ("jvp_compiled", "forward_compiled"),
    ):
        if name in times:
            key = f"{name}_ratio" if unit == "forward" else f"{name}_per_{unit}_ratio"
            ratios = [a / b for a, b in zip(times[name], times[unit], strict=True)]
            row[key] = statistics.median(ratios)
            row[f"{key}_range"] = [min(ratios), max(ratios)]
    row["multiply_add_ratio"] = _multiply_add_ratio(engine.model)
    row["grad_s"], row["grad_all_s"] = _median_seconds(scorer_of(engine, "grad"), repeats)
    row["grad_ratio"] = row["grad_s"] / row["forward_s"]
    for path, scorer in (("jvp", engine), ("jvp_compiled", compiled), ("grad", engine)):
        if device == "cpu":
            row[f"{path}_peak_mb"] = _memory_in_subprocess(problem.name, n, path, weights)
        else:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            scorer_of(scorer, "grad" if path == "grad" else "jvp")()
            row[f"{path}_peak_mb"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    return row


def _without_graph_pass(engine: InfluenceEngine) -> None:
    """Ablation: the engine's compiled scoring without its ``JvpProducts`` graph pass
    (``torch.compile`` alone, same static shapes and checks)."""
    engine.compiled_scoring = CompiledDirectional(engine.fmodel, engine.loss, graph_pass=False)


def k_sweep(
    problem: reference.ReferenceProblem, n: int, device: str, *, pairs: int
) -> dict[str, Any]:
    """Compiled vs eager JVP scoring of k = 1…10 test points (one s_test each) at N = n."""
    train = problem.train if n == len(problem.train[0]) else _synthetic_train(n)
    eager = InfluenceEngine(problem.model, train=train, device=device)
    compiled = InfluenceEngine(problem.model, train=train, device=device, compile_scoring=True)
    directions = eager.gradients(*problem.queries)[:K_MAX]
    batch, inputs = eager.operator.batch_size, eager.operator.inputs

    def forward() -> None:
        with torch.no_grad():
            for lo in range(0, n, batch):
                eager.model(inputs[lo : lo + batch])
        _synchronize(device)

    started = time.perf_counter()
    compiled.scores_from_s_test(directions[:7], method="jvp")  # groups 4 + 2 + 1: every shape
    _synchronize(device)
    result: dict[str, Any] = {
        "N": n, "model": problem.describe(), "pairs": pairs,
        "compile_s": time.perf_counter() - started, "status": compiled.compiled_scoring.status,
        "rows": [],
    }  # fmt: skip
    for k in range(1, len(directions) + 1):
        s_test = directions[:k]

        def run(e: InfluenceEngine, s: Tensor = s_test) -> None:
            e.scores_from_s_test(s, method="jvp")
            _synchronize(device)

        paths = {"forward": forward, "eager": lambda: run(eager), "compiled": lambda: run(compiled)}
        for fn in paths.values():
            fn()
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(pairs):
            for name, fn in paths.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)

        def ratio(a: str, b: str, t: dict[str, list[float]] = times) -> float:
            return statistics.median(x / y for x, y in zip(t[a], t[b], strict=True))

        row = {"k": k, **{f"{name}_s": statistics.median(v) for name, v in times.items()}}
        row["eager_ratio"] = ratio("eager", "forward")
        row["compiled_ratio"] = ratio("compiled", "forward")
        row["time_saved"] = 1 - ratio("compiled", "eager")
        result["rows"].append(row)
        print(f"  k-sweep k={k}: {row}", file=sys.stderr)
    return result


def _multiply_add_ratio(model: nn.Sequential) -> float:
    """Multiply-adds of a JVP of an MLP over those of its forward pass: each layer's
    ``W h`` once more for ``dW h``, and once more for ``W dh`` past the first layer."""
    sizes = [m.weight.numel() for m in model if isinstance(m, nn.Linear)]
    return (2 * sum(sizes) + sum(sizes[1:])) / sum(sizes)


def _tangent_floor(
    model: nn.Sequential, inputs: Tensor, targets: Tensor, direction: Tensor, batch: int
) -> Callable[[], Tensor] | None:
    """A measuring stick for (a), not a product path: ``∇L_i · s`` for every i with the
    tangent written out by hand for an MLP of Linear and ReLU layers under cross-entropy,
    each layer's primal and tangent one fused ``addmm`` apiece and no product with the
    inputs' zero tangent, which eager ``torch.func.jvp`` (like any forward-mode AD of addmm
    in torch 2.13) still computes. It is still eager: a bias or a second tangent term is a
    pass of its own over the activations, as in the eager JVP. None for any other model
    (model A is tanh: its tangent is not written here)."""
    if not all(isinstance(m, nn.Linear | nn.ReLU) for m in model):
        return None
    layers = [m for m in model if isinstance(m, nn.Linear)]
    chunks = iter(direction.split([p.numel() for m in layers for p in (m.weight, m.bias)]))
    tangents = [(next(chunks).view_as(m.weight), next(chunks)) for m in layers]

    def run() -> Tensor:
        out = []
        with torch.no_grad():
            for lo in range(0, len(inputs), batch):
                x, dx = inputs[lo : lo + batch], None
                for i, (layer, (dw, db)) in enumerate(zip(layers, tangents, strict=True)):
                    z = torch.addmm(layer.bias, x, layer.weight.t())
                    dz = torch.addmm(db, x, dw.t())
                    if dx is not None:
                        dz.addmm_(dx, layer.weight.t())
                    if i + 1 < len(layers):
                        mask = z > 0
                        x, dx = z.clamp_min_(0), dz.mul_(mask)
                probs = torch.softmax(z, dim=1)
                picked = dz.gather(1, targets[lo : lo + batch, None])[:, 0]
                out.append((probs * dz).sum(1) - picked)
        return torch.cat(out)

    return run


def _synchronize(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def _memory_in_subprocess(name: str, n: int, path: str, weights: Path) -> float:
    """Peak RSS growth while scoring (CPU, Linux), measured in a fresh interpreter (on
    the same trained weights, at the same thread count)."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.scoring",
            "--memory-probe",
            name,
            str(n),
            path,
            "--weights",
            str(weights),
            "--threads",
            str(torch.get_num_threads()),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    return float(out.stdout.strip().splitlines()[-1])


def _memory_probe(name: str, n: int, path: str, weights: str | None) -> None:
    problem = reference.load(name, weights=weights)
    train = problem.train if n == len(problem.train[0]) else _synthetic_train(n)
    compiled = path == "jvp_compiled"
    engine = InfluenceEngine(problem.model, train=train, compile_scoring=compiled)
    direction = engine.gradients(*problem.queries)[:1]
    method = "grad" if path == "grad" else "jvp"
    # warm-up; compiling (its shapes are those of the whole set) is not part of the peak
    engine.scores_from_s_test(direction, 0, n if compiled else min(n, 8), method=method)
    before_kb = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    engine.scores_from_s_test(direction, method=method)
    peak_kb = _status_kb("VmHWM")
    print(max(0, peak_kb - before_kb) / 1024)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


# ------------------------------------------------------------- (b, c) solvers, peers


def _run_once(
    problem: reference.ReferenceProblem,
    solver_for: Callable[[InfluenceEngine], Any],
    device: str,
    *,
    dtype: torch.dtype = torch.float32,
    hessian: str = "gnh",
) -> dict[str, Any]:
    """s_test + scoring of every training point; time includes any preconditioner fit."""
    start = time.perf_counter()
    engine = InfluenceEngine(
        problem.model, train=problem.train, hessian=hessian, damping=reference.DAMPING,
        device=device, dtype=dtype,
    )  # fmt: skip
    solver = solver_for(engine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s_test, report = engine.s_test(problem.queries, solver)
    scores = engine.scores_from_s_test(s_test).cpu()
    total = time.perf_counter() - start
    return {"scores": scores, "seconds": total, "report": report.to_dict()}


def _run_ours(
    problem: reference.ReferenceProblem,
    solver_for: Callable[[InfluenceEngine], Any],
    device: str,
    repeats: int,
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`_run_once` once untimed, then ``repeats`` times: the median time, and the
    scores and report of the median run."""
    _run_once(problem, solver_for, device, **kwargs)
    runs = sorted(
        (_run_once(problem, solver_for, device, **kwargs) for _ in range(max(1, repeats))),
        key=lambda r: r["seconds"],
    )
    seconds = [r["seconds"] for r in runs]
    return {**runs[(len(runs) - 1) // 2], "seconds": statistics.median(seconds),
            "all_seconds": seconds}  # fmt: skip


def _kfac_cg(tol: float, max_iter: int = 500) -> Callable[[InfluenceEngine], CG]:
    def make(engine: InfluenceEngine) -> CG:
        return CG(tol=tol, max_iter=max_iter, preconditioner=KFAC.from_operator(engine.operator))

    return make


def _our_methods(name: str) -> dict[str, tuple[str, Callable[[InfluenceEngine], Any]]]:
    tol, depth = CG_TOL[name], LISSA_DEPTH[name]
    nystrom = NystromArguments(rank=NYSTROM_RANK, examples=NYSTROM_EXAMPLES)
    methods = {
        f"CG (tol {tol:g})": ("GNH", lambda _e: CG(tol=tol, max_iter=2000)),
        f"PCG EK-FAC (tol {tol:g})": ("GNH", _kfac_cg(tol)),
        f"PCG Nyström (rank {NYSTROM_RANK}, top-{NYSTROM_EXAMPLES} examples, tol {tol:g})": (
            "GNH",
            lambda _e: CG(tol=tol, max_iter=500, preconditioner=nystrom),
        ),
        f"LiSSA (auto scale, depth ≤ {depth})": ("GNH", lambda _e: LiSSA(depth=depth)),
    }
    if name == "A":
        # the same LiSSA with every minibatch product eager (no make_fx replay)
        methods[f"LiSSA (auto scale, depth ≤ {depth}, no replay)"] = (
            "GNH",
            lambda _e: LiSSA(depth=depth, replay=False),
        )
        methods["Exact (float32)"] = ("GNH", lambda _e: Exact())
    else:
        methods["CG (tol 0.1)"] = ("GNH", lambda _e: CG(tol=0.1, max_iter=2000))
    return methods


def _reference(problem: reference.ReferenceProblem, device: str, repeats: int) -> dict[str, Any]:
    if problem.name == "A":
        result = _run_ours(problem, lambda _e: Exact(), device, repeats, dtype=torch.float64)
        return {"label": "Exact (dense float64 Cholesky)", **result}
    return {
        "label": f"CG float32 (tol {REFERENCE_TOL_B:g}, the reference)",
        **_run_ours(problem, lambda _e: CG(tol=REFERENCE_TOL_B, max_iter=3000), device, repeats),
    }


def _full_hessian_check(
    problem: reference.ReferenceProblem, device: str, repeats: int
) -> dict[str, Any]:
    """The damped full Hessian through CG and LiSSA: indefiniteness must be reported.
    Each is run once untimed and ``repeats`` times (median seconds); ``products`` counts
    the full-batch curvature products before the answer or the error."""
    rows = {}
    for label, make in (
        ("CG, full Hessian", lambda: CG(tol=1e-4, max_iter=150)),
        ("LiSSA (auto), full Hessian", lambda: LiSSA(depth=500)),
    ):
        attempts = []
        for _ in range(1 + max(1, repeats)):
            products = [0]

            def counted(engine: InfluenceEngine, make: Callable[[], Any] = make,
                        products: list[int] = products) -> Any:  # fmt: skip
                curvature = engine.operator.curvature

                def counting(*args: Any, **kwargs: Any) -> Tensor:
                    products[0] += 1
                    return curvature(*args, **kwargs)

                engine.operator.curvature = counting
                return make()

            start = time.perf_counter()
            try:
                result = _run_once(problem, counted, device, hessian="full")
                attempt = {"outcome": "answered", **result}
            except SolverError as error:
                attempt = {
                    "outcome": type(error).__name__,
                    "message": str(error),
                    "seconds": time.perf_counter() - start,
                }
            attempts.append({**attempt, "products": products[0]})
        timed = attempts[1:]
        seconds = [a["seconds"] for a in timed]
        rows[label] = {**timed[-1], "seconds": statistics.median(seconds), "all_seconds": seconds}
    return rows


def solver_table(
    problem: reference.ReferenceProblem,
    run_peers: bool,
    device: str,
    *,
    repeats: int,
    weights: Path,
    slow_peers_on_b: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    ref = _reference(problem, device, repeats)
    rows = [
        {"method": f"ours: {ref['label']}", "curvature": "GNH", "seconds": ref["seconds"],
         "all_seconds": ref["all_seconds"], "pearson": 1.0, "report": ref["report"]}
    ]  # fmt: skip
    print(f"  {problem.name} {rows[-1]['method']}: {rows[-1]['seconds']:.2f} s", file=sys.stderr)
    for label, (curvature, solver_for) in _our_methods(problem.name).items():
        result = _run_ours(problem, solver_for, device, repeats)
        rows.append(
            {"method": f"ours: {label}", "curvature": curvature, "seconds": result["seconds"],
             "all_seconds": result["all_seconds"],
             "pearson": _pearson(result["scores"], ref["scores"]), "report": result["report"]}
        )  # fmt: skip
        print(
            f"  {problem.name} {rows[-1]['method']}: {rows[-1]['seconds']:.2f} s", file=sys.stderr
        )
    if problem.name == "B":
        for label, outcome in _full_hessian_check(problem, device, repeats).items():
            row = {"method": f"ours: {label}", "curvature": "full Hessian",
                   "seconds": outcome["seconds"], "all_seconds": outcome["all_seconds"],
                   "outcome": outcome["outcome"], "products": outcome["products"]}  # fmt: skip
            if "scores" in outcome:
                row["pearson"] = _pearson(outcome["scores"], ref["scores"])
                row["report"] = outcome["report"]
            else:
                row["message"] = f"{outcome['message']} (after {outcome['products']} products)"
            rows.append(row)
    for peer in peers.PEERS if run_peers else []:
        row: dict[str, Any] = {"method": peer.name, "curvature": peer.curvature}
        skip = PEERS_SKIPPED_ON_B.get(peer.name) if problem.name == "B" else None
        if skip is not None and not (skip[0] and slow_peers_on_b):
            row["skipped"] = skip[1]
        elif not peer.available():
            row["skipped"] = f"{peer.package} not installed (bench/requirements-peers.txt)"
        else:
            try:
                scores, seconds = peers.run_isolated(
                    problem.name, peer, reference.DAMPING,
                    weights=weights, threads=torch.get_num_threads(), repeats=repeats,
                )  # fmt: skip
                row.update(
                    seconds=statistics.median(seconds),
                    all_seconds=seconds,
                    pearson=_pearson(scores, ref["scores"]),
                )
            except Exception as error:  # a peer's failure is a result, not a crash
                row["skipped"] = f"failed: {type(error).__name__}: {str(error)[:200]}"
        print(
            f"  {problem.name} {peer.name}: {row.get('seconds', row.get('skipped'))}",
            file=sys.stderr,
        )
        rows.append(row)
    return ref, rows


# --------------------------------------------------------------------------- output


def _fmt_seconds(row: dict[str, Any] | None) -> str:
    if row is None:
        return "–"
    if "skipped" in row:
        return "skipped"
    return f"{row['seconds']:.2f} s"


def _fmt_pearson(row: dict[str, Any] | None) -> str:
    if row is None or "skipped" in row:
        return "–"
    if "pearson" not in row:
        return f"raised {row['outcome']}"
    return f"{row['pearson']:.5f}"


def _scoring_markdown(rows: list[dict[str, Any]]) -> list[str]:
    first = rows[0]
    lines = [
        f"(a) Scoring every training point against one s_test ({first['model']}; forward = "
        "one no-grad pass in the same 512-example batches; each ratio = median over "
        f"{first['pairs']} interleaved rounds of that round's time ÷ its forward time)",
        "",
        "| N | forward | compiled forward | JVP | JVP ÷ forward | compiled JVP ÷ forward "
        "| compiled JVP ÷ compiled forward | compiled without graph pass ÷ forward "
        "| hand-written tangent ÷ forward | multiply-adds ÷ forward | compiling (JVP / forward) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        compiled = f"{r['jvp_compiled_ratio']:.2f}"
        if r["jvp_compiled_status"] != "compiled":
            compiled += f" {r['jvp_compiled_status']}"
        no_pass = f"{r['jvp_no_pass_ratio']:.2f}"
        if r["jvp_no_pass_status"] != "compiled":
            no_pass += f" {r['jvp_no_pass_status']}"
        floor = f"{r['floor_ratio']:.2f}" if "floor_ratio" in r else "n/a (not a ReLU MLP)"
        lines.append(
            f"| {r['N']:,} | {r['forward_s'] * 1e3:.1f} ms "
            f"| {r['forward_compiled_s'] * 1e3:.1f} ms "
            f"| {r['jvp_s'] * 1e3:.1f} ms | {r['jvp_ratio']:.2f} | {compiled} "
            f"| {r['jvp_compiled_per_forward_compiled_ratio']:.2f} | {no_pass} | {floor} "
            f"| {r['multiply_add_ratio']:.2f} "
            f"| {r['jvp_compiled_compile_s']:.1f} s / {r['forward_compile_s']:.1f} s |"
        )
    lines += [
        "",
        "| N | compiled JVP ÷ forward, min–max of the rounds | JVP peak MB | compiled peak MB "
        "| per-example grads (median) | grads ÷ forward | grads peak MB |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lo, hi = r["jvp_compiled_ratio_range"]
        lines.append(
            f"| {r['N']:,} | {lo:.2f}–{hi:.2f} | {r['jvp_peak_mb']:.0f} "
            f"| {r['jvp_compiled_peak_mb']:.0f} | {r['grad_s']:.2f} s | {r['grad_ratio']:.0f} "
            f"| {r['grad_peak_mb']:.0f} |"
        )
    return lines


def _k_sweep_markdown(sweep: dict[str, Any]) -> list[str]:
    lines = [
        f"(d) JVP scoring of k test points, eager vs compiled ({sweep['model']}, "
        f"N = {sweep['N']:,}; medians over {sweep['pairs']} interleaved rounds; compiling the "
        f"4-, 2- and 1-direction shapes took {sweep['compile_s']:.1f} s, status "
        f"{sweep['status']})",
        "",
        "| k | forward | eager | compiled | eager ÷ forward | compiled ÷ forward "
        "| compiled time saved |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sweep["rows"]:
        lines.append(
            f"| {r['k']} | {r['forward_s'] * 1e3:.1f} ms | {r['eager_s'] * 1e3:.1f} ms "
            f"| {r['compiled_s'] * 1e3:.1f} ms | {r['eager_ratio']:.2f} "
            f"| {r['compiled_ratio']:.2f} | {100 * r['time_saved']:.0f}% |"
        )
    return lines


def markdown(results: dict[str, Any]) -> str:
    loads = ", ".join(
        f"{when} {'/'.join(f'{x:.1f}' for x in load)}"
        for when, load in results["load_average"].items()
    )
    lines: list[str] = [
        f"{results['date']}, {results['threads']} torch threads, torch {results['torch']}; "
        f"load average (1/5/15 min): {loads}",
        "",
    ]
    if results.get("scoring"):
        lines += [*_scoring_markdown(results["scoring"]), ""]
    if results.get("k_sweep"):
        lines += [*_k_sweep_markdown(results["k_sweep"]), ""]
    if not results["methods"]:
        return "\n".join(lines).rstrip()
    lines += [
        f"(b) s_test for 10 queries (the median of {results['repeats']} runs after a warm-up)",
        "",
        "| problem | method | s_test time | iterations | relative residual | converged |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name, rows in results["methods"].items():
        for r in rows:
            if "report" in r:
                rep = r["report"]
                lines.append(
                    f"| {name} | {r['method']} | {rep['seconds']:.2f} s | {rep['iterations']} "
                    f"| {rep['relative_residual']:.2e} | {rep['converged']} |"
                )
    lines += [
        "",
        "(c) 10 queries × all 1,437 training points; time = median of "
        f"{results['repeats']} runs after one untimed warm-up run (peers: in their own "
        "process, library imported before the warm-up); Pearson vs the reference scores",
        "",
        "| method | curvature | time A | Pearson A | time B | Pearson B |",
        "|---|---|---:|---:|---:|---:|",
    ]
    by_name: dict[str, dict[str, dict[str, Any]]] = {}
    for name, rows in results["methods"].items():
        for r in rows:
            by_name.setdefault(r["method"], {"curvature": r["curvature"]})[name] = r
    for method, entry in by_name.items():
        a, b = entry.get("A"), entry.get("B")
        lines.append(
            f"| {method} | {entry['curvature']} | {_fmt_seconds(a)} | {_fmt_pearson(a)} "
            f"| {_fmt_seconds(b)} | {_fmt_pearson(b)} |"
        )
    notes = [
        f"- {method} on {name}: {r.get('skipped') or r.get('message')}"
        for name, rows in results["methods"].items()
        for r in rows
        for method in [r["method"]]
        if "skipped" in r or "message" in r
    ]
    return "\n".join(lines + (["", *notes] if notes else []))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items() if not isinstance(v, Tensor)}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _peer_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for package in ("captum", "pydvl", "kronfluence"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--problems",
        nargs="+",
        default=["A", "B"],
        choices=["A", "B"],
        help="problems of (b) and (c); (a) and (d) always use model B",
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["scoring", "k-sweep", "solvers"],
        choices=["scoring", "k-sweep", "solvers"],
        help="scoring = (a), k-sweep = (d), solvers = (b) and (c)",
    )
    parser.add_argument("--no-peers", action="store_true", help="skip captum/pyDVL/kronfluence")
    parser.add_argument(
        "--slow-peers-on-b",
        action="store_true",
        help="also run pyDVL CG, LiSSA and Arnoldi on B (minutes each, ×(1 + repeats))",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument(
        "--repeats",
        type=int,
        default=DEFAULT_REPEATS,
        help="timed runs per method after one warm-up (median reported)",
    )
    parser.add_argument(
        "--pairs", type=int, default=DEFAULT_PAIRS, help="interleaved forward/scoring rounds of (a)"
    )
    parser.add_argument(
        "--k-pairs", type=int, default=DEFAULT_K_PAIRS, help="interleaved rounds per k of (d)"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="peers: CPU only")
    parser.add_argument("--memory-probe", nargs=3, metavar=("PROBLEM", "N", "PATH"))
    parser.add_argument("--weights", help="(--memory-probe) checkpoint of the trained model")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        name, n, path = args.memory_probe
        _memory_probe(name, int(n), path, args.weights)
        return
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "threads": args.threads,
        "repeats": args.repeats,
        "pairs": args.pairs,
        "k_pairs": args.k_pairs,
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "peers": _peer_versions(),
        "load_average": {"start": os.getloadavg()},
        "methods": {},
    }
    needed = set(args.problems) if "solvers" in args.parts else set()
    if {"scoring", "k-sweep"} & set(args.parts):
        needed.add("B")
    with tempfile.TemporaryDirectory(prefix="bench-weights-") as tmp:
        problems, weights = {}, {}
        for name in sorted(needed):
            problems[name] = reference.load(name)
            weights[name] = Path(tmp) / f"{name}.safetensors"
            problems[name].save(weights[name])
        if "scoring" in args.parts:
            results["scoring"] = []
            for n in (len(problems["B"].train[0]), LARGE_N):
                results["scoring"].append(
                    scoring_cost(
                        problems["B"],
                        n,
                        args.device,
                        pairs=args.pairs,
                        repeats=args.repeats,
                        weights=weights["B"],
                    )
                )
                print(f"  scoring N={n}: {results['scoring'][-1]}", file=sys.stderr)
            results["load_average"]["after (a)"] = os.getloadavg()
        if "k-sweep" in args.parts:
            results["k_sweep"] = k_sweep(problems["B"], LARGE_N, args.device, pairs=args.k_pairs)
            results["load_average"]["after (d)"] = os.getloadavg()
        if "solvers" in args.parts:
            for name in args.problems:
                run_peers = not args.no_peers and args.device == "cpu"
                _, rows = solver_table(
                    problems[name], run_peers, args.device, repeats=args.repeats,
                    weights=weights[name], slow_peers_on_b=args.slow_peers_on_b,
                )  # fmt: skip
                results["methods"][name] = rows
                results["load_average"][f"after (b, c) {name}"] = os.getloadavg()
    table = markdown(results)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    stamp = results["date"].replace(":", "").replace("+0000", "Z")
    out = RESULTS / f"scoring-{stamp}.json"
    out.write_text(json.dumps({**_jsonable(results), "markdown": table}, indent=1))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
