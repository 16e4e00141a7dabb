"""Where the packaged data sources of the stream recipes live, and how each is read.

Debian packages install under `/usr/share/...`; tests point `debian_root` elsewhere (the
`VLCL_DEBIAN_ROOT` variable, prefixed to every Debian path). The npm packages are extracted (not
installed) into `$VLCL_SOURCES_DIR/npm/<package>/`, default `~/.cache/vlcl/sources`.
`streams/install_sources.sh` (or `make sources`) installs all of them. A missing source raises
MissingSourceError with the exact command that installs it; nothing here downloads anything.

Every reader returns images as PIL images already composited on white (RGBA -> RGB), so shards
never depend on how a reader treats transparency.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from PIL import Image

from streams.errors import MissingSourceError, SourceError

INSTALL_SCRIPT = "bash streams/install_sources.sh"

FASHION_MNIST_DIR = "usr/share/datasets/fashion-mnist"
OPENCV_DIGITS = "usr/share/doc/opencv-doc/examples/data/digits.png"
TUXPAINT_STAMPS = "usr/share/tuxpaint/stamps"

NPM_PACKAGES = {
    "emoji-datasource-google": "16.0.0",
    "emoji-datasource-twitter": "16.0.0",
    "openmoji": "17.0.0",
}
# Only these art styles: their licences allow redistribution (Apple/Facebook images do not).
LICENCES = {
    "dataset-fashion-mnist": "MIT (Zalando Research)",
    "opencv-doc digits.png": "BSD-3-Clause / Apache-2.0 (OpenCV); derived from MNIST",
    "tuxpaint-stamps-default": "GPL-2.0 (Tux Paint)",
    "emoji-datasource-google": "images Apache-2.0 (Google Noto Emoji); data MIT (iamcal/emoji-data)",
    "emoji-datasource-twitter": "images CC-BY-4.0 (Twitter Twemoji); data MIT (iamcal/emoji-data)",
    "openmoji": "CC-BY-SA-4.0 (OpenMoji, HfG Schwäbisch Gmünd)",
}

FASHION_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot"]
DIGIT_SHEET_SIZE = (2000, 1000)  # width, height: 100 columns x 50 rows of 20 px cells
DIGIT_CELL = 20
DIGIT_COLUMNS = 100
DIGIT_ROWS_PER_CLASS = 5
EMOJI_STYLES = ("google", "twitter")
OPENMOJI_STYLES = ("color", "black")


def apt_command(package: str) -> str:
    return f"sudo apt-get install -y {package}"


def npm_command(package: str, target: Path) -> str:
    version = NPM_PACKAGES[package]
    return (f"mkdir -p {target} && npm pack {package}@{version} && "
            f"tar -xzf {package}-{version}.tgz -C {target} --strip-components=1")


@dataclass(frozen=True)
class Sources:
    """The roots the recipes read from. `rsvg_convert` is the SVG renderer's path, or None when absent."""

    debian_root: Path = field(default_factory=lambda: Path(os.environ.get("VLCL_DEBIAN_ROOT") or "/"))
    sources_dir: Path = field(default_factory=lambda: Path(
        os.environ.get("VLCL_SOURCES_DIR") or Path.home() / ".cache" / "vlcl" / "sources"))
    rsvg_convert: str | None = field(default_factory=lambda: shutil.which("rsvg-convert"))

    def debian_path(self, relative: str, package: str) -> Path:
        """`debian_root/relative`, or MissingSourceError naming the apt package that provides it."""
        path = self.debian_root / relative
        if not path.exists():
            raise MissingSourceError(f"{path} does not exist: the Debian package {package} is not installed. "
                                     f"Install it with `{apt_command(package)}` (or all sources: `{INSTALL_SCRIPT}`)")
        return path

    def npm_path(self, package: str, relative: str = "") -> Path:
        """A file of an extracted npm package, or MissingSourceError naming how to extract it."""
        root = self.sources_dir / "npm" / package
        path = root / relative if relative else root
        if not path.exists():
            raise MissingSourceError(
                f"{path} does not exist: the npm package {package}@{NPM_PACKAGES[package]} is not extracted under "
                f"{self.sources_dir}/npm. Run `{INSTALL_SCRIPT}` (set VLCL_SOURCES_DIR to choose the folder), or: "
                f"{npm_command(package, root)}")
        return path

    def require_rsvg(self, what: str) -> str:
        if self.rsvg_convert is None:
            raise MissingSourceError(f"rendering {what} needs rsvg-convert, which is not installed. Install it with "
                                     f"`{apt_command('librsvg2-bin')}` (or all sources: `{INSTALL_SCRIPT}`)")
        return self.rsvg_convert


def on_white(image: Image.Image) -> Image.Image:
    """Composite any mode (RGBA, LA, P with transparency, L, RGB) onto a white background, as RGB."""
    if image.mode in ("RGB", "L"):
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def fit_long_side(image: Image.Image, long_side: int) -> Image.Image:
    """Shrink (never enlarge) so the longer side is at most `long_side`, keeping the aspect ratio."""
    width, height = image.size
    if max(width, height) <= long_side:
        return image
    scale = long_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


# --- Fashion-MNIST (Debian dataset-fashion-mnist) ---

def read_idx(path: Path):
    """An idx-ubyte(.gz) file as a uint8 numpy array of its declared shape."""
    import numpy as np

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as err:
        raise SourceError(f"{path} cannot be read ({type(err).__name__}: {err}); reinstall its package") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise SourceError(f"{path} is not an idx file of unsigned bytes (magic {data[:4].hex()})")
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    body = data[4 + 4 * dims:]
    if len(body) != int(np.prod(shape)):
        raise SourceError(f"{path} holds {len(body)} bytes of data but its header declares shape {shape}")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def fashion_mnist(sources: Sources, split: str):
    """(images (N, 28, 28) uint8, labels (N,) uint8) of the `train` (60,000) or `test` (10,000) file."""
    prefix = {"train": "train", "test": "t10k"}[split]
    folder = sources.debian_path(FASHION_MNIST_DIR, "dataset-fashion-mnist")
    images = read_idx(sources.debian_path(f"{FASHION_MNIST_DIR}/{prefix}-images-idx3-ubyte.gz", "dataset-fashion-mnist"))
    labels = read_idx(sources.debian_path(f"{FASHION_MNIST_DIR}/{prefix}-labels-idx1-ubyte.gz", "dataset-fashion-mnist"))
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise SourceError(f"{folder}: {prefix} images {images.shape} and labels {labels.shape} do not match")
    return images, labels


def first_per_class(labels, classes: Iterable[int], count: int, skip: int = 0) -> list[int]:
    """Indices, in file order, of the first `count` samples of each class after skipping `skip` of it.

    Raises SourceError when a class has fewer than `skip + count` samples.
    """
    taken: dict[int, list[int]] = {int(c): [] for c in classes}
    seen = dict.fromkeys(taken, 0)
    for index, label in enumerate(labels):
        label = int(label)
        if label not in taken or len(taken[label]) >= count:
            continue
        seen[label] += 1
        if seen[label] > skip:
            taken[label].append(index)
    short = {c: len(v) for c, v in taken.items() if len(v) < count}
    if short:
        raise SourceError(f"asked for {count} samples per class (after the first {skip}) but classes {short} have "
                          f"fewer; lower the per-class count")
    return sorted(i for indices in taken.values() for i in indices)


# --- OpenCV digits sheet (Debian opencv-doc) ---

def opencv_digits(sources: Sources):
    """(cells (5000, 20, 20) uint8, labels (5000,)), row-major over the sheet: cell (row r, column c) is
    index r * 100 + c and shows digit r // 5."""
    import numpy as np

    path = sources.debian_path(OPENCV_DIGITS, "opencv-doc")
    with Image.open(path) as sheet:
        grey = np.asarray(sheet.convert("L"))
    if grey.shape != DIGIT_SHEET_SIZE[::-1]:
        raise SourceError(f"{path} is {grey.shape[1]}x{grey.shape[0]} px; expected the 2000x1000 sheet of "
                          f"20x20 digits from opencv-doc")
    rows = grey.shape[0] // DIGIT_CELL
    cells = grey.reshape(rows, DIGIT_CELL, DIGIT_COLUMNS, DIGIT_CELL).swapaxes(1, 2).reshape(-1, DIGIT_CELL, DIGIT_CELL)
    labels = np.repeat(np.arange(rows) // DIGIT_ROWS_PER_CLASS, DIGIT_COLUMNS)
    return cells, labels


# --- Emoji: emoji-datasource-google/-twitter PNGs and OpenMoji SVGs ---

@dataclass(frozen=True)
class Emoji:
    """One base emoji concept (no skin-tone variants) found in every style the recipes use."""

    code: str          # emoji-datasource `unified`, lower case: the concept's id ("1f98a")
    name: str          # emoji-datasource name, lower case ("fox face")
    category: str      # "Animals & Nature"
    subcategory: str
    image: str         # PNG file name in img/<style>/64/
    openmoji: str      # OpenMoji hexcode (SVG file stem)
    annotation: str    # OpenMoji's CLDR short name ("fox")
    tags: tuple[str, ...]


def openmoji_table(sources: Sources) -> dict[str, dict[str, str]]:
    path = sources.npm_path("openmoji", "data/openmoji.csv")
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["hexcode"]: row for row in csv.DictReader(handle)}


def openmoji_hexcode(entry: dict, table: dict[str, dict[str, str]]) -> str | None:
    """The OpenMoji hexcode of an emoji-datasource entry: its `unified`, its `non_qualified`, or the
    unified code without variation selectors (FE0F)."""
    stripped = "-".join(part for part in entry["unified"].split("-") if part != "FE0F")
    for code in (entry["unified"], entry.get("non_qualified"), stripped):
        if code and code in table:
            return code
    return None


def emoji_concepts(sources: Sources, categories: Iterable[str]) -> list[Emoji]:
    """The emoji of `categories` drawn in all four styles (Google, Twitter PNG; OpenMoji colour and
    line art SVG), in emoji-datasource sort order. Skin-tone variants are not base entries, so they
    never appear."""
    categories = list(categories)
    table = openmoji_table(sources)
    with open(sources.npm_path("emoji-datasource-google", "emoji.json"), encoding="utf-8") as handle:
        entries = json.load(handle)
    png_dirs = [sources.npm_path(f"emoji-datasource-{style}", f"img/{style}/64") for style in EMOJI_STYLES]
    svg_dirs = [sources.npm_path("openmoji", f"{style}/svg") for style in OPENMOJI_STYLES]
    known = {e["category"] for e in entries}
    unknown = [c for c in categories if c not in known]
    if unknown:
        raise SourceError(f"emoji categories {unknown} are not in emoji-datasource's emoji.json; known: {sorted(known)}")
    concepts = []
    for entry in sorted(entries, key=lambda e: e["sort_order"]):
        if entry["category"] not in categories:
            continue
        hexcode = openmoji_hexcode(entry, table)
        if hexcode is None or not all((d / entry["image"]).is_file() for d in png_dirs):
            continue
        if not all((d / f"{hexcode}.svg").is_file() for d in svg_dirs):
            continue
        row = table[hexcode]
        tags = tuple(t.strip() for t in row.get("tags", "").split(",") if t.strip())
        concepts.append(Emoji(code=entry["unified"].lower(), name=entry["name"].lower(), category=entry["category"],
                              subcategory=entry["subcategory"], image=entry["image"], openmoji=hexcode,
                              annotation=row.get("annotation", ""), tags=tags))
    return concepts


def emoji_png(sources: Sources, style: str, emoji: Emoji) -> Image.Image:
    """The 64x64 emoji-datasource PNG of `style` (google or twitter), on white."""
    path = sources.npm_path(f"emoji-datasource-{style}", f"img/{style}/64/{emoji.image}")
    with Image.open(path) as image:
        return on_white(image)


def render_svg(rsvg_convert: str, path: Path, size: int, keep_aspect: bool = False) -> Image.Image:
    """Render an SVG with rsvg-convert: exactly size x size, or (keep_aspect) fitting in that square."""
    command = [rsvg_convert, "-w", str(size), "-h", str(size)]
    if keep_aspect:
        command.append("--keep-aspect-ratio")
    result = subprocess.run([*command, str(path)], capture_output=True, check=False)
    if result.returncode != 0:
        raise SourceError(f"rsvg-convert could not render {path}: {result.stderr.decode(errors='replace').strip()}")
    with Image.open(io.BytesIO(result.stdout)) as image:
        return on_white(image)


def openmoji_svg_path(sources: Sources, style: str, emoji: Emoji) -> Path:
    return sources.npm_path("openmoji", f"{style}/svg/{emoji.openmoji}.svg")


def render_all(jobs: list[tuple[str, Path, int, bool]], workers: int = 2) -> list[Image.Image]:
    """render_svg over (renderer, path, size, keep_aspect) jobs, in order, a few processes at a time."""
    if not jobs:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, os.cpu_count() or 1))) as pool:
        return list(pool.map(lambda job: render_svg(*job), jobs))


def openmoji_images(sources: Sources, style: str, concepts: list[Emoji], size: int = 64) -> list[Image.Image]:
    """OpenMoji `style` (color or black line art) renders of `concepts`, size x size, on white."""
    renderer = sources.require_rsvg(f"OpenMoji {style} SVGs")
    return render_all([(renderer, openmoji_svg_path(sources, style, e), size, False) for e in concepts])


# --- Tux Paint stamps (Debian tuxpaint-stamps-default) ---

@dataclass(frozen=True)
class Stamp:
    """One stamp: `<category>/<...>/<name>.txt` with a .png or (else) .svg beside it."""

    relative: str      # "animals/mammals/badger" (no extension)
    category: str      # first folder: "animals"
    caption: str       # English caption: the .txt's first line
    image: Path        # the PNG, else the SVG

    @property
    def key(self) -> str:
        return re.sub(r"[^A-Za-z0-9_\-]", "_", self.relative)

    @property
    def is_svg(self) -> bool:
        return self.image.suffix == ".svg"


def tux_stamps(sources: Sources, categories: Iterable[str] | None = None,
               exclude_prefixes: Iterable[str] = ()) -> list[Stamp]:
    """The captioned stamps of `categories` (all when None), sorted by path. A stamp without a caption
    file or image is not a stamp (Tux Paint shows neither); `*_mirror.png` are alternates, not stamps."""
    root = sources.debian_path(TUXPAINT_STAMPS, "tuxpaint-stamps-default")
    categories = sorted(p.name for p in root.iterdir() if p.is_dir()) if categories is None else list(categories)
    exclude = tuple(exclude_prefixes)
    stamps = []
    for category in categories:
        folder = root / category
        if not folder.is_dir():
            raise SourceError(f"Tux Paint stamp category {category!r} does not exist in {root}")
        for text in sorted(folder.rglob("*.txt")):
            relative = text.relative_to(root).with_suffix("").as_posix()
            if relative.startswith(exclude):
                continue
            png, svg = text.with_suffix(".png"), text.with_suffix(".svg")
            image = png if png.is_file() else svg if svg.is_file() else None
            lines = text.read_text(encoding="utf-8", errors="replace").splitlines()
            caption = lines[0].strip() if lines else ""
            if image is None or not caption:
                continue
            stamps.append(Stamp(relative=relative, category=category, caption=caption, image=image))
    return stamps


def stamp_images(sources: Sources, stamps: list[Stamp], long_side: int) -> tuple[list[Stamp], list[Image.Image]]:
    """(the stamps that have an image, their images on white with the long side at most `long_side`).

    SVG-only stamps are rendered with rsvg-convert; without it they are left out (the caller counts
    them from the difference)."""
    kept = [s for s in stamps if not s.is_svg or sources.rsvg_convert is not None]
    svg_jobs = [(sources.rsvg_convert, s.image, long_side, True) for s in kept if s.is_svg]
    rendered = iter(render_all(svg_jobs))
    images = []
    for stamp in kept:
        if stamp.is_svg:
            images.append(next(rendered))
            continue
        try:
            with Image.open(stamp.image) as image:
                images.append(fit_long_side(on_white(image), long_side))
        except (OSError, ValueError, SyntaxError) as err:
            raise SourceError(f"Tux Paint stamp {stamp.image} is not a readable image ({err}); reinstall "
                              f"tuxpaint-stamps-default") from None
    return kept, images


__all__ = ["Emoji", "FASHION_CLASSES", "LICENCES", "NPM_PACKAGES", "Sources", "Stamp", "emoji_concepts", "emoji_png",
           "fashion_mnist", "first_per_class", "on_white", "opencv_digits", "openmoji_images", "stamp_images",
           "tux_stamps"]
