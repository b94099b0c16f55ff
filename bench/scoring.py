"""Benchmark on the reference problems of ``shared/BENCHMARKS.md`` (not run in CI).

    .venv/bin/python -m bench.scoring [--problems A B] [--no-peers] [--threads 2]

Prints three Markdown tables and writes them, with every figure, to
``bench/results/scoring-<UTC time>.json``:

(a) scoring cost: time to score every training point against one s_test, divided by one
    plain (no-grad) forward pass over the same points in the same batches, for the JVP
    path (eager, and compiled: ``compile_scoring``, timed once compiled, with the time of
    the compiling call beside it) and the per-example-gradient path; peak extra memory
    (RSS, measured in a fresh process) at N = 1,437 and at a synthetic N = 20,000 (model
    B's architecture); beside them a hand-written tangent and the multiply-add count;
(b) s_test for 10 queries: time, iterations and relative residual of each solver;
(c) all methods and the peers side by side: time for 10 queries × all training points
    (after the model is loaded) and Pearson against the reference scores (A: dense
    float64 GNH solve; B: CG on the GNH to a relative residual of 1e-4).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
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
from influence.functional import per_example_directional
from influence.kfac import KFAC
from influence.nystrom import NystromArguments

RESULTS = Path(__file__).parent / "results"
LARGE_N = 20_000
SCORING_REPEATS = 5
REFERENCE_TOL_B = 1e-4  # float32 CG on B's GNH; 1e-4 is near float32's floor there
# Tolerances of the float32 solves, for Pearson ≥ 0.9999 (A) / ≥ 0.99 (B).
CG_TOL = {"A": 1e-4, "B": 1e-2}
LISSA_DEPTH = {"A": 5000, "B": 2000}
# Nyström sketch for PCG: s test vectors on the examples of largest curvature trace.
NYSTROM_RANK, NYSTROM_EXAMPLES = 100, 256
# Peer runs on B that BENCHMARKS.md measured above ~2 minutes are not rerun here.
PEERS_SKIPPED_ON_B = {
    "captum Naive": "dense Hessian of 301k parameters (363 GB)",
    "pyDVL Direct": "dense Hessian of 301k parameters (363 GB)",
    "pyDVL CG": "129 s in BENCHMARKS.md, Pearson 0.145 (indefinite, only a warning)",
    "pyDVL LiSSA": "293 s in BENCHMARKS.md, Pearson 0.853",
    "pyDVL Arnoldi (rank 100)": "145 s in this project's run of 21:38 UTC (BENCHMARKS.md: 43 s), "
    "Pearson 0.615",
}


def _best_of(fn: Callable[[], Any], repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def _synthetic_train(n: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(n, 64, generator=generator), torch.randint(0, 10, (n,), generator=generator)


# ------------------------------------------------------------------ (a) scoring cost


def scoring_cost(problem: reference.ReferenceProblem, n: int, device: str) -> dict[str, Any]:
    """Scoring time ÷ forward time for one s_test at training-set size n."""
    train = problem.train if n == len(problem.train[0]) else _synthetic_train(n)
    engine = InfluenceEngine(problem.model, train=train, device=device)
    direction = engine.gradients(*problem.queries)[:1]
    batch, inputs = engine.operator.batch_size, engine.operator.inputs

    def forward() -> None:
        with torch.no_grad():
            for lo in range(0, n, batch):
                engine.model(inputs[lo : lo + batch])
        _synchronize(device)

    row: dict[str, Any] = {"N": n, "forward_s": _best_of(forward, SCORING_REPEATS)}
    op = engine.operator
    floor = _tangent_floor(engine.model, inputs, op.targets, direction[0], batch)
    directional = per_example_directional(
        op.fmodel, op.loss, op.theta, inputs, op.targets, direction, batch_size=batch
    )[0]
    error = float((floor() - directional).norm() / directional.norm())
    assert error < 1e-4, f"hand-written tangent disagrees with the engine: {error:.1e}"
    row["floor_s"] = _best_of(floor, SCORING_REPEATS)
    row["floor_ratio"] = row["floor_s"] / row["forward_s"]
    row["multiply_add_ratio"] = _multiply_add_ratio(engine.model)
    compiled = InfluenceEngine(problem.model, train=train, device=device, compile_scoring=True)
    started = time.perf_counter()
    compiled.scores_from_s_test(direction, method="jvp")
    _synchronize(device)
    row["compile_s"] = time.perf_counter() - started
    row["compiled_status"] = compiled.compiled_scoring.status
    for path in ("jvp", "jvp_compiled", "grad"):
        repeats = 1 if path == "grad" else SCORING_REPEATS
        scorer = compiled if path == "jvp_compiled" else engine

        def score(e: InfluenceEngine = scorer, p: str = path) -> None:
            e.scores_from_s_test(direction, method="grad" if p == "grad" else "jvp")
            _synchronize(device)

        seconds = _best_of(score, repeats)
        row[f"{path}_s"] = seconds
        row[f"{path}_ratio"] = seconds / row["forward_s"]
        if device == "cpu":
            row[f"{path}_peak_mb"] = _memory_in_subprocess(problem.name, n, path)
        else:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            score()
            row[f"{path}_peak_mb"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    return row


def _multiply_add_ratio(model: nn.Sequential) -> float:
    """Multiply-adds of a JVP of an MLP over those of its forward pass: each layer's
    ``W h`` once more for ``dW h``, and once more for ``W dh`` past the first layer."""
    sizes = [m.weight.numel() for m in model if isinstance(m, nn.Linear)]
    return (2 * sum(sizes) + sum(sizes[1:])) / sum(sizes)


def _tangent_floor(
    model: nn.Sequential, inputs: Tensor, targets: Tensor, direction: Tensor, batch: int
) -> Callable[[], Tensor]:
    """A measuring stick for (a), not a product path: ``∇L_i · s`` for every i with the
    tangent written out by hand for an MLP of Linear and ReLU layers under cross-entropy,
    each layer's primal and tangent one fused ``addmm`` apiece and no product with the
    inputs' zero tangent, which eager ``torch.func.jvp`` (like any forward-mode AD of addmm
    in torch 2.13) still computes. It is still eager: a bias or a second tangent term is a
    pass of its own over the activations, as in the eager JVP."""
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


def _memory_in_subprocess(name: str, n: int, path: str) -> float:
    """Peak RSS growth while scoring (CPU, Linux), measured in a fresh interpreter."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.scoring", "--memory-probe", name, str(n), path],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    return float(out.stdout.strip().splitlines()[-1])


def _memory_probe(name: str, n: int, path: str) -> None:
    problem = reference.load(name)
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


def _run_ours(
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
        methods["Exact (float32)"] = ("GNH", lambda _e: Exact())
    else:
        methods["CG (tol 0.1)"] = ("GNH", lambda _e: CG(tol=0.1, max_iter=2000))
    return methods


def _reference(problem: reference.ReferenceProblem, device: str) -> dict[str, Any]:
    if problem.name == "A":
        label, solver_for = "Exact (dense float64 Cholesky)", lambda _e: Exact()
    else:
        return {
            "label": f"CG float32 (tol {REFERENCE_TOL_B:g}, the reference)",
            **_run_ours(problem, lambda _e: CG(tol=REFERENCE_TOL_B, max_iter=3000), device),
        }
    result = _run_ours(problem, solver_for, device, dtype=torch.float64)
    result["label"] = label
    return result


def _full_hessian_check(problem: reference.ReferenceProblem, device: str) -> dict[str, Any]:
    """The damped full Hessian through CG and LiSSA: indefiniteness must be reported."""
    rows = {}
    for label, solver_for in (
        ("CG, full Hessian", lambda _e: CG(tol=1e-4, max_iter=150)),
        ("LiSSA (auto), full Hessian", lambda _e: LiSSA(depth=500)),
    ):
        start = time.perf_counter()
        try:
            result = _run_ours(problem, solver_for, device, hessian="full")
            rows[label] = {"outcome": "answered", **result}
        except SolverError as error:
            rows[label] = {
                "outcome": type(error).__name__,
                "message": str(error),
                "seconds": time.perf_counter() - start,
            }
    return rows


def solver_table(
    problem: reference.ReferenceProblem, run_peers: bool, device: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    ref = _reference(problem, device)
    rows = [
        {"method": f"ours: {ref['label']}", "curvature": "GNH", "seconds": ref["seconds"],
         "pearson": 1.0, "report": ref["report"]}
    ]  # fmt: skip
    for label, (curvature, solver_for) in _our_methods(problem.name).items():
        result = _run_ours(problem, solver_for, device)
        rows.append(
            {"method": f"ours: {label}", "curvature": curvature, "seconds": result["seconds"],
             "pearson": _pearson(result["scores"], ref["scores"]), "report": result["report"]}
        )  # fmt: skip
        print(
            f"  {problem.name} {rows[-1]['method']}: {rows[-1]['seconds']:.2f} s", file=sys.stderr
        )
    if problem.name == "B":
        for label, outcome in _full_hessian_check(problem, device).items():
            row = {"method": f"ours: {label}", "curvature": "full Hessian",
                   "seconds": outcome["seconds"], "outcome": outcome["outcome"]}  # fmt: skip
            if "scores" in outcome:
                row["pearson"] = _pearson(outcome["scores"], ref["scores"])
                row["report"] = outcome["report"]
            else:
                row["message"] = outcome["message"]
            rows.append(row)
    for peer in peers.PEERS if run_peers else []:
        row: dict[str, Any] = {"method": peer.name, "curvature": peer.curvature}
        if problem.name == "B" and peer.name in PEERS_SKIPPED_ON_B:
            row["skipped"] = PEERS_SKIPPED_ON_B[peer.name]
        elif not peer.available():
            row["skipped"] = f"{peer.package} not installed (bench/requirements-peers.txt)"
        else:
            try:
                scores, seconds = peers.run_isolated(problem.name, peer, reference.DAMPING)
                row.update(seconds=seconds, pearson=_pearson(scores, ref["scores"]))
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


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "(a) Scoring every training point against one s_test (model B's architecture)",
        "",
        "| N | forward | JVP | JVP ÷ forward | compiled JVP ÷ forward (compiling) | JVP peak MB "
        "| compiled peak MB | per-example grads | grads ÷ forward | grads peak MB "
        "| hand-written tangent ÷ forward | multiply-adds ÷ forward |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["scoring"]:
        compiled = f"{r['jvp_compiled_ratio']:.2f} ({r['compile_s']:.1f} s)"
        if r["compiled_status"] != "compiled":
            compiled += f" {r['compiled_status']}"
        lines.append(
            f"| {r['N']:,} | {r['forward_s'] * 1e3:.1f} ms | {r['jvp_s'] * 1e3:.1f} ms "
            f"| {r['jvp_ratio']:.2f} | {compiled} | {r['jvp_peak_mb']:.0f} "
            f"| {r['jvp_compiled_peak_mb']:.0f} | {r['grad_s']:.2f} s | {r['grad_ratio']:.0f} "
            f"| {r['grad_peak_mb']:.0f} | {r['floor_ratio']:.2f} | {r['multiply_add_ratio']:.2f} |"
        )
    lines += [
        "",
        "(b) s_test for 10 queries",
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
        "(c) 10 queries × all 1,437 training points; Pearson vs the reference scores",
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", nargs="+", default=["A", "B"], choices=["A", "B"])
    parser.add_argument("--no-peers", action="store_true", help="skip captum/pyDVL/kronfluence")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="peers: CPU only")
    parser.add_argument("--memory-probe", nargs=3, metavar=("PROBLEM", "N", "PATH"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        name, n, path = args.memory_probe
        _memory_probe(name, int(n), path)
        return
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "threads": args.threads,
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "methods": {},
    }
    problems = {name: reference.load(name) for name in args.problems}
    scoring_problem = problems.get("B") or next(iter(problems.values()))
    results["scoring"] = []
    for n in (len(scoring_problem.train[0]), LARGE_N):
        results["scoring"].append(scoring_cost(scoring_problem, n, args.device))
        print(f"  scoring N={n}: {results['scoring'][-1]}", file=sys.stderr)
    for name, problem in problems.items():
        run_peers = not args.no_peers and args.device == "cpu"
        _, rows = solver_table(problem, run_peers, args.device)
        results["methods"][name] = rows
    table = markdown(results)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    stamp = results["date"].replace(":", "").replace("+0000", "Z")
    out = RESULTS / f"scoring-{stamp}.json"
    out.write_text(json.dumps({**_jsonable(results), "markdown": table}, indent=1))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
