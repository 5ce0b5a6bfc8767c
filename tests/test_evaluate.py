"""``bcseg-wsi evaluate`` on real BCSS regions: both paths, their agreement, the report and the model card."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bcseg.cli import EXIT_BAD_INPUT, main
from bcseg.errors import BadInputError
from bcseg.evaluation import EvaluationSettings, _to_mask_size, evaluate
from bcseg.training.predict import predict_labels

A0D2 = "TCGA-A2-A0D2-DX1_xmin96887_ymin22299_MPP-0.2500.png"
# Measured with the bundled model: tumour Dice 0.86 on A0D2 through both paths. A0D2 is a
# training region of that model, so this checks the evaluation, not generalisation.
MIN_A0D2_TUMOR_DICE = 0.80
# Measured agreement on A0D2 at default settings: 99.36%.
MIN_AGREEMENT = 0.99
# Tiling and blending must not cost accuracy: the pipeline's mean Dice may trail by at most this.
MAX_MEAN_DICE_LOSS = 0.01
# A 1024 x 1024 px box of A0D2 with tumour, stroma, necrosis and all 1,703 "exclude" (7) pixels.
SMALL_CROP = (108, 1187, 1132, 2211)


@pytest.fixture(scope="module")
def bcss_dir(shared_data) -> Path:
    folder = shared_data / "bcss"
    if not (folder / "images" / A0D2).exists():
        pytest.skip(f"A0D2 region not found in {folder}")
    return folder


def crop_pair(source: Path, name: str, box: tuple[int, int, int, int], folder: Path) -> Path:
    for kind in ("images", "masks"):
        (folder / kind).mkdir(parents=True, exist_ok=True)
        with Image.open(source / kind / name) as image:
            image.crop(box).save(folder / kind / name)
    return folder


@pytest.mark.slow
def test_a0d2_both_paths_agree(bcss_dir, tmp_path):
    out = tmp_path / "report"
    assert main(["evaluate", "default", str(bcss_dir), "--out", str(out), "--threads", "2", "-q"]) == 0
    scores = json.loads((out / "scores.json").read_text())

    assert scores["regions"] == 1
    assert scores["sites"] == ["A2"]
    for path in ("region", "pipeline"):
        assert scores["paths"][path]["dice"]["tumor"] >= MIN_A0D2_TUMOR_DICE, path
        assert scores["paths"][path]["dice"]["other"] is None  # no "other" in the mask or the prediction
    assert scores["agreement"] >= MIN_AGREEMENT
    loss = scores["paths"]["region"]["mean_dice"] - scores["paths"]["pipeline"]["mean_dice"]
    assert loss <= MAX_MEAN_DICE_LOSS
    for name in ("per_class.csv", "per_region.csv", "confusion_region.csv", "confusion_pipeline.csv",
                 "confusion_region.png", "confusion_pipeline.png", "model_card.json", "model_card.md"):
        assert (out / name).is_file(), name
    assert not (out / "pipeline_runs").exists()
    assert not list(tmp_path.glob(".report.partial-*"))


@pytest.fixture(scope="module")
def small_report(bcss_dir, tmp_path_factory) -> tuple[Path, dict]:
    """Both paths on a 1024 x 1024 px crop of A0D2 (512 x 512 at the model's 0.5 um/px)."""
    folder = crop_pair(bcss_dir, A0D2, SMALL_CROP, tmp_path_factory.mktemp("crop"))
    out = tmp_path_factory.mktemp("reports") / "crop"
    scores = evaluate(EvaluationSettings(checkpoint=None, data_dir=folder, out_dir=out, threads=2))
    return out, scores


def test_confusion_matrix_matches_scores(small_report):
    out, scores = small_report
    for path in ("region", "pipeline"):
        rows = list(csv.reader((out / f"confusion_{path}.csv").open()))
        matrix = np.array([[int(value) for value in row[1:]] for row in rows[1:]])
        assert rows[0][1:] == ["tumor", "stroma", "inflammatory", "necrosis", "other", "not tissue"]
        np.testing.assert_array_equal(matrix, scores["paths"][path]["confusion_matrix"])
        true_positive, predicted, actual = matrix[0, 0], matrix[:, 0].sum(), matrix[0].sum()
        assert scores["paths"][path]["dice"]["tumor"] == pytest.approx(2 * true_positive / (predicted + actual))
        assert scores["paths"][path]["precision"]["tumor"] == pytest.approx(true_positive / predicted)
        assert scores["paths"][path]["recall"]["tumor"] == pytest.approx(true_positive / actual)


def test_ignored_codes_not_scored(small_report, bcss_dir):
    _, scores = small_report
    with Image.open(bcss_dir / "masks" / A0D2) as mask_image:
        mask = np.asarray(mask_image.crop(SMALL_CROP))
    scored = int(np.isin(mask, [0, 7], invert=True).sum())
    assert (mask == 7).sum() == 1703, "the crop must contain ignored codes for this check to mean something"
    assert scores["per_region"][0]["scored_pixels"] == scored
    assert sum(map(sum, scores["paths"]["region"]["confusion_matrix"])) == scored


def test_agreement_reported(small_report):
    out, scores = small_report
    assert 0.0 <= scores["agreement"] <= 1.0
    row = next(csv.DictReader((out / "per_region.csv").open()))
    assert float(row["agreement"]) == pytest.approx(scores["agreement"])


def test_model_card_lists_scores_and_anchors(small_report):
    out, scores = small_report
    card = json.loads((out / "model_card.json").read_text())
    assert card["model"]["mpp"] == 0.5
    assert card["evaluation"]["scores"]["pipeline"]["dice"] == scores["paths"]["pipeline"]["dice"]
    assert card["evaluation"]["pipeline_region_agreement"] == scores["agreement"]
    assert {anchor["mean_dice"] for anchor in card["anchors"]} == {0.750, 0.763, 0.685}
    markdown = (out / "model_card.md").read_text()
    assert "| VGG16-FCN8 (Amgad et al. 2019) | 0.851 | 0.800 | 0.712 | 0.723 | 0.666 | 0.750 |" in markdown
    assert "this model, region path" in markdown
    # A0D2 is a training region of the bundled model, and the card must warn about it.
    assert card["evaluation"]["trained_on"] == [A0D2]
    assert "Warning: 1 of these regions were in the training data" in markdown
    assert "agree" in markdown


def test_binary_mode_scores_tumour(shared_data, tmp_path):
    source = shared_data / "bcss" / "tumor_binary"
    if not source.is_dir():
        pytest.skip(f"tumour-versus-rest region not found at {source}")
    name = next((source / "images").iterdir()).name
    folder = crop_pair(source, name, (1000, 1000, 1512, 1512), tmp_path / "data")
    scores = evaluate(EvaluationSettings(checkpoint=None, data_dir=folder, out_dir=tmp_path / "out", binary=True,
                                         pipeline=False, threads=2))

    assert scores["mode"] == "tumor_vs_rest"
    assert set(scores["paths"]) == {"region"}
    assert set(scores["paths"]["region"]["dice"]) == {"rest", "tumor"}
    assert scores["agreement"] is None
    with Image.open(folder / "masks" / name) as mask:
        assert sum(map(sum, scores["paths"]["region"]["confusion_matrix"])) == mask.size[0] * mask.size[1]


def test_codes_in_binary_mode_rejected(bcss_dir, tmp_path):
    folder = crop_pair(bcss_dir, A0D2, (0, 0, 256, 256), tmp_path / "data")
    with pytest.raises(BadInputError, match="binary tumour mask contains only 0 and 255"):
        evaluate(EvaluationSettings(checkpoint=None, data_dir=folder, out_dir=tmp_path / "out", binary=True, pipeline=False))
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_existing_report_folder_rejected(bcss_dir, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert main(["evaluate", "default", str(bcss_dir), "--out", str(tmp_path / "out"), "-q"]) == EXIT_BAD_INPUT
    assert "already exists" in capsys.readouterr().err


def test_labels_reach_the_mask_by_pixel_centres():
    labels = np.array([[0, 1, 2], [3, 4, 5]], dtype=np.uint8)

    # A plain resize would stretch 3 label pixels over 5 mask pixels. By centres, at scale 2,
    # mask pixel i takes label pixel floor((i + 0.5) / 2).
    mask_sized = _to_mask_size(labels, (4, 5), 2.0)

    np.testing.assert_array_equal(mask_sized[0], [0, 0, 1, 1, 2])
    np.testing.assert_array_equal(mask_sized[:, 0], [0, 0, 3, 3])


def test_region_path_pads_white_like_the_slide_reader():
    class BrightNeighbourhood(torch.nn.Module):
        """Class 1 where the 5 x 5 mean of the normalized red channel is above -1, else class 0."""

        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))

        def forward(self, images):
            bright = (torch.nn.functional.avg_pool2d(images[:, :1], 5, stride=1, padding=2) > -1).float()
            return torch.cat([1 - bright, bright], dim=1)

    # Black normalizes to -2 and white to +2. A black pixel on the outer ring, next to white
    # padding, has a 5 x 5 mean of -0.4 or more. Two pixels further in, or beside a mirror image, it is -2.
    black = np.zeros((8, 8, 3), dtype=np.uint8)
    model = BrightNeighbourhood().eval()
    stats = ((0.5,) * 3, (0.25,) * 3)

    white_padded = predict_labels(model, black, *stats, window_px=12, margin_px=2, padding="white")
    mirrored = predict_labels(model, black, *stats, window_px=12, margin_px=2)

    edge = np.ones((8, 8), dtype=bool)
    edge[1:-1, 1:-1] = False
    assert (white_padded[edge] == 1).all()
    assert (white_padded[2:-2, 2:-2] == 0).all()
    assert (mirrored == 0).all()
    with pytest.raises(ValueError, match="padding"):
        predict_labels(model, black, *stats, window_px=12, margin_px=2, padding="zeros")
