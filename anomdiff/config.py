"""The experiment configuration: a typed tree composed from YAML parts plus dotted overrides.

An experiment file (``conf/experiment/<name>.yaml``) may name parts to start from::

    compose: {data: synthetic, model: tiny, train: cpu}

which load ``conf/data/synthetic.yaml`` into ``data``, ``conf/model/tiny.yaml`` into ``model`` and
so on; the file's own sections are merged on top, then ``key=value`` overrides from the command
line (values parsed as YAML: ``train.steps=200``, ``model.trainable=[unet,sg]``). The result is
checked against the dataclasses below before anything starts: an unknown key fails naming the key
and its nearest valid spelling.

A value that starts with ``${ANOMDIFF_HOME}`` (``output_dir: ${ANOMDIFF_HOME}/demo/run``) names a
place under the jobs' home folder: the placeholder becomes :func:`anomdiff_home` when the file (or
an override) is loaded, so every default output follows the ``ANOMDIFF_HOME`` variable (default
``./.anomdiff``). Any other relative path stays as written.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from anomdiff.atomic import write_text_atomic
from anomdiff.models.config import ModelConfig
from anomdiff.sections import Section, UnknownKeyError, require_at_least

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
HOME_VARIABLE = "ANOMDIFF_HOME"
HOME = "${" + HOME_VARIABLE + "}"  # the placeholder a config value starts with to mean "under the home folder"


def anomdiff_home() -> Path:
    """The jobs' home folder: ``ANOMDIFF_HOME``, else ``./.anomdiff``, as an absolute path."""
    return Path(os.environ.get(HOME_VARIABLE, ".anomdiff")).resolve()


def expand_home(value: Any) -> Any:
    """``value`` with a leading ``${ANOMDIFF_HOME}`` (alone or before ``/``) replaced by
    :func:`anomdiff_home`, in every string of a nested dict or list; anything else unchanged."""
    if isinstance(value, dict):
        return {key: expand_home(item) for key, item in value.items()}
    if isinstance(value, list):
        return [expand_home(item) for item in value]
    if isinstance(value, str) and (value == HOME or value.startswith(HOME + "/")):
        return str(anomdiff_home()) + value[len(HOME):]
    return value


@dataclass
class DataConfig(Section):
    """Which dataset and categories to read, and the seeded validation hold-out of training normals.

    ``cache`` decodes the training images once and keeps them in Ray's object store instead of
    re-reading the shards every epoch: for datasets that fit in memory (the demo's epoch is 17
    steps, and each new streaming pass waits ~0.5 s for its first batch on two cores)."""

    path: str = ""
    num_categories: int | None = None
    category_seed: int = 0
    validation_fraction: float = 0.1
    validation_seed: int = 0
    balanced: bool = False
    shuffle_buffer: int = 256
    decode_cpus: float = 0.5
    cache: bool = False


@dataclass
class ZeroConfig(Section):
    """DeepSpeed ZeRO: stage 0-3 and optional CPU offload of optimizer state and parameters.
    ``bucket_elements``: the size of DeepSpeed's gradient-reduction and all-gather buckets and, at
    stage 3, of the parameters gathered at once (null: DeepSpeed's defaults, 5e8 and 1e9 elements,
    up to 2 GB each in bf16); smaller buckets cost memory less and communication more."""

    stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    bucket_elements: int | None = None


# The engine's weights: auto is bf16 on a GPU and float32 on a CPU (DeepSpeed's CPU accelerator has
# bf16 but no fp16).
PRECISIONS = ("auto", "bf16", "fp32")

# Ray's placement group strategies, which Ray Train's ScalingConfig passes on.
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class TrainConfig(Section):
    """Ray Train workers and the optimisation schedule (steps count optimizer steps; ``schedule``
    ``cosine`` warms up over the first 10% of each stage's steps and anneals to zero, or ``constant``).

    ``resource_wait_s``: how long the start may wait for an autoscaler to add the nodes the workers
    need (their resources are requested from it); 0 refuses at once what the cluster does not have.
    ``placement_strategy``: how Ray places the workers' resource bundles (:data:`PLACEMENT_STRATEGIES`;
    ``STRICT_SPREAD`` puts each worker on a node of its own).
    ``selection_image_weight``: checkpoints are kept and exported by ``w x validation image AUROC +
    (1 - w) x validation pixel AUROC`` (a search that trains sets it from its own metric).
    ``precision``: the engine's weights (:data:`PRECISIONS`); bf16 runs the forward under autocast."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    resource_wait_s: float = 0.0
    placement_strategy: str = "PACK"
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1.0e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    schedule: str = "cosine"
    vae_steps: int = 0
    vae_lr: float = 1.0e-4
    steps: int = 500
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    max_failures: int = 1
    validation_images: int = 64
    selection_image_weight: float = 1.0
    precision: str = "auto"
    zero: ZeroConfig = field(default_factory=ZeroConfig)

    @property
    def bf16(self) -> bool:
        """Whether the engine holds bf16 weights: ``precision`` bf16, or auto on a GPU."""
        return self.precision == "bf16" or (self.precision == "auto" and self.use_gpu)

    def __post_init__(self) -> None:
        require_at_least("train", self, ("num_workers", "batch_size", "grad_accum", "steps", "log_every",
                                         "checkpoint_every", "keep_checkpoints", "validation_images"))
        require_at_least("train", self, ("vae_steps", "max_failures"), low=0)
        for name in ("lr", "vae_lr", "cpus_per_worker", "grad_clip"):
            if not 0 < getattr(self, name) < math.inf:  # nan fails every comparison
                raise ValueError(f"train.{name} must be a positive finite number, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not 0 <= self.selection_image_weight <= 1:
            raise ValueError(f"train.selection_image_weight must be in [0, 1], got {self.selection_image_weight}")
        if not 0 <= self.resource_wait_s < math.inf:
            raise ValueError(f"train.resource_wait_s must be a finite number >= 0, got {self.resource_wait_s}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"train.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"train.placement_strategy must be one of {', '.join(PLACEMENT_STRATEGIES)}, "
                             f"got {self.placement_strategy!r}")


@dataclass
class EvaluateConfig(Section):
    """Test-split evaluation: batch size, streaming metrics, how many worst cases to draw, and whether
    to save every image's anomaly map (``save_maps``: ``maps/<sample_id>.npy``, float16, image size)."""

    batch_size: int = 16
    streaming: bool = True
    num_bins: int = 16384
    worst_cases: int = 4
    save_maps: bool = False

    def __post_init__(self) -> None:
        require_at_least("evaluate", self, ("batch_size",))
        require_at_least("evaluate", self, ("num_bins",), low=2)
        require_at_least("evaluate", self, ("worst_cases",), low=0)


@dataclass
class PromotionGate(Section):
    """What ``anomdiff promote`` asks of a candidate model version: its validation image and pixel
    AUROC (and test metrics, once evaluated) at least ``min_image_auroc`` / ``min_pixel_auroc`` and
    not below the best champion on record minus ``tolerance``. A registered model's owner records its
    own (``anomdiff promote NAME --set-policy``); these are the defaults without one."""

    tolerance: float = 0.01
    min_image_auroc: float = 0.5
    min_pixel_auroc: float = 0.5

    def __post_init__(self) -> None:
        for key in ("tolerance", "min_image_auroc", "min_pixel_auroc"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ValueError(f"promotion policy {key} must be a number in [0, 1], got {value!r}")


@dataclass
class TrackingConfig(Section):
    """MLflow: experiment name, tracking URI (default: SQLite under ANOMDIFF_HOME), and the registered
    model name that each training registers a new version of (none: the model is logged only).
    ``log_model: false`` logs the exported model's location (tag ``anomdiff.model_dir``) instead of a
    copy of it (search trials and sweep cells: a copy per trial is gigabytes at sd15). The
    promotion gate is the registered model's, not a training run's (``anomdiff promote --set-policy``)."""

    experiment: str = "anomdiff"
    tracking_uri: str | None = None
    registered_model: str | None = None
    log_model: bool = True


@dataclass
class ExperimentConfig(Section):
    name: str = "experiment"
    seed: int = 0
    output_dir: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if self.train.zero.stage not in (0, 1, 2, 3):
            raise ValueError(f"train.zero.stage must be 0-3, got {self.train.zero.stage}")
        if self.train.num_workers < 1 or self.train.batch_size < 1 or self.train.grad_accum < 1:
            raise ValueError("train.num_workers, train.batch_size and train.grad_accum must be >= 1")
        if self.train.schedule not in ("cosine", "constant"):
            raise ValueError(f"train.schedule must be 'cosine' or 'constant', got {self.train.schedule!r}")
        if not 0.0 <= self.data.validation_fraction < 1.0:
            raise ValueError(f"data.validation_fraction must be in [0, 1), got {self.data.validation_fraction}")


def _merge(base: dict, update: dict) -> dict:
    """Deep merge of nested dicts; ``update`` wins."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        with path.open() as f:
            data = yaml.safe_load(f) or {}  # safe: a !!python tag is an error, never code
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ValueError(f"{path}: not valid YAML{at} ({getattr(exc, 'problem', None) or exc})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a text file ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {item!r} is not of the form dotted.key=value")
    return key.split("."), yaml.safe_load(raw) if raw else ""


def compose(path: str | Path, overrides: list[str] = ()) -> dict:
    """The merged config dict of an experiment file plus overrides (not yet type-checked)."""
    path = Path(path)
    data = read_yaml(path)
    parts = data.pop("compose", {}) or {}
    if not isinstance(parts, dict):
        raise ValueError(f"{path}: compose must map sections to preset names, e.g. "
                         f"{{data: synthetic, model: tiny, train: cpu}}, got {parts!r}")
    merged: dict = {}
    for section, name in parts.items():
        if section not in ("data", "model", "train", "evaluate", "tracking"):
            raise UnknownKeyError(f"compose.{section}", ["data", "model", "train", "evaluate", "tracking"])
        merged[section] = read_yaml(CONF_DIR / section / f"{name}.yaml")
    return expand_home(apply_overrides(_merge(merged, data), overrides))


def apply_overrides(tree: dict, overrides: list[str] = ()) -> dict:
    """``tree`` with each ``dotted.key=value`` of ``overrides`` set in it (sections created as
    needed); the one override parser of every job."""
    tree = copy.deepcopy(tree)
    for item in overrides:
        keys, value = parse_override(item)
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {key} is not a section")
        node[keys[-1]] = value
    return tree


def load_config(path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    """Compose, override and validate an experiment config."""
    return ExperimentConfig.from_dict(compose(path, overrides))


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    write_text_atomic(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
