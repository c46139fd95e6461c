"""Benchmark the machine or cluster it runs on: every figure a ratio measured side by side in one run.

On this machine (a local Ray starts by itself; ``--quick`` takes under 5 minutes on 2 cores):

    python -m pipelines.bench --quick --json bench.json

On a cluster (the work folder must be storage every node reads, it holds the synthetic shards;
``ray job submit`` sets RAY_ADDRESS, elsewhere ``--address`` names the cluster):

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m pipelines.bench --workdir /mnt/shared/bench --json /mnt/shared/bench.json

On a GPU machine without Ray or MLflow, the GPU check alone (``pipelines.bench.gpu``):

    python -m pipelines.bench.gpu --json gpu.json

Order of work: synthetic shards at 10, 40 and 160 categories (the same number of training images
each) -> the sections without Ray: ``scoring`` (decode -> score -> streaming metrics, tiny preset,
10 DDIM steps, guidance off against DiAD's doubled guidance), ``metrics`` (streaming against exact,
each mode in a fresh process for its peak memory), ``gpu`` (only where ``torch.cuda.is_available()``,
otherwise ``null``) -> Ray: ``ingest`` (Ray Data decode + resize against a single-process pyarrow +
Pillow loop over the same shards), one Ray Train run for ``train_overhead`` (DeepSpeed ZeRO-0 step,
1 worker, against the library's plain loop on the same model and batch) and the training part of
``category_scaling`` (steps fed by Ray Data at 10/40/160 categories), the scaling ingest, then
``zero_memory`` (per-rank bytes at ZeRO 0-3, 2 workers). Throughputs are the best of ``repeats``
runs and step times medians after warm-up steps: on a shared machine other users only slow a run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from anomdiff.atomic import write_json_atomic
from pipelines.bench.evaluation import evaluation_memory_section
from pipelines.bench.gpu import device_benchmark
from pipelines.bench.ingest import LARGE_SIZE, ingest_section, make_datasets, make_large_dataset
from pipelines.bench.measure import experiment, machine
from pipelines.bench.methods import PROAD_ABLATION, methods_section
from pipelines.bench.metrics import metrics_section
from pipelines.bench.onnx import onnx_section
from pipelines.bench.refinement import drdc_section
from pipelines.bench.report import markdown_table
from pipelines.bench.scaling import scaling_section
from pipelines.bench.scoring import scoring_section
from pipelines.bench.serving import serving_section
from pipelines.bench.sizes import (
    OPTIONAL_SECTIONS,
    QUICK,
    RANDOM_WEIGHTS,
    SCALING_CATEGORIES,
    SECTIONS,
    TARGETS,
    Sizes,
)
from pipelines.bench.training import training_sections
from pipelines.bench.tuning import tune_section
from pipelines.bench.zero import zero_section
from pipelines.runtime import add_address_argument, ray_address, start_ray


def _cluster_resources() -> dict:
    """CPUs, GPUs and memory of the Ray this run started or joined; empty when it uses none."""
    import ray

    if not ray.is_initialized():
        return {}
    return {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _progress(start: float, message: str) -> None:
    print(f"[bench {time.perf_counter() - start:6.1f}s] {message}", flush=True)


def targets(doc: dict) -> dict:
    """Which of the issue's targets this run met (``None`` where the section did not run)."""
    overhead = (doc.get("train_overhead") or {}).get("ratio")
    zero = (doc.get("zero_memory") or {}).get("ratio")
    scaling = (doc.get("category_scaling") or {}).get("ingest_ratio_160_over_10")
    by_size = (doc.get("ingest") or {}).get("by_size") or {}

    def per_cpu(size: int, target: str) -> bool | None:
        row = by_size.get(str(size))
        return None if row is None or row["ratio_per_cpu"] is None else row["ratio_per_cpu"] >= TARGETS[target]

    return {
        "train_overhead_ratio_le_1.10": None if overhead is None else overhead <= TARGETS["train_overhead_ratio_max"],
        "zero_stage3_le_0.55_stage0": None if zero is None else zero <= TARGETS["zero_stage3_over_stage0_max"],
        "ingest_160_over_10_within_10pct": None if scaling is None else abs(scaling - 1)
        <= TARGETS["ingest_160_over_10_tolerance"],
        "ingest_64px_ge_0.5_per_cpu": per_cpu(64, "ingest_per_cpu_64_min"),
        "ingest_256px_ge_0.8_per_cpu": per_cpu(LARGE_SIZE, "ingest_per_cpu_256_min"),
    }


def run(quick: bool = False, sections: tuple[str, ...] = SECTIONS, workdir: str | None = None,
        peak_tflops: float | None = None, sizes: Sizes | None = None, address: str | None = None,
        figures: str | None = None) -> dict:
    """Run the chosen sections and return the benchmark document (sections not run are ``None``); the
    ingest figure goes to the folder ``figures`` when given.
    The sections without Ray run first, before Ray's processes share the machine with them. Ray is
    the one ``address`` names (``pipelines.runtime.start_ray``: RAY_ADDRESS when unset, else a
    private local Ray on this machine's cores)."""
    sizes = sizes or (QUICK if quick else Sizes())
    start = time.perf_counter()
    doc: dict = {"quick": quick, "sizes": json.loads(json.dumps(asdict(sizes))), "machine": machine(),
                 **dict.fromkeys(SECTIONS), **{k: None for k in OPTIONAL_SECTIONS if k in sections}}
    wanted = set(sections)
    ray_sections = {"ingest", "train_overhead", "zero_memory", "category_scaling"} & wanted
    with tempfile.TemporaryDirectory(prefix="anomdiff-bench-", dir=workdir) as tmp:
        work = Path(tmp)
        image_size = experiment().model.image_size
        paths = {}
        if (ray_sections - {"zero_memory"}) | ({"scoring"} & wanted):
            counts = SCALING_CATEGORIES if "category_scaling" in wanted else SCALING_CATEGORIES[:1]
            _progress(start, f"synthesizing shards at {', '.join(map(str, counts))} categories")
            paths = make_datasets(work / "data", sizes, counts)
        if "scoring" in wanted:
            _progress(start, "scoring: guidance off and on")
            doc["scoring"] = scoring_section(paths, sizes, work)
        if "metrics" in wanted:
            _progress(start, f"metrics: streaming against exact, {sizes.metric_maps} maps")
            doc["metrics"] = metrics_section(sizes)
        if "gpu" in wanted:
            _progress(start, "GPU: " + ("measuring" if _has_cuda() else "no CUDA device, skipped"))
            doc["gpu"] = device_benchmark(quick, peak_tflops=peak_tflops)
        if "serving" in wanted:
            _progress(start, "serving: anomdiff predict in batches and one by one; mlflow models serve latency")
            doc["serving"] = serving_section(work / "serving")
        if "onnx" in wanted:
            _progress(start, "onnx: exported graphs under onnxruntime against PyTorch scoring (knn, proad)")
            doc["onnx"] = onnx_section(work / "onnx")
        # serving and onnx need no Ray; evaluation_memory starts a private Ray in each of its own processes.
        trains = (set(OPTIONAL_SECTIONS) - {"serving", "evaluation_memory", "onnx"}) & wanted
        if ray_sections or trains or (doc["gpu"] and ray_address(address)):
            # Workers' output stays off the console: the sections print their own progress.
            start_ray(address, quiet=True, num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False)
            doc["machine"]["ray_cluster"] = _cluster_resources()
        if {"train_overhead", "category_scaling"} & wanted:
            _progress(start, "training: Ray Train + DeepSpeed against the plain loop, then fed by Ray Data")
            overhead, scaling_train = training_sections(paths, sizes, work / "ray", image_size,
                                                        streamed="category_scaling" in wanted)
            if "train_overhead" in wanted:
                doc["train_overhead"] = overhead
        if {"ingest", "category_scaling"} & wanted:
            _progress(start, "ingest: Ray Data against the single-process loop")
            # The streamed training has already run Ray Data once; otherwise one pass warms it up.
            large = make_large_dataset(work / "data", sizes) if "ingest" in wanted else None
            figure = Path(figures) / "ingest_cpus.png" if figures and large else None
            doc["ingest"] = ingest_section(paths, sizes, image_size, warm_up="category_scaling" not in wanted,
                                           large=large, figure=figure)
        if "category_scaling" in wanted:
            _progress(start, "category scaling: ingest at 40 and 160 categories")
            doc["category_scaling"] = scaling_section(paths, sizes, image_size, doc["ingest"], scaling_train)
        if "zero_memory" in wanted:
            _progress(start, f"ZeRO memory: stages 0-3 on 2 workers ({sizes.zero_preset} preset)")
            doc["zero_memory"] = zero_section(sizes, work / "ray")
        if "methods" in wanted:
            _progress(start, "methods: each trained by the demo experiment on the synthetic and photograph datasets")
            doc["methods"] = methods_section(work / "methods")
        if "proad_ablation" in wanted:
            _progress(start, "Pro-AD ablation: without the constraint, one-way, few prototypes, at the demo's budget")
            doc["proad_ablation"] = methods_section(work / "proad_ablation", methods=(), variants=PROAD_ABLATION)
        if "drdc_refinement" in wanted:
            _progress(start, "DRDC: base only, refinement only, fused, and n_t / n_s, on one trained model per dataset")
            doc["drdc_refinement"] = drdc_section(work / "drdc_refinement")
        if "tune_inference" in wanted:
            _progress(start, "tune: the demo trained once, then a 50-trial inference-time search of its model")
            doc["tune_inference"] = tune_section(work / "tune_inference")
        if "evaluation_memory" in wanted:
            _progress(start, "evaluation memory: the driver's peak RSS at 1,000 and 10,000 test images")
            doc["evaluation_memory"] = evaluation_memory_section(work / "evaluation_memory")
        if doc["gpu"] and _cluster_resources().get("GPU", 0) >= 2:
            _progress(start, "GPU: ZeRO stages 0-3 at DiAD's batch 12 on 2 GPU workers (sd15 preset)")
            doc["gpu"]["zero_memory"] = zero_section(replace(sizes, zero_preset="sd15", zero_overrides=RANDOM_WEIGHTS),
                                                     work / "ray", use_gpu=True, batch_size=12)
    doc["targets"] = targets(doc)
    doc["wall_s"] = time.perf_counter() - start
    doc["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    _progress(start, "done")
    return doc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="anomdiff bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes: under 5 minutes on 2 cores")
    parser.add_argument("--json", dest="json_out", help="write the benchmark document here")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS + OPTIONAL_SECTIONS)} (default: all "
                             f"but {','.join(OPTIONAL_SECTIONS)})")
    parser.add_argument("--workdir", help="where the synthetic shards go (shared storage on a cluster; "
                                          "default: a temporary folder)")
    parser.add_argument("--figures", help="folder for the ingest figure, ingest_cpus.png (default: the --json "
                                          "file's folder)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in the built-in table")
    add_address_argument(parser)
    args = parser.parse_args(argv)
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = sorted(set(sections) - set(SECTIONS + OPTIONAL_SECTIONS))
    if unknown:
        raise ValueError(f"unknown sections {unknown}; choose from {', '.join(SECTIONS + OPTIONAL_SECTIONS)}")
    figures = args.figures or (str(Path(args.json_out).resolve().parent) if args.json_out else None)
    doc = run(args.quick, sections, args.workdir, args.peak_tflops, address=args.address, figures=figures)
    print(markdown_table(doc))
    print(json.dumps(doc["targets"]))
    if args.json_out:
        write_json_atomic(args.json_out, doc)
        print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
