"""Property-based check of the image processor on what users pass: sizes from 1 px to 20,000 px a side, PIL modes,
numpy and torch layouts and dtypes, every slicing mode and tile cap. Each draw gives the tiling the rule says, or a
`ValueError` when the input is invalid (bad dtype, floats outside [0, 1], NaN), and never another exception."""

import math

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

from devtools.bundle import Bundle

TILE = 28  # small tiles keep every resize cheap; the tiling rule does not depend on the tile size
PIXELS = 400_000  # most pixels of one drawn image (a 20,000 px side comes with a short other side)
PIL_MODES = ["RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "I;16", "I", "F"]


@pytest.fixture(scope="module")
def processor_class():
    return Bundle().load("image_processing_internvl_x.InternVLXImageProcessor")


@st.composite
def image_sizes(draw) -> tuple[int, int]:
    """`(width, height)`: one side anywhere in 1..20,000, the other as large as the pixel budget allows."""
    long_side = draw(st.integers(1, 20_000))
    short_side = draw(st.integers(1, max(1, min(20_000, PIXELS // long_side))))
    return (long_side, short_side) if draw(st.booleans()) else (short_side, long_side)


@st.composite
def images(draw):
    """`(image, (width, height), valid)`: a PIL image, numpy array or tensor, the size it was drawn with, and whether
    its dtype and values are valid (the test reads an array's size as the processor documents it)."""
    width, height = draw(image_sizes())
    kind = draw(st.sampled_from(["pil", "numpy", "torch"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if kind == "pil":
        mode = draw(st.sampled_from(PIL_MODES))
        image = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(
            "L" if mode in ("I;16", "I", "F") else mode
        )
        if mode in ("I;16", "I", "F"):
            array = np.asarray(image, dtype={"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]) * 7
            image = PIL.Image.fromarray(array)
            assert image.mode == mode, (image.mode, mode)
        return image, (width, height), True
    channels = draw(st.sampled_from([None, 1, 3, 4]))
    layout = draw(st.sampled_from(["HWC", "CHW"])) if channels else "HW"
    dtype = draw(st.sampled_from(["uint8", "uint16", "float32", "float64", "int64", "bool"]))
    values = draw(st.sampled_from(["in range", "0..255 as float", "negative", "nan"]))
    shape = (height, width) if channels is None else (height, width, channels)
    array = rng.random(shape)
    if dtype in ("uint8", "uint16"):
        array = (array * np.iinfo(dtype).max).astype(dtype)
    elif dtype in ("int64", "bool"):
        array = (array > 0.5).astype(dtype)
    else:
        array = {
            "in range": array,
            "0..255 as float": array * 255 + 1.0,
            "negative": array - 1.5,
            "nan": np.where(array > 0.5, np.nan, array),
        }[values].astype(dtype)
    if layout == "CHW":
        array = np.ascontiguousarray(np.moveaxis(array, -1, 0))
    in_range = values == "in range" or (values == "nan" and not np.isnan(array).any())  # a draw may have no NaN
    valid = dtype in ("uint8", "uint16") or (dtype.startswith("float") and in_range)
    return (torch.from_numpy(array) if kind == "torch" else array), (width, height), valid


def expected_layout(image) -> tuple[int, int] | None:
    """`(width, height)` of an array as Transformers' rule reads it, which the processor documents (None: no channel
    axis found): an axis of 1, 3 or 4 first, else last; first when both could be."""
    shape = tuple(image.shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if shape[0] in (1, 3, 4):
        return shape[2], shape[1]
    if shape[-1] in (1, 3, 4):
        return shape[1], shape[0]
    return None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    drawn=images(),
    slicing=st.sampled_from(["ratio", "area", "edge"]),
    max_patches=st.integers(1, 12),
    thumbnail=st.booleans(),
)
def test_any_image_gives_the_rule_s_tiling_or_a_value_error(processor_class, drawn, slicing, max_patches, thumbnail):
    image, _, valid = drawn
    if isinstance(image, PIL.Image.Image):
        width, height = image.size
    else:
        layout = expected_layout(image)
        valid = valid and layout is not None
        width, height = layout or (0, 0)
    processor = processor_class(image_size=TILE, max_patches=max_patches, slicing=slicing, use_thumbnail=thumbnail)
    if not valid:
        with pytest.raises(ValueError, match="image 0 of the batch"):
            processor(image)
        return
    out = processor(image)
    columns, rows = processor.get_tile_grid(height, width)
    tiles = columns * rows
    # The rule: InternVL's matching (Transformers' own implementation in ratio mode) under RVTC's caps.
    if slicing == "ratio":
        assert (columns, rows) == tuple(get_optimal_tiled_canvas((height, width), (TILE, TILE), 1, max_patches))
    cap = {
        "ratio": max_patches,
        "area": math.ceil(width * height / TILE**2),
        "edge": math.ceil(width / TILE) * math.ceil(height / TILE),
    }[slicing]
    assert 1 <= tiles <= max(1, min(max_patches, cap))
    expected = tiles + int(thumbnail and tiles > 1)
    assert out["num_patches"].tolist() == [expected]
    assert out["pixel_values"].shape == (expected, 3, TILE, TILE)
    assert torch.isfinite(out["pixel_values"]).all()
