"""Register an exported model folder as a new version of a registered model (a search's
``best_model/``, a model trained elsewhere).

    anomdiff register .anomdiff/tune/inference/best_model anomdiff-realiad
    anomdiff promote anomdiff-realiad        # then, once evaluated: anomdiff evaluate models:/anomdiff-realiad/N DATA

The folder is logged as the pyfunc model of a new MLflow run (experiment ``anomdiff-register``),
linked to the run that trained it when the folder sits in a training's output_dir, and registered.
No Ray.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from anomdiff.config import TrackingConfig
from anomdiff.models.saved import read_saved_config
from pipelines import registry, tracking


def register(folder: str | Path, name: str, tracking_uri: str | None = None) -> dict:
    """Log and register ``folder``; returns ``model_uri``, ``registered_model``, ``version``."""
    folder = Path(folder).resolve()
    read_saved_config(folder)  # not an exported model: one line naming the file, before any run opens
    cfg = TrackingConfig(experiment="anomdiff-register", tracking_uri=tracking_uri, registered_model=name)
    tracking.check_server(cfg)
    trained_by = registry.resolve(str(folder)).training_run
    tags = {"anomdiff.job": "register", "anomdiff.model_dir": str(folder),
            **({"anomdiff.training_run": trained_by} if trained_by else {})}
    ref = tracking.open_job_run(cfg, f"register {folder.name}", tags=tags)
    with tracking.resume(ref):
        model_uri, version = registry.log_exported_model(folder, name)
    return {"model_uri": model_uri, "registered_model": name, "version": version}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="anomdiff register", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="an exported model folder (output_dir/model, a search's best_model/)")
    parser.add_argument("name", help="the registered model that gets the new version")
    parser.add_argument("--tracking-uri", help="the MLflow store (default: MLFLOW_TRACKING_URI, else SQLite under "
                                               "ANOMDIFF_HOME)")
    args = parser.parse_intermixed_args(argv)
    done = register(args.folder, args.name, args.tracking_uri)
    print(f"registered {args.folder} as {done['registered_model']} version {done['version']} ({done['model_uri']})")


if __name__ == "__main__":
    main()
