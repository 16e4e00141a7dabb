"""streams.image_decode: TorchCodec decoding gives PIL's pixels, on every path and format."""
import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from streams.image_decode import decode_batch, decode_one, decode_to_pixels, resize_center_crop


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
def test_decode_gives_the_pil_pixels(fmt, mode, options, width, height):
    data = encoded(photo_like(width, height, mode), fmt, **options)
    ours, theirs = decode_to_pixels(data, 48).astype(int), by_pil(data, 48).astype(int)
    assert ours.shape == (48, 48, 3)
    # same crop box and the same antialiased bicubic filter: never more than rounding apart
    assert np.abs(ours - theirs).max() <= 1


def test_a_format_torchcodec_cannot_read_falls_back_to_pil():
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


def exif_oriented(image: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    return encoded(image, fmt, exif=exif)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])  # TIFF: the PIL fallback
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_on_every_path(fmt, orientation):
    # TorchCodec always turns JPEG/PNG/WebP upright by their EXIF orientation (no opt-out), so the
    # PIL fallback and PIL twin do too: one image, one crop, whichever decoder reads it
    data = exif_oriented(photo_like(90, 50), fmt, orientation)
    ours = decode_to_pixels(data, 40).astype(int)
    with Image.open(io.BytesIO(data)) as image:
        upright = ImageOps.exif_transpose(image)
        assert upright.size == ((90, 50) if orientation == 3 else (50, 90))
    assert np.abs(ours - by_pil(data, 40).astype(int)).max() <= 1
    assert np.abs(ours - resize_center_crop(upright, 40).astype(int)).max() <= 1


def test_palette_png_with_transparency_decodes_to_its_colours():
    # torchcodec 0.16 wrote RGBA into the RGB output here (pytorch/torchcodec#1731: wrong pixels, heap
    # overrun); 0.17 fixed it
    image = Image.new("P", (2, 1), color=0)
    image.putpalette([17, 34, 51, 68, 85, 102])
    image.putpixel((1, 0), 1)
    data = encoded(image, "PNG", transparency=bytes([0, 128]))
    assert decode_one(data).tolist() == [[[17, 68]], [[34, 85]], [[51, 102]]]


@pytest.mark.parametrize("fmt,options", [("GIF", {}), ("WEBP", {"lossless": True})])
def test_an_animated_image_gives_its_first_frame_as_pil_does(fmt, options):
    frames = [photo_like(60, 40, seed=seed).convert("P" if fmt == "GIF" else "RGB") for seed in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=100, **options)
    data = buffer.getvalue()
    ours = decode_to_pixels(data, 32)
    assert ours.shape == (32, 32, 3)
    assert np.abs(ours.astype(int) - by_pil(data, 32).astype(int)).max() <= 1


def test_decoding_uses_no_deprecated_api():
    # torchvision 0.29 deprecates torchvision.io's decoders (DeprecationWarning on every call); this
    # module decodes with TorchCodec, so nothing here may warn
    datas = [encoded(photo_like(64, 48), fmt) for fmt in ("JPEG", "PNG", "WEBP")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for data in datas:
            decode_to_pixels(data, 32)
        decode_batch(datas, 32, "cpu")
