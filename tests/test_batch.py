"""Batch runs: finding slides, naming output folders, the status table, the report, serial runs.

The runs here use a checkpoint with random weights at 8 um/px and 64 px tiles, because the tests
check the orchestration. At that resolution a slide takes a few seconds on a 2-core CPU, where
the bundled model takes about a minute.
"""

from __future__ import annotations

import csv
import gzip
import json
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import tifffile

from bcseg.cli import main
from bcseg.errors import BadInputError
from pipeline.run import COMPLETE_NAME
from workflows.batch import RESERVED_NAMES, STATUS_NAME
from workflows.inputs import collect_slides, find_slides, read_slide_list
from workflows.naming import assign_output_names

REPO = Path(__file__).resolve().parents[1]
SAMPLE_SLIDE = REPO / "samples" / "CMU-1-Small-Region.svs"
# Random weights, 8 um/px, 64 px tiles, overlap 8: a few seconds per slide on the CPU.
FAST_OPTIONS = ["--overlap", "8", "--workers", "2", "-q"]


@pytest.fixture(scope="session")
def coarse_model(tmp_path_factory) -> Path:
    """A checkpoint with seeded random weights at 8 um/px and 64 px tiles, for orchestration tests."""
    import torch

    from bcseg.checkpoint import ModelInfo, save_checkpoint
    from bcseg.model import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "coarse-random.safetensors"
    info = ModelInfo(mpp=8.0, tile_size_px=64, provenance={"recipe": "seeded random weights, for tests"})
    return save_checkpoint(path, build_model(), info, compact=True)


def batch_args(input_path: Path, out_dir: Path, model: Path, *extra: str) -> list[str]:
    return ["batch", str(input_path), "--out", str(out_dir), "--model", str(model), *FAST_OPTIONS, *extra]


def read_status(out_dir: Path) -> dict[str, dict[str, str]]:
    """Return the status table rows keyed by output folder name."""
    with (out_dir / STATUS_NAME).open(encoding="utf-8") as file:
        return {row["output"]: row for row in csv.DictReader(file)}


def result_content(output_dir: Path) -> dict:
    """Return a result's content, leaving out what differs between equal runs (ids, times, paths)."""
    import zarr

    geojson_path = next(output_dir.glob("*.geojson*"))
    opener = gzip.open if geojson_path.suffix == ".gz" else open
    with opener(geojson_path, "rt", encoding="utf-8") as file:
        features = json.load(file)["features"]
    mean_probabilities = []
    for feature in features:
        feature.pop("id", None)
        mean_probabilities.append(feature["properties"]["measurements"].pop("Mean probability"))
    summary = json.loads((output_dir / "summary.json").read_text())
    prediction = zarr.open_group(output_dir / "prediction.zarr", mode="r")
    return {
        "features": features,
        "mean_probabilities": np.array(mean_probabilities),
        "labels": tifffile.imread(output_dir / "labels.tif"),
        "arrays": {name: np.asarray(array) for name, array in prediction.arrays()},
        "classes": summary["classes"],
        "status": summary["status"],
        "settings_key": json.loads((output_dir / COMPLETE_NAME).read_text())["key"],
    }


def assert_same_results(left: Path, right: Path) -> None:
    expected, actual = result_content(left), result_content(right)
    assert actual["status"] == expected["status"]
    assert actual["settings_key"] == expected["settings_key"]
    assert actual["classes"] == expected["classes"]
    np.testing.assert_array_equal(actual["labels"], expected["labels"])
    assert actual["arrays"].keys() == expected["arrays"].keys()
    for name in expected["arrays"]:
        if name == "probabilities":
            # torch's CPU convolutions sum in an order that depends on the thread count, which
            # differs between a dask worker (its share of the cores) and a serial run: float16
            # probabilities may then differ in their last bits.
            np.testing.assert_allclose(actual["arrays"][name], expected["arrays"][name], rtol=0, atol=1e-3)
        else:
            np.testing.assert_array_equal(actual["arrays"][name], expected["arrays"][name], err_msg=name)
    assert actual["features"] == expected["features"]
    np.testing.assert_allclose(actual["mean_probabilities"], expected["mean_probabilities"], rtol=0, atol=1e-3)


def test_folder_search_finds_slides(tmp_path):
    slides = tmp_path / "slides"
    (slides / "site 1" / "case").mkdir(parents=True)
    (slides / "dicom slide").mkdir()
    (slides / ".hidden").mkdir()
    out_dir = slides / "results"
    (out_dir / "a").mkdir(parents=True)
    for name in ("a.svs", "site 1/case/B.NDPI", "site 1/c.ome.tiff", "dicom slide/0001.dcm", "dicom slide/0002.dcm",
                 "README.txt", "label.png", ".hidden/d.svs", ".e.svs", "results/a/labels.tif"):
        (slides / name).write_bytes(b"x")

    found = [entry.path.relative_to(slides).as_posix() for entry in find_slides(slides, exclude=out_dir)]

    assert found == ["a.svs", "dicom slide", "site 1/c.ome.tiff", "site 1/case/B.NDPI"]


def test_csv_list_reads_paths_and_mpp(tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    listing = lists / "slides.csv"
    listing.write_text("Path,mpp\n../slides/a.svs,0.25\n/data/b.svs,\n../slides/a.svs,0.25\n\n", encoding="utf-8")

    entries = read_slide_list(listing)

    assert [(entry.path, entry.mpp) for entry in entries] == [(tmp_path / "slides" / "a.svs", 0.25), (Path("/data/b.svs"), None)]


def test_text_list_skips_comments(tmp_path):
    listing = tmp_path / "slides.txt"
    listing.write_text("# scanned in May\nx/é lame.svs\n\n  /abs/c.tif  \n", encoding="utf-8")

    entries = read_slide_list(listing)

    assert [entry.path for entry in entries] == [tmp_path / "x" / "é lame.svs", Path("/abs/c.tif")]


@pytest.mark.parametrize(
    "content, message",
    [
        pytest.param("path,mpp\na.svs,fast\n", "line 2: mpp 'fast'", id="text-mpp"),
        pytest.param("path,mpp\na.svs,-1\n", "line 2: mpp '-1'", id="negative-mpp"),
        pytest.param("file\na.svs\n", "'path' column", id="no-path-column"),
    ],
)
def test_bad_csv_list_is_rejected(tmp_path, content, message):
    listing = tmp_path / "slides.csv"
    listing.write_text(content, encoding="utf-8")

    with pytest.raises(BadInputError, match=message):
        read_slide_list(listing)


def test_empty_folder_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()

    exit_code = main(["batch", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), "-q"])

    assert exit_code == 2
    assert "no slides found" in capsys.readouterr().err


def test_collect_missing_input_raises(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        collect_slides(tmp_path / "absent", tmp_path / "out")


def test_colliding_names_are_distinct(tmp_path):
    out_dir = tmp_path / "out"
    paths = [
        Path("/data/site1/A.svs"),
        Path("/data/site2/A.svs"),
        Path("/data/site2/A.tif"),
        Path("/data/site3/a.svs"),
        Path("/data/a.HE.svs"),
        Path("/data/a.IHC.svs"),
        Path("/data/evaluation/e\u0301valuation lame 1.svs"),
        Path("/data/batch_status.csv.svs"),
        Path("/data/" + "long name " * 40 + ".svs"),
    ]

    names = assign_output_names(paths, out_dir, reserved=RESERVED_NAMES)

    assert len({name.casefold() for name in names}) == len(paths)
    assert names[0] == "A"
    assert all(name.startswith(("A-", "a-")) for name in names[1:4])
    assert names[4:6] == ["a.HE", "a.IHC"]
    assert names[6] == unicodedata.normalize("NFC", "évaluation lame 1")
    assert names[7].startswith("batch_status.csv-")
    assert len(names[8].encode()) <= 180
    for name in names:
        assert (out_dir / name).parent == out_dir
        assert not name.startswith(".")


def test_existing_folder_keeps_its_slide(tmp_path):
    # A slide processed earlier keeps its folder when a colliding slide that sorts first appears.
    out_dir = tmp_path / "out"
    (out_dir / "A").mkdir(parents=True)
    (out_dir / "A" / "summary.json").write_text(json.dumps({"slide": {"path": "/data/site2/A.svs"}}))

    names = assign_output_names([Path("/data/site1/A.svs"), Path("/data/site2/A.svs")], out_dir)

    assert names[1] == "A"
    assert names[0].startswith("A-")


def test_foreign_folder_is_not_reused(tmp_path):
    out_dir = tmp_path / "out"
    (out_dir / "A").mkdir(parents=True)
    (out_dir / "A" / "notes.txt").write_text("a folder the batch did not write")

    names = assign_output_names([Path("/data/A.svs")], out_dir)

    assert names[0].startswith("A-")


def test_skip_check_reads_bounds_offset(tmp_path, coarse_model):
    # A COMPLETE record of a Leica SCN slide in the default frame, measured from its bounds. No
    # slide is processed: only the check that decides which slides to skip runs.
    import dataclasses

    from bcseg.checkpoint import file_sha256, read_model_info
    from pipeline.run import RunSettings, complete_record
    from pipeline.slide import slide_fingerprint
    from tests.leica_scn import write_leica_scn
    from workflows.batch import plan_jobs, split_complete
    from workflows.inputs import SlideEntry

    path = write_leica_scn(tmp_path / "offset.scn", np.full((768, 1024, 3), 242, np.uint8), (1024, 608), (4000, 3000))
    out_dir = tmp_path / "out"
    settings = RunSettings(out_dir=out_dir, model_path=coarse_model)
    jobs = plan_jobs([SlideEntry(path)], settings, out_dir, None)
    resolved = jobs[0].settings.resolved(read_model_info(coarse_model)[0])
    record, key = complete_record(resolved, resolved.tile_size_px, slide_fingerprint(path), file_sha256(coarse_model),
                                  (1024, 608, 1024, 768))
    (out_dir / "offset").mkdir(parents=True)
    (out_dir / "offset" / COMPLETE_NAME).write_text(json.dumps({**record, "key": key}))

    skipped, pending = split_complete(jobs, settings, force=False)
    assert [row.output for row in skipped] == ["offset"]
    assert pending == []

    full_jobs = [dataclasses.replace(job, settings=dataclasses.replace(job.settings, geojson_frame="full")) for job in jobs]
    skipped, pending = split_complete(full_jobs, settings, force=False)
    assert skipped == []
    assert pending == full_jobs


def test_list_with_escapes_stays_in_out_dir(tmp_path, shared_data, coarse_model):
    # Two list entries with the same file name, one reached through "..": distinct folders in out.
    slides = tmp_path / "slides"
    (slides / "one").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(shared_data / "fixtures" / "small.svs", slides / "one" / "small.svs")
    shutil.copy(shared_data / "fixtures" / "small.svs", tmp_path / "elsewhere" / "small.svs")
    listing = slides / "list.txt"
    listing.write_text("one/small.svs\n../elsewhere/small.svs\n../../../../../../../../tmp/../" + str(
        (tmp_path / "elsewhere" / "small.svs").relative_to("/")) + "\n", encoding="utf-8")
    out_dir = tmp_path / "out"
    before = sorted(path.name for path in tmp_path.iterdir())

    exit_code = main(batch_args(listing, out_dir, coarse_model, "--serial"))

    assert exit_code == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(before + ["out"])
    rows = read_status(out_dir)
    assert len(rows) == 2
    assert rows.keys() == {path.name for path in out_dir.iterdir() if (path / COMPLETE_NAME).exists()}
    assert {row["slide"] for row in rows.values()} == {
        str(slides / "one" / "small.svs"), str(tmp_path / "elsewhere" / "small.svs")}


@pytest.mark.slow
def test_serial_timeout_fails_one_slide(tmp_path, shared_data, coarse_model):
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(SAMPLE_SLIDE, slides / "big.svs")
    shutil.copy(shared_data / "fixtures" / "small.svs", slides / "small.svs")
    # At a claimed 4 um/px the sample slide needs over 500 tiles, so it runs for a minute or more.
    # The tiny slide takes about as long as loading the model.
    listing = slides / "list.csv"
    listing.write_text("path,mpp\nbig.svs,4.0\nsmall.svs,\n", encoding="utf-8")
    out_dir = tmp_path / "out"

    exit_code = main(batch_args(listing, out_dir, coarse_model, "--serial", "--timeout", "8"))

    rows = read_status(out_dir)
    assert exit_code == 3
    assert rows["big"]["status"] == "failed"
    assert rows["big"]["reason"] == "timed out after 8 s"
    assert rows["small"]["status"] in ("done", "no_tissue")
    assert not (out_dir / "big").exists()
    assert [path.name for path in out_dir.iterdir() if ".partial-" in path.name] == []
