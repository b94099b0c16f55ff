"""The built-in demo: BENCHMARKS.md's model A, a digits MLP trained by this package.

Model A: MLP 64-32-32-10, tanh, 3,466 parameters, full-batch Adam, lr 1e-2, 200 steps,
seed 0, no weight decay, cross-entropy, on the built-in ``digits`` train split.
"""

from __future__ import annotations

import os
from pathlib import Path

from models.checkpoints import load_checkpoint, save_checkpoint
from models.datasets import Dataset, builtin_dataset, load_dataset, save_dataset
from models.errors import CheckpointError, DatasetError
from models.training import Recipe, TrainRun, train

__all__ = ["DEMO_CONFIG", "DEMO_RECIPE", "demo_checkpoint", "demo_run"]

DEMO_CONFIG = {
    "architecture": "mlp",
    "in_features": 64,
    "hidden": [32, 32],
    "out_features": 10,
    "activation": "tanh",
}
DEMO_RECIPE = Recipe(optimizer="adam", lr=1e-2, epochs=200, batch_size=None, seed=0)

CHECKPOINT_FILE = "digits_mlp.safetensors"
TRAIN_FILE = "digits_train.safetensors"
TEST_FILE = "digits_test.safetensors"
RUN_DIR = "digits_mlp_run"


def demo_checkpoint(directory: str | os.PathLike) -> tuple[Path, Dataset, Dataset]:
    """Ensure the demo lives in ``directory``; return ``(checkpoint path, train, test)``.

    Reuses files already there when they load and validate; otherwise trains (a few
    seconds on CPU) and writes the checkpoint, both dataset splits and the recorded
    :class:`TrainRun` (sub-directory ``digits_mlp_run``, for replays and response
    functions).
    """
    directory = Path(directory)
    checkpoint = directory / CHECKPOINT_FILE
    try:
        _, config = load_checkpoint(checkpoint)
        TrainRun.load(directory / RUN_DIR)
        if config == DEMO_CONFIG:
            return (
                checkpoint,
                load_dataset(directory / TRAIN_FILE),
                load_dataset(directory / TEST_FILE),
            )
    except (CheckpointError, DatasetError):
        pass
    train_set, test_set = builtin_dataset("digits", "train"), builtin_dataset("digits", "test")
    run = train(DEMO_CONFIG, train_set, DEMO_RECIPE)
    run.save(directory / RUN_DIR)
    save_dataset(directory / TRAIN_FILE, train_set)
    save_dataset(directory / TEST_FILE, test_set)
    save_checkpoint(checkpoint, run.model(), DEMO_CONFIG)
    return checkpoint, train_set, test_set


def demo_run(directory: str | os.PathLike) -> TrainRun:
    """The demo's recorded training run (training it first if needed)."""
    demo_checkpoint(directory)
    return TrainRun.load(Path(directory) / RUN_DIR)
