"""Checkpoint round trips, and rejection of files that are not bcseg safetensors checkpoints."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from bcseg.checkpoint import (
    FLOAT_MAX_ELEMENTS,
    SCALE_SUFFIX,
    ModelInfo,
    load_checkpoint,
    read_model_info,
    save_checkpoint,
)
from bcseg.errors import BadInputError
from bcseg.model import build_model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_model()
    # Give batch-norm layers non-trivial statistics so the round trip checks them too.
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.9, 1.1)
    return net.eval()


@pytest.fixture(scope="module")
def info() -> ModelInfo:
    return ModelInfo(mpp=1.0, tile_size_px=512, provenance={"note": "test", "steps": 3})


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(1, 3, 64, 64)


def test_float_round_trip(tmp_path, model, info, images):
    path = save_checkpoint(tmp_path / "float.safetensors", model, info)
    loaded = load_checkpoint(path)

    assert loaded.weights_encoding == "float32"
    assert loaded.info == info
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(images), model(images))


def test_compact_round_trip(tmp_path, model, info, images):
    float_path = save_checkpoint(tmp_path / "float.safetensors", model, info)
    compact_path = save_checkpoint(tmp_path / "compact.safetensors", model, info, compact=True)
    loaded = load_checkpoint(compact_path)

    assert loaded.weights_encoding == "int8-per-channel"
    assert loaded.info == info
    assert read_model_info(compact_path) == (info, "int8-per-channel")
    assert compact_path.stat().st_size < 0.3 * float_path.stat().st_size
    with torch.no_grad():
        expected = model(images)
        actual = loaded.model(images)
    # int8 weights shift logits slightly; the label map must stay nearly the same.
    assert (actual.argmax(1) == expected.argmax(1)).float().mean() > 0.95
    assert (actual - expected).abs().mean() < 0.05 * expected.abs().mean() + 1e-3


class CreatesFileWhenUnpickled:
    """Unpickling an instance opens (so creates) ``path`` for writing: a stand-in for any code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_pickle_rejected_without_unpickling(tmp_path, protocol):
    marker = tmp_path / "created-by-unpickling.txt"
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(pickle.dumps({"weights": CreatesFileWhenUnpickled(str(marker))}, protocol=protocol))

    with pytest.raises(BadInputError, match="model.safetensors"):
        load_checkpoint(checkpoint)
    assert not marker.exists()


def test_torch_save_zip_rejected(tmp_path):
    checkpoint = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2, 2)}, checkpoint)
    with pytest.raises(BadInputError, match="pickled PyTorch file"):
        load_checkpoint(checkpoint)


def test_safetensors_without_metadata_rejected(tmp_path):
    from safetensors.torch import save_file

    checkpoint = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(checkpoint))
    with pytest.raises(BadInputError, match="no bcseg metadata"):
        load_checkpoint(checkpoint)


@pytest.mark.parametrize("keep_fraction", [0.5, 0.999], ids=["half", "last-bytes-missing"])
def test_truncated_checkpoint_rejected(tmp_path, model, info, keep_fraction):
    path = save_checkpoint(tmp_path / "compact.safetensors", model, info, compact=True)
    size = path.stat().st_size
    with open(path, "r+b") as file:
        file.truncate(int(size * keep_fraction))

    with pytest.raises(BadInputError, match="compact.safetensors"):
        load_checkpoint(path)


def test_truncated_header_rejected(tmp_path):
    checkpoint = tmp_path / "short.safetensors"
    checkpoint.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\"")
    with pytest.raises(BadInputError, match="not a safetensors checkpoint"):
        load_checkpoint(checkpoint)


def test_save_is_atomic_and_leaves_no_partial_file(tmp_path, model, info):
    path = save_checkpoint(tmp_path / "model.safetensors", model, info, compact=True)
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    assert path.exists()


def test_saved_file_readable_by_all(tmp_path, model, info):
    previous = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "model.safetensors", model, info, compact=True)
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


def test_compact_keeps_small_tensors_float(tmp_path, model, info):
    from safetensors import safe_open

    path = save_checkpoint(tmp_path / "compact.safetensors", model, info, compact=True)
    with safe_open(str(path), framework="pt") as file:
        stem = file.get_tensor("net.backbone.conv1.weight")  # 9408 values
        large = file.get_tensor("net.backbone.layer4.0.conv2.weight")  # 2.4 million values
        keys = set(file.keys())
    assert stem.dtype == torch.float32
    assert "net.backbone.conv1.weight" + SCALE_SUFFIX not in keys
    assert stem.numel() <= FLOAT_MAX_ELEMENTS
    assert large.dtype == torch.int8
    assert "net.backbone.layer4.0.conv2.weight" + SCALE_SUFFIX in keys
