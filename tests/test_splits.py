"""Train, validation and test splits by TCGA tissue-source site, on synthetic file names."""

from __future__ import annotations

import json

import pytest

from bcseg.errors import BadInputError
from bcseg.training.splits import DEFAULT_TEST_SITES, Split, read_split_file, site_of, split_by_site


def bcss_name(site: str, patient: str, x: int = 100) -> str:
    return f"TCGA-{site}-{patient}-DX1_xmin{x}_ymin200_MPP-0.2500.png"


NAMES = [
    bcss_name("OL", "A5D6"), bcss_name("LL", "A440"), bcss_name("E2", "A14R"), bcss_name("EW", "A1P8"),
    bcss_name("GM", "A2DF"), bcss_name("S3", "AA10"), bcss_name("A2", "A0D2"), bcss_name("A2", "A0CM"),
    bcss_name("A1", "A0SK"), bcss_name("A1", "A0SP"), bcss_name("BH", "A0BG"), bcss_name("AR", "A1AR"),
    bcss_name("C8", "A12V"), bcss_name("D8", "A27M"), bcss_name("E9", "A5FL"),
]


def test_site_is_tcga_tissue_source_code():
    assert site_of("TCGA-A2-A0D2-DX1_xmin96887_ymin22299_MPP-0.2500.png") == "A2"
    assert site_of("tcga-ol-a5d6-dx1.png") == "OL"
    assert site_of("TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0_0_224_size224.png") == "A1"


def test_name_without_tcga_id_is_its_own_site():
    assert site_of("region_7.png") == "region_7.png"


def test_default_test_sites_held_out():
    split = split_by_site(NAMES)

    assert split.sites("test") == sorted(DEFAULT_TEST_SITES)
    assert len(split.test) == 6
    assert not set(split.sites("train")) & set(DEFAULT_TEST_SITES)
    assert not set(split.sites("validation")) & set(DEFAULT_TEST_SITES)
    assert sorted(split.train + split.validation + split.test) == sorted(NAMES)


def test_validation_takes_whole_sites():
    split = split_by_site(NAMES, validation_fraction=0.2, seed=1)

    assert split.validation, "nine non-test regions at 20% give a validation split"
    assert not set(split.sites("train")) & set(split.sites("validation"))
    assert len(split.validation) >= 0.2 * 9


def test_validation_draw_follows_seed():
    draws = {tuple(split_by_site(NAMES, seed=seed).sites("validation")) for seed in range(8)}
    assert len(draws) > 1
    assert split_by_site(NAMES, seed=3).validation == split_by_site(NAMES, seed=3).validation


def test_explicit_sites():
    split = split_by_site(NAMES, test_sites=["a2"], validation_sites=["BH", "C8"])

    assert split.sites("test") == ["A2"]
    assert split.sites("validation") == ["BH", "C8"]
    assert "OL" in split.sites("train")


def test_one_remaining_site_has_no_validation():
    names = [bcss_name("OL", "X1"), bcss_name("A2", "X2"), bcss_name("A2", "X3")]
    split = split_by_site(names)

    assert split.train == sorted(names[1:])
    assert split.validation == []


def test_site_in_two_splits_rejected():
    with pytest.raises(BadInputError, match="in both --val-sites and --test-sites"):
        split_by_site(NAMES, test_sites=["OL"], validation_sites=["OL"])


def test_no_training_regions_rejected():
    with pytest.raises(BadInputError, match="no training regions left"):
        split_by_site([bcss_name("OL", "X1"), bcss_name("LL", "X2")])


def test_bad_validation_fraction_rejected():
    with pytest.raises(BadInputError, match=r"--val-fraction must be in \[0, 1\)"):
        split_by_site(NAMES, validation_fraction=1.0)


def test_split_file_round_trips(tmp_path):
    split = split_by_site(NAMES, seed=2)
    (tmp_path / "split.json").write_text(json.dumps(split.to_json()))

    again = read_split_file(tmp_path / "split.json")
    assert (again.train, again.validation, again.test) == (sorted(split.train), sorted(split.validation), sorted(split.test))
    assert split.to_json()["test"]["sites"] == sorted(DEFAULT_TEST_SITES)


def test_unreadable_split_file_rejected(tmp_path):
    (tmp_path / "split.json").write_text('{"train": []}')
    with pytest.raises(BadInputError, match="cannot read the split"):
        read_split_file(tmp_path / "split.json")


def test_split_json_lists_regions_per_part():
    split = Split(train=[NAMES[6]], validation=[NAMES[8]], test=[NAMES[0]])
    assert split.to_json() == {
        "train": {"sites": ["A2"], "regions": [NAMES[6]]},
        "validation": {"sites": ["A1"], "regions": [NAMES[8]]},
        "test": {"sites": ["OL"], "regions": [NAMES[0]]},
    }
