"""MLflow set-up shared by the jobs: where runs go, how a job opens (or resumes) its run, and what
every run records.

The tracking store is ``MLFLOW_TRACKING_URI`` when set, else the config's ``tracking.tracking_uri``,
else SQLite under ``ANOMDIFF_HOME`` (default ``./.anomdiff/mlflow.db``), with artifacts beside it.
A job opens its run once on the driver (:func:`open_job_run`) and hands the small :class:`RunRef`
to whoever logs into it later (Ray workers included): :func:`resume` reopens it there. A search or
sweep opens its own run first and runs each trial or cell :func:`nested_under` it, so the job runs
that the trial or cell opens in its own process are that run's children (``mlflow.parentRunId``)
in the same store.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import yaml

from anomdiff.config import ExperimentConfig, TrackingConfig, anomdiff_home

# The URIs that this process wrote into MLFLOW_TRACKING_URI (``mlflow.set_tracking_uri`` does) in
# place of what the variable held: the variable is the user's choice only when it holds something
# else. Pointing MLflow at the URI the variable already holds changes nothing and marks nothing, so
# a user's store stays the user's however many times a job resolves it.
_SET_HERE: set[str] = set()


def _point_mlflow_at(uri: str) -> None:
    held = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if held != uri:
        _SET_HERE.add(uri)


def tracking_uri(configured: str | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` when the user set it, else ``configured``, else SQLite under ANOMDIFF_HOME."""
    chosen = os.environ.get("MLFLOW_TRACKING_URI")
    if chosen and chosen not in _SET_HERE:
        return chosen
    if configured:
        return configured
    home = anomdiff_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def check_server(cfg: TrackingConfig, timeout_s: float = 5.0) -> None:
    """Refuse to start when the tracking store is an MLflow server that does not answer its
    ``/health`` (one line naming the URI), instead of retrying for minutes once Ray has started."""
    uri = tracking_uri(cfg.tracking_uri)
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as answer:
            answer.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ValueError(f"tracking.tracking_uri: the MLflow server at {uri} does not answer ({exc}); start it, "
                         "or unset MLFLOW_TRACKING_URI and tracking.tracking_uri to log to SQLite under "
                         "ANOMDIFF_HOME") from None


def point_at_store(cfg: TrackingConfig) -> str:
    """Point MLflow at the store of a ``tracking`` section (no experiment needed: registry commands)."""
    uri = tracking_uri(cfg.tracking_uri)
    _point_mlflow_at(uri)
    return uri


def use_experiment(cfg: TrackingConfig) -> str:
    """Point MLflow at the store and experiment of a ``tracking`` section; returns the tracking URI."""
    uri = point_at_store(cfg)
    if mlflow.get_experiment_by_name(cfg.experiment) is None:
        artifacts = (anomdiff_home() / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
        mlflow.create_experiment(cfg.experiment, artifact_location=artifacts)
    mlflow.set_experiment(cfg.experiment)
    return uri


@dataclass(frozen=True)
class RunRef:
    """Where a job's MLflow run lives: enough to reopen it in another process."""

    tracking_uri: str
    experiment_id: str
    run_id: str

    def to_dict(self) -> dict:
        return asdict(self)


PARENT_RUN = "ANOMDIFF_PARENT_RUN_ID"  # set by nested_under: the run this process's job runs are children of


@contextmanager
def nested_under(run_id: str | None) -> Iterator[None]:
    """For the block, every new run :func:`open_job_run` creates in this process is a child of
    ``run_id`` (its ``mlflow.parentRunId`` tag): how a search's trial or a sweep's cell, in a process
    of its own, nests its training and evaluation runs under the search's or sweep's run, which must
    be in the same store. ``None``: no change."""
    if run_id is None:
        yield
        return
    before = os.environ.get(PARENT_RUN)
    os.environ[PARENT_RUN] = run_id
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PARENT_RUN, None)
        else:
            os.environ[PARENT_RUN] = before


def open_job_run(cfg: TrackingConfig, name: str, run_id_file: Path | None = None,
                 experiment: ExperimentConfig | None = None, tags: dict[str, str] | None = None) -> RunRef:
    """Create the job's run, or resume the one whose id ``run_id_file`` holds (a resumed job logs
    into the same run). A new run records ``experiment`` (params + ``config.yaml``) and ``tags``
    (links to the runs, models and data it came from), and is a child of the run
    :func:`nested_under` names, if any."""
    uri = use_experiment(cfg)
    run_id = run_id_file.read_text().strip() if run_id_file is not None and run_id_file.is_file() else None
    parent = os.environ.get(PARENT_RUN) if run_id is None else None
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else name,
                          tags={"mlflow.parentRunId": parent} if parent else None) as active:
        if run_id_file is not None:
            run_id_file.write_text(active.info.run_id)
        if run_id is None:
            if experiment is not None:
                log_config(experiment)
            if tags:
                mlflow.set_tags(tags)
    return RunRef(uri, active.info.experiment_id, active.info.run_id)


# Why MLflow stopped answering this process (empty while it answers): from then on the job goes on
# and logs nothing more; what was logged before stays in the store.
_LOST: list[str] = []
# A request to a server that has gone away is retried this often (MLflow's default, 7 with growing
# waits, would stall training for minutes at the first failure); a user's own setting wins.
RETRIES_WHILE_TRAINING = "2"


def _lost(exc: Exception) -> None:
    if not _LOST:
        _LOST.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        print(f"[tracking] the MLflow store at {mlflow.get_tracking_uri()} stopped answering ({_LOST[0]}); the job "
              "goes on and logs nothing more from this process", file=sys.stderr, flush=True)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """``mlflow.log_metrics`` into the active run, unless the store has stopped answering: the first
    failure is reported once, and the job goes on without logging."""
    if _LOST or not mlflow.active_run():
        return
    try:
        mlflow.log_metrics(metrics, step=step)
    except Exception as exc:  # MlflowException, requests' errors: the store is out of reach
        _lost(exc)


def log_artifact(path: Path, folder: str | None = None) -> None:
    """``mlflow.log_artifact`` as :func:`log_metrics` logs metrics: skipped once the store is gone."""
    if _LOST or not mlflow.active_run():
        return
    try:
        mlflow.log_artifact(str(path), folder)
    except Exception as exc:
        _lost(exc)


@contextmanager
def run_while_reachable(**start_run) -> Iterator[object | None]:
    """``mlflow.start_run(**start_run)`` for the block, ended FINISHED or FAILED as the block ends; if
    the store has stopped answering (before or meanwhile), the block runs all the same (``None``)."""
    active = None
    if not _LOST:
        try:
            active = mlflow.start_run(**start_run)
        except Exception as exc:
            _lost(exc)
    status = "FINISHED"
    try:
        yield active
    except BaseException:
        status = "FAILED"
        raise
    finally:
        if active is not None:
            try:
                mlflow.end_run(status)
            except Exception as exc:
                _lost(exc)


@contextmanager
def resume(ref: RunRef | dict) -> Iterator[object | None]:
    """Reopen a job's run (in the driver or in a Ray worker) for the block; a store that stops
    answering stops the logging, not the job (:func:`run_while_reachable`)."""
    ref = RunRef(**ref) if isinstance(ref, dict) else ref
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", RETRIES_WHILE_TRAINING)
    _point_mlflow_at(ref.tracking_uri)
    try:
        mlflow.set_experiment(experiment_id=ref.experiment_id)  # nested runs opened inside go there too
    except Exception as exc:
        _lost(exc)
    with run_while_reachable(run_id=ref.run_id) as active:
        yield active


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
