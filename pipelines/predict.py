"""Score image files with a model: a CSV of scores and decisions, and an overlay per image.

    anomdiff predict models:/anomdiff-realiad@champion photos/ --out predictions/
    anomdiff predict .anomdiff/demo/run/model a.png b.jpg --out out/ --category bottle

MODEL is ``models:/NAME@alias``, ``models:/NAME/VERSION``, ``runs:/RUN_ID/model`` or an exported
model folder; IMAGES are files or folders (searched recursively): PNG, JPEG, BMP, TIFF or WebP of any
size and mode (resized to the model's input; grayscale, RGBA and 16-bit converted). ``--out`` gets
``predictions.csv`` (path, category, score, decision at the exported threshold, error) and
``overlays/`` (image | heatmap | the region at or above the threshold outlined). A file that cannot
be read gets a row with its error, and the rest go on. No Ray: one process, batches of
``--batch-size``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from anomdiff.atomic import write_csv_atomic
from anomdiff.data.images import load_rgb
from anomdiff.inference import ImageScorer, Prediction, find_images
from anomdiff.lock import hold_folder
from pipelines import registry
from pipelines.cli import bounded

COLUMNS = ("path", "category", "score", "decision", "error")


def overlay_name(index: int, path: Path) -> str:
    """``00012_name.png``: ordered like the CSV, and two files of one name in two folders stay apart."""
    return f"{index:05d}_{path.stem}.png"


def predict(model: str, images: list[str], out: Path, category: str | None = None, batch_size: int = 16,
            overlays: bool = True, tracking_uri: str | None = None, progress: bool = True,
            device: str = "auto") -> list[dict]:
    """Score every image found under ``images`` on ``device`` (``auto``: a GPU when there is one);
    writes ``out/predictions.csv`` and the overlays and returns the rows. One prediction at a time
    writes into ``out`` (``anomdiff.lock``)."""
    paths = find_images(images)  # no images: refused before the folder is made
    with hold_folder(out):
        return _predict(model, paths, Path(out), category, batch_size, overlays, tracking_uri, progress, device)


def _predict(model: str, paths: list[Path], out: Path, category: str | None, batch_size: int, overlays: bool,
             tracking_uri: str | None, progress: bool, device: str) -> list[dict]:
    import torch

    device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    with registry.local_folder(model, tracking_uri) as folder:  # a download is gone once loaded
        scorer = ImageScorer(folder, device=device)
    scorer.check_category(category)  # a category the model does not know stops here, before any image
    out.mkdir(parents=True, exist_ok=True)
    if overlays:
        (out / "overlays").mkdir(exist_ok=True)
    rows: list[dict] = []
    start = time.perf_counter()
    with tqdm(total=len(paths), unit="image", disable=not progress, file=sys.stderr) as bar:
        for offset in range(0, len(paths), batch_size):
            batch = paths[offset:offset + batch_size]
            loaded = [_load(path) for path in batch]
            scored = iter(scorer.score([im for im in loaded if isinstance(im, np.ndarray)], category)
                          if any(isinstance(im, np.ndarray) for im in loaded) else ())
            for index, (path, image) in enumerate(zip(batch, loaded, strict=True), start=offset):
                result = next(scored) if isinstance(image, np.ndarray) else image
                rows.append(_row(path, category, result))
                if overlays and isinstance(result, Prediction):
                    Image.fromarray(scorer.overlay(image, result)).save(out / "overlays" / overlay_name(index, path))
            bar.update(len(batch))
    write_csv_atomic(out / "predictions.csv", rows, list(COLUMNS))
    scored = sum(1 for row in rows if not row["error"])
    threshold = "none" if scorer.threshold is None else f"{scorer.threshold:.4g}"
    print(f"scored {scored} of {len(rows)} images in {time.perf_counter() - start:.1f} s "
          f"({sum(1 for row in rows if row['decision'] == 'true')} anomalous at threshold {threshold}); "
          f"{out / 'predictions.csv'}")
    return rows


def _load(path: Path) -> np.ndarray | ValueError:
    """The file as H x W x 3 uint8, or the error that names it (unreadable, truncated, too large)."""
    try:
        return np.asarray(load_rgb(path))
    except ValueError as exc:  # BadSampleError
        return exc


def _row(path: Path, category: str | None, result: Prediction | Exception) -> dict:
    if isinstance(result, Exception):
        return {"path": str(path), "category": category or "", "score": "", "decision": "", "error": str(result)}
    return {"path": str(path), "category": category or "", "score": f"{result.score:.6g}",
            "decision": "true" if result.decision else "false", "error": ""}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="anomdiff predict", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a folder")
    parser.add_argument("images", nargs="+", help="image files or folders")
    parser.add_argument("--out", required=True, type=Path, help="folder for predictions.csv and overlays/")
    parser.add_argument("--category", help="the images' category (needed only by category-aware models)")
    parser.add_argument("--batch-size", type=bounded(int, 1, 4096), default=16)
    parser.add_argument("--no-overlays", action="store_true", help="write the CSV only")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the model scores (auto: a GPU when there is one)")
    parser.add_argument("--tracking-uri", help="the MLflow store for models:/ and runs:/ (default: "
                                               "MLFLOW_TRACKING_URI, else SQLite under ANOMDIFF_HOME)")
    args = parser.parse_intermixed_args(argv)
    predict(args.model, args.images, args.out, args.category, args.batch_size, not args.no_overlays,
            args.tracking_uri, device=args.device)


if __name__ == "__main__":
    main()
