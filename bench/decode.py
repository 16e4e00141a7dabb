"""Image decode rates of vlcl's data paths, side by side in one run, on real JPEG photos.

Every path turns the same encoded photos into uint8 `size` x `size` centre crops (shorter side
resized to `size`, bicubic, antialiased):

- `PIL`: PIL decode + resize, the CPU path before this benchmark (kept as the fallback for formats
  torchvision cannot read);
- `torchvision per image (data.decode=cpu)`: `streams.image_decode.decode_to_pixels`, what Ray
  Data's decoding actors run, one image at a time;
- `torchvision batch on CPU (data.decode=device, no GPU)`: `decode_batch` on the CPU;
- `torchvision nvjpeg batch on GPU (data.decode=device)`: the same, on CUDA (only with a GPU).

Printed per path: images/s (one CPU thread for the CPU paths, so it is the rate per core), the ratio to
PIL, and the mean absolute pixel difference to PIL's pixels (grey levels, 0-255).

    .venv/bin/python bench/decode.py                     # photos re-encoded at 1024 px, crops of 224
    .venv/bin/python bench/decode.py --source-side 512 --size 96

The photos are OpenCV's sample images (Debian `opencv-doc`, installed by `make sources`).
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streams.image_decode import decode_batch, decode_to_pixels, resize_center_crop  # noqa: E402
from streams.sources import Sources  # noqa: E402

PHOTO_DIR = "usr/share/doc/opencv-doc/examples/data"
MIN_PHOTO_SIDE = 256


def photos(source_side: int, count: int) -> list[bytes]:
    """`count` JPEGs (quality 90, long side `source_side`) re-encoded from OpenCV's sample photos."""
    root = Sources().debian_path(PHOTO_DIR, "opencv-doc")
    images = []
    for path in sorted(root.glob("*.jpg")):
        with Image.open(path) as image:
            if min(image.size) >= MIN_PHOTO_SIDE:
                images.append(image.convert("RGB"))
    if not images:
        raise SystemExit(f"no photos of at least {MIN_PHOTO_SIDE} px in {root}")
    encoded = []
    for i in range(count):
        image = images[i % len(images)]
        scale = source_side / max(image.size)
        resized = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        resized.save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


def pil_decode(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return resize_center_crop(image, size)


def timed(function, repeats: int) -> tuple[float, object]:
    """(best seconds of `repeats` calls, the last result)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - started)
    return best, result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source-side", type=int, default=1024, help="long side of the encoded photos (px)")
    parser.add_argument("--size", type=int, default=224, help="side of the decoded crops (the model's image size)")
    parser.add_argument("--count", type=int, default=64, help="photos per timed pass")
    parser.add_argument("--batch", type=int, default=64, help="photos per decode_batch call")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per path (the best is kept)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    encoded = photos(args.source_side, args.count)
    size = args.size

    def on_cpu_per_image(decode):
        return lambda: np.stack([decode(data, size) for data in encoded])

    def in_batches(device):
        def run():
            out = [decode_batch(encoded[i:i + args.batch], size, device) for i in range(0, len(encoded), args.batch)]
            if device == "cuda":
                torch.cuda.synchronize()
            return torch.cat(out).permute(0, 2, 3, 1).cpu().numpy()
        return run

    paths = [("PIL", on_cpu_per_image(pil_decode)),
             ("torchvision per image (data.decode=cpu)", on_cpu_per_image(decode_to_pixels)),
             ("torchvision batch on CPU (data.decode=device, no GPU)", in_batches("cpu"))]
    if torch.cuda.is_available():
        in_batches("cuda")()  # warm-up: CUDA context and nvjpeg handles
        paths.append(("torchvision nvjpeg batch on GPU (data.decode=device)", in_batches("cuda")))

    print(f"{len(encoded)} JPEG photos, long side {args.source_side} px, "
          f"{sum(map(len, encoded)) / len(encoded) / 1024:.0f} KiB each -> {size}x{size} crops")
    reference_seconds, reference = None, None
    print(f"{'path':<52} {'img/s':>8} {'x PIL':>7} {'diff':>6}")
    for name, run in paths:
        seconds, pixels = timed(run, args.repeats)
        if reference is None:
            reference_seconds, reference = seconds, pixels.astype(np.int16)
        difference = float(np.abs(pixels.astype(np.int16) - reference).mean())
        print(f"{name:<52} {len(encoded) / seconds:>8.0f} {reference_seconds / seconds:>7.2f} {difference:>6.2f}")


if __name__ == "__main__":
    main()
