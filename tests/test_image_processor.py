"""RVTC image processor: the paper's worked examples, agreement with Transformers' InternVL tiling, properties."""

import random

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from devtools.bundle import Bundle

SIZE = 448


@pytest.fixture(scope="module")
def processor_class():
    return Bundle().load("image_processing_internvl_x.InternVLXImageProcessor")


@pytest.fixture(scope="module")
def tile_grid():
    return Bundle().load("image_processing_internvl_x.tile_grid")


def tiles_of(grid) -> int:
    return grid[0] * grid[1]


@pytest.mark.parametrize(
    "width,height,expected",
    [
        (80, 20, {"ratio": 4, "area": 1, "edge": 1}),  # paper §3.3: a 4:1 sliver gets 4 tiles by ratio matching
        (345, 372, {"ratio": 1, "area": 1, "edge": 1}),
        (900, 300, {"ratio": 3, "area": 2, "edge": 3}),  # area: ceil(270000 / 200704) = 2; edge: 3 · 1 = 3
        (1000, 1000, {"ratio": 4, "area": 4, "edge": 4}),  # 1×1 and 2×2 tie on ratio; the image covers > ½ of 2×2
        (2000, 500, {"ratio": 4, "area": 4, "edge": 4}),  # caps 6, 5 and 6 all admit the exact 4×1 grid
    ],
)
def test_tile_grids_of_the_worked_examples_for_each_slicing(processor_class, width, height, expected):
    processor = processor_class(image_size=SIZE, max_patches=6)
    for slicing, tiles in expected.items():
        grid = processor.get_tile_grid(height, width, {"slicing": slicing})
        assert tiles_of(grid) == tiles, (slicing, grid)
        patches = processor.get_number_of_image_patches(height, width, {"slicing": slicing})
        assert patches == tiles + (tiles > 1)


def test_ratio_grid_equals_transformers_internvl_on_random_sizes(tile_grid):
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    rng = random.Random(0)
    for _ in range(2500):
        width, height = rng.randint(1, 8000), rng.randint(1, 8000)
        max_patches = rng.choice([1, 6, 12])
        ours = tile_grid(width, height, SIZE, 1, max_patches, "ratio")
        assert ours == tuple(get_optimal_tiled_canvas((height, width), (SIZE, SIZE), 1, max_patches)), (width, height)


def test_tile_pixels_equal_transformers_internvl_processor(processor_class):
    from transformers.models.got_ocr2.image_processing_got_ocr2 import GotOcr2ImageProcessor

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    reference = GotOcr2ImageProcessor(
        crop_to_patches=True, size={"height": SIZE, "width": SIZE}, max_patches=6, image_mean=mean, image_std=std
    )
    ours = processor_class(image_size=SIZE, max_patches=6, image_mean=mean, image_std=std)
    rng = np.random.default_rng(0)
    for width, height in [(1000, 300), (500, 700), (448, 448), (90, 1200)]:
        image = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        expected = reference(image, return_tensors="pt")
        got = ours(image)
        assert got["num_patches"].tolist() == [len(expected["pixel_values"])]
        torch.testing.assert_close(got["pixel_values"], expected["pixel_values"], rtol=0, atol=1e-4)


def test_crop_to_patches_per_call_as_transformers_internvl_takes_it(processor_class):
    """ms-swift's `internvl_hf` template asks the image processor for `crop_to_patches=True` per call, as Transformers'
    InternVL processor takes it; `False` is one tile per image."""
    from transformers.models.got_ocr2.image_processing_got_ocr2 import GotOcr2ImageProcessor

    ours = processor_class(image_size=SIZE, max_patches=6)
    image = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 1000, 3), dtype=np.uint8))
    for crop in (True, False):
        reference = GotOcr2ImageProcessor(
            crop_to_patches=crop,
            size={"height": SIZE, "width": SIZE},
            max_patches=6,
            image_mean=ours.image_mean,
            image_std=ours.image_std,
        )(image, return_tensors="pt")
        got = ours(image, crop_to_patches=crop)
        assert got["num_patches"].tolist() == [len(reference["pixel_values"])] == [4 if crop else 1]
        torch.testing.assert_close(got["pixel_values"], reference["pixel_values"], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="crop_to_patches must be True or False, got 'yes'"):
        ours(image, crop_to_patches="yes")


sizes = st.tuples(st.integers(1, 3000), st.integers(1, 3000))


@settings(max_examples=300, deadline=None)
@given(size=sizes, max_patches=st.integers(1, 12))
def test_area_tiles_at_most_edge_tiles_at_most_ratio_tiles(tile_grid, size, max_patches):
    tiles = {mode: tiles_of(tile_grid(*size, SIZE, 1, max_patches, mode)) for mode in ("area", "edge", "ratio")}
    assert tiles["area"] <= tiles["edge"] <= tiles["ratio"] <= max_patches


@settings(max_examples=25, deadline=None)
@given(
    images=st.lists(sizes.map(lambda s: (s[0] % 200 + 1, s[1] % 200 + 1)), min_size=1, max_size=3),
    slicing=st.sampled_from(["ratio", "area", "edge"]),
)
def test_every_tile_is_square_and_num_patches_add_up(processor_class, images, slicing):
    processor = processor_class(image_size=28, max_patches=6, slicing=slicing)
    batch = [PIL.Image.new("RGB", size, color=(10, 200, 30)) for size in images]
    out = processor(batch)
    assert out["pixel_values"].shape[1:] == (3, 28, 28)
    assert int(out["num_patches"].sum()) == len(out["pixel_values"])
    expected = [processor.get_number_of_image_patches(h, w) for (w, h) in images]
    assert out["num_patches"].tolist() == expected


def rgb_array(height=30, width=50, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_equivalent_inputs_give_equal_pixels(processor_class):
    processor = processor_class(image_size=28, max_patches=4)
    array = rgb_array()
    reference = processor(PIL.Image.fromarray(array))["pixel_values"]
    for variant in (
        array,
        np.ascontiguousarray(array.transpose(2, 0, 1)),
        torch.from_numpy(array).permute(2, 0, 1),
        np.concatenate([array, np.full((30, 50, 1), 128, np.uint8)], axis=-1),  # RGBA: alpha dropped
        [PIL.Image.fromarray(array)],
    ):
        torch.testing.assert_close(processor(variant)["pixel_values"], reference, rtol=0, atol=1e-6)
    # Floats in [0, 1] are resized without 8-bit rounding: on a smooth image, within one level of the uint8 path
    # (on noise, uint8 bicubic clamps its intermediate pass and the two kernels legitimately differ).
    smooth = np.stack([*np.meshgrid(np.linspace(0, 255, 50), np.linspace(40, 200, 30)), np.full((30, 50), 90.0)], -1)
    smooth = smooth.round().astype(np.uint8)
    one_level = 1 / (255 * min(processor.image_std))
    as_float = processor(smooth.astype(np.float32) / 255.0)["pixel_values"]
    torch.testing.assert_close(as_float, processor(smooth)["pixel_values"], rtol=0, atol=one_level)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "1"])
def test_every_pil_mode_becomes_rgb_tiles(processor_class, mode):
    image = PIL.Image.fromarray(rgb_array()).convert("RGB")
    if mode == "I;16":
        image = PIL.Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)
        assert image.mode == "I;16"
    else:
        image = image.convert(mode)
    out = processor_class(image_size=28, max_patches=4)(image)
    assert out["pixel_values"].shape == (int(out["num_patches"][0]), 3, 28, 28)
    assert torch.isfinite(out["pixel_values"]).all()
    if mode in ("L", "I;16"):  # gray images: 16-bit scaled down equals 8-bit
        gray = processor_class(image_size=28, max_patches=4)(PIL.Image.fromarray(rgb_array()).convert("L"))
        torch.testing.assert_close(out["pixel_values"], gray["pixel_values"], rtol=0, atol=2e-2)


@pytest.mark.parametrize(
    "image,message",
    [
        (np.zeros((0, 10, 3), np.uint8), "zero size"),
        (np.zeros((10, 10, 5), np.uint8), "channel axis"),
        (np.zeros((2, 10, 10, 3), np.uint8), "got shape"),
        (np.zeros((10, 10, 3), np.int64), "image 0 of the batch has dtype torch.int64"),
        ("not an image", "image 0 of the batch: no such file 'not an image'"),
        (42, "image 0 of the batch has unsupported type int"),
        # 0..255 stored as float: a common mistake, read as [0, 1] it would give pixel values near 1000
        (np.full((10, 10, 3), 200.0, np.float32), r"values in \[200, 200\], but floating-point images are read as"),
        (torch.full((3, 10, 10), -0.5), r"values in \[-0.5, -0.5\]"),
        (np.full((10, 10, 3), np.nan, np.float32), "300 pixel values that are NaN or infinite"),
        (torch.tensor([[[0.5, float("inf")]] * 2] * 3), "6 pixel values that are NaN or infinite"),
    ],
)
def test_bad_images_are_refused(processor_class, image, message):
    with pytest.raises(ValueError, match=message):
        processor_class(image_size=28)(image)


def test_bad_options_are_refused(processor_class):
    with pytest.raises(ValueError, match="min_patches=3, max_patches=2"):
        processor_class(min_patches=3, max_patches=2)
    with pytest.raises(ValueError, match="slicing must be one of"):
        processor_class()(rgb_array(), slicing="diagonal")
    with pytest.raises(ValueError, match="unknown image processor arguments: \\['max_patch'\\]"):
        processor_class()(rgb_array(), max_patch=3)
    for option, value in (("crop_size", 3), ("do_pad", True), ("do_resize", False), ("data_format", "channels_last")):
        with pytest.raises(ValueError, match=f"{option}={value!r} does not apply"):
            processor_class()(rgb_array(), **{option: value})
    with pytest.raises(ValueError, match="size must be a square"):
        processor_class()(rgb_array(), size={"shortest_edge": 224})
    with pytest.raises(ValueError, match="resized bicubically"):
        processor_class()(rgb_array(), resample=PIL.Image.Resampling.NEAREST)


@pytest.fixture
def served(tmp_path):
    """`tmp_path` on a local HTTP server (127.0.0.1), for images given as http URLs."""
    import threading
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_images_are_scaled_not_clipped_however_they_are_given(processor_class, served, mode):
    """A 16-bit (or 32-bit) image is scaled to [0, 1] by its bit depth, the same given as an object, a path, a file
    URL, an http URL, base64, a data URI or a chat item (Transformers' own `load_image` clips it to white)."""
    import base64

    folder, base_url = served
    ramp = np.linspace(0, 65535 if mode != "F" else 1.0, 28 * 28).reshape(28, 28)
    array = ramp.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode])
    image = PIL.Image.fromarray(array)
    assert image.mode == mode
    name = "deep.png" if mode == "I;16" else "deep.tiff"  # Pillow writes 32-bit modes as TIFF
    image.save(folder / name)
    encoded = base64.b64encode((folder / name).read_bytes()).decode()
    processor = processor_class(image_size=28, max_patches=1)
    reference = processor(image)["pixel_values"]
    sources = [
        str(folder / name),
        f"file://{folder / name}",
        f"{base_url}/{name}",
        encoded,
        f"data:image/png;base64,{encoded}",
    ]
    for source in sources:
        torch.testing.assert_close(processor(source)["pixel_values"], reference, rtol=0, atol=0, msg=source)
    # unnormalised: the ramp's first pixel is black and its last white, and the middle is neither
    values = processor(image, do_normalize=False)["pixel_values"][0, 0]
    assert values[0, 0] == pytest.approx(0, abs=1e-3) and values[-1, -1] == pytest.approx(1, abs=2e-3)
    assert 0.3 < float(values.mean()) < 0.7


def test_a_float_image_that_overshoots_by_rounding_is_accepted(processor_class):
    image = np.full((20, 20, 3), 0.5, np.float32)
    image[0, 0, 0] = 1.0000001
    image[0, 1, 0] = -1e-7
    assert torch.isfinite(processor_class(image_size=28)(image)["pixel_values"]).all()
    with pytest.raises(ValueError, match="values in \\[-1e-07, 1.01\\]"):
        processor_class(image_size=28)(np.where(image > 0.9, 1.01, image).astype(np.float32))


def test_an_exif_rotated_photo_is_read_upright_as_object_and_as_path(processor_class, tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (40, 90, 3), dtype=np.uint8)
    photo = PIL.Image.fromarray(pixels)
    exif = photo.getexif()
    exif[0x0112] = 6  # turned: shown rotated by 90°
    photo.save(tmp_path / "photo.jpg", exif=exif)
    processor = processor_class(image_size=28, max_patches=6)
    upright = PIL.ImageOps.exif_transpose(PIL.Image.open(tmp_path / "photo.jpg"))
    expected = processor(upright)
    for source in (str(tmp_path / "photo.jpg"), PIL.Image.open(tmp_path / "photo.jpg")):
        out = processor(source)
        assert out["num_patches"].tolist() == expected["num_patches"].tolist()
        torch.testing.assert_close(out["pixel_values"], expected["pixel_values"], rtol=0, atol=0)


@pytest.mark.parametrize(
    "name,value",
    [
        ("image_size", 0),
        ("image_size", -8),
        ("image_size", 2.5),
        ("max_patches", 0),
        ("max_patches", -3),
        ("min_patches", 0),
    ],
)
def test_sizes_of_zero_negative_or_fractional_are_refused_by_name(processor_class, name, value):
    """A tile side of 0 crashed inside torchvision's resize; now both ways of giving it are refused by name."""
    message = rf"{name} must be a positive integer, got {value}"
    with pytest.raises(ValueError, match=message):
        processor_class(**{name: value})
    with pytest.raises(ValueError, match=message):
        processor_class()(rgb_array(), **{name: value})


def test_a_transparent_image_shows_what_it_shows_on_white(processor_class):
    """A black square on a transparent background reads as a black square on white (Transformers' image processors
    composite onto white); its hidden colour (here black everywhere) no longer shows through."""
    rgba = np.zeros((56, 56, 4), np.uint8)
    rgba[10:40, 10:40, 3] = 255  # opaque black square; the rest transparent (and black underneath)
    expected = np.full((56, 56, 3), 255, np.uint8)
    expected[10:40, 10:40] = 0
    processor = processor_class(image_size=56, max_patches=1)
    for image in (PIL.Image.fromarray(rgba, "RGBA"), PIL.Image.fromarray(rgba, "RGBA").convert("LA")):
        torch.testing.assert_close(
            processor(image)["pixel_values"], processor(expected)["pixel_values"], rtol=0, atol=0
        )


def test_the_grid_search_is_the_exhaustive_one_and_scales_to_huge_caps(tile_grid):
    """The grids are enumerated up to the cap's divisors instead of cap² pairs (max_patches=20000 took 11 s here), in
    the same order, so the same grid wins: checked against the exhaustive search for every cap up to 40."""

    def exhaustive(width, height, size, cap):
        grids = sorted(
            ((c, r) for c in range(1, cap + 1) for r in range(1, cap + 1) if c * r <= cap),
            key=lambda grid: grid[0] * grid[1],
        )
        best, best_diff = (1, 1), float("inf")
        for columns, rows in grids:
            diff = abs(width / height - columns / rows)
            if diff < best_diff:
                best, best_diff = (columns, rows), diff
            elif diff == best_diff and width * height > 0.5 * size * size * columns * rows:
                best = (columns, rows)
        return best

    rng = random.Random(0)
    for cap in range(1, 41):
        for _ in range(25):
            width, height = rng.randint(1, 3000), rng.randint(1, 3000)
            assert tile_grid(width, height, 448, 1, cap, "ratio") == exhaustive(width, height, 448, cap)
    assert tile_grid(560, 560, 56, 1, 20000, "ratio") == (14, 14)


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(image_std=[0, 0, 0]), r"image_std must be positive finite numbers .*, got \[0, 0, 0\]"),
        (dict(image_std=[0.2, -1, 0.2]), "image_std must be positive finite numbers"),
        (dict(image_mean=[0.5, float("nan"), 0.5]), "image_mean must be finite"),
        (dict(image_mean="0.5"), "image_mean must be a list of numbers, one per channel"),
    ],
)
def test_normalization_that_would_give_infinities_is_refused_by_name(processor_class, options, message):
    with pytest.raises(ValueError, match=message):
        processor_class(**options)
    with pytest.raises(ValueError, match=message):
        processor_class()(PIL.Image.new("RGB", (30, 30)), **options)
