"""Export a model's scoring to ONNX (``knn`` and ``proad``; the diffusion methods do not export).

    anomdiff export .anomdiff/demo/run/model --out model.onnx
    anomdiff export models:/NAME@champion --out model.onnx --batch-size 8

The ONNX graph takes ``image`` (B x 3 x S x S, RGB in [-1, 1]) and returns ``anomaly_map`` and
``image_score``; the categories, threshold and score range are in its metadata
(``anomdiff.export``). No Ray.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from pipelines import registry

FORMATS = ("onnx",)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="anomdiff export", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="an exported model folder, models:/NAME@ALIAS, models:/NAME/VERSION or "
                                      "runs:/RUN_ID/model")
    parser.add_argument("--format", choices=FORMATS, default="onnx")
    parser.add_argument("--out", required=True, type=Path, help="the file to write")
    parser.add_argument("--batch-size", type=int, default=1, help="the graph's fixed batch size (default 1)")
    parser.add_argument("--tracking-uri", help="the MLflow store for models:/ and runs:/")
    args = parser.parse_intermixed_args(argv)
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"export needs {' and '.join(missing)}: pip install 'anomdiff[onnx]'")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    from anomdiff.export import export_onnx

    with registry.local_folder(args.model, args.tracking_uri) as folder:
        out = export_onnx(folder, args.out, batch_size=args.batch_size)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB); inputs: image, B={args.batch_size} x 3 x S x S in "
          "[-1, 1]; outputs: anomaly_map, image_score")


if __name__ == "__main__":
    main()
