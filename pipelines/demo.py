"""The demo: the main job end to end on the embedded synthetic dataset, on this machine.

    anomdiff demo                       # = make demo
    python -m pipelines.demo --categories 6 train.steps=400

Synthesizes a multi-category dataset, trains a tiny DiAD with Ray Train + DeepSpeed (the
``conf/experiment/demo.yaml`` experiment), evaluates it on the test split, and prints the
per-category table. Everything goes under ``$ANOMDIFF_HOME/demo`` (default ``./.anomdiff/demo``);
running it again resumes or reuses the finished run.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from anomdiff.atomic import write_json_atomic
from anomdiff.config import CONF_DIR, load_config
from anomdiff.data.manifest import format_table, read_manifest, summary, verify
from anomdiff.data.schema import manifest_path
from anomdiff.data.synthetic import synthesize
from pipelines import evaluate, runtime, tracking, train


def _synthesized_with(data: Path) -> dict | None:
    """The generator settings of an existing demo dataset, so a rerun reuses it."""
    if manifest_path(data) is None:
        return None
    manifest = read_manifest(data)
    counts = manifest["counts"].values()
    return {"seed": manifest.get("seed"), "image_size": manifest["image_size"], "categories": len(manifest["counts"]),
            "train_per_category": max(c["train"]["normal"] for c in counts)}


def demo_folder() -> Path:
    """Where the demo writes everything: ``$ANOMDIFF_HOME/demo``."""
    return tracking.anomdiff_home() / "demo"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="anomdiff demo", description=__doc__.splitlines()[0])
    parser.add_argument("--categories", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-category", type=int, default=40)
    parser.add_argument("overrides", nargs="*", help="training config overrides, e.g. train.steps=400")
    runtime.add_address_argument(parser)
    args = parser.parse_intermixed_args(argv)
    start = time.perf_counter()

    home = demo_folder()
    data = home / "data"
    print(f"[1/3] synthesizing {args.categories} categories into {data}", flush=True)
    wanted = {"seed": args.seed, "image_size": args.image_size, "categories": args.categories,
              "train_per_category": args.train_per_category}
    if _synthesized_with(data) != wanted:
        if (home / "run").exists():  # trained on the previous dataset: resuming it would mix the two
            print(f"the dataset settings changed: removing the previous demo run {home / 'run'}", flush=True)
            shutil.rmtree(home / "run")
        synthesize(data, args.categories, seed=args.seed, image_size=args.image_size,
                   train_per_category=args.train_per_category, overwrite=True)
    manifest = read_manifest(data)
    problems = verify(data, manifest)
    if problems:
        raise SystemExit("\n".join(problems))
    print(format_table(summary(manifest)), flush=True)

    cfg = load_config(CONF_DIR / "experiment" / "demo.yaml",
                      [f"data.path={data}", f"output_dir={home / 'run'}", *args.overrides])
    print(f"[2/3] training {cfg.model.method} ({cfg.train.steps} steps, {cfg.train.num_workers} worker(s), "
          f"ZeRO-{cfg.train.zero.stage})", flush=True)
    train.run(cfg, args.address)

    print("[3/3] evaluating on the test split", flush=True)
    doc = evaluate.evaluate(str(home / "run" / "model"), str(data), str(home / "report"),
                            [f"tracking.experiment={cfg.tracking.experiment}"], args.address)
    write_json_atomic(home / "metrics.json", doc)
    mean = doc["mean"]
    print(f"\nmean image AUROC {mean['image_auroc']:.3f}, pixel AUROC {mean['pixel_auroc']:.3f}, "
          f"AUPRO {mean['aupro']:.3f} over {len(doc['per_category'])} categories, {doc['protocol']} protocol "
          f"({time.perf_counter() - start:.0f} s)")
    print(f"metrics: {home / 'metrics.json'}\nreport and figures: {home / 'report'}")
    print(f"MLflow UI: mlflow ui --backend-store-uri {tracking.tracking_uri(cfg.tracking.tracking_uri)}")


if __name__ == "__main__":
    main()
