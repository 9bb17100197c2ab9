"""Weak/strong views: same geometry in both views, masks follow the image, explicit reproducible randomness."""
from __future__ import annotations

import kornia
import numpy as np
import pytest
import torch
from scipy import ndimage

from cast.data.batches import EvalTransform, WeakStrongViews
from cast.structures import InstanceSample

COLOURS = np.array([[230, 30, 30], [30, 220, 40], [40, 60, 240]], np.uint8)
NO_PHOTOMETRIC = dict(strong_jitter=(0.0, 0.0, 0.0, 0.0), grayscale_prob=0.0, blur_prob=0.0)


def _sample(h: int = 48, w: int = 64) -> InstanceSample:
    """Three flat-coloured rectangles on a dark gradient; instance k has colour COLOURS[k]."""
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 2] = np.linspace(0, 60, w, dtype=np.uint8)[None]
    boxes = [(4, 20, 6, 26), (24, 44, 10, 30), (10, 40, 40, 60)]
    masks = np.zeros((3, h, w), bool)
    for k, (y0, y1, x0, x1) in enumerate(boxes):
        masks[k, y0:y1, x0:x1] = True
        image[y0:y1, x0:x1] = COLOURS[k]
    ignore = np.zeros((h, w), bool)
    ignore[0:3, 0:5] = True
    return InstanceSample(image=image, masks=masks, labels=np.array([2, 0, 1]), image_id=7, ignore=ignore)


def _shift_of(view: torch.Tensor, image: torch.Tensor) -> tuple[int, int]:
    """Offset (y, x) at which `view` is an exact crop of `image`."""
    h, w = view.shape[-2:]
    for y in range(image.shape[-2] - h + 1):
        for x in range(image.shape[-1] - w + 1):
            if torch.equal(image[:, y:y + h, x:x + w], view):
                return y, x
    raise AssertionError("the view is not a crop of the image")


def test_output_format():
    out = WeakStrongViews(crop_size=(32, 40))(_sample(), seed=0, epoch=0, index=0)
    assert out["weak"].shape == out["strong"].shape == (3, 32, 40)
    assert out["weak"].dtype == torch.float32 and 0 <= out["weak"].min() and out["weak"].max() <= 1
    assert out["masks"].dtype == torch.float32 and out["masks"].shape[1:] == (32, 40)
    assert set(out["masks"].unique().tolist()) <= {0.0, 1.0}
    assert out["labels"].dtype == torch.int64 and len(out["labels"]) == out["masks"].shape[0]
    assert out["valid"].dtype == torch.bool and out["valid"].shape == (32, 40)
    assert out["instance_ids"].dtype == torch.int64 and out["instance_ids"].shape == (32, 40)
    assert out["image_id"] == 7 and out["orig_size"] == (48, 64)


def test_strong_equals_weak_without_photometric_ops():
    sample = _sample()
    for index in range(4):
        out = WeakStrongViews(crop_size=(32, 40), **NO_PHOTOMETRIC)(sample, seed=1, epoch=0, index=index)
        assert torch.equal(out["weak"], out["strong"])


def test_strong_is_a_per_pixel_function_of_weak():
    """Grayscale only: strong must be exactly the grayscale of weak at every pixel."""
    views = WeakStrongViews(crop_size=(32, 40), strong_jitter=(0.0, 0.0, 0.0, 0.0), grayscale_prob=1.0,
                            blur_prob=0.0)
    out = views(_sample(), seed=2, epoch=0, index=3)
    assert torch.allclose(out["strong"], kornia.color.rgb_to_grayscale(out["weak"]).expand(3, -1, -1))


def test_photometric_settings_never_move_the_geometry():
    sample = _sample()
    base = WeakStrongViews(crop_size=(40, 40), **NO_PHOTOMETRIC)
    default = WeakStrongViews(crop_size=(40, 40))
    weak_only = WeakStrongViews(crop_size=(40, 40), strong=False)
    for index in range(5):
        a = base(sample, seed=0, epoch=2, index=index)
        b = default(sample, seed=0, epoch=2, index=index)
        c = weak_only(sample, seed=0, epoch=2, index=index)
        assert torch.equal(a["weak"], b["weak"]) and torch.equal(a["weak"], c["weak"])
        assert torch.equal(a["masks"], b["masks"]) and torch.equal(a["instance_ids"], c["instance_ids"])
        assert not torch.equal(b["weak"], b["strong"])
        assert "strong" not in c


def test_mask_pixels_show_their_object_in_both_views():
    """Away from edges (bilinear mixing), every pixel of instance k has colour k in the weak view,
    and the strong view changes colours but keeps each instance's pixels on one object."""
    sample = _sample()
    views = WeakStrongViews(crop_size=(40, 48), scale_range=(0.7, 1.4), blur_prob=0.0, grayscale_prob=0.0)
    checked = 0
    for index in range(6):
        out = views(sample, seed=4, epoch=1, index=index)
        for mask, label in zip(out["masks"].bool(), out["labels"]):
            core = torch.from_numpy(ndimage.binary_erosion(mask.numpy(), iterations=2))
            if core.sum() < 4:
                continue
            k = int(np.flatnonzero(sample.labels == int(label))[0])
            weak = out["weak"][:, core].T * 255
            assert (weak - torch.from_numpy(COLOURS[k]).float()).abs().max() < 2
            strong = out["strong"][:, core]
            assert strong.std(dim=1).max() < 1e-3  # one flat object: one colour in the strong view too
            checked += 1
    assert checked >= 6


def test_masks_follow_flips_and_crops():
    sample = _sample()
    image = torch.from_numpy(sample.image).permute(2, 0, 1).float() / 255
    flip = WeakStrongViews(crop_size=(48, 64), scale_range=(1.0, 1.0), hflip_prob=1.0, strong=False)
    out = flip(sample, seed=0, epoch=0, index=0)
    assert torch.equal(out["weak"], image.flip(-1))
    assert torch.equal(out["masks"].bool(), torch.from_numpy(sample.masks).flip(-1))

    crop = WeakStrongViews(crop_size=(30, 36), scale_range=(1.0, 1.0), hflip_prob=0.0, strong=False)
    offsets = set()
    for index in range(5):
        out = crop(sample, seed=0, epoch=0, index=index)
        y, x = _shift_of(out["weak"], image)
        offsets.add((y, x))
        kept = [k for k in range(3) if sample.masks[k, y:y + 30, x:x + 36].any()]
        expected = torch.from_numpy(sample.masks[kept, y:y + 30, x:x + 36])
        assert torch.equal(out["masks"].bool(), expected)  # cropped-away instances are dropped
        assert out["labels"].tolist() == sample.labels[kept].tolist()
        ids = out["instance_ids"]
        assert torch.equal(ids >= 0, expected.any(0) & ~torch.from_numpy(sample.ignore[y:y + 30, x:x + 36]))
    assert len(offsets) > 1  # the crop position is random


def test_small_images_are_padded_and_marked_invalid():
    views = WeakStrongViews(crop_size=(64, 64), scale_range=(0.5, 0.5), hflip_prob=0.0)
    out = views(_sample(), seed=0, epoch=0, index=0)
    assert out["valid"][:24, :32].all() and out["valid"].sum() == 24 * 32
    assert (out["weak"][:, 24:] == 0).all() and (out["strong"][:, :, 32:] == 0).all()
    assert (out["instance_ids"][~out["valid"]] == -1).all()
    assert out["masks"][:, ~out["valid"]].sum() == 0
    assert out["masks"].shape[0] == 3


def test_ignore_region_is_minus_one():
    sample = _sample()
    sample.masks[0, 0:3, 0:5] = True  # an instance under the ignore region
    out = EvalTransform()(sample)
    assert (out["instance_ids"][0:3, 0:5] == -1).all()
    assert out["masks"][0, 0:3, 0:5].all()
    assert (out["instance_ids"][4:20, 6:26] == 0).all()


def test_randomness_is_a_function_of_seed_epoch_index():
    sample = _sample()
    views = WeakStrongViews(crop_size=(32, 40))
    a = views(sample, seed=5, epoch=3, index=2)
    b = WeakStrongViews(crop_size=(32, 40))(sample, seed=5, epoch=3, index=2)
    torch.manual_seed(123)  # global RNG state must not matter
    np.random.seed(123)
    c = views(sample, seed=5, epoch=3, index=2)
    for key in ("weak", "strong", "masks", "labels", "instance_ids", "valid"):
        assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key])
    for other in (dict(seed=6, epoch=3, index=2), dict(seed=5, epoch=4, index=2), dict(seed=5, epoch=3, index=1)):
        assert not torch.equal(a["strong"], views(sample, **other)["strong"])


def test_unlabeled_sample():
    sample = _sample().without_labels()
    out = WeakStrongViews(crop_size=(32, 32))(sample, seed=0, epoch=0, index=0)
    assert out["masks"].shape == (0, 32, 32) and out["labels"].shape == (0,)
    assert (out["instance_ids"] == -1).all()


def test_eval_transform_resizes_short_side_deterministically():
    sample = _sample(40, 60)
    out = EvalTransform(size=20)(sample)
    assert out["weak"].shape == (3, 20, 30) and out["masks"].shape == (3, 20, 30)
    assert out["valid"].all() and "strong" not in out and out["orig_size"] == (40, 60)
    assert torch.equal(out["weak"], EvalTransform(size=20)(sample, seed=9, epoch=9, index=9)["weak"])
    # Nearest resizing at half size keeps each rectangle's area within a border row/column.
    assert torch.allclose(out["masks"].sum((1, 2)), torch.from_numpy(sample.masks.sum((1, 2)) / 4.0).float(),
                          rtol=0.25)
    same = EvalTransform()(sample)
    assert torch.equal(same["weak"], torch.from_numpy(sample.image).permute(2, 0, 1).float() / 255)


@pytest.mark.parametrize("kwargs", [dict(crop_size=(0, 8)), dict(scale_range=(1.5, 0.5)), dict(hflip_prob=2.0),
                                    dict(strong_jitter=(0.4, 0.4, 0.4)), dict(blur_kernel=4),
                                    dict(blur_sigma=(0.0, 1.0))])
def test_bad_settings_raise(kwargs):
    with pytest.raises(ValueError, match="WeakStrongViews"):
        WeakStrongViews(**kwargs)
