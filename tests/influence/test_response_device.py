"""``ResponseArguments.device`` and the experiments' ``--device`` on the CPU: validation,
bit-identical results for ``device="cpu"``, and the device reaching the base training
(tests/gpu/test_response_cuda.py runs the responses on CUDA)."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import influence.experiments.config
import influence.response
from influence.experiments.__main__ import main
from influence.experiments.config import ExperimentConfig
from influence.response import Responder, ResponseArguments, VerifyArguments, verify
from models import Dataset, Recipe, train

CONFIG = {"architecture": "mlp", "in_features": 3, "out_features": 3, "hidden": [4],
          "activation": "tanh"}  # fmt: skip
RECIPE = Recipe(optimizer="sgd", lr=0.2, epochs=4, batch_size=8, weight_decay=1e-2, seed=1)
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
TINY = {
    "name": "tiny-cancer",
    "dataset": "breast_cancer",
    "train_size": 20,
    "model": {"architecture": "logistic_regression", "in_features": 30, "num_classes": 2},
    "recipe": {"optimizer": "lbfgs", "epochs": 2, "weight_decay": 0.01, "loss": "bce"},
}


@pytest.fixture(scope="module")
def data() -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, generator=g, dtype=torch.float64)
    t = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return Dataset(x, t, {"task": "classification", "num_classes": 3})


def test_device_field_defaults_to_cpu_with_help() -> None:
    assert ResponseArguments().device == "cpu"
    (device,) = [f for f in fields(ResponseArguments) if f.name == "device"]
    assert "'cuda'" in device.metadata["help"]


@pytest.mark.parametrize(
    ("device", "fragment"),
    [
        ("gpu", "device 'gpu' is not a torch device name"),
        ("meta", "device 'meta': only 'cpu', 'cuda' and 'mps'"),
        (None, "device must be a string"),
        (torch.device("cpu"), "device must be a string"),
    ],
)
def test_bad_device_is_a_value_error_naming_the_field(device, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        ResponseArguments(device=device)


@NO_CUDA
def test_cuda_without_cuda_is_refused_up_front() -> None:
    with pytest.raises(ValueError, match="device 'cuda': CUDA is not available") as info:
        ResponseArguments(device="cuda")
    assert "README.md" in str(info.value)
    with pytest.raises(ValueError, match="config 'response': device 'cuda:1': CUDA is not"):
        ExperimentConfig.from_dict({**TINY, "response": {"device": "cuda:1"}})


def test_responder_and_verify_retrain_on_their_device(data: Dataset, monkeypatch) -> None:
    seen: list[object] = []
    real_train = influence.response.train

    def spy(*args, **kwargs):
        seen.append(kwargs["device"])
        return real_train(*args, **kwargs)

    monkeypatch.setattr(influence.response, "train", spy)
    run = train(CONFIG, data, RECIPE, dtype=torch.float64)
    responder = Responder.from_run(run, data, ResponseArguments(damping=1e-2, device="cpu:0"))
    for method in ("cold", "pbrf", "two_stage"):
        responder.retrain(method, [3])
    assert seen == [torch.device("cpu", 0)] * 4  # two_stage retrains twice
    seen.clear()
    model = run.model()
    result = verify((model, run.config), data, data.subset(torch.arange(3)), [1, 2],
                    loss=RECIPE.loss, damping=1e-2, device="cpu:0")  # fmt: skip
    assert seen == [torch.device("cpu", 0)] * 2 and result.actual.device.type == "cpu"


def test_device_cpu_is_bit_identical(data: Dataset, monkeypatch) -> None:
    """Responses, influence and ``verify`` on ``device="cpu"`` equal, bit for bit, those on
    ``"cpu:0"`` and those of retraining with ``models.train(device=None)`` (no device)."""
    run = train(CONFIG, data, RECIPE, dtype=torch.float64)
    model, test = run.model(), data.subset(torch.arange(4))

    def results(device: str) -> list[torch.Tensor]:
        arguments = ResponseArguments(damping=1e-2, device=device)
        responder = Responder.from_run(run, data, arguments)
        thetas = [responder.retrain(m, [3]) for m in ("cold", "warm", "pbrf", "two_stage")]
        found = verify((model, run.config), data, test, [1, 2], loss=RECIPE.loss,
                       damping=1e-2, device=device,
                       arguments=VerifyArguments(steps=3, solver="exact"))  # fmt: skip
        return [*thetas, responder.influence([[3], [5]])[0], found.predicted, found.actual]

    baseline = results("cpu")
    variants = {"cpu:0": results("cpu:0")}
    real_train = influence.response.train
    monkeypatch.setattr(
        influence.response, "train", lambda *a, **kw: real_train(*a, **{**kw, "device": None})
    )
    variants["train(device=None)"] = results("cpu")
    for name, found in variants.items():
        for k, (a, b) in enumerate(zip(found, baseline, strict=True)):
            assert a.device.type == "cpu" and torch.equal(a, b), (name, k)


def test_train_base_uses_the_response_device(monkeypatch) -> None:
    seen = {}

    def fake_train(*args, **kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(influence.experiments.config, "train", fake_train)
    config = ExperimentConfig.from_dict({**TINY, "response": {"device": "cpu"}})
    config.train_base(config.datasets()[0])
    assert seen["device"] == "cpu" and seen["dtype"] == torch.float64


def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def test_load_device_overrides_the_configs_response_device(tmp_path: Path) -> None:
    path = _write(tmp_path, {**TINY, "response": {"device": "cuda:7", "damping": 0.01}})
    config = ExperimentConfig.load(path, device="cpu")
    assert config.response.device == "cpu" and config.response.damping == 0.01
    plain = _write(tmp_path, TINY)
    assert ExperimentConfig.load(plain).response.device == "cpu"
    assert ExperimentConfig.load(plain, device="cpu").response.device == "cpu"


def test_cli_device_flag(tmp_path: Path, capsys) -> None:
    path, out = _write(tmp_path, TINY), tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["decomposition", "--config", str(path), "--out", str(out), "--device", "gpu"])
    assert exit_info.value.code == 2
    assert "--device 'gpu' is not a torch device name" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--device" in capsys.readouterr().out
