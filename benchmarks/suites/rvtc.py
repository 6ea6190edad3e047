"""RVTC: tiles and visual tokens per image by slicing rule, on real photographs."""

import os

from benchmarks.harness import interleaved_medians, suite
from devtools.bundle import Bundle

PHOTOS = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "cell.png",
    "chelsea.png",
    "clock_motion.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "microaneurysms.png",
    "moon.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "page.png",
    "retina.jpg",
    "rocket.jpg",
    "text.png",
)


def photographs() -> dict[str, list]:
    """Real photographs shipped with scikit-image: as they are, and as wide strips (full width, a quarter of the
    height) — the extreme aspect ratios for which the paper designed RVTC."""

    import PIL.Image
    import skimage

    folder = os.path.join(os.path.dirname(skimage.__file__), "data")
    originals = [PIL.Image.open(os.path.join(folder, name)).convert("RGB") for name in PHOTOS]
    strips = [image.crop((0, 0, image.width, max(1, image.height // 4))) for image in originals]
    return {"photographs": originals, "strips": strips}


@suite("rvtc")
def rvtc_suite(args) -> dict:
    """Tiles per image for ratio / area / edge matching, and preprocessing throughput vs Transformers' InternVL
    image processor (`GotOcr2ImageProcessor` with `crop_to_patches`) in ratio mode."""
    from transformers.models.got_ocr2.image_processing_got_ocr2 import GotOcr2ImageProcessor

    ours_class = Bundle().load("image_processing_internvl_x.InternVLXImageProcessor")
    sets = photographs()
    max_patches, size = 6, 448
    rows = []
    for name, images in sets.items():
        row = {"images": f"{name} ({len(images)})"}
        for slicing in ("ratio", "area", "edge"):
            processor = ours_class(image_size=size, max_patches=max_patches, slicing=slicing)
            tiles = [processor.get_number_of_image_patches(im.height, im.width) for im in images]
            row[f"{slicing} tiles/image"] = sum(tiles) / len(tiles)
        row["area / ratio"] = row["area tiles/image"] / row["ratio tiles/image"]
        row["edge / ratio"] = row["edge tiles/image"] / row["ratio tiles/image"]
        rows.append(row)

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    ours = ours_class(image_size=size, max_patches=max_patches, slicing="ratio", image_mean=mean, image_std=std)
    native = GotOcr2ImageProcessor(
        crop_to_patches=True,
        size={"height": size, "width": size},
        max_patches=max_patches,
        image_mean=mean,
        image_std=std,
    )
    images = sets["photographs"]
    seconds = interleaved_medians(
        {
            "ours": lambda: [ours(im) for im in images],
            "transformers": lambda: [native(im, return_tensors="pt") for im in images],
        },
        "cpu",
        args.repeats,
    )
    throughput = {name: len(images) / s for name, s in seconds.items()}
    ratios = {
        "throughput_ours_over_transformers": throughput["ours"] / throughput["transformers"],
        "photographs_area_over_ratio_tiles": rows[0]["area / ratio"],
        "photographs_edge_over_ratio_tiles": rows[0]["edge / ratio"],
        "ours_images_per_s": throughput["ours"],
        "transformers_images_per_s": throughput["transformers"],
    }
    shapes = {
        "tile": size,
        "max_patches": max_patches,
        "thumbnail": "counted when more than one tile",
        "photos": list(PHOTOS),
    }
    return {"rows": rows, "ratios": ratios, "shapes": shapes}
