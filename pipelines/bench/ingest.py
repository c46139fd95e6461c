"""Section 1, ingest: Ray Data's streaming read + decode + resize against a single-process pyarrow +
Pillow loop over the same shards, at the tiny preset's 64 px and at 256 px (shards stored at 256),
each also with Ray Data limited to 1, 2, 4... CPUs (a figure of images/s against decode CPUs); and
the synthetic shards every data section reads."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pipelines.bench.measure import parse_operator_stats, ratio
from pipelines.bench.sizes import SCALING_CATEGORIES, TARGETS, Sizes

LARGE_SIZE = 256  # the second image size, stored and decoded at that size


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


def make_large_dataset(root: Path, sizes: Sizes, seed: int = 0) -> Path:
    """Synthetic shards stored at :data:`LARGE_SIZE` pixels, ``sizes.large_ingest_images`` training images
    over the first scaling count of categories."""
    from anomdiff.data.synthetic import synthesize

    n = SCALING_CATEGORIES[0]
    path = root / f"synthetic-{n}-{LARGE_SIZE}px"
    synthesize(path, n, seed=seed, image_size=LARGE_SIZE, train_per_category=max(1, sizes.large_ingest_images // n),
               test_per_category=1)
    return path


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


def ray_ingest(path: Path, image_size: int, batch_size: int, cpus: int | None = None) -> dict:
    """One pass of ``pipelines.data.train_dataset`` (Ray Data streaming read, hold-out, decode,
    resize) consumed by the driver; with the time to the first batch and ``ds.stats()`` per operator.
    With ``cpus``, Ray Data may use that many CPUs (its resource limit) and each decode task takes a
    whole one: ``cpus`` processes decode at once."""
    import ray.data

    from anomdiff.config import DataConfig
    from pipelines.data import DataSpec, train_dataset

    config = DataConfig(path=str(path)) if cpus is None else DataConfig(path=str(path), decode_cpus=1.0)
    options = ray.data.DataContext.get_current().execution_options
    limits = options.resource_limits
    if cpus is not None:
        options.resource_limits = ray.data.ExecutionResources(cpu=cpus)
    try:
        dataset = train_dataset(DataSpec.open(config, image_size, batch_size))
        start, first, images = time.perf_counter(), None, 0
        for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
            first = first or time.perf_counter()
            images += len(batch["image"])
        seconds = time.perf_counter() - start
    finally:
        options.resource_limits = limits
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds,
            "first_batch_s": (first or start) - start, "operators": parse_operator_stats(dataset.stats())}


def ingest_pair(path: Path, image_size: int, batch_size: int, repeats: int, cpu_limits: tuple[int, ...] = ()) -> dict:
    """Ray Data and the single-process loop over the same shards, alternated ``repeats`` times, each
    round also Ray Data limited to each of ``cpu_limits`` CPUs; best of each."""
    rays, bases, limited = [], [], {c: [] for c in cpu_limits}
    for _ in range(repeats):
        rays.append(ray_ingest(path, image_size, batch_size))
        bases.append(baseline_ingest(path, image_size, batch_size))
        for c in cpu_limits:
            limited[c].append(ray_ingest(path, image_size, batch_size, cpus=c)["images_per_s"])
    best_ray = max(rays, key=lambda r: r["images_per_s"])
    best_base = max(bases, key=lambda r: r["images_per_s"])
    if best_ray["images"] != best_base["images"]:
        raise RuntimeError(f"{path}: Ray Data gave {best_ray['images']} images, the plain loop {best_base['images']}")
    return {"images": best_ray["images"], "images_per_s": best_ray["images_per_s"],
            "baseline_images_per_s": best_base["images_per_s"], "first_batch_s": best_ray["first_batch_s"],
            "operators": best_ray["operators"], "runs_images_per_s": [r["images_per_s"] for r in rays],
            "baseline_runs_images_per_s": [b["images_per_s"] for b in bases],
            **({"images_per_s_by_cpus": {str(c): max(v) for c, v in limited.items()}} if cpu_limits else {})}


def cpu_steps(cpus: float) -> list[int]:
    """1, 2, 4... up to ``cpus``, and ``cpus`` itself (whole CPUs)."""
    steps = [2**k for k in range(int(cpus).bit_length()) if 2**k <= cpus]
    return steps + ([int(cpus)] if int(cpus) not in steps and cpus >= 1 else [])


def _size_row(pair: dict, cpus: float, target: float) -> dict:
    curve = pair["images_per_s_by_cpus"]
    per_cpu = {c: ratio(ratio(v, pair["baseline_images_per_s"]), int(c)) for c, v in curve.items()}
    return {"images": pair["images"], "images_per_s": pair["images_per_s"],
            "baseline_images_per_s": pair["baseline_images_per_s"],
            "ratio_per_cpu": ratio(ratio(pair["images_per_s"], pair["baseline_images_per_s"]), cpus),
            "images_per_s_by_cpus": curve, "ratio_per_cpu_by_cpus": per_cpu, "target_per_cpu": target}


def ingest_figure(by_size: dict, out: Path) -> Path:
    """Ray Data images/s against the CPUs it may use, one panel per image size, with the single
    process and the issue's per-CPU target as reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(by_size), figsize=(5 * len(by_size), 4), squeeze=False)
    for ax, (size, row) in zip(axes[0], by_size.items(), strict=True):
        cpus = [int(c) for c in row["images_per_s_by_cpus"]]
        base = row["baseline_images_per_s"]
        ax.plot(cpus, list(row["images_per_s_by_cpus"].values()), "o-", label="Ray Data")
        ax.axhline(base, color="grey", linestyle="--", label="single process (1 CPU)")
        ax.plot(cpus, [row["target_per_cpu"] * base * c for c in cpus], ":", color="green",
                label=f"target: {row['target_per_cpu']:g} x single process per CPU")
        ax.set(title=f"{size} px", xlabel="CPUs Ray Data may use", ylabel="images/s", xticks=cpus, ylim=(0, None))
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def ingest_section(paths: dict[int, Path], sizes: Sizes, image_size: int, warm_up: bool = True,
                   large: Path | None = None, figure: Path | None = None) -> dict:
    """Section 1 on the 10-category shards (after an unmeasured pass with ``warm_up``), then by image
    size: ``image_size`` on those shards and :data:`LARGE_SIZE` on ``large``, each with its curve
    over decode CPUs (drawn to ``figure`` when given)."""
    import ray

    if warm_up:
        ray_ingest(paths[SCALING_CATEGORIES[0]], image_size, sizes.ingest_batch)
    cpus = float(ray.cluster_resources().get("CPU", 0))
    steps = tuple(cpu_steps(cpus))
    result = ingest_pair(paths[SCALING_CATEGORIES[0]], image_size, sizes.ingest_batch, sizes.repeats, steps)
    result["ratio"] = ratio(result["images_per_s"], result["baseline_images_per_s"])
    result.update(cpus=cpus, ratio_per_cpu=ratio(result["ratio"], cpus))
    by_size = {str(image_size): _size_row(result, cpus, TARGETS["ingest_per_cpu_64_min"])}
    if large is not None:
        pair = ingest_pair(large, LARGE_SIZE, sizes.ingest_batch, sizes.repeats, steps)
        by_size[str(LARGE_SIZE)] = _size_row(pair, cpus, TARGETS["ingest_per_cpu_256_min"])
    result["by_size"] = by_size
    result["figure"] = str(ingest_figure(by_size, figure)) if figure else None
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]  # what else ran beside it
    return result
