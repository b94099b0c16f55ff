"""What ``verify`` and ``Responder`` accept: checkpoints or ``(model, registered config)``,
``models.Dataset`` or ``(inputs, targets)`` tensor pairs; anything else fails with an error
naming the problem. Also the minimum ``image_size`` per image architecture that
docs/models.md states, checked against ``models.build``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from influence.response import Responder, ResponseArguments, VerifyArguments, verify
from models import ARCHITECTURES, ConfigError, Dataset, DatasetError, Recipe, build, train
from tests.influence.problems import three_class_set

CONFIG = {"architecture": "mlp", "in_features": 3, "out_features": 3, "hidden": [4]}
RECIPE = Recipe(optimizer="sgd", lr=0.2, epochs=4, batch_size=8, weight_decay=1e-2, seed=1)
SMALL = VerifyArguments(epsilon=1e-3, steps=2, solver="exact")
MODELS_DOC = Path(__file__).resolve().parents[2] / "docs" / "models.md"


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, Dataset, Dataset]:
    data = three_class_set(24, seed=0)
    run = train(CONFIG, data, RECIPE, dtype=torch.float64)
    return run.model(), data, three_class_set(5, seed=1)


def test_verify_accepts_input_target_pairs(setup) -> None:
    model, data, test = setup
    expected = verify((model, CONFIG), data, test, [1, 2], arguments=SMALL)
    for train_set, test_set in [
        ((data.inputs, data.targets), (test.inputs, test.targets)),
        ([data.inputs, data.targets], test),
        (data, (test.inputs, test.targets)),
    ]:
        found = verify((model, CONFIG), train_set, test_set, [1, 2], arguments=SMALL)
        assert torch.equal(found.predicted, expected.predicted)
        assert torch.equal(found.actual, expected.actual)
        assert found.actual.abs().max() > 0  # the retraining ran on the pair


def test_responder_accepts_an_input_target_pair(setup) -> None:
    model, data, _ = setup
    run = train(CONFIG, data, RECIPE, dtype=torch.float64)
    arguments = ResponseArguments(damping=0.05)
    for make in (
        lambda d: Responder(CONFIG, model.state_dict(), RECIPE, d, arguments),
        lambda d: Responder.from_run(run, d, arguments),
    ):
        reference, paired = make(data), make((data.inputs, data.targets))
        assert isinstance(paired.dataset, Dataset) and paired.n == len(data)
        for method in ("warm", "pbrf"):
            torch.testing.assert_close(
                paired.retrain(method, [3]), reference.retrain(method, [3]), rtol=0, atol=0
            )
    cold = Responder.from_run(run, (data.inputs, data.targets), arguments).retrain("cold", [3])
    assert torch.equal(cold, Responder.from_run(run, data, arguments).retrain("cold", [3]))


@pytest.mark.parametrize(
    ("train_set", "message"),
    [
        (
            lambda d: d.inputs,
            r"train_set must be a models\.Dataset or an \(inputs, targets\) "
            r"pair of tensors, got Tensor",
        ),
        (lambda d: (d.inputs, d.targets, d.targets), r"train_set .* got a tuple of 3 items"),
        (
            lambda d: (d.inputs.numpy(), d.targets),
            r"train_set: inputs must be a torch\.Tensor, "
            r"got ndarray",
        ),
        (lambda d: {"inputs": d.inputs}, r"train_set must be .* got dict"),
    ],
)
def test_other_datasets_fail_with_a_type_error(setup, train_set, message) -> None:
    model, data, test = setup
    with pytest.raises(TypeError, match=message):
        verify((model, CONFIG), train_set(data), test, [1], arguments=SMALL)
    with pytest.raises(TypeError, match=message.replace("train_set", "dataset")):
        Responder(CONFIG, model.state_dict(), RECIPE, train_set(data))


def test_malformed_pairs_are_named(setup) -> None:
    model, data, test = setup
    with pytest.raises(DatasetError, match=r"test_set: inputs has 5 examples but targets has 4"):
        verify((model, CONFIG), data, (test.inputs, test.targets[:4]), [1], arguments=SMALL)
    bad = data.inputs.clone()
    bad[7, 1] = float("nan")
    with pytest.raises(DatasetError, match=r"train_set: inputs contains .*example 7"):
        verify((model, CONFIG), (bad, data.targets), test, [1], arguments=SMALL)


def test_verify_needs_a_registered_architecture_config(setup) -> None:
    _, data, test = setup
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
    valid = ", ".join(sorted(ARCHITECTURES))
    need = (
        r"verify retrains the model, so it needs a registered architecture config "
        rf"\(models\.ARCHITECTURES: {re.escape(valid)}\)"
    )
    with pytest.raises(ConfigError, match=rf"{need}; got a config without 'architecture'"):
        verify((model, {}), data, test, [1], arguments=SMALL)
    with pytest.raises(ConfigError, match=rf"{need}; got architecture 'sequential'"):
        verify((model, {"architecture": "sequential"}), data, test, [1], arguments=SMALL)
    with pytest.raises(ConfigError, match=r"Responder retrains the model, so it needs"):
        Responder({}, model.state_dict(), RECIPE, data)


def test_model_and_config_must_agree(setup) -> None:
    _, data, test = setup
    fits = r"state dict does not fit build\(config\) for 'mlp'"
    other = build({**CONFIG, "hidden": [5]})
    with pytest.raises(
        ConfigError, match=rf"{fits}: tensor '0\.bias' has shape \[5\], expected \[4\]"
    ):
        verify((other, CONFIG), data, test, [1], arguments=SMALL)
    single = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(
        ConfigError, match=rf"{fits}: missing tensor\(s\) \['2\.bias', '2\.weight'\]"
    ):
        verify((single, CONFIG), data, test, [1], arguments=SMALL)
    # a plain nn.Sequential is fine when it is the registered architecture's layout
    same = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    assert verify((same, CONFIG), data, test, [1], arguments=SMALL).actual.shape == (1, 5)


@pytest.mark.parametrize("source", [42, ("model.safetensors",), None])
def test_other_sources_fail_with_a_type_error(setup, source) -> None:
    _, data, test = setup
    with pytest.raises(TypeError, match=r"source must be a checkpoint path or a \(model, config"):
        verify(source, data, test, [1], arguments=SMALL)


def test_a_state_dict_is_not_a_model(setup) -> None:
    model, data, test = setup
    with pytest.raises(
        TypeError, match=r"source: the model must be a torch\.nn\.Module, got OrderedDict"
    ):
        verify((model.state_dict(), CONFIG), data, test, [1], arguments=SMALL)


def _documented_minimum_sizes() -> dict[str, int]:
    """Architecture name -> minimum ``image_size`` from docs/models.md's table."""
    found = {}
    for line in MODELS_DOC.read_text().splitlines():
        name = re.match(r"\| `(\w+)`", line)
        size = re.search(r"`image_size` ≥ (\d+)", line)
        if name and size:
            found[name.group(1)] = int(size.group(1))
    return found


def test_docs_give_each_image_architecture_its_real_minimum_size() -> None:
    documented = _documented_minimum_sizes()
    image = sorted(n for n, a in ARCHITECTURES.items() if a.input_kind == "image")
    assert sorted(documented) == image
    for name, size in documented.items():
        config = {"architecture": name, "in_channels": 1, "image_size": size, "width": 0.25}
        out = build(config)(torch.rand(2, 1, size, size))
        assert out.shape == (2, 10), name
        if size > 1:
            with pytest.raises(ConfigError, match=rf"'image_size' of {name} must be >= {size}"):
                build({**config, "image_size": size - 1})
