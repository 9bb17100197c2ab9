"""The embedded demo data set: textured shapes over real photos, in two visibly different domains.

No package ships an instance-segmentation data set, so the project draws its own, in COCO json +
PNG form, deterministically from a seed:

    root/source_train/{images/*.png, annotations.json}   "source" domain (natural colours)
    root/target_train/{images/*.png, annotations.json}   "target" domain (other backgrounds,
    root/target_val/{images/*.png, annotations.json}      cool colour cast, low contrast, blur, noise)
    root/manifest.json                                    written last: the set is complete

Each image holds 1..`max_objects` shapes of `DEMO_CLASSES`, told apart by outline only (each class
has the same area at a given size; textures and colours are drawn independently of the class).
Later shapes occlude earlier ones; a mask is the visible part of its shape, exact by construction,
and a shape whose visible area is below `min_visible_area` is never painted. Object textures and
backgrounds are crops of the real photos in `skimage.data`. In the COCO files, `file_name` is
relative to the split folder (``images/000001.png``); image and annotation ids are unique over all
splits; masks are compressed RLE.

    python -m cast.data.demo --root data/demo
"""
from __future__ import annotations

import argparse
import functools
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import skimage.data
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from cast.utils.folder_lock import exclusive_folder
from cast.utils.io import atomic_write_text, read_json

DEMO_CLASSES = ("disc", "square", "triangle", "cross")
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = (("source_train", "source"), ("target_train", "target"), ("target_val", "target"))
DOMAIN_BACKGROUNDS = {
    "source": ("astronaut", "coffee", "chelsea", "rocket"),
    "target": ("camera", "brick", "gravel", "grass", "moon", "coins"),
}
OBJECT_TEXTURES = ("immunohistochemistry", "astronaut", "coffee", "chelsea", "rocket")
# Target domain: a cool colour cast, hazy low-contrast lighting, blur and sensor noise.
TARGET_GAINS = np.array([0.80, 0.95, 1.20], np.float32)
TARGET_CONTRAST = 0.6
TARGET_LIFT = 20.0
TARGET_BLUR_SIGMA = (0.7, 1.3)
TARGET_NOISE_STD = 6.0
# Shape size: the radius of a disc of the same area, as a fraction of the image side.
SIZE_RANGE = (0.06, 0.2)
PNG_COMPRESS_LEVEL = 6


def _polygon(vertices: list[tuple[float, float]]) -> np.ndarray:
    return np.asarray(vertices, np.float64)


def _regular(n: int, start: float) -> np.ndarray:
    angles = start + 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _cross(half_width: float) -> np.ndarray:
    a = half_width
    return _polygon([(a, 1), (a, a), (1, a), (1, -a), (a, -a), (a, -1),
                     (-a, -1), (-a, -a), (-1, -a), (-1, a), (-a, a), (-a, 1)])


def _unit_area(outline: np.ndarray) -> np.ndarray:
    """Scale an outline to the area of the unit disc, so that size never hints at the class."""
    x, y = outline[:, 0], outline[:, 1]
    area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
    return outline * np.sqrt(np.pi / area)


SHAPES = {
    "disc": _unit_area(_regular(64, 0.0)),
    "square": _unit_area(_regular(4, np.pi / 4)),
    "triangle": _unit_area(_regular(3, -np.pi / 2)),
    "cross": _unit_area(_cross(0.34)),
}


@functools.cache
def _photo(name: str) -> np.ndarray:
    """An skimage.data photo as (H, W, 3) uint8 RGB, at most 512 pixels on its long side."""
    image = np.asarray(getattr(skimage.data, name)())
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    image = image[:, :, :3].astype(np.uint8)
    scale = 512 / max(image.shape[:2])
    if scale < 1:  # smaller photos make every crop cheaper
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return image


def _photo_crop(rng: np.random.Generator, name: str, size: int) -> np.ndarray:
    """A random square crop (30-100 % of the short side) of a photo, resized to size x size, float32."""
    photo = _photo(name)
    h, w = photo.shape[:2]
    side = int(rng.uniform(0.3, 1.0) * min(h, w))
    y0 = int(rng.integers(0, h - side + 1))
    x0 = int(rng.integers(0, w - side + 1))
    crop = photo[y0:y0 + side, x0:x0 + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=interpolation).astype(np.float32)


def _vivid_colour(rng: np.random.Generator) -> np.ndarray:
    hsv = np.array([[[rng.integers(0, 180), rng.integers(160, 256), rng.integers(150, 256)]]], np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _shape_mask(rng: np.random.Generator, class_name: str, size: int) -> np.ndarray:
    """The full (unoccluded) mask of one shape with random size, rotation and position."""
    radius = size * np.exp(rng.uniform(np.log(SIZE_RANGE[0]), np.log(SIZE_RANGE[1])))
    angle = rng.uniform(0, 2 * np.pi)
    # Centres stay inside the image so that a good part of every shape is visible.
    centre = rng.uniform(0.3 * radius, size - 0.3 * radius, size=2)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = SHAPES[class_name] @ rotation.T * radius + centre
    canvas = np.zeros((size, size), np.uint8)
    # 4 fractional bits: sub-pixel vertices; LINE_8 keeps the mask binary (no anti-aliasing).
    cv2.fillPoly(canvas, [np.round(points * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return canvas.astype(bool)


def _appearance(rng: np.random.Generator, mask: np.ndarray, size: int) -> np.ndarray:
    """Object pixels: a photo texture tinted with a vivid colour and a dark outline, (size, size, 3)."""
    texture = _photo_crop(rng, OBJECT_TEXTURES[rng.integers(len(OBJECT_TEXTURES))], size)
    pixels = 0.5 * texture + 0.5 * _vivid_colour(rng)
    # The outline lies inside the mask, so the visible mask stays exact.
    inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8), borderType=cv2.BORDER_REPLICATE)
    pixels[mask & ~inner.astype(bool)] *= 0.3
    return pixels


def _visible(full_masks: list[np.ndarray]) -> list[np.ndarray]:
    """Visible part of each mask when later masks are painted over earlier ones."""
    covered = np.zeros_like(full_masks[0])
    visible = [covered] * len(full_masks)
    for i in range(len(full_masks) - 1, -1, -1):
        visible[i] = full_masks[i] & ~covered
        covered = covered | full_masks[i]
    return visible


def _domain_style(rng: np.random.Generator, image: np.ndarray, domain: str) -> np.ndarray:
    if domain == "source":
        return image * rng.uniform(0.9, 1.1)  # natural lighting variation only
    image = image * (TARGET_GAINS * rng.uniform(0.95, 1.05, size=3).astype(np.float32))
    mean = image.mean(axis=(0, 1), keepdims=True)
    image = mean + TARGET_CONTRAST * (image - mean) + TARGET_LIFT
    image = cv2.GaussianBlur(image, (0, 0), sigmaX=rng.uniform(*TARGET_BLUR_SIGMA))
    return image + rng.normal(0.0, TARGET_NOISE_STD, image.shape).astype(np.float32)


def render_scene(rng: np.random.Generator, domain: str, size: int = 128, max_objects: int = 10,
                 min_visible_area: int = 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one scene: image (size, size, 3) uint8, visible masks (K, size, size) bool, labels (K,) int64.

    K is in 1..max_objects; masks never overlap and each covers at least `min_visible_area` pixels.
    """
    if domain not in DOMAIN_BACKGROUNDS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {sorted(DOMAIN_BACKGROUNDS)}")
    backgrounds = DOMAIN_BACKGROUNDS[domain]
    image = _photo_crop(rng, backgrounds[rng.integers(len(backgrounds))], size)
    while True:  # an image with no visible shape left is drawn again (rare; still a function of rng)
        labels = rng.integers(0, len(DEMO_CLASSES), size=rng.integers(1, max_objects + 1))
        full = [_shape_mask(rng, DEMO_CLASSES[c], size) for c in labels]
        keep = [i for i, m in enumerate(_visible(full)) if m.sum() >= min_visible_area]
        # Removing a shape only uncovers the others, so one pass keeps every survivor above the minimum.
        full, labels = [full[i] for i in keep], labels[keep]
        if len(full) > 0:
            break
    for mask in full:
        image[mask] = _appearance(rng, mask, size)[mask]
    image = _domain_style(rng, image, domain)
    masks = np.stack(_visible(full))
    return np.clip(np.round(image), 0, 255).astype(np.uint8), masks, labels.astype(np.int64)


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # Fixed settings and no metadata: the same pixels always give the same bytes.
    Image.fromarray(image).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _annotation(mask: np.ndarray, label: int, image_id: int, ann_id: int) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"id": ann_id, "image_id": image_id, "category_id": int(label) + 1, "iscrowd": 0,
            "area": int(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}}


def _params(seed: int, image_size: int, num_source_train: int, num_target_train: int, num_target_val: int,
            max_objects: int, min_visible_area: int) -> dict[str, int]:
    params = {"seed": seed, "image_size": image_size, "num_source_train": num_source_train,
              "num_target_train": num_target_train, "num_target_val": num_target_val,
              "max_objects": max_objects, "min_visible_area": min_visible_area}
    for key, value in params.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ValueError(f"demo data: {key} must be an int, got {value!r}")
    if image_size < 32:
        raise ValueError(f"demo data: image_size must be >= 32, got {image_size}")
    for key in ("num_source_train", "num_target_train", "num_target_val", "max_objects", "min_visible_area"):
        if params[key] < 1:
            raise ValueError(f"demo data: {key} must be >= 1, got {params[key]}")
    # Scenes are redrawn until one shape is visible enough: beyond a quarter of the largest shape's area
    # that would take very long (beyond its full area, forever).
    if min_visible_area > 0.25 * np.pi * (SIZE_RANGE[1] * image_size) ** 2:
        raise ValueError(f"demo data: min_visible_area={min_visible_area} is more than the largest shape "
                         f"can show at image_size={image_size}")
    return {k: int(v) for k, v in params.items()}


def _complete(root: Path, params: dict[str, int]) -> dict[str, Any] | None:
    """The manifest of `root` when it holds a complete data set drawn with `params`, else None."""
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = read_json(path)
    except ValueError:
        return None  # a broken manifest means an unusable set: draw it again
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION \
            or manifest.get("params") != params:
        return None
    for split in manifest.get("splits", {}).values():
        folder = root / split["image_root"]
        if not (root / split["annotations"]).is_file() or \
                sum(1 for _ in (folder / "images").glob("*.png")) != split["num_images"]:
            return None
    return manifest


def generate(root: str | Path, seed: int = 0, image_size: int = 128, num_source_train: int = 400,
             num_target_train: int = 300, num_target_val: int = 100, max_objects: int = 10,
             min_visible_area: int = 24, progress: bool = True) -> dict[str, Any]:
    """Write the demo data set under `root` (or keep it, when it is already complete) and return its manifest.

    The manifest holds `params`, `classes` and, per split, `domain`, `annotations` (the COCO json)
    and `image_root` (the folder that `file_name` is relative to), both relative to `root`, with
    `num_images` and `num_instances`. The same arguments always write byte-identical files.
    """
    root = Path(root)
    params = _params(seed, image_size, num_source_train, num_target_train, num_target_val, max_objects,
                     min_visible_area)
    # A complete set is only read, so it may sit on a read-only folder; drawing holds the folder, and
    # whoever waited for another process's draw finds it complete.
    manifest = _complete(root, params)
    if manifest is not None:
        return manifest
    with exclusive_folder(root, label="demo data", wait=True):
        return _complete(root, params) or _draw(root, params, progress)


def _draw(root: Path, params: dict[str, int], progress: bool) -> dict[str, Any]:
    seed, image_size, max_objects, min_visible_area = (params[k] for k in ("seed", "image_size", "max_objects",
                                                                           "min_visible_area"))
    counts = {split: params[f"num_{split}"] for split, _ in SPLITS}
    # The manifest marks a complete set: remove it before touching anything else.
    (root / MANIFEST).unlink(missing_ok=True)
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(DEMO_CLASSES)]
    manifest = {"format_version": FORMAT_VERSION, "params": params, "classes": list(DEMO_CLASSES), "splits": {}}
    image_id = ann_id = 0
    with tqdm(total=sum(counts.values()), desc="demo data", unit="img", disable=not progress) as bar:
        for split_index, (split, domain) in enumerate(SPLITS):
            image_dir = root / split / "images"
            image_dir.mkdir(parents=True, exist_ok=True)
            images, annotations, written = [], [], set()
            for i in range(counts[split]):
                # One generator per image: an image does not depend on the other splits' counts.
                rng = np.random.default_rng([seed, split_index, i])
                image, masks, labels = render_scene(rng, domain, image_size, max_objects, min_visible_area)
                image_id += 1
                file_name = f"{i:06d}.png"
                # Plain writes are enough here: the manifest, written last and atomically, vouches for them.
                (image_dir / file_name).write_bytes(_png_bytes(image))
                written.add(file_name)
                images.append({"id": image_id, "file_name": f"images/{file_name}", "height": image_size,
                               "width": image_size, "domain": domain})
                for mask, label in zip(masks, labels):
                    ann_id += 1
                    annotations.append(_annotation(mask, int(label), image_id, ann_id))
                bar.update()
            for stale in image_dir.glob("*.png"):  # left over from a run with larger counts
                if stale.name not in written:
                    stale.unlink()
            coco = {"info": {"description": f"CAST workbench demo data, {split}", "domain": domain,
                             "seed": seed, "version": FORMAT_VERSION},
                    "images": images, "annotations": annotations, "categories": categories}
            atomic_write_text(root / split / "annotations.json", json.dumps(coco, sort_keys=True))
            manifest["splits"][split] = {"domain": domain, "annotations": f"{split}/annotations.json",
                                         "image_root": split, "num_images": len(images),
                                         "num_instances": len(annotations)}
    atomic_write_text(root / MANIFEST, json.dumps(manifest, sort_keys=True, indent=2))
    return manifest


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: `python -m cast.data.demo --root data/demo [--seed 0] ...`."""
    parser = argparse.ArgumentParser(description="Generate the CAST workbench demo data set.")
    parser.add_argument("--root", default="data/demo", help="output folder (default: data/demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--num-source-train", type=int, default=400)
    parser.add_argument("--num-target-train", type=int, default=300)
    parser.add_argument("--num-target-val", type=int, default=100)
    parser.add_argument("--max-objects", type=int, default=10)
    parser.add_argument("--min-visible-area", type=int, default=24)
    args = parser.parse_args(argv)
    manifest = generate(args.root, seed=args.seed, image_size=args.image_size,
                        num_source_train=args.num_source_train, num_target_train=args.num_target_train,
                        num_target_val=args.num_target_val, max_objects=args.max_objects,
                        min_visible_area=args.min_visible_area)
    for split, info in manifest["splits"].items():
        print(f"{args.root}/{split}: {info['num_images']} images, {info['num_instances']} instances "
              f"({info['domain']} domain)")


if __name__ == "__main__":
    main()
