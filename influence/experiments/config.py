"""Experiment configs: one JSON file names the data, the model, the base training recipe
and the settings of each experiment (``decomposition``, ``correlation``, ``mislabel``,
``sweep``); unknown keys are errors that list the valid ones."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from influence.decomposition import DecompositionArguments
from influence.response import RETRAIN_METHODS, ResponseArguments
from models import Dataset, Progress, Recipe, TrainRun, builtin_dataset, train

__all__ = [
    "CorrelationArguments",
    "ExperimentConfig",
    "MislabelArguments",
    "SweepArguments",
    "build_dataclass",
    "train_base",
]

SWEEP_PARAMETERS = ("width", "depth", "epochs", "weight_decay", "damping", "removed_fraction")


def build_dataclass(cls: type, data: Any, where: str) -> Any:
    """``cls(**data)`` with a clear error for a non-dict or unknown keys."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(data).__name__}")
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {valid}")
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class CorrelationArguments:
    """Test-loss correlations (Tables 6-8): M removed points × T random test points."""

    num_points: int = field(default=20, metadata={"help": "M, removed training points."})
    num_test: int = field(default=20, metadata={"help": "T, random test points."})
    seed: int = field(default=0, metadata={"help": "Seed of both samplers."})
    methods: tuple[str, ...] = field(
        default=("cold", "warm", "pbrf", "two_stage"),
        metadata={"help": "Retraining responses compared with influence."},
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", tuple(self.methods))
        for name in ("num_points", "num_test"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 2):
                raise ValueError(f"{name} must be an integer >= 2, got {value!r}")
        bad = [m for m in self.methods if m not in RETRAIN_METHODS]
        if bad or not self.methods:
            raise ValueError(
                f"methods must be a non-empty subset of {list(RETRAIN_METHODS)}, got {bad}"
            )


@dataclass(frozen=True)
class MislabelArguments:
    """Mislabelled-example detection (appendix D.3)."""

    fraction: float = field(default=0.1, metadata={"help": "Fraction of labels corrupted."})
    seed: int = field(default=0, metadata={"help": "Seed of the corruption and random order."})
    solver: str = field(
        default="exact", metadata={"help": "Self-influence solver: 'exact' or 'lanczos'."}
    )
    pbrf_points: int = field(
        default=0,
        metadata={
            "help": "PBRF self-influence needs one PBRF solve per training point; rank this "
            "many points of the training-loss top list by it (0 = skip)."
        },
    )

    def __post_init__(self) -> None:
        if not (0 < self.fraction < 1):
            raise ValueError(f"fraction must be in (0, 1), got {self.fraction!r}")
        if self.solver not in ("exact", "lanczos"):
            raise ValueError(f"solver must be 'exact' or 'lanczos', got {self.solver!r}")
        if not (isinstance(self.pbrf_points, int) and self.pbrf_points >= 0):
            raise ValueError(f"pbrf_points must be an integer >= 0, got {self.pbrf_points!r}")


@dataclass(frozen=True)
class SweepArguments:
    """One factor of Figure 5 swept over values; the decomposition runs at each."""

    parameter: str = field(default="damping", metadata={"help": f"One of {SWEEP_PARAMETERS}."})
    values: tuple[float, ...] = field(default=(), metadata={"help": "Values of the factor."})

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", tuple(self.values))
        if self.parameter not in SWEEP_PARAMETERS:
            raise ValueError(f"parameter must be one of {list(SWEEP_PARAMETERS)}")
        if not self.values:
            raise ValueError("values: at least one value is needed")


def train_base(
    model_config: dict[str, Any],
    train_set: Dataset,
    recipe: Recipe,
    response: ResponseArguments,
    progress: Progress | None = None,
) -> TrainRun:
    """A base run (θ⁰ → θˢ, K epochs, from the recipe's seed) in the response dtype, trained
    on the response device (the run itself is recorded on the CPU); ``progress`` as for
    ``models.train``."""
    return train(
        model_config, train_set, recipe, dtype=getattr(torch, response.dtype),
        device=response.device, progress=progress,
    )  # fmt: skip


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one experiment run needs, loaded from JSON (see influence/configs/)."""

    name: str
    dataset: str
    model: dict[str, Any]
    recipe: Recipe
    train_size: int | None = None
    response: ResponseArguments = field(default_factory=ResponseArguments)
    decomposition: DecompositionArguments = field(default_factory=DecompositionArguments)
    correlation: CorrelationArguments = field(default_factory=CorrelationArguments)
    mislabel: MislabelArguments = field(default_factory=MislabelArguments)
    sweep: SweepArguments | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        """Validate a parsed JSON config."""
        data = dict(data)
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ValueError(f"config: unknown key(s) {unknown}; valid keys: {valid}")
        missing = [k for k in ("name", "dataset", "model", "recipe") if k not in data]
        if missing:
            raise ValueError(f"config: missing key(s) {missing}")
        data["recipe"] = Recipe.from_dict(data["recipe"])
        parts = {
            "response": ResponseArguments,
            "decomposition": DecompositionArguments,
            "correlation": CorrelationArguments,
            "mislabel": MislabelArguments,
            "sweep": SweepArguments,
        }
        for key, kind in parts.items():
            if key in data:
                data[key] = build_dataclass(kind, data[key], f"config {key!r}")
        size = data.get("train_size")
        if size is not None and not (isinstance(size, int) and size >= 2):
            raise ValueError(f"config 'train_size' must be an integer >= 2, got {size!r}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path, *, device: str | None = None) -> ExperimentConfig:
        """Read a JSON config file; ``device`` (e.g. ``"cuda"``) replaces its
        ``response.device`` before validation, so a config naming a device this machine
        lacks still loads with another one."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read config {str(path)!r}: {exc}") from None
        if device is not None and isinstance(data, dict):
            response = data.get("response", {})
            if isinstance(response, dict):
                data = {**data, "response": {**response, "device": device}}
        return cls.from_dict(data)

    def datasets(self) -> tuple[Dataset, Dataset]:
        """Train and test splits; ``train_size`` keeps a seeded subset of the train split."""
        train_set, test_set = builtin_dataset(self.dataset), builtin_dataset(self.dataset, "test")
        if self.train_size is not None and self.train_size < len(train_set):
            gen = torch.Generator().manual_seed(self.recipe.seed)
            keep = torch.randperm(len(train_set), generator=gen)[: self.train_size]
            train_set = train_set.subset(keep.sort().values)
        return train_set, test_set

    def train_base(self, train_set: Dataset) -> TrainRun:
        """The base run (θ⁰ → θˢ, K epochs) in the response dtype, on the response device."""
        return train_base(self.model, train_set, self.recipe, self.response)

    def with_value(self, parameter: str, value: float) -> ExperimentConfig:
        """This config with one sweep factor set (width/depth edit ``model['hidden']``)."""
        if parameter in ("width", "depth"):
            hidden = list(self.model.get("hidden", [32, 32]))
            if parameter == "width":
                hidden = [int(value)] * len(hidden)
            else:
                hidden = [hidden[0]] * int(value)
            return replace(self, model={**self.model, "hidden": hidden})
        if parameter in ("epochs", "weight_decay"):
            number = int(value) if parameter == "epochs" else float(value)
            return replace(self, recipe=replace(self.recipe, **{parameter: number}))
        if parameter == "damping":
            return replace(self, response=replace(self.response, damping=float(value)))
        if parameter == "removed_fraction":
            args = replace(self.decomposition, group_fraction=float(value))
            return replace(self, decomposition=args)
        raise ValueError(f"unknown sweep parameter {parameter!r}; valid: {list(SWEEP_PARAMETERS)}")
