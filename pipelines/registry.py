"""The model's life in MLflow: the exported model logged as a pyfunc (from code, weights as
safetensors), registered as a new version, found again from a ``models:/`` or ``runs:/`` URI, and
linked to the evaluations of it.

A version carries, as tags, what the promotion gate compares: ``val_image_auroc`` and
``val_pixel_auroc`` from training, ``test_image_auroc`` and ``test_pixel_auroc`` once evaluated.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

import anomdiff
import anomdiff.pyfunc_model
from anomdiff.atomic import write_json_atomic
from anomdiff.models.saved import CONFIG_FILE, read_saved_config

MODEL_NAME = "model"  # the logged model's name in its run, and its artifact key
# The third-party packages the pyfunc imports, pinned to the versions that logged it.
REQUIREMENTS = ("torch", "torchvision", "diffusers", "accelerate", "timm", "pot", "safetensors", "numpy", "scipy",
                "scikit-learn", "pillow", "pyyaml", "matplotlib", "pandas", "pyarrow", "mlflow")
# The library travels with the model (MLflow's code_paths puts it on the import path at load), so a
# logged model loads and serves where this repository is not installed.
CODE_PATHS = [str(Path(anomdiff.__file__).parent)]
VALIDATION_TAGS = {"val_image_auroc": "val_image_auroc", "val_pixel_auroc": "val_pixel_auroc"}
TEST_TAGS = {"test_image_auroc": "image_auroc", "test_pixel_auroc": "pixel_auroc", "test_aupro": "aupro"}

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "image"), ColSpec("string", "category", required=False)]),
    outputs=Schema([ColSpec("double", "score"), ColSpec("boolean", "decision")]),
    params=ParamSchema([ParamSpec("return_map", "boolean", False)]),
)


def pip_requirements() -> list[str]:
    return [f"{name}=={importlib.metadata.version(name)}" for name in REQUIREMENTS]


def input_example(image_size: int) -> pd.DataFrame:
    """One mid-grey image of the model's size, as a client would send it."""
    grey = np.full((image_size, image_size, 3), 128, np.uint8)
    return pd.DataFrame({"image": [anomdiff.pyfunc_model.encode_base64_png(grey)]})


def log_exported_model(model_dir: Path, registered_model: str | None) -> tuple[str, str | None]:
    """Log ``model_dir`` into the active run as the pyfunc ``model``; with ``registered_model``, a
    new version of it, tagged with the validation metrics. Returns the logged model's URI and the
    version (or ``None``)."""
    info = read_saved_config(model_dir)
    meta = info["metadata"]
    logged = mlflow.pyfunc.log_model(
        name=MODEL_NAME, python_model=anomdiff.pyfunc_model.__file__, artifacts={MODEL_NAME: str(model_dir)},
        signature=SIGNATURE, input_example=input_example(info["config"]["image_size"]),
        pip_requirements=pip_requirements(), code_paths=CODE_PATHS,
        metadata={"method": info["method"], "categories": meta["categories"], "threshold": meta["threshold"],
                  "conditioning": info["config"]["conditioning"],
                  **{k: meta[k] for k in VALIDATION_TAGS if meta.get(k) is not None}})
    if not registered_model:
        return logged.model_uri, None
    return logged.model_uri, register(logged.model_uri, registered_model, info)


def register(model_uri: str, registered_model: str, info: dict) -> str:
    """A new version of ``registered_model`` from a logged model, tagged with its validation metrics."""
    meta = info["metadata"]
    version = str(mlflow.register_model(model_uri, registered_model).version)
    client = MlflowClient()
    for tag, key in VALIDATION_TAGS.items():
        if meta.get(key) is not None:
            client.set_model_version_tag(registered_model, version, tag, f"{float(meta[key]):.6f}")
    client.set_model_version_tag(registered_model, version, "method", info["method"])
    client.set_model_version_tag(registered_model, version, "categories", json.dumps(meta["categories"]))
    return version


def log_once(model_dir: Path, registered_model: str | None, record: Path) -> dict:
    """:func:`log_exported_model`, unless ``record`` says this job already did (a finished run
    started again exports the same model: it is not logged or registered a second time). Returns
    the record: ``model_uri``, ``registered_model``, ``version``."""
    if record.is_file():
        done = json.loads(record.read_text())
        if done.get("registered_model") == registered_model or not registered_model:
            return done
        version = register(done["model_uri"], registered_model, read_saved_config(model_dir))
        done = {**done, "registered_model": registered_model, "version": version}
        write_json_atomic(record, done)
        return done
    uri, version = log_exported_model(model_dir, registered_model)
    done = {"model_uri": uri, "registered_model": registered_model, "version": version}
    write_json_atomic(record, done)
    return done


NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")  # what the stores answer for a missing thing


def not_found(exc: MlflowException) -> bool:
    """Whether MLflow said "no such thing" (anything else, an unreachable server say, is re-raised)."""
    return getattr(exc, "error_code", None) in NOT_FOUND


@contextmanager
def missing_means(message: str) -> Iterator[None]:
    """Inside the block, MLflow's "no such thing" becomes ``ValueError(message)`` (one line for the
    user); every other MLflow error goes up as it is."""
    try:
        yield
    except MlflowException as exc:
        if not not_found(exc):
            raise
        raise ValueError(message) from None


@dataclass(frozen=True)
class ResolvedModel:
    """An exported model folder on this machine and where it came from in MLflow (when it did)."""

    folder: Path
    training_run: str | None = None
    name: str | None = None
    version: str | None = None


@contextmanager
def local_folder(model: str, tracking_uri: str | None = None) -> Iterator[Path]:
    """The exported folder of ``model`` (a folder, or a ``models:/``/``runs:/`` URI in the store that
    ``tracking_uri``, the environment or the default names, downloaded into a temporary folder that
    is removed when the block ends)."""
    if not model.startswith(("models:/", "runs:/")):
        yield resolve(model).folder
        return
    from anomdiff.config import TrackingConfig
    from pipelines import tracking

    store = TrackingConfig(tracking_uri=tracking_uri)
    tracking.check_server(store)
    tracking.point_at_store(store)
    with tempfile.TemporaryDirectory(prefix="anomdiff-model-") as download:
        yield resolve(model, download_to=Path(download)).folder


def resolve(model: str, download_to: Path | None = None) -> ResolvedModel:
    """``models:/NAME@alias``, ``models:/NAME/VERSION``, ``models:/m-ID`` (a logged model),
    ``runs:/RUN/model`` or an exported folder, as an exported folder on this machine; errors name
    what was not found."""
    if not model.startswith(("models:/", "runs:/")):
        folder = Path(model)
        read_saved_config(folder)  # a folder that is not an exported model fails here, naming the file
        trained_by = folder.resolve().parent / "mlflow_run_id"
        return ResolvedModel(folder, trained_by.read_text().strip() if trained_by.is_file() else None)
    client = MlflowClient()
    name = version = None
    reference = model.removeprefix("models:/")
    if re.fullmatch(r"m-[0-9a-f]{32}", reference):
        # MLflow 3's URI of a logged (not necessarily registered) model: models:/m-<id>
        with missing_means(f"{model}: no logged model {reference!r} in {mlflow.get_tracking_uri()}"):
            training_run, uri = mlflow.get_logged_model(reference).source_run_id, model
    elif model.startswith("models:/"):
        name, version = model_version(client, reference)
        source = client.get_model_version(name, version)
        training_run, uri = source.run_id, f"models:/{name}/{version}"
    else:
        training_run = model.removeprefix("runs:/").split("/")[0]
        uri = model
        with missing_means(f"{model}: no MLflow run {training_run!r} in {mlflow.get_tracking_uri()}"):
            client.get_run(training_run)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(download_to)
                                                         if download_to else None))
    except (MlflowException, OSError) as exc:
        raise ValueError(f"{model}: no logged anomdiff model there ({str(exc).splitlines()[0][:200]})") from None
    # The logged folder keeps its own name under artifacts/ (MLflow names it after the source folder).
    found = sorted(local.glob(f"artifacts/*/{CONFIG_FILE}"))
    if len(found) != 1:
        raise ValueError(f"{model}: the artifact at {uri} is not an anomdiff pyfunc model (no exported model "
                         "folder under artifacts/)")
    folder = found[0].parent
    return ResolvedModel(folder, training_run, name, None if version is None else str(version))


def model_version(client: MlflowClient, reference: str) -> tuple[str, str]:
    """``NAME@alias`` or ``NAME/VERSION`` (or ``NAME``: its latest version) as (name, version)."""
    name, alias = reference.split("@", 1) if "@" in reference else (reference, None)
    name, _, number = name.partition("/")
    with missing_means(f"models:/{reference}: no registered model {name!r} in {mlflow.get_tracking_uri()}"):
        client.get_registered_model(name)
    if alias:
        try:
            return name, str(client.get_model_version_by_alias(name, alias).version)
        except MlflowException as exc:
            if not not_found(exc):
                raise
            raise ValueError(f"models:/{reference}: model {name!r} has no alias {alias!r} "
                             f"(aliases: {', '.join(aliases(client, name)) or 'none'})") from None
    if number:
        with missing_means(f"models:/{reference}: model {name!r} has no version {number}"):
            return name, str(client.get_model_version(name, number).version)
    return name, latest_version(client, name)


def aliases(client: MlflowClient, name: str) -> list[str]:
    return sorted(client.get_registered_model(name).aliases or {})


def latest_version(client: MlflowClient, name: str) -> str:
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        raise ValueError(f"registered model {name!r} has no versions")
    return str(max(int(v.version) for v in versions))


def link_evaluation(model: ResolvedModel, doc: dict, evaluation_run: str, data_path: str = "") -> list[str]:
    """Record an evaluation's test metrics on the model versions it evaluated (the one it was given,
    or every version registered from the training run) and link them to the evaluation run; returns
    ``NAME/VERSION`` of each."""
    client = MlflowClient()
    if model.name:
        versions = [(model.name, model.version)]
    elif model.training_run:
        versions = [(v.name, v.version) for v in client.search_model_versions(f"run_id = '{model.training_run}'")]
    else:
        versions = []
    mean = doc.get("mean", {})
    for name, version in versions:
        for tag, key in TEST_TAGS.items():
            if mean.get(key) is not None:
                client.set_model_version_tag(name, version, tag, f"{float(mean[key]):.6f}")
        client.set_model_version_tag(name, version, "evaluation_run", evaluation_run)
        client.set_model_version_tag(name, version, "test_data", data_path)
    return [f"{name}/{version}" for name, version in versions]


def version_metrics(client: MlflowClient, name: str, version: str) -> dict[str, float]:
    """The gate's numbers recorded on a version (validation always, test once evaluated)."""
    tags = client.get_model_version(name, version).tags
    return {tag: float(tags[tag]) for tag in (*VALIDATION_TAGS, *TEST_TAGS) if tag in tags}


def decision_record(decision: dict) -> str:
    return json.dumps(decision, sort_keys=True)
