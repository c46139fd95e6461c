"""Move a registered model's alias (``champion`` by default) to a version that passes the gate.

    anomdiff promote anomdiff-realiad                        # the latest version, if it passes
    anomdiff promote anomdiff-realiad --version 3 --dry-run  # what would be decided, changing nothing
    anomdiff promote anomdiff-realiad --version 2 --force --reason "v3 misses scratches"   # roll back

The gate (``tracking.gate`` of the candidate's training config; the options below override it): the
candidate's validation image and pixel AUROC at least the floors and not below the alias holder's
minus the tolerance; when the candidate has been evaluated (``anomdiff evaluate`` records test
metrics on the version), its test metrics too, against the floors and against the holder's when the
holder was evaluated on the same data. A candidate that fails gets the ``challenger`` alias
instead. Every decision, with the numbers compared, is printed and recorded on the candidate as
tags (``promotion.*``).
"""

from __future__ import annotations

import argparse
import json
import time

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from anomdiff.config import PromotionGate, TrackingConfig
from pipelines import registry, tracking
from pipelines.cli import bounded

CHALLENGER = "challenger"
GATED = (("image_auroc", "min_image_auroc"), ("pixel_auroc", "min_pixel_auroc"))


def gate_from_run(params: dict[str, str], overrides: dict[str, float]) -> PromotionGate:
    """The candidate's own ``tracking.gate.*`` params (its training config), then the overrides."""
    logged = {key: float(params[f"tracking.gate.{key}"]) for key in ("tolerance", "min_image_auroc", "min_pixel_auroc")
              if f"tracking.gate.{key}" in params}
    return PromotionGate.from_dict({**logged, **overrides}, _path="tracking.gate")


def judge(candidate: dict[str, float], holder: dict[str, float] | None, gate: PromotionGate) -> list[str]:
    """The gate's failures (empty: the candidate passes). Validation metrics are required; test
    metrics count when the candidate has them."""
    failures = []
    for split in ("val", "test"):
        for metric, floor_key in GATED:
            key = f"{split}_{metric}"
            if key not in candidate:
                if split == "val":
                    failures.append(f"{key} is not recorded on the candidate")
                continue
            value, floor = candidate[key], getattr(gate, floor_key)
            if value < floor:
                failures.append(f"{key} {value:.4f} < floor {floor:.4f}")
            if holder and key in holder and value < holder[key] - gate.tolerance:
                failures.append(f"{key} {value:.4f} < champion's {holder[key]:.4f} - tolerance {gate.tolerance:.4f}")
    return failures


def _test_data(client: MlflowClient, name: str, version: str) -> str | None:
    return client.get_model_version(name, version).tags.get("test_data")


def promote(name: str, version: str | None = None, alias: str = "champion", dry_run: bool = False,
            force: bool = False, reason: str | None = None, gate_overrides: dict[str, float] | None = None) -> dict:
    """Decide, record and apply (unless ``dry_run``) one promotion; returns the decision."""
    if force and not reason:
        raise ValueError("--force needs --reason: say why the gate is bypassed")
    if alias == CHALLENGER:
        raise ValueError(f"the alias {CHALLENGER!r} is given to refused candidates; promote to another alias")
    client = MlflowClient()
    reference = f"models:/{name}/{version}" if version else f"models:/{name}"
    name, version = registry.model_version(client, reference.removeprefix("models:/"))
    try:
        holder_version = str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:  # no holder yet; any other failure stops the promotion
        if not registry.not_found(exc):
            raise
        holder_version = None
    candidate = registry.version_metrics(client, name, version)
    holder = registry.version_metrics(client, name, holder_version) if holder_version not in (None, version) else None
    if holder and _test_data(client, name, holder_version) != _test_data(client, name, version):
        holder = {k: v for k, v in holder.items() if not k.startswith("test_")}  # test sets differ: not comparable
    gate = gate_from_run(registry.training_config(client, name, version), gate_overrides or {})
    failures = judge(candidate, holder, gate)
    promoted = force or not failures
    decision = {"model": name, "version": version, "alias": alias, "previous": holder_version,
                "decision": ("forced" if failures else "promoted") if promoted else "refused",
                "failures": failures, "candidate": candidate, "champion": holder, "gate": gate.to_dict(),
                "reason": reason, "dry_run": dry_run, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if not dry_run:
        client.set_registered_model_alias(name, alias if promoted else CHALLENGER, version)
        client.set_model_version_tag(name, version, f"promotion.{alias}", registry.decision_record(decision))
        client.set_model_version_tag(name, version, "promotion.decision", decision["decision"])
    return decision


def describe(decision: dict) -> str:
    d = decision
    where = f"{d['model']} version {d['version']}"
    if d["decision"] == "refused":
        line = f"refused: {where} stays out of @{d['alias']} (now version {d['previous']}); it is @{CHALLENGER}"
    elif d["decision"] == "forced":
        line = f"forced: {where} is @{d['alias']} despite the gate (reason: {d['reason']})"
    else:
        line = f"promoted: {where} is @{d['alias']}" + (f" (was version {d['previous']})" if d["previous"] else "")
    lines = [("[dry run] " if d["dry_run"] else "") + line]
    lines += [f"  gate: {failure}" for failure in d["failures"]]
    lines.append("  candidate: " + json.dumps(d["candidate"], sort_keys=True))
    if d["champion"] is not None:
        lines.append("  champion: " + json.dumps(d["champion"], sort_keys=True))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="anomdiff promote", description=__doc__.splitlines()[0])
    parser.add_argument("name", help="the registered model (tracking.registered_model of its training)")
    parser.add_argument("--version", help="the candidate version (default: the latest)")
    parser.add_argument("--alias", default="champion", help="the alias to move (default: champion)")
    parser.add_argument("--dry-run", action="store_true", help="decide and print, change nothing")
    parser.add_argument("--force", action="store_true", help="move the alias whatever the gate says (rollback)")
    parser.add_argument("--reason", help="why --force: recorded on the version")
    for option in ("tolerance", "min-image-auroc", "min-pixel-auroc"):
        key = option.replace("-", "_")
        parser.add_argument(f"--{option}", type=bounded(float, 0.0, 1.0), help=f"override tracking.gate.{key}")
    parser.add_argument("--tracking-uri", help="the MLflow store (default: MLFLOW_TRACKING_URI, else SQLite under "
                                               "ANOMDIFF_HOME)")
    args = parser.parse_args(argv)
    overrides = {key: getattr(args, key) for key in ("tolerance", "min_image_auroc", "min_pixel_auroc")
                 if getattr(args, key) is not None}
    cfg = TrackingConfig(tracking_uri=args.tracking_uri)
    tracking.check_server(cfg)
    tracking.point_at_store(cfg)
    decision = promote(args.name, args.version, args.alias, args.dry_run, args.force, args.reason, overrides)
    print(describe(decision))


if __name__ == "__main__":
    main()
