"""The foundation-model teachers give what transformers' documented pipelines give, on identical weights
(tests/reference_pipelines.py: the pipelines, the hub folders with their processor files, the models at
their real input resolutions on thin layers), on scikit-image's photos:

- Grounding-DINO + SAM 2 teacher `predict` vs GroundingDinoProcessor + model +
  post_process_grounded_object_detection, then Sam2Processor with those boxes + model +
  post_process_masks;
- SAM 3 teacher `predict` vs Sam3Processor + model + post_process_instance_segmentation, one prompt
  per class.
Boxes, scores, labels and masks must match: box IoU >= 0.99, scores within 1e-3, mask IoU >= 0.98
per instance, the same instances in the same order. The teachers' last step (every pixel to the
best-scoring instance covering it, empty instances dropped) is applied to the reference by
independent code (`paper_overlap_rule`).

Making the comparison meaningful with random weights:
- weights: a random model's scores are near-ties and its mask logits near zero, where rounding noise
  decides. `condition_grounding_dino`, `condition_sam2` and `condition_sam3` (reference_pipelines)
  scale a few output layers so that scores spread and logits have a trained model's size, and make
  Grounding-DINO's [CLS] / [SEP] / "." tokens score low and its class names point apart, as training
  does; both pipelines then load the same folder;
- thresholds: `meaningful_threshold` picks, from the reference's own scores, the threshold keeping
  the most instances such that no score lies within 1e-4 of it, kept scores are 1e-4 apart (their
  order decides overlaps) and, for Grounding-DINO, every kept box's phrase is exactly one class name
  (one token above the text threshold: both rules then name the same class);
- seeds: 0 (models), the photos fixed.

Where the teachers deliberately differ from the reference, the strict comparison applies the
teacher's choice to the reference, and the difference is measured on the reference as documented
(printed as EQUIVALENCE lines, `pytest -s`):
- the teachers resize the float image for SAM 2 / SAM 3 (torch's antialiased bilinear, no
  rounding): the processors resize the uint8 image and round (`float_resize`). Grounding-DINO gets
  the images at the size its processor keeps (short side 800), SAM 3's first photo is at its input
  size (1008 x 1008), where the processors' resize is the identity: no difference there;
- the Grounding-DINO + SAM teacher clips boxes to the image before prompting SAM; the reference
  prompts with boxes that may cross the border (`clip_boxes`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference_pipelines import (box_iou, float_resized, gdino_sam2_reference, grounding_dino_outputs, mask_iou,
                                 meaningful_threshold, paper_overlap_rule, photo, sam3_outputs, sam3_reference,
                                 write_grounding_dino_folder, write_sam2_folder, write_sam3_folder)

from cast.teachers.sam3 import Sam3Teacher
from cast.teachers.vfm import GroundingDinoSamTeacher

CLASSES = ["person", "cat", "cup", "flag"]
SAM3_CLASSES = ["person", "cat", "cup"]
MARGIN = 1e-4
SEED = 0


def canvas(images: list[Image.Image]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The images in [0, 1] padded bottom/right into one batch, as the data loader gives them."""
    height, width = max(image.height for image in images), max(image.width for image in images)
    pixels = torch.zeros(len(images), 3, height, width)
    for b, image in enumerate(images):
        pixels[b, :, :image.height, :image.width] = torch.from_numpy(np.array(image)).permute(2, 0, 1) / 255
    return pixels, [(image.height, image.width) for image in images]


def compare(ours: list, reference: list[dict]) -> dict[str, float]:
    """Instances of the teacher vs the reference's after `paper_overlap_rule`; the figures, asserted."""
    figures = {"instances": 0, "box_iou_min": 1.0, "score_diff_max": 0.0, "mask_iou_min": 1.0}
    for (instances, boxes), ref in zip(ours, reference):
        masks = paper_overlap_rule(ref["masks"])
        nonempty = masks.flatten(1).any(1)
        assert instances.labels.tolist() == [label for label, keep in zip(ref["labels"], nonempty) if keep]
        if not len(instances):
            continue
        figures["instances"] += len(instances)
        figures["box_iou_min"] = min(figures["box_iou_min"], float(box_iou(boxes, ref["boxes"][nonempty]).min()))
        figures["score_diff_max"] = max(figures["score_diff_max"],
                                        float((instances.scores - ref["scores"][nonempty]).abs().max()))
        figures["mask_iou_min"] = min(figures["mask_iou_min"], float(mask_iou(instances.masks, masks[nonempty]).min()))
    return figures


def report(name: str, figures: dict[str, float]) -> None:
    print(f"EQUIVALENCE {name}: " + ", ".join(f"{k}={v:.6g}" for k, v in figures.items()))


def assert_match(figures: dict[str, float], min_instances: int) -> None:
    assert figures["instances"] >= min_instances, figures
    assert figures["box_iou_min"] >= 0.99 and figures["score_diff_max"] <= 1e-3, figures
    assert figures["mask_iou_min"] >= 0.98, figures


@pytest.fixture(scope="module")
def gdino_sam2_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gdino-sam2")
    # Conditioning needs text features only: small copies of the photos serve (and take a second).
    small = [photo("astronaut", 200), photo("coffee", 200)]
    return write_grounding_dino_folder(root / "grounding-dino", CLASSES, SEED, small), write_sam2_folder(root / "sam2",
                                                                                                        SEED)


@pytest.mark.slow
def test_grounding_dino_sam2_teacher_matches_transformers_pipeline(gdino_sam2_dirs):
    gdino_dir, sam2_dir = gdino_sam2_dirs
    # Short side 800 (longest <= 1333): Grounding-DINO's processor keeps the size; one padded batch.
    images = [photo("astronaut", 800), photo("coffee", 800)]
    detection = grounding_dino_outputs(images, CLASSES, gdino_dir)
    _, inputs, outputs = detection
    ids = inputs.input_ids[0].tolist()
    probs = outputs.logits[..., :len(ids)].sigmoid()
    words = {i for name in CLASSES for i in detection[0].tokenizer(name, add_special_tokens=False)["input_ids"]}
    class_tokens = [[position] for position, token in enumerate(ids) if token in words]

    def one_class_token(b: int, q: int, threshold: float) -> bool:
        return (probs[b, q] > threshold).nonzero().squeeze(1).tolist() in class_tokens

    threshold = meaningful_threshold([p.max(-1).values for p in probs], MARGIN, 1, 16, one_class_token)
    teacher = GroundingDinoSamTeacher.from_hub_folders(gdino_dir, sam2_dir, CLASSES, box_threshold=threshold,
                                                       text_threshold=threshold)
    assert teacher.prompt_ids[0].tolist() == ids  # the processor's "person. cat. cup. flag." tokens
    pixels, sizes = canvas(images)
    ours = teacher.predict_with_boxes(pixels, None, sizes, sizes)

    strict = compare(ours, gdino_sam2_reference(images, CLASSES, detection, sam2_dir, threshold, threshold,
                                                clip_boxes=True, float_resize=True))
    report(f"gdino-sam2 strict (threshold {threshold:.4f})", strict)
    assert_match(strict, min_instances=4)

    # The documented differences, measured on the reference as transformers documents it.
    reference = gdino_sam2_reference(images, CLASSES, detection, sam2_dir, threshold, threshold)
    measured = compare(ours, reference)
    assert measured["score_diff_max"] <= 1e-3 and measured["instances"] == strict["instances"]
    clipped = [{**ref, "boxes": torch.minimum(ref["boxes"].clamp(min=0), torch.tensor([w, h, w, h]))}
               for ref, (h, w) in zip(reference, sizes)]
    assert compare(ours, clipped)["box_iou_min"] >= 0.99  # the boxes differ by the clipping alone
    crossing = sum(int(((ref["boxes"][:, :2] < 0) | (ref["boxes"][:, 2:] > torch.tensor([w, h]))).any(1).sum())
                   for ref, (h, w) in zip(reference, sizes))
    report(f"gdino-sam2 as documented (boxes crossing the border: {crossing})", measured)
    rounded = compare(ours, gdino_sam2_reference(images, CLASSES, detection, sam2_dir, threshold, threshold,
                                                 clip_boxes=True))
    report("gdino-sam2 with clipped boxes, SAM 2 input from the processor (uint8)", rounded)


@pytest.fixture(scope="module")
def sam3_dir(tmp_path_factory) -> Path:
    return write_sam3_folder(tmp_path_factory.mktemp("sam3"), SAM3_CLASSES, SEED)


@pytest.mark.slow
def test_sam3_teacher_matches_transformers_pipeline(sam3_dir):
    # The first photo at SAM 3's input size (the processor's resize is the identity), the second
    # non-square, padded into the batch, stretched to 1008 x 1008 by both.
    images = [photo("astronaut").resize((1008, 1008), Image.BILINEAR), photo("coffee")]
    outputs = sam3_outputs(images, SAM3_CLASSES, sam3_dir, float_resize=True)
    processor, runs = outputs
    square_inputs = processor(images=images[0], return_tensors="pt").pixel_values
    torch.testing.assert_close(float_resized(images[0], processor.image_processor), square_inputs)
    scores = [torch.cat([(o.pred_logits.sigmoid() * o.presence_logits.sigmoid())[0] for _, o in per_class])
              for per_class in runs]
    threshold = meaningful_threshold(scores, MARGIN, 2, 16)
    teacher = Sam3Teacher.from_hub_folder(sam3_dir, SAM3_CLASSES, box_threshold=threshold, mask_threshold=0.5)
    assert teacher.prompt_ids.tolist() == [inputs.input_ids[0].tolist() for inputs, _ in runs[0]]
    pixels, sizes = canvas(images)
    ours = teacher.predict_with_boxes(pixels, None, sizes, sizes)

    strict = compare(ours, sam3_reference(images, outputs, threshold, 0.5))
    report(f"sam3 strict (threshold {threshold:.4f})", strict)
    assert_match(strict, min_instances=4)

    # The non-square photo through the processor's own (uint8) resize: the rounding, measured.
    measured = compare(ours[1:], sam3_reference(images[1:], sam3_outputs(images[1:], SAM3_CLASSES, sam3_dir),
                                                threshold, 0.5))
    assert measured["score_diff_max"] <= 1e-3 and measured["box_iou_min"] >= 0.99
    report("sam3 as documented, non-square photo (uint8 resize)", measured)
