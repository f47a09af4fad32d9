"""The visual report: PNG figures of an evaluation and an `index.html` that shows them beside the
metrics and the resolved configuration (also written as `results.json`)."""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cotap.core.fsio import write_json
from cotap.training.eval.correspondence import PairMatches, patch_centres
from cotap.training.eval.features import Features
from cotap.training.eval.visual import (
    colorize,
    correspondence_figure,
    grid,
    overlay,
    pca_rgb,
    to_pil,
    upscale,
)


@dataclass
class Figure:
    section: str
    file: str
    caption: str


class Report:
    """Collects figures under `out_dir` and writes the page."""

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.figures: list[Figure] = []

    def add(self, section: str, name: str, image: Image.Image, caption: str = "") -> Path:
        path = self.dir / f"{name}.png"
        image.save(path, "PNG", optimize=True)
        self.figures = [f for f in self.figures if f.file != path.name]
        self.figures.append(Figure(section, path.name, caption))
        return path

    def write(self, results: dict[str, Any], title: str = "cotap eval") -> Path:
        """Write `results.json` and `index.html`; returns the page's path."""
        write_json(self.dir / "results.json", results, default=str)
        page = self.dir / "index.html"
        page.write_text(render_html(results, self.figures, title))
        return page


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4f}"
    return html.escape(str(v))


def _rows(prefix: str, metrics: dict[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for k, v in metrics.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            rows += _rows(key, v)
        elif not isinstance(v, list):
            rows.append((key, _fmt(v)))
    return rows


def render_html(results: dict[str, Any], figures: list[Figure], title: str) -> str:
    """A self-contained page: headline metrics per protocol, the figures by section, the config."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
        "figure{display:inline-block;margin:0 1em 1em 0;vertical-align:top}"
        "img{image-rendering:pixelated;max-width:100%}pre{background:#f4f4f4;padding:1em;overflow:auto}"
        "</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    model = results.get("model", {})
    data = results.get("data", {})
    parts.append("<p>")
    parts.append(f"model: <code>{html.escape(str(model.get('name', '')))}</code> ")
    parts.append(
        f"({html.escape(str(model.get('arch', '')))}, sha256 {html.escape(str(model.get('source_sha256', ''))[:16])}) "
    )
    for split_name in ("train", "val"):
        d = data.get(split_name)
        if d:
            parts.append(
                f"<br>{split_name}: <code>{html.escape(str(d.get('name')))}</code>, {d.get('size')} images"
            )
    parts.append("</p>")
    for name, res in results.get("results", {}).items():
        std = dict(_rows("", res.get("std", {})))
        seeds = f" (mean ± std over seeds {res['seeds']})" if "seeds" in res else ""
        parts.append(f"<h2>{html.escape(name)}</h2><p>{html.escape(seeds)}</p>")
        parts.append("<table><tr><th>metric</th><th>value</th>" + ("<th>std</th>" if std else "") + "</tr>")
        for k, v in _rows("", res.get("metrics", {})):
            if ".per_class_iou." in f".{k}":
                continue
            extra = f"<td>{std.get(k, '')}</td>" if std else ""
            parts.append(f"<tr><td>{html.escape(k)}</td><td>{v}</td>{extra}</tr>")
        parts.append("</table>")
        timing = res.get("timing_s", {})
        if timing:
            parts.append(
                "<p>time: " + ", ".join(f"{html.escape(k)} {v:.1f} s" for k, v in timing.items()) + "</p>"
            )
    sections: dict[str, list[Figure]] = {}
    for f in figures:
        sections.setdefault(f.section, []).append(f)
    for section, figs in sections.items():
        parts.append(f"<h2>{html.escape(section)}</h2>")
        for f in figs:
            parts.append(
                f"<figure><img src='{html.escape(f.file)}' alt='{html.escape(f.caption)}'>"
                f"<figcaption>{html.escape(f.caption)}</figcaption></figure>"
            )
    parts.append("<h2>configuration</h2><pre>")
    parts.append(
        html.escape(json.dumps({k: v for k, v in results.items() if k != "results"}, indent=2, default=str))
    )
    parts.append("</pre></body></html>\n")
    return "".join(parts)


def feature_figure(feats: Features, num_prototypes: int, n: int = 6) -> Image.Image:
    """Per image: the image, the PCA colouring of its patch features (fitted on the shown images),
    its prototype map (argmax of `assign`) overlaid, and the map alone."""
    n = min(n, len(feats.images))
    size = feats.input_size
    pcas = pca_rgb([feats.patch[i] for i in range(n)])
    rows = []
    for i in range(n):
        image = to_pil(feats.images[i])
        protos = upscale(colorize(feats.prototype[i], num_prototypes), size)
        rows.append([image, upscale(pcas[i], size), overlay(image, protos), protos])
    return grid(rows, ["image", "PCA", "prototypes", "prototype map"])


def prediction_figure(
    feats: Features, predictions: torch.Tensor, num_classes: int, n: int = 6
) -> Image.Image:
    """Per image: the image, the ground truth and the prediction (ignore in black)."""
    if feats.masks is None:
        raise ValueError("no ground truth to show")
    n = min(n, len(feats.images), len(predictions))
    rows = []
    for i in range(n):
        image = to_pil(feats.images[i])
        gt = Image.fromarray(colorize(feats.masks[i], num_classes))
        pred = Image.fromarray(colorize(predictions[i], num_classes))
        rows.append(
            [
                image,
                gt.resize(image.size, Image.Resampling.NEAREST),
                pred.resize(image.size, Image.Resampling.NEAREST),
            ]
        )
    return grid(rows, ["image", "ground truth", "prediction"])


def pair_figure(pair: PairMatches, patch_size: int, alpha_side: float, seed: int = 0) -> Image.Image:
    """A source and its warp with lines between matched patches (valid sources only); green when
    within `alpha_side` patches of the true location."""
    if pair.source is None or pair.target is None:
        raise ValueError("this pair kept no images")
    h, w = pair.source.shape[-2] // patch_size, pair.source.shape[-1] // patch_size
    src_xy = patch_centres((h, w), patch_size)
    tgt_xy = patch_centres((h, w), patch_size)[pair.match.numpy()]
    ok = pair.error <= alpha_side
    v = np.flatnonzero(pair.valid)
    return correspondence_figure(pair.source, pair.target, src_xy[v], tgt_xy[v], ok[v], seed=seed)
