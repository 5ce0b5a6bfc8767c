"""Training data: BCSS-style image and mask pairs, checked, resampled to the model's resolution,
and sampled as augmented patches.

A data folder holds ``images/`` and ``masks/`` with matching file names. Masks carry one BCSS
code per pixel (0..21); ``code_lookup_table`` maps them to model channels or IGNORE_INDEX.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from bcseg.classes import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES
from bcseg.errors import BadInputError
from bcseg.training.augment import Augmentation, augment

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
# BCSS names carry the resolution as "_MPP-0.2500". A bare "_MPP-0_" (the A0SK tile release lost
# the decimals) does not count as a resolution.
MPP_IN_NAME = re.compile(r"_MPP-(\d+\.\d+)")
BINARY_TUMOR_VALUE = 255
# Pixel positions kept per class for drawing patch centres; more adds memory, not variety.
MAX_CENTRES_PER_CLASS = 200_000
# Classes with at least this share of labelled pixels are drawn equally often as patch centres;
# rarer ones in proportion to their share, so a handful of pixels is not drawn a fifth of the time.
EVEN_SAMPLING_MIN_SHARE = 0.01


@dataclass
class Region:
    """One image with its label map, both at the model's resolution."""

    name: str
    image: np.ndarray  # RGB uint8, (rows, cols, 3)
    labels: np.ndarray  # uint8 model channels or IGNORE_INDEX, (rows, cols)
    source_mpp: float


def find_pairs(data_dir: Path) -> list[tuple[Path, Path]]:
    """List (image, mask) paths of ``data_dir/images`` and ``data_dir/masks`` matched by file name."""
    images_dir, masks_dir = data_dir / "images", data_dir / "masks"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise BadInputError(f"{folder}: folder not found; a data folder needs images/ and masks/ with matching file names")

    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    masks = {p.name for p in masks_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    if not images:
        raise BadInputError(f"{images_dir}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    for image in images:
        if image.name not in masks:
            raise BadInputError(f"{image}: mask not found; expected {masks_dir / image.name}")
    orphans = sorted(masks - {image.name for image in images})
    if orphans:
        raise BadInputError(f"{masks_dir / orphans[0]}: mask has no image; expected {images_dir / orphans[0]}")
    return [(image, masks_dir / image.name) for image in images]


def resolution_of(path: Path, data_mpp: float | None) -> float:
    """Microns per pixel from the file name, else ``data_mpp``; raise when neither gives one."""
    match = MPP_IN_NAME.search(path.name)
    if match and float(match.group(1)) > 0:
        name_mpp = float(match.group(1))
        if data_mpp is not None and abs(name_mpp - data_mpp) > 0.01 * name_mpp:
            log.warning("%s: the name gives %.4f um/px; using it, not --data-mpp %.4f", path.name, name_mpp, data_mpp)
        return name_mpp
    if data_mpp is None:
        raise BadInputError(
            f"{path}: resolution unknown (the name has no '_MPP-<microns>' part such as _MPP-0.2500); "
            "pass --data-mpp MICRONS"
        )
    return data_mpp


def read_pair(image_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an RGB image and a single-channel uint8 mask, checking that their sizes match."""
    try:
        with Image.open(image_path) as image:
            rgb = np.asarray(image.convert("RGB"))
        with Image.open(mask_path) as mask_image:
            if mask_image.mode not in ("L", "P", "I", "I;16"):
                raise BadInputError(
                    f"{mask_path}: mask mode is {mask_image.mode}; expected a single-channel image of label codes"
                )
            mask = np.asarray(mask_image)
    except (OSError, Image.DecompressionBombError) as error:
        raise BadInputError(f"{error.filename or image_path}: failed to read the image ({error})") from error
    if mask.shape != rgb.shape[:2]:
        raise BadInputError(
            f"{mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from image size "
            f"{rgb.shape[1]}x{rgb.shape[0]} ({image_path.name}); masks must match their image pixel for pixel"
        )
    if mask.max(initial=0) > 255:
        raise BadInputError(f"{mask_path}: mask value {int(mask.max())} is above 255; BCSS codes are 0..21")
    return rgb, mask.astype(np.uint8)


def resample(rgb: np.ndarray, mask: np.ndarray, source_mpp: float, target_mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """Resample an image (area interpolation) and its mask (nearest) from ``source_mpp`` to ``target_mpp``."""
    scale = source_mpp / target_mpp
    if abs(scale - 1.0) < 1e-6:
        return rgb, mask
    m_rows = max(1, round(rgb.shape[0] * scale))
    m_cols = max(1, round(rgb.shape[1] * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return (
        cv2.resize(rgb, (m_cols, m_rows), interpolation=interpolation),
        cv2.resize(mask, (m_cols, m_rows), interpolation=cv2.INTER_NEAREST),
    )


def load_regions(
    pairs: list[tuple[Path, Path]],
    groups: dict[int, str | None],
    lookup: np.ndarray,
    mpp: float,
    data_mpp: float | None,
    stain_normalizer=None,
) -> list[Region]:
    """Read, check and resample each (image, mask) pair; codes become model channels.

    With a ``stain_normalizer`` (bcseg.stain.StainNormalizer) each whole image is normalized
    after resampling.
    """
    regions = []
    for image_path, mask_path in pairs:
        source_mpp = resolution_of(image_path, data_mpp)
        rgb, mask = read_pair(image_path, mask_path)
        unknown = sorted(set(np.unique(mask).tolist()) - set(groups))
        if unknown:
            raise BadInputError(
                f"{mask_path}: unknown label codes {unknown}; known BCSS codes are "
                f"{min(groups)}..{max(groups)} (the code table in bcseg.classes)"
            )
        rgb, mask = resample(rgb, mask, source_mpp, mpp)
        if stain_normalizer is not None:
            rgb = stain_normalizer.apply(rgb)
        regions.append(Region(image_path.name, rgb, lookup[mask], source_mpp))
        log.debug("region %s: %dx%d px at %.2f um/px", image_path.name, rgb.shape[1], rgb.shape[0], mpp)
    return regions


def load_training_regions(
    data_dirs: list[Path], groups: dict[int, str | None], lookup: np.ndarray, mpp: float, data_mpp: float | None
) -> list[Region]:
    """Read every pair of every folder with ``load_regions``."""
    pairs = [pair for data_dir in data_dirs for pair in find_pairs(Path(data_dir))]
    return load_regions(pairs, groups, lookup, mpp, data_mpp)


def load_binary_validation(
    val_dir: Path, mpp: float, data_mpp: float | None, stain_normalizer=None
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Read tumour-versus-rest regions (mask 255 tumour, 0 the rest) as (name, RGB, tumour bool)."""
    regions = []
    for image_path, mask_path in find_pairs(Path(val_dir)):
        rgb, mask = read_pair(image_path, mask_path)
        values = set(np.unique(mask).tolist())
        if not values <= {0, BINARY_TUMOR_VALUE}:
            raise BadInputError(
                f"{mask_path}: a binary tumour mask contains only 0 and 255, found {sorted(values)}; "
                "drop --val-binary for 22-code masks"
            )
        rgb, mask = resample(rgb, mask, resolution_of(image_path, data_mpp), mpp)
        if stain_normalizer is not None:
            rgb = stain_normalizer.apply(rgb)
        regions.append((image_path.name, rgb, mask == BINARY_TUMOR_VALUE))
    return regions


def class_pixel_counts(regions: list[Region]) -> np.ndarray:
    counts = np.zeros(NUM_CLASSES, dtype=np.int64)
    for region in regions:
        counts += np.bincount(region.labels.ravel(), minlength=256)[:NUM_CLASSES]
    return counts


def class_weights(counts: np.ndarray) -> np.ndarray:
    """Loss weight per class: sqrt(median frequency / frequency), clipped to [0.25, 4]; absent classes get 1.

    The square root is milder than plain inverse frequency because the patch sampler already
    draws rare classes more often.
    """
    present = counts > 0
    weights = np.ones(len(counts), dtype=np.float64)
    if present.any():
        frequency = counts[present] / counts[present].sum()
        weights[present] = np.clip(np.sqrt(np.median(frequency) / frequency), 0.25, 4.0)
    return weights.astype(np.float32)


class PatchSampler:
    """Draw augmented training patches whose centres are spread evenly over the classes present.

    Each patch first draws a class, then a pixel of that class (over all regions), and centres
    the patch there. Classes holding at least EVEN_SAMPLING_MIN_SHARE of the labelled pixels are
    drawn equally often; rarer classes less, in proportion to their share. Pixels beyond a
    region's edge are mirrored in the image and IGNORE_INDEX in the labels.
    """

    def __init__(
        self,
        regions: list[Region],
        tile_size: int,
        rng: np.random.Generator,
        augmentation: Augmentation | None = None,
    ):
        self.tile_size = tile_size
        self.rng = rng
        self.augmentation = augmentation or Augmentation()
        # The largest crop, before resizing to tile_size, is tile_size * max scale.
        half = int(np.ceil(tile_size * self.augmentation.scale_range[1])) // 2 + 2
        self.half = half
        self.images = [np.pad(r.image, ((half, half), (half, half), (0, 0)), mode="symmetric") for r in regions]
        self.labels = [np.pad(r.labels, half, mode="constant", constant_values=IGNORE_INDEX) for r in regions]

        # Per class: rows of (region index, row, col) in padded coordinates.
        self.centres: list[np.ndarray] = []
        self.classes: list[int] = []
        pixel_counts = []
        for class_index in range(NUM_CLASSES):
            parts = []
            for region_index, region in enumerate(regions):
                rows, cols = np.nonzero(region.labels == class_index)
                parts.append(np.stack([np.full_like(rows, region_index), rows + half, cols + half], axis=1))
            centres = np.concatenate(parts) if parts else np.empty((0, 3), dtype=np.int64)
            pixel_counts.append(len(centres))
            if len(centres) > MAX_CENTRES_PER_CLASS:
                centres = centres[rng.choice(len(centres), MAX_CENTRES_PER_CLASS, replace=False)]
            if len(centres):
                self.centres.append(centres)
                self.classes.append(class_index)
        if not self.classes:
            raise BadInputError("no labelled pixels in the training data: every mask pixel is an ignored code")

        shares = np.array([pixel_counts[c] for c in self.classes], dtype=np.float64) / sum(pixel_counts)
        weights = np.minimum(shares / EVEN_SAMPLING_MIN_SHARE, 1.0)
        self.class_probabilities = weights / weights.sum()
        log.info(
            "patch centre classes %s",
            {CLASS_NAMES[c]: round(float(p), 4) for c, p in zip(self.classes, self.class_probabilities)},
        )

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """Return one augmented patch: RGB uint8 (tile, tile, 3) and labels uint8 (tile, tile)."""
        centres = self.centres[self.rng.choice(len(self.classes), p=self.class_probabilities)]
        region_index, m_row, m_col = centres[self.rng.integers(len(centres))]
        # Jitter the centre so the chosen pixel is not always in the middle.
        jitter = self.tile_size // 4
        m_row += int(self.rng.integers(-jitter, jitter + 1))
        m_col += int(self.rng.integers(-jitter, jitter + 1))

        # Scale jitter: crop a window of tile_size * scale and resize it to tile_size.
        low, high = self.augmentation.scale_range
        scale = float(np.exp(self.rng.uniform(np.log(low), np.log(high)))) if high > low else 1.0
        crop = max(2, round(self.tile_size * scale))
        image, labels = self.images[region_index], self.labels[region_index]
        m_top = int(np.clip(m_row - crop // 2, 0, image.shape[0] - crop))
        m_left = int(np.clip(m_col - crop // 2, 0, image.shape[1] - crop))
        window = (slice(m_top, m_top + crop), slice(m_left, m_left + crop))
        rgb, patch_labels = image[window], labels[window]
        if crop != self.tile_size:
            size = (self.tile_size, self.tile_size)
            rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if crop > self.tile_size else cv2.INTER_LINEAR)
            patch_labels = cv2.resize(patch_labels, size, interpolation=cv2.INTER_NEAREST)
        return augment(rgb, patch_labels, self.rng, self.augmentation)
