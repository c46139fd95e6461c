"""Ray Data datasets over a converted dataset's shards.

The manifest names every shard with its category and split, so choosing categories and a split is
choosing files (the partition filter) before Ray reads anything; only the needed columns are read,
and decoding + resizing + normalising runs in ``map_batches`` tasks that stream into the trainer.
On a small machine keep ``num_cpus`` per decode task fractional (``data.decode_cpus``): with two
cores, whole-CPU tasks starve the training workers or are starved by them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ray
import ray.data
import ray.train

from anomdiff.config import DataConfig
from anomdiff.data.manifest import read_manifest, shard_paths
from anomdiff.data.splits import nested_subset, validation_per_category
from anomdiff.data.transforms import COLUMNS, DecodeBatch, RepeatByCategory, SelectHoldout, SelectIds


@dataclass(frozen=True, eq=False)
class DataSpec:
    """What a job reads: its ``data`` config section, the model's image size, the batch size, and
    the dataset's manifest, read once (:meth:`open`) for everything the job plans from it."""

    config: DataConfig
    image_size: int
    batch_size: int
    manifest: dict
    categories: list[str]  # the chosen categories: the nested seeded subset of ``num_categories``

    @classmethod
    def open(cls, config: DataConfig, image_size: int, batch_size: int = 32) -> DataSpec:
        manifest = read_manifest(config.path)
        categories = nested_subset(list(manifest["counts"]), config.num_categories, config.category_seed)
        return cls(config, image_size, batch_size, manifest, categories)

    @property
    def path(self) -> str:
        return self.config.path

    def train_counts(self) -> dict[str, int]:
        """Training normals per chosen category (before the validation hold-out)."""
        counts = self.manifest["counts"]
        return {c: counts[c]["train"]["normal"] for c in self.categories}

    def decoded_train_bytes(self) -> int:
        """An upper bound of the decoded training rows' size (uint8 images), before the validation
        hold-out and after category balancing: what ``cache`` keeps in the object store."""
        counts = self.train_counts()
        repeats = balancing_repeats(counts) if self.config.balanced else dict.fromkeys(counts, 1)
        return sum(n * repeats[c] for c, n in counts.items()) * 3 * self.image_size**2


def balancing_repeats(counts: dict[str, int]) -> dict[str, int]:
    """How often each category's rows repeat under ``balanced``: the largest count over its own, rounded."""
    return {c: round(max(counts.values()) / n) for c, n in counts.items()}


def read_rows(spec: DataSpec, split: str, categories: list[str] | None = None) -> ray.data.Dataset:
    """Raw rows of ``split`` for ``categories``: file-level partition filter plus column pruning."""
    paths = shard_paths(spec.path, spec.manifest, split, categories or spec.categories)
    if not paths:
        raise ValueError(f"{spec.path}: no {split} shards for the chosen categories")
    # Ray Data's V2 Parquet reader lists the files and reads every footer in one task before the
    # first row (11 s for 160 category files here, `anomdiff bench`); the V1 reader plans read tasks
    # straight from the paths (0.8 s). The manifest already gives exact files and sizes.
    context = ray.data.DataContext.get_current()
    use_v2, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        # Columns pruned in the read itself (a select_columns after it is an operator of its own).
        return ray.data.read_parquet(paths, columns=list(COLUMNS))
    finally:
        context.use_datasource_v2 = use_v2


def _decoded(rows: ray.data.Dataset, spec: DataSpec, categories: list[str], training: bool = False) -> ray.data.Dataset:
    return rows.map_batches(DecodeBatch(spec.image_size, categories, training), batch_size=spec.batch_size,
                            num_cpus=spec.config.decode_cpus, batch_format="pyarrow")


def training_normals(spec: DataSpec, validation: bool, training: bool = False) -> ray.data.Dataset:
    """Decoded training-split rows: the validation hold-out (``validation=True``) or the rest."""
    select = SelectHoldout(spec.config.validation_fraction, spec.config.validation_seed, validation)
    # The decode's batch size and CPUs, so that Ray Data fuses the selection into the decoding task.
    rows = read_rows(spec, "train").map_batches(select, batch_format="pyarrow", batch_size=spec.batch_size,
                                                num_cpus=spec.config.decode_cpus)
    return _decoded(rows, spec, spec.categories, training)


def train_dataset(spec: DataSpec) -> ray.data.Dataset:
    """Training normals minus the seeded validation hold-out: uint8 ``image`` (normalise with
    ``anomdiff.data.transforms.unit_range`` on the device) and ``category_index``, the columns a
    training step reads (all normal: no mask or label). With ``balanced``, each category's rows
    repeat so that every category contributes about as many samples per epoch as the largest.
    With ``cache``, the decoded rows are computed once and held in the object store."""
    data = training_normals(spec, validation=False, training=True)
    if spec.config.balanced:
        repeat = RepeatByCategory(balancing_repeats(spec.train_counts()), spec.categories)
        data = data.map_batches(repeat, batch_format="numpy", num_cpus=spec.config.decode_cpus)
    return data.materialize() if spec.config.cache else data


def validation_ids(spec: DataSpec, limit: int | None = None) -> dict[str, list[str]]:
    """The validation normals of each category (read from the shards' ``sample_id`` column here, on
    the driver): the held-out ones, ``ceil(limit / categories)`` per category at most (at least one
    each, so every category is represented; all of them without ``limit``)."""
    import pyarrow.parquet as pq

    per_category = None if limit is None else max(1, math.ceil(limit / len(spec.categories)))
    ids = {c: [s for path in shard_paths(spec.path, spec.manifest, "train", [c])
               for s in pq.read_table(path, columns=["sample_id"]).column("sample_id").to_pylist()]
           for c in spec.categories}
    chosen = validation_per_category(ids, spec.config.validation_fraction, spec.config.validation_seed, per_category)
    empty = [c for c, picked in chosen.items() if not picked]
    if empty:
        raise ValueError(f"{spec.path}: category {empty[0]} has no validation normal at data.validation_fraction="
                         f"{spec.config.validation_fraction}; raise it or give the category more training images")
    return chosen


def validation_dataset(spec: DataSpec, limit: int | None = None,
                       chosen: dict[str, list[str]] | None = None) -> ray.data.Dataset:
    """The validation normals of :func:`validation_ids` (or the ``chosen`` ids it returned), decoded,
    as tensors only: model selection and thresholds use these, never test. The same images at every
    checkpoint, every category in them."""
    chosen = chosen if chosen is not None else validation_ids(spec, limit)
    keep = SelectIds(frozenset(s for ids in chosen.values() for s in ids))
    rows = read_rows(spec, "train").map_batches(keep, batch_format="pyarrow", batch_size=spec.batch_size,
                                                num_cpus=spec.config.decode_cpus)
    return _decoded(rows, spec, spec.categories).drop_columns(["sample_id"])


def test_dataset(spec: DataSpec, categories: list[str] | None = None,
                 subset: list[str] | None = None) -> ray.data.Dataset:
    """The decoded test split. ``categories`` fixes the category indices (a model's list; default
    the spec's); ``subset`` reads only those categories (default all of ``categories``)."""
    categories = categories or spec.categories
    return _decoded(read_rows(spec, "test", subset or categories), spec, categories)


class EveryRowDataConfig(ray.train.DataConfig):
    """Ray Train's data config, with ``datasets_to_split`` shards that keep every row. The default
    splits with ``equal=True``, dropping up to ``world_size - 1`` rows so that workers stepping in
    lockstep get the same number of batches; a memory bank, built in one pass without collective
    steps, wants every training image instead."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        split = set(datasets) if self._datasets_to_split == "all" else set(self._datasets_to_split)
        hints = worker_node_ids if self._enable_shard_locality else None
        for name, dataset in datasets.items():
            dataset = dataset.copy(dataset)
            dataset.context.execution_options = self._resolve_execution_options(name)
            if name in split:
                for rank, shard in enumerate(dataset.streaming_split(world_size, equal=False, locality_hints=hints)):
                    output[rank][name] = shard
            else:
                for rank in range(world_size):
                    output[rank][name] = dataset.iterator()
        return output
