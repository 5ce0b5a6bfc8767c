"""The bundled default model: loads, fits the size limit, matches its card, and its int8 rounding
does not change its label maps on a real slide region."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bcseg.checkpoint import DEFAULT_MODEL_PATH, SCALE_SUFFIX, file_sha256, load_checkpoint
from bcseg.model import build_model
from bcseg.training.predict import predict_labels

CARD_PATH = DEFAULT_MODEL_PATH.with_name("default.card.json")
MAX_BYTES = 45 * 1024 * 1024
SLIDE_NAME = "TCGA-A2-A0D2-roi-pyramid.svs"
REGION_SIDE_PX = 512  # at the model's resolution


@pytest.fixture(scope="module")
def default_model():
    if not DEFAULT_MODEL_PATH.exists():
        pytest.fail(f"bundled model missing: {DEFAULT_MODEL_PATH}")
    return load_checkpoint()


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads(CARD_PATH.read_text(encoding="utf-8"))


def test_default_model_loads_compact(default_model):
    assert default_model.path == DEFAULT_MODEL_PATH
    assert default_model.weights_encoding == "int8-per-channel"
    assert not default_model.model.training
    with torch.no_grad():
        logits = default_model.model(torch.zeros(1, 3, 64, 64))
    assert logits.shape == (1, default_model.info.num_classes, 64, 64)


def test_default_model_size_limit():
    assert DEFAULT_MODEL_PATH.stat().st_size <= MAX_BYTES


def test_card_matches_metadata(default_model, card):
    info = default_model.info
    assert card["sha256"] == file_sha256(DEFAULT_MODEL_PATH)
    assert card["size_bytes"] == DEFAULT_MODEL_PATH.stat().st_size
    assert card["weights_encoding"] == default_model.weights_encoding
    assert card["architecture"] == info.architecture
    assert card["mpp"] == info.mpp
    assert card["tile_size_px"] == info.tile_size_px
    assert card["classes"] == [c["name"] for c in info.classes]
    assert card["bcss_groups"] == info.bcss_groups
    assert card["steps"] == info.provenance["steps"]
    assert card["checkpoint_validation"] == info.provenance["best_validation"]
    assert card["training_data"] == [entry["file"] for entry in info.provenance["training_data"]]


def test_card_states_limits(card):
    assert "random initialisation" in card["statement"]
    assert "demonstration grade" in card["statement"]
    assert "2-core CPU" in card["statement"]
    assert card["compact_vs_float"]["label_agreement"] >= 0.99
    assert not any("A1G6" in name for name in card["training_data"])
    md = DEFAULT_MODEL_PATH.with_name("default.card.md").read_text(encoding="utf-8")
    assert card["sha256"] in md


def float_model_rounding_to(path, seed: int) -> torch.nn.Module:
    """One float model whose int8 quantization is the stored one: each quantized weight is
    dequantized and moved by uniform noise within half a quantization step."""
    from safetensors.torch import load_file

    stored = load_file(str(path))
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in stored.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = stored.get(name + SCALE_SUFFIX)
        if scale is None:
            state[name] = tensor
            continue
        scale = scale.reshape((-1,) + (1,) * (tensor.ndim - 1))
        noise = torch.rand(tensor.shape, generator=generator) - 0.5
        state[name] = (tensor.float() + noise) * scale
    # The same image pooling as the loaded model, so the two differ only by int8 rounding.
    model = build_model(image_pooling_px=load_checkpoint(path).info.image_pooling_px)
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.mark.slow
def test_int8_rounding_keeps_label_map(default_model, shared_data):
    from pipeline.slide import open_slide

    slide_path = shared_data / "slides" / SLIDE_NAME
    if not slide_path.exists():
        pytest.skip(f"slide not found: {slide_path}")
    info = default_model.info
    torch.set_num_threads(2)

    # A tissue region from the middle of the slide, at the model's resolution.
    with open_slide(slide_path) as slide:
        m_width, m_height = slide.size_at_mpp(info.mpp)
        side = min(REGION_SIDE_PX, m_width, m_height)
        rgb = slide.read_region_at_mpp((m_width - side) // 2, (m_height - side) // 2, side, side, info.mpp)

    window = side + 64
    compact_labels = predict_labels(default_model.model, rgb, info.mean, info.std, window_px=window, margin_px=32)
    float_model = float_model_rounding_to(DEFAULT_MODEL_PATH, seed=0)
    float_labels = predict_labels(float_model, rgb, info.mean, info.std, window_px=window, margin_px=32)

    agreement = float(np.mean(compact_labels == float_labels))
    assert agreement >= 0.99, f"label agreement {agreement:.4f} on {side}x{side} px of {SLIDE_NAME}"
