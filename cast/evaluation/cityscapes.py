"""The official Cityscapes instance-level metric (AP averaged over IoU 0.5:0.95, and AP50),
computed by cityscapesscripts on predictions written in its file layout.

cityscapesscripts keeps its settings in a module-global object, reads the environment and writes
files (gtInstances.json, matches.json) into its own folder and the current directory; here every
setting is passed explicitly and everything it writes stays inside `work_dir`.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from cast.data.cityscapes import CITYSCAPES_THING_IDS, GT_SUFFIX, IMAGE_SUFFIX, gt_path
from cast.data.dataset import InstanceDataset
from cast.evaluation.coco import decode_results
from cast.structures import Instances


def write_predictions(predictions: dict[str, Instances], pred_dir: str | Path,
                      label_ids: Sequence[int] = CITYSCAPES_THING_IDS) -> None:
    """One `<stem>_pred.txt` per image listing `<mask png> <label id> <confidence>`, one PNG per
    instance. `predictions` maps the image stem (`<city>_<seq>_<frame>`) to its Instances."""
    pred_dir = Path(pred_dir)
    (pred_dir / "masks").mkdir(parents=True, exist_ok=True)
    for stem, inst in predictions.items():
        masks = inst.masks.detach().cpu().numpy().astype(bool)
        lines = []
        for i, (mask, label, score) in enumerate(zip(masks, inst.labels.tolist(), inst.scores.tolist())):
            name = f"masks/{stem}_{i:03d}.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(pred_dir / name)
            lines.append(f"{name} {label_ids[int(label)]} {float(score):.6f}\n")
        (pred_dir / f"{stem}_pred.txt").write_text("".join(lines))


def evaluate_cityscapes(gt_files: Sequence[str | Path], predictions: dict[str, Instances],
                        work_dir: str | Path) -> dict:
    """{"AP", "AP50", "per_class": {name: AP}} in percent for the images of `gt_files`
    (`*_gtFine_instanceIds.png`), `predictions` keyed by image stem."""
    from cityscapesscripts.evaluation import evalInstanceLevelSemanticLabeling as cs

    work_dir = Path(work_dir).resolve()
    pred_dir = work_dir / "predictions"
    gt_files = [str(Path(f).resolve()) for f in gt_files]
    for f in gt_files:
        if not f.endswith(GT_SUFFIX) or not os.path.isfile(f):
            raise FileNotFoundError(f"{f}: not a Cityscapes *{GT_SUFFIX} file")
    missing = [Path(f).name[: -len(GT_SUFFIX)] for f in gt_files
               if Path(f).name[: -len(GT_SUFFIX)] not in predictions]
    if missing:
        raise ValueError(f"no predictions for {len(missing)} images, e.g. {missing[:3]}")
    write_predictions(predictions, pred_dir)

    args = copy.copy(cs.args)
    args.predictionPath, args.predictionWalk = str(pred_dir), None
    args.gtInstancesFile = str(work_dir / "gtInstances.json")
    args.exportFile = str(work_dir / "result.json")
    args.JSONOutput, args.quiet, args.colorized = False, True, False
    log = io.StringIO()
    cwd = os.getcwd()
    try:
        os.chdir(work_dir)  # it writes matches.json into the current directory
        with contextlib.redirect_stdout(log), _numpy2_compat(cs):
            prediction_files = [cs.getPrediction(f, args) for f in gt_files]
            result = cs.evaluateImgLists(prediction_files, gt_files, args)
    except SystemExit:  # cityscapesscripts reports errors by printing and exiting
        raise ValueError(f"cityscapesscripts refused the input: {log.getvalue().strip()[-500:]}") from None
    finally:
        os.chdir(cwd)
    averages = result["averages"]
    return {"AP": 100.0 * float(averages["allAp"]), "AP50": 100.0 * float(averages["allAp50%"]),
            "per_class": {name: 100.0 * float(v["ap"]) for name, v in averages["classes"].items()}}


@contextlib.contextmanager
def _numpy2_compat(cs):
    """cityscapesscripts 2.3 predates numpy 2: it calls np.in1d (removed in 2.4) and json-dumps
    numpy scalars through `o.__dict__`. Lend both fixes for the duration of the call only."""
    def write_json(obj, file_name):
        with open(file_name, "w") as f:
            json.dump(obj, f, default=lambda o: o.item() if isinstance(o, np.generic) else o.__dict__)

    added_in1d = not hasattr(np, "in1d")
    if added_in1d:
        np.in1d = lambda a, b, *args, **kw: np.isin(a, b, *args, **kw).ravel()
    original_writer = cs.writeDict2JSON
    cs.writeDict2JSON = write_json
    try:
        yield
    finally:
        cs.writeDict2JSON = original_writer
        if added_in1d:
            del np.in1d


def instances_from_label_map(instance_ids: np.ndarray) -> Instances:
    """Ground-truth-like Instances from a Cityscapes instanceIds map (thing classes only): the
    perfect prediction, used to check the metric and as an upper bound."""
    masks, labels = [], []
    for value in np.unique(instance_ids):
        label_id = int(value) // 1000
        if value >= 1000 and label_id in CITYSCAPES_THING_IDS:
            masks.append(instance_ids == value)
            labels.append(CITYSCAPES_THING_IDS.index(label_id))
    h, w = instance_ids.shape
    return Instances(torch.from_numpy(np.stack(masks) if masks else np.zeros((0, h, w), bool)),
                     torch.tensor(labels, dtype=torch.int64), torch.ones(len(labels)))


def official_metric(val: InstanceDataset, results: list[dict[str, Any]], root: str | Path) -> dict:
    """The official metric of COCO `results` (category ids = Cityscapes label ids, as
    cast.data.cityscapes reads them) on the Cityscapes images of `val` under `root`."""
    root = Path(root)
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        by_image[int(r["image_id"])].append(r)
    gt_files, predictions = [], {}
    for record in val.records:
        found = by_image.get(record.image_id, [])
        size = found[0]["segmentation"]["size"] if found else (1, 1)
        masks, category_ids, scores = decode_results(found, int(size[0]), int(size[1]), source=str(record.path))
        labels = [CITYSCAPES_THING_IDS.index(int(c)) for c in category_ids]
        predictions[record.path.name[: -len(IMAGE_SUFFIX)]] = Instances(
            torch.from_numpy(masks), torch.tensor(labels, dtype=torch.int64), torch.from_numpy(scores))
        gt_files.append(gt_path(root, record.path))
    with tempfile.TemporaryDirectory(prefix="cityscapes-eval-") as work_dir:
        return evaluate_cityscapes(gt_files, predictions, work_dir)
