"""Train, validation and test splits of BCSS regions by tissue-source site.

Regions from one TCGA tissue-source site share a lab, a scanner and a staining protocol, so a
split that mixes a site's regions between training and test overstates how well a model
generalises. BCSS file names start with the TCGA slide id, and characters 6-7 of that id
(``A2`` in ``TCGA-A2-A0D2-DX1_xmin96887_ymin22299_MPP-0.2500.png``) name the site.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bcseg.errors import BadInputError

log = logging.getLogger(__name__)

# The held-out test sites of Amgad et al. 2019, the split that published BCSS scores use.
DEFAULT_TEST_SITES = ("OL", "LL", "E2", "EW", "GM", "S3")
DEFAULT_VALIDATION_FRACTION = 0.2
TCGA_SITE = re.compile(r"TCGA-([A-Z0-9]{2})-", re.IGNORECASE)


def site_of(name: str) -> str:
    """Return the two-character tissue-source site of a TCGA file name, upper case.

    A name without a TCGA slide id is its own group: the file name stands for the site, so such
    regions can still be split, one region at a time.
    """
    match = TCGA_SITE.search(name)
    if match is None:
        return name
    return match.group(1).upper()


@dataclass
class Split:
    """Region names per split, and the sites each split holds."""

    train: list[str] = field(default_factory=list)
    validation: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)

    def sites(self, part: str) -> list[str]:
        return sorted({site_of(name) for name in getattr(self, part)})

    def to_json(self) -> dict:
        return {
            part: {"sites": self.sites(part), "regions": sorted(getattr(self, part))}
            for part in ("train", "validation", "test")
        }

    @classmethod
    def from_json(cls, data: dict) -> Split:
        return cls(**{part: list(data[part]["regions"]) for part in ("train", "validation", "test")})


def split_by_site(
    names: list[str],
    test_sites: tuple[str, ...] | list[str] = DEFAULT_TEST_SITES,
    validation_sites: tuple[str, ...] | list[str] | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    seed: int = 0,
) -> Split:
    """Assign each region name to train, validation or test by its site.

    Regions of ``test_sites`` form the test split. Validation takes ``validation_sites`` when
    given. Otherwise it takes whole sites, drawn in a seeded order, until it contains at least
    ``validation_fraction`` of the remaining regions, and at least one site is left for training.
    With a single remaining site there is no validation split, and a warning is logged.
    """
    if not 0 <= validation_fraction < 1:
        raise BadInputError(f"--val-fraction must be in [0, 1), got {validation_fraction}")
    test_set = {site.upper() for site in test_sites}
    by_site: dict[str, list[str]] = {}
    without_id = [name for name in names if TCGA_SITE.search(name) is None]
    if without_id:
        log.warning(
            "%d file names (first: %s) hold no TCGA slide id, so each is split as its own site",
            len(without_id), without_id[0],
        )
    for name in sorted(names):
        by_site.setdefault(site_of(name), []).append(name)

    split = Split()
    remaining_sites = []
    for site, site_names in sorted(by_site.items()):
        if site in test_set:
            split.test.extend(site_names)
        else:
            remaining_sites.append(site)

    if validation_sites is not None:
        chosen = {site.upper() for site in validation_sites}
        overlap = chosen & test_set
        if overlap:
            raise BadInputError(f"sites {sorted(overlap)} are in both --val-sites and --test-sites; a site belongs to one split")
    else:
        chosen = _draw_validation_sites(remaining_sites, by_site, validation_fraction, seed)

    for site in remaining_sites:
        (split.validation if site in chosen else split.train).extend(by_site[site])
    if not split.train:
        raise BadInputError(
            f"no training regions left: sites {sorted(by_site)} are all in the test or validation split; "
            "change --test-sites or --val-sites"
        )
    if not split.validation and validation_fraction > 0 and validation_sites is None:
        log.warning("only one site (%s) outside the test split, so there is no validation split", remaining_sites[0])
    for part in ("train", "validation", "test"):
        log.info("%s split: %d regions from sites %s", part, len(getattr(split, part)), ", ".join(split.sites(part)) or "-")
    return split


def _draw_validation_sites(
    sites: list[str], by_site: dict[str, list[str]], fraction: float, seed: int
) -> set[str]:
    if fraction == 0 or len(sites) < 2:
        return set()
    total = sum(len(by_site[site]) for site in sites)
    order = np.random.default_rng(seed).permutation(len(sites))
    chosen: set[str] = set()
    count = 0
    for index in order:
        if count >= fraction * total or len(chosen) == len(sites) - 1:
            break
        chosen.add(sites[index])
        count += len(by_site[sites[index]])
    return chosen


def read_split_file(path: Path) -> Split:
    """Read a split written by a previous run (``split.json``) or by hand in the same layout."""
    import json

    try:
        return Split.from_json(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BadInputError(
            f"{path}: cannot read the split ({error}); expected JSON with train, validation and test, "
            'each {"regions": [file names]}'
        ) from error
