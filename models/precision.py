"""Full float32 precision on CUDA while influence or retraining work runs.

torch computes float32 cuDNN convolutions in TF32 by default (a 10-bit mantissa), and
float32 matmuls too once ``torch.set_float32_matmul_precision("high")`` is set. Influence
scores, curvature products and the response functions' ε-sized retraining differences
need IEEE float32 (docs/engine.md, float32 accuracy); on the CPU nothing changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["ieee_float32"]


@contextmanager
def ieee_float32() -> Iterator[None]:
    """Turn TF32 off for cuDNN convolutions and float32 matmuls for the duration (also
    usable as a decorator), restoring the caller's settings afterwards. The settings are
    process-wide: threads running other torch work meanwhile see them too."""
    cudnn = torch.backends.cudnn
    matmul = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with cudnn.flags(
            enabled=cudnn.enabled,
            benchmark=cudnn.benchmark,
            benchmark_limit=cudnn.benchmark_limit,
            deterministic=cudnn.deterministic,
            allow_tf32=False,
        ):
            yield
    finally:
        torch.set_float32_matmul_precision(matmul)
