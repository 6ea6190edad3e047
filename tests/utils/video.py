"""Videos the tests write themselves (PyAV), and the native InternVL processor to compare the bundle's with."""

from pathlib import Path

import numpy as np

from tests.utils.tiny import IMAGE_SIZE

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def random_frames(count: int, height: int = 40, width: int = 60, seed: int = 0) -> np.ndarray:
    """`(count, height, width, 3)` uint8 frames of noise: each frame unlike the others."""
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def write_video(path: Path, frames: np.ndarray, fps: int = 10, lossless: bool = True) -> Path:
    """Encode `frames` `(T, H, W, 3)` uint8 RGB into `path`: losslessly (FFV1 in Matroska, which records no frame
    count) or as MPEG-4 Part 2 in an MP4 (which does), at `fps` frames per second."""
    import av

    with av.open(str(path), "w", format="matroska" if lossless else "mp4") as container:
        stream = container.add_stream("ffv1" if lossless else "mpeg4", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "bgr0" if lossless else "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def native_processor(tokenizer, folder: Path, image_seq_length: int, size: int = IMAGE_SIZE):
    """Transformers' `InternVLProcessor` (GOT-OCR2 image processor, `InternVLVideoProcessor`) over `tokenizer` (saved
    to `folder` and loaded back with the image and video tokens native InternVL reads from it), with the bundle's tile
    size and ImageNet normalization."""
    from transformers import AutoTokenizer, InternVLProcessor, InternVLVideoProcessor
    from transformers.models.got_ocr2.image_processing_got_ocr2 import GotOcr2ImageProcessor

    tokenizer.save_pretrained(folder)
    tokenizer_folder = folder
    special = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"}
    tokenizer = AutoTokenizer.from_pretrained(
        tokenizer_folder, extra_special_tokens={**special, "video_token": "<video>"}
    )
    side = {"height": size, "width": size}
    return InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(
            crop_to_patches=True, size=side, max_patches=4, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
        ),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(size=side, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD),
        image_seq_length=image_seq_length,
    )


def write_resizing_clip(path: Path, sides: list[int], fps: int = 10) -> Path:
    """A Motion-JPEG clip in Matroska whose frame i is `sides[i]` pixels square, while the container's header records
    only the first frame's size (as a crafted file may): what the header says is not what decoding costs."""
    from fractions import Fraction

    import av

    packets = []
    for number, side in enumerate(sides):
        encoder = av.CodecContext.create("mjpeg", "w")
        encoder.width = encoder.height = side
        encoder.pix_fmt, encoder.time_base = "yuvj420p", Fraction(1, fps)
        frame = av.VideoFrame.from_ndarray(np.full((side, side, 3), 40 * number % 256, np.uint8), format="rgb24")
        packets += [*encoder.encode(frame.reformat(format="yuvj420p")), *encoder.encode()]
    with av.open(str(path), "w", format="matroska") as container:
        stream = container.add_stream("mjpeg", rate=fps)
        stream.width = stream.height = sides[0]
        stream.pix_fmt, stream.time_base = "yuvj420p", Fraction(1, fps)
        for number, packet in enumerate(packets):
            packet.stream, packet.pts, packet.dts = stream, number, number
            container.mux(packet)
    return path
