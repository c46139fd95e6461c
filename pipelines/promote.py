"""Move a registered model's alias (``champion`` by default) to a version that passes the gate.

    anomdiff promote anomdiff-realiad --set-policy --tolerance 0.01 --min-image-auroc 0.8   # the owner, once
    anomdiff promote anomdiff-realiad                        # the latest version, if it passes
    anomdiff promote anomdiff-realiad --version 3 --dry-run  # what would be decided, changing nothing
    anomdiff promote anomdiff-realiad --version 2 --force --reason "v3 misses scratches"   # roll back

The gate belongs to the registered model, never to the candidate: its owner sets the policy once
(``--set-policy``: tolerance and floors, recorded on the registered model with who set it and when);
every promotion reads it; without one, :class:`anomdiff.config.PromotionGate`'s defaults apply.
``--tolerance`` and the floors given to a promotion can only make it stricter. A candidate passes
when its validation image and pixel AUROC (and its test metrics, once evaluated) reach the floors
and are not below the best of every champion on record minus the tolerance, so a chain of
promotions can lose at most one tolerance. Promotion to ``champion`` also needs the candidate's test
metrics, on the same test data as the champion's, and the champion's categories among its own. A
refused candidate gets the ``challenger`` alias instead. Every decision, with the numbers compared,
is printed and recorded on the candidate as tags (``promotion.*``); ``--force --reason`` is the only
way around the gate, recorded the same way.
"""

from __future__ import annotations

import argparse
import getpass
import json
import time

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from anomdiff.config import PromotionGate, TrackingConfig
from pipelines import registry, tracking
from pipelines.cli import bounded

CHALLENGER = "challenger"
CHAMPION = "champion"
GATED = (("image_auroc", "min_image_auroc"), ("pixel_auroc", "min_pixel_auroc"))
POLICY_TAG = "promotion.policy"  # on the registered model: the owner's gate
BEST_TAG = "promotion.best"      # on the registered model: the best metrics any champion had, per test set


def policy(client: MlflowClient, name: str) -> PromotionGate:
    """The registered model's own gate (its ``promotion.policy`` tag), else the defaults."""
    recorded = client.get_registered_model(name).tags.get(POLICY_TAG)
    if not recorded:
        return PromotionGate()
    doc = json.loads(recorded)
    return PromotionGate.from_dict({k: doc[k] for k in ("tolerance", "min_image_auroc", "min_pixel_auroc")},
                                   _path="promotion.policy")


def set_policy(name: str, values: dict[str, float]) -> dict:
    """Set ``values`` (tolerance, floors) in the registered model's policy, the others kept as they
    were, with who set it and when."""
    client = MlflowClient()
    try:
        current = policy(client, name)
    except MlflowException as exc:
        if registry.not_found(exc):
            raise ValueError(f"no registered model {name!r} in {mlflow.get_tracking_uri()}") from None
        raise
    gate = PromotionGate.from_dict({**current.to_dict(), **values}, _path="promotion.policy")
    record = {**gate.to_dict(), "set_by": getpass.getuser(), "set_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                     time.gmtime())}
    client.set_registered_model_tag(name, POLICY_TAG, json.dumps(record, sort_keys=True))
    return record


def stricter(gate: PromotionGate, overrides: dict[str, float]) -> PromotionGate:
    """``gate`` tightened by a promotion's own options (a smaller tolerance, higher floors); an option
    that would loosen it is ignored."""
    tightened = {"tolerance": min(gate.tolerance, overrides.get("tolerance", gate.tolerance)),
                 **{key: max(getattr(gate, key), overrides.get(key, 0.0)) for _, key in GATED}}
    return PromotionGate.from_dict(tightened, _path="promotion.policy")


def best_on_record(client: MlflowClient, name: str) -> dict:
    """``{"val": {metric: best}, "test": {test data: {metric: best}}}`` over every champion so far."""
    recorded = client.get_registered_model(name).tags.get(BEST_TAG)
    return json.loads(recorded) if recorded else {"val": {}, "test": {}}


def _raise_best(best: dict, metrics: dict[str, float], test_data: str | None) -> dict:
    for key, value in metrics.items():
        if key.startswith("val_"):
            best["val"][key] = max(value, best["val"].get(key, value))
        elif test_data is not None:
            bucket = best["test"].setdefault(test_data, {})
            bucket[key] = max(value, bucket.get(key, value))
    return best


def judge(candidate: dict[str, float], best: dict, gate: PromotionGate, test_data: str | None,
          champion: dict | None = None) -> list[str]:
    """The gate's failures (empty: the candidate passes). ``best``: the best on record (the bar, minus
    the tolerance); ``champion``: the holder of ``champion``, whose test set and categories a new
    champion must meet (``None`` for another alias)."""
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
            bar = best["val"].get(key) if split == "val" else best["test"].get(test_data or "", {}).get(key)
            if bar is not None and value < bar - gate.tolerance:
                failures.append(f"{key} {value:.4f} < best champion on record {bar:.4f} - tolerance "
                                f"{gate.tolerance:.4f}")
    if champion is not None:
        if "test_image_auroc" not in candidate:
            failures.append("no test metrics recorded on the candidate: run anomdiff evaluate on it first")
        elif champion.get("test_data") and champion["test_data"] != test_data:
            failures.append(f"evaluated on {test_data!r}, the champion on {champion['test_data']!r}: evaluate the "
                            "candidate on the champion's test data")
        missing = sorted(set(champion.get("categories") or []) - set(candidate.get("categories") or []))
        if champion.get("categories") and missing:
            failures.append(f"the champion's categories {missing} are not among the candidate's")
    return failures


def _version_facts(client: MlflowClient, name: str, version: str) -> tuple[dict, str | None, list[str] | None]:
    tags = client.get_model_version(name, version).tags
    categories = json.loads(tags["categories"]) if tags.get("categories") else None
    return registry.version_metrics(client, name, version), tags.get("test_data"), categories


def promote(name: str, version: str | None = None, alias: str = CHAMPION, dry_run: bool = False,
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
    candidate, test_data, categories = _version_facts(client, name, version)
    holder = None
    if holder_version not in (None, version):
        metrics, holder_data, holder_categories = _version_facts(client, name, holder_version)
        holder = {**metrics, "test_data": holder_data, "categories": holder_categories}
    gate = stricter(policy(client, name), gate_overrides or {})
    best = best_on_record(client, name) if alias == CHAMPION else {"val": {}, "test": {}}
    if holder:  # the holder is part of the bar (a champion set before the record was kept, another alias)
        best = _raise_best(best, {k: v for k, v in holder.items() if isinstance(v, float)}, holder.get("test_data"))
    champion = (holder or {}) if alias == CHAMPION else None
    failures = judge({**candidate, "categories": categories}, best, gate, test_data, champion)
    promoted = force or not failures
    decision = {"model": name, "version": version, "alias": alias, "previous": holder_version,
                "decision": ("forced" if failures else "promoted") if promoted else "refused",
                "failures": failures, "candidate": candidate, "champion": holder, "best_on_record": best,
                "gate": gate.to_dict(), "test_data": test_data, "reason": reason, "dry_run": dry_run,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if not dry_run:
        client.set_registered_model_alias(name, alias if promoted else CHALLENGER, version)
        client.set_model_version_tag(name, version, f"promotion.{alias}", registry.decision_record(decision))
        client.set_model_version_tag(name, version, "promotion.decision", decision["decision"])
        if promoted and alias == CHAMPION:
            record = _raise_best(best_on_record(client, name), candidate, test_data)
            client.set_registered_model_tag(name, BEST_TAG, json.dumps(record, sort_keys=True))
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
    lines.append("  gate: " + json.dumps(d["gate"], sort_keys=True))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="anomdiff promote", description=__doc__.splitlines()[0])
    parser.add_argument("name", help="the registered model (tracking.registered_model of its training)")
    parser.add_argument("--version", help="the candidate version (default: the latest)")
    parser.add_argument("--alias", default="champion", help="the alias to move (default: champion)")
    parser.add_argument("--dry-run", action="store_true", help="decide and print, change nothing")
    parser.add_argument("--force", action="store_true", help="move the alias whatever the gate says (rollback)")
    parser.add_argument("--reason", help="why --force: recorded on the version")
    parser.add_argument("--set-policy", action="store_true",
                        help="record --tolerance and the floors as the registered model's gate, then exit")
    for option in ("tolerance", "min-image-auroc", "min-pixel-auroc"):
        parser.add_argument(f"--{option}", type=bounded(float, 0.0, 1.0),
                            help="with --set-policy: the policy's value; else a stricter one for this promotion")
    parser.add_argument("--tracking-uri", help="the MLflow store (default: MLFLOW_TRACKING_URI, else SQLite under "
                                               "ANOMDIFF_HOME)")
    args = parser.parse_intermixed_args(argv)
    overrides = {key: getattr(args, key) for key in ("tolerance", "min_image_auroc", "min_pixel_auroc")
                 if getattr(args, key) is not None}
    cfg = TrackingConfig(tracking_uri=args.tracking_uri)
    tracking.check_server(cfg)
    tracking.point_at_store(cfg)
    if args.set_policy:
        record = set_policy(args.name, overrides)
        print(f"{args.name}: promotion policy {json.dumps(record, sort_keys=True)}")
        return
    decision = promote(args.name, args.version, args.alias, args.dry_run, args.force, args.reason, overrides)
    print(describe(decision))


if __name__ == "__main__":
    main()
