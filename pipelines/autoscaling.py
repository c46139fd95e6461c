"""Autoscaler requests that end with the job and that concurrent jobs do not erase.

``ray.autoscaler.sdk.request_resources`` keeps one request per cluster until the next call replaces
it: a job that asks for its workers and never clears the request keeps the nodes up after it ends,
and two jobs asking at once erase each other's need. Here every job's need goes to one detached
actor (``anomdiff-autoscaler-requests`` in namespace ``anomdiff``) that sends the autoscaler the
union of the live needs whenever one is added or removed. A job holds its need while it trains
(:func:`holding`) and removes it when it ends, fails or is stopped; it renews the need every
``RENEW_S`` seconds, and a need not renewed for ``EXPIRE_S`` (a killed driver's) is dropped by
the actor, so no request outlives its job by more than that.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import ray

ACTOR, NAMESPACE = "anomdiff-autoscaler-requests", "anomdiff"
RENEW_S, EXPIRE_S = 60.0, 300.0


def autoscaler_ceiling() -> dict[str, float] | None:
    """The resources the cluster holds at its maximum size, from the autoscaler's node groups
    (KubeRay's worker groups x maxReplicas), or ``None`` where no autoscaler has published them.
    Ray 2.60 exposes this only through ``ray._private.state`` (what Ray Train itself reads to
    refuse an impossible worker group); any failure of that private call counts as unknown."""
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config()
    except Exception:
        return None


def growable_resources() -> dict[str, float]:
    """What the cluster can grow to: its resources now, or its autoscaler's ceiling where larger (an
    autoscaling RayCluster starts with no GPU node). What sizes a search's or a sweep's concurrency."""
    have = dict(ray.cluster_resources())
    for name, amount in (autoscaler_ceiling() or {}).items():
        have[name] = max(have.get(name, 0), amount)
    return have


@ray.remote(num_cpus=0, max_concurrency=4)
class Requests:
    """The live jobs' needs, and the autoscaler request that is their union."""

    def __init__(self, prune_every_s: float = 10.0):
        self.needs: dict[str, tuple[list[dict], float]] = {}
        self.lock = threading.Lock()
        threading.Thread(target=self._prune_forever, args=(prune_every_s,), daemon=True).start()

    def hold(self, key: str, bundles: list[dict], expire_s: float) -> None:
        with self.lock:
            self.needs[key] = (bundles, time.time() + expire_s)
            self._send()

    def release(self, key: str) -> None:
        with self.lock:
            if self.needs.pop(key, None) is not None:
                self._send()

    def bundles(self) -> list[dict]:
        with self.lock:
            return [b for bundles, _ in self.needs.values() for b in bundles]

    def _send(self) -> None:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[b for bundles, _ in self.needs.values() for b in bundles])

    def _prune_forever(self, every_s: float) -> None:
        while True:
            time.sleep(every_s)
            with self.lock:
                expired = [key for key, (_, until) in self.needs.items() if until < time.time()]
                for key in expired:
                    del self.needs[key]
                if expired:
                    self._send()


def requests_actor():
    """The cluster's one request keeper (started on first use; it needs no CPU)."""
    return Requests.options(name=ACTOR, namespace=NAMESPACE, lifetime="detached", get_if_exists=True).remote()


@contextmanager
def holding(bundles: list[dict], renew_s: float = RENEW_S, expire_s: float = EXPIRE_S) -> Iterator[str]:
    """Ask the autoscaler for ``bundles`` (one per worker) for the block, beside other jobs' needs."""
    actor, key, stop = requests_actor(), uuid.uuid4().hex, threading.Event()
    ray.get(actor.hold.remote(key, bundles, expire_s))

    def renew() -> None:
        while not stop.wait(renew_s):
            try:
                ray.get(actor.hold.remote(key, bundles, expire_s))
            except Exception:  # the cluster is going away with the job
                return

    threading.Thread(target=renew, name="anomdiff-autoscaler", daemon=True).start()
    try:
        yield key
    finally:
        stop.set()
        try:
            ray.get(actor.release.remote(key), timeout=30)
        except Exception as exc:  # the need expires by itself within expire_s
            print(f"[autoscaler] could not withdraw the request ({type(exc).__name__}); it lapses within "
                  f"{expire_s:.0f} s", flush=True)
