"""Architectures, safe checkpoints, datasets and recorded training runs.

The bottom layer of influence-service: pure PyTorch, no web or queue code.
"""

from models.architectures import (
    ARCHITECTURES,
    Architecture,
    build,
    example_input,
    input_shape,
    register,
)
from models.checkpoints import (
    checkpoint_id,
    load_checkpoint,
    load_checkpoint_bytes,
    save_checkpoint,
)
from models.datasets import (
    BUILTIN_DATASETS,
    Dataset,
    builtin_dataset,
    load_dataset,
    load_dataset_bytes,
    save_dataset,
    validate_dataset,
)
from models.demo import DEMO_CONFIG, DEMO_RECIPE, demo_checkpoint, demo_run
from models.errors import CheckpointError, ConfigError, DatasetError, TrainingError
from models.training import Progress, Recipe, TrainRun, train

__all__ = [
    "ARCHITECTURES",
    "BUILTIN_DATASETS",
    "DEMO_CONFIG",
    "DEMO_RECIPE",
    "Architecture",
    "CheckpointError",
    "ConfigError",
    "Dataset",
    "DatasetError",
    "Progress",
    "Recipe",
    "TrainRun",
    "TrainingError",
    "build",
    "builtin_dataset",
    "checkpoint_id",
    "demo_checkpoint",
    "demo_run",
    "example_input",
    "input_shape",
    "load_checkpoint",
    "load_checkpoint_bytes",
    "load_dataset",
    "load_dataset_bytes",
    "register",
    "save_checkpoint",
    "save_dataset",
    "train",
    "validate_dataset",
]
