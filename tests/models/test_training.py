"""Training: determinism, replay, example weights, objectives, optimizers, run records, and
the ``device`` option on the CPU (tests/gpu runs it on CUDA)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.func import functional_call, grad, hessian

import models
from models import Dataset, Recipe, TrainingError, TrainRun
from models.losses import get_loss
from models.training import resolve_device
from tests.conftest import RTOL_F32, RTOL_SOLVE

CONFIG = {"architecture": "mlp", "in_features": 3, "hidden": [5], "out_features": 3,
          "activation": "tanh"}  # fmt: skip
MINIBATCH = Recipe(
    optimizer="sgdm", lr=0.1, momentum=0.9, epochs=4, batch_size=5, weight_decay=1e-2,
    schedule="step", milestones=(2,), gamma=0.5, seed=3,
)  # fmt: skip


@pytest.fixture(scope="module")
def data() -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return Dataset(x, y, {"task": "classification", "num_classes": 3})


@pytest.fixture(scope="module")
def base_run(data: Dataset) -> TrainRun:
    return models.train(CONFIG, data, MINIBATCH)


def _equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_and_recipe_give_identical_weights(data: Dataset, base_run: TrainRun) -> None:
    again = models.train(CONFIG, data, MINIBATCH)
    assert _equal_states(again.thetas, base_run.thetas)
    assert _equal_states(again.theta0, base_run.theta0)
    assert not _equal_states(base_run.thetas, base_run.theta0)
    other_seed = models.train(CONFIG, data, Recipe(**{**MINIBATCH.to_dict(), "seed": 4}))
    assert not _equal_states(other_seed.thetas, base_run.thetas)


def test_batch_order_is_recorded_per_epoch(data: Dataset, base_run: TrainRun) -> None:
    assert len(base_run.batch_order) == MINIBATCH.epochs
    for order in base_run.batch_order:
        assert sorted(order.tolist()) == list(range(len(data)))
    assert not torch.equal(base_run.batch_order[0], base_run.batch_order[1])
    assert len(base_run.losses) == MINIBATCH.epochs and base_run.losses[-1] < base_run.losses[0]


def test_replay_with_unit_weights_reproduces_theta_exactly(
    data: Dataset, base_run: TrainRun
) -> None:
    replay = models.train(
        CONFIG, data, MINIBATCH, batch_order=base_run.batch_order, example_weights=torch.ones(24)
    )
    assert _equal_states(replay.thetas, base_run.thetas)


def test_replay_with_one_example_removed_runs_and_differs(
    data: Dataset, base_run: TrainRun
) -> None:
    weights = torch.ones(24)
    weights[7] = 0
    removed = models.train(
        CONFIG, data, MINIBATCH, batch_order=base_run.batch_order, example_weights=weights
    )
    assert all(
        torch.equal(a, b) for a, b in zip(removed.batch_order, base_run.batch_order, strict=True)
    )
    assert not _equal_states(removed.thetas, base_run.thetas)
    assert all(torch.isfinite(v).all() for v in removed.thetas.values())


def test_longer_run_continues_with_the_seeds_orders(data: Dataset, base_run: TrainRun) -> None:
    longer = models.train(CONFIG, data, MINIBATCH, epochs=6)
    replayed = models.train(CONFIG, data, MINIBATCH, epochs=6, batch_order=base_run.batch_order)
    for e in range(4):
        assert torch.equal(longer.batch_order[e], base_run.batch_order[e])
    for a, b in zip(replayed.batch_order, longer.batch_order, strict=True):
        assert torch.equal(a, b)
    assert _equal_states(replayed.thetas, longer.thetas)
    shorter = models.train(CONFIG, data, MINIBATCH, epochs=2, batch_order=base_run.batch_order)
    assert len(shorter.batch_order) == 2


def test_full_batch_weighted_step_matches_the_objective(data: Dataset) -> None:
    """One full-batch SGD step on J_w = (1/N) Σ w_i L_i + (wd/2)‖θ‖², checked in float64."""
    recipe = Recipe(optimizer="sgd", lr=0.5, epochs=1, weight_decay=0.1, seed=1)
    weights = torch.linspace(0, 2, 24)
    run = models.train(CONFIG, data, recipe, example_weights=weights)
    model = models.build(CONFIG).double()
    theta0 = {k: v.double() for k, v in run.theta0.items()}
    loss = get_loss("cross_entropy")

    def objective(theta: dict) -> torch.Tensor:
        per = loss.per_example(functional_call(model, theta, (data.inputs.double(),)), data.targets)
        return (weights.double() * per).sum() / 24 + 0.05 * sum(
            p.pow(2).sum() for p in theta.values()
        )

    g = grad(objective)(theta0)
    for name, value in run.thetas.items():
        expected = theta0[name] - 0.5 * g[name]
        torch.testing.assert_close(value.double(), expected, rtol=RTOL_F32, atol=RTOL_F32)
    assert run.batch_order[0].tolist() == list(range(24))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_lbfgs_reaches_the_exact_logistic_regression_optimum() -> None:
    data = models.builtin_dataset("breast_cancer").subset(range(60))
    x = data.inputs[:, :4].contiguous()
    data = Dataset(x, data.targets, {"task": "classification", "num_classes": 2})
    config = {"architecture": "logistic_regression", "in_features": 4, "num_classes": 2}
    recipe = Recipe(optimizer="lbfgs", lr=1.0, epochs=20, weight_decay=0.05, loss="bce")
    run = models.train(config, data, recipe)

    # Newton's method in float64 on the same objective: the exact optimum.
    loss = get_loss("bce")
    xd = torch.cat([x.double(), torch.ones(60, 1, dtype=torch.float64)], 1)

    def cost(w: torch.Tensor) -> torch.Tensor:
        return loss.per_example((xd @ w)[:, None], data.targets).mean() + 0.025 * w.pow(2).sum()

    w = torch.zeros(5, dtype=torch.float64)
    for _ in range(30):
        w = w - torch.linalg.solve(hessian(cost)(w), grad(cost)(w))
    assert grad(cost)(w).norm() < RTOL_SOLVE
    got = torch.cat([run.thetas["weight"].reshape(-1), run.thetas["bias"]]).double()
    torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-5)


def test_custom_objective_replaces_data_term_and_keeps_weight_decay(data: Dataset) -> None:
    loss = get_loss("cross_entropy")

    def same_as_default(model, inputs, targets, idx):
        return loss.mean(model(inputs), targets)

    default = models.train(CONFIG, data, MINIBATCH)
    custom = models.train(CONFIG, data, MINIBATCH, objective=same_as_default)
    assert _equal_states(custom.thetas, default.thetas)

    seen: list[torch.Tensor] = []

    def zero(model, inputs, targets, idx):
        seen.append(idx)
        assert torch.equal(inputs, data.inputs[idx])
        return 0 * model(inputs).sum()

    recipe = Recipe(optimizer="sgd", lr=0.1, epochs=3, batch_size=8, weight_decay=0.5)
    run = models.train(CONFIG, data, recipe, objective=zero)
    assert len(seen) == 9  # 3 epochs × 3 batches
    for name, value in run.thetas.items():  # pure decay: θ ← (1 − lr·wd) θ per step
        torch.testing.assert_close(value, run.theta0[name] * 0.95**9, rtol=RTOL_F32, atol=1e-7)


def test_warm_start_from_init(data: Dataset, base_run: TrainRun) -> None:
    none = models.train(CONFIG, data, MINIBATCH, init=base_run.thetas, epochs=0)
    assert _equal_states(none.theta0, base_run.thetas)
    assert _equal_states(none.thetas, base_run.thetas)
    warm = models.train(CONFIG, data, MINIBATCH, init=base_run.thetas, epochs=2)
    assert _equal_states(warm.theta0, base_run.thetas)
    assert not _equal_states(warm.thetas, base_run.thetas)


def test_adam_and_cosine_schedule_train(data: Dataset) -> None:
    recipe = Recipe(optimizer="adam", lr=0.05, epochs=30, schedule="cosine")
    run = models.train(CONFIG, data, recipe)
    assert run.losses[-1] < 0.5 * run.losses[0]


def test_lr_schedules() -> None:
    step = Recipe(lr=1.0, schedule="step", milestones=(2, 4), gamma=0.1)
    assert [step.lr_at(e, 6) for e in range(6)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cosine = Recipe(lr=2.0, schedule="cosine")
    assert cosine.lr_at(0, 4) == 2.0 and cosine.lr_at(2, 4) == pytest.approx(1.0)
    assert cosine.lr_at(3, 4) == pytest.approx(1 + math.cos(math.pi * 3 / 4))
    assert Recipe(lr=0.3).lr_at(7, 10) == 0.3
    # Past the schedule's span the last epoch's rate is held.
    assert cosine.lr_at(5, 4) == cosine.lr_at(3, 4) > 0
    assert step.lr_at(9, 3) == step.lr_at(2, 3) == pytest.approx(0.1)


def test_schedule_horizon_replays_the_base_rates_then_holds_the_last(data: Dataset) -> None:
    """A K + 2 epoch replay with ``schedule_epochs=K`` runs the base run's K epochs
    exactly (same rates, same orders), then continues at the K-th epoch's rate."""
    recipe = Recipe(optimizer="sgd", lr=0.5, epochs=4, batch_size=6, schedule="cosine", seed=1)
    base = models.train(CONFIG, data, recipe)
    longer = models.train(
        CONFIG, data, recipe, init=base.theta0, batch_order=base.batch_order, epochs=6,
        schedule_epochs=4,
    )  # fmt: skip
    held = Recipe(**{**recipe.to_dict(), "lr": recipe.lr_at(3, 4), "schedule": "none"})
    tail = models.train(
        CONFIG, data, held, init=base.thetas, batch_order=longer.batch_order[4:], epochs=2
    )
    for name, value in tail.thetas.items():
        torch.testing.assert_close(longer.thetas[name], value, rtol=RTOL_F32, atol=RTOL_F32)
    stretched = models.train(
        CONFIG, data, recipe, init=base.theta0, batch_order=base.batch_order, epochs=6
    )
    assert not _equal_states(stretched.thetas, longer.thetas)  # the old, stretched schedule
    with pytest.raises(TrainingError, match="schedule_epochs"):
        models.train(CONFIG, data, recipe, schedule_epochs=0)


def test_global_rng_is_left_alone(data: Dataset) -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    models.train(CONFIG, data, Recipe(epochs=1))
    assert torch.equal(torch.get_rng_state(), before)


def test_other_devices_rngs_are_not_seeded(data: Dataset, monkeypatch) -> None:
    # torch.manual_seed also reseeds CUDA/MPS/XPU (lazily when CUDA is not initialised, so
    # even a later CUDA start would see it); fork_rng(devices=[]) restores only the CPU.
    def refuse(*args, **kwargs):
        raise AssertionError("train() seeded a non-CPU generator")

    for module, name in [
        (torch.cuda, "manual_seed_all"),
        (torch.cuda, "manual_seed"),
        (torch.mps, "manual_seed"),
        (torch.xpu, "manual_seed_all"),
        (torch.mtia, "manual_seed_all"),
    ]:
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(torch.random, "_seed_custom_device", refuse)
    run = models.train(CONFIG, data, MINIBATCH)
    monkeypatch.undo()
    assert _equal_states(run.theta0, models.train(CONFIG, data, MINIBATCH).theta0)


def test_theta0_is_what_torch_manual_seed_then_build_gives(data: Dataset) -> None:
    # seeding only the CPU generator keeps θ⁰ bit-identical to the documented recipe
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(MINIBATCH.seed)
        expected = models.build(CONFIG).state_dict()
    assert _equal_states(models.train(CONFIG, data, MINIBATCH, epochs=0).theta0, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_is_left_alone(data: Dataset) -> None:
    torch.cuda.manual_seed_all(123)
    before = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    models.train(CONFIG, data, Recipe(epochs=1), device="cuda")
    after = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_run_save_load_round_trip(tmp_path: Path, base_run: TrainRun) -> None:
    base_run.save(tmp_path / "run")
    loaded = TrainRun.load(tmp_path / "run")
    assert loaded.config == CONFIG and loaded.recipe == MINIBATCH
    assert _equal_states(loaded.thetas, base_run.thetas)
    assert _equal_states(loaded.theta0, base_run.theta0)
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.batch_order, base_run.batch_order, strict=True)
    )
    assert loaded.losses == base_run.losses
    x = torch.randn(2, 3)
    model = loaded.model()
    assert torch.equal(model(x), base_run.model()(x))
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        model[0].weight.zero_()  # the run's own tensors are not aliased
    assert torch.equal(loaded.thetas["0.weight"], base_run.thetas["0.weight"])
    assert torch.equal(loaded.model(final=False)[0].weight, base_run.theta0["0.weight"])


def test_run_load_refuses_tampered_files(tmp_path: Path, base_run: TrainRun) -> None:
    base_run.save(tmp_path)
    (tmp_path / "run.safetensors").write_bytes(b"\x80\x04\x95junkjunkjunk")
    with pytest.raises(models.CheckpointError, match="is a Python pickle"):
        TrainRun.load(tmp_path)
    (tmp_path / "run.json").write_text("{}")
    with pytest.raises(models.CheckpointError, match=r"bad run\.json"):
        TrainRun.load(tmp_path)


def test_progress_is_reported_and_can_abort(data: Dataset) -> None:
    calls: list[tuple[float, str]] = []
    models.train(CONFIG, data, Recipe(epochs=4), progress=lambda f, p: calls.append((f, p)))
    assert calls == [
        (0.0, "train"),
        (0.25, "train"),
        (0.5, "train"),
        (0.75, "train"),
        (1.0, "train"),
    ]

    def abort(fraction: float, phase: str) -> None:
        if fraction >= 0.5:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt, match="cancelled"):
        models.train(CONFIG, data, Recipe(epochs=4), progress=abort)


def test_an_lbfgs_step_reports_progress_inside_and_can_be_stopped_there(data: Dataset) -> None:
    """One L-BFGS epoch is up to lbfgs_max_iter iterations: progress (and so a job's cancel
    or time limit) is checked at each objective evaluation, not only after the step."""
    recipe = Recipe(
        optimizer="lbfgs", lr=1.0, epochs=2, lbfgs_max_iter=40,
        lbfgs_tolerance_grad=0.0, lbfgs_tolerance_change=0.0,
    )  # fmt: skip
    calls: list[float] = []
    models.train(CONFIG, data, recipe, progress=lambda f, p: calls.append(f))
    first_step = [f for f in calls if 0.0 < f < 0.5]
    assert len(first_step) >= 10, calls  # every evaluation within the first step
    assert calls == sorted(calls) and calls[0] == 0.0 and calls[-1] == 1.0
    evaluations = 0

    def stop(fraction: float, phase: str) -> None:
        nonlocal evaluations
        evaluations += fraction > 0
        if evaluations == 5:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt, match="cancelled"):
        models.train(CONFIG, data, recipe, progress=stop)
    assert evaluations == 5  # stopped within the first step


def test_divergence_is_reported(data: Dataset) -> None:
    regression = Dataset(data.inputs, data.inputs * 1e3, {"task": "regression"})
    config = {"architecture": "mlp", "in_features": 3, "hidden": [4], "out_features": 3}
    with pytest.raises(TrainingError, match="non-finite"):
        models.train(config, regression, Recipe(lr=1e3, epochs=50, loss="mse"))


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"optimizer": "rmsprop"}, "optimizer 'rmsprop' is not one of"),
        ({"schedule": "linear"}, "schedule 'linear' is not one of"),
        ({"loss": "hinge"}, "loss 'hinge' is not one of"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"momentum": -1}, "momentum must be a finite number >= 0"),
        ({"epochs": 2.5}, "epochs must be an integer >= 0"),
        ({"batch_size": 0}, "batch_size must be None or an integer >= 1"),
        ({"optimizer": "lbfgs", "batch_size": 4}, "'lbfgs' is full-batch"),
        ({"milestones": (-1,)}, "milestones must be epoch indices"),
    ],
)
def test_recipe_validation(kwargs: dict, fragment: str) -> None:
    with pytest.raises(TrainingError, match=None) as info:
        Recipe(**kwargs)
    assert fragment in str(info.value)


def test_recipe_dict_round_trip_and_help() -> None:
    assert Recipe.from_dict(MINIBATCH.to_dict()) == MINIBATCH
    with pytest.raises(TrainingError, match=r"unknown recipe field\(s\) \['learning_rate'\]"):
        Recipe.from_dict({"learning_rate": 0.1})
    helps = Recipe.help()
    assert set(helps) == set(MINIBATCH.to_dict()) and all(len(h) > 10 for h in helps.values())


def test_bad_train_arguments(data: Dataset, base_run: TrainRun) -> None:
    with pytest.raises(TrainingError, match="example_weights must be 24 finite values"):
        models.train(CONFIG, data, MINIBATCH, example_weights=torch.ones(23))
    with pytest.raises(TrainingError, match="example_weights must be 24 finite values"):
        models.train(CONFIG, data, MINIBATCH, example_weights=torch.full((24,), float("nan")))
    with pytest.raises(TrainingError, match=r"batch_order\[1\] is not a permutation"):
        models.train(
            CONFIG, data, MINIBATCH, batch_order=[torch.arange(24), torch.zeros(24).long()]
        )
    with pytest.raises(
        TrainingError, match=r"batch_order\[0\] must be an int64 tensor of shape \[24\]"
    ):
        models.train(CONFIG, data, MINIBATCH, batch_order=[torch.arange(10)])
    with pytest.raises(TrainingError, match="not both"):
        models.train(
            CONFIG, data, MINIBATCH, example_weights=torch.ones(24), objective=lambda *a: 0
        )
    with pytest.raises(TrainingError, match=r"dataset must be a models\.Dataset, got tuple"):
        models.train(CONFIG, (data.inputs, data.targets), MINIBATCH)
    nan_inputs = data.inputs.clone()
    nan_inputs[5, 1] = float("nan")
    with pytest.raises(
        models.DatasetError, match=r"inputs contains NaN values \(first at example 5\)"
    ):
        models.train(CONFIG, Dataset(nan_inputs, data.targets), MINIBATCH)
    with pytest.raises(TrainingError, match=r"must be a models\.Recipe"):
        models.train(CONFIG, data, MINIBATCH.to_dict())
    with pytest.raises(TrainingError, match=r"init: tensor '0\.weight' has shape"):
        models.train(
            CONFIG, data, MINIBATCH, init={**base_run.thetas, "0.weight": torch.zeros(2, 3)}
        )


def test_float64_training_starts_from_the_same_theta0(tmp_path: Path, data: Dataset) -> None:
    recipe = Recipe(optimizer="lbfgs", lr=1.0, epochs=5, weight_decay=1e-2)
    run32 = models.train(CONFIG, data, recipe)
    run64 = models.train(CONFIG, data, recipe, dtype=torch.float64)
    assert run64.dtype == torch.float64 and run32.dtype == torch.float32
    for name, value in run32.theta0.items():
        assert torch.equal(run64.theta0[name], value.double())
    warm = models.train(CONFIG, data, recipe, init=run32.thetas, epochs=0, dtype=torch.float64)
    assert warm.thetas["0.weight"].dtype == torch.float64
    run64.save(tmp_path)
    loaded = TrainRun.load(tmp_path)
    assert loaded.dtype == torch.float64
    assert torch.equal(loaded.model()[0].weight, run64.thetas["0.weight"])
    with pytest.raises(TrainingError, match="dtype must be a floating dtype"):
        models.train(CONFIG, data, recipe, dtype=torch.int64)


# ---------------------------------------------------------------- device (tests/gpu: CUDA)


def _assert_identical(a: TrainRun, b: TrainRun) -> None:
    assert _equal_states(a.theta0, b.theta0) and _equal_states(a.thetas, b.thetas)
    assert len(a.batch_order) == len(b.batch_order)
    assert all(torch.equal(p, q) for p, q in zip(a.batch_order, b.batch_order, strict=True))
    assert a.losses == b.losses


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "cpu:0"])
def test_cpu_device_is_bit_identical_to_no_device(data: Dataset, device) -> None:
    weights = torch.linspace(0.5, 1.5, len(data))
    for kwargs in ({}, {"dtype": torch.float64, "example_weights": weights}):
        plain = models.train(CONFIG, data, MINIBATCH, **kwargs)
        placed = models.train(CONFIG, data, MINIBATCH, device=device, **kwargs)
        _assert_identical(placed, plain)


def test_objective_replay_and_init_on_a_device_match(data: Dataset) -> None:
    base = models.train(CONFIG, data, MINIBATCH)
    seen: list[torch.device] = []

    def objective(model, x, t, idx):
        seen.append(idx.device)
        return torch.nn.functional.cross_entropy(model(x), t)

    kwargs = {"init": base.thetas, "batch_order": base.batch_order, "objective": objective}
    plain = models.train(CONFIG, data, MINIBATCH, **kwargs)
    placed = models.train(CONFIG, data, MINIBATCH, device="cpu", **kwargs)
    _assert_identical(placed, plain)
    assert set(seen) == {torch.device("cpu")}


@pytest.mark.parametrize(
    ("device", "fragment"),
    [
        ("gpu", "'gpu' is not a torch device name"),
        ("", "'' is not a torch device name"),
        ("cuda:x", "'cuda:x' is not a torch device name"),
        ("meta", "only 'cpu', 'cuda' and 'mps' devices are supported"),
        (3, "device must be a device name such as 'cpu'"),
    ],
)
def test_bad_device_is_a_clear_training_error(data: Dataset, device, fragment: str) -> None:
    with pytest.raises(TrainingError, match=fragment):
        models.train(CONFIG, data, MINIBATCH, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda")])
def test_cuda_without_cuda_says_so_and_where_to_get_it(data: Dataset, device) -> None:
    with pytest.raises(TrainingError, match="CUDA is not available") as info:
        models.train(CONFIG, data, MINIBATCH, device=device)
    assert "README.md" in str(info.value) and "CUDA build" in str(info.value)


def test_resolve_device_names_the_caller_and_its_error_type() -> None:
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"^--device 'tpu' is not") as info:
        resolve_device("tpu", "--device", ValueError)
    assert type(info.value) is ValueError
