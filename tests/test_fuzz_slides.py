"""Fuzzing: real small TIFF and SVS files with random bytes changed or cut off must open and read
cleanly or fail with BadInputError, and never raise anything else or hang.

The library's open and read path runs on 1,000 mutated files; the whole ``bcseg-wsi run`` runs
on a few, because each run loads the model.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bcseg.cli import main
from bcseg.errors import BadInputError
from pipeline.slide import open_slide

# Real files from the format fixtures and a generated JPEG 2000 SVS, each a few kilobytes.
SEED_FIXTURES = ("small.svs", "boxes.tiff", "small_HE_levels.tiff", "unreadable.svs")
# The open and read of one mutated file, which takes milliseconds when it goes well.
CASE_DEADLINE_S = 5.0
READ_CASES = (400, 400, 100, 100)  # per seed group below: 1,000 in all


def jpeg2000_svs_bytes(tmp_dir: Path) -> bytes:
    path = tmp_dir / "seed-j2k.svs"
    pixels = np.full((96, 128, 3), 242, dtype=np.uint8)
    pixels[20:70, 30:100] = (90, 40, 140)
    tifffile.imwrite(
        path, pixels, tile=(64, 64), photometric="rgb", compression=33005, metadata=None,
        description="Aperio Image Library v12.0.5\r\n128x96 [0,0 128x96] (64x64) J2K|AppMag = 20|MPP = 0.5",
    )
    return path.read_bytes()


@pytest.fixture(scope="module")
def seeds(shared_data, tmp_path_factory) -> list[bytes]:
    tmp_dir = tmp_path_factory.mktemp("seeds")
    return [(shared_data / "fixtures" / name).read_bytes() for name in SEED_FIXTURES] + [jpeg2000_svs_bytes(tmp_dir)]


@st.composite
def mutations(draw, seed_count: int):
    """A seed index, byte changes as (position fraction, value) pairs, and a kept fraction."""
    seed = draw(st.integers(0, seed_count - 1))
    changes = draw(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8))
    # Most cases keep the whole file; some cut it short.
    keep = draw(st.one_of(st.just(1.0), st.just(1.0), st.floats(0.05, 1.0)))
    return seed, changes, keep


def mutate(data: bytes, changes, keep: float) -> bytes:
    mutated = bytearray(data)
    for position, value in changes:
        # Header and directory bytes sit near the start and the end of these files, so positions
        # are drawn in both halves.
        mutated[int(position * len(mutated))] = value
    return bytes(mutated[: max(8, int(len(mutated) * keep))])


def open_and_read(path: Path) -> str:
    """Open a slide and read from it as the pipeline does, on small regions only.

    Returns "read" or "BadInputError"; any other exception propagates.
    """
    try:
        with open_slide(path, mpp=0.5) as slide:
            width, height = slide.dimensions
            slide.read_level_region(0, 0, 0, min(width, 64), min(height, 64))
            last = slide.level_count - 1
            slide.read_level_region(last, 0, 0, min(slide.level_dimensions[last][0], 32), min(slide.level_dimensions[last][1], 32))
            slide.read_region_at_mpp(0, 0, 16, 16, 0.5 * 4)
    except BadInputError as error:
        assert str(path) in str(error), f"the message does not name the file: {error}"
        return "BadInputError"
    return "read"


def run_fuzz_cases(tmp_path: Path, seeds: list[bytes], seed_indices: range, max_examples: int) -> None:
    path = tmp_path / "fuzzed.svs"
    outcomes = {"read": 0, "BadInputError": 0}

    @settings(
        max_examples=max_examples,
        deadline=CASE_DEADLINE_S * 1000,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(mutations(len(seed_indices)))
    def case(mutation):
        seed, changes, keep = mutation
        path.write_bytes(mutate(seeds[seed_indices[seed]], changes, keep))
        outcomes[open_and_read(path)] += 1

    case()
    # Both outcomes occur, so the mutations neither miss the structure nor break every file.
    assert sum(outcomes.values()) >= max_examples
    assert outcomes["read"] > 0, outcomes
    assert outcomes["BadInputError"] > 0, outcomes
    print(f"{max_examples} cases: {outcomes}")


@pytest.mark.slow
def test_fuzzed_svs_open_and_read(seeds, tmp_path):
    # small.svs and unreadable.svs (Aperio, JPEG tiles).
    run_fuzz_cases(tmp_path, [seeds[0], seeds[3]], range(2), READ_CASES[0])


@pytest.mark.slow
def test_fuzzed_generic_tiff_open_and_read(seeds, tmp_path):
    # boxes.tiff and small_HE_levels.tiff (generic TIFF pyramids).
    run_fuzz_cases(tmp_path, [seeds[1], seeds[2]], range(2), READ_CASES[1])


@pytest.mark.slow
def test_fuzzed_jpeg2000_svs_open_and_read(seeds, tmp_path):
    run_fuzz_cases(tmp_path, [seeds[4]], range(1), READ_CASES[2])


@pytest.mark.slow
def test_fuzzed_truncations_open_and_read(seeds, tmp_path):
    # Every seed cut at 100 evenly spaced lengths, with no byte changed.
    path = tmp_path / "cut.svs"
    outcomes = {"read": 0, "BadInputError": 0}
    for index in range(READ_CASES[3]):
        data = seeds[index % len(seeds)]
        path.write_bytes(data[: 8 + (len(data) - 8) * (index // len(seeds) + 1) // (READ_CASES[3] // len(seeds) + 1)])
        started = time.monotonic()
        outcomes[open_and_read(path)] += 1
        assert time.monotonic() - started < CASE_DEADLINE_S
    assert outcomes["BadInputError"] > 0, outcomes


@pytest.mark.slow
def test_fuzzed_files_through_cli(seeds, tmp_path, capsys):
    # A handful of mutated files through the whole run: exit 0 with a complete folder, or exit 2
    # with one message and nothing left behind.
    rng = np.random.default_rng(0)
    for index in range(5):
        data = bytearray(seeds[index % len(seeds)])
        for position in rng.integers(0, len(data), size=4):
            data[position] = rng.integers(0, 256)
        path = tmp_path / f"fuzzed-{index}.svs"
        path.write_bytes(bytes(data))
        out_dir = tmp_path / f"out-{index}"

        exit_code = main(["run", str(path), "--out", str(out_dir), "--mpp", "0.5", "-q", "--workers", "2"])

        err = capsys.readouterr().err
        assert exit_code in (0, 2), err
        assert "Traceback" not in err
        if exit_code == 0:
            assert (out_dir / f"fuzzed-{index}" / "COMPLETE").exists()
        else:
            assert f"fuzzed-{index}.svs" in err
            assert not out_dir.exists() or list(out_dir.iterdir()) == []
