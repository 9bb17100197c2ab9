"""The embedded demo data set: determinism, COCO validity, exact non-overlapping masks, balance, domain shift."""
from __future__ import annotations

import json
import multiprocessing
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from scipy import ndimage
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from cast.config import CastConfig, load_config
from cast.data import demo
from cast.data.prepare import ensure_demo_data
from cast.utils.folder_lock import exclusive_folder
from cast.data.demo import DEMO_CLASSES, generate, render_scene

SMALL = dict(image_size=64, num_source_train=8, num_target_train=6, num_target_val=4)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("demo")
    return root, generate(root, seed=3, progress=False, **SMALL)


def test_same_seed_writes_byte_identical_files(small_set, tmp_path):
    root, manifest = small_set
    again = generate(tmp_path, seed=3, progress=False, **SMALL)
    assert again == manifest
    first, second = _files(root), _files(tmp_path)
    assert first.keys() == second.keys()
    assert len([k for k in first if k.endswith(".png")]) == 8 + 6 + 4
    assert all(first[k] == second[k] for k in first)
    other = generate(tmp_path / "other", seed=4, progress=False, **SMALL)
    assert other["params"]["seed"] == 4
    other_png = (tmp_path / "other/source_train/images/000000.png").read_bytes()
    assert other_png != first["source_train/images/000000.png"]


def test_complete_set_is_kept_and_changed_params_redraw(tmp_path):
    manifest = generate(tmp_path, seed=0, progress=False, **SMALL)
    png = tmp_path / "target_val/images/000000.png"
    stamp = png.stat().st_mtime_ns
    assert generate(tmp_path, seed=0, progress=False, **SMALL) == manifest
    assert png.stat().st_mtime_ns == stamp  # nothing was rewritten

    fewer = dict(SMALL, num_target_val=2)
    manifest = generate(tmp_path, seed=0, progress=False, **fewer)
    assert manifest["splits"]["target_val"]["num_images"] == 2
    assert sorted(p.name for p in (tmp_path / "target_val/images").iterdir()) == ["000000.png", "000001.png"]

    (tmp_path / "source_train/images/000003.png").unlink()  # an incomplete set is drawn again
    generate(tmp_path, seed=0, progress=False, **fewer)
    assert (tmp_path / "source_train/images/000003.png").is_file()


def _demo_run(root: Path, **demo_args) -> CastConfig:
    """A run's config whose demo set (SMALL) lives in root/data."""
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump({"data": {"root": str(root / "data"), "demo": dict(SMALL, **demo_args)}}))
    return load_config(path)


def test_the_run_seed_does_not_redraw_the_data(tmp_path):
    """Runs of different seeds share one data root: the set is drawn from data.demo.seed, never from the
    run's seed, so one run cannot redraw the images under another."""
    cfg = _demo_run(tmp_path, seed=3)
    cfg.seed = 5
    ensure_demo_data(cfg)
    manifest = json.loads((tmp_path / "data" / demo.MANIFEST).read_text())
    assert manifest["params"]["seed"] == 3
    files = _files(tmp_path / "data")
    cfg.seed, cfg.teacher_seed = 1, 2
    ensure_demo_data(cfg)
    assert _files(tmp_path / "data") == files


def _hold(folder: Path, held, release) -> None:
    with exclusive_folder(folder, label="demo data"):
        held.set()
        release.wait(60)


def test_a_run_waits_for_the_one_drawing_the_data(tmp_path):
    """Seeds started together on a fresh root: the second waits for the first's draw, never reads a
    half-written set."""
    cfg = _demo_run(tmp_path)
    fork = multiprocessing.get_context("fork")
    held, release = fork.Event(), fork.Event()
    other = fork.Process(target=_hold, args=(tmp_path / "data", held, release))  # another run, drawing
    other.start()
    assert held.wait(30)
    run = fork.Process(target=ensure_demo_data, args=(cfg,))
    run.start()
    run.join(timeout=3)  # drawing this small set takes well under a second
    assert run.is_alive() and not (tmp_path / "data" / demo.MANIFEST).exists()
    release.set()
    run.join(timeout=60)
    other.join(timeout=60)
    assert run.exitcode == 0 and (tmp_path / "data" / demo.MANIFEST).is_file()


def test_a_complete_set_on_a_read_only_root_is_used_as_it_is(tmp_path, monkeypatch):
    """Only drawing takes the data folder: a complete set is read without writing a lock into it."""
    cfg = _demo_run(tmp_path)
    ensure_demo_data(cfg)
    files = _files(tmp_path / "data")

    def read_only(folder, **kwargs):
        raise OSError(f"demo data {folder} is not writable: Read-only file system")

    monkeypatch.setattr(demo, "exclusive_folder", read_only)
    ensure_demo_data(cfg)
    assert _files(tmp_path / "data") == files
    cfg.data.demo.num_target_val += 1  # another set must be drawn: that needs the folder
    with pytest.raises(OSError, match="is not writable"):
        ensure_demo_data(cfg)


def test_coco_files_are_valid_and_masks_exact(small_set):
    root, manifest = small_set
    assert manifest["classes"] == list(DEMO_CLASSES)
    image_ids, ann_ids = [], []
    for split, info in manifest["splits"].items():
        coco = COCO(str(root / info["annotations"]))
        assert [c["id"] for c in coco.loadCats(coco.getCatIds())] == [1, 2, 3, 4]
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(DEMO_CLASSES)
        assert len(coco.getImgIds()) == info["num_images"]
        image_ids += coco.getImgIds()
        ann_ids += coco.getAnnIds()
        for image_id in coco.getImgIds():
            record = coco.loadImgs(image_id)[0]
            image = np.asarray(Image.open(root / info["image_root"] / record["file_name"]))
            assert image.shape == (64, 64, 3) and image.dtype == np.uint8
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
            assert 1 <= len(anns) <= 10
            union = np.zeros((64, 64), np.int32)
            for ann in anns:
                mask = coco.annToMask(ann)
                assert mask.shape == image.shape[:2]  # inside the image by construction
                assert mask.sum() == ann["area"] >= 24
                assert np.allclose(mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask))), ann["bbox"])
                assert ann["iscrowd"] == 0 and 1 <= ann["category_id"] <= 4
                union += mask
            assert union.max() == 1  # visible parts never overlap
    assert len(set(image_ids)) == len(image_ids) and len(set(ann_ids)) == len(ann_ids)


def test_masks_are_exactly_the_painted_shapes():
    """Off the masks the image is the background photo; each mask's rim is its shape's dark outline,
    which a mask shifted by one pixel would not match."""
    rim, interior = [], []
    for seed in range(4):
        image, masks, labels = render_scene(np.random.default_rng(seed), "source", 96)
        assert masks.dtype == bool and masks.shape == (len(labels), 96, 96)
        # Redraw the background alone: render_scene draws it first from the same generator.
        rng = np.random.default_rng(seed)
        names = demo.DOMAIN_BACKGROUNDS["source"]
        background = demo._photo_crop(rng, names[rng.integers(len(names))], 96)
        off = ~masks.any(axis=0)
        unclipped = off & (image.max(axis=2) < 255) & (background.min(axis=2) > 10)
        gain = np.median(image[unclipped] / background[unclipped])  # the source domain's brightness factor
        # Tolerance for the estimated gain; a painted object pixel would be off by tens of levels.
        assert np.abs(image[off] - np.clip(background[off] * gain, 0, 255)).max() <= 3
        gray = image.astype(np.float64).mean(axis=2)
        for mask in masks:
            edge = mask & ndimage.binary_dilation(off)  # mask pixels next to the background
            core = ndimage.binary_erosion(mask, iterations=2)
            if edge.any() and core.any():
                rim.append(gray[edge].mean())
                interior.append(gray[core].mean())
    assert len(rim) >= 10
    assert np.median(np.array(rim) / np.array(interior)) < 0.4  # the outline is drawn at 0.3x brightness


def test_object_counts_and_class_balance():
    per_image, labels = [], []
    for i in range(150):
        _, masks, scene_labels = render_scene(np.random.default_rng([11, i]), "target", 64)
        per_image.append(len(scene_labels))
        labels += scene_labels.tolist()
    assert min(per_image) >= 1 and max(per_image) <= 10
    assert len(set(per_image)) >= 8  # counts spread over the range, not a constant
    shares = np.bincount(labels, minlength=len(DEMO_CLASSES)) / len(labels)
    assert shares.min() > 0.19 and shares.max() < 0.31


def test_domains_differ_measurably():
    def stats(domain: str) -> tuple[float, float]:
        blue_minus_red, contrast = [], []
        for i in range(30):
            image, _, _ = render_scene(np.random.default_rng([5, i]), domain, 64)
            pixels = image.reshape(-1, 3).astype(np.float64)
            blue_minus_red.append(pixels[:, 2].mean() - pixels[:, 0].mean())
            contrast.append(pixels.mean(axis=1).std())
        return float(np.mean(blue_minus_red)), float(np.mean(contrast))

    source, target = stats("source"), stats("target")
    assert target[0] > source[0] + 40  # the target's cool colour cast
    assert target[1] < 0.6 * source[1]  # and its lower contrast


def test_bad_parameters_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        generate(tmp_path, image_size=16, progress=False)
    with pytest.raises(ValueError, match="num_target_val"):
        generate(tmp_path, num_target_val=0, progress=False)
    with pytest.raises(ValueError, match="min_visible_area"):
        generate(tmp_path, min_visible_area=10_000, progress=False)
    with pytest.raises(ValueError, match="domain"):
        render_scene(np.random.default_rng(0), "night", 64)


def test_command_line(tmp_path, capsys):
    demo.main(["--root", str(tmp_path), "--image-size", "48", "--num-source-train", "2",
               "--num-target-train", "1", "--num-target-val", "1"])
    assert "source_train: 2 images" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["params"]["image_size"] == 48
    assert Counter(p.parent.parent.name for p in tmp_path.rglob("*.png")) == {
        "source_train": 2, "target_train": 1, "target_val": 1}


def test_the_source_domain_does_not_depend_on_the_target_counts(tmp_path):
    """The stand-in teacher's cache relies on it: more target images leave its training set as it is."""
    generate(tmp_path / "a", seed=0, progress=False, **SMALL)
    generate(tmp_path / "b", seed=0, progress=False, **dict(SMALL, num_target_train=SMALL["num_target_train"] + 3,
                                                          num_target_val=1))
    for name in ("annotations.json", "images/000000.png", "images/000001.png"):
        assert (tmp_path / "a" / "source_train" / name).read_bytes() == (tmp_path / "b" / "source_train" / name).read_bytes()
    # and the first target images are the same ones
    assert (tmp_path / "a/target_train/images/000000.png").read_bytes() == \
        (tmp_path / "b/target_train/images/000000.png").read_bytes()
