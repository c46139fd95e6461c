"""The optional ``tune_inference`` section: the demo experiment trained once, then an inference-time
search of ``conf/tune/inference.yaml`` (50 trials) on its model; the search's time against the
training's, the best trial's validation metric against the default settings' (scored the same way,
on the same validation images), and afterwards, never used to choose, the test-split AUROCs of the
default and the tuned model."""

from __future__ import annotations

import time
from pathlib import Path

from anomdiff.config import CONF_DIR, load_config
from pipelines.bench.measure import ratio
from pipelines.bench.methods import make_dataset


def tune_section(work: Path, num_trials: int = 50, num_categories: int = 8) -> dict:
    from anomdiff.models import load_model
    from anomdiff.search import load_search
    from anomdiff.validation import validate
    from pipelines import evaluate, train, tune
    from pipelines.data import DataSpec, validation_dataset

    data = make_dataset("synthetic", work / "data", num_categories)
    tracking = "tracking.experiment=anomdiff-bench-tune"
    cfg = load_config(CONF_DIR / "experiment" / "demo.yaml", [f"data.path={data}", f"output_dir={work / 'run'}",
                                                               tracking])
    tick = time.perf_counter()
    train.run(cfg)
    train_s = time.perf_counter() - tick
    model_dir = work / "run" / "model"

    spec = load_search(CONF_DIR / "tune" / "inference.yaml", [f"model={model_dir}", f"output_dir={work / 'search'}",
                                                               f"num_trials={num_trials}", tracking])
    tick = time.perf_counter()
    best = tune.run(spec)
    search_s = time.perf_counter() - tick

    # The default settings scored exactly as a trial scores (same images, same pasted defects).
    model = load_model(model_dir)
    model.eval()
    data_spec = DataSpec.open(cfg.data, cfg.model.image_size, cfg.evaluate.batch_size)
    batches = validation_dataset(data_spec, limit=cfg.train.validation_images).iter_torch_batches(
        batch_size=cfg.evaluate.batch_size)
    defaults = validate(model, ({"image": b["image"], "category_index": b["category_index"]} for b in batches),
                        max_images=10**9)
    test = {}
    for label, folder in (("defaults", model_dir), ("tuned", work / "search" / "best_model")):
        doc = evaluate.evaluate(str(folder), str(data), str(work / "evaluation" / label), [tracking, "scorers=2"])
        test[label] = {k: doc["mean"][k] for k in ("image_auroc", "pixel_auroc", "aupro")}
    out = {
        "trials": num_trials, "train_s": train_s, "search_s": search_s,
        "search_over_training": ratio(search_s, train_s),
        "metric": spec.metric, "space": {k: [d.kind, d.args] for k, d in spec.space.items()},
        "validation": {"defaults": {**{k: defaults[k] for k in ("val_image_auroc", "val_pixel_auroc")},
                                    "metric": spec.score(defaults)},
                       "tuned": {k: best[k] for k in ("val_image_auroc", "val_pixel_auroc", "metric")}},
        "best_params": {k: best[k] for k in spec.space},
        "test": test,
    }
    print(f"[bench] tune: {num_trials} inference trials in {search_s:.0f} s against {train_s:.0f} s of training "
          f"(x{out['search_over_training']:.2f}); validation metric {out['validation']['defaults']['metric']:.3f} -> "
          f"{best['metric']:.3f}; test image AUROC {test['defaults']['image_auroc']:.3f} -> "
          f"{test['tuned']['image_auroc']:.3f}", flush=True)
    return out
