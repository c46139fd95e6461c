"""The optional ``evaluation_memory`` section: the driver's peak memory while the evaluation job
(``pipelines.evaluate.evaluate``) scores synthetic test sets of 1,000 and 10,000 images with a knn
model fitted in seconds. Each evaluation runs in a fresh process with its own local Ray; a thread
samples that process's resident set while the job runs, so what is measured is the driver (the
scoring actors are Ray worker processes of their own). Streaming (the default) at every size, exact
(``evaluate.streaming=false``) at the smallest for contrast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from pipelines.bench.measure import ratio, status_bytes

EVALUATION_IMAGES = (1_000, 10_000)
EVALUATION_CATEGORIES = 10
STORED_SIZE = 64  # the tiny preset's own size: decoding does not resize
EVALUATION_OVERRIDES = ("scorers=2", "evaluate.batch_size=32", "tracking.experiment=anomdiff-bench-evaluation")


RSS_PARTS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


class PeakRSS:
    """Context manager sampling this process's resident set every ``interval`` seconds in a thread:
    ``baseline`` on entry and ``peak`` until exit, each of :data:`RSS_PARTS` (the total; the process's
    own memory; mapped files; shared memory, which holds the Ray object store's pages it has read)."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.baseline, self.peak = interval, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _read(self) -> None:
        for part in RSS_PARTS:
            self.peak[part] = max(self.peak.get(part, 0), status_bytes(part))

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._read()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.baseline = {part: status_bytes(part) for part in RSS_PARTS}
        self._read()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._read()

    def growth(self, part: str = "VmRSS") -> int:
        return self.peak[part] - self.baseline[part]


def fit_knn(data: Path, out: Path, image_size: int = STORED_SIZE) -> Path:
    """A tiny-preset knn model whose banks hold the patch features of each category's training
    normals, with the ``score_range`` the streaming path needs calibrated on their maps; saved to ``out``."""
    import numpy as np
    import torch

    from anomdiff import metrics
    from anomdiff.data.manifest import read_manifest, shard_paths
    from anomdiff.data.schema import read_shard
    from anomdiff.data.transforms import COLUMNS, DecodeBatch, unit_range
    from anomdiff.models import build_model
    from anomdiff.models.config import ModelConfig, load_preset

    manifest = read_manifest(data)
    categories = list(manifest["counts"])
    decode = DecodeBatch(image_size, categories, training=True)
    decoded = [decode(read_shard(shard, columns=list(COLUMNS))) for shard in shard_paths(data, manifest, "train",
                                                                                           categories)]
    images = torch.from_numpy(unit_range(np.concatenate([d["image"] for d in decoded]).astype(np.float32)))
    owners = torch.from_numpy(np.concatenate([d["category_index"] for d in decoded]))
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict({"method": "knn", "image_size": image_size}, base=load_preset("tiny")),
                        len(categories))
    features = model.patch_features(images)
    rows = features.permute(0, 2, 3, 1)
    model.build_memory({c: rows[owners == c].reshape(-1, rows.shape[-1]) for c in range(len(categories))})
    score_range = metrics.calibrate_score_range(model.score({"image": images})["anomaly_map"].numpy())
    model.save(out, metadata={"categories": categories, "score_range": [float(v) for v in score_range]})
    return out


def driver_memory_run(model_dir: str, data: str, warm_up_data: str, out: str, streaming: bool) -> dict:
    """Two evaluations in this process after Ray has started: one of ``warm_up_data`` (its growth is
    the one-time cost: imports, the model loaded for the pre-flight check, Ray Data's first plan),
    then the measured one of ``data``: its seconds and the growth of this process's resident set
    (the peak during the job over the set before it), in total and by part."""
    from pipelines import evaluate, runtime

    runtime.start_ray(quiet=True, num_cpus=os.cpu_count(), include_dashboard=False)
    overrides = [*EVALUATION_OVERRIDES, f"evaluate.streaming={streaming}"]
    with PeakRSS() as first:
        evaluate.evaluate(model_dir, warm_up_data, f"{out}-warm-up", overrides)
    with PeakRSS() as rss:
        tick = time.perf_counter()
        doc = evaluate.evaluate(model_dir, data, out, overrides)
        seconds = time.perf_counter() - tick
    return {"images": doc["num_images"], "seconds": seconds, "driver_pid": os.getpid(),
            "warm_up_growth_bytes": first.growth(), "baseline_rss_bytes": rss.baseline["VmRSS"],
            "peak_rss_bytes": rss.peak["VmRSS"], "growth_bytes": rss.growth(),
            **{f"{part}_growth_bytes": rss.growth(part) for part in RSS_PARTS[1:]},
            "image_auroc": doc["mean"]["image_auroc"], "pixel_auroc": doc["mean"]["pixel_auroc"]}


def _run_in_subprocess(model_dir: Path, data: Path, warm_up_data: Path, out: Path, streaming: bool) -> dict:
    args = ", ".join(repr(str(p)) for p in (model_dir, data, warm_up_data, out))
    code = ("import json; from pipelines.bench.evaluation import driver_memory_run; "
            f"print(json.dumps(driver_memory_run({args}, {streaming})))")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private Ray: only this driver measured
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        raise RuntimeError(f"evaluation (streaming={streaming}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def evaluation_memory_section(work: Path, counts: tuple[int, ...] = EVALUATION_IMAGES,
                              num_categories: int = EVALUATION_CATEGORIES) -> dict:
    """Driver peak RSS growth of the evaluation job at each of ``counts`` test images (streaming), and
    at the smallest also exact; one knn model fitted on the largest set's training normals. Each
    process first evaluates 2 images per category, so that the measured growth is the job's, not the
    first import of torch, the model and MLflow (``warm_up_growth_bytes``)."""
    from anomdiff.data.synthetic import synthesize

    rows: dict = {}
    model_dir = None
    warm_up = work / "warm-up"
    synthesize(warm_up, num_categories, seed=0, image_size=STORED_SIZE, train_per_category=1, test_per_category=2)
    for n in sorted(counts, reverse=True):
        data = work / f"test-{n}"
        tick = time.perf_counter()
        # The same generator seed at every size: the smaller sets' training images are the same ones.
        synthesize(data, num_categories, seed=0, image_size=STORED_SIZE, train_per_category=4,
                   test_per_category=n // num_categories)
        write_s = time.perf_counter() - tick
        model_dir = model_dir or fit_knn(data, work / "knn-model")
        modes = ("streaming", "exact") if n == min(counts) else ("streaming",)
        rows[str(n)] = {"synthesize_s": write_s}
        for mode in modes:
            run = _run_in_subprocess(model_dir, data, warm_up, work / f"evaluation-{n}-{mode}", mode == "streaming")
            rows[str(n)][mode] = run
            print(f"[bench] evaluation of {run['images']} images ({mode}): {run['seconds']:.0f} s, driver RSS "
                  f"+{run['growth_bytes'] / 2**20:.0f} MiB (own memory +{run['RssAnon_growth_bytes'] / 2**20:.0f} "
                  f"MiB; the first evaluation's +{run['warm_up_growth_bytes'] / 2**20:.0f} MiB)", flush=True)
    small, large = str(min(counts)), str(max(counts))
    return {"categories": num_categories, "image_size": STORED_SIZE, "overrides": list(EVALUATION_OVERRIDES),
            "by_images": rows,
            "streaming_growth_ratio_large_over_small": ratio(rows[large]["streaming"]["growth_bytes"],
                                                             rows[small]["streaming"]["growth_bytes"]),
            "exact_over_streaming_growth_small": ratio(rows[small]["exact"]["growth_bytes"],
                                                       rows[small]["streaming"]["growth_bytes"])}
