"""Experiment configs: one JSON file names the data, the model, the base training recipe
and the settings of each experiment (``decomposition``, ``correlation``, ``mislabel``,
``sweep``); unknown keys are errors that list the valid ones."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from influence.decomposition import DecompositionArguments
from influence.response import RETRAIN_METHODS, ResponseArguments
from models import (
    BUILTIN_DATASETS,
    Dataset,
    Progress,
    Recipe,
    TrainRun,
    build,
    builtin_dataset,
    train,
)
from models.datasets import is_int
from models.losses import get_loss

__all__ = [
    "CorrelationArguments",
    "ExperimentConfig",
    "MislabelArguments",
    "SweepArguments",
    "build_dataclass",
    "train_base",
]

SWEEP_PARAMETERS = ("width", "depth", "epochs", "weight_decay", "damping", "removed_fraction")
INTEGER_SWEEPS = ("width", "depth", "epochs")


def _is_real(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


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
        if isinstance(self.methods, str):
            raise ValueError(f"methods must be a list of names, got {self.methods!r}")
        object.__setattr__(self, "methods", tuple(self.methods))
        for name in ("num_points", "num_test"):
            value = getattr(self, name)
            if not (is_int(value) and value >= 2):
                raise ValueError(f"{name} must be an integer >= 2, got {value!r}")
        if not is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
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
        if not (_is_real(self.fraction) and 0 < self.fraction < 1):
            raise ValueError(f"fraction must be in (0, 1), got {self.fraction!r}")
        if not is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.solver not in ("exact", "lanczos"):
            raise ValueError(f"solver must be 'exact' or 'lanczos', got {self.solver!r}")
        if not (is_int(self.pbrf_points) and self.pbrf_points >= 0):
            raise ValueError(f"pbrf_points must be an integer >= 0, got {self.pbrf_points!r}")


@dataclass(frozen=True)
class SweepArguments:
    """One factor of Figure 5 swept over values; the decomposition runs at each."""

    parameter: str = field(default="damping", metadata={"help": f"One of {SWEEP_PARAMETERS}."})
    values: tuple[float, ...] = field(default=(), metadata={"help": "Values of the factor."})

    def __post_init__(self) -> None:
        if self.parameter not in SWEEP_PARAMETERS:
            raise ValueError(f"parameter must be one of {list(SWEEP_PARAMETERS)}")
        if not isinstance(self.values, list | tuple):
            raise ValueError(f"values must be a list of numbers, got {self.values!r}")
        object.__setattr__(self, "values", tuple(self.values))
        if not self.values:
            raise ValueError("values: at least one value is needed")
        bad = [v for v in self.values if not _is_real(v)]
        if self.parameter in INTEGER_SWEEPS:
            bad += [v for v in self.values if _is_real(v) and v != int(v)]
        if bad:
            kind = "integers" if self.parameter in INTEGER_SWEEPS else "finite numbers"
            raise ValueError(f"values of {self.parameter!r} must be {kind}, got {bad}")


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
        """Validate a parsed JSON config: every field, that the model runs on the dataset
        with the recipe's loss, and every sweep value, so mistakes fail before training."""
        if not isinstance(data, dict):
            raise ValueError(f"config must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ValueError(f"config: unknown key(s) {unknown}; valid keys: {valid}")
        missing = [k for k in ("name", "dataset", "model", "recipe") if k not in data]
        if missing:
            raise ValueError(f"config: missing key(s) {missing}")
        if not isinstance(data["name"], str):
            raise ValueError(f"config 'name' must be a string, got {data['name']!r}")
        if data["dataset"] not in BUILTIN_DATASETS:
            raise ValueError(
                f"config 'dataset' must be one of {sorted(BUILTIN_DATASETS)}, "
                f"got {data['dataset']!r}"
            )
        if not isinstance(data["model"], dict):
            raise ValueError(f"config 'model' must be a JSON object, got {data['model']!r}")
        if not isinstance(data["recipe"], dict):
            raise ValueError(f"config 'recipe' must be a JSON object, got {data['recipe']!r}")
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
        if size is not None and not (is_int(size) and size >= 2):
            raise ValueError(f"config 'train_size' must be an integer >= 2, got {size!r}")
        config = cls(**data)
        config._check_model()
        if config.sweep is not None:
            for value in config.sweep.values:
                try:
                    config.with_value(config.sweep.parameter, value)._check_model()
                except ValueError as exc:
                    raise ValueError(f"config 'sweep': value {value!r}: {exc}") from None
        return config

    def _check_model(self) -> None:
        """Build the model and run it and the recipe's loss on two training examples
        (cheap), so a model that does not fit the data or the loss fails before training."""
        data = builtin_dataset(self.dataset)
        dtype = getattr(torch, self.response.dtype)
        try:
            with torch.random.fork_rng(devices=[]):
                model = build(self.model).to(dtype)
        except Exception as exc:
            raise ValueError(f"config 'model': {type(exc).__name__}: {exc}") from None
        x, t = data.inputs[:2], data.targets[:2]
        x = x.to(dtype) if x.is_floating_point() else x
        where = f"config 'model' and 'recipe.loss' ({self.recipe.loss!r}) on {self.dataset!r}"
        try:
            with torch.no_grad():
                outputs = model(x)
                get_loss(self.recipe.loss).mean(outputs, t)
        except Exception as exc:
            raise ValueError(f"{where}: {type(exc).__name__}: {exc}") from None
        classes = data.metadata.get("num_classes")
        if self.recipe.loss == "cross_entropy" and classes and outputs.shape[-1] < classes:
            raise ValueError(
                f"{where}: the model has {outputs.shape[-1]} outputs for {classes} classes"
            )
        if self.recipe.loss == "bce" and classes and classes != 2:
            raise ValueError(f"{where}: 'bce' needs 2 classes, the dataset has {classes}")

    def check(self, command: str) -> None:
        """Fail before any training if ``command`` (decomposition, correlation, mislabel or
        sweep) cannot run on this config: counts larger than the data, no sweep section,
        mislabel detection on regression data."""
        train_set, test_set = self.datasets()
        n = len(train_set)
        if command == "sweep":
            if self.sweep is None:
                raise ValueError(
                    "config has no 'sweep' section ({'parameter': ..., 'values': [...]})"
                )
            steps = [self.with_value(self.sweep.parameter, v) for v in self.sweep.values]
        else:
            steps = [self]
        if command in ("decomposition", "sweep"):
            for step in steps:
                args = step.decomposition
                if args.group_fraction is None and args.num_points > n:
                    raise ValueError(
                        f"config 'decomposition': num_points = {args.num_points} exceeds the "
                        f"{n} training examples"
                    )
        elif command == "correlation":
            args = self.correlation
            if args.num_points > n or args.num_test > len(test_set):
                raise ValueError(
                    f"config 'correlation': num_points/num_test ({args.num_points}/"
                    f"{args.num_test}) exceed the {n} training / {len(test_set)} test examples"
                )
        elif command == "mislabel" and train_set.metadata.get("task") != "classification":
            raise ValueError(
                f"config 'dataset': mislabel detection needs a classification dataset, "
                f"{self.dataset!r} is {train_set.metadata.get('task')!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The validated config with every default filled in (JSON-able), as recorded in
        each result."""
        data = asdict(self)
        data["recipe"] = self.recipe.to_dict()
        return data

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

    def train_base(self, train_set: Dataset, progress: Progress | None = None) -> TrainRun:
        """The base run (θ⁰ → θˢ, K epochs) in the response dtype, on the response device;
        ``progress`` as for ``models.train``."""
        return train_base(self.model, train_set, self.recipe, self.response, progress)

    def with_value(self, parameter: str, value: float) -> ExperimentConfig:
        """This config with one sweep factor set (width/depth edit ``model['hidden']``);
        width, depth and epochs must be whole numbers."""
        if parameter in INTEGER_SWEEPS and not (_is_real(value) and value == int(value)):
            raise ValueError(f"{parameter} must be an integer, got {value!r}")
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
