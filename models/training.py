"""Recorded, replayable training runs.

The objective minimised is the cost of docs/engine.md (Conventions) with optional
per-example weights,
``J_w(θ) = (1/B) Σ_{i∈B} w_i L(f(θ, x_i), t_i) + (wd/2) ‖θ‖²`` on each minibatch B. The
mean divides by the batch size, not by Σ w_i, so ``w_z = 0`` removes z while keeping the
``1/N`` scale: full-batch, that is ``Q(θ) = J(θ) − ε L_z`` with ``ε = 1/N`` (appendix B).

Determinism (CPU, same thread count): weights are initialised by seeding the CPU generator
(``torch.default_generator.manual_seed(seed)``, what ``torch.manual_seed`` does on the CPU)
then ``build(config)``; the CPU RNG state is restored afterwards and no other device's RNG
(CUDA, MPS, ...) is seeded or touched. Each epoch's batch order is one ``torch.randperm``
drawn from a ``torch.Generator`` seeded with ``seed``. A :class:`TrainRun` records θ⁰, θˢ
and every epoch's order, so replaying it reproduces θˢ bit for bit. Both are drawn on the
CPU whatever ``train``'s ``device``, so θ⁰ and the orders are the same on every device (θˢ
then differs by rounding only).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models.architectures import build
from models.checkpoints import build_skeleton, check_state_dict, nonfinite
from models.datasets import Dataset, first_outside, is_int, validate_dataset
from models.errors import CheckpointError, DatasetError, TrainingError
from models.losses import LOSSES, get_loss
from models.precision import ieee_float32
from models.safetensors_io import read_file, write_file

__all__ = ["Objective", "Progress", "Recipe", "TrainRun", "resolve_device", "train"]

Objective = Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor]
Progress = Callable[[float, str], None]
"""``progress(fraction, phase)``: fraction done in [0, 1] and a phase name (``"train"``,
``"solve"``, ...); it may raise to abort the work. The one definition shared by
``models``, ``influence`` and ``worker``."""

OPTIMIZERS = ("sgd", "sgdm", "adam", "lbfgs")
SCHEDULES = ("none", "step", "cosine")


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class Recipe:
    """How to train: optimizer, step sizes, epochs, batching, regularisation, seed, loss."""

    optimizer: str = _help(
        "'sgd' (plain), 'sgdm' (SGD with heavy-ball momentum), 'adam', or 'lbfgs' "
        "(full batch, strong Wolfe line search; one epoch = one optimizer step).",
        "sgd",
    )
    lr: float = _help("Learning rate (L-BFGS: initial step length).", 0.1)
    momentum: float = _help("Momentum for 'sgdm' (ignored by the other optimizers).", 0.9)
    epochs: int = _help("Passes over the data (L-BFGS: outer steps).", 10)
    batch_size: int | None = _help(
        "Examples per minibatch; None = full batch. The last batch may be smaller.", None
    )
    weight_decay: float = _help(
        "wd in the objective's (wd/2)‖θ‖² term (added to the loss, not decoupled decay).", 0.0
    )
    schedule: str = _help(
        "Per-epoch learning-rate schedule: 'none'; 'step' (multiply by gamma at each epoch "
        "in milestones); 'cosine' (lr·½(1+cos(π e/E)) with E = the call's epochs or "
        "train()'s schedule_epochs; epochs past E keep the last rate).",
        "none",
    )
    milestones: tuple[int, ...] = _help("Epochs at which 'step' multiplies lr by gamma.", ())
    gamma: float = _help("Factor of the 'step' schedule.", 0.1)
    seed: int = _help("Seed of the weight initialisation and of the batch orders.", 0)
    loss: str = _help(
        "Loss name from models.losses: 'cross_entropy', 'mse' or 'bce'.", "cross_entropy"
    )
    lbfgs_max_iter: int = _help("L-BFGS iterations per outer step.", 20)
    lbfgs_history: int = _help("L-BFGS history size.", 100)
    lbfgs_tolerance_grad: float = _help("L-BFGS stops when max |gradient| is below this.", 1e-7)
    lbfgs_tolerance_change: float = _help(
        "L-BFGS stops when the objective or step changes by less than this.", 1e-9
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "milestones", tuple(self.milestones))
        if self.optimizer not in OPTIMIZERS:
            raise TrainingError(
                f"recipe optimizer {self.optimizer!r} is not one of {list(OPTIMIZERS)}"
            )
        if self.schedule not in SCHEDULES:
            raise TrainingError(
                f"recipe schedule {self.schedule!r} is not one of {list(SCHEDULES)}"
            )
        if self.loss not in LOSSES:
            raise TrainingError(f"recipe loss {self.loss!r} is not one of {sorted(LOSSES)}")
        for name in ("lr", "momentum", "weight_decay", "gamma", "lbfgs_tolerance_grad",
                     "lbfgs_tolerance_change"):  # fmt: skip
            value = getattr(self, name)
            if not (_is_number(value) and math.isfinite(value) and value >= 0):
                raise TrainingError(f"recipe {name} must be a finite number >= 0, got {value!r}")
        if self.lr <= 0:
            raise TrainingError(f"recipe lr must be > 0, got {self.lr!r}")
        for name in ("epochs", "seed", "lbfgs_max_iter", "lbfgs_history"):
            value = getattr(self, name)
            if not (is_int(value) and value >= 0):
                raise TrainingError(f"recipe {name} must be an integer >= 0, got {value!r}")
        if self.batch_size is not None and not (is_int(self.batch_size) and self.batch_size >= 1):
            raise TrainingError(
                f"recipe batch_size must be None or an integer >= 1, got {self.batch_size!r}"
            )
        if self.optimizer == "lbfgs" and self.batch_size is not None:
            raise TrainingError("recipe optimizer 'lbfgs' is full-batch: batch_size must be None")
        if not all(is_int(m) and m >= 0 for m in self.milestones):
            raise TrainingError(
                f"recipe milestones must be epoch indices >= 0, got {self.milestones!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (round-trips through :meth:`from_dict`)."""
        return {**asdict(self), "milestones": list(self.milestones)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        """Build from a dict; unknown keys raise :class:`TrainingError` listing the valid ones."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise TrainingError(f"unknown recipe field(s) {unknown}; valid fields: {valid}")
        return cls(**data)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text."""
        return {f.name: f.metadata["help"] for f in fields(cls)}

    def lr_at(self, epoch: int, total_epochs: int) -> float:
        """Learning rate of ``epoch`` (0-based) of a schedule spanning ``total_epochs``;
        epochs past the span keep the rate of its last epoch."""
        epoch = min(epoch, max(total_epochs - 1, 0))
        if self.schedule == "step":
            return self.lr * self.gamma ** sum(epoch >= m for m in self.milestones)
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * epoch / max(total_epochs, 1)))
        return self.lr


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cpu_clone(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def resolve_device(
    device: str | torch.device | None,
    what: str = "device",
    error: type[ValueError] = TrainingError,
) -> torch.device:
    """The ``torch.device`` that ``device`` names (None = the CPU), checked usable here.

    Accepts ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or such a ``torch.device``;
    anything else, or a GPU this torch build does not see, raises ``error`` with a message
    starting with ``what``.
    """
    if device is None:
        return torch.device("cpu")
    if not isinstance(device, str | torch.device):
        raise error(
            f"{what} must be a device name such as 'cpu', 'cuda' or 'cuda:1', "
            f"got {type(device).__name__}"
        )
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise error(
            f"{what} {device!r} is not a torch device name; use 'cpu', 'cuda' or 'cuda:N'"
        ) from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "mps":
        if not torch.backends.mps.is_available():
            raise error(f"{what} {device!r}: this torch build or machine has no MPS")
        return resolved
    if resolved.type != "cuda":
        raise error(f"{what} {device!r}: only 'cpu', 'cuda' and 'mps' devices are supported")
    if not torch.cuda.is_available():
        build = "is a CPU-only build" if torch.version.cuda is None else "sees no GPU"
        raise error(
            f"{what} {device!r}: CUDA is not available (torch {torch.__version__} {build}); "
            "README.md's GPU section says how to install the CUDA build of torch"
        )
    count = torch.cuda.device_count()
    if resolved.index is not None and resolved.index >= count:
        raise error(f"{what} {device!r}: this machine has {count} CUDA device(s)")
    return resolved


@dataclass(eq=False)
class TrainRun:
    """A finished training run: enough to rebuild both end points and replay it.

    ``batch_order[e]`` is the permutation of example indices used in epoch ``e``
    (minibatches are consecutive slices of it); ``losses[e]`` the epoch's mean objective.
    """

    config: dict[str, Any]
    recipe: Recipe
    theta0: dict[str, Tensor]
    thetas: dict[str, Tensor]
    batch_order: list[Tensor]
    losses: list[float]

    def model(self, final: bool = True) -> nn.Module:
        """The network at θˢ (``final=True``) or at θ⁰, in eval mode."""
        model = build_skeleton(self.config, "training run").to(self.dtype)
        model.load_state_dict(_cpu_clone(self.thetas if final else self.theta0), assign=True)
        return model.eval()

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype the run trained in (that of its weights)."""
        return next(iter(self.thetas.values())).dtype

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``run.json`` (config, recipe, losses) and ``run.safetensors`` (θ⁰, θˢ, order)."""
        directory = Path(directory)
        tensors = {f"theta0/{k}": v for k, v in self.theta0.items()}
        tensors.update({f"thetas/{k}": v for k, v in self.thetas.items()})
        n = len(self.batch_order[0]) if self.batch_order else 0
        tensors["batch_order"] = (
            torch.stack(self.batch_order)
            if self.batch_order
            else torch.zeros(0, n, dtype=torch.long)
        )
        write_file(
            directory / "run.safetensors", tensors, {"format": "influence-service/train-run"}
        )
        record = {
            "format": "influence-service/train-run",
            "version": "1",
            "config": self.config,
            "recipe": self.recipe.to_dict(),
            "losses": self.losses,
        }
        (directory / "run.json").write_text(json.dumps(record, indent=1, sort_keys=True))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> TrainRun:
        """Read a run written by :meth:`save`; problems raise :class:`CheckpointError`."""
        directory = Path(directory)
        what = f"training run {os.fspath(directory)!r}"
        try:
            record = json.loads((directory / "run.json").read_text())
            config, recipe = record["config"], Recipe.from_dict(record["recipe"])
            losses = [float(v) for v in record["losses"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{what}: bad run.json ({exc})") from None
        tensors, _ = read_file(directory / "run.safetensors", what, CheckpointError)
        order = tensors.pop("batch_order", None)
        if order is None or order.dtype != torch.int64 or order.dim() != 2:
            raise CheckpointError(f"{what}: 'batch_order' must be an int64 [epochs, N] tensor")
        dtype = next((v.dtype for k, v in tensors.items() if k.startswith("thetas/")), None)
        if dtype is None or not dtype.is_floating_point:
            raise CheckpointError(f"{what}: no floating 'thetas/' weights in run.safetensors")
        expected = build_skeleton(config, what).to(dtype).state_dict()
        ends = {}
        for prefix in ("theta0", "thetas"):
            ends[prefix] = {
                k.removeprefix(f"{prefix}/"): v
                for k, v in tensors.items()
                if k.startswith(f"{prefix}/")
            }
            check_state_dict(expected, ends[prefix], f"{what} {prefix}", CheckpointError)
        return cls(config, recipe, ends["theta0"], ends["thetas"], list(order.unbind(0)), losses)


def _check_order(order: Tensor, n: int, epoch: int) -> Tensor:
    order = torch.as_tensor(order).cpu()  # recorded on the CPU whatever the device
    if order.dtype != torch.int64 or order.shape != (n,):
        raise TrainingError(
            f"batch_order[{epoch}] must be an int64 tensor of shape [{n}], got "
            f"{order.dtype} {list(order.shape)}"
        )
    if not torch.equal(order.sort().values, torch.arange(n)):
        raise TrainingError(f"batch_order[{epoch}] is not a permutation of range({n})")
    return order


def _make_optimizer(recipe: Recipe, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr)
    if recipe.optimizer == "sgdm":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum)
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr)
    return torch.optim.LBFGS(
        params,
        lr=recipe.lr,
        max_iter=recipe.lbfgs_max_iter,
        history_size=recipe.lbfgs_history,
        tolerance_grad=recipe.lbfgs_tolerance_grad,
        tolerance_change=recipe.lbfgs_tolerance_change,
        line_search_fn="strong_wolfe",
    )


def _check_token_ids(config: Mapping[str, Any], dataset: Dataset) -> None:
    """Token ids of a language model's inputs lie in ``[0, vocab_size)`` (outside it the
    embedding raises an IndexError on the CPU, a device-side assert on CUDA)."""
    vocabulary = config.get("vocab_size")
    inputs = dataset.inputs
    if not is_int(vocabulary) or inputs.is_floating_point():
        return
    found = first_outside(inputs, 0, vocabulary)
    if found is not None:
        raise DatasetError(
            f"token ids must lie in [0, {vocabulary}) (vocab_size): inputs example {found[0]} "
            f"has {found[1]}"
        )


@ieee_float32()
def train(
    config: Mapping[str, Any],
    dataset: Dataset,
    recipe: Recipe,
    *,
    init: Mapping[str, Tensor] | None = None,
    example_weights: Tensor | None = None,
    batch_order: Sequence[Tensor] | None = None,
    epochs: int | None = None,
    schedule_epochs: int | None = None,
    objective: Objective | None = None,
    progress: Progress | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> TrainRun:
    """Train ``build(config)`` on ``dataset`` with ``recipe`` and record the run.

    - ``init``: state dict to start from instead of the seeded initialisation (warm
      starts; cast to the training dtype); the batch orders still come from the seed.
    - ``example_weights``: ``[N]`` finite weights ``w_i`` of the objective above
      (``0`` = example removed). Not combined with ``objective``.
    - ``batch_order``: orders to replay. Epoch ``e < len(batch_order)`` uses
      ``batch_order[e]``; later epochs use the order the seed gives for epoch ``e`` (the
      generator draws one permutation every epoch, replayed or not), so a run of
      ``K + K/2`` epochs replaying a ``K``-epoch run shares its first ``K`` epochs and then
      continues as a ``K + K/2``-epoch base run would. Full-batch training uses the
      identity order.
    - ``epochs``: overrides ``recipe.epochs`` (e.g. ``K/2`` for warm starts).
    - ``schedule_epochs``: the horizon E of the learning-rate schedule (default: the
      epochs of this call). Epochs past it keep the rate of epoch ``E − 1``, so a
      ``K + K/2``-epoch cold-start retrain with ``schedule_epochs=K`` replays the base
      run's K rates exactly and then holds the last one.
    - ``objective(model, inputs, targets, idx) -> scalar``: replaces the data term
      ``(1/B) Σ w_i L_i`` for the minibatch ``idx`` (indices into ``dataset``; inputs and
      targets are ``dataset[idx]`` in the model's dtype). ``train`` still adds
      ``(wd/2)‖θ‖²`` with the recipe's ``weight_decay``; an objective with its own
      regulariser (e.g. PBRF's ``(wd/2)‖θ−θˢ‖²``) should use a recipe with
      ``weight_decay=0``.
    - ``dtype``: train in this floating dtype (e.g. ``torch.float64``); the seeded
      initialisation is built as usual and then cast, so θ⁰ equals the default-dtype θ⁰.
    - ``device``: train on this torch device (``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a
      ``torch.device``; None = the CPU). The seeded initialisation and the batch orders
      are still drawn on the CPU, so θ⁰ and the orders are identical on every device;
      the model, the dataset's inputs/targets and ``example_weights`` are then moved to
      ``device`` and the objective gets ``idx`` on it. The returned :class:`TrainRun` is
      on the CPU whatever the device (θ⁰, θˢ and the orders), so runs save and compare
      alike; ``device="cpu"`` is bit-identical to None. An unknown device, or CUDA where
      torch sees none, raises :class:`TrainingError`.
    - ``progress(fraction, "train")`` is called at the start and after every epoch, and
      for L-BFGS also at every objective evaluation within an epoch (one epoch = one
      optimizer step of up to ``lbfgs_max_iter`` iterations); it may raise to abort
      training.

    Raises :class:`TrainingError` for bad arguments or a non-finite objective and
    :class:`DatasetError` for an invalid dataset.
    """
    if not isinstance(recipe, Recipe):
        raise TrainingError(f"recipe must be a models.Recipe, got {type(recipe).__name__}")
    if not isinstance(dataset, Dataset):
        raise TrainingError(f"dataset must be a models.Dataset, got {type(dataset).__name__}")
    validate_dataset(dataset, max_bytes=sys.maxsize)
    _check_token_ids(config, dataset)
    n = len(dataset)
    total = recipe.epochs if epochs is None else epochs
    if not (is_int(total) and total >= 0):
        raise TrainingError(f"epochs must be an integer >= 0, got {total!r}")
    if schedule_epochs is not None and not (is_int(schedule_epochs) and schedule_epochs >= 1):
        raise TrainingError(f"schedule_epochs must be an integer >= 1, got {schedule_epochs!r}")
    horizon = total if schedule_epochs is None else schedule_epochs
    if objective is not None and example_weights is not None:
        raise TrainingError("pass example_weights or objective, not both (objective gets idx)")
    replay = [_check_order(o, n, e) for e, o in enumerate(batch_order or [])]
    target = resolve_device(device)

    with torch.random.fork_rng(devices=[]):
        # Not torch.manual_seed: that also (re)seeds every CUDA/MPS/XPU generator, which
        # fork_rng(devices=[]) does not restore. Same CPU stream, so θ⁰ is unchanged.
        torch.default_generator.manual_seed(recipe.seed)
        model = build(config)
    if dtype is not None:
        if not dtype.is_floating_point:
            raise TrainingError(f"dtype must be a floating dtype, got {dtype}")
        model = model.to(dtype)
    model = model.to(target)
    if init is not None:
        expected = model.state_dict()
        init = {k: v.to(expected[k].dtype) if k in expected else v for k, v in init.items()}
        check_state_dict(expected, init, "init", TrainingError)
        model.load_state_dict(init, strict=True)
    theta0 = _cpu_clone(model.state_dict())
    params = list(model.parameters())
    param_dtype = params[0].dtype

    def place(tensor: Tensor) -> Tensor:
        if tensor.is_floating_point():
            return tensor.to(device=target, dtype=param_dtype)
        return tensor.to(target)

    inputs, targets = place(dataset.inputs), place(dataset.targets)
    weights = None
    if example_weights is not None:
        weights = place(torch.as_tensor(example_weights).to(param_dtype))
        if weights.shape != (n,) or not bool(torch.isfinite(weights).all()):
            raise TrainingError(
                f"example_weights must be {n} finite values, got shape {list(weights.shape)}"
            )
    loss = get_loss(recipe.loss)

    def data_term(m: nn.Module, x: Tensor, t: Tensor, idx: Tensor) -> Tensor:
        return loss.mean(m(x), t, None if weights is None else weights[idx])

    term = objective or data_term

    def cost(idx: Tensor) -> Tensor:
        value = term(model, inputs[idx], targets[idx], idx)
        if recipe.weight_decay:
            value = value + 0.5 * recipe.weight_decay * sum(p.pow(2).sum() for p in params)
        return value

    optimizer = _make_optimizer(recipe, params)
    full_batch_lbfgs = isinstance(optimizer, torch.optim.LBFGS)
    max_evaluations = max(1, optimizer.defaults["max_eval"]) if full_batch_lbfgs else 1
    batch = recipe.batch_size or n
    shuffle = batch < n
    generator = torch.Generator().manual_seed(recipe.seed)
    orders: list[Tensor] = []
    losses: list[float] = []
    model.train()
    if progress:
        progress(0.0, "train")
    for epoch in range(total):
        fresh = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        order = replay[epoch] if epoch < len(replay) else fresh
        orders.append(order)
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr_at(epoch, horizon)
        epoch_loss = 0.0
        evaluations = [0]
        for step, start in enumerate(range(0, n, batch)):
            idx = order[start : start + batch].to(target)

            def closure(
                idx: Tensor = idx, epoch: int = epoch, count: list[int] = evaluations
            ) -> Tensor:
                if progress and full_batch_lbfgs:  # an L-BFGS step can run long: report inside
                    count[0] += 1
                    progress((epoch + min(1.0, count[0] / max_evaluations)) / total, "train")
                optimizer.zero_grad(set_to_none=True)
                value = cost(idx)
                value.backward()
                return value

            value = float(optimizer.step(closure).detach())
            if not math.isfinite(value):
                raise TrainingError(
                    f"objective became non-finite ({value}) at epoch {epoch}, step {step}; "
                    "lower the learning rate"
                )
            epoch_loss += value * len(idx) / n
        losses.append(epoch_loss)
        if progress:
            progress((epoch + 1) / total, "train")
    model.eval()
    bad = [k for k, v in model.state_dict().items() if nonfinite(v)]
    if bad:
        raise TrainingError(f"training produced non-finite weights in {bad}")
    thetas = _cpu_clone(model.state_dict())
    return TrainRun(dict(config), recipe, theta0, thetas, orders, losses)
