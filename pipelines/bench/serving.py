"""The optional ``serving`` section (no Ray): ``anomdiff predict`` images/s with batches against one
image at a time, and a real ``mlflow models serve`` of the registered model answering one image per
request (median and p95 latency) against the same pyfunc called in-process, measured side by side.

The model is the demo's DiAD (tiny preset) with seeded random weights: the time does not depend on
what the weights learned. The images are the synthetic dataset's test images (128 px PNG files,
resized to the model's 64 px as any file is)."""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pandas as pd

from pipelines.bench.measure import experiment, ratio, seeded_model


def _write_images(folder: Path, count: int) -> list[Path]:
    from anomdiff.data.schema import read_shard
    from anomdiff.data.synthetic import synthesize

    data = folder.parent / "serving-data"
    synthesize(data, 4, seed=0, image_size=128, train_per_category=1, test_per_category=max(1, count // 4), workers=1)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in sorted(data.rglob("split=test/*.parquet")):
        for row in read_shard(shard, columns=["sample_id", "image"]).to_pylist():
            paths.append(folder / (row["sample_id"].replace("/", "_") + ".png"))
            paths[-1].write_bytes(row["image"])
    return sorted(paths)[:count]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def model_server(model_uri: str, tracking_uri: str, cwd: Path | None = None, timeout_s: float = 180):
    """``mlflow models serve`` of ``model_uri`` on 127.0.0.1 (the current environment, run from
    ``cwd``), yielded as ``(port, process)`` once ``/ping`` answers; stopped on the way out."""
    port, bin_dir = _free_port(), str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": tracking_uri}
    log = tempfile.TemporaryFile()  # a file, not a pipe: a server that logs much never blocks on it
    server = subprocess.Popen([f"{bin_dir}/mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port)], env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                              stderr=log, start_new_session=True)
    try:
        started = time.perf_counter()
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.perf_counter() - started > timeout_s:
                    log.seek(0)
                    raise RuntimeError("mlflow models serve did not answer /ping: "
                                       + log.read().decode(errors="replace")[-2000:]) from None
                time.sleep(0.5)
        yield port, server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


def served_memory_mb(server: subprocess.Popen) -> float:
    """Resident memory of the server and every process under it (uvicorn's workers), in MB."""
    import psutil

    root = psutil.Process(server.pid)
    processes = [root, *root.children(recursive=True)]
    return sum(p.memory_info().rss for p in processes if p.is_running()) / 2**20


def ask(port: int, body: bytes) -> tuple[int, dict]:
    """POST ``body`` to ``/invocations``: the status and the JSON answer (errors included; status 0
    when no answer came)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        try:
            return error.code, json.loads(error.read() or b"{}")
        except ValueError:  # not JSON: the status still counts
            return error.code, {}
    except (OSError, ValueError):  # no answer (refused, reset, timed out) or not JSON: a failed request
        return 0, {}


def load_test(port: int, server: subprocess.Popen, bodies: list[bytes], clients: int, requests: int) -> dict:
    """``clients`` threads send ``requests`` requests in all (one image each) as fast as answers come:
    throughput, p50/p99 latency, failures, and the server's resident memory before and after."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> tuple[float, int]:
        tick = time.perf_counter()
        status, _ = ask(port, bodies[i % len(bodies)])
        return time.perf_counter() - tick, status

    memory_start = served_memory_mb(server)
    tick = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - tick
    latencies = sorted(seconds for seconds, _ in answers)
    return {"clients": clients, "requests": requests, "failed": sum(status != 200 for _, status in answers),
            "requests_per_s": requests / wall, "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, math.ceil(0.99 * len(latencies)) - 1)],
            "memory_start_mb": memory_start, "memory_end_mb": served_memory_mb(server)}


def _post(port: int, body: bytes) -> float:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                     {"Content-Type": "application/json"})
    tick = time.perf_counter()
    urllib.request.urlopen(request, timeout=120).read()
    return time.perf_counter() - tick


def _percentiles(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {"median_ms": 1000 * statistics.median(ordered),
            "p95_ms": 1000 * ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
            "requests": len(ordered)}


def serving_section(work: Path, images: int = 64, requests: int = 100, batch_size: int = 16, repeats: int = 2,
                    load_clients: tuple[int, ...] = (4, 16), load_requests: int = 2000) -> dict:
    from anomdiff.config import TrackingConfig
    from pipelines import registry, tracking
    from pipelines.predict import predict

    cfg = experiment()
    model_dir = work / "model"
    seeded_model(cfg, 4).save(model_dir, metadata={"categories": ["a", "b", "c", "d"], "threshold": 1.0,
                                                   "score_range": [0.0, 2.0], "val_image_auroc": 0.5,
                                                   "val_pixel_auroc": 0.5})
    paths = _write_images(work / "images", images)
    runs: dict[str, list[float]] = {"batched": [], "one_by_one": [], "batched_with_overlays": []}
    for _ in range(repeats):  # alternated, best of each
        for label, size, overlays in (("batched", batch_size, False), ("one_by_one", 1, False),
                                      ("batched_with_overlays", batch_size, True)):
            tick = time.perf_counter()
            predict(str(model_dir), [str(work / "images")], work / "predictions" / label, batch_size=size,
                    overlays=overlays, progress=False)
            runs[label].append(len(paths) / (time.perf_counter() - tick))
    out: dict = {"images": len(paths), "batch_size": batch_size,
                 **{f"{label}_images_per_s": max(values) for label, values in runs.items()}}
    out["batched_over_one_by_one"] = ratio(out["batched_images_per_s"], out["one_by_one_images_per_s"])

    uri = f"sqlite:///{work / 'mlflow.db'}"
    ref = tracking.open_job_run(TrackingConfig(experiment="anomdiff-bench-serving", tracking_uri=uri), "serving")
    with tracking.resume(ref):
        registry.log_exported_model(model_dir, "bench-serving")
    bodies = [json.dumps({"dataframe_split": {"columns": ["image"],
                                              "data": [[base64.b64encode(p.read_bytes()).decode()]]}}).encode()
              for p in paths]
    in_process = mlflow.pyfunc.load_model("models:/bench-serving/1")
    frames = [pd.DataFrame({"image": [base64.b64encode(p.read_bytes()).decode()]}) for p in paths]
    local = []
    for i in range(requests + 5):
        tick = time.perf_counter()
        in_process.predict(frames[i % len(frames)])
        local.append(time.perf_counter() - tick)
    started = time.perf_counter()
    with model_server("models:/bench-serving/1", uri, cwd=work) as (port, server):
        out["server_start_s"] = time.perf_counter() - started
        served = [_post(port, bodies[i % len(bodies)]) for i in range(requests + 5)]
        out["load"] = [load_test(port, server, bodies, clients, load_requests) for clients in load_clients]
    out["served"] = _percentiles(served[5:])  # the first five warm the server up
    out["in_process"] = _percentiles(local[5:])
    out["served_over_in_process_median"] = ratio(out["served"]["median_ms"], out["in_process"]["median_ms"])
    print(f"[bench] serving: predict {out['batched_images_per_s']:.1f} images/s in batches of {batch_size}, "
          f"{out['one_by_one_images_per_s']:.1f} one by one; served median {out['served']['median_ms']:.1f} ms, "
          f"p95 {out['served']['p95_ms']:.1f} ms", flush=True)
    for load in out["load"]:
        print(f"[bench] serving under load: {load['clients']} clients, {load['requests']} requests, "
              f"{load['requests_per_s']:.1f}/s, p50 {load['p50_ms']:.0f} ms, p99 {load['p99_ms']:.0f} ms, "
              f"{load['failed']} failed, server memory {load['memory_start_mb']:.0f} -> {load['memory_end_mb']:.0f} MB",
              flush=True)
    return out
