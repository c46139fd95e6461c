"""Section 6, ``category_scaling``: ingest and Ray Data-fed training steps at 10, 40 and 160
categories, and what each method's parameters and step cost do with the number of categories."""

from __future__ import annotations

from pathlib import Path

from pipelines.bench.ingest import ingest_pair
from pipelines.bench.measure import experiment, ratio, seeded_model
from pipelines.bench.sizes import SCALING_CATEGORIES, Sizes
from pipelines.bench.training import decoded_batch, plain_step_time


def scaling_section(paths: dict[int, Path], sizes: Sizes, image_size: int, ingest: dict, train: dict) -> dict:
    """Section 6: ingest at 40 and 160 categories next to section 1's 10, the streamed training
    steps and what each method's parameters and step cost do with the number of categories."""
    scaling = {str(SCALING_CATEGORIES[0]): ingest}
    for n in SCALING_CATEGORIES[1:]:
        scaling[str(n)] = ingest_pair(paths[n], image_size, sizes.ingest_batch, sizes.repeats)
    first, last = str(SCALING_CATEGORIES[0]), str(SCALING_CATEGORIES[-1])
    return {
        "categories": list(SCALING_CATEGORIES), "images": {n: s["images"] for n, s in scaling.items()},
        "ingest_images_per_s": {n: s["images_per_s"] for n, s in scaling.items()},
        "baseline_images_per_s": {n: s["baseline_images_per_s"] for n, s in scaling.items()},
        "first_batch_s": {n: s["first_batch_s"] for n, s in scaling.items()},
        "operators": {n: s["operators"] for n, s in scaling.items()},
        "ingest_ratio_160_over_10": ratio(scaling[last]["images_per_s"], scaling[first]["images_per_s"]),
        "baseline_ratio_160_over_10": ratio(scaling[last]["baseline_images_per_s"],
                                            scaling[first]["baseline_images_per_s"]),
        **train,
        "train_ratio_160_over_10": ratio(train["train_step_s"][last], train["train_step_s"][first]),
        "per_method": category_cost(decoded_batch(str(paths[SCALING_CATEGORIES[0]]), image_size, sizes.train_batch,
                                                  SCALING_CATEGORIES[0]), sizes, train["train_threads"]),
    }


def category_cost(batch: dict, sizes: Sizes, threads: int, counts=SCALING_CATEGORIES) -> dict:
    """What grows with the number of categories, per method trained by gradient (tiny preset, the
    default label-free protocol): parameters per category (category tokens, which only the
    category-aware option has) and their training bytes (fp32 weight, gradient, two Adam moments: 16
    bytes each); what a method adds over DiAD whatever the count (DPDiff-AD's prototype banks are
    shared by all categories): parameters and the plain loop's step time at the most categories."""
    from anomdiff.models import METHODS, model_class

    low, high = counts[0], counts[-1]
    out = {}
    for method in sorted(m for m in METHODS if getattr(model_class(m), "trained_by_gradient", True)):
        cfg = experiment("tiny", f"model.method={method}", f"train.batch_size={sizes.train_batch}",
                         "train.schedule=constant")
        totals = {n: sum(p.numel() for p in seeded_model(cfg, n).parameters()) for n in (low, high)}
        per_category = (totals[high] - totals[low]) / (high - low)
        out[method] = {"parameters_per_category": per_category, "training_bytes_per_category": 16 * per_category,
                       f"parameters_at_{high}": totals[high],
                       f"plain_step_s_at_{high}": plain_step_time(cfg, batch, high, sizes.scaling_steps,
                                                                 min(sizes.warmup_steps, sizes.scaling_steps - 2),
                                                                 threads)}
    if "diad" in out:
        for row in out.values():
            row["parameters_over_diad"] = row[f"parameters_at_{high}"] - out["diad"][f"parameters_at_{high}"]
            row["step_ratio_over_diad"] = ratio(row[f"plain_step_s_at_{high}"], out["diad"][f"plain_step_s_at_{high}"])
    return out
