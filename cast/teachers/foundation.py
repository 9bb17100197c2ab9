"""What the foundation-model teachers share (Grounding-DINO + SAM in `cast.teachers.vfm`, SAM 3 in
`cast.teachers.sam3`), so that each module holds only its own model's logic:

- `FoundationTeacher`: the model interface around the parts (`classes`, frozen modules kept in
  eval mode, `predict` argument checks and eval-mode call, `save_pretrained` / `from_pretrained`
  of a folder with config.json (settings + the transformers configurations), model.safetensors
  and tokenizer/).
- `projection_head`: the contrastive head, initialised from a fixed seed so that theta_T^0 (and
  the hash its predictions are cached under) is the same on every load.
- `binary_masks` and `ranked_instances`: low-resolution mask logits or probabilities -> masks at
  the image's original resolution, binarised, overlaps resolved (best score first).
- checks of the hub-layout folders the teachers are built from.
"""
from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from cast.inference.api import PredictImages
from cast.structures import Instances
from cast.teachers.vfm_ops import region_logits, resolve_overlaps
from cast.utils.io import atomic_save, atomic_write_json, read_json

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
# Masks are resized and binarised this many at a time: 100 float masks at 1024 x 2048 are 800 MB.
MASK_CHUNK = 16
# Sampler mask logits on padding (ignored by the loss; any constant would do).
PAD_LOGIT = -20.0
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


def projection_head(channels: int, projection_dim: int) -> nn.Sequential:
    """1x1 conv -> ReLU -> 1x1 conv to `projection_dim`, from a fixed seed (see the module docstring)."""
    hidden = 2 * projection_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(channels, hidden, kernel_size=1), nn.ReLU(),
                             nn.Conv2d(hidden, projection_dim, kernel_size=1))


class FoundationTeacher(PredictImages, nn.Module):
    """Base of the foundation-model teachers. A subclass sets `model_type`, `settings_class` (a
    dataclass with at least `classes`) and `tokenizer_class`, keeps `settings` and `tokenizer`,
    and implements `_frozen_modules`, `_predict`, `_sub_configs` and `_from_configs`."""

    model_type: ClassVar[str]
    settings_class: ClassVar[type]
    tokenizer_class: ClassVar[type]
    settings: Any
    tokenizer: Any

    @property
    def classes(self) -> list[str]:
        return list(self.settings.classes)

    def train(self, mode: bool = True) -> "FoundationTeacher":
        super().train(mode)
        for module in self._frozen_modules():
            module.train(False)
        return self

    def _frozen_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def _freeze(self) -> None:
        for module in self._frozen_modules():
            module.requires_grad_(False)

    @torch.no_grad()
    def predict(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None,
                image_sizes: list[tuple[int, int]] | None = None,
                orig_sizes: list[tuple[int, int]] | None = None) -> list[Instances]:
        """Zero-shot instances per image (eval mode for the call), cropped to image_sizes inside
        the padded batch, masks at orig_sizes, best first."""
        return [instances for instances, _ in self.predict_with_boxes(pixel_values, pixel_mask, image_sizes,
                                                                      orig_sizes)]

    @torch.no_grad()
    def predict_with_boxes(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None,
                           image_sizes: list[tuple[int, int]] | None = None,
                           orig_sizes: list[tuple[int, int]] | None = None) -> list[tuple[Instances, torch.Tensor]]:
        """`predict` with, for every instance, the detection box it came from: (x0, y0, x1, y1)
        pixels at orig_sizes, (K, 4) in the instances' order."""
        check_pixels(pixel_values)
        batch, _, height, width = pixel_values.shape
        image_sizes = [(height, width)] * batch if image_sizes is None else [tuple(map(int, s)) for s in image_sizes]
        orig_sizes = image_sizes if orig_sizes is None else [tuple(map(int, s)) for s in orig_sizes]
        if len(image_sizes) != batch or len(orig_sizes) != batch:
            raise ValueError(f"{len(image_sizes)} image_sizes / {len(orig_sizes)} orig_sizes for a batch of {batch}")
        for h, w in image_sizes:
            if not (0 < h <= height and 0 < w <= width):
                raise ValueError(f"image size {(h, w)} does not fit in the input of size {(height, width)}")
        if pixel_mask is None:
            pixel_mask = torch.zeros((batch, height, width), dtype=torch.bool, device=pixel_values.device)
            for b, (h, w) in enumerate(image_sizes):
                pixel_mask[b, :h, :w] = True
        was_training = self.training
        self.eval()
        try:
            return self._predict(pixel_values, pixel_mask, image_sizes, orig_sizes)
        finally:
            self.train(was_training)

    def _predict(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor, image_sizes: list[tuple[int, int]],
                 orig_sizes: list[tuple[int, int]]) -> list[tuple[Instances, torch.Tensor]]:
        raise NotImplementedError

    # ------------------------------------------------------------------ saving and loading

    def _sub_configs(self) -> dict[str, dict[str, Any]]:
        """The transformers configurations of the parts, by config.json key."""
        raise NotImplementedError

    @classmethod
    def _from_configs(cls, settings: Any, config: dict[str, Any], tokenizer: Any) -> "FoundationTeacher":
        """A teacher with random weights from its settings and the parts' configurations."""
        raise NotImplementedError

    def save_pretrained(self, directory: str | Path) -> None:
        """config.json (settings + the parts' configurations), model.safetensors (every weight,
        projection head included) and tokenizer/, so that `from_pretrained` rebuilds it offline."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_save(directory / WEIGHTS_NAME, lambda tmp: save_model(self, str(tmp)))
        self.tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
        atomic_write_json(directory / CONFIG_NAME, {"model_type": self.model_type, "settings": asdict(self.settings),
                                                    **self._sub_configs()}, indent=1)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "FoundationTeacher":
        """A teacher written by `save_pretrained`."""
        directory = Path(directory)
        config_path = config_file(directory, "teacher")
        config = read_json(config_path)
        if not isinstance(config, dict) or config.get("model_type") != cls.model_type:
            raise ValueError(f"{config_path}: not a {cls.model_type} configuration (written by "
                             f"{cls.__name__}.save_pretrained)")
        weights, tokenizer_dir = directory / WEIGHTS_NAME, directory / TOKENIZER_DIR
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: file not found")
        require_tokenizer(tokenizer_dir, cls.tokenizer_class)
        try:
            known = {f.name for f in fields(cls.settings_class)}
            settings = cls.settings_class(**{k: v for k, v in config["settings"].items() if k in known})
            model = cls._from_configs(settings, config, cls.tokenizer_class.from_pretrained(str(tokenizer_dir)))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{config_path}: invalid teacher configuration: {e}") from None
        try:
            load_model(model, str(weights), strict=True, device=str(map_location))
            return model
        except (SafetensorError, RuntimeError) as e:
            problem = f"cannot load the weights into the teacher {config_path} describes"
            raise ValueError(f"{weights}: {problem}: {e}") from None


def binary_masks(low_res: torch.Tensor, region: tuple[float, float], out_size: tuple[int, int], threshold: float,
                 probabilities: bool = False) -> torch.Tensor:
    """(N, H, W) bool masks at `out_size` from (N, L, L) low-resolution mask logits whose top-left
    `region` (fractions of height and width) is the image: resampled bilinearly
    (cast.teachers.vfm_ops.region_logits), `MASK_CHUNK` at a time, then sigmoid > threshold; with
    `probabilities` the sigmoid comes first and the probabilities are resampled (SAM 3's
    post-processing does so)."""
    masks = torch.empty((low_res.shape[0], *out_size), dtype=torch.bool, device=low_res.device)
    for start in range(0, low_res.shape[0], MASK_CHUNK):
        chunk = low_res[start:start + MASK_CHUNK]
        if probabilities:
            masks[start:start + MASK_CHUNK] = region_logits(chunk.sigmoid(), region, out_size) > threshold
        else:
            masks[start:start + MASK_CHUNK] = region_logits(chunk, region, out_size).sigmoid() > threshold
    return masks


def ranked_instances(masks: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor,
                     boxes: torch.Tensor) -> tuple[Instances, torch.Tensor]:
    """Overlap-free Instances (every pixel to the best-scoring instance covering it, instances left
    empty dropped) and their boxes, in descending score order."""
    masks, order = resolve_overlaps(masks, scores)
    return Instances(masks=masks, labels=labels[order].long(), scores=scores[order].float()), boxes[order]


def no_instances(out_size: tuple[int, int], device: torch.device) -> tuple[Instances, torch.Tensor]:
    return (Instances(masks=torch.zeros((0, *out_size), dtype=torch.bool, device=device),
                      labels=torch.zeros(0, dtype=torch.int64, device=device),
                      scores=torch.zeros(0, dtype=torch.float32, device=device)),
            torch.zeros((0, 4), device=device))


def input_mask(pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> torch.Tensor:
    """The checked (B, H, W) real-pixel mask of an input batch (all True when none is given)."""
    check_pixels(pixel_values)
    if pixel_mask is None:
        batch, _, height, width = pixel_values.shape
        return torch.ones((batch, height, width), dtype=torch.bool, device=pixel_values.device)
    return pixel_mask


def check_pixels(pixel_values: torch.Tensor) -> None:
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values must be (B, 3, H, W), got {tuple(pixel_values.shape)}")


def check_hf_folder(directory: str | Path | None, model_types: tuple[str, ...], what: str) -> Path:
    """A transformers model folder: exists, its config.json names one of `model_types`, it has weights."""
    if directory is None:
        raise FileNotFoundError(f"no {what} folder given")
    directory = Path(directory)
    config_path = config_file(directory, what, f" (expected a transformers {what} folder)")
    try:
        found = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{config_path}: not a transformers configuration: {e}") from None
    if found not in model_types:
        raise ValueError(f"{config_path}: model_type is {found!r}, a {what} folder has "
                         f"{' or '.join(repr(t) for t in model_types)}")
    if not any((directory / name).is_file() for name in HF_WEIGHT_FILES):
        raise FileNotFoundError(f"{directory}: no {what} weights (none of {', '.join(HF_WEIGHT_FILES)})")
    return directory


def config_file(directory: Path, what: str, hint: str = "") -> Path:
    """`directory`/config.json, or FileNotFoundError naming the missing folder or file."""
    config_path = directory / CONFIG_NAME
    missing = (f"{directory}: {what} folder not found" if not directory.is_dir()
               else f"{config_path}: file not found{hint}" if not config_path.is_file() else None)
    if missing:
        raise FileNotFoundError(missing)
    return config_path


def require_tokenizer(directory: Path, tokenizer_class: type) -> None:
    """A folder `tokenizer_class.from_pretrained` can read (its vocabulary files, or tokenizer.json)."""
    names = ("tokenizer.json", *getattr(tokenizer_class, "vocab_files_names", {}).values())
    names = tuple(dict.fromkeys(names))
    if not any((directory / name).is_file() for name in names):
        kind = tokenizer_class.__name__.removesuffix("Tokenizer").removesuffix("Fast")
        raise FileNotFoundError(f"{directory}: no {kind.upper()} tokenizer (none of {', '.join(names)})")
