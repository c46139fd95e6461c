"""What every job does the same way: which Ray it runs on, quiet Ray Data, its overrides, and the
record of what a resumed job started again.

Which Ray: a job joins a cluster only when one is asked for (an explicit ``--address``, or
``RAY_ADDRESS``, which ``ray job submit`` sets for the program it runs); otherwise it starts a
private local Ray, even when another program's Ray head runs on the same machine (``ray.init()``
with no address would join that one, with its own Python environment).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

from anomdiff.config import apply_overrides, parse_override

ADDRESS_HELP = ("a Ray cluster to run on (default: RAY_ADDRESS when set, as under `ray job submit`; "
                "otherwise a private local Ray)")


def add_address_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None, help=ADDRESS_HELP)


def add_print_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration (checked, as the job would check it) and exit")


def print_config(doc: dict) -> None:
    """The resolved configuration of a job as YAML on stdout."""
    import yaml

    print(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), end="")


def ray_address(address: str | None = None) -> str | None:
    """The cluster a job was asked to join, or ``None`` for a private local Ray."""
    return address or os.environ.get("RAY_ADDRESS") or None


def start_ray(address: str | None = None, quiet: bool = False, **local_options) -> None:
    """Join the cluster that is asked for (:func:`ray_address`) or start a private local Ray with
    ``local_options`` (``num_cpus``...); a Ray already started in this process is kept. Ray Data's
    progress bars and per-execution plan lines are turned off (the jobs print their own progress);
    ``quiet`` also keeps workers' output and Ray Data's info lines from the console."""
    import ray

    if not ray.is_initialized():
        joined = ray_address(address)
        if joined:
            ray.init(address=joined, log_to_driver=not quiet)
        else:
            ray.init(address="local", log_to_driver=not quiet, **local_options)
    quiet_data_logs()
    if quiet:
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def quiet_data_logs() -> None:
    """No progress bars and no per-execution plan lines from Ray Data: a training run re-executes its
    dataset every epoch."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def split_overrides(items: list[str], job_keys: tuple[str, ...]) -> tuple[dict, list[str]]:
    """Separate a job's own top-level keys (``scorers=4``) from config overrides (``data.path=...``):
    returns ``({key: parsed value}, [the remaining key=value strings])``."""
    own, rest = {}, []
    for item in items:
        keys, value = parse_override(item)
        if len(keys) == 1 and keys[0] in job_keys:
            own[keys[0]] = value
        else:
            rest.append(item)
    return own, rest


def override_sections(items: list[str], allowed: tuple[str, ...], job: str) -> dict:
    """Overrides as a nested dict of config sections, refusing any section not in ``allowed``."""
    tree = apply_overrides({}, items)
    unknown = [key for key in tree if key not in allowed]
    if unknown:
        raise ValueError(f"override {unknown[0]}: {job} takes {', '.join(f'{a}.*' for a in allowed)}")
    return tree


def _local_path(value: str | None) -> bool:
    """Whether a config value names a local file or folder (not a Hub id, a URI or a keyword)."""
    if not value or value in ("hub", "imagenet") or "://" in value:
        return False
    return value.startswith(("/", "./", "../", "~")) or Path(value).exists()


def absolute_path_overrides(cfg) -> list[str]:
    """Overrides that pin every local path of an experiment config (data, outputs, weights, a base
    model, a SQLite store) to an absolute one. A search trial runs in a working directory of Ray
    Tune's, and a sweep cell wherever Ray puts its task: a relative path read there would miss."""
    m = cfg.model
    paths = {"data.path": cfg.data.path, "output_dir": cfg.output_dir, "model.pretrained": m.pretrained,
             "model.backbone.pretrained": m.backbone.pretrained, "model.drdc.pretrained": m.drdc.pretrained,
             "model.drdc.base_model": m.drdc.base_model}
    out = [f"{key}={Path(value).expanduser().resolve()}" for key, value in paths.items()
           if key in ("data.path", "output_dir") and value or _local_path(value)]
    uri = cfg.tracking.tracking_uri
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        out.append(f"tracking.tracking_uri=sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}")
    return out


def pin_home() -> None:
    """``ANOMDIFF_HOME`` as an absolute path in this process's environment, which the processes Ray
    starts for it inherit (a relative one would be read in each trial's own working directory)."""
    from pipelines.tracking import anomdiff_home

    os.environ["ANOMDIFF_HOME"] = str(anomdiff_home())


def same_job_or_refuse(out: Path, record: str, what: dict, kind: str) -> None:
    """Record what defines a resumable job (``what``) in ``out/record`` the first time; refuse, with
    one line, to resume a job of another definition in the same folder."""
    from anomdiff.atomic import write_text_atomic

    text = json.dumps(what, indent=1, sort_keys=True)
    path = out / record
    if path.is_file() and path.read_text() != text:
        raise FileExistsError(f"{out} holds another {kind} (its {record} differs); choose a new output_dir or delete "
                              f"the old {kind}")
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)


LAUNCHES = "launches.log"  # a line per start of a trial or cell: what a resumed job ran again, and where


def record_launch(output_dir: str | Path, name: str) -> None:
    """Append ``name``, the time and this process's id to ``output_dir/launches.log``."""
    with open(Path(output_dir) / LAUNCHES, "a") as f:
        f.write(f"{name} {time.time():.3f} {os.getpid()}\n")
