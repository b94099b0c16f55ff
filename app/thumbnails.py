"""PNG thumbnails of image-like dataset rows, for the dashboard.

A row is drawn when the dataset's ``input_shape`` metadata is ``[H, W]``, ``[1, H, W]`` or
``[3, H, W]`` (channels first, as the models take them); values are scaled to the row's
own min-max range; small images are enlarged by pixel repetition and large ones reduced
by taking every k-th pixel, so a thumbnail's longer side is between 64 and 256 pixels
(a huge row costs no more to draw than a small one).
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib import image as mpimg
from torch import Tensor

__all__ = ["NotAnImageError", "image_shape", "render_png"]

_MIN_SIDE = 64  # pixels; smaller images are scaled up by an integer factor
_MAX_SIDE = 256  # pixels; larger images are subsampled by an integer stride


class NotAnImageError(ValueError):
    """The dataset's rows are not images (their input_shape has no H × W layout)."""


def image_shape(input_shape: list[int] | None) -> tuple[int, ...]:
    """The (H, W) or (C, H, W) shape to draw, or NotAnImageError naming the shape."""
    shape = tuple(input_shape or ())
    if len(shape) == 2 or (len(shape) == 3 and shape[0] in (1, 3)):
        return shape
    raise NotAnImageError(
        f"input_shape {list(shape)} is not an image layout ([H, W], [1, H, W] or [3, H, W])"
    )


def render_png(row: Tensor, input_shape: list[int] | None) -> bytes:
    """PNG bytes of one dataset row drawn with ``input_shape``."""
    shape = image_shape(input_shape)
    pixels = row.detach().reshape(shape).numpy()
    if pixels.ndim == 3:
        pixels = pixels[0] if pixels.shape[0] == 1 else np.moveaxis(pixels, 0, -1)
    stride = -(-max(pixels.shape[:2]) // _MAX_SIDE)
    pixels = pixels[::stride, ::stride].astype(np.float64)
    low, high = float(pixels.min()), float(pixels.max())
    pixels = (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
    factor = max(1, -(-_MIN_SIDE // max(pixels.shape[:2])))
    pixels = pixels.repeat(factor, axis=0).repeat(factor, axis=1)
    buffer = io.BytesIO()
    mpimg.imsave(buffer, pixels, cmap="gray_r", vmin=0.0, vmax=1.0, format="png")
    return buffer.getvalue()
