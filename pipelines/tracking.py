"""MLflow set-up shared by the jobs: where runs go, and what every run records.

The tracking store is ``MLFLOW_TRACKING_URI`` when set, else the config's ``tracking.tracking_uri``,
else SQLite under ``ANOMDIFF_HOME`` (default ``./.anomdiff/mlflow.db``), with artifacts beside it.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import yaml

from anomdiff.config import ExperimentConfig


def anomdiff_home() -> Path:
    return Path(os.environ.get("ANOMDIFF_HOME", ".anomdiff")).resolve()


def tracking_uri(configured: str | None = None) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if configured:
        return configured
    home = anomdiff_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def use_experiment(cfg: ExperimentConfig) -> str:
    """Point MLflow at the store and experiment of ``cfg``; returns the tracking URI."""
    uri = tracking_uri(cfg.tracking.tracking_uri)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(cfg.tracking.experiment) is None:
        artifacts = (anomdiff_home() / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
        mlflow.create_experiment(cfg.tracking.experiment, artifact_location=artifacts)
    mlflow.set_experiment(cfg.tracking.experiment)
    return uri


def flat_params(cfg: ExperimentConfig) -> dict[str, str]:
    """The resolved config as dotted MLflow params (lists and None as text)."""
    out: dict[str, str] = {}

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            out[prefix] = str(node)[:6000]

    walk("", cfg.to_dict())
    return out


def log_config(cfg: ExperimentConfig) -> None:
    """Params plus the resolved config as ``config.yaml`` on the active run."""
    mlflow.log_params(flat_params(cfg))
    mlflow.log_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config.yaml")
