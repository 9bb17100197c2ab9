"""ONNX export of a student (forward -> class and mask logits) and an onnxruntime predictor that
reuses the PyTorch post-processing."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from cast.models.config import CastStudentConfig
from cast.models.student import instance_inference
from cast.models.student import CastStudent
from cast.structures import Instances
from cast.utils.io import atomic_save

CONFIG_KEY = "cast_student_config"
IMAGE_SIZE_KEY = "image_size"
INPUT_NAMES = ["pixel_values", "pixel_mask"]
OUTPUT_NAMES = ["class_logits", "mask_logits"]


class _LogitsOnly(nn.Module):
    """The student's forward reduced to the two tensors the post-processing needs."""

    def __init__(self, model: CastStudent) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.model(pixel_values, pixel_mask)
        return output.class_logits, output.mask_logits


def export_onnx(model: CastStudent, path: str | Path, image_size: tuple[int, int], opset: int = 17) -> Path:
    """Export `model` for inputs of `image_size` (H, W) and any batch size.

    Graph inputs: pixel_values (B, 3, H, W) float32 in [0, 1] and pixel_mask (B, H, W) bool;
    outputs: class_logits (B, Q, C + 1) and mask_logits (B, Q, ceil(H/4), ceil(W/4)). The student
    config and the image size are stored in the model's metadata for `OnnxStudent`.
    Uses the TorchScript-based exporter: it writes the requested opset (17), while the dynamo
    exporter of torch 2.13 emits opset 18 and cannot down-convert its Pad nodes.
    """
    path = Path(path)
    height, width = int(image_size[0]), int(image_size[1])
    was_training = model.training
    model.eval()
    # Batch 2 for tracing, so nothing gets specialised to a batch of one.
    example = (torch.rand(2, 3, height, width), torch.ones(2, height, width, dtype=torch.bool))
    dynamic_axes = {name: {0: "batch"} for name in INPUT_NAMES + OUTPUT_NAMES}

    def write(tmp: Path) -> None:
        torch.onnx.export(_LogitsOnly(model), example, str(tmp), dynamo=False, opset_version=opset,
                          input_names=INPUT_NAMES, output_names=OUTPUT_NAMES, dynamic_axes=dynamic_axes)
        proto = onnx.load(str(tmp))
        for key, value in ((CONFIG_KEY, json.dumps(model.config.to_dict())),
                           (IMAGE_SIZE_KEY, json.dumps([height, width]))):
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(tmp))

    try:
        # The graph is specialised to one image size on purpose, which is what the tracer warns about.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            atomic_save(path, write)
    finally:
        model.train(was_training)
    return path


class OnnxStudent:
    """A student exported by `export_onnx`, run with onnxruntime; `predict` follows
    `cast.models.protocol.SegmentationModel.predict` (inputs must have the exported size).
    `session_options` (e.g. a thread count) go to onnxruntime as they are."""

    def __init__(self, path: str | Path, providers: list[str] | None = None,
                 session_options: ort.SessionOptions | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: ONNX model not found")
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=session_options,
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for corrupt files
            raise ValueError(f"{self.path}: not a loadable ONNX model: {e}") from None
        metadata = self.session.get_modelmeta().custom_metadata_map
        if CONFIG_KEY not in metadata or IMAGE_SIZE_KEY not in metadata:
            raise ValueError(f"{self.path}: no CAST student metadata; export it with cast.models.export.export_onnx")
        self.config = CastStudentConfig.from_dict(json.loads(metadata[CONFIG_KEY]), source=str(self.path))
        self.image_size = tuple(json.loads(metadata[IMAGE_SIZE_KEY]))

    @property
    def classes(self) -> list[str]:
        return list(self.config.class_names)

    def __call__(self, pixel_values: torch.Tensor | np.ndarray,
                 pixel_mask: torch.Tensor | np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(class_logits, mask_logits) as CPU torch tensors."""
        pixels = np.ascontiguousarray(_to_numpy(pixel_values), dtype=np.float32)
        if pixels.ndim != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[-2:]) != self.image_size:
            raise ValueError(f"{self.path}: expects pixel_values (B, 3, {self.image_size[0]}, {self.image_size[1]}), "
                             f"got {pixels.shape}")
        mask = (np.ones((pixels.shape[0], *self.image_size), dtype=bool) if pixel_mask is None
                else np.ascontiguousarray(_to_numpy(pixel_mask), dtype=bool))
        class_logits, mask_logits = self.session.run(OUTPUT_NAMES, {"pixel_values": pixels, "pixel_mask": mask})
        return torch.from_numpy(class_logits), torch.from_numpy(mask_logits)

    def predict(self, pixel_values: torch.Tensor | np.ndarray, pixel_mask: torch.Tensor | np.ndarray | None = None,
                image_sizes: list[tuple[int, int]] | None = None,
                orig_sizes: list[tuple[int, int]] | None = None) -> list[Instances]:
        """Instances per image, with the same post-processing as `CastStudent.predict`."""
        class_logits, mask_logits = self(pixel_values, pixel_mask)
        return instance_inference(class_logits, mask_logits, self.image_size, image_sizes, orig_sizes,
                                  top_k=self.config.top_k, score_threshold=self.config.score_threshold)


def _to_numpy(array: torch.Tensor | np.ndarray) -> np.ndarray:
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
