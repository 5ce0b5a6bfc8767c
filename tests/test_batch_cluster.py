"""Batch runs on real dask clusters: a LocalCluster, a killed batch, and separate scheduler and
worker processes with one worker killed mid-slide.

Like tests/test_batch.py these use a seeded random-weight checkpoint at 8 um/px with 64 px
tiles, because they check the orchestration, not the segmentation.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bcseg.cli import main
from pipeline.run import COMPLETE_NAME, RunSettings
from tests.test_batch import (  # noqa: F401  (coarse_model is a fixture)
    FAST_OPTIONS,
    SAMPLE_SLIDE,
    assert_same_results,
    batch_args,
    coarse_model,
    read_status,
)
from workflows.batch import BatchOptions, run_batch
from workflows.inputs import collect_slides

pytestmark = pytest.mark.slow

SAMPLE_NAME = "CMU-1-Small-Region"
WAIT_S = 240


@pytest.fixture(scope="module")
def serial_reference(tmp_path_factory, coarse_model) -> Path:
    """The sample slide's result from a serial batch, to compare other runs with."""
    out_dir = tmp_path_factory.mktemp("reference")
    assert main(batch_args(SAMPLE_SLIDE, out_dir, coarse_model, "--serial")) == 0
    return out_dir / SAMPLE_NAME


def wait_for(condition, what: str, timeout_s: float = WAIT_S, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def partial_dirs(out_dir: Path) -> list[Path]:
    return [path for path in out_dir.iterdir() if ".partial-" in path.name] if out_dir.exists() else []


def test_local_cluster_batch_isolates_failures(tmp_path, shared_data, coarse_model, serial_reference):
    slides = tmp_path / "slides"
    (slides / "scans 2024").mkdir(parents=True)
    shutil.copy(SAMPLE_SLIDE, slides / f"{SAMPLE_NAME}.svs")
    shutil.copy(shared_data / "fixtures" / "small.svs", slides / "scans 2024" / "évaluation lame 1.svs")
    for name in ("small.svs", "broken.svs", "unreadable.svs"):
        shutil.copy(shared_data / "fixtures" / name, slides / name)
    shutil.copytree(shared_data / "fixtures" / "dicom_boxes", slides / "dicom_boxes")
    (slides / "not-a-slide.tif").write_text("a text file with a slide suffix")
    (slides / "README.txt").write_text("not collected: no slide suffix")
    out_dir = tmp_path / "out"

    exit_code = main(batch_args(slides, out_dir, coarse_model, "--n-workers", "2"))

    rows = read_status(out_dir)
    assert exit_code == 3
    assert set(rows) == {SAMPLE_NAME, "évaluation lame 1", "small", "dicom_boxes", "broken", "unreadable", "not-a-slide"}
    assert rows[SAMPLE_NAME]["status"] == "done"
    assert rows["évaluation lame 1"]["status"] in ("done", "no_tissue")
    assert (out_dir / "évaluation lame 1" / "évaluation lame 1.geojson").exists()
    assert rows["small"]["status"] in ("done", "no_tissue")
    assert rows["dicom_boxes"]["status"] in ("done", "no_tissue")
    assert "broken.svs is not a slide that can be read" in rows["broken"]["reason"]
    assert "not-a-slide.tif is not a slide that can be read" in rows["not-a-slide"]["reason"]
    assert "unreadable.svs: pixels at level-0 (x=0, y=0)" in rows["unreadable"]["reason"]
    assert "--fill-bad-tiles" in rows["unreadable"]["reason"]
    for name in ("broken", "unreadable", "not-a-slide"):
        assert rows[name]["status"] == "failed"
        assert not (out_dir / name).exists()
        assert "failed" in (out_dir / rows[name]["log"]).read_text(encoding="utf-8")
    for row in rows.values():
        assert row["worker"].startswith("tcp://127.0.0.1:")
    assert float(rows[SAMPLE_NAME]["tissue_mm2"]) > 0
    assert partial_dirs(out_dir) == []

    # The dask path and the serial path give the same outputs.
    assert_same_results(serial_reference, out_dir / SAMPLE_NAME)

    report = (out_dir / "batch_report.html").read_text(encoding="utf-8")
    assert report.count('<tr class="') == 7
    assert "http://" not in report
    assert "https://" not in report
    assert (out_dir / "batch_thumbnails" / f"{SAMPLE_NAME}.png").exists()

    # A rerun skips every complete slide without starting a cluster.
    for name in ("broken.svs", "unreadable.svs", "not-a-slide.tif"):
        (slides / name).unlink()
    complete_before = (out_dir / SAMPLE_NAME / COMPLETE_NAME).read_text()
    clusters = []
    settings = RunSettings(out_dir=out_dir, model_path=coarse_model, overlap_px=8, workers=2)
    result = run_batch(collect_slides(slides, out_dir), settings, BatchOptions(n_workers=2), on_cluster=clusters.append)

    assert [row.status for row in result.rows] == ["skipped"] * 4
    assert clusters == []
    assert result.rows[0].areas_mm2 == pytest.approx({name: float(rows[SAMPLE_NAME][f"{name}_mm2"])
                                                      for name in result.rows[0].areas_mm2}, rel=1e-5)
    assert (out_dir / SAMPLE_NAME / COMPLETE_NAME).read_text() == complete_before

    # Another setting redoes them.
    assert main(batch_args(slides, out_dir, coarse_model, "--serial", "--overlap", "16")) == 0
    rows = read_status(out_dir)
    assert {row["status"] for row in rows.values()} <= {"done", "no_tissue"}
    assert (out_dir / SAMPLE_NAME / COMPLETE_NAME).read_text() != complete_before


def test_killed_batch_resumes(tmp_path, coarse_model, serial_reference):
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("a.svs", "b.svs"):
        shutil.copy(SAMPLE_SLIDE, slides / name)
    out_dir = tmp_path / "out"
    command = [sys.executable, "-m", "bcseg", *batch_args(slides, out_dir, coarse_model, "--n-workers", "1")]

    batch = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: partial_dirs(out_dir), "a slide in flight")
        children = psutil.Process(batch.pid).children(recursive=True)
        batch.send_signal(signal.SIGKILL)
        batch.wait()
        # The local cluster's worker process ends with its parent.
        _, alive = psutil.wait_procs(children, timeout=30)
        assert alive == []
    finally:
        if batch.poll() is None:
            batch.kill()
    assert partial_dirs(out_dir) != []

    assert main(batch_args(slides, out_dir, coarse_model, "--serial")) == 0

    rows = read_status(out_dir)
    assert {name: row["status"] for name, row in rows.items()} in (
        {"a": "done", "b": "done"}, {"a": "skipped", "b": "done"}, {"a": "skipped", "b": "skipped"})
    assert partial_dirs(out_dir) == []
    for name in ("a", "b"):
        assert_same_results(serial_reference, out_dir / name)


@pytest.fixture
def dask_cluster(tmp_path):
    """A `dask scheduler` and two `dask worker` processes (no nanny) on 127.0.0.1.

    Yields the scheduler address and the worker processes.
    """
    scheduler_file = tmp_path / "scheduler.json"
    logs = tmp_path / "cluster-logs"
    logs.mkdir()
    dask = str(Path(sys.executable).with_name("dask"))
    processes = []

    def start(name, *arguments):
        log_file = (logs / f"{name}.log").open("w")
        processes.append(subprocess.Popen([dask, *arguments], stdout=log_file, stderr=subprocess.STDOUT))
        return processes[-1]

    try:
        start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
              "--scheduler-file", str(scheduler_file))
        wait_for(scheduler_file.exists, "the scheduler file", timeout_s=60)
        workers = [
            start(f"worker{index}", "worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1",
                  "--no-nanny", "--host", "127.0.0.1", "--no-dashboard", "--name", f"worker{index}")
            for index in (1, 2)
        ]
        import json

        from distributed import Client

        address = json.loads(scheduler_file.read_text())["address"]
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield address, workers
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def test_killed_worker_slide_reruns_elsewhere(tmp_path, coarse_model, serial_reference, dask_cluster):
    address, workers = dask_cluster
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("a.svs", "b.svs", "c.svs"):
        shutil.copy(SAMPLE_SLIDE, slides / name)
    out_dir = tmp_path / "out"
    command = [sys.executable, "-m", "bcseg", *batch_args(slides, out_dir, coarse_model, "--scheduler", address)]
    worker_pids = {worker.pid: worker for worker in workers}

    batch = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def slide_on_a_worker():
            for path in partial_dirs(out_dir):
                match = re.search(r"^\.(.+)\.partial-(\d+)-", path.name)
                if match and int(match.group(2)) in worker_pids:
                    return match.group(1), int(match.group(2))
            return None

        killed_slide, killed_pid = wait_for(slide_on_a_worker, "a slide in flight on a worker")
        os.kill(killed_pid, signal.SIGKILL)
        # Reap it at once, as a shell or a job scheduler would: a zombie still counts as running,
        # so the retry would leave its temporary folder alone.
        worker_pids[killed_pid].wait()
        output, _ = batch.communicate(timeout=WAIT_S)
    finally:
        if batch.poll() is None:
            batch.kill()

    assert batch.returncode == 0, output
    rows = read_status(out_dir)
    assert {row["status"] for row in rows.values()} == {"done"}
    assert rows[killed_slide]["attempts"] == "2"
    log_text = (out_dir / rows[killed_slide]["log"]).read_text(encoding="utf-8")
    started_on = re.findall(r"started on (tcp://\S+)", log_text)
    assert len(started_on) == 2
    assert started_on[0] != started_on[1]
    assert partial_dirs(out_dir) == []
    for name in ("a", "b", "c"):
        assert_same_results(serial_reference, out_dir / name)
