"""A CAST run in FiftyOne, and FiftyOne Brain curation that feeds back into the method.

- `export_run`: one sample per image of the run (tagged ``val``, ``labeled`` or ``unlabeled``)
  with the ground truth, every stage's pseudo-labels and every model's predictions as instance
  masks (`fo.Detections`, each mask cropped to its box, boxes relative to the image).
- `launch`: `export_run` + the FiftyOne App (``python -m cast fiftyone --run runs/<name>``).
- `uniqueness_split`: which images to label, chosen by FiftyOne Brain uniqueness instead of at
  random; returns a split in the format of `cast.data.splits.make_split`.
- `rank_pseudo_label_mistakes`: pseudo-labels ranked by FiftyOne Brain mistakenness against
  another model's predictions (e.g. the adapted teacher's), worst first.

FiftyOne runs its own MongoDB; importing this module starts nothing until a dataset is made.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import fiftyone as fo
import fiftyone.brain as fob
import numpy as np
from tqdm import tqdm

from cast.data.dataset import ImageDataset, load_image
from cast.data.splits import validate_split
from cast.inspection import GROUND_TRUTH, ImageInstances, RunContents

GROUND_TRUTH_FIELD = "ground_truth"
DEFAULT_PORT = 5151
DEFAULT_ADDRESS = "127.0.0.1"
# Image statistics embedding: a colour thumbnail plus an edge-orientation histogram.
THUMBNAIL_SIZE = 8
ORIENTATION_BINS = 8


def field_name(source: str) -> str:
    """FiftyOne field of a label source of `RunContents.sources()` ("pseudo_labels/x" -> "pseudo_labels_x")."""
    return GROUND_TRUTH_FIELD if source == GROUND_TRUTH else source.replace("/", "_")


def to_detections(instances: ImageInstances, classes: Sequence[str]) -> fo.Detections:
    """Instance masks as FiftyOne detections: relative [x, y, w, h] boxes that enclose each mask
    exactly (whole pixels), the mask cropped to that box, the score as confidence."""
    detections = []
    height, width = instances.masks.shape[1:]
    for k, mask in enumerate(instances.masks):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if len(rows) == 0:
            continue  # an empty mask has no box
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        detection = fo.Detection(label=classes[int(instances.labels[k])],
                                 bounding_box=[x0 / width, y0 / height, (x1 - x0) / width, (y1 - y0) / height],
                                 mask=np.ascontiguousarray(mask[y0:y1, x0:x1]))
        if instances.scores is not None:
            detection.confidence = float(instances.scores[k])
        detections.append(detection)
    return fo.Detections(detections=detections)


def _samples(data: RunContents) -> Iterator[fo.Sample]:
    sources = data.sources()
    for key in tqdm(data.keys, desc=f"FiftyOne export {data.run.name}", unit="img"):
        item = data.images[key]
        sample = fo.Sample(filepath=str(item.path), tags=[item.split], image_id=item.image_id, split=item.split,
                           key=key)
        truth = data.instances(key, GROUND_TRUTH)
        height, width = truth.masks.shape[1:]
        sample.metadata = fo.ImageMetadata(width=width, height=height, num_channels=3)
        for source in sources:
            # Pseudo-labels exist for the unlabeled images, predictions for the val images: other
            # samples get no field at all (not an empty one, which evaluation would count).
            covered = (source == GROUND_TRUTH or (source.startswith("pseudo_labels/") and item.split == "unlabeled")
                       or (source.startswith("predictions/") and item.split == "val"))
            if covered:
                instances = truth if source == GROUND_TRUTH else data.instances(key, source)
                sample[field_name(source)] = to_detections(instances, data.classes)
        yield sample


def export_run(run_dir: str | os.PathLike, dataset_name: str | None = None, overwrite: bool = True,
               data_root: str | os.PathLike | None = None, persistent: bool = False) -> fo.Dataset:
    """A FiftyOne dataset of the run: every image (val + train) tagged with its split
    (``val``, ``labeled``, ``unlabeled``; also in the ``split`` field), ``image_id`` and ``key``
    (path relative to the data folder), and the label fields ``ground_truth``,
    ``pseudo_labels_<stage>`` and ``predictions_<model>``.

    Args:
        run_dir: the run folder (`cast.runs.RunFolder` layout).
        dataset_name: default ``cast-<run name>``.
        overwrite: replace a FiftyOne dataset of that name; otherwise such a dataset is an error.
        data_root: the data folder, when not the one the run's config names.
        persistent: keep the dataset in FiftyOne's database after this process ends.
    """
    data = RunContents(run_dir, data_root)
    name = dataset_name or f"cast-{data.run.name}"
    if fo.dataset_exists(name):
        if not overwrite:
            raise ValueError(f"{data.run.root}: FiftyOne dataset {name!r} already exists; pass overwrite=True "
                             "to replace it")
        fo.delete_dataset(name)
    dataset = fo.Dataset(name)
    dataset.persistent = persistent
    dataset.default_classes = list(data.classes)
    dataset.info = {"run": str(data.run.root), "data_root": str(data.data_root), "classes": list(data.classes),
                    "label_fields": [field_name(s) for s in data.sources()]}
    dataset.save()
    dataset.add_samples(_samples(data), progress=False)
    return dataset


def launch(run_dir: str | os.PathLike, port: int = DEFAULT_PORT, address: str = DEFAULT_ADDRESS,
           data_root: str | os.PathLike | None = None, wait: bool = True) -> fo.Session:
    """Export the run (`export_run`) and open it in the FiftyOne App at http://address:port.

    Serves on localhost by default. With `wait` (the command line), blocks until the App is
    closed; otherwise returns the running session (close it with ``session.close()``).
    """
    dataset = export_run(run_dir, data_root=data_root)
    session = fo.launch_app(dataset, port=port, address=address, auto=False)
    if wait:
        session.wait()
    return session


# --------------------------------------------------------------------------- curation


def image_features(image: np.ndarray) -> np.ndarray:
    """A small appearance embedding of an (H, W, 3) uint8 RGB image, for uniqueness without a model
    hub: an 8x8 CIELAB thumbnail (layout and colour) and an 8-bin edge-orientation histogram
    weighted by gradient magnitude (texture), each scaled to comparable ranges."""
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
    thumbnail = cv2.resize(lab, (THUMBNAIL_SIZE, THUMBNAIL_SIZE), interpolation=cv2.INTER_AREA)
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    gx, gy = cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1)
    magnitude, angle = cv2.cartToPolar(gx, gy)
    # Orientation modulo pi: an edge and its reverse look alike.
    bins = np.minimum((angle % np.pi) / np.pi * ORIENTATION_BINS, ORIENTATION_BINS - 1).astype(np.int64)
    histogram = np.bincount(bins.ravel(), weights=magnitude.ravel(), minlength=ORIENTATION_BINS)
    histogram = histogram / max(float(histogram.sum()), 1e-6)
    return np.concatenate([thumbnail.reshape(-1) / 255.0, histogram]).astype(np.float32)


def _ids_and_paths(images: Any) -> tuple[list[int], list[str]]:
    """(image ids, file paths) of a FiftyOne collection (needs an ``image_id`` field, as
    `export_run` writes), a `cast.data` data set, an {image id: path} mapping, or a list of paths
    (ids 0..N-1 in list order)."""
    if isinstance(images, fo.core.collections.SampleCollection):
        if not images.has_field("image_id"):
            raise ValueError(f"FiftyOne collection {images.name!r} has no 'image_id' field (export_run writes one)")
        ids, paths = images.values("image_id"), images.values("filepath")
        if any(i is None for i in ids):
            raise ValueError(f"FiftyOne collection {images.name!r}: some samples have no image_id")
        return [int(i) for i in ids], list(paths)
    if isinstance(images, ImageDataset):
        return [r.image_id for r in images.records], [str(r.path) for r in images.records]
    if isinstance(images, Mapping):
        return [int(i) for i in images], [str(p) for p in images.values()]
    if isinstance(images, Sequence) and not isinstance(images, str):
        return list(range(len(images))), [str(p) for p in images]
    raise ValueError(f"expected a FiftyOne collection, a cast data set, an {{id: path}} mapping or a list of "
                     f"paths, got {type(images).__name__}")


def uniqueness_scores(image_paths: Sequence[str], embeddings: np.ndarray | None = None) -> np.ndarray:
    """FiftyOne Brain uniqueness (in [0, 1], 1 = most unique) of each image, in the given order.

    `embeddings` (N, D): any per-image embedding (e.g. pooled student encoder features); default
    `image_features` of each image. Computed on a temporary FiftyOne dataset, deleted afterwards.
    """
    if embeddings is None:
        embeddings = np.stack([image_features(load_image(p)) for p in tqdm(image_paths, desc="image features",
                                                                          unit="img")])
    embeddings = np.asarray(embeddings, np.float32)
    if embeddings.ndim != 2 or len(embeddings) != len(image_paths):
        raise ValueError(f"embeddings must be (N, D) with N = {len(image_paths)} images, got {embeddings.shape}")
    dataset = fo.Dataset()
    try:
        ids = dataset.add_samples([fo.Sample(filepath=str(Path(p).resolve())) for p in image_paths], progress=False)
        fob.compute_uniqueness(dataset, embeddings=embeddings, progress=False)
        by_id = dict(zip(dataset.values("id"), dataset.values("uniqueness")))
        return np.array([by_id[i] for i in ids], np.float64)
    finally:
        dataset.delete()


def uniqueness_split(images: Any, labeled_fraction: float, seed: int,
                     embeddings: np.ndarray | None = None) -> dict[str, Any]:
    """A labeled / unlabeled split (the format of `cast.data.splits.make_split`) that labels the
    round(fraction * N) (at least 1) most unique images by FiftyOne Brain uniqueness.

    `images`: a FiftyOne collection (with ``image_id``), a cast data set, an {image id: path}
    mapping or a list of paths (ids = positions). `embeddings`: (N, D) in the same order, default
    `image_features`. `seed` orders images of equal uniqueness (a seeded permutation).
    """
    ids, paths = _ids_and_paths(images)
    if not ids:
        raise ValueError("cannot split an empty set of images")
    if len(set(ids)) != len(ids):
        raise ValueError("image ids are not unique")
    # Checks fraction and seed exactly as make_split does (same messages).
    validate_split({"labeled_fraction": labeled_fraction, "seed": seed, "labeled_image_ids": ids[:1],
                    "unlabeled_image_ids": []})
    scores = uniqueness_scores(paths, embeddings)
    tie_break = np.random.default_rng(seed).permutation(len(ids))
    order = np.lexsort((tie_break, -scores))  # last key is primary: most unique first
    num_labeled = max(1, min(len(ids), round(labeled_fraction * len(ids))))
    labeled = sorted(ids[i] for i in order[:num_labeled])
    unlabeled = sorted(ids[i] for i in order[num_labeled:])
    return validate_split({"labeled_fraction": labeled_fraction, "seed": seed, "labeled_image_ids": labeled,
                           "unlabeled_image_ids": unlabeled})


def rank_pseudo_label_mistakes(dataset: fo.core.collections.SampleCollection, pred_field: str, label_field: str,
                               mistakenness_field: str = "mistakenness") -> fo.DatasetView:
    """Pseudo-labels of `label_field` as patches, ranked by FiftyOne Brain mistakenness against
    the scored predictions of `pred_field` (e.g. the adapted teacher's), worst first.

    Matched pseudo-labels get `mistakenness_field` (likely wrong class) and ``<field>_loc``
    (likely wrong extent); unmatched ones are flagged ``possible_spurious`` and come last.
    Only samples with both fields take part (e.g. the unlabeled images of an `export_run`).

    In an exported run, the labels the student learns from in stage 2 against the teacher adapted
    in stage 1a: ``rank_pseudo_label_mistakes(dataset, "pseudo_labels_teacher_adaptation",
    "pseudo_labels_teacher_self_training")``.
    """
    for field in (pred_field, label_field):
        if not dataset.has_field(field):
            raise ValueError(f"FiftyOne collection {dataset.name!r} has no field {field!r}")
    both = dataset.exists(pred_field).exists(label_field)
    if dataset.has_brain_run(mistakenness_field):  # a rerun replaces the earlier ranking
        dataset.delete_brain_run(mistakenness_field)
    fob.compute_mistakenness(both, pred_field, label_field, mistakenness_field=mistakenness_field, progress=False)
    return both.to_patches(label_field).sort_by(f"{label_field}.{mistakenness_field}", reverse=True)
