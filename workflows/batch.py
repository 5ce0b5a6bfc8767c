"""The batch runner: many slides through ``pipeline.run.run_slide`` on dask.distributed.

``run_batch`` names each slide's output folder, skips slides whose complete result matches the
settings, model and slide fingerprint, submits one dask task per remaining slide, and records
every slide in the status table as it finishes. A slide that fails, times out, or whose worker
dies twice is marked failed with the reason; the other slides go on. Without a cluster
(``serial=True``) the same task runs in this process, one slide after another.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bcseg.errors import BadInputError
from pipeline.run import (
    RunSettings,
    choose_geojson_box,
    complete_record,
    read_complete_record,
    read_summary,
    remove_stale_work_dirs,
)
from workflows.inputs import SlideEntry
from workflows.naming import assign_output_names
from workflows.status import SUCCESS_STATUSES, SlideStatus, StatusTable, utc_iso
from workflows.tasks import EVENT_TOPIC, SlideJob, process_slide

log = logging.getLogger(__name__)

STATUS_NAME = "batch_status.csv"
REPORT_NAME = "batch_report.html"
LOGS_NAME = "batch_logs"
THUMBNAILS_NAME = "batch_thumbnails"
RESERVED_NAMES = frozenset({STATUS_NAME, REPORT_NAME, LOGS_NAME, THUMBNAILS_NAME, STATUS_NAME + ".partial"})
POLL_S = 0.2
FINGERPRINT_THREADS = 8  # fingerprints read 2 MiB per slide; threads overlap network storage latency

Progress = Callable[[SlideStatus, int, int], None]  # (row, finished so far, total)


@dataclass
class BatchOptions:
    """How to run a batch, as opposed to what each slide's outputs are (RunSettings)."""

    scheduler: str | None = None  # address of an existing dask scheduler; None starts a LocalCluster
    n_workers: int | None = None  # LocalCluster workers; None: one per GPU, or sized to the CPUs
    serial: bool = False  # run in this process without dask
    force: bool = False  # redo slides that have a complete result
    timeout_s: float | None = None  # per slide
    dashboard: bool = True


@dataclass
class BatchResult:
    rows: list[SlideStatus]
    status_path: Path
    report_path: Path
    dashboard_link: str | None = None
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def all_succeeded(self) -> bool:
        return all(row.status in SUCCESS_STATUSES for row in self.rows)


def run_batch(
    entries: list[SlideEntry],
    settings: RunSettings,
    options: BatchOptions,
    progress: Progress | None = None,
    on_cluster: Callable[[str | None], None] | None = None,
) -> BatchResult:
    """Process ``entries`` into ``settings.out_dir`` and write the status table and report.

    ``on_cluster`` is called with the dashboard address (or None) once a cluster is connected.
    """
    from workflows.report import write_report

    out_dir = Path(settings.out_dir).absolute()
    _make_out_dir(out_dir)
    jobs = plan_jobs(entries, settings, out_dir, options.timeout_s)
    table = StatusTable(out_dir / STATUS_NAME)
    total = len(jobs)
    finished = 0

    def record(row: SlideStatus) -> None:
        nonlocal finished
        finished += 1
        table.add(row)
        if progress is not None:
            progress(row, finished, total)

    dashboard_link = None
    try:
        skipped, pending = split_complete(jobs, settings, force=options.force)
        for row in skipped:
            record(row)
        if pending and options.serial:
            for job in pending:
                record(process_slide(job))
        elif pending:
            dashboard_link = _run_on_dask(pending, settings, options, record, on_cluster)
    finally:
        table.close()
    if options.scheduler is None:
        _remove_stale_partials(jobs)

    rows = table.finish([job.settings.output_name for job in jobs])
    report_path = write_report(rows, out_dir / REPORT_NAME, out_dir / THUMBNAILS_NAME)
    counts = {status: sum(row.status == status for row in rows) for status in ("done", "skipped", "no_tissue", "failed")}
    return BatchResult(rows, out_dir / STATUS_NAME, report_path, dashboard_link, counts)


def plan_jobs(entries: list[SlideEntry], settings: RunSettings, out_dir: Path, timeout_s: float | None) -> list[SlideJob]:
    """Give each slide its output folder name, settings and log file."""
    from pipeline.slide import slide_fingerprint

    names = assign_output_names(
        [entry.path for entry in entries], out_dir, reserved=RESERVED_NAMES, fingerprint=_fingerprint_or_none(slide_fingerprint)
    )
    jobs = []
    for entry, name in zip(entries, names):
        slide_settings = dataclasses.replace(
            settings,
            out_dir=out_dir,
            output_name=name,
            mpp_override=entry.mpp if entry.mpp is not None else settings.mpp_override,
            overwrite=True,  # only slides without a matching complete result are submitted
        )
        log_name = f"{LOGS_NAME}/{name}.log"
        jobs.append(SlideJob(entry.path, slide_settings, out_dir / log_name, log_name, timeout_s))
    return jobs


def split_complete(jobs: list[SlideJob], settings: RunSettings, force: bool) -> tuple[list[SlideStatus], list[SlideJob]]:
    """Split jobs into skipped rows (complete result with the same record) and jobs to run.

    The check hashes the checkpoint file and fingerprints each slide without loading the model,
    so a rerun of a finished batch does not start a cluster. A slide with a result is also opened
    to read its bounds offset, which decides the GeoJSON frame.
    """
    if force:
        return [], list(jobs)
    from bcseg.checkpoint import DEFAULT_MODEL_PATH, file_sha256, read_model_info
    from pipeline.slide import open_slide, slide_fingerprint

    model_path = Path(settings.model_path) if settings.model_path is not None else DEFAULT_MODEL_PATH
    try:
        info, _ = read_model_info(model_path)
        model_sha256 = file_sha256(model_path)
    except OSError as error:
        raise BadInputError(f"{model_path}: the model checkpoint cannot be read ({error}); pass another --model") from error
    tile_size_px, _ = settings.tiling_for(info)

    def check(job: SlideJob) -> SlideStatus | None:
        started = time.time()
        output_dir = Path(job.settings.out_dir) / job.settings.output_name
        existing = read_complete_record(output_dir)
        if existing is None:
            return None
        try:
            fingerprint = slide_fingerprint(job.slide_path)
            with open_slide(job.slide_path, mpp=job.settings.mpp_override) as slide:
                l0_geojson_box = choose_geojson_box(slide, job.settings.geojson_frame)
        except (OSError, BadInputError):
            return None  # the task reports the missing or unreadable slide
        _, key = complete_record(job.settings.resolved(info), tile_size_px, fingerprint, model_sha256, l0_geojson_box)
        if existing.get("key") != key:
            return None
        return SlideStatus.from_summary(
            read_summary(output_dir), slide=str(job.slide_path), output=job.settings.output_name,
            status="skipped", reason="complete result with the same settings, model and slide exists",
            worker="local", started=utc_iso(started), finished=utc_iso(time.time()), seconds=round(time.time() - started, 3),
        )

    with ThreadPoolExecutor(FINGERPRINT_THREADS) as pool:
        checked = list(pool.map(check, jobs))
    skipped = [row for row in checked if row is not None]
    pending = [job for job, row in zip(jobs, checked) if row is None]
    return skipped, pending


def _run_on_dask(pending, settings, options, record, on_cluster) -> str | None:
    from distributed import as_completed

    from workflows.cluster import connect

    with connect(options.scheduler, options.n_workers, settings.device, options.dashboard) as cluster:
        if on_cluster is not None:
            on_cluster(cluster.dashboard_link)
        tracker = _StartTracker()
        cluster.client.subscribe_topic(EVENT_TOPIC, tracker.on_event)
        batch_id = uuid.uuid4().hex[:8]
        futures = {}
        for index, job in enumerate(pending):
            future = cluster.client.submit(
                process_slide, job, key=f"bcseg-slide-{batch_id}-{index}", resources=cluster.task_resources, pure=False
            )
            futures[future.key] = (future, job)

        timed_out: set[str] = set()
        completed = as_completed([future for future, _ in futures.values()])
        while not completed.is_empty():
            ready = completed.next_batch(block=False)
            for future in ready:
                _, job = futures[future.key]
                if future.key in timed_out:
                    continue
                record(_row_from_future(future, job, tracker))
            if not ready:
                time.sleep(POLL_S)
            if options.timeout_s:
                for row in _expire(futures, tracker, options.timeout_s, timed_out, cluster.client):
                    record(row)
        return cluster.dashboard_link


class _StartTracker:
    """Start events from the workers: which worker runs which slide, since when, and how often."""

    def __init__(self):
        self.starts: dict[str, list[tuple[float, float, str]]] = {}  # (monotonic, time.time(), worker)

    def on_event(self, event) -> None:
        _, message = event
        self.starts.setdefault(message["output"], []).append((time.monotonic(), time.time(), message["worker"]))

    def attempts(self, name: str) -> int:
        return len(self.starts.get(name, ()))

    def latest(self, name: str) -> tuple[float, float, str] | None:
        starts = self.starts.get(name)
        return starts[-1] if starts else None

    def failed_row(self, job: SlideJob, reason: str) -> SlideStatus:
        """Build the row of a slide that failed outside its task, from the workers' start events."""
        name = job.settings.output_name
        latest = self.latest(name)
        first = self.starts[name][0] if latest else None
        now = time.time()
        return SlideStatus(
            slide=str(job.slide_path), output=name, status="failed", reason=reason, log=job.log_name,
            worker=latest[2] if latest else "", attempts=max(1, self.attempts(name)),
            started=utc_iso(first[1]) if first else "", finished=utc_iso(now),
            seconds=round(now - first[1], 3) if first else 0.0,
        )


def _row_from_future(future, job: SlideJob, tracker: _StartTracker) -> SlideStatus:
    from distributed import KilledWorker

    name = job.settings.output_name
    attempts = max(1, tracker.attempts(name))
    if future.status == "finished":
        row = future.result()
        row.attempts = attempts
        return row
    error = future.exception() if future.status == "error" else None
    if isinstance(error, KilledWorker):
        reason = (f"the worker process died while running this slide (killed, or out of memory) on each of "
                  f"{attempts} tries; see the worker's log and {job.log_name}")
    elif error is not None:
        reason = f"{type(error).__name__}: {error}"
    else:
        reason = f"the task ended as {future.status!r} (lost scheduler or cluster shut down)"
    log.error("%s: failed: %s", job.slide_path, reason)
    return tracker.failed_row(job, reason)


def _expire(futures, tracker: _StartTracker, timeout_s: float, timed_out: set[str], client) -> list[SlideStatus]:
    """Fail the slides running longer than ``timeout_s`` and restart their workers.

    A thread cannot be stopped from outside, so the worker is restarted. A worker without a nanny
    cannot be restarted, and it keeps running the slide until the slide ends.
    """
    rows = []
    now = time.monotonic()
    for key, (future, job) in futures.items():
        latest = tracker.latest(job.settings.output_name)
        if key in timed_out or future.done() or latest is None or now - latest[0] < timeout_s:
            continue
        timed_out.add(key)
        worker = latest[2]
        reason = f"timed out after {timeout_s:g} s"
        log.error("%s: %s on %s; restarting that worker", job.slide_path, reason, worker)
        future.cancel()
        try:
            client.restart_workers([worker])
        except Exception as error:  # a worker without a nanny, or already gone
            log.warning("could not restart worker %s after a timeout (%s); it keeps running the slide", worker, error)
        rows.append(tracker.failed_row(job, reason))
    return rows


def _remove_stale_partials(jobs: list[SlideJob]) -> None:
    """Remove temporary folders of killed or timed-out runs on this machine."""
    for job in jobs:
        remove_stale_work_dirs(Path(job.settings.out_dir) / job.settings.output_name)


def _make_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadInputError(f"{out_dir}: cannot create the output folder ({error.strerror}); choose another --out") from error
    if not out_dir.is_dir():
        raise BadInputError(f"{out_dir} is not a folder; choose another --out")


def _fingerprint_or_none(fingerprint):
    def safe(path: Path) -> str | None:
        try:
            return fingerprint(path)
        except OSError:
            return None

    return safe
