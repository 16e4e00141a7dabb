"""streams.image_decode: torchvision decoding gives PIL's pixels, on every path and format."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from streams.image_decode import decode_batch, decode_to_pixels, resize_center_crop


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def photo_like(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Smooth gradients plus texture, so resampling differences would show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    channels = [(127 + 100 * np.sin(x / (7 + 5 * c)) * np.cos(y / (11 + 3 * c))) for c in range(3)]
    pixels = np.clip(np.stack(channels, -1) + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def by_pil(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return resize_center_crop(image, size)


@pytest.mark.parametrize("fmt,mode,options", [
    ("JPEG", "RGB", {"quality": 90}), ("JPEG", "L", {"quality": 90}), ("PNG", "RGB", {}), ("PNG", "RGBA", {}),
    ("PNG", "P", {}), ("PNG", "L", {}), ("WEBP", "RGB", {"lossless": True}),
])
@pytest.mark.parametrize("width,height", [(301, 203), (120, 333), (48, 48)])
def test_torchvision_decode_gives_the_pil_pixels(fmt, mode, options, width, height):
    data = encoded(photo_like(width, height, mode), fmt, **options)
    ours, theirs = decode_to_pixels(data, 48).astype(int), by_pil(data, 48).astype(int)
    assert ours.shape == (48, 48, 3)
    # same crop box and the same antialiased bicubic filter: never more than rounding apart
    assert np.abs(ours - theirs).max() <= 1


def test_a_format_torchvision_cannot_read_falls_back_to_pil():
    data = encoded(photo_like(64, 40), "BMP")
    assert np.abs(decode_to_pixels(data, 32).astype(int) - by_pil(data, 32).astype(int)).max() <= 1


def test_sixteen_bit_png_is_scaled_to_uint8():
    deep = np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 40  # 0 .. 63960
    pixels = decode_to_pixels(encoded(Image.fromarray(deep), "PNG"), 40)
    assert pixels.dtype == np.uint8
    # scaled to the 8-bit range (PIL would clip everything above 255 to white)
    assert np.abs(pixels[..., 0].astype(int) - deep.astype(int) // 256).max() <= 1


def test_batch_decode_equals_one_by_one_and_names_a_bad_sample():
    datas = [encoded(photo_like(90 + 10 * i, 70, seed=i), fmt) for i, fmt in enumerate(["JPEG", "PNG", "JPEG"])]
    batch = decode_batch(datas, 32, "cpu")
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == torch.uint8
    for data, pixels in zip(datas, batch):
        assert np.array_equal(pixels.permute(1, 2, 0).numpy(), decode_to_pixels(data, 32))
    truncated = datas[0][: len(datas[0]) // 3]
    with pytest.raises(ValueError, match=r"sample 'b-7': image does not decode.*vlcl streams check"):
        decode_batch([datas[1], truncated], 32, "cpu", keys=["a-3", "b-7"])
