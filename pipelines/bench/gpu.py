"""Section 7, ``gpu``: training images/s and MFU, the peak memory of a plain AdamW step and scoring
latency on one GPU. Library only: it runs without Ray (``anomdiff/`` and torch)."""

from __future__ import annotations

import platform
import time

import numpy as np

from pipelines.bench.measure import TimedBatches, median_step, mfu, peak_bf16_flops


def device_benchmark(quick: bool, device: str = "cuda", preset: str = "sd15", batch_size: int = 12,
                     image_size: int = 256, peak_tflops: float | None = None, steps: int | None = None) -> dict | None:
    """Section 7: training images/s and MFU (FLOPs of one step by ``FlopCounterMode``), peak memory
    of a plain AdamW step, and scoring latency per image at 10 DDIM steps; ``None`` without the device.
    Needs only ``anomdiff/`` and torch; the ZeRO stages are measured by ``zero_section`` on GPUs."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from anomdiff.models import build_model, load_preset
    from anomdiff.models.config import ModelConfig
    from anomdiff.models.train_loop import fit

    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    peak = peak_tflops * 1e12 if peak_tflops else peak_bf16_flops(name) if cuda else None
    # Random weights: throughput and memory do not depend on them, and a GPU machine may have no Hub access.
    cfg = ModelConfig.from_dict({"image_size": image_size, "diffusion": {"ddim_steps": 10}, "pretrained": None,
                                 "backbone": {"pretrained": None}}, base=load_preset(preset))
    steps = steps or (5 if quick else 20)
    warmup = 2
    torch.manual_seed(0)
    model = build_model(cfg, 4).to(device)
    batch = {"image": torch.rand(batch_size, 3, image_size, image_size, device=device) * 2 - 1,
             "category_index": torch.arange(batch_size, device=device) % 4}
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    timed = TimedBatches(batch)
    fit(model, timed, steps + warmup + 1, lr=1e-5, schedule="constant")
    step_s = median_step(timed.times, warmup)
    peak_memory = int(torch.cuda.max_memory_allocated(device)) if cuda else None

    model.train()
    with FlopCounterMode(display=False) as counter:
        model.training_loss(batch)["loss"].backward()
    model.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()

    model.eval()
    one = {"image": batch["image"][:1], "category_index": batch["category_index"][:1]}
    latencies = []
    for _ in range(3 if quick else 10):
        if cuda:
            torch.cuda.synchronize(device)
        tick = time.perf_counter()
        model.score(one)
        if cuda:
            torch.cuda.synchronize(device)
        latencies.append(time.perf_counter() - tick)
    return {
        "device": name, "preset": preset, "batch_size": batch_size, "image_size": image_size,
        "dtype": "bf16 autocast" if cuda and cfg.autocast else "fp32",
        "train_images_per_s": batch_size / step_s, "train_step_s": step_s, "flops_per_step": flops,
        "peak_bf16_flops": peak, "mfu": mfu(flops, step_s, peak) if peak else None,
        "plain_adamw_peak_bytes": peak_memory, "score_latency_s": float(np.median(latencies[1:] or latencies)),
        "ddim_steps": cfg.diffusion.ddim_steps,
    }
