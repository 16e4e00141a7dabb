"""Encoded image bytes -> fixed-size uint8 pixels, the same way on every path.

Every image is turned upright by its EXIF orientation, resized (shorter side to `size`, bicubic,
antialiased) and centre-cropped to `size` x `size`. Decoding uses TorchCodec (libjpeg-turbo, libpng,
libwebp; torchvision 0.29 deprecated its own decoders in favour of it), resizing torchvision's
PIL-equivalent antialiased resampling on uint8: on a CPU core that is 2-3x the rate of PIL for the
same pixels (bench/decode.py). Two places call it:

- `data.decode: cpu` (default): Ray Data's decoding actors, one image at a time (`decode_to_pixels`);
- `data.decode: device`: the training worker, a batch at a time on its device (`decode_batch`); on a
  GPU the batch's JPEGs are decoded together by nvjpeg, other formats on the CPU and moved.

A format TorchCodec cannot read (BMP, TIFF ...) falls back to PIL, which applies the EXIF orientation
too (TorchCodec always applies it, with no opt-out). Pure torch + TorchCodec + torchvision + PIL: no
Ray here.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torchcodec.decoders import decode_image, decode_jpeg
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

JPEG_MAGIC = b"\xff\xd8\xff"


def is_jpeg(encoded: bytes) -> bool:
    return bytes(encoded[:3]) == JPEG_MAGIC


def crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(resized width, resized height, left, top) of the shorter-side resize and centre crop."""
    scale = size / min(width, height)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    return new_width, new_height, (new_width - size) // 2, (new_height - size) // 2


def resize_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """PIL image -> uint8 (size, size, 3), upright: the PIL twin of `decode_one` + `resize_center_crop_tensor`
    (for an animated image, its first frame)."""
    image = ImageOps.exif_transpose(image).convert("RGB")
    new_width, new_height, left, top = crop_box(*image.size, size)
    if (new_width, new_height) != image.size:
        image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def resize_center_crop_tensor(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, size, size). Sizes and offsets are rounded as the PIL twin rounds
    them: a one-pixel difference in the resized width would shift every sample."""
    height, width = image.shape[-2:]
    new_width, new_height, left, top = crop_box(width, height, size)
    if (new_width, new_height) != (width, height):
        image = TF.resize(image, [new_height, new_width], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.crop(image, top, left, size, size)


def decode_one(encoded: bytes, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (3, H, W) on `device`, upright; ValueError when neither TorchCodec nor PIL can decode it."""
    device = torch.device(device)
    buffer = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)
    try:
        if device.type == "cuda" and is_jpeg(encoded):
            return decode_jpeg(buffer, mode="RGB", device=device)
        # "auto": a 16-bit PNG stays 16-bit and is scaled below as before (TorchCodec's own uint8 output
        # rounds x/257 instead, one grey level off for a quarter of the values)
        image = decode_image(buffer, mode="RGB", output_dtype="auto")
        if image.ndim == 4:  # animated GIF / WebP: (frames, 3, H, W); PIL's twin reads the first frame
            image = image[0]
        if image.dtype != torch.uint8:  # 16-bit PNG
            image = TF.to_dtype(image, torch.uint8, scale=True)
        return image.to(device, non_blocking=True)
    except (RuntimeError, ValueError) as codec_error:  # ValueError: a format TorchCodec does not sniff
        try:  # a format or variant TorchCodec does not read (BMP, TIFF ...)
            with Image.open(io.BytesIO(encoded)) as image:
                pixels = np.asarray(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError, SyntaxError):
            raise ValueError(f"image does not decode ({codec_error})") from None
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).to(device)


def decode_to_pixels(encoded: bytes, size: int) -> np.ndarray:
    """One encoded image -> uint8 (size, size, 3) HWC on the CPU (what Ray Data's actors emit)."""
    return resize_center_crop_tensor(decode_one(encoded), size).permute(1, 2, 0).numpy()


def decode_batch(encoded: Sequence[bytes], size: int, device: torch.device | str = "cpu",
                 keys: Sequence[str] | None = None) -> torch.Tensor:
    """Encoded images -> uint8 (N, 3, size, size) on `device`.

    Raises ValueError naming the sample (its key when given) whose bytes do not decode."""
    device = torch.device(device)
    images: list[torch.Tensor | None] = [None] * len(encoded)
    jpegs = [i for i, data in enumerate(encoded) if is_jpeg(data)]
    if jpegs and device.type == "cuda":
        try:  # one call for the batch: nvjpeg decodes them together
            buffers = [torch.frombuffer(bytearray(encoded[i]), dtype=torch.uint8) for i in jpegs]
            for i, image in zip(jpegs, decode_jpeg(buffers, mode="RGB", device=device)):
                images[i] = image
        except (RuntimeError, ValueError):
            pass  # one of them is bad: decode one by one below, which names it
    for i, image in enumerate(images):
        if image is None:
            try:
                images[i] = decode_one(encoded[i], device)
            except ValueError as err:
                name = repr(keys[i]) if keys is not None else f"#{i} of the batch"
                raise ValueError(f"sample {name}: {err}. `vlcl streams check` lists every bad sample; rebuild "
                                 f"the shard or drop the sample") from None
    return torch.stack([resize_center_crop_tensor(image, size) for image in images])
