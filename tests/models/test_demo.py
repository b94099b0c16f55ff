"""The demo checkpoint: BENCHMARKS.md's model A, trained by this package, reused when present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import models


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo")


def test_demo_is_model_a_and_fits(demo_dir: Path) -> None:
    path, train, test = models.demo_checkpoint(demo_dir)
    model, config = models.load_checkpoint(path)
    assert config == models.DEMO_CONFIG
    assert sum(p.numel() for p in model.parameters()) == 3466
    assert (len(train), len(test)) == (1437, 360)
    assert train.id == models.builtin_dataset("digits").id
    with torch.no_grad():
        train_acc = (model(train.inputs).argmax(1) == train.targets).float().mean()
        test_acc = (model(test.inputs).argmax(1) == test.targets).float().mean()
    assert train_acc > 0.99 and test_acc > 0.93  # measured: 1.000 and 0.964


def test_demo_is_reused_and_its_run_replays(demo_dir: Path) -> None:
    path, _, _ = models.demo_checkpoint(demo_dir)
    first_id = models.checkpoint_id(*models.load_checkpoint(path))
    stamp = path.stat().st_mtime_ns
    again, _, _ = models.demo_checkpoint(demo_dir)
    assert again == path and path.stat().st_mtime_ns == stamp
    run = models.demo_run(demo_dir)
    assert models.checkpoint_id(run.model(), run.config) == first_id
    assert run.recipe == models.DEMO_RECIPE and len(run.batch_order) == 200


def test_corrupt_demo_is_rebuilt(demo_dir: Path) -> None:
    path, _, _ = models.demo_checkpoint(demo_dir)
    good = models.checkpoint_id(*models.load_checkpoint(path))
    path.write_bytes(b"PK\x03\x04 not a checkpoint")
    rebuilt, _, _ = models.demo_checkpoint(demo_dir)
    assert models.checkpoint_id(*models.load_checkpoint(rebuilt)) == good
