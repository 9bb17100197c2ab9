"""Images (paths, arrays, PIL images) to instances at their original resolution: the one path
`predict_images` (every model's), `python -m cast predict` and `label` share.

An image is resized by `cast.data.batches.EvalTransform` (short side `test_size`; None keeps its
own size; a fixed-size graph such as an exported ONNX model additionally shrinks it to fit its
input) and padded into a batch by `collate_instances`, exactly as evaluation does; the model's
`predict` crops each image's masks back out of the padding and resizes them to the image's
stored size. Instances scoring below `score_threshold` and empty masks are dropped.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F

from cast.data.batches import EvalTransform, InstanceTorchDataset, collate_instances
from cast.data.dataset import load_image
from cast.structures import InstanceSample, Instances

ImageInput = Union[str, os.PathLike, np.ndarray, Any]  # Any: a PIL image
# Eager models pad batches to this multiple, as evaluation does (the student pads to it anyway).
SIZE_DIVISIBILITY = 32


def as_sample(image: ImageInput, image_id: int = 0) -> InstanceSample:
    """One image as an `InstanceSample` without instances: a path is decoded by
    `cast.data.dataset.load_image` (EXIF orientation, 16-bit, alpha), a PIL image converted to RGB,
    an array must be (H, W, 3) uint8 RGB (or (H, W) gray)."""
    if isinstance(image, (str, os.PathLike)):
        array, name = load_image(image), os.fspath(image)
    elif isinstance(image, np.ndarray):
        array, name = (np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image), ""
    elif hasattr(image, "convert"):  # PIL
        array, name = np.asarray(image.convert("RGB")), ""
    else:
        raise TypeError(f"expected an image path, an (H, W, 3) uint8 array or a PIL image, got {type(image).__name__}")
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {array.shape} {array.dtype}")
    height, width = array.shape[:2]
    return InstanceSample(image=np.ascontiguousarray(array), masks=np.zeros((0, height, width), bool),
                          labels=np.zeros(0, np.int64), image_id=int(image_id), file_name=name)


def eval_view(sample: InstanceSample, test_size: int | None,
              input_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """The evaluation view of one image (see the module docstring), computed as evaluation computes
    it (on one intra-op thread: some resize kernels round differently with more)."""
    return InstanceTorchDataset([sample], EvalTransform(test_size, max_size=input_size))[0]


def collate_views(views: Sequence[dict[str, Any]], input_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """A batch of views: padded to a multiple of 32, or exactly to a fixed-size graph's `input_size`."""
    if input_size is None:
        return collate_instances(views, SIZE_DIVISIBILITY)
    batch = collate_instances(views, 1)
    pad = (0, input_size[1] - batch["pixel_values"].shape[-1], 0, input_size[0] - batch["pixel_values"].shape[-2])
    batch["pixel_values"] = F.pad(batch["pixel_values"], pad)
    batch["pixel_mask"] = F.pad(batch["pixel_mask"], pad)
    return batch


def predict_batch(model: Any, batch: dict[str, Any], score_threshold: float,
                  device: torch.device | str = "cpu") -> list[Instances]:
    """The model's instances on a collated batch, on the CPU, at least `score_threshold`, non-empty."""
    preds = model.predict(batch["pixel_values"].to(device), batch["pixel_mask"].to(device),
                          image_sizes=batch["image_sizes"], orig_sizes=batch["orig_sizes"])
    out = []
    for inst in preds:
        inst = inst.to("cpu")
        keep = (inst.scores >= score_threshold) & inst.masks.flatten(1).any(dim=1)
        out.append(inst.filter(keep))
    return out


class PredictImages:
    """`predict_images` for any model with the `predict` of `cast.models.protocol.SegmentationModel`
    (a base class of the student, the foundation-model teacher and the ONNX student)."""

    # (H, W) of a graph that only takes inputs of one size (an exported ONNX model); None: any size.
    fixed_input_size: tuple[int, int] | None = None
    # Short side images are resized to when predict_images is given no test_size (None: their own).
    default_test_size: int | None = None

    def predict_images(self, images_or_paths: ImageInput | Sequence[ImageInput], score_threshold: float = 0.5,
                       test_size: int | None = None, batch_size: int = 1) -> list[Instances]:
        """Instances of each image (a path, an (H, W, 3) uint8 RGB array or a PIL image, or a list
        of them) at the image's original resolution, best first: masks (K, H, W) bool, labels (K,)
        indices into `classes`, scores (K,). `test_size`: short side the model sees (default: the
        model's `default_test_size`, else the image's own size)."""
        single = isinstance(images_or_paths, (str, os.PathLike, np.ndarray)) or hasattr(images_or_paths, "convert")
        images = [images_or_paths] if single else list(images_or_paths)
        test_size = test_size if test_size is not None else self.default_test_size
        results: list[Instances] = []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                views = [eval_view(as_sample(image, start + i), test_size, self.fixed_input_size)
                         for i, image in enumerate(images[start:start + batch_size])]
                batch = collate_views(views, self.fixed_input_size)
                results += predict_batch(self, batch, score_threshold, self.input_device())
        return results

    def input_device(self) -> torch.device:
        """Where inputs go: the device of the model's parameters (the CPU for an ONNX model)."""
        parameters = getattr(self, "parameters", None)
        if parameters is not None:
            for p in parameters():
                return p.device
        return torch.device("cpu")
