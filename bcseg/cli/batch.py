"""``bcseg-wsi batch INPUT``: segment every slide of a folder or list on dask.distributed."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from bcseg.cli.run import add_settings_options

EXIT_SLIDES_FAILED = 3


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "batch",
        help="segment every slide of a folder or a list, on a dask cluster",
        description="Segment many slides: every slide file below a folder (recursively; a folder of .dcm "
        "files is one DICOM slide), or every path of a list file (CSV with a 'path' and an optional 'mpp' "
        "column, or text with one path per line). Each slide gets OUT/<name>/ as with 'bcseg-wsi run'; "
        "slides with a complete result for the same settings, model and slide are skipped. Writes "
        "OUT/batch_status.csv as slides finish, OUT/batch_report.html at the end, and a log per slide in "
        "OUT/batch_logs/.",
        epilog=f"Exit codes: 0 every slide done, skipped or without tissue; {EXIT_SLIDES_FAILED} one or more "
        "slides failed (see the status table); 2 bad input; 1 internal error.",
    )
    parser.add_argument("input", type=Path, metavar="INPUT", help="folder of slides, or a .csv or text list of slide paths")
    parser.add_argument("--out", type=Path, default=Path("outputs"), metavar="DIR", help="output folder (default: outputs)")
    add_settings_options(parser)
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--scheduler", default=None, metavar="ADDRESS",
                         help="address of a running dask scheduler, e.g. tcp://10.0.0.5:8786; default: start a "
                         "local cluster on this machine")
    cluster.add_argument("--n-workers", type=int, default=None, metavar="N",
                         help="workers of the local cluster (default: one per GPU, or one per 4 CPU cores)")
    cluster.add_argument("--serial", action="store_true",
                         help="no dask: process the slides one after another in this process")
    cluster.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                         help="fail a slide that runs longer than this (default: no limit)")
    cluster.add_argument("--no-dashboard", action="store_true", help="do not start the dask dashboard")
    parser.add_argument("--force", action="store_true", help="redo slides that already have a complete result")
    return parser


def execute(args: argparse.Namespace) -> int:
    from bcseg.cli.run import settings_from_args
    from bcseg.errors import BadInputError
    from workflows.batch import BatchOptions, run_batch
    from workflows.inputs import collect_slides
    from workflows.status import format_table

    settings = settings_from_args(args)
    if args.n_workers is not None and args.n_workers < 1:
        raise BadInputError(f"--n-workers must be at least 1, got {args.n_workers}")
    if args.timeout is not None and not args.timeout > 0:
        raise BadInputError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if args.scheduler is not None and (args.serial or args.n_workers is not None):
        raise BadInputError("--scheduler uses an existing cluster; leave out --serial and --n-workers")
    options = BatchOptions(scheduler=args.scheduler, n_workers=args.n_workers, serial=args.serial,
                           force=args.force, timeout_s=args.timeout, dashboard=not args.no_dashboard)
    entries = collect_slides(args.input, args.out)
    _quiet_console_below(logging.getLogger().level)

    with SlideBar(len(entries), enabled=not args.quiet, dashboard=not args.no_dashboard) as bar:
        result = run_batch(entries, settings, options, progress=bar.update, on_cluster=bar.announce_cluster)

    if not args.quiet:
        print(format_table(result.rows))
    counts = ", ".join(f"{count} {status}" for status, count in result.counts.items())
    print(f"{len(result.rows)} slides: {counts}")
    print(f"status table: {result.status_path}")
    print(f"report: {result.report_path}")
    return 0 if result.all_succeeded else EXIT_SLIDES_FAILED


class SlideBar:
    """A tqdm progress bar over the slides of a batch, on stderr."""

    def __init__(self, total: int, enabled: bool = True, dashboard: bool = True):
        self.total = total
        self.dashboard = dashboard
        self.enabled = enabled and sys.stderr is not None
        self.bar = None
        self.counts: dict[str, int] = {}

    def __enter__(self):
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc="slides", unit="slide", file=sys.stderr)
        return self

    def update(self, row, finished: int, total: int) -> None:
        self.counts[row.status] = self.counts.get(row.status, 0) + 1
        if self.bar is None:
            return
        self.bar.set_postfix(self.counts, refresh=False)
        self.bar.update(1)

    def announce_cluster(self, dashboard_link: str | None) -> None:
        if self.bar is None or not self.dashboard:
            return
        if dashboard_link:
            self.bar.write(f"dask dashboard: {dashboard_link}", file=sys.stderr)
        else:
            self.bar.write("dask dashboard: off (it needs the bokeh package)", file=sys.stderr)

    def __exit__(self, *exc_info):
        if self.bar is not None:
            self.bar.close()


def _quiet_console_below(level: int) -> None:
    """Keep the console at the chosen level while slide logs record INFO (they lower logger levels)."""
    for handler in logging.getLogger().handlers:
        if handler.level < level:
            handler.setLevel(level)
