"""Training augmentation policies: valid tensors, flips only where asked, reproducible per seed."""
from __future__ import annotations

import math
import random

import albumentations as A
import numpy as np
import pytest
import torch

from spinal_transfer.data.loaders import ImageDataset
from spinal_transfer.data.augment import DEFAULT_CROP_SCALE, POLICIES, Augmentation
from spinal_transfer.data.transforms import (
    DataConfig,
    Sharpness,
    build_transforms,
    crop_decode_size,
    randaugment_ops,
    trivial_augment_ops,
)
from spinal_transfer.errors import ConfigError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DC = DataConfig(img_size=32, resize_size=36, mean=MEAN, std=STD, interpolation="bilinear", crop_pct=32 / 36)
TRAIN_POLICIES = [p for p in POLICIES if p != "none"]


def _photo(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """Smooth colours plus some texture, so every op (equalize, posterize, sharpen) has something to change."""
    import cv2

    rng = np.random.default_rng(seed)
    base = cv2.resize(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(base.astype(int) + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)


def _reseed(tf: A.Compose, seed: int) -> None:
    tf.set_random_state(np.random.default_rng(seed), random.Random(seed))


def _walk(t) -> list:
    """Every transform in a pipeline, nested OneOf/SomeOf included."""
    inner = getattr(t, "transforms", None)
    return [t] + ([x for c in inner for x in _walk(c)] if inner is not None else [])


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_gives_a_normalized_tensor_of_the_crop_size(policy):
    knobs = dict(random_erase=0.5, color_jitter=0.4) if policy != "none" else {}
    tf = build_transforms(DC, train=True, aug=Augmentation(policy, vflip=0.5, **knobs))
    lo = (0 - np.array(MEAN)) / np.array(STD)
    hi = (1 - np.array(MEAN)) / np.array(STD)
    for seed in range(20):
        _reseed(tf, seed)
        out = tf(image=_photo(seed=seed))["image"]
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and out.is_contiguous()
        assert torch.isfinite(out).all()
        for c in range(3):
            assert lo[c] - 1e-5 <= out[c].min() and out[c].max() <= hi[c] + 1e-5


@pytest.mark.parametrize("ops", [trivial_augment_ops(), randaugment_ops(1, 30)], ids=["trivial", "randaugment_m30"])
def test_every_op_alone_keeps_an_rgb_uint8_image_and_all_but_identity_change_it(ops):
    img = _photo()
    for op in ops.transforms:
        changed = 0
        for seed in range(5):
            one = A.Compose([op])   # Compose gives its transforms fresh seeds when built: reseed after building
            _reseed(one, seed)
            out = one(image=img)["image"]
            assert out.shape == img.shape and out.dtype == np.uint8, op
            changed += not np.array_equal(out, img)
        # a magnitude drawn near 0 (Posterize keeping 8 bits) may leave a draw as it was, but not every draw
        assert (changed == 0) if isinstance(op, A.NoOp) else (changed >= 1), (op, changed)


def test_sharpness_follows_pil():
    from PIL import Image, ImageEnhance

    img = _photo(24, 24)
    for factor in (0.1, 1.0, 1.9):
        ours = A.Compose([Sharpness((factor, factor))])(image=img)["image"]
        pil = np.asarray(ImageEnhance.Sharpness(Image.fromarray(img)).enhance(factor))
        assert np.abs(ours.astype(int) - pil).max() <= 1, factor


def _red_left_blue_right(h: int = 48, w: int = 64) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2, 0] = 255
    img[:, w // 2:, 2] = 255
    return img


def _flipped(out: torch.Tensor) -> bool:
    """Whether any row has a red pixel to the right of a blue one (the asymmetric image mirrored)."""
    rgb = out.numpy().transpose(1, 2, 0) * np.array(STD) + np.array(MEAN)
    red = (rgb[..., 0] > 0.8) & (rgb[..., 2] < 0.2)
    blue = (rgb[..., 2] > 0.8) & (rgb[..., 0] < 0.2)
    for r, b in zip(red, blue):
        if r.any() and b.any() and np.flatnonzero(r).max() > np.flatnonzero(b).min():
            return True
    return False


# trivial is left out of the picture test: its rotations of up to 135 degrees also put blue left of red
@pytest.mark.parametrize("policy", ["light", "modern", "randaugment", "paper", "paper_rrc"])
def test_hflip_zero_never_flips_and_the_default_does(policy):
    img = _red_left_blue_right()
    no_flip = build_transforms(DC, True, Augmentation(policy, hflip=0.0, rotation=10.0, rrc_scale=(0.5, 1.0)))
    default = build_transforms(DC, True, Augmentation(policy, rotation=10.0, rrc_scale=(0.5, 1.0)))
    flips = 0
    for seed in range(60):
        _reseed(no_flip, seed)
        assert not _flipped(no_flip(image=img)["image"]), seed
        _reseed(default, seed)
        flips += _flipped(default(image=img)["image"])
    assert flips >= 10            # the detector works: the policy's own flip (p=0.5) is seen


@pytest.mark.parametrize("policy", POLICIES)
def test_hflip_zero_leaves_no_flip_anywhere_in_the_pipeline(policy):
    knobs = dict(random_erase=0.3, color_jitter=0.3) if policy != "none" else {}
    tf = build_transforms(DC, True, Augmentation(policy, hflip=0.0, **knobs))
    assert not [t for t in _walk(tf) if isinstance(t, (A.HorizontalFlip, A.D4, A.SquareSymmetry))]
    if policy == "none":        # the evaluation pipeline never flips, whatever hflip says
        assert not [t for t in _walk(build_transforms(DC, True, Augmentation(policy, hflip=1.0)))
                    if isinstance(t, A.HorizontalFlip)]


def test_flip_and_crop_defaults_come_from_the_policy():
    assert Augmentation("none").flip_p() == 0.0 and Augmentation("light").flip_p() == 0.5
    assert Augmentation("light", hflip=0.0).flip_p() == 0.0
    assert Augmentation("light").crop_scale() == DEFAULT_CROP_SCALE["light"] == (0.35, 1.0)
    assert Augmentation("modern").crop_scale() == (0.08, 1.0)
    assert Augmentation("trivial", rrc_scale=(0.5, 1.0)).crop_scale() == (0.5, 1.0)


@pytest.mark.parametrize("policy", TRAIN_POLICIES)
def test_reseeding_gives_the_same_output_and_another_seed_another(policy, tmp_path):
    from PIL import Image

    path = tmp_path / "x.png"
    Image.fromarray(_photo(40, 56)).save(path)
    ds = ImageDataset([(str(path), 0)], build_transforms(DC, True, Augmentation(policy, random_erase=0.5,
                                                                                 color_jitter=0.2)))
    a, b = ds[(0, 123)][0], ds[(0, 123)][0]
    assert torch.equal(a, b)
    assert any(not torch.equal(a, ds[(0, s)][0]) for s in range(124, 130))


def test_knobs_are_checked():
    with pytest.raises(ConfigError, match="random_erase needs an augmentation policy"):
        Augmentation("none", random_erase=0.25)
    with pytest.raises(ConfigError, match="augment"):
        Augmentation("autoaugment")
    with pytest.raises(ConfigError, match="randaugment_m"):
        Augmentation("randaugment", randaugment_m=31)
    with pytest.raises(ConfigError, match="rrc_scale"):
        Augmentation("light", rrc_scale=(0.9, 0.5))


def test_random_erase_and_color_jitter_change_the_picture():
    img = _photo()
    plain = build_transforms(DC, True, Augmentation("light"))
    for knob in (dict(random_erase=1.0), dict(color_jitter=0.5)):
        tf = build_transforms(DC, True, Augmentation("light", **knob))
        differ = 0
        for seed in range(5):
            _reseed(plain, seed)
            _reseed(tf, seed)
            differ += not torch.equal(plain(image=img)["image"], tf(image=img)["image"])
        assert differ == 5, knob


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.35, 1.0), (1.0, 1.0)])
def test_crop_decode_size_is_enough_for_the_smallest_crop(scale):
    """On an image whose shorter side is crop_decode_size, no random-resized crop is smaller than the output."""
    size = 32
    need = crop_decode_size(size, scale)
    tf = A.Compose([A.RandomResizedCrop(size=(size, size), scale=scale, ratio=(3 / 4, 4 / 3), p=1.0)])
    rng = np.random.default_rng(0)
    for h, w in ((need, need), (need, 2 * need), (2 * need, need)):
        image = np.zeros((h, w, 3), np.uint8)
        for _ in range(200):
            _reseed(tf, int(rng.integers(1 << 30)))
            y0, x0, y1, x1 = tf.transforms[0].get_params_dependent_on_data({"shape": (h, w)}, {"image": image})["crop_coords"]
            assert min(y1 - y0, x1 - x0) >= size - 1, (h, w, (y0, x0, y1, x1))
    # and it is not wasteful: at the smallest scale and the narrowest ratio the crop's short side is ~size
    assert need <= math.ceil(size / math.sqrt(scale[0] * 3 / 4)) and need < 4.1 * size
