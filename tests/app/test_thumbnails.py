"""Dataset-row thumbnails: drawn at a bounded size whatever the row's size."""

from __future__ import annotations

import io

import pytest
import torch
from matplotlib import image as mpimg

from app.thumbnails import NotAnImageError, render_png


def _size(png: bytes) -> tuple[int, ...]:
    return mpimg.imread(io.BytesIO(png), format="png").shape[:2]


@pytest.mark.parametrize(
    ("shape", "drawn"),
    [
        ([8, 8], (64, 64)),  # enlarged 8×
        ([1, 28, 28], (84, 84)),  # enlarged 3×
        ([3, 32, 20], (64, 40)),  # enlarged 2×, colour
        ([300, 300], (150, 150)),  # every 2nd pixel
        ([1, 2000, 1000], (250, 125)),  # every 8th pixel: a huge row stays cheap
    ],
)
def test_a_thumbnail_s_longer_side_is_between_64_and_256_pixels(
    shape: list[int], drawn: tuple[int, int]
) -> None:
    row = torch.rand(int(torch.tensor(shape).prod()))
    assert _size(render_png(row, shape)) == drawn


def test_the_subsampled_pixels_are_the_rows_own() -> None:
    row = torch.zeros(600, 600)
    row[::3, ::3] = 1.0  # every 3rd pixel is on: a stride of 3 keeps exactly those
    image = mpimg.imread(io.BytesIO(render_png(row.reshape(-1), [600, 600])), format="png")
    assert image.shape[:2] == (200, 200)
    assert float(image[..., 0].max()) == float(image[..., 0].min())  # one colour throughout


def test_a_row_without_an_image_layout_is_refused() -> None:
    with pytest.raises(NotAnImageError, match="input_shape \\[5, 4, 3\\]"):
        render_png(torch.zeros(60), [5, 4, 3])
