"""Label maps of whole in-memory regions, for validation and model checks.

Slides go through the pipeline's tiler and stitcher instead; this is the small in-memory path.
"""

from __future__ import annotations

import numpy as np
import torch


def normalize(rgb: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Turn RGB uint8 (rows, cols, 3) or (batch, rows, cols, 3) into a normalized float NCHW tensor."""
    tensor = torch.from_numpy(np.ascontiguousarray(rgb)).float().div_(255.0)
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(0)
    tensor = tensor.permute(0, 3, 1, 2)
    mean_tensor = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_tensor = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((tensor - mean_tensor) / std_tensor).contiguous()


@torch.no_grad()
def predict_labels(
    model: torch.nn.Module,
    rgb: np.ndarray,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    window_px: int = 1024,
    margin_px: int = 32,
    padding: str = "symmetric",
) -> np.ndarray:
    """Return the argmax channel per pixel (uint8, (rows, cols)) of an RGB region at model resolution.

    The region is cut into windows of ``window_px`` that overlap by ``2 * margin_px``, and each
    window keeps only its centre. So every output pixel has at least ``margin_px`` of context;
    at the region's own edges that context is the mirrored image, or white with ``padding=
    "white"``, as the slide reader gives past a slide's edges. The model must be in eval mode.
    """
    m_rows, m_cols = rgb.shape[:2]
    step = window_px - 2 * margin_px
    if step <= 0:
        raise ValueError(f"window_px {window_px} must exceed twice margin_px {margin_px}")

    # Mirror-pad so every window is full size and each output pixel has margin_px of context.
    pad_bottom = margin_px + (-m_rows) % step
    pad_right = margin_px + (-m_cols) % step
    pad_width = ((margin_px, pad_bottom), (margin_px, pad_right), (0, 0))
    if padding == "white":
        padded = np.pad(rgb, pad_width, constant_values=255)
    elif padding == "symmetric":
        padded = np.pad(rgb, pad_width, mode="symmetric")
    else:
        raise ValueError(f"padding must be 'symmetric' or 'white', got {padding!r}")

    device = next(model.parameters()).device
    labels = np.zeros((m_rows, m_cols), dtype=np.uint8)
    for m_top in range(0, m_rows, step):
        for m_left in range(0, m_cols, step):
            window = padded[m_top : m_top + window_px, m_left : m_left + window_px]
            logits = model(normalize(window, mean, std).to(device))[0].float()
            keep = logits[:, margin_px : margin_px + step, margin_px : margin_px + step].argmax(dim=0)
            rows = min(step, m_rows - m_top)
            cols = min(step, m_cols - m_left)
            labels[m_top : m_top + rows, m_left : m_left + cols] = keep[:rows, :cols].cpu().numpy()
    return labels
