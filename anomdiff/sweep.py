"""Category-scaling sweep files (``conf/scale/*.yaml``): how many categories one model can carry.

A sweep file names the base experiment, the category counts K, the methods, the budget rule and
the seeds::

    experiment: conf/experiment/demo.yaml
    categories: [10, 20, 40, 80, 160]   # absent or null: these five, capped by the dataset
    methods: [knn, diad, proad]
    budget: per_category                # or total
    seeds: [0, 1, 2]                    # absent or null: the base experiment's seed alone
    output_dir: ${ANOMDIFF_HOME}/scale/demo     # under ANOMDIFF_HOME (default ./.anomdiff)

Each cell (K, method, seed) is the base experiment with ``model.method=<method>``,
``data.num_categories=K`` and ``seed=<seed>``: the first K categories of one seeded order
(``data.category_seed``, the same for every seed), so K=20 holds K=10's categories
(``anomdiff.data.splits.nested_subset``); it is evaluated on those K categories' test split.

The budget rule turns the base experiment's ``train.steps`` (with ``train.vae_steps`` and
``train.checkpoint_every``) into each cell's:

* ``per_category`` (the default): the base steps are the budget of the smallest K of the sweep, and
  a cell of K categories trains ``K / K_min`` times as many (K=160 trains 16 times K=10's steps).
  Every category then gets the same number of passes at every K, the condition under which the
  DPDiff-AD paper states that its accuracy holds as categories are added: a drop seen under it is
  the cost of sharing one model, not of seeing each category less often.
* ``total``: every cell trains the base steps: the same compute at every K, so each category gets
  ``1 / K`` of it (what a fixed training budget on a fixed machine buys).

Everything is checked before anything runs; each error is one line naming the key.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from anomdiff.config import ExperimentConfig, load_config

TOP_KEYS = ("experiment", "categories", "methods", "budget", "seeds", "output_dir")
DEFAULT_CATEGORIES = (10, 20, 40, 80, 160)
BUDGETS = ("per_category", "total")
ANCHOR = 10  # the anchor categories: the first 10 of the seeded order (fewer when the smallest K is)


@dataclass(frozen=True)
class Cell:
    """One (K, method, seed) of the sweep; ``name`` starts its folder under ``output_dir/cells/``."""

    k: int
    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"K{self.k}-{self.method}-seed{self.seed}"

    @property
    def old_name(self) -> str:
        """The name before sweeps had seeds: a finished cell of the base's seed may be in such a folder."""
        return f"K{self.k}-{self.method}"


@dataclass
class SweepSpec:
    """A checked sweep file. ``experiment_overrides`` apply to the base experiment of every cell;
    ``dataset_categories``: the category names of ``data.path``."""

    experiment: str
    categories: list[int]
    methods: list[str]
    budget: str
    output_dir: str
    seeds: list[int] = field(default_factory=list)
    experiment_overrides: list[str] = field(default_factory=list)
    dataset_categories: list[str] = field(default_factory=list)

    def cells(self) -> list[Cell]:
        return [Cell(k, method, seed) for k in self.categories for method in self.methods for seed in self.seeds]

    def base(self) -> ExperimentConfig:
        return load_config(self.experiment, self.experiment_overrides)

    def scale(self, k: int) -> float:
        """How many times the base steps a cell of ``k`` categories trains."""
        return k / min(self.categories) if self.budget == "per_category" else 1.0

    def cell_overrides(self, cell: Cell, base: ExperimentConfig | None = None) -> list[str]:
        """The overrides that make ``cell`` from the base experiment (its steps by the budget rule)."""
        t = (base or self.base()).train
        factor = self.scale(cell.k)
        steps = max(1, round(t.steps * factor))
        every = min(steps, max(1, round(t.checkpoint_every * factor)))
        return [f"model.method={cell.method}", f"data.num_categories={cell.k}", f"seed={cell.seed}",
                f"train.steps={steps}", f"train.checkpoint_every={every}",
                f"train.vae_steps={round(t.vae_steps * factor)}", f"name={self.name_of(cell)}"]

    def name_of(self, cell: Cell) -> str:
        return f"scale {Path(self.output_dir).name} {cell.name}"

    def fingerprint(self, cell: Cell) -> str:
        """8 hex digits of everything that decides a cell's result: its whole resolved experiment
        (method, K, steps by the budget rule, every override, the data, the seed), less where it
        writes and logs."""
        doc = self.config(cell).to_dict()
        for key in ("output_dir", "name", "tracking"):
            doc.pop(key, None)
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:8]

    def folder_of(self, cell: Cell) -> str:
        """The cell's folder under ``output_dir/cells/``: its name and fingerprint, so a cell of other
        settings never takes a finished one's result."""
        return f"{cell.name}-{self.fingerprint(cell)}"

    def old_folder_of(self, cell: Cell) -> str:
        """Where a sweep written before ``seeds`` existed kept this cell: the same fingerprint (a cell
        of the base's seed resolves to the same experiment), the name without the seed."""
        return f"{cell.old_name}-{self.fingerprint(cell)}"

    def config(self, cell: Cell, extra: list[str] = ()) -> ExperimentConfig:
        """The cell's whole experiment (``extra``: its output folder, its tracking store)."""
        return load_config(self.experiment, [*self.experiment_overrides, *self.cell_overrides(cell), *extra])

    def anchors(self) -> list[str]:
        """The anchor categories: the first ``min(10, smallest K)`` of the seeded order, which every
        cell holds."""
        from anomdiff.data.splits import category_order

        seed = self.base().data.category_seed
        return category_order(self.dataset_categories, seed)[:min(ANCHOR, min(self.categories))]


def _counts(path: Path, data: dict) -> list[int] | None:
    value = data.get("categories")
    if value is None:
        return None
    if not isinstance(value, list):
        raise ValueError(f"{path}: categories must be a list of category counts K, e.g. [10, 20, 40], got {value!r}")
    if not value:
        raise ValueError(f"{path}: categories is empty: give at least one category count K, e.g. categories=[2,4]")
    for k in value:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"{path}: categories: every K must be a positive integer, got {k!r}")
    return sorted(set(value))


def _methods(path: Path, value) -> list[str]:
    from anomdiff.models import METHODS

    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError(f"{path}: methods must be a non-empty list of methods ({', '.join(sorted(METHODS))})")
    for method in value:
        if method not in METHODS:
            raise ValueError(f"{path}: methods: unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
    return list(dict.fromkeys(value))


def _seeds(path: Path, value, base_seed: int) -> list[int]:
    if value is None:
        return [base_seed]
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError(f"{path}: seeds must be a non-empty list of seeds, e.g. seeds=[0,1,2], got {value!r}")
    for seed in value:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"{path}: seeds: every seed must be a non-negative integer, got {seed!r}")
    return list(dict.fromkeys(value))


def load_sweep(path: str | Path, overrides: list[str] = ()) -> SweepSpec:
    """Read, override and check a sweep file: unknown keys (with the nearest spelling), an empty K
    list, a K larger than the dataset's category count, an unknown method or budget, a bad seed
    list, and a base experiment or cell that is not valid all fail here with one line."""
    from anomdiff.data.manifest import read_manifest
    from anomdiff.search import experiment_path, read_job_file

    path = Path(path)
    data, experiment_overrides = read_job_file(path, overrides, TOP_KEYS)
    for key in ("experiment", "methods", "output_dir"):
        if data.get(key) in (None, "", []):
            raise ValueError(f"{path}: {key} is missing")
    budget = data.get("budget") or "per_category"
    if budget not in BUDGETS:
        raise ValueError(f"{path}: budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    counts = _counts(path, data)
    methods = _methods(path, data["methods"])
    spec = SweepSpec(experiment=experiment_path(data["experiment"]), categories=counts or [1], methods=methods,
                     budget=budget, output_dir=str(data["output_dir"]), experiment_overrides=experiment_overrides)
    base = spec.base()
    spec.seeds = _seeds(path, data.get("seeds"), base.seed)
    if not base.data.path:
        raise ValueError("data.path is not set: pass data.path=<a converted dataset>")
    spec.dataset_categories = sorted(read_manifest(base.data.path)["counts"])
    available = len(spec.dataset_categories)
    if counts is None:  # the default list, capped by the dataset
        spec.categories = sorted({min(k, available) for k in DEFAULT_CATEGORIES})
    else:
        too_many = [k for k in counts if k > available]
        if too_many:
            raise ValueError(f"{path}: categories: K={too_many[0]} is more than the {available} categories of "
                             f"{base.data.path}; use K <= {available}")
    for cell in spec.cells():  # every cell's experiment is valid (steps by the budget rule included)
        spec.config(cell, [f"output_dir={Path(spec.output_dir) / 'cells' / cell.name}"])
    return spec


def spread(values: list[float | None]) -> tuple[float, float]:
    """Mean and (population) standard deviation of the values that are not ``None``; nan when none."""
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not kept:
        return math.nan, math.nan
    mean = sum(kept) / len(kept)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in kept) / len(kept))
