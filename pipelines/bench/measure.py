"""The benchmark's shared tools: ratios and MFU, step timing, thread counts, what the machine is, the
synthetic inputs, the experiment config and seeded model every section builds, and running a
function on Ray Train workers."""

from __future__ import annotations

import contextlib
import importlib.metadata
import itertools
import os
import platform
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from anomdiff.config import ExperimentConfig, load_config

# Dense bf16 tensor-core peaks (TFLOPS, vendor data sheets) by a substring of torch's device name;
# the first match wins, so the more specific names come first. --peak-tflops overrides.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
)


# --- small pure helpers ----------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or ``None`` when either is missing or ``b`` is zero."""
    return None if a is None or not b else a / b


def mfu(flops_per_step: float, step_seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the device's peak FLOP/s."""
    if step_seconds <= 0 or peak_flops <= 0:
        raise ValueError(f"step time and peak must be positive, got {step_seconds} s and {peak_flops} FLOP/s")
    return flops_per_step / step_seconds / peak_flops


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU from its torch device name, ``None`` when not in the table."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12
    return None


def median_step(times: list[float], warmup: int) -> float:
    """Median of the intervals between successive timestamps, after ``warmup`` intervals."""
    steps = np.diff(times)[warmup:]
    if steps.size == 0:
        raise ValueError(f"{len(times)} timestamps leave no step after {warmup} warm-up steps")
    return float(np.median(steps))


class TimedBatches:
    """Iterator over ``source`` (one fixed batch forever if given a dict) that records the time of
    every ``next()``: training loops ask for a batch at the start of each step, so the differences
    are step times, whoever runs the loop."""

    def __init__(self, source):
        self.source = itertools.repeat(source) if isinstance(source, dict) else iter(source)
        self.times: list[float] = []

    def __iter__(self):
        return self

    def __next__(self):
        self.times.append(time.perf_counter())
        return next(self.source)


@contextlib.contextmanager
def torch_threads(count: int):
    """Run the block at ``count`` torch threads (what Ray gives a task or actor with ``count`` CPUs or
    less), then restore the previous count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def synthetic_maps(n: int, size: int, seed: int, num_categories: int = 10) -> tuple[np.ndarray, ...]:
    """``n`` anomaly maps with masks (every second image has a disc defect scoring higher):
    categories, image scores, labels, maps ``n x size x size`` float32, masks uint8."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).astype(np.int64)
    yy, xx = np.ogrid[:size, :size]
    cy, cx = rng.uniform(0.15, 0.85, (2, n, 1, 1)) * size
    radius = np.maximum(rng.uniform(0.02, 0.12, (n, 1, 1)) * size, 1.0)  # at least one pixel
    masks = (((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2) & labels[:, None, None].astype(bool)).astype(np.uint8)
    maps = rng.normal(0.3, 0.1, (n, size, size)).astype(np.float32)
    maps += masks * rng.uniform(0.05, 0.6, (n, 1, 1)).astype(np.float32)
    categories = np.array([f"c{i // 2 % num_categories:02d}" for i in range(seed * n, seed * n + n)])
    return categories, maps.reshape(n, -1).max(axis=1), labels, maps, masks


def parse_operator_stats(stats: str) -> dict[str, dict[str, float]]:
    """Tasks and wall seconds per operator from ``Dataset.stats()`` text (evidence for the ingest figures)."""
    found = {}
    for name, tasks, seconds in re.findall(r"Operator \d+ (.+?): (\d+) tasks executed, \d+ blocks produced in "
                                           r"([\d.]+)(?:s)", stats):
        found[name] = {"tasks": int(tasks), "wall_s": float(seconds)}
    return found


# --- the machine -----------------------------------------------------------------------------


def machine() -> dict:
    """What the figures were measured on."""
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo") if line.startswith(
        "model name")), platform.processor())
    info = {"cpu": cpu, "cpus": os.cpu_count(), "memory_bytes": proc_bytes("/proc/meminfo", "MemTotal"),
            "python": platform.python_version(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "ray_data_env": {k: v for k, v in os.environ.items() if k.startswith("RAY_DATA_")}}
    for package in ("ray", "deepspeed"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    return info


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def proc_bytes(path: str, field: str) -> int:
    """A ``Field:  N kB`` line of a /proc file in bytes (0 where the file or field is missing)."""
    kb = next((int(line.split()[1]) for line in _read_lines(path) if line.startswith(field + ":")), 0)
    return kb * 1024


def status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (``VmRSS`` now, ``VmHWM`` its peak). The
    peak restarts at exec, unlike ``ru_maxrss``, which a child inherits from the parent it forked from."""
    return proc_bytes("/proc/self/status", field)


# --- what every section builds ---------------------------------------------------------------


def experiment(preset: str = "tiny", *overrides: str) -> ExperimentConfig:
    """The demo's composition (synthetic data, CPU training settings) on the model ``preset``, with
    dotted ``overrides``: the same config path as ``anomdiff train``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.yaml"
        path.write_text(yaml.safe_dump({"compose": {"data": "synthetic", "model": preset, "train": "cpu"},
                                        "name": "bench"}))
        return load_config(path, list(overrides))


def seeded_model(cfg: ExperimentConfig, num_categories: int):
    """The model of ``cfg`` for ``num_categories``, built after seeding torch with ``cfg.seed``."""
    import torch

    from anomdiff.models import build_model

    torch.manual_seed(cfg.seed)
    return build_model(cfg.model, num_categories)


def as_torch(batch: dict, device) -> dict:
    """A batch of NumPy arrays as tensors on ``device``."""
    import torch

    return {k: torch.as_tensor(v, device=device) for k, v in batch.items()}


# --- Ray Train -------------------------------------------------------------------------------


def fit_workers(worker, config: dict, num_workers: int, storage: Path, datasets: dict | None = None,
                use_gpu: bool = False):
    """Run ``worker`` on a TorchTrainer; returns what it returned on rank 0 (Ray Train 2's
    ``Result.return_value``; the other ranks' return values are dropped). No checkpoint round trip:
    Ray Train 2 keeps reported metrics only when they come with a checkpoint, a return value needs
    no ``ray.train.report`` at all."""
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": 0.5, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(name=f"{worker.__name__}-{time.time_ns()}", storage_path=str(storage)),
        datasets=datasets or {}, dataset_config=DataConfig(datasets_to_split="all"))
    return trainer.fit().return_value
