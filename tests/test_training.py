"""Short training runs on the real A0SK tiles, data checks and the BCSS code table in checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bcseg.checkpoint import load_checkpoint
from bcseg.classes import DEFAULT_BCSS_GROUPS, IGNORE_INDEX, code_lookup_table
from bcseg.errors import BadInputError
from bcseg.training import TrainConfig, train
from bcseg.training.data import PatchSampler, Region

TILE_NAME = "TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0_0_224_size224.png"


@pytest.fixture(scope="module")
def a0sk_tiles(shared_data) -> Path:
    folder = shared_data / "bcss" / "tiles_a0sk"
    if not folder.is_dir():
        pytest.skip(f"A0SK tiles not found at {folder}")
    return folder


def tiny_config(data_dir: Path, out_dir: Path, **overrides) -> TrainConfig:
    options = dict(
        mpp=1.0, data_mpp=0.25, tile_size=64, inference_tile_size=64, steps=2, batch_size=2,
        seed=3, threads=2, val_every=2,
    )
    options.update(overrides)
    return TrainConfig(data_dirs=[data_dir], out_dir=out_dir, **options)


@pytest.fixture(scope="module")
def trained_run(a0sk_tiles, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("run")
    result = train(tiny_config(a0sk_tiles, out_dir))
    return result, out_dir


def test_checkpoint_loads_and_predicts_shape(trained_run):
    result, out_dir = trained_run
    loaded = load_checkpoint(result.best_path)

    with torch.no_grad():
        logits = loaded.model(torch.zeros(1, 3, 64, 48))
    assert logits.shape == (1, 5, 64, 48)
    assert result.steps_done == 2
    assert (out_dir / "last.safetensors").exists()


def test_checkpoint_records_training(trained_run):
    result, out_dir = trained_run
    info = load_checkpoint(result.last_path).info

    assert info.mpp == 1.0
    assert info.tile_size_px == 64
    assert info.provenance["steps"] == 2
    assert len(info.provenance["training_data"]) == 8
    assert all(entry["source_mpp"] == 0.25 for entry in info.provenance["training_data"])
    assert "random initialization" in info.provenance["recipe"]["initialization"]
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [2]


@pytest.mark.slow
def test_same_seed_same_weights(trained_run, a0sk_tiles, tmp_path):
    first, _ = trained_run
    again = train(tiny_config(a0sk_tiles, tmp_path / "again"))
    other_seed = train(tiny_config(a0sk_tiles, tmp_path / "other", seed=4))

    first_state = load_checkpoint(first.last_path).model.state_dict()
    again_state = load_checkpoint(again.last_path).model.state_dict()
    other_state = load_checkpoint(other_seed.last_path).model.state_dict()
    for name, tensor in first_state.items():
        torch.testing.assert_close(again_state[name], tensor, rtol=0, atol=0, msg=name)
    head = "net.classifier.4.weight"
    assert not torch.equal(other_state[head], first_state[head])


def test_code_table_round_trips(a0sk_tiles, tmp_path):
    groups = dict(DEFAULT_BCSS_GROUPS)
    groups[15] = None  # undetermined ignored
    groups[14] = "inflammatory"  # lymphatics moved
    result = train(tiny_config(a0sk_tiles, tmp_path, steps=1, val_every=1, groups=groups))

    stored = load_checkpoint(result.last_path).info.bcss_groups
    assert {int(code): group for code, group in stored.items()} == groups
    table = code_lookup_table({int(code): group for code, group in stored.items()})
    np.testing.assert_array_equal(table, code_lookup_table(groups))
    assert table[15] == IGNORE_INDEX


@pytest.mark.slow
def test_binary_validation_scores_tumour_dice(a0sk_tiles, shared_data, tmp_path):
    val_dir = shared_data / "bcss" / "tumor_binary"
    config = tiny_config(
        a0sk_tiles, tmp_path, steps=1, val_every=1, mpp=8.0, val_dir=val_dir, val_binary=True,
        compact_out=tmp_path / "compact.safetensors",
    )
    result = train(config)

    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["validation"]["kind"] == "tumor_vs_rest"
    assert 0.0 <= record["validation"]["tumor_dice"] <= 1.0
    assert result.best_score == record["validation"]["tumor_dice"]
    best = load_checkpoint(result.best_path).info
    assert best.provenance["best_validation"]["tumor_dice"] == result.best_score
    assert load_checkpoint(result.compact_path).weights_encoding == "int8-per-channel"


# Bad data: small synthetic folders, each with one defect.


def write_pair(folder: Path, name: str, image_size=(32, 32), mask_size=(32, 32), codes=(1, 2)) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (image_size[1], image_size[0], 3), dtype=np.uint8)
    mask = np.resize(np.array(codes, dtype=np.uint8), mask_size[0] * mask_size[1]).reshape(mask_size[1], mask_size[0])
    Image.fromarray(rgb).save(folder / "images" / name)
    Image.fromarray(mask).save(folder / "masks" / name)


GOOD_NAME = "region_MPP-0.2500.png"


def test_missing_mask_rejected(tmp_path):
    write_pair(tmp_path / "data", GOOD_NAME)
    write_pair(tmp_path / "data", "second_MPP-0.2500.png")
    (tmp_path / "data" / "masks" / "second_MPP-0.2500.png").unlink()

    with pytest.raises(BadInputError, match=r"second_MPP-0\.2500\.png: mask not found"):
        train(tiny_config(tmp_path / "data", tmp_path / "run", data_mpp=None))


def test_size_mismatch_rejected(tmp_path):
    write_pair(tmp_path / "data", GOOD_NAME, mask_size=(32, 30))
    with pytest.raises(BadInputError, match=r"region_MPP-0\.2500\.png: mask size 32x30 differs from image size 32x32"):
        train(tiny_config(tmp_path / "data", tmp_path / "run", data_mpp=None))


def test_unknown_code_rejected(tmp_path):
    write_pair(tmp_path / "data", GOOD_NAME, codes=(1, 2, 42))
    with pytest.raises(BadInputError, match=r"region_MPP-0\.2500\.png: unknown label codes \[42\]"):
        train(tiny_config(tmp_path / "data", tmp_path / "run", data_mpp=None))


def test_missing_resolution_names_option(tmp_path):
    write_pair(tmp_path / "data", "region_MPP-0_0_224_size224.png")
    with pytest.raises(BadInputError, match="--data-mpp"):
        train(tiny_config(tmp_path / "data", tmp_path / "run", data_mpp=None))


def test_missing_images_folder_rejected(tmp_path):
    (tmp_path / "data" / "masks").mkdir(parents=True)
    with pytest.raises(BadInputError, match="images: folder not found"):
        train(tiny_config(tmp_path / "data", tmp_path / "run"))


def test_cli_exits_2_on_bad_data(tmp_path, capsys):
    from bcseg.cli import EXIT_BAD_INPUT, main

    write_pair(tmp_path / "data", GOOD_NAME, codes=(1, 42))
    exit_code = main(["train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--steps", "1", "-q"])

    assert exit_code == EXIT_BAD_INPUT
    assert "unknown label codes [42]" in capsys.readouterr().err


def test_sampler_patches_shape_and_labels():
    labels = np.full((40, 40), IGNORE_INDEX, dtype=np.uint8)
    labels[:20] = 0
    labels[20:, :5] = 3  # a small necrosis block must still be drawn
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    sampler = PatchSampler([Region("r", image, labels, 0.25)], tile_size=16, rng=np.random.default_rng(0))

    seen = set()
    for _ in range(50):
        rgb, patch = sampler.sample()
        assert rgb.shape == (16, 16, 3)
        assert patch.shape == (16, 16)
        seen |= set(np.unique(patch).tolist())
    assert {0, 3} <= seen
