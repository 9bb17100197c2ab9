"""From samples to batches: the training views of a sample (`WeakStrongViews`), its evaluation
view (`EvalTransform`), a torch Dataset over any sequence of samples and the collate function
that builds the batch dict documented in `cast.structures`.

Views: a weak (geometric) view and a strong view = weak + photometric only. Because the strong
view only changes colours, pixel (y, x) shows the same place in both views, which is what the
pixel-wise contrastive loss pairs up. All randomness is drawn from
``np.random.default_rng([seed, epoch, index])``: a sample's views depend on nothing else, so a
batch is the same with any number of loader workers and after a resumed run (the training
stream, cast.training.data, hands out (epoch, index) keys). Views are computed with one
intra-op thread everywhere, as DataLoader workers do: some torch kernels (bilinear upsampling,
reductions) round differently with more threads.

Each transform maps an `InstanceSample` to a dict:
    weak          (3, h, w) float32 in [0, 1]
    strong        (3, h, w) float32 in [0, 1]   (WeakStrongViews with strong=True only)
    masks         (K, h, w) float32 0/1, instances cropped away entirely are dropped
    labels        (K,) int64
    valid         (h, w) bool, True on image pixels (False on padding)
    instance_ids  (h, w) int64, index into masks of the instance covering the pixel; -1 for
                  none, for ignore regions and for padding
    image_id      int
    orig_size     (H, W) of the sample as stored
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import kornia
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cast.structures import InstanceSample


class SampleTransform(Protocol):
    def __call__(self, sample: InstanceSample, *, seed: int, epoch: int, index: int) -> dict[str, Any]:
        """Views of `sample`; any randomness is a function of (seed, epoch, index) alone."""


def _image_tensor(sample: InstanceSample) -> torch.Tensor:
    # The float copy is made by numpy: decoded images may be read-only arrays, which torch warns about.
    return torch.from_numpy(np.ascontiguousarray(sample.image, dtype=np.float32)).permute(2, 0, 1).div_(255.0)


def _nearest(in_size: int, out_size: int, start: int, count: int) -> np.ndarray:
    """Source indices of output pixels start..start+count-1 when resizing in_size -> out_size.

    Nearest neighbour with pixel centres aligned, like the bilinear image resize; computing only
    the kept window keeps a crop of a large image with many masks cheap.
    """
    dst = np.arange(start, start + count, dtype=np.float64)
    return np.minimum(np.floor((dst + 0.5) * (in_size / out_size)).astype(np.int64), in_size - 1)


def _label_planes(sample: InstanceSample, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
    """Instance masks and the ignore region at source pixels (rows x cols), as (K + 1, h, w) uint8."""
    ignore = sample.ignore if sample.ignore is not None else np.zeros((sample.height, sample.width), bool)
    planes = [a.take(rows, axis=-2).take(cols, axis=-1) for a in (sample.masks, ignore[None])]
    return torch.from_numpy(np.concatenate(planes).astype(np.uint8))


def _resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, pixel centres aligned, antialiased when shrinking."""
    if tuple(image.shape[-2:]) == size:
        return image
    shrink = size[0] < image.shape[-2] or size[1] < image.shape[-1]
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=shrink)[0]
    return image.clamp_(0.0, 1.0)


def _instance_ids(masks: torch.Tensor, ignore: torch.Tensor) -> torch.Tensor:
    """(h, w) int64: the first instance covering each pixel, -1 for none and for ignore pixels."""
    ids = torch.full(ignore.shape, -1, dtype=torch.int64)
    for k in range(masks.shape[0] - 1, -1, -1):  # in reverse, so that the first instance wins
        ids.masked_fill_(masks[k], k)
    return ids.masked_fill_(ignore, -1)


def _views_dict(sample: InstanceSample, views: dict[str, torch.Tensor], planes: torch.Tensor,
                valid: torch.Tensor) -> dict[str, Any]:
    masks, ignore = planes[:-1].bool(), planes[-1].bool()
    keep = masks.flatten(1).any(dim=1)
    masks, labels = masks[keep], torch.as_tensor(sample.labels, dtype=torch.int64)[keep]
    return {**views, "masks": masks.float(), "labels": labels, "valid": valid,
            "instance_ids": _instance_ids(masks, ignore | ~valid), "image_id": int(sample.image_id),
            "orig_size": (sample.height, sample.width)}


def _jitter_factors(rng: np.random.Generator,
                    strength: tuple[float, float, float, float]) -> tuple[list[float], np.ndarray]:
    """ColorJitter factors (brightness, contrast, saturation, hue) in torchvision's ranges, and a random order.

    Draws the same amount of randomness whatever the strengths, so turning one view's
    photometric ops off leaves every other random choice unchanged.
    """
    u = rng.random(4)
    b, c, s, h = strength
    factors = [float(max(0.0, 1 - v) + (1 + v - max(0.0, 1 - v)) * x) for v, x in zip((b, c, s), u[:3])]
    factors.append(float(-h + 2 * h * u[3]))
    return factors, rng.permutation(4)


def _color_jitter(image: torch.Tensor, factors: list[float], order: np.ndarray) -> torch.Tensor:
    """Apply the jitter steps with kornia's PIL/torchvision-compatible functions; neutral steps are skipped."""
    brightness, contrast, saturation, hue = factors
    x = image[None]
    for step in order:
        if step == 0 and brightness != 1:
            x = kornia.enhance.adjust_brightness_accumulative(x, brightness)
        elif step == 1 and contrast != 1:
            x = kornia.enhance.adjust_contrast_with_mean_subtraction(x, contrast)
        elif step == 2 and saturation != 1:
            x = kornia.enhance.adjust_saturation_with_gray_subtraction(x, saturation)
        elif step == 3 and hue != 0:
            x = kornia.enhance.adjust_hue(x, hue * 2 * np.pi)  # kornia takes radians, torchvision turns
    return x[0].clamp(0.0, 1.0)


@dataclass
class WeakStrongViews:
    """Weak view = random scale, crop (padded when smaller) and flip; strong view = photometric(weak).

    `weak_jitter` adds light colour jitter to the weak view (off by default); the strong view adds
    colour jitter `strong_jitter` (brightness, contrast, saturation, hue), grayscale with
    `grayscale_prob` and, with `blur_prob`, a Gaussian blur of `blur_kernel` with sigma in `blur_sigma`.
    The image sits at the top-left of the crop canvas; `valid` marks it.
    """

    crop_size: tuple[int, int] = (128, 128)
    scale_range: tuple[float, float] = (0.5, 1.5)
    hflip_prob: float = 0.5
    weak_jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    strong: bool = True
    strong_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    grayscale_prob: float = 0.2
    blur_prob: float = 1.0
    blur_kernel: int = 5
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def __post_init__(self) -> None:
        self.crop_size = (int(self.crop_size[0]), int(self.crop_size[1]))
        if min(self.crop_size) < 1:
            raise ValueError(f"WeakStrongViews: crop_size must be positive, got {self.crop_size}")
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"WeakStrongViews: scale_range must satisfy 0 < low <= high, got {self.scale_range}")
        for name in ("hflip_prob", "grayscale_prob", "blur_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"WeakStrongViews: {name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("weak_jitter", "strong_jitter"):
            jitter = getattr(self, name)
            if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
                raise ValueError(f"WeakStrongViews: {name} must be 4 values >= 0 (hue <= 0.5), got {jitter}")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError(f"WeakStrongViews: blur_kernel must be odd and positive, got {self.blur_kernel}")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"WeakStrongViews: blur_sigma must satisfy 0 < low <= high, got {self.blur_sigma}")

    def __call__(self, sample: InstanceSample, *, seed: int, epoch: int, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([seed, epoch, index])
        # Geometry first and with a fixed number of draws: photometric settings never move it.
        scale = rng.uniform(*self.scale_range)
        size = (max(1, round(sample.height * scale)), max(1, round(sample.width * scale)))
        crop_h, crop_w = min(size[0], self.crop_size[0]), min(size[1], self.crop_size[1])
        y0 = int(rng.integers(0, size[0] - crop_h + 1))
        x0 = int(rng.integers(0, size[1] - crop_w + 1))
        flip = rng.random() < self.hflip_prob
        image = _resize_image(_image_tensor(sample), size)[:, y0:y0 + crop_h, x0:x0 + crop_w]
        planes = _label_planes(sample, _nearest(sample.height, size[0], y0, crop_h),
                               _nearest(sample.width, size[1], x0, crop_w))
        if flip:
            image, planes = image.flip(-1), planes.flip(-1)

        weak = _color_jitter(image, *_jitter_factors(rng, self.weak_jitter))
        views = {"weak": weak}
        if self.strong:
            views["strong"] = self._photometric(rng, weak)

        pad = (0, self.crop_size[1] - crop_w, 0, self.crop_size[0] - crop_h)
        views = {k: F.pad(v, pad) for k, v in views.items()}
        valid = F.pad(torch.ones(crop_h, crop_w, dtype=torch.bool), pad)
        return _views_dict(sample, views, F.pad(planes, pad), valid)

    def _photometric(self, rng: np.random.Generator, weak: torch.Tensor) -> torch.Tensor:
        strong = _color_jitter(weak, *_jitter_factors(rng, self.strong_jitter))
        if rng.random() < self.grayscale_prob:
            strong = kornia.color.rgb_to_grayscale(strong).expand(3, -1, -1).contiguous()
        sigma = rng.uniform(*self.blur_sigma)
        if rng.random() < self.blur_prob:
            k = self.blur_kernel
            # Reflect padding needs more pixels than the kernel's half width: a view of a tiny
            # image (e.g. 1x1 or 2 pixels wide) replicates its border instead of failing.
            border = "reflect" if min(strong.shape[-2:]) > k // 2 else "replicate"
            strong = kornia.filters.gaussian_blur2d(strong[None], (k, k), (sigma, sigma), border_type=border)[0]
        return strong


@dataclass
class EvalTransform:
    """Deterministic evaluation view: resize so the short side is `size` (None keeps the stored
    size); with `max_size` (H, W), e.g. a fixed-size exported graph's input, then shrink (aspect
    kept) until the view fits inside it."""

    size: int | None = None
    max_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.size is not None and self.size < 1:
            raise ValueError(f"EvalTransform: size must be positive or None, got {self.size}")
        if self.max_size is not None and min(self.max_size) < 1:
            raise ValueError(f"EvalTransform: max_size must be positive, got {self.max_size}")

    def __call__(self, sample: InstanceSample, *, seed: int = 0, epoch: int = 0, index: int = 0) -> dict[str, Any]:
        h, w = sample.height, sample.width
        if self.size is None:
            out_size = (h, w)
        else:
            scale = self.size / min(h, w)
            out_size = (max(1, round(h * scale)), max(1, round(w * scale)))
        if self.max_size is not None and (out_size[0] > self.max_size[0] or out_size[1] > self.max_size[1]):
            scale = min(self.max_size[0] / out_size[0], self.max_size[1] / out_size[1])
            out_size = (max(1, min(self.max_size[0], round(out_size[0] * scale))),
                        max(1, min(self.max_size[1], round(out_size[1] * scale))))
        image = _resize_image(_image_tensor(sample), out_size)
        rows, cols = _nearest(h, out_size[0], 0, out_size[0]), _nearest(w, out_size[1], 0, out_size[1])
        planes = _label_planes(sample, rows, cols)
        return _views_dict(sample, {"weak": image}, planes, torch.ones(out_size, dtype=torch.bool))


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class InstanceTorchDataset(Dataset):
    """Views of `samples[i]` drawn by `transform` with randomness fixed by (seed, epoch, i).

    An item is an (epoch, index) pair, as the training stream (cast.training.data) yields it, or
    an index alone (epoch 0), as evaluation asks for it.
    """

    def __init__(self, samples: Sequence[InstanceSample], transform: SampleTransform, seed: int = 0) -> None:
        self.samples = samples
        self.transform = transform
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = item if isinstance(item, tuple) else (0, item)
        sample = self.samples[index]
        with _one_thread():  # the same rounding in the main process as in a worker
            return self.transform(sample, seed=self.seed, epoch=epoch, index=index)


def _round_up(value: int, divisor: int) -> int:
    return -(-value // divisor) * divisor


def collate_instances(items: Sequence[dict[str, Any]], size_divisibility: int = 32) -> dict[str, Any]:
    """Pad views to a common size (rounded up to `size_divisibility`) and build the batch dict.

    The keys are those documented at the bottom of `cast.structures`; "pixel_values_strong"
    is present only when every item carries a strong view.
    """
    if len(items) == 0:
        raise ValueError("collate_instances: empty batch")
    if size_divisibility < 1:
        raise ValueError(f"collate_instances: size_divisibility must be >= 1, got {size_divisibility}")
    with_strong = sum("strong" in item for item in items)
    if 0 < with_strong < len(items):
        raise ValueError(f"collate_instances: {with_strong} of {len(items)} items have a strong view; "
                         "a batch needs all or none")
    sizes = [tuple(item["weak"].shape[-2:]) for item in items]
    height = _round_up(max(h for h, _ in sizes), size_divisibility)
    width = _round_up(max(w for _, w in sizes), size_divisibility)
    batch_size = len(items)

    pixel_values = torch.zeros(batch_size, 3, height, width)
    strong = torch.zeros(batch_size, 3, height, width) if with_strong else None
    pixel_mask = torch.zeros(batch_size, height, width, dtype=torch.bool)
    instance_ids = torch.full((batch_size, height, width), -1, dtype=torch.int64)
    targets = []
    for b, (item, (h, w)) in enumerate(zip(items, sizes)):
        pixel_values[b, :, :h, :w] = item["weak"]
        if strong is not None:
            strong[b, :, :h, :w] = item["strong"]
        pixel_mask[b, :h, :w] = item["valid"]
        instance_ids[b, :h, :w] = item["instance_ids"]
        masks = torch.zeros(item["masks"].shape[0], height, width)
        masks[:, :h, :w] = item["masks"]
        targets.append({"masks": masks, "labels": item["labels"].to(torch.int64)})

    batch = {"pixel_values": pixel_values, "pixel_mask": pixel_mask, "targets": targets,
             "instance_ids": instance_ids, "image_ids": [int(item["image_id"]) for item in items],
             "image_sizes": [(int(h), int(w)) for h, w in sizes],
             "orig_sizes": [(int(item["orig_size"][0]), int(item["orig_size"][1])) for item in items]}
    if strong is not None:
        batch["pixel_values_strong"] = strong
    return batch
