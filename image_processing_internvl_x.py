# Copyright 2026 The InternVL-X for Transformers authors.
# Licensed under the Apache License, Version 2.0.
"""InternVL-X image processor: InternVL's dynamic tiling with the paper's RVTC tile caps (area / edge matching)."""

import math
from functools import lru_cache

import PIL.Image
import torch
from torchvision.transforms.v2 import functional as tvF
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import ChannelDimension

from .configuration_internvl_x import warn_if_untested_transformers
from .media_internvl_x import to_image_tensor

warn_if_untested_transformers()

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SLICING_MODES = ("ratio", "area", "edge")
# Options every call may override (`processor(images, text, max_patches=12)` passes them through): the tiling, then
# Transformers' standard image options that apply to tiles.
IMAGE_PROCESSOR_OPTIONS = (
    "image_size",
    "min_patches",
    "max_patches",
    "use_thumbnail",
    "slicing",
    "image_mean",
    "image_std",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "do_convert_rgb",
)
# Transformers' standard image options that tiling leaves no room for, and what they must be.
FIXED_OPTIONS = {
    "do_resize": True,
    "do_center_crop": False,
    "crop_size": None,
    "do_pad": False,
    "pad_size": None,
    "data_format": "channels_first",
}
# Standard options taken and without effect here: speed switches of Transformers' own processors, and the processor's
# token count.
INERT_OPTIONS = ("default_to_square", "disable_grouping", "image_seq_length", "return_tensors")


def tile_cap(width: int, height: int, tile_size: int, max_patches: int, slicing: str) -> int:
    """Most tiles an image may get: `max_patches` (ratio), capped by `ceil(W·H / size²)` (area) or by
    `ceil(W / size) · ceil(H / size)` (edge), as in RVTC (paper §3.3)."""
    if slicing == "ratio":
        return max_patches
    if slicing == "area":
        return min(max_patches, math.ceil(width * height / tile_size**2))
    if slicing == "edge":
        return min(max_patches, math.ceil(width / tile_size) * math.ceil(height / tile_size))
    raise ValueError(f"slicing must be one of {SLICING_MODES}, got {slicing!r}.")


@lru_cache(maxsize=4096)
def tile_grid(width: int, height: int, tile_size: int, min_patches: int, max_patches: int, slicing: str):
    """`(columns, rows)` of the tile grid for a `width`×`height` image.

    InternVL's matching: among grids with `min_patches ≤ c·r ≤ cap`, ordered by c·r, take the one whose c/r is
    closest to W/H; on a tie keep the later (larger) grid while the image area exceeds half of the grid's area.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"cannot tile an image of {width}×{height} pixels.")
    if not 1 <= min_patches <= max_patches:
        raise ValueError(
            f"need 1 ≤ min_patches ≤ max_patches, got min_patches={min_patches}, max_patches={max_patches}."
        )
    cap = max(min_patches, tile_cap(width, height, tile_size, max_patches, slicing))
    grids = sorted(  # c-major, then by tile count (stable): the order InternVL's matching breaks ties in
        ((c, r) for c in range(1, cap + 1) for r in range(1, cap // c + 1) if min_patches <= c * r),
        key=lambda grid: grid[0] * grid[1],
    )
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for columns, rows in grids:
        diff = abs(aspect - columns / rows)
        if diff < best_diff:
            best, best_diff = (columns, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * columns * rows:
            best = (columns, rows)
    return best


def tile_side(size: dict) -> int:
    """The tile side of Transformers' `size={"height": s, "width": s}`; a tile is square."""
    if not isinstance(size, dict) or set(size) != {"height", "width"} or size["height"] != size["width"]:
        raise ValueError(f"size must be a square {{'height': s, 'width': s}} (the tile side), got {size!r}.")
    return size["height"]


class InternVLXImageProcessor(BaseImageProcessor):
    r"""
    Splits each image into `image_size`×`image_size` tiles (plus a thumbnail when there is more than one tile) and
    normalizes them.

    Args:
        image_size (`int`, *optional*, defaults to 448): side of a tile in pixels.
        min_patches (`int`, *optional*, defaults to 1): fewest tiles per image.
        max_patches (`int`, *optional*, defaults to 6): most tiles per image (6 for the -HD models, 1 for plain ones).
        use_thumbnail (`bool`, *optional*, defaults to `True`): append the whole image resized to one tile when the
            image was split into more than one tile.
        slicing (`str`, *optional*, defaults to `"ratio"`): `"ratio"` (InternVL), `"area"` or `"edge"` (RVTC).
        image_mean, image_std (`tuple[float]`, *optional*): normalization, ImageNet by default.
        do_rescale (`bool`, *optional*, defaults to `True`), rescale_factor (`float`, *optional*, defaults to 1/255):
            integer images are multiplied by `rescale_factor` (floating-point images are read as [0, 1] already).
        do_normalize (`bool`, *optional*, defaults to `True`): subtract `image_mean` and divide by `image_std`.
        do_convert_rgb (`bool`, *optional*, defaults to `True`): make every image RGB; `False` keeps its channels.

    Per call (and at construction) it also takes Transformers' `size` (`{"height": s, "width": s}`, the same as
    `image_size=s`), `crop_to_patches` (Transformers' InternVL name: `True` tiles as configured, `False` makes each
    image one tile), `input_data_format` and `device`; options that tiling leaves no room for (`do_resize=False`,
    cropping, padding, channels-last output) are refused by name.
    """

    model_input_names = ["pixel_values", "num_patches"]

    def __init__(
        self,
        image_size: int = 448,
        min_patches: int = 1,
        max_patches: int = 6,
        use_thumbnail: bool = True,
        slicing: str = "ratio",
        image_mean: tuple[float, ...] = IMAGENET_MEAN,
        image_std: tuple[float, ...] = IMAGENET_STD,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        do_convert_rgb: bool = True,
        **kwargs,
    ):
        size = kwargs.pop("size", None)  # Transformers' name for the tile side, as `size` per call
        super().__init__(**kwargs)
        self.image_size = image_size if size is None else tile_side(size)
        self.min_patches = min_patches
        self.max_patches = max_patches
        self.use_thumbnail = use_thumbnail
        self.slicing = slicing
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.do_convert_rgb = do_convert_rgb
        self._options({})  # validate

    def _options(self, overrides: dict) -> dict:
        """The options of one call: this processor's, overridden by `overrides` (where an override of None, as
        Transformers' processors pass for an unset option, keeps the processor's)."""
        overrides = {name: value for name, value in overrides.items() if value is not None}
        crop_to_patches = overrides.pop("crop_to_patches", True)
        if not isinstance(crop_to_patches, bool):
            raise ValueError(f"crop_to_patches must be True or False, got {crop_to_patches!r}.")
        if not crop_to_patches:  # Transformers' InternVL name for one tile per image: the whole image resized
            overrides.update(min_patches=1, max_patches=1)
        size = overrides.pop("size", None)
        if size is not None:
            overrides["image_size"] = tile_side(size)
        for name, required in FIXED_OPTIONS.items():
            value = overrides.pop(name, required)
            if value != required and not (name == "data_format" and ChannelDimension(value) == ChannelDimension.FIRST):
                raise ValueError(
                    f"{name}={value!r} does not apply: InternVL-X resizes every image to its tiles and returns them "
                    f"channels first, whole ({name} must be {required!r})."
                )
        unknown = set(overrides) - {*IMAGE_PROCESSOR_OPTIONS, *INERT_OPTIONS, "resample"}
        if unknown:
            raise ValueError(f"unknown image processor arguments: {sorted(unknown)}")
        resample = overrides.pop("resample", PIL.Image.Resampling.BICUBIC)
        if resample not in (PIL.Image.Resampling.BICUBIC, tvF.InterpolationMode.BICUBIC):
            raise ValueError(f"resample={resample!r}: InternVL-X tiles are resized bicubically, as in training.")
        options = {name: overrides.get(name, getattr(self, name)) for name in IMAGE_PROCESSOR_OPTIONS}
        if options["slicing"] not in SLICING_MODES:
            raise ValueError(f"slicing must be one of {SLICING_MODES}, got {options['slicing']!r}.")
        for name in ("image_size", "min_patches", "max_patches"):
            value = options[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("image_mean", "image_std"):
            values = options[name]
            numbers = isinstance(values, (list, tuple)) and values
            if not numbers or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise ValueError(f"{name} must be a list of numbers, one per channel, got {values!r}.")
            if not all(math.isfinite(v) for v in values) or (name == "image_std" and min(values) <= 0):
                kind = "positive finite numbers (tiles are divided by them)" if name == "image_std" else "finite"
                raise ValueError(f"{name} must be {kind}, got {list(values)}.")
        if not 1 <= options["min_patches"] <= options["max_patches"]:
            raise ValueError(
                f"need 1 ≤ min_patches ≤ max_patches, got min_patches={options['min_patches']}, "
                f"max_patches={options['max_patches']}."
            )
        return options

    def fetch_images(self, images):
        """Images given as strings are read by `preprocess` (`read_image`: paths, `file://` and `http(s)` URLs, base64,
        each failure named by its place in the batch), so Transformers' processors hand them over as they are."""
        return images

    @property
    def size(self) -> dict:
        """The tile side under Transformers' name: `{"height": image_size, "width": image_size}`."""
        return {"height": self.image_size, "width": self.image_size}

    @size.setter
    def size(self, size: dict) -> None:
        self.image_size = tile_side(size)

    def get_tile_grid(self, height: int, width: int, images_kwargs: dict | None = None) -> tuple[int, int]:
        """`(columns, rows)` of tiles for an image of `height`×`width` pixels."""
        o = self._options(images_kwargs or {})
        return tile_grid(width, height, o["image_size"], o["min_patches"], o["max_patches"], o["slicing"])

    def get_number_of_image_patches(self, height: int, width: int, images_kwargs: dict | None = None) -> int:
        """Tiles `preprocess` produces for an image of `height`×`width` pixels, thumbnail included."""
        columns, rows = self.get_tile_grid(height, width, images_kwargs)
        use_thumbnail = (images_kwargs or {}).get("use_thumbnail", self.use_thumbnail)
        return columns * rows + int(use_thumbnail and columns * rows > 1)

    def tile(self, image: torch.Tensor, options: dict, video_frame: bool = False) -> list[torch.Tensor]:
        """`(3, H, W)` → list of `(3, size, size)` tiles, row-major, then the thumbnail if any. A video frame is one
        tile: the whole frame resized to the tile size (RVTC's slicing does not apply to frames)."""
        size = options["image_size"]
        bicubic = tvF.InterpolationMode.BICUBIC
        if video_frame:
            return [tvF.resize(image, [size, size], interpolation=bicubic, antialias=True)]
        height, width = image.shape[-2:]
        columns, rows = tile_grid(
            width, height, size, options["min_patches"], options["max_patches"], options["slicing"]
        )
        resized = tvF.resize(image, [rows * size, columns * size], interpolation=bicubic, antialias=True)
        tiles = [
            resized[:, r * size : (r + 1) * size, c * size : (c + 1) * size]
            for r in range(rows)
            for c in range(columns)
        ]
        if options["use_thumbnail"] and len(tiles) > 1:
            tiles.append(tvF.resize(image, [size, size], interpolation=bicubic, antialias=True))
        return tiles

    def preprocess(self, images, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        """
        Args:
            images: a PIL image (any mode), numpy array or tensor (HWC or CHW; uint8, uint16 or float in [0, 1]), a
                local path, `file://` or `http(s)` URL, or base64 string (bare or as a data URI), or a (nested) list
                of them.
            kwargs: per-call overrides of `image_size`, `min_patches`, `max_patches`, `use_thumbnail`, `slicing`,
                `image_mean`, `image_std`; `input_data_format` (`"channels_first"` or `"channels_last"`) says where
                the channel axis of array images is; `do_convert_rgb=False` keeps each image's channels (1 for
                grayscale, 4 with alpha; the mean and std then need as many values) instead of making it RGB;
                `video_frames` (a list of booleans, one per image) marks the images that are video frames, one tile
                each (the processor sets it for the frames of its `videos`).

        Returns:
            `BatchFeature` with `pixel_values (total_tiles, 3, size, size)` and `num_patches`, the tiles of each
            image in order.
        """
        input_data_format = kwargs.pop("input_data_format", None)
        device = kwargs.pop("device", None)
        video_frames = kwargs.pop("video_frames", None)
        options = self._options(kwargs)
        flat = []

        def collect(item):
            if isinstance(item, (list, tuple)):
                for element in item:
                    collect(element)
            else:
                flat.append(item)

        collect(images)
        video_frames = list(video_frames) if video_frames is not None else [False] * len(flat)
        if len(video_frames) != len(flat):
            raise ValueError(f"video_frames has {len(video_frames)} flags for {len(flat)} images; give one per image.")
        tiles, num_patches = [], []
        for index, (image, video_frame) in enumerate(zip(flat, video_frames)):
            image_tiles = self.tile(
                to_image_tensor(image, index, input_data_format, options["do_convert_rgb"]), options, video_frame
            )
            tiles += image_tiles
            num_patches.append(len(image_tiles))
        size = options["image_size"]
        if not tiles:
            pixel_values = torch.empty(0, 3, size, size)
        else:
            channels = sorted({tile.shape[0] for tile in tiles})
            if (
                len(channels) > 1
                or len(options["image_mean"]) != channels[0]
                or len(options["image_std"]) != channels[0]
            ):
                raise ValueError(
                    f"the images have {channels} channels (do_convert_rgb=False keeps each image's own) but image_mean "
                    f"and image_std have {len(options['image_mean'])} and {len(options['image_std'])} values; give "
                    "images with one channel count and a mean and std per channel."
                )
            pixel_values = torch.stack([self.rescale_tile(tile, options) for tile in tiles])
            if options["do_normalize"]:
                std = torch.tensor(options["image_std"]).view(1, -1, 1, 1)
                mean = torch.tensor(options["image_mean"]).view(1, -1, 1, 1)
                pixel_values.sub_(mean).div_(std)
        num_patches = torch.tensor(num_patches, dtype=torch.long)
        if device is not None:
            pixel_values, num_patches = pixel_values.to(device), num_patches.to(device)
        return BatchFeature(data={"pixel_values": pixel_values, "num_patches": num_patches}, tensor_type=return_tensors)

    @staticmethod
    def rescale_tile(tile: torch.Tensor, options: dict) -> torch.Tensor:
        """A tile as float32: 8-bit values times `rescale_factor` when `do_rescale` (floating-point and 16-bit images
        are in [0, 1] already)."""
        if tile.dtype == torch.uint8 and options["do_rescale"]:
            return tile.float().mul_(options["rescale_factor"])
        return tile.float()


InternVLXImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["InternVLXImageProcessor"]
