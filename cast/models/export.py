"""ONNX export of a student (forward -> class and mask logits) with a sidecar json, and the
onnxruntime model that predicts like the student from the two files alone.

`export_onnx` writes `<name>.onnx`, the graph for one input size (H, W) and any batch size, and
`<name>.onnx.json`, the sidecar: the classes, the input (size, layout, range), the normalisation
(applied inside the graph), the student's configuration (post-processing settings), the test
size its run evaluated at, the opset and how the graph was shaped, optimised and quantised.
`OnnxStudent` (what `cast.load_model("x.onnx")` returns) needs both.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from cast.inference.api import PredictImages
from cast.models.config import CastStudentConfig
from cast.models.student import CastStudent, instance_inference
from cast.structures import Instances
from cast.utils.io import atomic_path, atomic_save, atomic_write_json, read_json

FORMAT = "cast-onnx-student"
FORMAT_VERSION = 1
INPUT_NAMES = ["pixel_values", "pixel_mask"]
OUTPUT_NAMES = ["class_logits", "mask_logits"]


def sidecar_path(path: str | os.PathLike) -> Path:
    """The sidecar json of an .onnx file: the same name with ".json" appended."""
    path = Path(path)
    return path.with_name(path.name + ".json")


class _LogitsOnly(nn.Module):
    """The student's forward reduced to the two tensors the post-processing needs."""

    def __init__(self, model: CastStudent) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.model(pixel_values, pixel_mask)
        return output.class_logits, output.mask_logits


def export_onnx(model: CastStudent, path: str | os.PathLike, image_size: tuple[int, int], opset: int = 17,
                optimize: bool = True, int8: bool = False, test_size: int | None = None) -> Path:
    """Export `model` for inputs of `image_size` (H, W) and any batch size; write the sidecar.

    Graph inputs: pixel_values (B, 3, H, W) float32 RGB in [0, 1] and pixel_mask (B, H, W) bool
    (True on image pixels); outputs: class_logits (B, Q, C + 1) and mask_logits (B, Q, ceil(H/4),
    ceil(W/4)). `optimize`: trace the graph in the shape of `cast.models.onnx_graph` (fused
    attention, constant position embeddings, low-resolution attention masks). `int8`: dynamic
    int8 quantisation of the MatMul weights (smaller and faster; outputs no longer agree with eager
    to 1e-3, measure the AP). Uses the TorchScript-based exporter: it writes the requested opset,
    while torch 2.13's dynamo exporter emits opset 18 and cannot down-convert its Pad nodes.
    """
    from cast.models.onnx_graph import CUSTOM_OPSETS, export_shaped

    path = Path(path)
    height, width = int(image_size[0]), int(image_size[1])
    was_training = model.training
    model.eval()
    # Batch 2 for tracing, so nothing gets specialised to a batch of one.
    example = (torch.rand(2, 3, height, width), torch.ones(2, height, width, dtype=torch.bool))
    dynamic_axes = {name: {0: "batch"} for name in INPUT_NAMES + OUTPUT_NAMES}

    def write(tmp: Path) -> None:
        shaped = export_shaped(model, (height, width)) if optimize else contextlib.nullcontext()
        with shaped:
            torch.onnx.export(_LogitsOnly(model), example, str(tmp), dynamo=False, opset_version=opset,
                              input_names=INPUT_NAMES, output_names=OUTPUT_NAMES, dynamic_axes=dynamic_axes,
                              custom_opsets=CUSTOM_OPSETS if optimize else None)
        if int8:
            _quantize(tmp)

    try:
        # The graph is specialised to one image size on purpose, which is what the tracer warns about.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            atomic_save(path, write)
    finally:
        model.train(was_training)
    config = model.config
    atomic_write_json(sidecar_path(path), {
        "format": FORMAT, "version": FORMAT_VERSION, "model_type": model.model_type, "preset": config.preset,
        "classes": list(config.class_names),
        "input": {"names": INPUT_NAMES, "size": [height, width], "batch": "dynamic",
                  "pixel_values": "float32 (B, 3, H, W), RGB in [0, 1], image at the top left, zero padding",
                  "pixel_mask": "bool (B, H, W), True on image pixels"},
        "outputs": {"names": OUTPUT_NAMES, "class_logits": "(B, Q, C + 1), no-object last",
                    "mask_logits": "(B, Q, ceil(H / 4), ceil(W / 4))"},
        "normalisation": {"mean": list(config.image_mean), "std": list(config.image_std), "applied": "inside the graph"},
        "test_size": test_size, "opset": opset, "graph": "shaped" if optimize else "literal",
        "quantisation": "dynamic int8 (MatMul weights)" if int8 else None, "student_config": config.to_dict()},
        indent=1)
    return path


def _quantize(path: Path) -> None:
    """Dynamic int8 quantisation of the graph at `path`, in place."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process the graph for static quantisation
    try:
        with atomic_path(path) as tmp:
            quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    finally:
        root.setLevel(level)


class OnnxStudent(PredictImages):
    """A student exported by `export_onnx`, run with onnxruntime: `predict` follows
    `cast.models.protocol.SegmentationModel.predict` (inputs of the exported size), `predict_images`
    resizes any image to fit. `session_options` (e.g. a thread count) go to onnxruntime as they are."""

    model_type = "cast_student_onnx"

    def __init__(self, path: str | os.PathLike, providers: list[str] | None = None,
                 session_options: ort.SessionOptions | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: ONNX model not found")
        sidecar = sidecar_path(self.path)
        if not sidecar.is_file():
            raise FileNotFoundError(f"{self.path}: its sidecar {sidecar.name} is missing (the classes, input size and "
                                    "settings `python -m cast export` writes beside the graph)")
        info = read_json(sidecar)
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise ValueError(f"{sidecar}: not a CAST ONNX sidecar (format {FORMAT!r})")
        try:
            self.config = CastStudentConfig.from_dict(info["student_config"], source=str(sidecar))
            self.image_size = tuple(int(s) for s in info["input"]["size"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"{sidecar}: incomplete sidecar ({e})") from None
        self.info = info
        self.default_test_size = info.get("test_size")
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=session_options,
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for corrupt files
            raise ValueError(f"{self.path}: not a loadable ONNX model: {e}") from None

    @property
    def classes(self) -> list[str]:
        return list(self.config.class_names)

    @property
    def fixed_input_size(self) -> tuple[int, int]:
        return self.image_size

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


def agreement(model: CastStudent, path: str | os.PathLike, seed: int = 0, queries: int = 10) -> dict[str, Any]:
    """How far the exported graph at `path` is from eager `model` on a fixed random test input of
    the exported size: the largest absolute differences of the class and of the mask logits, and
    the IoU between the two paths' full-resolution binary masks of eager's `queries` best queries."""
    onnx_model = OnnxStudent(path)
    height, width = onnx_model.image_size
    pixels = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        eager = model.eval()(pixels)
    class_logits, mask_logits = onnx_model(pixels)
    best = eager.class_logits[0].softmax(-1)[:, :-1].amax(-1).topk(min(queries, class_logits.shape[1])).indices

    def full_resolution(logits: torch.Tensor) -> torch.Tensor:
        up = torch.nn.functional.interpolate(logits[0, best][None], scale_factor=4, mode="bilinear",
                                             align_corners=False)
        return up[0, :, :height, :width] > 0  # sigmoid > 0.5

    ours, theirs = full_resolution(mask_logits), full_resolution(eager.mask_logits)
    union = (ours | theirs).flatten(1).sum(1)
    ious = torch.where(union > 0, (ours & theirs).flatten(1).sum(1) / union.clamp(min=1), torch.ones(()))
    return {"class_logits_max_abs_diff": float((class_logits - eager.class_logits).abs().max()),
            "mask_logits_max_abs_diff": float((mask_logits - eager.mask_logits).abs().max()),
            "logits_max_abs": float(max(eager.class_logits.abs().max(), eager.mask_logits.abs().max())),
            "mask_iou_mean": float(ious.mean()), "mask_iou_min": float(ious.min()), "instances": int(len(ious))}


def _to_numpy(array: torch.Tensor | np.ndarray) -> np.ndarray:
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
