"""The experiments CLI on mistakes: one-line errors with exit status 2 before any
training, clean output folders, interrupts, provenance in the JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import influence.experiments.__main__ as cli
from influence.experiments.config import ExperimentConfig
from models import TrainingError
from tests.influence.test_experiments import TINY, TINY_DIGITS

PROG = "python -m influence.experiments: error: "


def _config(tmp_path: Path, data: Any) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return str(path)


def _status(argv: list[str]) -> int:
    """The CLI's exit status (errors exit as argparse's do)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    return exit_info.value.code


def _no_training(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("trained before the config was checked")


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    """stderr's one line besides the progress bar; no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "%|" not in line]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(PROG), err
    return lines[0]


MISTAKES = [
    ("decomposition", {**TINY, "dataset": "mnistt"}, "'dataset'"),
    ("decomposition", {**TINY, "model": {**TINY["model"], "architecture": "resnet"}}, "'model'"),
    ("decomposition", {**TINY, "model": {**TINY["model"], "in_features": 31}}, "'model'"),
    ("decomposition", {**TINY, "dataset": "diabetes", "model": {**TINY["model"],
     "in_features": 10}, "recipe": {**TINY["recipe"], "loss": "cross_entropy"}}, "recipe.loss"),
    ("mislabel", {**TINY_DIGITS, "model": {**TINY_DIGITS["model"], "num_classes": 5}}, "'model'"),
    ("mislabel", {**TINY, "dataset": "diabetes", "model": {"architecture": "mlp",
     "in_features": 10, "out_features": 1, "hidden": [4]}, "recipe": {**TINY["recipe"],
     "loss": "mse"}}, "classification"),
    ("decomposition", {**TINY, "decomposition": {"num_points": 41}}, "num_points = 41"),
    ("correlation", {**TINY, "correlation": {"num_test": 1000}}, "num_test"),
    ("sweep", {**TINY, "sweep": {"parameter": "damping", "values": [0.1, -1]}}, "'sweep'"),
    ("sweep", {key: v for key, v in TINY.items() if key != "sweep"}, "'sweep'"),
    ("decomposition", [TINY], "config must be a JSON object"),
]  # fmt: skip


@pytest.mark.parametrize(("command", "data", "names"), MISTAKES)
def test_cli_mistakes_fail_in_one_line_before_training(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    data: Any,
    names: str,
) -> None:
    monkeypatch.setattr("influence.experiments.config.train", _no_training)
    out = tmp_path / "out"
    assert _status([command, "--config", _config(tmp_path, data), "--out", str(out)]) == 2
    assert names in _one_line_error(capsys)
    assert not out.exists()


def test_cli_bad_threads_and_out_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("influence.experiments.config.train", _no_training)
    config = _config(tmp_path, TINY)
    afile = tmp_path / "afile"
    afile.write_text("")
    base = ["decomposition", "--config", config, "--out"]
    assert _status([*base, str(tmp_path / "out"), "--threads", "0"]) == 2
    assert "--threads" in _one_line_error(capsys)
    assert _status([*base, str(afile)]) == 2
    assert "--out" in _one_line_error(capsys)
    assert _status([*base, str(afile / "sub")]) == 2
    assert "--out" in _one_line_error(capsys)


def test_cli_run_errors_and_interrupts_leave_no_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    stale = [out / f"decomposition.{suffix}" for suffix in ("json", "md", "png", "svg")]
    for path in stale:
        path.write_text("stale")
    (out / "correlation.json").write_text("{}")
    argv = ["decomposition", "--config", _config(tmp_path, TINY), "--out", str(out)]

    def fail(*args: Any) -> None:
        raise TrainingError("objective is not finite at epoch 3")

    monkeypatch.setattr(cli, "run_decomposition", fail)
    assert _status(argv) == 2
    assert _one_line_error(capsys) == PROG + "objective is not finite at epoch 3"
    # The stale outputs of this command are gone; another command's are kept.
    assert sorted(p.name for p in out.iterdir()) == ["correlation.json"]

    def interrupt(*args: Any) -> None:
        (out / ".decomposition.partial" / "decomposition.png").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_decomposition", interrupt)
    assert _status(argv) == 130
    assert capsys.readouterr().err.strip().endswith("interrupted; no results written")
    assert sorted(p.name for p in out.iterdir()) == ["correlation.json"]


def test_cli_json_records_the_config_and_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["decomposition", "--config", _config(tmp_path, TINY), "--out", str(out)]
    assert cli.main(argv) == 0
    data = json.loads((out / "decomposition.json").read_text())
    config = ExperimentConfig.from_dict(TINY)
    assert data["config"] == json.loads(json.dumps(config.to_dict()))
    assert ExperimentConfig.from_dict(data["config"]) == config
    assert data["command_line"] == "python -m influence.experiments " + " ".join(argv)
    assert sorted(p.name for p in out.iterdir()) == [
        f"decomposition.{suffix}" for suffix in ("json", "md", "png", "svg")
    ]
