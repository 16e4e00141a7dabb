"""Building open_clip models: any registered name, plus vlcl's tiny configs for CPU runs.

Pure open_clip; no Ray, MLflow or stream code, so a plain PyTorch loop can use it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import nn

_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


class ModelError(ValueError):
    """A model name or pretrained source that cannot be built."""


def register_model_configs() -> None:
    """Make vlcl's small configs (`vlcl-tiny`, `vlcl-small`) known to open_clip. Idempotent."""
    global _registered
    if not _registered:
        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True


@dataclass
class BuiltModel:
    model: nn.Module
    tokenizer: object
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]


def build_model(name: str, pretrained: str | None = None, precision: str = "fp32") -> BuiltModel:
    """Create an open_clip model and its tokenizer.

    `pretrained` is an open_clip tag (downloads from a hub, so it needs the network) or a local
    checkpoint file (what offline users and vlcl's own `pretrain` produce).
    """
    register_model_configs()
    known = open_clip.list_models()
    if name not in known:
        close = [m for m in known if name.lower().split("-")[0] in m.lower()][:8]
        raise ModelError(
            f"model.name: unknown open_clip model {name!r}. Small CPU configs: vlcl-tiny, vlcl-small; "
            f"similar names: {close or known[:8]}; `python -c 'import open_clip; print(open_clip.list_models())'` lists all."
        )
    if pretrained and (os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))):
        if not os.path.isfile(pretrained):
            raise ModelError(f"model.pretrained: checkpoint file {pretrained!r} does not exist")
    try:
        model = open_clip.create_model(name, pretrained=pretrained or None, precision=precision)
    except RuntimeError as err:
        raise ModelError(
            f"model.pretrained: cannot load {pretrained!r} for {name!r}: {err}. Offline, give a local checkpoint path."
        ) from err
    cfg = model.visual.preprocess_cfg
    size = cfg["size"]
    size = size if isinstance(size, int) else size[0]
    return BuiltModel(
        model=model,
        tokenizer=open_clip.get_tokenizer(name),
        image_size=int(size),
        image_mean=tuple(float(v) for v in cfg["mean"]),
        image_std=tuple(float(v) for v in cfg["std"]),
    )


def normalize_pixels(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B,3,H,W) or (B,H,W,3) pixels -> normalized float (B,3,H,W), on pixels' device."""
    if pixels.shape[-1] == 3 and pixels.shape[1] != 3:
        pixels = pixels.permute(0, 3, 1, 2)
    x = pixels.float().div_(255.0)
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


@dataclass(frozen=True)
class TokenizerFactory:
    """A picklable zero-argument callable returning the model's tokenizer (for data-loading actors)."""

    model_name: str

    def __call__(self):
        register_model_configs()
        return open_clip.get_tokenizer(self.model_name)
