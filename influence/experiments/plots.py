"""Figures of the experiments (matplotlib, Agg backend): Figure 4 bars, Figure 5 curves,
test-loss scatter plots and Figure 6 detection curves, as PNG and (but for the scatter
plots) SVG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from influence.decomposition import GAPS, DecompositionResult
from influence.experiments.correlation import CorrelationResult
from influence.experiments.mislabel import MislabelResult
from influence.experiments.sweep import SweepResult

__all__ = ["plot_correlation", "plot_decomposition", "plot_mislabel", "plot_sweep"]


def _save(fig: plt.Figure, stem: Path, svg: bool = True) -> list[Path]:
    fig.tight_layout()
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")][: 2 if svg else 1]
    for path in paths:
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return paths


def plot_decomposition(result: DecompositionResult, stem: Path, title: str) -> list[Path]:
    """Bar chart of the mean gaps with std error bars (Figure 4)."""
    summary = result.summary()
    names = [name for name, _, _ in GAPS if name in summary]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(
        names,
        [summary[g]["mean"] for g in names],
        yerr=[summary[g]["std"] for g in names],
        color="#4c72b0",
        capsize=3,
    )
    ax.set_ylabel("L2 distance of training outputs")
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=20)
    return _save(fig, stem)


def plot_correlation(result: CorrelationResult, stem: Path, title: str) -> list[Path]:
    """One scatter per method: influence-predicted vs actual test-loss change."""
    methods = list(result.actual)
    stats = result.statistics()
    fig, axes = plt.subplots(1, len(methods), figsize=(3 * len(methods), 3), squeeze=False)
    x = result.predicted.reshape(-1).numpy()
    for ax, method in zip(axes[0], methods, strict=True):
        ax.scatter(x, result.actual[method].reshape(-1).numpy(), s=6, alpha=0.6)
        pearson = stats[method]["pearson"]
        label = "n/a" if pearson is None else f"{pearson:.2f}"
        ax.set_title(f"{method} (P = {label})", fontsize=9)
        ax.set_xlabel("influence prediction", fontsize=8)
    axes[0][0].set_ylabel("actual test-loss change", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, stem, svg=False)  # M·T points: the SVG would be large


def plot_mislabel(result: MislabelResult, stem: Path, title: str) -> list[Path]:
    """Fraction of corrupted labels found vs fraction inspected (Figure 6)."""
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for name, curve in result.curves.items():
        n = len(curve) - 1
        ax.plot([k / n for k in range(n + 1)], curve.numpy(), label=name)
    ax.set_xlabel("fraction of training data inspected")
    ax.set_ylabel("fraction of mislabels found")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, stem)


def plot_sweep(result: SweepResult, stem: Path, title: str) -> list[Path]:
    """Each gap's mean ± std against the swept factor (Figure 5), log scale (zeros left out)."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, curve in result.curves().items():
        mean = [m if m > 0 else float("nan") for m in curve["mean"]]
        lower = [min(s, 0.9 * m) for s, m in zip(curve["std"], curve["mean"], strict=True)]
        ax.errorbar(result.values, mean, yerr=[lower, curve["std"]], label=name, capsize=2)
    if all(v > 0 for v in result.values):
        ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(result.parameter)
    ax.set_ylabel("L2 distance of training outputs")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, stem)
