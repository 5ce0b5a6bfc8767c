"""The batch report: one static HTML page with a row per slide, sortable by any column.

The page loads nothing from the network. Thumbnails are small PNG copies of each slide's
overlay.png in a folder beside the page, linked by relative paths, so the page stays small for
thousands of slides. A short inline script sorts the table.
"""

from __future__ import annotations

import html
import logging
import os
from pathlib import Path
from urllib.parse import quote

from bcseg.classes import CLASSES
from workflows.status import SlideStatus

log = logging.getLogger(__name__)

THUMBNAIL_MAX_PX = 192

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 6px; vertical-align: middle; }
th { background: #f0f0f0; cursor: pointer; user-select: none; position: sticky; top: 0; }
th.sorted-up::after { content: " \\25B2"; } th.sorted-down::after { content: " \\25BC"; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
tr.failed { background: #fde8e8; } tr.no_tissue { background: #f4f4f4; }
td.reason { max-width: 28em; font-size: 12px; }
.swatch { display: inline-block; width: 0.8em; height: 0.8em; margin-right: 0.3em; border: 1px solid #888; }
"""

# Click a header to sort by it; click again to reverse. Cells sort by their data-sort value.
_SCRIPT = """
document.querySelectorAll("th").forEach(function (header, column) {
  header.addEventListener("click", function () {
    var body = document.querySelector("tbody");
    var ascending = !header.classList.contains("sorted-up");
    document.querySelectorAll("th").forEach(function (h) { h.classList.remove("sorted-up", "sorted-down"); });
    header.classList.add(ascending ? "sorted-up" : "sorted-down");
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[column].getAttribute("data-sort"), y = b.cells[column].getAttribute("data-sort");
      var nx = parseFloat(x), ny = parseFloat(y), order;
      if (!isNaN(nx) && !isNaN(ny)) { order = nx - ny; }
      else if (x === "" || y === "") { order = (x === "") - (y === ""); return order; }
      else { order = x.localeCompare(y); }
      return ascending ? order : -order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
"""


def write_report(rows: list[SlideStatus], report_path: Path, thumbnail_dir: Path) -> Path:
    """Write the HTML report of ``rows`` to ``report_path``, with thumbnails in ``thumbnail_dir``."""
    report_path = Path(report_path)
    out_dir = report_path.parent
    body_rows = []
    for row in rows:
        thumbnail = _make_thumbnail(out_dir / row.output / "overlay.png", Path(thumbnail_dir) / f"{row.output}.png")
        thumbnail_url = quote(os.path.relpath(thumbnail, out_dir)) if thumbnail is not None else None
        body_rows.append(_row_html(row, thumbnail_url))

    counts = ", ".join(f"{sum(r.status == status for r in rows)} {status}" for status in ("done", "skipped", "no_tissue", "failed"))
    class_headers = "".join(f"<th>{_swatch(c.color)}{html.escape(c.name)} mm&sup2;</th><th>{html.escape(c.name)} %</th>"
                            for c in CLASSES)
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>bcseg-wsi batch report</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>bcseg-wsi batch report</h1>
<p>{len(rows)} slides: {counts}. Areas are in mm&sup2; of tissue; % is the fraction of the slide's tissue.
TSR is the tumour-stroma ratio given as stroma area in percent of tumour plus stroma area.
Click a column header to sort.</p>
<table>
<thead><tr><th>overlay</th><th>slide</th><th>status</th><th>tissue mm&sup2;</th>{class_headers}<th>TSR stroma %</th><th>seconds</th><th>reason</th></tr></thead>
<tbody>
{chr(10).join(body_rows)}
</tbody>
</table>
<script>{_SCRIPT}</script>
</body>
</html>
"""
    temporary = report_path.with_name(report_path.name + ".partial")
    temporary.write_text(page, encoding="utf-8")
    os.replace(temporary, report_path)
    return report_path


def _row_html(row: SlideStatus, thumbnail_url: str | None) -> str:
    link = quote(row.output) + "/"
    image = (f'<a href="{link}overlay.png"><img src="{thumbnail_url}" alt="overlay of {html.escape(row.output)}" '
             f'loading="lazy"></a>' if thumbnail_url else "")
    slide_cell = (f'<a href="{link}">{html.escape(row.output)}</a><br><small>{html.escape(row.slide)}</small>'
                  if row.status != "failed" else f"{html.escape(row.output)}<br><small>{html.escape(row.slide)}</small>")
    cells = [
        f'<td data-sort="">{image}</td>',
        f'<td data-sort="{html.escape(row.output)}">{slide_cell}</td>',
        f'<td data-sort="{row.status}">{row.status}</td>',
        _number_cell(row.tissue_mm2, "{:.3f}"),
    ]
    for tissue_class in CLASSES:
        cells.append(_number_cell(row.areas_mm2.get(tissue_class.name), "{:.3f}"))
        fraction = row.fractions.get(tissue_class.name)
        cells.append(_number_cell(None if fraction is None else 100 * fraction, "{:.1f}"))
    cells.append(_number_cell(row.stroma_percent, "{:.1f}"))
    cells.append(_number_cell(row.seconds, "{:.1f}"))
    reason = html.escape(row.reason)
    if row.log:
        reason += f' <a href="{quote(row.log)}">log</a>'
    cells.append(f'<td class="reason" data-sort="{html.escape(row.reason)}">{reason}</td>')
    return f'<tr class="{row.status}">' + "".join(cells) + "</tr>"


def _number_cell(value: float | None, pattern: str) -> str:
    if value is None:
        return '<td class="number" data-sort="">-</td>'
    return f'<td class="number" data-sort="{value}">{pattern.format(value)}</td>'


def _swatch(color: tuple[int, int, int]) -> str:
    return f'<span class="swatch" style="background: rgb({color[0]}, {color[1]}, {color[2]})"></span>'


def _make_thumbnail(overlay_path: Path, thumbnail_path: Path) -> Path | None:
    """Write a small copy of ``overlay_path`` unless an up-to-date one exists; None without overlay."""
    from PIL import Image

    try:
        overlay_mtime = overlay_path.stat().st_mtime
    except OSError:
        return None
    if thumbnail_path.exists() and thumbnail_path.stat().st_mtime >= overlay_mtime:
        return thumbnail_path
    thumbnail_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with Image.open(overlay_path) as image:
            image.thumbnail((THUMBNAIL_MAX_PX, THUMBNAIL_MAX_PX))
            temporary = thumbnail_path.with_name(thumbnail_path.name + ".partial.png")
            image.save(temporary)
        os.replace(temporary, thumbnail_path)
    except OSError as error:
        log.warning("%s: no thumbnail for the report (%s)", overlay_path, error)
        return None
    return thumbnail_path
