"""Errors raised by the models package (all are ``ValueError``: they mean bad input)."""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "DatasetError", "TrainingError"]


class ConfigError(ValueError):
    """An architecture config names an unknown architecture or has bad arguments."""


class CheckpointError(ValueError):
    """A checkpoint file or buffer is malformed, unsafe, or does not match its config."""


class DatasetError(ValueError):
    """A dataset file or tensor pair is malformed, unsafe, or inconsistent."""


class TrainingError(ValueError):
    """A training recipe or run is invalid, or training produced non-finite values."""
