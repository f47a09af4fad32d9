"""A run's metrics: one CSV row per logged step (resumable: rows past the resumed step are dropped)
and a PNG of the curves (matplotlib, the `plot` extra; skipped with a warning when missing)."""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from cotap.core.version import install_hint

BASE_COLUMNS = (
    "step",
    "epoch",
    "time_s",
    "images_per_s",
    "lr",
    "lr_heads",
    "weight_decay",
    "momentum",
    "grad_norm",
    "loss",
)


class MetricsLog:
    """Appends rows with fixed columns to `path` (written by the main rank only)."""

    def __init__(self, path: Path, loss_names: Sequence[str], resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.columns = [*BASE_COLUMNS, *(f"loss_{n}" for n in loss_names)]
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if int(float(r["step"])) <= resume_step]
            self._write_all(kept)
        else:
            self._write_all([])

    def _write_all(self, rows: Sequence[Mapping[str, object]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow(r)

    def append(self, row: Mapping[str, object]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore").writerow(
                {k: row.get(k, "") for k in self.columns}
            )


def read_metrics(path: Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def plot_metrics(csv_path: Path, png_path: Path, title: str = "") -> Path | None:
    """Loss terms, total loss, lr and throughput against the step; returns the PNG path, or None
    when matplotlib is not installed or there is nothing to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        warnings.warn(f"matplotlib is not installed ({install_hint('plot')}): no curves plot", stacklevel=2)
        return None
    rows = read_metrics(csv_path)
    if not rows:
        return None

    def series(col: str) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for r in rows:
            v = r.get(col, "")
            if v not in ("", None):
                y = float(v)
                if math.isfinite(y):
                    xs.append(float(r["step"]))
                    ys.append(y)
        return xs, ys

    loss_cols = [c for c in rows[0] if c.startswith("loss_") and series(c)[1]]
    panels = ["loss", *loss_cols, "lr", "images_per_s"]
    cols = 3
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.8 * nrows), squeeze=False)
    for ax, col in zip(axes.flat, panels, strict=False):
        xs, ys = series(col)
        ax.plot(xs, ys, lw=1.2)
        if col == "lr":
            hx, hy = series("lr_heads")
            ax.plot(hx, hy, lw=1.2, label="heads")
            ax.legend(fontsize=7)
        ax.set_title(col, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
