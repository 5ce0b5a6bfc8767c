"""Per-epoch metrics of a training run: ``metrics.jsonl``, ``metrics.csv`` and ``metrics.png``.

The JSONL file is the record; the CSV table and the plot are rewritten from it after each epoch.
On resume, records past the resumed epoch (written by a run that crashed later) are dropped.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from bcseg.classes import CLASS_NAMES

CSV_FIELDS = (
    ["epoch", "step", "lr", "loss", "cross_entropy", "dice_loss", "val_mean_dice", "val_binary_tumor_dice"]
    + [f"val_dice_{name}" for name in CLASS_NAMES]
    + ["epoch_seconds", "elapsed_seconds"]
)


class Logbook:
    def __init__(self, run_dir: Path):
        self.jsonl_path = run_dir / "metrics.jsonl"
        self.csv_path = run_dir / "metrics.csv"
        self.plot_path = run_dir / "metrics.png"

    def records(self) -> list[dict]:
        if not self.jsonl_path.exists():
            return []
        with open(self.jsonl_path, encoding="utf-8") as file:
            return [json.loads(line) for line in file if line.strip()]

    def truncate_after(self, epoch: int) -> None:
        """Drop records of epochs after ``epoch``."""
        kept = [record for record in self.records() if record["epoch"] <= epoch]
        self._write_jsonl(kept)

    def append(self, record: dict) -> None:
        self._write_jsonl(self.records() + [record])
        self._write_csv()
        self._write_plot()

    def _write_jsonl(self, records: list[dict]) -> None:
        temporary = self.jsonl_path.with_name(self.jsonl_path.name + ".partial")
        with open(temporary, "w", encoding="utf-8") as file:
            for record in records:
                file.write(json.dumps(record) + "\n")
        os.replace(temporary, self.jsonl_path)

    def _write_csv(self) -> None:
        temporary = self.csv_path.with_name(self.csv_path.name + ".partial")
        with open(temporary, "w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            for record in self.records():
                writer.writerow(_flat_row(record))
        os.replace(temporary, self.csv_path)

    def _write_plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        records = self.records()
        epochs = [record["epoch"] for record in records]
        figure, (loss_axes, dice_axes) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
        for key, label in (("loss", "total"), ("cross_entropy", "cross-entropy"), ("dice_loss", "1 - soft Dice")):
            values = [record.get(key) for record in records]
            if any(value is not None for value in values):
                loss_axes.plot(epochs, _gaps(values), marker=".", label=label)
        loss_axes.set(title="training loss", xlabel="epoch", ylabel="loss")
        loss_axes.legend()

        for name in CLASS_NAMES:
            values = [(record.get("validation") or {}).get("dice", {}).get(name) for record in records]
            if any(value is not None for value in values):
                dice_axes.plot(epochs, _gaps(values), marker=".", label=name)
        mean = [(record.get("validation") or {}).get("mean_dice") for record in records]
        if any(value is not None for value in mean):
            dice_axes.plot(epochs, _gaps(mean), color="black", linewidth=2, label="mean")
        tumor_binary = [(record.get("validation_binary") or {}).get("tumor_dice") for record in records]
        if any(value is not None for value in tumor_binary):
            dice_axes.plot(epochs, _gaps(tumor_binary), linestyle="--", label="tumour vs rest")
        dice_axes.set(title="validation Dice", xlabel="epoch", ylabel="Dice", ylim=(0, 1))
        if dice_axes.lines:
            dice_axes.legend(fontsize="small")
        else:
            dice_axes.text(0.5, 0.5, "no validation data", ha="center", va="center", transform=dice_axes.transAxes)
        figure.tight_layout()
        temporary = self.plot_path.with_name(self.plot_path.stem + ".partial.png")
        figure.savefig(temporary)
        plt.close(figure)
        os.replace(temporary, self.plot_path)


def _gaps(values: list) -> list[float]:
    return [float("nan") if value is None else value for value in values]


def _flat_row(record: dict) -> dict:
    validation = record.get("validation") or {}
    row = {key: record.get(key) for key in ("epoch", "step", "lr", "loss", "cross_entropy", "dice_loss")}
    row["val_mean_dice"] = validation.get("mean_dice")
    row["val_binary_tumor_dice"] = (record.get("validation_binary") or {}).get("tumor_dice")
    for name in CLASS_NAMES:
        row[f"val_dice_{name}"] = (validation.get("dice") or {}).get(name)
    row["epoch_seconds"] = record.get("epoch_seconds")
    row["elapsed_seconds"] = record.get("elapsed_seconds")
    return row
