"""The optional ``drdc_refinement`` section: DRDC trained once per dataset by the demo experiment with
only ``model.method`` changed, then evaluated on the same weights with the base map alone (gamma 0),
the refinement alone (gamma 1) and the two fused (the config's gamma), and on the synthetic dataset
with n_t and n_s varied (the paper's Figure 2); the fused chain's scoring images/s beside DiAD's,
both measured in this run on the same images."""

from __future__ import annotations

import time
from pathlib import Path

from anomdiff.config import load_config
from pipelines.bench.measure import ratio, seeded_model
from pipelines.bench.methods import DATASETS, make_dataset, scoring_images_per_s

GAMMA_ROWS = {"base_only": {"gamma": 0.0}, "refinement_only": {"gamma": 1.0}, "fused": {}}
SENSITIVITY = {"timesteps": (1, 2, 3), "mask_sets": (2, 4, 8)}  # n_t and n_s


def _overrides(drdc: dict) -> list[str]:
    return [f"model.drdc.{key}={value}" for key, value in drdc.items()]


def drdc_section(work: Path, datasets: tuple[str, ...] = DATASETS, num_categories: int = 8) -> dict:
    from anomdiff.config import CONF_DIR
    from anomdiff.models import load_model
    from pipelines import evaluate, train

    tracking = "tracking.experiment=anomdiff-bench-drdc"
    out: dict = {"experiment": "demo", "protocol": "label_free"}
    for name in datasets:
        data = make_dataset(name, work / "data", num_categories)
        run_dir = work / name
        cfg = load_config(CONF_DIR / "experiment" / "demo.yaml",
                          [f"data.path={data}", f"output_dir={run_dir}", "model.method=drdc", tracking])
        tick = time.perf_counter()
        train.run(cfg)
        rows: dict = {"train_s": time.perf_counter() - tick, "steps": cfg.train.steps,
                      "defaults": {k: getattr(cfg.model.drdc, k) for k in ("gamma", "timesteps", "start_timestep",
                                                                             "mask_sets", "filter_size")}}
        variants = dict(GAMMA_ROWS)
        if name == "synthetic":  # the config's own value is the fused row
            variants |= {f"{key}={value}": {key: value} for key, values in SENSITIVITY.items() for value in values
                         if value != getattr(cfg.model.drdc, key)}
        for label, drdc in variants.items():
            doc = evaluate.evaluate(str(run_dir / "model"), str(data), str(run_dir / "evaluation" / label),
                                    [tracking, "scorers=2", *_overrides(drdc)])
            rows[label] = {**{k: doc["mean"][k] for k in ("image_auroc", "pixel_auroc", "aupro")},
                           "scoring_images_per_s": scoring_images_per_s(run_dir / "model", data, overrides=drdc)}
            print(f"[bench] drdc {name} / {label}: image AUROC {doc['mean']['image_auroc']:.3f}, pixel AUROC "
                  f"{doc['mean']['pixel_auroc']:.3f}, AUPRO {doc['mean']['aupro']:.3f}", flush=True)
        if name == "synthetic":  # DiAD's scoring chain on the same images, the tiny preset's defaults
            categories = load_model(run_dir / "model").metadata["categories"]
            diad_dir = work / "diad-scoring-model"
            seeded_model(load_config(CONF_DIR / "experiment" / "demo.yaml", [f"data.path={data}"]),
                         len(categories)).save(diad_dir, metadata={"categories": categories})
            diad = scoring_images_per_s(diad_dir, data)
            rows["diad_scoring_images_per_s"] = diad
            rows["fused_scoring_ratio_over_diad"] = ratio(rows["fused"]["scoring_images_per_s"], diad)
        out[name] = {"categories": num_categories if name == "synthetic" else None, **rows}
    return out
