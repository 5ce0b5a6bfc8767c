"""The training loss, the colour augmentations and stain normalization, on hand-made and real images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bcseg.classes import IGNORE_INDEX
from bcseg.stain import StainNormalizer
from bcseg.training.augment import NO_AUGMENTATION, Augmentation, augment, perturb_stains
from bcseg.training.losses import DiceCrossEntropyLoss


def one_hot_logits(target: torch.Tensor, classes: int, confidence: float = 20.0) -> torch.Tensor:
    logits = torch.full((target.shape[0], classes, *target.shape[1:]), -confidence)
    return logits.scatter(1, target.clamp(0, classes - 1).unsqueeze(1), confidence)


def test_dice_loss_near_zero_for_perfect_prediction():
    target = torch.tensor([[[0, 1], [2, 2]]])
    loss_function = DiceCrossEntropyLoss(smooth=0.0)

    loss = loss_function(one_hot_logits(target, 3), target)
    assert loss_function.last_parts["dice_loss"] == pytest.approx(0.0, abs=1e-6)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)


def test_dice_loss_known_value():
    # Class 0: target 2 px, predicted 1 px (overlap 1) -> Dice 2/3. Class 1: target 2, predicted 3,
    # overlap 2 -> Dice 4/5. Mean 11/15, loss 4/15.
    target = torch.tensor([[[0, 0, 1, 1]]])
    predicted = torch.tensor([[[0, 1, 1, 1]]])
    loss_function = DiceCrossEntropyLoss(smooth=0.0)
    loss_function(one_hot_logits(predicted, 2, confidence=50.0), target)

    assert loss_function.last_parts["dice_loss"] == pytest.approx(4 / 15, abs=1e-5)


def test_ignored_pixels_change_nothing():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 8, 8)
    target = torch.randint(0, 5, (2, 8, 8))
    target[:, :3] = IGNORE_INDEX
    loss_function = DiceCrossEntropyLoss(class_weights=torch.tensor([1.0, 2.0, 0.5, 1.0, 1.0]))
    reference = loss_function(logits, target)

    changed = logits.clone()
    changed[:, :, :3] = torch.randn(2, 5, 3, 8) * 10  # only ignored pixels differ
    assert float(loss_function(changed, target)) == pytest.approx(float(reference), rel=1e-6)


def test_dice_weight_zero_is_cross_entropy():
    torch.manual_seed(1)
    logits = torch.randn(1, 5, 4, 4)
    target = torch.randint(0, 5, (1, 4, 4))
    loss = DiceCrossEntropyLoss(dice_weight=0.0)(logits, target)
    assert float(loss) == pytest.approx(float(torch.nn.functional.cross_entropy(logits, target)), rel=1e-6)


@pytest.fixture(scope="module")
def he_patch(shared_data) -> np.ndarray:
    path = shared_data / "bcss" / "images" / "TCGA-A2-A0D2-DX1_xmin96887_ymin22299_MPP-0.2500.png"
    if not path.exists():
        pytest.skip(f"A0D2 region not found at {path}")
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").crop((1000, 1000, 1256, 1256)))


def test_stain_perturbation_zero_is_identity(he_patch):
    back = perturb_stains(he_patch, np.ones(3), np.zeros(3))
    np.testing.assert_allclose(back.astype(int), np.maximum(he_patch, 1).astype(int), atol=1)


def test_stain_perturbation_moves_colour(he_patch):
    more_haematoxylin = perturb_stains(he_patch, np.array([1.3, 1.0, 1.0]), np.zeros(3))
    # More haematoxylin absorbs more red light: the red channel darkens most.
    darkening = he_patch.astype(float).mean(axis=(0, 1)) - more_haematoxylin.astype(float).mean(axis=(0, 1))
    assert darkening[0] > 2
    assert darkening[0] > darkening[2]


def test_augment_keeps_labels_aligned():
    rng = np.random.default_rng(0)
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    labels = np.zeros((8, 8), dtype=np.uint8)
    rgb[0, :3] = 200
    labels[0, :3] = 1
    for _ in range(8):
        out_rgb, out_labels = augment(rgb, labels, rng, NO_AUGMENTATION)
        np.testing.assert_array_equal(out_rgb[..., 0] == 200, out_labels == 1)


def test_augment_jitters_colour(he_patch):
    out, _ = augment(he_patch, np.zeros(he_patch.shape[:2], np.uint8), np.random.default_rng(2), Augmentation())
    assert out.shape == he_patch.shape
    assert np.abs(np.sort(out.ravel()).astype(int) - np.sort(he_patch.ravel()).astype(int)).mean() > 1


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_stain_normalizer_maps_to_target(he_patch, method):
    target = he_patch
    pale = (255 - (255 - he_patch.astype(np.float32)) * 0.6).astype(np.uint8)  # a faded copy
    normalizer = StainNormalizer.fit(method, target)

    restored = normalizer.apply(pale)
    assert abs(restored.astype(float).mean() - target.astype(float).mean()) < abs(pale.astype(float).mean() - target.astype(float).mean())

    again = StainNormalizer.from_json(normalizer.to_json())
    np.testing.assert_array_equal(again.apply(pale), restored)


def test_stain_normalizer_leaves_blank_image():
    normalizer = StainNormalizer("reinhard", {"lab_means": [70.0, 20.0, -10.0], "lab_stds": [10.0, 5.0, 5.0]})
    white = np.full((32, 32, 3), 245, dtype=np.uint8)
    np.testing.assert_array_equal(normalizer.apply(white), white)
