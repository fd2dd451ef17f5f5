"""Decoding images into uint8 frames ``(1, 3, S, S)`` with Pillow, and the helpers the video reader
(``storm_lightning.data.video``) shares: uniform frame indices, RGB conversion, antialiased resizing.

Frames stay uint8 until they reach the model, which normalises them for its vision backbone (4x less
memory in the data workers and between processes).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")


def resize_frames(frames: np.ndarray, size: int) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, size, size) uint8, antialiased bilinear (aspect ratio not kept)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    return x.contiguous()


def to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: rescale to 8 bits, not clip
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() or 1.0
        img = Image.fromarray((arr * (255.0 / hi)).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "P"):  # alpha over black, as the frame would be shown
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return np.array(img.convert("RGB"))  # a writable copy


# what one decoded image or video frame may hold by default (data.max_frame_pixels): 8K
MAX_FRAME_PIXELS = 8192 * 4320


ORIENTATION = 0x0112  # the EXIF tag


def decode_image(data: bytes | str | Path, size: int, max_pixels: int = MAX_FRAME_PIXELS) -> torch.Tensor:
    """Image bytes, or an image file's path -> (1, 3, size, size) uint8. Over ``max_pixels`` (width x
    height, read from the header before anything is decoded, and a file before the rest of it is read):
    ValueError. A photo's EXIF orientation is applied (a phone stores it sideways and says so), as a
    video's rotation is."""
    with Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data) as img:
        if img.width * img.height > max_pixels:
            raise ValueError(f"{img.width}x{img.height} image, over the limit of {max_pixels} pixels")
        img.load()
        return resize_frames(to_rgb(upright(img))[None], size)


def upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation says (phones store photos sideways and say so); itself when
    it says nothing (exif_transpose would copy it)."""
    return ImageOps.exif_transpose(img) if img.getexif().get(ORIENTATION, 1) != 1 else img


def uniform_indices(total: int, num: int) -> list[int]:
    """``num`` frame indices spread uniformly over ``total`` frames (the centres of ``num`` equal segments).
    With fewer frames than asked, frames repeat so every clip still has ``num`` frames."""
    if total <= 0:
        raise ValueError("video has no frames")
    return [min(total - 1, int((i + 0.5) * total / num)) for i in range(num)]
