"""Short training runs on the real A0SK tiles: run folder, resume, validation, starting weights,
torchrun; data checks and the BCSS code table in checkpoints."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bcseg.checkpoint import load_checkpoint
from bcseg.classes import DEFAULT_BCSS_GROUPS, IGNORE_INDEX, code_lookup_table
from bcseg.errors import BadInputError
from bcseg.model import build_model
from bcseg.stain import StainNormalizer
from bcseg.training import TrainConfig, train
from bcseg.training.data import PatchSampler, Region
from bcseg.training.loop import resume_config
from bcseg.training.model_setup import load_backbone_weights

TILE_NAME = "TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0_0_224_size224.png"


@pytest.fixture(scope="module")
def a0sk_tiles(shared_data) -> Path:
    folder = shared_data / "bcss" / "tiles_a0sk"
    if not folder.is_dir():
        pytest.skip(f"A0SK tiles not found at {folder}")
    return folder


def tiny_config(data_dir: Path, out_dir: Path, **overrides) -> TrainConfig:
    """Two steps on 64 px patches at 1 um/px: seconds on a CPU, enough to exercise every stage."""
    options = dict(
        mpp=1.0, data_mpp=0.25, tile_size=64, inference_tile_size=64, epochs=1, patches_per_epoch=4,
        batch_size=2, seed=3, threads=2, val_fraction=0.0,
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
    assert result.epochs_done == 1
    assert not result.stopped_early


def test_run_folder_contents(trained_run):
    result, out_dir = trained_run
    for name in ("config.json", "split.json", "state.pt", "last.safetensors", "best.safetensors",
                 "metrics.jsonl", "metrics.csv", "metrics.png"):
        assert (out_dir / name).is_file(), name
    assert not list(out_dir.glob("*.partial*"))

    split = json.loads((out_dir / "split.json").read_text())
    assert split["train"]["sites"] == ["A1"]
    assert len(split["train"]["regions"]) == 8
    rows = list(csv.DictReader((out_dir / "metrics.csv").open()))
    assert [row["epoch"] for row in rows] == ["1"]
    assert float(rows[0]["cross_entropy"]) > 0
    assert float(rows[0]["dice_loss"]) > 0
    with Image.open(out_dir / "metrics.png") as plot:
        assert plot.size[0] > 500


def test_checkpoint_records_training(trained_run):
    result, out_dir = trained_run
    info = load_checkpoint(result.last_path).info

    assert info.mpp == 1.0
    assert info.tile_size_px == 64
    assert info.provenance["steps"] == 2
    assert info.provenance["epochs"] == 1
    assert len(info.provenance["training_regions"]) == 8
    assert all(entry["source_mpp"] == 0.25 for entry in info.provenance["training_regions"])
    assert info.provenance["split"]["train"] == {"sites": ["A1"], "regions": 8}
    recipe = info.provenance["recipe"]
    assert "random initialization" in recipe["initialization"]
    assert "soft Dice" in recipe["loss"]
    assert recipe["augmentation"]["scale_range"] == [0.8, 1.25]
    assert info.stain_normalization is None


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


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(a0sk_tiles, tmp_path):
    """Four steps in one go equal one step, a SIGTERM, a resume and three more steps."""
    options = dict(epochs=2, patches_per_epoch=4, lr=3e-3)
    straight = train(tiny_config(a0sk_tiles, tmp_path / "straight", **options))

    def stop_after_first_step(epoch, epochs, step, steps, loss):
        if epoch == 1 and step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = train(tiny_config(a0sk_tiles, tmp_path / "stopped", **options), stop_after_first_step)
    assert stopped.stopped_early
    assert stopped.stopped_by_signal
    assert stopped.steps_done == 1
    state = torch.load(tmp_path / "stopped" / "state.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["step"]) == (0, 1, 1)

    resumed = train(resume_config(tmp_path / "stopped"), resume=True)
    assert resumed.steps_done == straight.steps_done == 4
    assert not resumed.stopped_early

    expected = load_checkpoint(straight.last_path).model.state_dict()
    actual = load_checkpoint(resumed.last_path).model.state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    head = "net.classifier.4.weight"
    initial = build_model().state_dict()[head]
    assert not torch.allclose(expected[head], initial), "training changed nothing, so the comparison proves nothing"

    straight_rows = (tmp_path / "straight" / "metrics.csv").read_text().splitlines()
    resumed_rows = (tmp_path / "stopped" / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[:6] for row in resumed_rows] == [row.split(",")[:6] for row in straight_rows]


def test_new_run_in_used_folder_rejected(trained_run, a0sk_tiles):
    _, out_dir = trained_run
    with pytest.raises(BadInputError, match="--resume"):
        train(tiny_config(a0sk_tiles, out_dir))


def test_resume_of_missing_run_rejected(tmp_path):
    with pytest.raises(BadInputError, match="not a resumable training run"):
        resume_config(tmp_path)


def test_code_table_round_trips(a0sk_tiles, tmp_path):
    groups = dict(DEFAULT_BCSS_GROUPS)
    groups[15] = None  # undetermined ignored
    groups[14] = "inflammatory"  # lymphatics moved
    result = train(tiny_config(a0sk_tiles, tmp_path, patches_per_epoch=2, groups=groups))

    stored = load_checkpoint(result.last_path).info.bcss_groups
    assert {int(code): group for code, group in stored.items()} == groups
    table = code_lookup_table({int(code): group for code, group in stored.items()})
    np.testing.assert_array_equal(table, code_lookup_table(groups))
    assert table[15] == IGNORE_INDEX


@pytest.fixture
def binary_crop(shared_data, tmp_path) -> Path:
    """A 512 x 512 crop of the A1G6 tumour-versus-rest region, written to tmp_path."""
    source = shared_data / "bcss" / "tumor_binary"
    if not source.is_dir():
        pytest.skip(f"tumour-versus-rest region not found at {source}")
    image_path = next((source / "images").iterdir())
    folder = tmp_path / "binary"
    for kind in ("images", "masks"):
        (folder / kind).mkdir(parents=True)
        with Image.open(source / kind / image_path.name) as image:
            image.crop((1000, 1000, 1512, 1512)).save(folder / kind / image_path.name)
    return folder


def test_binary_validation_picks_best(a0sk_tiles, binary_crop, tmp_path):
    config = tiny_config(
        a0sk_tiles, tmp_path / "run", patches_per_epoch=2, val_dir=binary_crop, val_binary=True,
        compact_out=tmp_path / "compact.safetensors",
    )
    result = train(config)

    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    tumor_dice = record["validation_binary"]["tumor_dice"]
    assert 0.0 <= tumor_dice <= 1.0
    assert result.best_score == tumor_dice
    assert result.best_score_name == "tumour Dice"
    best = load_checkpoint(result.best_path).info
    assert best.provenance["best_validation"] == {"score": tumor_dice, "epoch": 1}
    assert load_checkpoint(result.compact_path).weights_encoding == "int8-per-channel"


def test_validation_split_scores_mean_dice(a0sk_tiles, tmp_path):
    # Two of the eight A0SK tiles are validation regions, picked by name through a split file.
    names = sorted(path.name for path in (a0sk_tiles / "images").iterdir())
    split = {"train": {"regions": names[2:]}, "validation": {"regions": names[:2]}, "test": {"regions": []}}
    (tmp_path / "split.json").write_text(json.dumps(split))
    result = train(tiny_config(a0sk_tiles, tmp_path / "run", split_file=tmp_path / "split.json"))

    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["validation"]["regions"] == names[:2]
    assert result.best_score == record["validation"]["mean_dice"]
    assert result.best_score_name == "mean Dice"
    assert len(load_checkpoint(result.last_path).info.provenance["training_regions"]) == 6


def test_backbone_weights_loaded(tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(11)
    reference = resnet50(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet50.pth")
    model = build_model()
    load_backbone_weights(model, tmp_path / "resnet50.pth")

    torch.testing.assert_close(model.net.backbone.layer4[2].conv3.weight, reference.layer4[2].conv3.weight)
    torch.testing.assert_close(model.net.backbone.bn1.running_mean, reference.bn1.running_mean)


def test_wrong_backbone_weights_rejected(tmp_path):
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(BadInputError, match="not a torchvision ResNet-50 state dict"):
        load_backbone_weights(build_model(), tmp_path / "bad.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(BadInputError, match="failed to read backbone weights"):
        load_backbone_weights(build_model(), tmp_path / "text.pth")


def test_frozen_backbone_keeps_its_weights(a0sk_tiles, tmp_path):
    torch.manual_seed(3)
    initial = build_model().state_dict()
    result = train(tiny_config(a0sk_tiles, tmp_path, freeze_backbone=True, accumulation_steps=2, patches_per_epoch=4))
    trained = load_checkpoint(result.last_path).model.state_dict()

    for name in ("net.backbone.conv1.weight", "net.backbone.layer3.0.conv2.weight", "net.backbone.bn1.running_mean"):
        torch.testing.assert_close(trained[name], initial[name], rtol=0, atol=0, msg=name)
    assert not torch.equal(trained["net.classifier.4.weight"], initial["net.classifier.4.weight"])
    assert result.steps_done == 1  # 4 patches per epoch = 1 step of 2 micro-batches of 2


@pytest.mark.slow
def test_torchrun_two_processes(a0sk_tiles, tmp_path):
    """Two CPU processes under torchrun (gloo backend on 127.0.0.1) train one run together."""
    port = _free_port()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(port), "-m", "bcseg.cli", "train", str(a0sk_tiles), "--out", str(tmp_path / "run"),
        "--mpp", "1.0", "--data-mpp", "0.25", "--tile-size", "64", "--inference-tile-size", "64",
        "--epochs", "1", "--patches-per-epoch", "8", "--batch-size", "2", "--threads", "1", "--val-fraction", "0",
        "--device", "cpu", "-q",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]

    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert state["world_size"] == 2
    assert state["step"] == 2  # 8 patches / (2 per process x 2 processes)
    assert len(state["sampler_rng"]) == 2
    assert state["sampler_rng"][0] != state["sampler_rng"][1]
    assert load_checkpoint(tmp_path / "run" / "last.safetensors").info.provenance["recipe"]["processes"] == 2
    assert "finished: 1 epochs, 2 steps" in completed.stdout
    assert completed.stdout.count("finished") == 1  # only process 0 reports


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
    exit_code = main(["train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--epochs", "1", "-q"])

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


def test_cli_needs_data_or_resume(tmp_path, capsys):
    from bcseg.cli import EXIT_BAD_INPUT, main

    assert main(["train", "--out", str(tmp_path / "run"), "-q"]) == EXIT_BAD_INPUT
    assert "--resume RUN_DIR" in capsys.readouterr().err
    assert main(["train", str(tmp_path), "--resume", str(tmp_path), "-q"]) == EXIT_BAD_INPUT
    assert "give no DATA_DIR" in capsys.readouterr().err


def test_stain_normalization_recorded_and_applied(a0sk_tiles, tmp_path):
    from pipeline.inference import Predictor

    target = next((a0sk_tiles / "images").iterdir())
    result = train(tiny_config(a0sk_tiles, tmp_path / "run", patches_per_epoch=2,
                               stain_normalization="reinhard", stain_target=target))
    loaded = load_checkpoint(result.last_path)
    assert loaded.info.stain_normalization["method"] == "reinhard"
    assert loaded.info.stain_normalization["target"] == target.name

    with Image.open(target) as image:
        tile = np.asarray(image.convert("RGB"))[:64, :64].copy()
    expected_input = StainNormalizer.from_json(loaded.info.stain_normalization).apply(tile)
    assert not np.array_equal(expected_input, tile)
    predictor = Predictor(loaded, torch.device("cpu"), threads=2)
    normalized = predictor.predict(tile[None].copy())
    predictor.stain_normalizer = None
    np.testing.assert_allclose(normalized, predictor.predict(expected_input[None].copy()), atol=1e-6)


def test_stain_normalization_needs_target(a0sk_tiles, tmp_path):
    with pytest.raises(BadInputError, match="--stain-target"):
        train(tiny_config(a0sk_tiles, tmp_path, stain_normalization="macenko"))
