"""Experiment configs, mislabel detection pieces, and the CLI end to end on tiny configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from influence.experiments.__main__ import main
from influence.experiments.config import ExperimentConfig
from influence.experiments.correlation import CorrelationResult, correlate
from influence.experiments.mislabel import (
    MislabelResult,
    corrupt_labels,
    detect_mislabels,
    detection_curve,
    pbrf_self_influence,
)
from influence.experiments.sweep import run_decomposition, sweep
from influence.response import Responder, ResponseArguments
from influence.solvers import Exact
from models import Dataset

TINY = {
    "name": "tiny-cancer",
    "dataset": "breast_cancer",
    "train_size": 40,
    "model": {"architecture": "logistic_regression", "in_features": 30, "num_classes": 2},
    "recipe": {"optimizer": "lbfgs", "lr": 1.0, "epochs": 4, "weight_decay": 0.01,
               "loss": "bce", "lbfgs_max_iter": 50},
    "decomposition": {"num_points": 2, "seed": 0},
    "correlation": {"num_points": 3, "num_test": 4, "seed": 0, "methods": ["warm", "pbrf"]},
    "sweep": {"parameter": "damping", "values": [0.001, 0.1]},
}  # fmt: skip


def test_config_validation_names_the_problem() -> None:
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['colour'\]"):
        ExperimentConfig.from_dict({**TINY, "colour": "red"})
    with pytest.raises(ValueError, match="missing key"):
        ExperimentConfig.from_dict({"name": "x"})
    with pytest.raises(ValueError, match=r"config 'decomposition'.*num_points"):
        ExperimentConfig.from_dict({**TINY, "decomposition": {"num_points": 0}})
    with pytest.raises(ValueError, match=r"config 'sweep'.*parameter"):
        ExperimentConfig.from_dict({**TINY, "sweep": {"parameter": "colour", "values": [1]}})


@pytest.mark.parametrize(
    ("section", "values", "field"),
    [
        ("decomposition", {"cold_start": "false"}, "cold_start"),
        ("decomposition", {"proximity_first_order": 1}, "proximity_first_order"),
        ("decomposition", {"num_points": True}, "num_points"),
        ("decomposition", {"seed": False}, "seed"),
        ("correlation", {"num_test": True}, "num_test"),
        ("correlation", {"seed": "0"}, "seed"),
        ("mislabel", {"seed": "0"}, "seed"),
        ("mislabel", {"fraction": "0.1"}, "fraction"),
        ("mislabel", {"pbrf_points": True}, "pbrf_points"),
        ("response", {"damping": "1e-3"}, "damping"),
        ("response", {"epsilon": "x"}, "epsilon"),
        ("response", {"epochs": True}, "epochs"),
        ("response", {"lbfgs_steps": 2.5}, "lbfgs_steps"),
        ("response", {"cg_max_iter": 2.5}, "cg_max_iter"),
        ("response", {"lissa_depth": 2.5}, "lissa_depth"),
        ("response", {"lissa_repeats": True}, "lissa_repeats"),
        ("sweep", {"parameter": "epochs", "values": [2.9]}, "epochs"),
        ("sweep", {"parameter": "damping", "values": "0.1"}, "values"),
        ("sweep", {"parameter": "damping", "values": [0.1, -1]}, "damping"),
    ],
)
def test_config_rejects_wrong_types_naming_the_field(
    section: str, values: dict, field: str
) -> None:
    # Booleans, strings and fractions that used to run as something else (true as 1,
    # "false" as true, 2.5 L-BFGS steps, epochs 2.9 as 2) are errors naming the field.
    with pytest.raises(ValueError, match=rf"config '{section}'.*{field}"):
        ExperimentConfig.from_dict({**TINY, section: values})


def test_config_rejects_sweep_values_it_would_truncate() -> None:
    mlp = {"architecture": "mlp", "in_features": 30, "out_features": 1, "hidden": [8, 8]}
    sweep = {"parameter": "width", "values": [4, 4.7]}
    with pytest.raises(ValueError, match=r"config 'sweep'.*width.*4\.7"):
        ExperimentConfig.from_dict({**TINY, "model": mlp, "sweep": sweep})
    config = ExperimentConfig.from_dict({**TINY, "model": mlp})
    with pytest.raises(ValueError, match=r"width must be an integer, got 4\.7"):
        config.with_value("width", 4.7)
    assert config.with_value("depth", 3.0).model["hidden"] == [8, 8, 8]


def test_base_training_reports_progress() -> None:
    calls: list[tuple[float, str]] = []
    run_decomposition(ExperimentConfig.from_dict(TINY), lambda f, phase: calls.append((f, phase)))
    training = [f for f, phase in calls if phase == "train"]
    assert len(training) > 1 and max(training) <= 0.2
    assert min(f for f, phase in calls if phase != "train") >= 0.2
    assert calls[-1][0] == pytest.approx(1.0)


def test_sweep_values_edit_the_right_field() -> None:
    mlp = {"architecture": "mlp", "in_features": 30, "out_features": 1, "hidden": [8, 8]}
    config = ExperimentConfig.from_dict({**TINY, "model": mlp})
    assert config.with_value("width", 16).model["hidden"] == [16, 16]
    assert config.with_value("depth", 3).model["hidden"] == [8, 8, 8]
    assert config.with_value("epochs", 7).recipe.epochs == 7
    assert config.with_value("weight_decay", 0.5).recipe.weight_decay == 0.5
    assert config.with_value("damping", 0.2).response.damping == 0.2
    assert config.with_value("removed_fraction", 0.3).decomposition.group_fraction == 0.3


def test_corrupt_labels_changes_exactly_the_chosen_labels() -> None:
    targets = torch.arange(50) % 5
    data = Dataset(torch.zeros(50, 2), targets, {"task": "classification", "num_classes": 5})
    corrupted_set, chosen = corrupt_labels(data, 0.2, seed=3)
    changed = (corrupted_set.targets != targets).nonzero().reshape(-1)
    assert torch.equal(changed, chosen) and len(chosen) == 10
    assert int(corrupted_set.targets.max()) < 5
    again, chosen_again = corrupt_labels(data, 0.2, seed=3)
    assert torch.equal(again.targets, corrupted_set.targets) and torch.equal(chosen, chosen_again)


def test_detection_curve_counts_found_labels() -> None:
    curve = detection_curve(torch.tensor([4, 0, 2, 1, 3]), torch.tensor([2, 4]), 5)
    assert curve.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0, 1.0]


def test_found_at_reads_the_curve_after_the_nearest_whole_number_inspected() -> None:
    found = detection_curve(torch.tensor([4, 0, 2, 1, 3]), torch.tensor([2, 4]), 5)
    steps = torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8, 1.0], dtype=torch.float64)
    result = MislabelResult([2, 4], {"found": found, "steps": steps}, {})
    # N = 5: inspecting 0.4 of the data is 2 points, 0.6 is 3, 0.35 (1.75 points) is 2.
    for inspected, k in ((0.0, 0), (0.2, 1), (0.35, 2), (0.4, 2), (0.6, 3), (0.8, 4), (1.0, 5)):
        expected = {"found": [0.0, 0.5, 0.5, 1.0, 1.0, 1.0][k], "steps": k / 5}
        assert result.found_at(inspected) == pytest.approx(expected, abs=1e-15), inspected
    assert result.to_dict()["found_at"]["0.20"] == pytest.approx({"found": 0.5, "steps": 0.2})


def test_correlation_row_slopes_and_leverage_note() -> None:
    predicted = torch.tensor([[1.0, -2.0, 0.5], [0.1, 0.2, -0.3]])
    actual = {"pbrf": predicted * torch.tensor([[4.0], [1.0]])}
    result = CorrelationResult([9, 3], [0, 1, 2], predicted, actual, {}, [0.75, 0.01])
    assert result.row_slopes("pbrf") == pytest.approx([4.0, 1.0])
    assert result.to_dict()["row_slopes"]["pbrf"] == pytest.approx([4.0, 1.0])
    assert "train index 9, ρ = 0.750, 1/(1−ρ) = 4.00; its PBRF/influence slope is 4.00" in (
        result.markdown()
    )


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("command", ["decomposition", "correlation", "sweep"])
def test_cli_writes_json_markdown_and_figures(tmp_path: Path, command: str) -> None:
    out = tmp_path / "out"
    assert main([command, "--config", str(_write(tmp_path, TINY)), "--out", str(out)]) == 0
    data = json.loads((out / f"{command}.json").read_text())
    assert (out / f"{command}.md").read_text().startswith(f"**tiny-cancer: {command}")
    assert (out / f"{command}.png").stat().st_size > 0
    assert (out / f"{command}.svg").exists() == (command != "correlation")
    config = ExperimentConfig.from_dict(TINY)
    # The CLI's numbers are the library's for the same config.
    if command == "decomposition":
        assert set(data["summary"]) == {
            "warm_start", "proximity", "non_convergence", "linearization", "solver"
        }  # fmt: skip
        assert len(data["leverage"]) == 2 and all(0 < r < 1 for r in data["leverage"])
        library = run_decomposition(config).summary()
        assert data["summary"]["proximity"]["mean"] == pytest.approx(
            library["proximity"]["mean"], rel=1e-12
        )
        assert data["summary"]["proximity"]["mean"] > 0
    elif command == "correlation":
        assert set(data["statistics"]) == {"warm", "pbrf"}
        train_set, test_set = config.datasets()
        responder = Responder.from_run(config.train_base(train_set), train_set, config.response)
        library = correlate(responder, test_set, config.correlation).statistics()
        assert data["statistics"]["pbrf"]["pearson"] == pytest.approx(
            library["pbrf"]["pearson"], rel=1e-12
        )
    else:
        assert data["values"] == [0.001, 0.1] and len(data["curves"]["proximity"]["mean"]) == 2
        library = sweep(config).curves()
        assert data["curves"]["proximity"]["mean"] == pytest.approx(
            library["proximity"]["mean"], rel=1e-12
        )


def test_cli_is_deterministic(tmp_path: Path) -> None:
    path = _write(tmp_path, TINY)
    for name in ("a", "b"):
        main(["decomposition", "--config", str(path), "--out", str(tmp_path / name)])
    first, second = (json.loads((tmp_path / n / "decomposition.json").read_text()) for n in "ab")
    assert first["gaps"] == second["gaps"]


TINY_DIGITS = {
    "name": "tiny-digits",
    "dataset": "digits",
    "train_size": 200,
    "model": {"architecture": "logistic_regression", "in_features": 64, "num_classes": 10},
    "recipe": {"optimizer": "lbfgs", "epochs": 3, "weight_decay": 0.01, "lbfgs_max_iter": 30},
    "mislabel": {"fraction": 0.1, "seed": 0},
}


def test_cli_mislabel_on_digits_subset(tmp_path: Path) -> None:
    config = TINY_DIGITS
    out = tmp_path / "out"
    main(["mislabel", "--config", str(_write(tmp_path, config)), "--out", str(out)])
    data = json.loads((out / "mislabel.json").read_text())
    assert len(data["corrupted"]) == 20
    found = data["found_at"]["0.20"]
    # Corrupted labels are hard to fit: both informed rankings beat inspection at random.
    assert found["self-influence"] > 0.5 and found["training loss"] > 0.5
    assert data["curves"]["random"][-1] == 1.0
    assert 0.05 < found["random"] < 0.5
    library = detect_mislabels(ExperimentConfig.from_dict(config)).found_at(0.2)
    assert found == pytest.approx(library, rel=1e-12)


def test_pbrf_self_influence_is_self_influence_to_first_order() -> None:
    # For small ε the PBRF's increase of L_i is ε ∇L_iᵀ(G+λI)⁻¹∇L_i (exact dense solve).
    config = ExperimentConfig.from_dict(TINY)
    train_set, _ = config.datasets()
    n = len(train_set)
    arguments = ResponseArguments(damping=1e-3, epsilon=1e-3 / n, optimizer="lbfgs")
    responder = Responder.from_run(config.train_base(train_set), train_set, arguments)
    points = torch.tensor([7, 21])  # gains ≈ 1e-4; point 0's 3e-8 is at L-BFGS's floor
    phases = []
    gains = pbrf_self_influence(responder, points, lambda f, phase: phases.append((f, phase)))
    expected = 1e-3 * responder.engine.self_influence(Exact())[points]
    assert torch.allclose(gains, expected.to(gains.dtype), rtol=5e-3, atol=0)  # measured 7e-4
    assert phases[-1] == (1.0, "pbrf_self_influence")
    assert {phase for _, phase in phases} == {"pbrf_self_influence"}
    fractions = [f for f, _ in phases]
    assert fractions == sorted(fractions)
    assert any(0 < f < 0.5 for f in fractions)  # within the first point's PBRF retraining


def test_mislabel_pbrf_ranking_reorders_only_the_top_of_the_loss_list(tmp_path: Path) -> None:
    config = {
        **TINY_DIGITS,
        "train_size": 60,
        "response": {"optimizer": "lbfgs", "lbfgs_steps": 3},
        "mislabel": {"fraction": 0.1, "seed": 0, "pbrf_points": 5},
    }
    phases: list[str] = []
    result = detect_mislabels(
        ExperimentConfig.from_dict(config), lambda f, phase: phases.append(phase)
    )
    pbrf = result.curves["PBRF self-influence (top of loss list)"]
    loss = result.curves["training loss"]
    pairs = result.details["pbrf_self_influence"]
    assert len(pairs["indices"]) == len(pairs["pbrf"]) == len(pairs["influence"]) == 5
    # The 5 highest-loss points in decreasing PBRF self-influence, then the loss order.
    head = torch.tensor(pairs["indices"])
    ranked = head[torch.tensor(pairs["pbrf"]).argsort(descending=True, stable=True)]
    expected = detection_curve(ranked, torch.tensor(result.corrupted), 60)
    assert torch.equal(pbrf[:6], expected[:6]) and torch.equal(pbrf[5:], loss[5:])
    assert "pbrf_self_influence" in phases and result.details["pbrf_points"] == 5
    # the corrupted-label training and the self-influence solve report as they go
    assert phases.count("train") > 1 and phases.count("self_influence") > 1
    # The PBRF optimum lowers its objective below θˢ's 0, so removal raises L_i.
    assert min(pairs["pbrf"]) > 0
    assert "PBRF vs influence self-influence on the 5 highest-loss" in result.markdown()


def test_shipped_configs_are_valid() -> None:
    configs = sorted((Path(__file__).parents[2] / "influence" / "configs").glob("*.json"))
    assert len(configs) >= 5
    for path in configs:
        config = ExperimentConfig.load(path)
        assert config.name and config.recipe.epochs >= 1, path
