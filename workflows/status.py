"""The batch status table: one row per slide, appended to a CSV file as each slide finishes.

A row is appended and flushed as soon as a slide is done, skipped, without tissue or failed, so
the file shows the progress of a running batch and survives a crash. When the batch ends the file
is rewritten atomically in input order.
"""

from __future__ import annotations

import csv
import os
from datetime import datetime, timezone
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from bcseg.classes import CLASSES

STATUSES = ("done", "skipped", "no_tissue", "failed")
SUCCESS_STATUSES = frozenset({"done", "skipped", "no_tissue"})


@dataclass
class SlideStatus:
    """The outcome of one slide in this batch: one row of the status table."""

    slide: str  # the slide's path as given
    output: str  # the output folder's name under the batch folder
    status: str  # one of STATUSES
    reason: str = ""  # why it failed, or why it was skipped
    log: str = ""  # the slide's log file, relative to the batch folder
    worker: str = ""  # the dask worker address, or "local" for a serial run
    attempts: int = 0  # times a worker started the slide in this batch
    started: str = ""  # ISO 8601 UTC
    finished: str = ""  # ISO 8601 UTC
    seconds: float = 0.0  # time spent on the slide in this batch
    result_status: str = ""  # status in the result's summary.json: done or no_tissue
    pipeline_seconds: float | None = None  # the pipeline's own total time for the result
    tissue_mm2: float | None = None
    areas_mm2: dict[str, float] = field(default_factory=dict)  # class name -> area
    fractions: dict[str, float] = field(default_factory=dict)  # class name -> fraction of tissue

    @property
    def stroma_percent(self) -> float | None:
        """Stroma as a percentage of tumour plus stroma area, the tumour-stroma ratio's usual form."""
        return stroma_percent(self.areas_mm2)

    def to_row(self) -> dict[str, Any]:
        row = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("areas_mm2", "fractions")}
        for tissue_class in CLASSES:
            row[f"{tissue_class.name}_mm2"] = self.areas_mm2.get(tissue_class.name)
        for tissue_class in CLASSES:
            row[f"{tissue_class.name}_fraction"] = self.fractions.get(tissue_class.name)
        row["stroma_percent_of_tumour_stroma"] = self.stroma_percent
        return {name: _format_cell(value) for name, value in row.items()}

    @classmethod
    def from_summary(cls, summary: dict[str, Any], **values: Any) -> SlideStatus:
        """Build a row from a result's summary.json and the batch's own values."""
        classes = summary.get("classes", {})
        tissue_um2 = summary.get("tissue_area_um2")
        return cls(
            result_status=summary.get("status", ""),
            pipeline_seconds=summary.get("timings_s", {}).get("total_s"),
            tissue_mm2=round(tissue_um2 / 1e6, 6) if tissue_um2 is not None else None,
            areas_mm2={name: round(item["area_um2"] / 1e6, 6) for name, item in classes.items()},
            fractions={name: item["fraction_of_tissue"] for name, item in classes.items()},
            **values,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def utc_iso(seconds: float) -> str:
    """Format a time.time() value as ISO 8601 UTC to the second."""
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def stroma_percent(areas: dict[str, float]) -> float | None:
    tumour, stroma = areas.get("tumor"), areas.get("stroma")
    if tumour is None or stroma is None or tumour + stroma <= 0:
        return None
    return round(100.0 * stroma / (tumour + stroma), 2)


def column_names() -> list[str]:
    return list(SlideStatus(slide="", output="", status="").to_row())


class StatusTable:
    """The CSV status file of a batch, appended to as slides finish."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: list[SlideStatus] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, fieldnames=column_names())
        self._writer.writeheader()
        self._file.flush()

    def add(self, row: SlideStatus) -> None:
        self.rows.append(row)
        self._writer.writerow(row.to_row())
        self._file.flush()

    def finish(self, order: list[str]) -> list[SlideStatus]:
        """Rewrite the file with the rows in ``order`` (output names) and return those rows."""
        self._file.close()
        position = {name: index for index, name in enumerate(order)}
        self.rows.sort(key=lambda row: position.get(row.output, len(position)))
        temporary = self.path.with_name(self.path.name + ".partial")
        with temporary.open("w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=column_names())
            writer.writeheader()
            writer.writerows(row.to_row() for row in self.rows)
        os.replace(temporary, self.path)
        return self.rows

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def format_table(rows: list[SlideStatus], max_reason_chars: int = 60) -> str:
    """Format the rows as a plain-text table for the terminal."""
    header = ("status", "seconds", "tissue mm^2", "tumor %", "stroma %", "TSR stroma %", "output", "reason")
    lines = [header]
    for row in rows:
        reason = row.reason if len(row.reason) <= max_reason_chars else row.reason[: max_reason_chars - 3] + "..."
        lines.append((
            row.status,
            f"{row.seconds:.1f}",
            _format_number(row.tissue_mm2, "{:.3f}"),
            _format_number(_percent(row.fractions.get("tumor")), "{:.1f}"),
            _format_number(_percent(row.fractions.get("stroma")), "{:.1f}"),
            _format_number(row.stroma_percent, "{:.1f}"),
            row.output,
            reason,
        ))
    widths = [max(len(line[column]) for line in lines) for column in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line[:-1], widths)) + "  " + line[-1]
        for line in lines
    )


def _percent(fraction: float | None) -> float | None:
    return None if fraction is None else 100.0 * fraction


def _format_number(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def _format_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value
