"""Section 1, ingest: Ray Data's streaming read + decode + resize against a single-process pyarrow +
Pillow loop over the same shards; and the synthetic shards every data section reads."""

from __future__ import annotations

import time
from pathlib import Path

from pipelines.bench.measure import parse_operator_stats, ratio
from pipelines.bench.sizes import SCALING_CATEGORIES, Sizes


def make_datasets(root: Path, sizes: Sizes, counts: tuple[int, ...] = SCALING_CATEGORIES,
                  seed: int = 0) -> dict[int, Path]:
    """Synthetic shards at each of ``counts`` categories with the same number of training images each."""
    from anomdiff.data.synthetic import synthesize

    paths = {}
    for n in counts:
        paths[n] = root / f"synthetic-{n}"
        synthesize(paths[n], n, seed=seed, image_size=sizes.stored_size,
                   train_per_category=max(1, sizes.train_images // n),
                   test_per_category=sizes.test_per_category if n == SCALING_CATEGORIES[0] else 2)
    return paths


def baseline_ingest(path: Path, image_size: int, batch_size: int, split: str = "train",
                    validation_fraction: float = 0.1) -> dict:
    """The single-process reference: pyarrow reads the same shard files, the same hold-out filter
    and ``DecodeBatch`` decode and resize them in batches."""
    from anomdiff.data.manifest import read_manifest, shard_paths
    from anomdiff.data.schema import read_shard
    from anomdiff.data.splits import nested_subset
    from anomdiff.data.transforms import COLUMNS, DecodeBatch, SelectHoldout

    manifest = read_manifest(path)
    categories = nested_subset(list(manifest["counts"]), None, 0)  # in the order of DataSpec.categories
    decode = DecodeBatch(image_size, categories, training=True)  # what the Ray path decodes for training
    select = SelectHoldout(validation_fraction, 0, validation=False)
    start, images = time.perf_counter(), 0
    for shard in shard_paths(path, manifest, split, categories):
        rows = read_shard(shard, columns=list(COLUMNS))
        if split == "train":
            rows = select(rows)
        for offset in range(0, rows.num_rows, batch_size):
            images += len(decode(rows.slice(offset, batch_size))["image"])
    seconds = time.perf_counter() - start
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}


def ray_ingest(path: Path, image_size: int, batch_size: int) -> dict:
    """One pass of ``pipelines.data.train_dataset`` (Ray Data streaming read, hold-out, decode,
    resize) consumed by the driver; with the time to the first batch and ``ds.stats()`` per operator."""
    from anomdiff.config import DataConfig
    from pipelines.data import DataSpec, train_dataset

    spec = DataSpec.open(DataConfig(path=str(path)), image_size, batch_size)
    dataset = train_dataset(spec)
    start, first, images = time.perf_counter(), None, 0
    for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
        first = first or time.perf_counter()
        images += len(batch["image"])
    seconds = time.perf_counter() - start
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds,
            "first_batch_s": (first or start) - start, "operators": parse_operator_stats(dataset.stats())}


def ingest_pair(path: Path, image_size: int, batch_size: int, repeats: int) -> dict:
    """Ray Data and the single-process loop over the same shards, alternated ``repeats`` times; best of each."""
    rays, bases = [], []
    for _ in range(repeats):
        rays.append(ray_ingest(path, image_size, batch_size))
        bases.append(baseline_ingest(path, image_size, batch_size))
    best_ray = max(rays, key=lambda r: r["images_per_s"])
    best_base = max(bases, key=lambda r: r["images_per_s"])
    if best_ray["images"] != best_base["images"]:
        raise RuntimeError(f"{path}: Ray Data gave {best_ray['images']} images, the plain loop {best_base['images']}")
    return {"images": best_ray["images"], "images_per_s": best_ray["images_per_s"],
            "baseline_images_per_s": best_base["images_per_s"], "first_batch_s": best_ray["first_batch_s"],
            "operators": best_ray["operators"], "runs_images_per_s": [r["images_per_s"] for r in rays],
            "baseline_runs_images_per_s": [b["images_per_s"] for b in bases]}


def ingest_section(paths: dict[int, Path], sizes: Sizes, image_size: int, warm_up: bool = True) -> dict:
    """Section 1 on the 10-category shards (after an unmeasured pass with ``warm_up``)."""
    import ray

    if warm_up:
        ray_ingest(paths[SCALING_CATEGORIES[0]], image_size, sizes.ingest_batch)
    result = ingest_pair(paths[SCALING_CATEGORIES[0]], image_size, sizes.ingest_batch, sizes.repeats)
    cpus = float(ray.cluster_resources().get("CPU", 0))
    result["ratio"] = ratio(result["images_per_s"], result["baseline_images_per_s"])
    result.update(cpus=cpus, ratio_per_cpu=ratio(result["ratio"], cpus))
    return result
