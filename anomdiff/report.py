"""Evaluation reports: ``metrics.json``, ``metrics.md``, PNG figures, and logging them to MLflow.

The evaluation pipeline computes the metrics document (:mod:`anomdiff.metrics`), the curves
(``StreamingMetrics.curves()`` or ``metrics.compute_curves``) and picks the worst cases with
:func:`select_worst_cases` from the per-image scores alone, then loads only those images and
maps into :class:`Case` objects and calls :func:`write_report` and :func:`log_to_mlflow`.
Figures are drawn on matplotlib ``Figure`` objects with the Agg canvas: no pyplot state, and the
global backend is left as it is.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from anomdiff.atomic import atomic_path, write_json_atomic
from anomdiff.metrics import METRIC_KEYS

METRICS_JSON = "metrics.json"
METRICS_MD = "metrics.md"
AUROC_BARS_PNG = "auroc_by_category.png"
CURVES_PNG = "roc_pr_curves.png"
WORST_CASES_PNG = "worst_cases.png"

_HEADERS = {"image_auroc": "image AUROC", "image_ap": "image AP", "image_f1max": "image F1max",
            "pixel_auroc": "pixel AUROC", "pixel_ap": "pixel AP", "pixel_f1max": "pixel F1max",
            "aupro": "AUPRO"}
_MLFLOW_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. ]")  # what MLflow allows in a name, less "/"
_MLFLOW_BATCH = 1000  # most metrics one MLflow log_batch request takes


@dataclass(frozen=True)
class Case:
    """One image of the worst-cases grid.

    ``image``: uint8 H x W x 3 (or H x W); ``anomaly_map``: h x w, drawn stretched over the image;
    ``mask``: ground truth (> 0 anomalous), ``None`` for a normal image.
    """

    image: np.ndarray
    anomaly_map: np.ndarray
    mask: np.ndarray | None
    score: float
    label: int
    category: str
    sample_id: str = ""


def select_worst_cases(image_scores, image_labels, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``k`` highest-scored normal images and the ``k`` lowest-scored anomalous ones.

    Ranks raw scores across all categories, so a category whose scores run high shows up first.
    """
    scores, labels = np.asarray(image_scores, dtype=np.float64), np.asarray(image_labels)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"image_scores has shape {scores.shape}, image_labels has {labels.shape}")
    normal, anomalous = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    worst_normal = normal[np.argsort(-scores[normal], kind="stable")[:k]]
    worst_anomalous = anomalous[np.argsort(scores[anomalous], kind="stable")[:k]]
    return worst_normal, worst_anomalous


# ----------------------------------------------------------------------------- files


def _rank_key(row: dict) -> tuple:
    """Sort key, best first: image AUROC, then pixel AUROC, then AUPRO; undefined values last."""
    keys = ("image_auroc", "pixel_auroc", "aupro")
    return tuple(np.inf if row[key] is None else -row[key] for key in keys)


def _ranked(doc: dict) -> list[str]:
    return sorted(doc["per_category"], key=lambda cat: (_rank_key(doc["per_category"][cat]), cat))


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _markdown_rows(names: Sequence[str], rows: Sequence[dict]) -> list[str]:
    fmt = _percent
    lines = ["| category | " + " | ".join(_HEADERS[key] for key in METRIC_KEYS) + " |",
             "| --- | " + " | ".join("---:" for _ in METRIC_KEYS) + " |"]
    for name, row in zip(names, rows, strict=True):
        lines.append(f"| {name} | " + " | ".join(fmt(row[key]) for key in METRIC_KEYS) + " |")
    return lines


PROTOCOLS = {
    "label_free": "unified protocol (one model, not told the test images' categories)",
    "category_aware": "category-aware protocol (the model is told each test image's category)",
}


def markdown_report(doc: dict, *, top: int = 3, title: str = "Evaluation") -> str:
    """The document as Markdown: the mean, the best and worst categories, then all, best first.

    Values in percent; ``–`` marks an undefined metric (one class only, or no maps).
    """
    per_category = doc["per_category"]
    ranked = _ranked(doc)
    rankable = [cat for cat in ranked if np.isfinite(_rank_key(per_category[cat])).any()]
    protocol = PROTOCOLS.get(doc.get("protocol"), "protocol not recorded")
    lines = [f"# {title}", "",
             f"{doc['num_images']} images in {len(per_category)} categories, {protocol}. Values in percent; "
             "– where a metric is undefined (a category with one class only, or no anomaly maps). "
             "The mean is unweighted over the categories where the metric is defined.", "",
             *_markdown_rows(["**mean**"], [doc["mean"]]), ""]
    decisions = doc.get("at_threshold")
    if decisions:
        mean = decisions["mean"]
        shown = ", ".join(f"{name} {_percent(mean[key])}" for key, name in
                          (("image_precision", "precision"), ("image_recall", "recall"), ("image_f1", "F1")))
        lines += [f"Decisions at the exported threshold {decisions['threshold']:.4g} (chosen on validation), "
                  f"mean over categories: {shown}.", ""]
    if len(rankable) > 2 * top:
        best, worst = rankable[:top], rankable[::-1][:top]
        lines += [f"## Best {top} categories (by image AUROC, then pixel AUROC, then AUPRO)", "",
                  *_markdown_rows(best, [per_category[cat] for cat in best]), "",
                  f"## Worst {top} categories", "",
                  *_markdown_rows(worst, [per_category[cat] for cat in worst]), ""]
    lines += ["## All categories, best first", "",
              *_markdown_rows(ranked, [per_category[cat] for cat in ranked]), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures


def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return path


def plot_auroc_by_category(doc: dict, path: str | Path) -> Path:
    """Horizontal bars of image and pixel AUROC per category, best at the top, means dashed."""
    ranked = _ranked(doc)[::-1]
    rows = [doc["per_category"][cat] for cat in ranked]
    series = [(key, label) for key, label in (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"))
              if any(row[key] is not None for row in rows)]
    fig = Figure(figsize=(7, min(2 + 0.3 * len(ranked), 60)), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(ranked))
    height = 0.8 / max(len(series), 1)
    for i, (key, label) in enumerate(series):
        values = [np.nan if row[key] is None else row[key] for row in rows]
        bars = ax.barh(y + (i - (len(series) - 1) / 2) * height, values, height=height, label=label)
        if doc["mean"][key] is not None:
            ax.axvline(doc["mean"][key], color=bars.patches[0].get_facecolor(), linestyle="--", linewidth=1)
    ax.set_yticks(y, ranked)
    ax.set_xlim(0, 1)
    ax.set_xlabel("AUROC (dashed: mean over categories)")
    ax.set_title("AUROC per category")
    if series:
        fig.legend(loc="outside upper center", ncols=len(series))
    return _save(fig, Path(path))


def plot_curves(curves: dict, path: str | Path, *, legend_limit: int = 15) -> Path:
    """ROC and PR curves per category: one row for image level, one for pixel level if present."""
    levels = [level for level in ("image", "pixel") if curves.get(level)]
    if not levels:
        raise ValueError("no curves to plot: every category has only one class")
    fig = Figure(figsize=(10, 4.5 * len(levels)), layout="constrained")
    axes = fig.subplots(len(levels), 2, squeeze=False)
    for (roc_ax, pr_ax), level in zip(axes, levels, strict=True):
        for cat, curve in sorted(curves[level].items()):
            roc_ax.plot(curve["fpr"], curve["tpr"], linewidth=1, label=cat)
            pr_ax.plot(curve["recall"], curve["precision"], linewidth=1, label=cat)
        roc_ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        roc_ax.set(title=f"{level} ROC", xlabel="false-positive rate", ylabel="true-positive rate",
                   xlim=(0, 1), ylim=(0, 1.01))
        pr_ax.set(title=f"{level} precision-recall", xlabel="recall", ylabel="precision",
                  xlim=(0, 1), ylim=(0, 1.01))
        if len(curves[level]) <= legend_limit:
            pr_ax.legend(fontsize="small", loc="lower left")
    return _save(fig, Path(path))


def plot_worst_cases(cases: Sequence[Case], path: str | Path) -> Path:
    """A row per case: the image, the anomaly map over it, the ground truth.

    All overlays share one colour scale (the range of the shown maps), so they can be compared.
    """
    if not cases:
        raise ValueError("no worst cases to plot")
    low = min(float(np.min(case.anomaly_map)) for case in cases)
    high = max(float(np.max(case.anomaly_map)) for case in cases)
    fig = Figure(figsize=(9, 3 * len(cases)), layout="constrained")
    axes = fig.subplots(len(cases), 3, squeeze=False)
    for (image_ax, overlay_ax, truth_ax), case in zip(axes, cases, strict=True):
        h, w = case.image.shape[:2]
        extent = (0, w, h, 0)
        grey = "gray" if case.image.ndim == 2 else None
        kind = "anomalous" if case.label else "normal"
        image_ax.imshow(case.image, cmap=grey, extent=extent)
        caption = f"{case.category} {case.sample_id}\n{kind}, score {case.score:.4g}"
        image_ax.set_title(caption, fontsize="small")
        overlay_ax.imshow(case.image, cmap=grey, extent=extent)
        overlay_ax.imshow(case.anomaly_map, cmap="jet", alpha=0.5, vmin=low, vmax=high, extent=extent)
        overlay_ax.set_title("anomaly map", fontsize="small")
        truth = np.zeros((h, w)) if case.mask is None else np.asarray(case.mask) > 0
        truth_ax.imshow(truth, cmap="gray", vmin=0, vmax=1, extent=extent)
        truth_ax.set_title("ground truth" if case.mask is not None else "ground truth (empty)",
                           fontsize="small")
        for ax in (image_ax, overlay_ax, truth_ax):
            ax.set_axis_off()
    fig.suptitle("Worst cases: highest-scored normals, lowest-scored anomalies")
    return _save(fig, Path(path))


def write_report(doc: dict, out_dir: str | Path, *, curves: dict | None = None,
                 worst_cases: Sequence[Case] | None = None, title: str = "Evaluation") -> dict[str, Path]:
    """Write metrics.json, metrics.md and the figures into ``out_dir``; returns name -> path.

    ``curves``: as from ``StreamingMetrics.curves()``; ``worst_cases``: :class:`Case` objects,
    e.g. for the indices from :func:`select_worst_cases`. Their figures are skipped when absent.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {AUROC_BARS_PNG: plot_auroc_by_category(doc, out / AUROC_BARS_PNG)}
    if curves and any(curves.values()):
        written[CURVES_PNG] = plot_curves(curves, out / CURVES_PNG)
    if worst_cases:
        written[WORST_CASES_PNG] = plot_worst_cases(worst_cases, out / WORST_CASES_PNG)
    with atomic_path(out / METRICS_MD) as tmp:
        tmp.write_text(markdown_report(doc, title=title))
    written[METRICS_MD] = out / METRICS_MD
    # Last, each file whole: a metrics.json of this evaluation means its report is complete.
    written[METRICS_JSON] = write_json_atomic(out / METRICS_JSON, doc)
    return written


# ----------------------------------------------------------------------------- MLflow


def mlflow_metrics(doc: dict) -> dict[str, float]:
    """Flat MLflow metric names: ``mean/<metric>``, ``<metric>/<category>``, ``num_images``, and
    ``mean/image_f1_at_threshold`` (and precision, recall) when the document has decisions.

    Undefined (``None``) metrics are left out. A category becomes one path component: characters
    MLflow refuses, and ``/``, become ``_``, and a name of dots only becomes ``_``.
    """
    flat = {"num_images": float(doc["num_images"])}
    flat.update({f"mean/{key}": float(value) for key, value in doc["mean"].items() if value is not None})
    decisions = doc.get("at_threshold") or {"mean": {}}
    flat.update({f"mean/{key}_at_threshold": float(value) for key, value in decisions["mean"].items()
                 if value is not None})
    for cat, row in doc["per_category"].items():
        safe = _MLFLOW_UNSAFE.sub("_", cat)
        safe = "_" if set(safe) <= {"."} else safe
        for key, value in row.items():
            if value is None:
                continue
            name = f"{key}/{safe}"
            if name in flat:
                raise ValueError(f"categories {cat!r} and another one both map to the MLflow metric {name!r}")
            flat[name] = float(value)
    return flat


def log_to_mlflow(doc: dict, report_dir: str | Path | None = None, *, artifact_path: str = "evaluation",
                  step: int | None = None) -> None:
    """Log the document's metrics, and every file in ``report_dir`` as artifacts, to the active run."""
    import mlflow  # imported here: the metrics and report code itself needs no MLflow

    if mlflow.active_run() is None:
        raise RuntimeError("no active MLflow run: call inside `with mlflow.start_run():`")
    if doc.get("protocol"):
        mlflow.set_tag("anomdiff.protocol", doc["protocol"])
    items = list(mlflow_metrics(doc).items())
    for start in range(0, len(items), _MLFLOW_BATCH):
        mlflow.log_metrics(dict(items[start:start + _MLFLOW_BATCH]), step=step)
    if report_dir is not None:  # every file but hidden ones (the folder's job lock) and saved maps (bulk data)
        root = Path(report_dir)
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
                           and p.relative_to(root).parts[0] != "maps"):
            folder = path.parent.relative_to(root).as_posix()
            mlflow.log_artifact(str(path), artifact_path if folder == "." else f"{artifact_path}/{folder}")
