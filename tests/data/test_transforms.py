"""Train/eval transforms: sizes, padding values, nearest masks, one spatial transform for all masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fsseg.data.transforms import EvalTransform, TrainTransform, eval_content_size
from fsseg.errors import ConfigError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def sample(h=64, w=80):
    """Label with classes 7 (left block) and 9 (right block) and a 255 top row; the image encodes it."""
    label = np.zeros((h, w), np.uint8)
    label[10:40, 5:30] = 7
    label[20:50, 45:75] = 9
    label[0, :] = 255
    image = np.stack([label, label // 2, 255 - label], -1).astype(np.uint8)
    return image, label


def test_eval_content_size_rule():
    # longer side -> size, the other int(side * size / longer), both rounded down to a multiple of 8
    assert eval_content_size(375, 500, 473) == (352, 472)  # 473 -> 472; int(375 * 0.946) = 354 -> 352
    assert eval_content_size(500, 375, 473) == (472, 352)
    assert eval_content_size(64, 80, 44) == (32, 40)
    assert eval_content_size(64, 80, 44, size_divisor=1) == (35, 44)
    assert eval_content_size(100, 100, 128) == (128, 128)


def test_eval_transform_pads_bottom_right_and_keeps_sizes():
    image, label = sample()
    tf = EvalTransform(44, MEAN, STD)
    binary = np.where(label == 255, 255, (label == 7).astype(np.uint8)).astype(np.uint8)
    img, (mask,), content = tf(image, [binary])
    assert content == (32, 40)
    assert img.shape == (3, 44, 44) and img.dtype == torch.float32 and mask.dtype == torch.int64
    assert (mask[32:, :] == 255).all() and (mask[:, 40:] == 255).all()  # label padding
    assert torch.count_nonzero(img[:, 32:, :]) == 0 and torch.count_nonzero(img[:, :, 40:]) == 0  # mean pad
    assert set(mask[:32, :40].unique().tolist()) <= {0, 1, 255}  # nearest: no new values
    # the original label is never modified by the transform (the dataset keeps it as QUERY_LABEL_ORI)
    assert np.array_equal(binary, np.where(label == 255, 255, (label == 7).astype(np.uint8)))


def test_normalisation_uses_mean_and_std_on_0_1_scale():
    tf = EvalTransform(16, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0), size_divisor=1)
    image = np.full((16, 16, 3), 204, np.uint8)  # 0.8
    img, _, _ = tf(image, [])
    expected = torch.tensor([(0.8 - 0.5) / 0.25, (0.8 - 0.5) / 0.5, (0.8 - 0.5) / 1.0])
    assert torch.allclose(img[:, 3, 3], expected, atol=1e-5)


def test_train_transform_same_spatial_transform_for_all_masks():
    image, label = sample()
    tf = TrainTransform(48, MEAN, STD, scale_range=(0.9, 1.1), rotate_deg=10, blur_p=0.5, hflip_p=0.5,
                        rotate_p=1.0)  # fmt: skip
    binary = np.where(label == 255, 255, (label == 7).astype(np.uint8)).astype(np.uint8)
    for seed in range(8):
        img, (m, base) = tf(image, [binary, label], np.random.default_rng(seed))
        assert img.shape == (3, 48, 48) and m.shape == base.shape == (48, 48)
        assert set(m.unique().tolist()) <= {0, 1, 255}
        assert set(base.unique().tolist()) <= {0, 7, 9, 255}  # nearest interpolation only
        assert torch.equal(m == 1, base == 7) and torch.equal(m == 255, base == 255)


def test_train_transform_pads_small_images_with_mean_and_255():
    image, label = sample(20, 30)
    tf = TrainTransform(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), scale_range=(1.0, 1.0), rotate_deg=0, blur_p=0,
                        hflip_p=0)  # fmt: skip
    img, (m,) = tf(image, [label], np.random.default_rng(0))
    assert img.shape == (3, 64, 64)
    assert int((m != 255).sum()) == int((label != 255).sum())  # the whole image is inside the crop
    assert int((m == 255).sum()) == 64 * 64 - 20 * 30 + int((label == 255).sum())
    corner = img[:, 0, 0]  # centred padding: the corner is padding, filled with the mean -> 0 (+- rounding)
    assert bool(m[0, 0] == 255) and torch.allclose(corner, torch.zeros(3), atol=0.01)


def test_rotation_pads_label_with_255():
    image = np.full((40, 40, 3), 100, np.uint8)
    label = np.ones((40, 40), np.uint8)
    tf = TrainTransform(40, MEAN, STD, scale_range=(1, 1), rotate_deg=10, blur_p=0, hflip_p=0, rotate_p=1.0)
    padded = [int((tf(image, [label], np.random.default_rng(s))[1][0] == 255).sum()) for s in range(6)]
    assert max(padded) > 0  # rotated corners are ignore, never background


def test_train_transform_is_deterministic_given_the_generator():
    image, label = sample()
    tf = TrainTransform(48, MEAN, STD)
    a = tf(image, [label], np.random.default_rng(3))
    b = tf(image, [label], np.random.default_rng(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1][0], b[1][0])
    outs = {tf(image, [label], np.random.default_rng(s))[0].sum().item() for s in range(6)}
    assert len(outs) > 1


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(size=0), "train_size"),
        (dict(scale_range=(1.2, 0.9)), "scale_range"),
        (dict(blur_p=1.5), "blur_p"),
        (dict(rotate_deg=-1), "rotate_deg"),
        (dict(std=(0.2, 0.0, 0.2)), "std"),
        (dict(mean=(120, 110, 100)), "mean"),
    ],
)
def test_train_transform_rejects_bad_options(kwargs, option):
    args = dict(size=32, mean=MEAN, std=STD)
    args.update(kwargs)
    with pytest.raises(ConfigError, match=option):
        TrainTransform(**args)
