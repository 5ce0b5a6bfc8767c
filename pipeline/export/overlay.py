"""Slide thumbnail with the class colours blended in, and a legend, saved as PNG."""

from __future__ import annotations

import logging
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from bcseg.classes import CLASSES
from pipeline.export import atomic_output

logger = logging.getLogger(__name__)

LEGEND_BACKGROUND = (255, 255, 255)
LEGEND_TEXT = (0, 0, 0)


def downsample_labels(labels, out_width: int, out_height: int, band_rows: int = 1024) -> np.ndarray:
    """Shrink a label map to (out_height, out_width) by nearest neighbour, reading it band by band.

    Output pixel ``(row, col)`` takes the label at the centre of the area it covers, so every value
    is a real label and the sampling has no half-pixel shift. ``labels`` is any 2-D array-like that
    supports ``labels[r0:r1, :]``, read at most ``band_rows`` rows at a time.
    """
    if len(labels.shape) != 2:
        raise ValueError(f"labels must be 2-D (rows, cols), got shape {tuple(labels.shape)}")
    if out_width < 1 or out_height < 1:
        raise ValueError(f"output size must be at least 1 x 1, got {out_width} x {out_height}")
    m_rows, m_cols = (int(n) for n in labels.shape)
    if m_rows == 0 or m_cols == 0:
        raise ValueError(f"labels is empty, shape {(m_rows, m_cols)}")

    m_source_rows = _centre_indices(out_height, m_rows)
    m_source_cols = _centre_indices(out_width, m_cols)
    small = np.zeros((out_height, out_width), np.uint8)
    for m_row0 in range(0, m_rows, band_rows):
        m_row1 = min(m_row0 + band_rows, m_rows)
        selected = np.flatnonzero((m_source_rows >= m_row0) & (m_source_rows < m_row1))
        if selected.size == 0:
            continue
        # Read only the rows between the first and the last one sampled in this band.
        m_first, m_last = int(m_source_rows[selected[0]]), int(m_source_rows[selected[-1]])
        band = np.asarray(labels[m_first : m_last + 1, :])
        small[selected] = band[m_source_rows[selected] - m_first][:, m_source_cols]
    return small


def _centre_indices(out_size: int, in_size: int) -> np.ndarray:
    """Index of the input pixel under the centre of each output pixel."""
    centres = (np.arange(out_size) + 0.5) * (in_size / out_size)
    return np.minimum(centres.astype(np.int64), in_size - 1)


def blend_labels(thumbnail_rgb: np.ndarray, labels_small: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Blend each class colour into the thumbnail where ``labels_small`` is that class.

    Pixels with label 0, or a value outside the class table, keep the thumbnail colour.
    """
    if thumbnail_rgb.ndim != 3 or thumbnail_rgb.shape[2] != 3:
        raise ValueError(f"thumbnail must be RGB (rows, cols, 3), got shape {thumbnail_rgb.shape}")
    if labels_small.shape != thumbnail_rgb.shape[:2]:
        raise ValueError(
            f"labels shape {labels_small.shape} must match the thumbnail's (rows, cols) {thumbnail_rgb.shape[:2]}. "
            "Make it with downsample_labels(labels, width, height)."
        )
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha!r}")

    palette = np.zeros((256, 3), np.float32)
    for tissue_class in CLASSES:
        palette[tissue_class.label] = tissue_class.color
    in_class = np.isin(labels_small, [tissue_class.label for tissue_class in CLASSES])

    blended = thumbnail_rgb.astype(np.float32)
    blended[in_class] = (1 - alpha) * blended[in_class] + alpha * palette[labels_small[in_class]]
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def draw_legend(width: int) -> Image.Image:
    """Draw a white strip ``width`` px wide with a colour swatch and QuPath name per class.

    Entries wrap onto more lines when the strip is too narrow for one line.
    """
    font_px = int(np.clip(round(width / 70), 12, 32))
    font = ImageFont.load_default(size=font_px)
    gap = font_px // 2
    line_height = font_px + gap

    # Lay the entries out first, so the strip height is known before drawing.
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    positions = []
    x, y = gap, gap
    for tissue_class in CLASSES:
        entry_width = font_px + gap // 2 + int(measure.textlength(tissue_class.qupath_name, font=font))
        if x > gap and x + entry_width > width - gap:
            x, y = gap, y + line_height
        positions.append((x, y))
        x += entry_width + 2 * gap

    legend = Image.new("RGB", (width, y + line_height + gap // 2), LEGEND_BACKGROUND)
    draw = ImageDraw.Draw(legend)
    # Centre the text on the swatch by the ink box of "Hg" (cap height to descender), so every name
    # shares one baseline. A bitmap font, used when Pillow lacks FreeType, supports no anchors.
    top, bottom = font.getbbox("Hg")[1::2]
    text_offset = (font_px - (bottom - top)) / 2 - top
    for tissue_class, (x, y) in zip(CLASSES, positions):
        draw.rectangle([x, y, x + font_px - 1, y + font_px - 1], fill=tissue_class.color, outline=LEGEND_TEXT)
        draw.text((x + font_px + gap // 2, y + text_offset), tissue_class.qupath_name, fill=LEGEND_TEXT, font=font)
    return legend


def write_overlay(path: str | os.PathLike, thumbnail_rgb: np.ndarray, labels_small: np.ndarray, alpha: float = 0.4) -> tuple[int, int]:
    """Write the blended thumbnail with the legend below it as a PNG.

    ``thumbnail_rgb`` is uint8 (rows, cols, 3) and ``labels_small`` the label map at the same
    (rows, cols). Returns the PNG's (width, height).
    """
    blended = Image.fromarray(blend_labels(thumbnail_rgb, labels_small, alpha))
    legend = draw_legend(blended.width)
    overlay = Image.new("RGB", (blended.width, blended.height + legend.height), LEGEND_BACKGROUND)
    overlay.paste(blended, (0, 0))
    overlay.paste(legend, (0, blended.height))

    with atomic_output(path) as temporary:
        overlay.save(temporary, format="PNG")
    logger.info("wrote overlay %s (%d x %d px)", path, overlay.width, overlay.height)
    return overlay.size
