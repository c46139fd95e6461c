"""Section 5, ``metrics``: streaming metrics against the exact ones, each mode in a fresh process for
its peak memory."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np

from pipelines.bench.measure import proc_bytes, ratio, status_bytes, synthetic_maps
from pipelines.bench.sizes import Sizes

METRIC_CHUNK = 100
EXACT_BYTES_PER_PIXEL = 28  # measured: 1,000 maps of 256 x 256 peak at about 1.8 GB in exact mode


def metrics_run(mode: str, n_maps: int, size: int) -> dict:
    """One mode over ``n_maps`` synthetic maps (in chunks of 100, the same in both modes): seconds
    spent in the metrics code, this process's peak RSS and the RSS before the maps existed."""
    from anomdiff import metrics

    baseline = status_bytes("VmRSS")
    seconds = 0.0
    if mode == "streaming":
        accumulator = metrics.StreamingMetrics(score_range=(-0.5, 1.5))
        for k, start in enumerate(range(0, n_maps, METRIC_CHUNK)):
            chunk = synthetic_maps(min(METRIC_CHUNK, n_maps - start), size, seed=k)
            tick = time.perf_counter()
            accumulator.update(*chunk)
            seconds += time.perf_counter() - tick
        tick = time.perf_counter()
        doc = accumulator.compute()
    elif mode == "exact":
        chunks = [synthetic_maps(min(METRIC_CHUNK, n_maps - s), size, seed=k)
                  for k, s in enumerate(range(0, n_maps, METRIC_CHUNK))]
        arrays = [np.concatenate(parts) for parts in zip(*chunks, strict=True)]
        del chunks
        tick = time.perf_counter()
        doc = metrics.compute(*arrays)
    else:
        raise ValueError(f"unknown metrics mode {mode!r}; choose streaming or exact")
    seconds += time.perf_counter() - tick
    peak = status_bytes("VmHWM")
    return {"n_maps": n_maps, "seconds": seconds, "peak_rss_bytes": peak, "baseline_rss_bytes": baseline,
            "peak_bytes": peak - baseline, "mean": doc["mean"]}


def _metrics_in_subprocess(mode: str, n_maps: int, size: int) -> dict:
    code = ("import json, sys; from pipelines.bench.metrics import metrics_run; "
            f"print(json.dumps(metrics_run({mode!r}, {n_maps}, {size})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"metrics {mode} run failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def metrics_section(sizes: Sizes) -> dict:
    """Section 5: streaming against exact, each in a fresh process; exact shrinks to fit in memory."""
    size, n = sizes.metric_size, sizes.metric_maps
    available = proc_bytes("/proc/meminfo", "MemAvailable")
    fits = int(0.6 * available / (EXACT_BYTES_PER_PIXEL * size * size)) // METRIC_CHUNK * METRIC_CHUNK
    n_exact = max(METRIC_CHUNK, min(n, fits))
    streaming = _metrics_in_subprocess("streaming", n, size)
    exact = _metrics_in_subprocess("exact", n_exact, size)
    comparable = streaming if n_exact == n else _metrics_in_subprocess("streaming", n_exact, size)
    differences = [abs(comparable["mean"][k] - exact["mean"][k]) for k in exact["mean"]
                   if exact["mean"][k] is not None and comparable["mean"][k] is not None]
    return {
        "n_maps": {"streaming": n, "exact": n_exact}, "size": size,
        "streaming": {k: streaming[k] for k in ("seconds", "peak_bytes", "peak_rss_bytes")},
        "exact": {k: exact[k] for k in ("seconds", "peak_bytes", "peak_rss_bytes")},
        "speedup": ratio(exact["seconds"], comparable["seconds"]),
        "memory_ratio": ratio(exact["peak_bytes"], comparable["peak_bytes"]),
        "max_abs_difference": max(differences) if differences else None,
        "note": None if n_exact == n else f"exact mode limited to {n_exact} maps by available memory; "
                                          f"speedup compares both modes at {n_exact} maps",
    }
