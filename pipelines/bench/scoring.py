"""Section 4, ``scoring``: decode -> score -> streaming metrics with the tiny preset at 10 DDIM steps,
guidance off against DiAD's doubled guidance."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipelines.bench.measure import experiment, ratio, seeded_model, torch_threads
from pipelines.bench.sizes import SCALING_CATEGORIES, SCORING_DDIM_STEPS, Sizes


def scoring_section(paths: dict[int, Path], sizes: Sizes, workdir: Path) -> dict:
    """Section 4: decode -> ``pipelines.evaluate.Scorer`` -> streaming metrics, guidance off and on, at
    the one torch thread Ray gives a scoring actor (``pipelines.evaluate`` asks 0.5 CPU for each)."""
    import pyarrow as pa

    from anomdiff.data.manifest import read_manifest, shard_paths
    from anomdiff.data.schema import read_shard
    from anomdiff.data.transforms import COLUMNS, DecodeBatch
    from anomdiff.metrics import StreamingMetrics
    from pipelines.evaluate import Scorer

    path = paths[SCALING_CATEGORIES[0]]
    manifest = read_manifest(path)
    categories = sorted(manifest["counts"])
    cfg = experiment("tiny", f"model.diffusion.ddim_steps={SCORING_DDIM_STEPS}")
    model_dir = workdir / "scoring-model"
    seeded_model(cfg, len(categories)).save(model_dir, metadata={"categories": categories})
    rows = pa.concat_tables([read_shard(p, columns=list(COLUMNS)) for p in shard_paths(path, manifest, "test")])
    rows = rows.slice(0, sizes.scoring_images + sizes.scoring_batch)  # the first batch warms up
    decode = DecodeBatch(cfg.model.image_size, categories)
    result = {}
    for label, guidance in (("off", False), ("on", True)):
        scorer = Scorer(str(model_dir), {"diffusion": {"guidance": guidance}}, use_gpu=False)
        accumulator = StreamingMetrics(score_range=(0.0, 3.0))
        start, images = None, 0
        with torch_threads(1):
            for offset in range(0, rows.num_rows, sizes.scoring_batch):
                out = scorer(decode(rows.slice(offset, sizes.scoring_batch)))
                names = np.array([categories[i] for i in out["category_index"]])
                accumulator.update(names, out["image_score"], out["label"], out["anomaly_map"], out["mask"])
                if start is None:
                    start = time.perf_counter()
                else:
                    images += len(names)
        result[label] = images / (time.perf_counter() - start)
        print(f"[bench] scoring, guidance {label}: {result[label]:.1f} images/s", flush=True)
    return {"images_per_s": result["off"], "guidance_images_per_s": result["on"],
            "ratio_vs_guidance": ratio(result["off"], result["on"]), "images": sizes.scoring_images,
            "batch_size": sizes.scoring_batch, "preset": "tiny", "image_size": cfg.model.image_size, "threads": 1,
            "ddim_steps": cfg.model.diffusion.ddim_steps, "guidance_scale": cfg.model.diffusion.guidance_scale}
