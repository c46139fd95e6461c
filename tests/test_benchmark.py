"""The benchmark job: its arithmetic, its byte counting, and the document a tiny run writes."""

import json
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.bench.gpu import main as gpu_check
from pipelines.bench.ingest import cpu_steps
from pipelines.bench.job import main, run
from pipelines.bench.measure import (
    TimedBatches,
    median_step,
    mfu,
    parse_operator_stats,
    peak_bf16_flops,
    synthetic_maps,
    torch_threads,
)
from pipelines.bench.report import markdown_table
from pipelines.bench.sizes import SECTIONS, Sizes
from pipelines.bench.zero import zero_footprint, zero_model_state_bytes

MINUSCULE = Sizes(
    train_images=20, stored_size=64, test_per_category=2, repeats=1, train_steps=5, warmup_steps=1, scaling_steps=4,
    zero_preset="tiny", zero_overrides=("model.image_size=32", "model.vae.sample_size=32", "model.unet.sample_size=8"),
    scoring_images=2, scoring_batch=2, metric_maps=100, metric_size=32, large_ingest_images=20,
)


def test_mfu_is_achieved_flops_over_the_peak():
    assert mfu(2e12, 0.5, 8e12) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="positive"):
        mfu(1e12, 0.0, 1e15)


@pytest.mark.parametrize(("name", "tflops"), [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0),
])
def test_peak_table_tells_the_variants_apart(name, tflops):
    assert peak_bf16_flops(name) == pytest.approx(tflops * 1e12)


def test_an_unknown_device_has_no_peak():
    assert peak_bf16_flops("Some Future Accelerator") is None


def test_step_time_is_the_median_interval_after_warm_up():
    assert median_step([0.0, 10.0, 11.0, 12.5, 13.5], warmup=1) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no step"):
        median_step([0.0, 1.0], warmup=1)


def test_timed_batches_stamp_every_request_and_repeat_a_fixed_batch():
    batch = {"image": torch.zeros(1)}
    timed = TimedBatches(batch)
    assert [next(timed) for _ in range(3)] == [batch] * 3 and len(timed.times) == 3
    assert timed.times == sorted(timed.times)
    cycled = TimedBatches(iter([1, 2]))
    assert list(cycled) == [1, 2] and len(cycled.times) == 3  # the failed third request is stamped too


def test_operator_stats_are_read_from_the_dataset_stats_text():
    text = ("Operator 1 ListFiles: 1 tasks executed, 1 blocks produced in 20.17s\n* Remote wall time: ...\n"
            "Operator 3 MapBatches(SelectHoldout)->MapBatches(DecodeBatch): 10 tasks executed, 20 blocks produced "
            "in 1.45s\n")
    assert parse_operator_stats(text) == {
        "ListFiles": {"tasks": 1, "wall_s": 20.17},
        "MapBatches(SelectHoldout)->MapBatches(DecodeBatch)": {"tasks": 10, "wall_s": 1.45}}


def test_synthetic_maps_are_seeded_and_every_category_has_both_labels():
    categories, scores, labels, maps, masks = synthetic_maps(40, 16, seed=3)
    again = synthetic_maps(40, 16, seed=3)
    assert np.array_equal(maps, again[3]) and maps.shape == masks.shape == (40, 16, 16)
    for name in np.unique(categories):
        assert set(labels[categories == name]) == {0, 1}
    assert (masks.reshape(40, -1).max(axis=1) == labels).all()
    assert np.allclose(scores, maps.reshape(40, -1).max(axis=1))


def _adam_engine():
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3)  # 15 parameters, 60 bytes
    optimizer = torch.optim.Adam(module.parameters())
    module(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    return types.SimpleNamespace(module=module, optimizer=optimizer)


def test_footprint_of_a_plain_optimizer_counts_parameters_gradients_and_adam_state():
    counted = zero_footprint(_adam_engine())
    # Adam keeps two moments per parameter and a 4-byte step per tensor.
    assert counted == {"parameters": 60, "optimizer_state": 2 * 60 + 2 * 4, "gradients": 60, "buffers": 0,
                       "total": 60 + 128 + 60}


def test_footprint_counts_a_partitioned_rank_and_shared_storage_once():
    engine = _adam_engine()
    flat = torch.zeros(8)  # this rank's gradient partition; the per-parameter entries are views into it
    bucket = types.SimpleNamespace(buffer=torch.zeros(100))
    inner = engine.optimizer
    for p in engine.module.parameters():
        p.ds_tensor = p.data.flatten()[: p.numel() // 2].clone()
        p.grad = None
    engine.optimizer = types.SimpleNamespace(
        optimizer=inner, averaged_gradients={0: [flat[:4], flat[4:]]}, ipg_buckets={torch.float32: bucket})
    counted = zero_footprint(engine)
    assert counted["parameters"] == 60 + 4 * (6 + 1)  # the whole tensors still held, plus the partitions
    assert counted["gradients"] == 8 * 4 and counted["buffers"] == 100 * 4
    assert counted["total"] == counted["parameters"] + counted["optimizer_state"] + counted["gradients"]


def test_tiny_run_writes_the_documented_shape(tmp_path):
    doc = run(sections=("scoring", "metrics", "gpu"), workdir=str(tmp_path), sizes=MINUSCULE)
    assert set(SECTIONS) <= set(doc)
    assert doc["ingest"] is None and doc["train_overhead"] is None and doc["zero_memory"] is None
    assert doc["gpu"] is None or "mfu" in doc["gpu"]
    scoring = doc["scoring"]
    assert scoring["images_per_s"] > 0 and scoring["ratio_vs_guidance"] > 0 and scoring["ddim_steps"] == 10
    metrics = doc["metrics"]
    assert metrics["n_maps"] == {"streaming": 100, "exact": 100} and metrics["speedup"] > 0
    assert metrics["max_abs_difference"] < 0.01
    assert doc["targets"] == {"train_overhead_ratio_le_1.10": None, "zero_stage3_le_0.55_stage0": None,
                              "ingest_160_over_10_within_10pct": None, "ingest_64px_ge_0.5_per_cpu": None,
                              "ingest_256px_ge_0.8_per_cpu": None}
    assert json.loads(json.dumps(doc)) == doc
    table = markdown_table(doc)
    assert "guidance off / on" in table and "metrics at 100 maps" in table


def test_the_gpu_check_runs_on_the_cpu_with_the_tiny_preset(tmp_path, capsys):
    """``python -m pipelines.bench.gpu`` end to end at tiny size, two of its ZeRO settings included
    (a plain engine, and ZeRO-3 offloading optimizer and weights), each in a process of its own."""
    with torch_threads(1):  # two threads on a shared 2-core machine wait on each other
        gpu_check(["--device", "cpu", "--preset", "tiny", "--batch-size", "2", "--image-size", "64", "--quick",
                   "--steps", "1", "--peak-tflops", "1.0", "--zero", "0,3+offload", "--json", str(tmp_path / "g.json")])
    result = json.loads((tmp_path / "g.json").read_text())
    assert result["flops_per_step"] > 0 and result["train_images_per_s"] > 0 and result["score_latency_s"] > 0
    assert result["mfu"] == pytest.approx(result["flops_per_step"] / result["train_step_s"] / 1e12)
    assert result["plain_adamw_peak_bytes"] is None and result["ddim_steps"] == 10
    zero = result["zero_one_device"]
    assert list(zero) == ["0", "3+offload"] and zero["3+offload"]["stage"] == 3
    for z in zero.values():
        assert z["step_s"] > 0 and z["host_peak_rss_bytes"] > 0 and z["device_peak_bytes"] is None
        predicted = zero_model_state_bytes(z["parameters"], z["trainable_parameters"], z["stage"], 1, False,
                                           z["offload_optimizer"], z["offload_params"])
        assert z["predicted_model_state_bytes"] == predicted
        # One rank holds every byte: what DeepSpeed holds is what the model predicts, wherever it lives.
        assert z["counted_bytes"]["total"] == pytest.approx(predicted["device"] + predicted["host"], rel=0.05)
    assert zero["3+offload"]["predicted_model_state_bytes"]["device"] == 0
    assert "ZeRO 3+offload:" in capsys.readouterr().out


def test_the_zero_memory_model_splits_model_state_by_stage_and_offload():
    gb = 1e9
    # 1e9 weights, half trained, bf16 on 2 ranks: weights 2 GB, gradients 1 GB, optimizer state 6 GB whole.
    assert zero_model_state_bytes(1e9, 5e8, 0, 2)["device"] == 9 * gb
    assert zero_model_state_bytes(1e9, 5e8, 1, 2)["device"] == 6 * gb
    assert zero_model_state_bytes(1e9, 5e8, 2, 2)["device"] == 5.5 * gb
    assert zero_model_state_bytes(1e9, 5e8, 3, 2)["device"] == 4.5 * gb
    # Offloaded: optimizer state and a float32 gradient partition on the host, only weights on the device.
    assert zero_model_state_bytes(1e9, 5e8, 3, 2, offload_optimizer=True) == {"device": 1 * gb, "host": 4 * gb}
    assert zero_model_state_bytes(1e9, 5e8, 3, 2, bf16=False)["device"] == 5 * gb  # 4 + 4 + 8 bytes, no master
    assert zero_model_state_bytes(1e9, 5e8, 3, 1, True, True, True) == {"device": 0.0, "host": 10 * gb}


def test_the_gpu_check_refuses_to_pass_without_a_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device here"):
        gpu_check(["--zero", "none"])


@pytest.mark.parametrize("cpus, steps", [(1, [1]), (2, [1, 2]), (6, [1, 2, 4, 6]), (8, [1, 2, 4, 8]), (0.5, [])])
def test_decode_cpu_steps_double_up_to_the_cluster(cpus, steps):
    assert cpu_steps(cpus) == steps


def test_an_unknown_section_is_refused():
    with pytest.raises(ValueError, match="unknown sections"):
        main(["--sections", "ingest,warp_drive"])


@pytest.mark.slow
def test_ray_sections_on_a_local_ray(tmp_path):
    ray = pytest.importorskip("ray")
    try:
        doc = run(sections=("ingest", "zero_memory"), workdir=str(tmp_path), sizes=MINUSCULE, figures=str(tmp_path))
    finally:
        ray.shutdown()
    ingest = doc["ingest"]
    assert ingest["images"] > 0 and ingest["ratio"] == pytest.approx(
        ingest["images_per_s"] / ingest["baseline_images_per_s"])
    assert set(ingest["by_size"]) == {"64", "256"} and Path(ingest["figure"]).stat().st_size > 0
    for row in ingest["by_size"].values():
        curve = row["images_per_s_by_cpus"]
        assert set(curve) == {"1", "2"} and all(v > 0 for v in curve.values())
    stages = doc["zero_memory"]["per_stage"]
    assert set(stages) == {"0", "1", "2", "3", "3_persist_0"}
    # Two ranks: ZeRO-1 halves the Adam moments (plus an fp32 master partition), ZeRO-2 also the
    # gradients, ZeRO-3 without persistent tensors also the parameters.
    assert stages["1"]["optimizer_state"] < stages["0"]["optimizer_state"]
    assert stages["2"]["gradients"] < stages["0"]["gradients"]
    assert stages["3_persist_0"]["parameters"] < stages["0"]["parameters"]
    assert doc["zero_memory"]["ratio"] == pytest.approx(stages["3"]["total"] / stages["0"]["total"])


def test_the_methods_table_names_dataset_method_and_protocol():
    row = {"image_auroc": 0.9, "pixel_auroc": 0.8, "aupro": 0.7, "protocol": "label_free", "train_s": 61.0,
           "scoring_images_per_s": 12.5}
    doc = {"methods": {"experiment": "demo", "protocol": "label_free",
                       "photos": {"categories": 11, "knn": row, "diad": {**row, "image_auroc": 0.95}}}}
    table = markdown_table(doc)
    assert "| knn on photos (11 categories, demo budget, label_free)" in table
    assert "0.950 / 0.800 / 0.700, 61 s, 12.5 images/s" in table


def test_the_drdc_table_has_a_row_per_variant_and_the_ratio_over_diad():
    row = {"image_auroc": 0.9, "pixel_auroc": 0.8, "aupro": 0.7, "scoring_images_per_s": 1.25}
    doc = {"drdc_refinement": {"experiment": "demo", "protocol": "label_free",
                               "synthetic": {"categories": 8, "train_s": 300.0, "base_only": row,
                                             "fused": {**row, "image_auroc": 0.95}, "timesteps=1": row,
                                             "fused_scoring_ratio_over_diad": 0.25}}}
    table = markdown_table(doc)
    assert "| drdc on synthetic, fused: image / pixel AUROC / AUPRO, scoring | 0.950 / 0.800 / 0.700, 1.25 images/s" \
        in table
    assert "| drdc on synthetic, timesteps=1:" in table and "| drdc fused scoring over diad's on synthetic | x0.25" \
        in table


def test_peak_rss_sees_memory_the_block_held_and_freed():
    from pipelines.bench.evaluation import PeakRSS

    with PeakRSS(interval=0.001) as rss:
        held = np.ones(64 * 2**20, np.uint8)
        time.sleep(0.05)  # a few samples while it is resident
        del held
    assert rss.growth() >= 60 * 2**20 and rss.growth("RssAnon") >= 60 * 2**20


def test_the_evaluation_memory_table_has_a_row_per_size_and_mode():
    run = {"growth_bytes": 40 * 2**20, "RssAnon_growth_bytes": 25 * 2**20, "seconds": 25.0}
    doc = {"evaluation_memory": {"image_size": 64, "by_images": {"10000": {"streaming": run},
                                                                 "1000": {"streaming": run, "exact": run}}}}
    table = markdown_table(doc)
    assert "| evaluation driver, 10,000 test images of 64 px (streaming): peak RSS growth (own memory) | " \
           "+40 MiB (+25 MiB), 25 s |" in table
    assert "1,000 test images of 64 px (exact)" in table
