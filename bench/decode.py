"""Image decode rates of vlcl's data paths, side by side in one run, on real photos (JPEG or PNG).

Every path turns the same encoded photos into uint8 `size` x `size` centre crops (shorter side
resized to `size`, bicubic, antialiased):

- `PIL`: PIL decode + resize (kept as the fallback for formats TorchCodec cannot read);
- `torchvision.io per image (deprecated, before TorchCodec)`: torchvision 0.29's deprecated
  `decode_image` + the same resize, what `decode_to_pixels` ran before; skipped once torchvision
  drops it;
- `torchcodec per image (data.decode=cpu)`: `streams.image_decode.decode_to_pixels`, what Ray
  Data's decoding actors run, one image at a time;
- `torchcodec batch on CPU (data.decode=device, no GPU)`: `decode_batch` on the CPU;
- `torchcodec nvjpeg batch on GPU (data.decode=device)`: the same, on CUDA (JPEG, only with a GPU).

Printed per path: images/s of wall time and per CPU second of the process (one CPU thread for the CPU
paths, so both are rates per core; the second is the one to compare on a busy machine), the CPU-time
ratio to PIL, the mean absolute pixel difference to PIL's pixels (grey levels, 0-255) and the largest
difference to the first torchvision path's pixels.

    .venv/bin/python bench/decode.py                     # photos re-encoded at 1024 px, crops of 224
    .venv/bin/python bench/decode.py --source-side 512 --size 96
    .venv/bin/python bench/decode.py --format png

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

from streams.image_decode import (decode_batch, decode_to_pixels, resize_center_crop,  # noqa: E402
                                  resize_center_crop_tensor)
from streams.sources import Sources  # noqa: E402

PHOTO_DIR = "usr/share/doc/opencv-doc/examples/data"
MIN_PHOTO_SIDE = 256


def photos(source_side: int, count: int, fmt: str = "JPEG") -> list[bytes]:
    """`count` JPEGs (quality 90) or PNGs, long side `source_side`, re-encoded from OpenCV's sample photos."""
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
        resized.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        encoded.append(buffer.getvalue())
    return encoded


def pil_decode(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return resize_center_crop(image, size)


def torchvision_io_decode():
    """torchvision.io's deprecated decode_image as `decode_to_pixels` called it, or None once it is gone."""
    try:
        from torchvision.io import ImageReadMode, decode_image
    except ImportError:
        return None

    def decode(data: bytes, size: int) -> np.ndarray:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        return resize_center_crop_tensor(image, size).permute(1, 2, 0).numpy()
    return decode


def timed(paths: list, repeats: int) -> list[tuple[float, float, object]]:
    """(best wall seconds, best CPU seconds of this process, the last result) of `repeats` calls per path.
    The paths take turns, one call each per round, so a neighbour's load on a shared machine falls on
    all of them alike; the CPU seconds do not count the time the process waited for a core."""
    wall, cpu, results = [float("inf")] * len(paths), [float("inf")] * len(paths), [None] * len(paths)
    for _ in range(repeats):
        for i, (_, function) in enumerate(paths):
            started, started_cpu = time.perf_counter(), time.process_time()
            results[i] = function()
            wall[i] = min(wall[i], time.perf_counter() - started)
            cpu[i] = min(cpu[i], time.process_time() - started_cpu)
    return list(zip(wall, cpu, results))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source-side", type=int, default=1024, help="long side of the encoded photos (px)")
    parser.add_argument("--format", choices=["jpeg", "png"], default="jpeg", help="how the photos are encoded")
    parser.add_argument("--size", type=int, default=224, help="side of the decoded crops (the model's image size)")
    parser.add_argument("--count", type=int, default=64, help="photos per timed pass")
    parser.add_argument("--batch", type=int, default=64, help="photos per decode_batch call")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds, each path once per round (the best is kept)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    encoded = photos(args.source_side, args.count, args.format.upper())
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

    paths = [("PIL", on_cpu_per_image(pil_decode))]
    deprecated = torchvision_io_decode()
    if deprecated is not None:
        paths.append(("torchvision.io per image (deprecated, before TorchCodec)", on_cpu_per_image(deprecated)))
    paths += [("torchcodec per image (data.decode=cpu)", on_cpu_per_image(decode_to_pixels)),
              ("torchcodec batch on CPU (data.decode=device, no GPU)", in_batches("cpu"))]
    if torch.cuda.is_available() and args.format == "jpeg":
        in_batches("cuda")()  # warm-up: CUDA context and nvjpeg handles
        paths.append(("torchcodec nvjpeg batch on GPU (data.decode=device)", in_batches("cuda")))

    print(f"{len(encoded)} {args.format.upper()} photos, long side {args.source_side} px, "
          f"{sum(map(len, encoded)) / len(encoded) / 1024:.0f} KiB each -> {size}x{size} crops")
    reference_cpu, reference, first_tensor_path = None, None, None
    print(f"{'path':<58} {'img/s':>6} {'img/CPU-s':>9} {'x PIL':>6} {'diff':>5} {'max vs 2nd':>10}")
    for (name, _), (seconds, cpu_seconds, pixels) in zip(paths, timed(paths, args.repeats)):
        pixels = pixels.astype(np.int16)
        if reference is None:
            reference_cpu, reference = cpu_seconds, pixels
        elif first_tensor_path is None:
            first_tensor_path = pixels
        difference = float(np.abs(pixels - reference).mean())
        versus = "" if first_tensor_path is None else f"{int(np.abs(pixels - first_tensor_path).max())}"
        print(f"{name:<58} {len(encoded) / seconds:>6.0f} {len(encoded) / cpu_seconds:>9.0f} "
              f"{reference_cpu / cpu_seconds:>6.2f} {difference:>5.2f} {versus:>10}")


if __name__ == "__main__":
    main()
