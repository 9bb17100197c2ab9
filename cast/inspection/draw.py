"""Drawing for the inspection tools: coloured instance overlays, heat maps, enlargement of small
images for display."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import matplotlib
import numpy as np

# Saturated colours that photos rarely contain, so overlays stand out (and tests can find them).
PALETTE = np.array([(255, 0, 255), (0, 255, 0), (0, 160, 255), (255, 200, 0), (255, 0, 0), (0, 255, 255),
                    (160, 0, 255), (255, 120, 0), (0, 255, 140), (255, 0, 120)], np.uint8)
# Small images are shown enlarged by a whole factor (nearest neighbour) up to this short side:
# gradio never scales an image up, and a 128-pixel overlay is too small to click precisely.
MIN_DISPLAY_SIDE = 384


@dataclass
class ImageInstances:
    """Instances of one image in numpy form (ground truth has no scores)."""

    masks: np.ndarray  # (K, H, W) bool
    labels: np.ndarray  # (K,) int64, contiguous class index
    scores: np.ndarray | None = None  # (K,) float32

    def __len__(self) -> int:
        return int(len(self.labels))

    def above(self, threshold: float) -> "ImageInstances":
        """Instances scoring at least `threshold` (all of them when there are no scores)."""
        if self.scores is None:
            return self
        keep = self.scores >= threshold
        return ImageInstances(self.masks[keep], self.labels[keep], self.scores[keep])


def display_scale(height: int, width: int) -> int:
    """Whole factor by which an image of this size is enlarged for display (1 for large images)."""
    return max(1, math.ceil(MIN_DISPLAY_SIDE / max(1, min(height, width))))


def enlarge(array: np.ndarray, scale: int, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """Repeat each pixel `scale` x `scale` times along `axes` (nearest-neighbour enlargement)."""
    if scale == 1:
        return array
    return np.repeat(np.repeat(array, scale, axis=axes[0]), scale, axis=axes[1])


def colour_of(index: int) -> np.ndarray:
    return PALETTE[index % len(PALETTE)]


def draw_instances(image: np.ndarray, instances: ImageInstances, classes: Sequence[str],
                   alpha: float = 0.5) -> np.ndarray:
    """The image with each instance filled (blended by `alpha`), outlined in its solid colour and
    named with its class (and score). Instance i gets `colour_of(i)`."""
    out = image.astype(np.float32)
    for i, mask in enumerate(instances.masks):
        out[mask] = (1.0 - alpha) * out[mask] + alpha * colour_of(i).astype(np.float32)
    out = np.ascontiguousarray(np.round(out).astype(np.uint8))
    height, width = image.shape[:2]
    thickness = max(1, round(min(height, width) / 200))
    font_scale = max(0.3, min(height, width) / 600)
    for i, mask in enumerate(instances.masks):
        colour = tuple(int(c) for c in colour_of(i))
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, colour, thickness)
        ys, xs = np.nonzero(mask)
        if len(xs) == 0:
            continue
        text = classes[int(instances.labels[i])]
        if instances.scores is not None:
            text += f" {float(instances.scores[i]):.2f}"
        origin = (int(xs.min()), max(int(ys.min()) - 2, 8))
        cv2.putText(out, text, origin, cv2.FONT_HERSHEY_SIMPLEX, font_scale, colour, 1, cv2.LINE_AA)
    return out


def heat_colours(values: np.ndarray, colormap: str = "inferno") -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 colours."""
    rgba = matplotlib.colormaps[colormap](np.clip(values, 0.0, 1.0))
    return np.round(rgba[..., :3] * 255).astype(np.uint8)


def dot(image: np.ndarray, x: float, y: float, colour: tuple[int, int, int], radius: int, filled: bool) -> None:
    cv2.circle(image, (int(round(x)), int(round(y))), radius, colour, -1 if filled else max(1, radius // 2),
               cv2.LINE_AA)
