"""Hyperparameter search files (``conf/tune/*.yaml``): the base experiment, the space over dotted
config keys, the validation metric, the number of trials; checked before anything runs.

A space maps dotted keys to one distribution each::

    space:
      model.diffusion.start_timestep: {randint: [100, 500]}   # integers in [100, 500)
      model.scoring.sigma: {uniform: [1.0, 6.0]}
      train.lr: {loguniform: [1.0e-4, 1.0e-2]}
      model.diffusion.ddim_steps: {choice: [2, 4, 8]}
      model.scoring.noise_samples: {grid: [1, 3]}             # every value, in order

A space whose keys are all inference keys (``anomdiff.models.config.INFERENCE_KEYS``) is an
inference-time search of an exported ``model``; any other key makes it a training-time search, in
which each trial trains with its whole configuration (inference keys included, which its
validation then uses). The metric is computed on the validation set (held-out training normals and
their pasted-defect copies), never the test split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anomdiff.config import CONF_DIR, ExperimentConfig, expand_home, load_config, parse_override, read_yaml
from anomdiff.models.config import INFERENCE_KEYS, ModelConfig
from anomdiff.sections import UnknownKeyError

KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
METRICS = ("val_image_auroc", "val_pixel_auroc")
TOP_KEYS = ("experiment", "space", "metric", "num_trials", "output_dir", "model", "search", "scheduler",
            "reduction_factor", "max_concurrent")
SEARCHERS, SCHEDULERS = ("optuna", "random"), ("asha", "fifo")


@dataclass
class Distribution:
    """One key's values: ``kind`` of :data:`KINDS` and its arguments (the values, or low and high)."""

    kind: str
    args: list

    def extremes(self) -> list:
        """The values to check against the key's valid range: every listed value, or both ends."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        low, high = self.args
        return [low, high - 1] if self.kind == "randint" else [low, high]


@dataclass
class SearchSpec:
    """A checked search file. ``experiment_overrides`` apply to the base experiment of every trial."""

    experiment: str
    space: dict[str, Distribution]
    metric: dict[str, float]
    num_trials: int
    output_dir: str
    model: str | None = None
    search: str = "optuna"
    scheduler: str = "asha"
    reduction_factor: int = 2
    max_concurrent: int | None = None
    experiment_overrides: list[str] = field(default_factory=list)

    @property
    def inference_time(self) -> bool:
        return all(is_inference_key(key) for key in self.space)

    def score(self, result: dict) -> float:
        """The searched metric of a validation result (a weighted sum when several are named)."""
        return sum(weight * float(result[name]) for name, weight in self.metric.items())

    def config(self, params: dict[str, Any] | None = None) -> ExperimentConfig:
        """The base experiment with the overrides and ``params`` (dotted keys) applied."""
        return load_config(self.experiment, [*self.experiment_overrides,
                                             *(f"{k}={yaml_value(v)}" for k, v in (params or {}).items())])


def is_inference_key(key: str) -> bool:
    return key.startswith("model.") and key.removeprefix("model.") in INFERENCE_KEYS


def yaml_value(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _distribution(path: Path, key: str, spec: Any) -> Distribution:
    where = f"{path}: space.{key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ValueError(f"{where}: give one distribution as {{kind: args}}, kind one of {', '.join(KINDS)}")
    (kind, args), = spec.items()
    if kind not in KINDS:
        raise UnknownKeyError(f"space.{key}.{kind}", list(KINDS))
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ValueError(f"{where}: {kind} needs a non-empty list of values")
        return Distribution(kind, args)
    if (not isinstance(args, list) or len(args) != 2
            or not all(isinstance(a, int | float) and not isinstance(a, bool) and math.isfinite(a) for a in args)):
        raise ValueError(f"{where}: {kind} needs [low, high], two finite numbers")
    low, high = args
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ValueError(f"{where}: randint needs integer bounds")
    if not low < high:
        raise ValueError(f"{where}: {kind} needs low < high, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"{where}: loguniform needs low > 0")
    return Distribution(kind, args)


def _metric(path: Path, metric: Any) -> dict[str, float]:
    weights = {metric: 1.0} if isinstance(metric, str) else metric
    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"{path}: metric must be one of {', '.join(METRICS)} or a weighted mix "
                         "{val_image_auroc: 0.5, val_pixel_auroc: 0.5}")
    for name, weight in weights.items():
        if name not in METRICS:
            raise ValueError(f"{path}: unknown metric {name!r}; choose {', '.join(METRICS)} or a weighted mix of them")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
            raise ValueError(f"{path}: metric weight of {name} must be a positive number, got {weight!r}")
    return {name: float(weight) for name, weight in weights.items()}


def read_job_file(path: Path, overrides: list[str], top_keys: tuple[str, ...]) -> tuple[dict, list[str]]:
    """A job file of ``top_keys`` over a base experiment (a search, a sweep) with its command-line
    overrides: a top-level key replaces the file's value, any other dotted key is returned as an
    override of the base experiment; an unknown key fails naming the nearest spelling. A top-level
    value that starts with ``${ANOMDIFF_HOME}`` is under the home folder (:func:`expand_home`)."""
    data = read_yaml(path)
    experiment_overrides = []
    for item in overrides:
        keys, value = parse_override(item)
        if len(keys) == 1 and keys[0] in top_keys:
            data[keys[0]] = value
        elif len(keys) == 1 and keys[0] not in ExperimentConfig.__dataclass_fields__:
            raise UnknownKeyError(keys[0], list(dict.fromkeys([*top_keys, *ExperimentConfig.__dataclass_fields__])))
        else:
            experiment_overrides.append(item)
    for key in data:
        if key not in top_keys:
            raise UnknownKeyError(key, list(top_keys))
    return expand_home(data), experiment_overrides


def experiment_path(value: str) -> str:
    """A job file's base experiment: a path, or one relative to the repository (conf/experiment/...)
    from anywhere."""
    experiment = Path(value)
    return str(experiment if experiment.is_absolute() or experiment.is_file() else CONF_DIR.parent / experiment)


def load_search(path: str | Path, overrides: list[str] = ()) -> SearchSpec:
    """Read, override and check a search file: unknown keys (with the nearest spelling), an empty
    space, an unknown metric, values outside a key's valid range, and for an inference-time search
    a ``model`` that is not an exported model all fail here, naming the key."""
    path = Path(path)
    data, experiment_overrides = read_job_file(path, overrides, TOP_KEYS)
    for key in ("experiment", "space", "metric", "num_trials", "output_dir"):
        if data.get(key) in (None, "", {}):
            raise ValueError(f"{path}: {key} is missing" + (" or empty: name at least one key to search"
                                                            if key == "space" else ""))
    if not isinstance(data["space"], dict):
        raise ValueError(f"{path}: space must map dotted config keys to distributions")
    num_trials = data["num_trials"]
    if isinstance(num_trials, bool) or not isinstance(num_trials, int) or not 1 <= num_trials <= 100_000:
        raise ValueError(f"{path}: num_trials must be an integer in [1, 100000], got {num_trials!r}")
    spec = SearchSpec(
        experiment=experiment_path(data["experiment"]),
        space={k: _distribution(path, k, v) for k, v in data["space"].items()},
        metric=_metric(path, data["metric"]), num_trials=num_trials, output_dir=str(data["output_dir"]),
        model=data.get("model"), search=data.get("search", "optuna"), scheduler=data.get("scheduler", "asha"),
        reduction_factor=data.get("reduction_factor", 2), max_concurrent=data.get("max_concurrent"),
        experiment_overrides=experiment_overrides)
    for key, allowed in (("search", SEARCHERS), ("scheduler", SCHEDULERS)):
        if getattr(spec, key) not in allowed:
            raise ValueError(f"{path}: {key} must be one of {', '.join(allowed)}, got {getattr(spec, key)!r}")
    for key in ("reduction_factor", "max_concurrent"):
        value = getattr(spec, key)
        low = 2 if key == "reduction_factor" else 1
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{path}: {key} must be an integer >= {low}, got {value!r}")
    spec.config()  # the base experiment and its overrides are valid on their own
    for key, distribution in spec.space.items():  # every key exists (before telling the kinds apart)
        try:
            spec.config({key: distribution.extremes()[0]})
        except UnknownKeyError as exc:
            raise ValueError(f"{path}: space: {exc}") from None
        except (ValueError, TypeError):
            pass  # a value out of range: checked below against the right base
    if spec.inference_time:
        _check_inference(path, spec)
    elif spec.model:
        training = sorted(k for k in spec.space if not is_inference_key(k))
        raise ValueError(f"{path}: {', '.join(training)} change what a model learns, so the search trains a model "
                         "per trial; drop model= (a given model is for spaces of inference keys only)")
    else:
        for key, distribution in spec.space.items():
            for value in distribution.extremes():
                _check_value(path, key, value, lambda v, k=key: spec.config({k: v}))
    return spec


def _check_value(path: Path, key: str, value: Any, build) -> None:
    try:
        build(value)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: space.{key}={value!r} is outside the key's valid range ({exc})") from None


def _check_inference(path: Path, spec: SearchSpec) -> None:
    from anomdiff.models.saved import read_saved_config

    if not spec.model:
        raise ValueError(f"{path}: an inference-time search needs model=FOLDER, an exported model "
                         "(output_dir/model of a training run)")
    saved = ModelConfig.from_dict(read_saved_config(spec.model)["config"])
    for key, distribution in spec.space.items():
        for value in distribution.extremes():
            _check_value(path, key, value, lambda v, k=key: ModelConfig.from_dict(
                nested(k.removeprefix("model."), v), base=saved))


def nested(dotted: str, value: Any) -> dict:
    node: Any = value
    for part in reversed(dotted.split(".")):
        node = {part: node}
    return node
