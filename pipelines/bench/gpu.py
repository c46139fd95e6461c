"""Section 7, ``gpu``, the GPU check: on one GPU, sd15 training images/s and MFU, the peak memory of
a plain AdamW step, the memory of each DeepSpeed ZeRO stage (with and without CPU offload) beside
the ZeRO memory model, and scoring latency. No Ray and no MLflow: ``anomdiff/``, torch, diffusers
and (for the ZeRO stages) DeepSpeed. One command, which stops with an error on anything that fails:

    python -m pipelines.bench.gpu --json gpu.json
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from pipelines.bench.measure import TimedBatches, median_step, mfu, peak_bf16_flops
from pipelines.bench.sizes import RANDOM_WEIGHTS

# ZeRO on one device, name -> (stage, offload optimizer, offload parameters). Over one rank the
# stages partition nothing: they differ from stage 0 by their buffers and by what they can offload
# to the host, which is what decides whether the paper-size model trains on one GPU.
ONE_DEVICE_ZERO = {"0": (0, False, False), "1": (1, False, False), "2": (2, False, False),
                   "3": (3, False, False), "2+offload": (2, True, False), "3+offload": (3, True, True)}


def device_benchmark(quick: bool, device: str = "cuda", preset: str = "sd15", batch_size: int = 12,
                     image_size: int = 256, peak_tflops: float | None = None, steps: int | None = None,
                     zero: dict | None = ONE_DEVICE_ZERO) -> dict | None:
    """Section 7: training images/s and MFU (FLOPs of one step by ``FlopCounterMode``), peak memory
    of a plain AdamW step, scoring latency per image at 10 DDIM steps, then each of ``zero``'s
    ZeRO settings on the same model and batch (:func:`zero_on_one_device`; ``None``: skipped);
    ``None`` without the device. DiAD's paper trains at batch 12 and 256 px."""
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
    del model, batch, one
    if cuda:
        torch.cuda.empty_cache()  # the ZeRO processes need the device's memory
    zero_stages = zero_on_one_device(zero, device, preset, batch_size, image_size, min(steps, 5)) if zero else None
    return {
        "device": name, "preset": preset, "batch_size": batch_size, "image_size": image_size,
        "dtype": "bf16 autocast" if cuda and cfg.autocast else "fp32",
        "train_images_per_s": batch_size / step_s, "train_step_s": step_s, "flops_per_step": flops,
        "peak_bf16_flops": peak, "mfu": mfu(flops, step_s, peak) if peak else None,
        "plain_adamw_peak_bytes": peak_memory, "score_latency_s": float(np.median(latencies[1:] or latencies)),
        "ddim_steps": cfg.diffusion.ddim_steps, "zero_one_device": zero_stages,
    }


def zero_on_one_device(variants: dict, device: str, preset: str, batch_size: int, image_size: int,
                       steps: int) -> dict:
    """Each of ``variants`` (name -> ZeRO stage, offload optimizer, offload parameters) trained for
    ``steps`` steps in a fresh process of its own, so each peak is its own. A variant that raises or
    whose process dies stops the whole check with its name."""
    from pipelines.bench.zero import zero_model_state_bytes

    spawn = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    results = {}
    for name, (stage, offload_optimizer, offload_params) in variants.items():
        spec = {"device": device, "preset": preset, "batch_size": batch_size, "image_size": image_size,
                "steps": steps, "stage": stage, "offload_optimizer": offload_optimizer,
                "offload_params": offload_params}
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            try:
                measured = pool.submit(zero_stage_process, spec).result()
            except BrokenProcessPool as exc:
                raise RuntimeError(f"ZeRO {name} on {device}: its process died ({exc}); out of host memory?") from exc
            except Exception as exc:
                raise RuntimeError(f"ZeRO {name} on {device}: {type(exc).__name__}: {exc}") from exc
        measured["predicted_model_state_bytes"] = zero_model_state_bytes(
            measured["parameters"], measured["trainable_parameters"], stage, 1, measured["bf16"],
            offload_optimizer, offload_params)
        results[name] = measured
    return results


def zero_stage_process(spec: dict) -> dict:
    """One DeepSpeed engine over a one-rank process group (NCCL on a GPU, gloo on a CPU), built by
    the training job's own ``pipelines.engine.initialize``: ``spec["steps"]`` timed steps on a fixed
    batch, then a counted forward and backward. Returns the step time, the device's peak allocated
    bytes (GPU), this process's peak resident bytes, and what ``zero_footprint`` counts."""
    import os
    import socket

    import torch

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    from pipelines.bench.measure import experiment, seeded_model
    from pipelines.bench.zero import zero_footprint
    from pipelines.engine import initialize, weights_to_bf16

    cuda = spec["device"].startswith("cuda")
    b, size = spec["batch_size"], spec["image_size"]
    cfg = experiment(spec["preset"], *RANDOM_WEIGHTS, f"model.image_size={size}", f"train.batch_size={b}",
                     "train.schedule=constant",
                     f"train.precision={'bf16' if cuda else 'fp32'}", f"train.zero.stage={spec['stage']}",
                     f"train.zero.offload_optimizer={str(spec['offload_optimizer']).lower()}",
                     f"train.zero.offload_params={str(spec['offload_params']).lower()}")
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    model = seeded_model(cfg, 4)
    model.set_stage("denoiser")
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.trainable_parameters())
    if cfg.train.bf16:
        weights_to_bf16(model)
    model.to(spec["device"])
    engine = initialize(model, cfg, cfg.train.lr, spec["stage"], spec["steps"] + 1)
    torch.manual_seed(0)
    batch = {"image": torch.rand(b, 3, size, size, device=spec["device"]) * 2 - 1,
             "category_index": torch.arange(b, device=spec["device"]) % 4}
    times = []
    for _ in range(spec["steps"]):
        tick = time.perf_counter()
        engine.backward(engine(batch)["loss"])
        engine.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tick)
    engine.backward(engine(batch)["loss"])  # gradients alive for the count
    counted = zero_footprint(engine)
    return {
        "stage": spec["stage"], "offload_optimizer": spec["offload_optimizer"],
        "offload_params": spec["offload_params"], "bf16": cfg.train.bf16,
        "parameters": parameters, "trainable_parameters": trainable,
        "step_s": float(np.median(times[1:] or times)),  # the first step adds DeepSpeed's warm-up
        "device_peak_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
        "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "counted_bytes": counted,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 timed steps instead of 20, 3 scoring runs")
    parser.add_argument("--steps", type=int, help="timed training steps (default: 20, or 5 with --quick)")
    parser.add_argument("--preset", default="sd15", help="model preset (default: sd15, random weights)")
    parser.add_argument("--batch-size", type=int, default=12, help="per step (default: 12, DiAD's)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--zero", default=",".join(ONE_DEVICE_ZERO),
                        help=f"ZeRO settings to measure, of {','.join(ONE_DEVICE_ZERO)} ('none': skip)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in the built-in table")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to try the check at tiny size")
    parser.add_argument("--json", dest="json_out", help="also write the results here")
    args = parser.parse_args(argv)
    names = [] if args.zero == "none" else [n.strip() for n in args.zero.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ONE_DEVICE_ZERO))
    if unknown:
        parser.error(f"unknown ZeRO settings {unknown}; choose from {','.join(ONE_DEVICE_ZERO)}")
    doc = device_benchmark(args.quick, args.device, args.preset, args.batch_size, args.image_size,
                           args.peak_tflops, args.steps, zero={n: ONE_DEVICE_ZERO[n] for n in names} or None)
    if doc is None:
        import torch

        raise SystemExit(f"python -m pipelines.bench.gpu: no CUDA device here (torch {torch.__version__}); "
                         "run it on a GPU machine, or pass --device cpu to try it at a tiny size")
    print(describe(doc))
    if args.json_out:
        from anomdiff.atomic import write_json_atomic

        write_json_atomic(args.json_out, doc)
        print(f"wrote {args.json_out}")


def describe(doc: dict) -> str:
    """The GPU check's results as lines a person reads."""
    gib = 2**30
    lines = [f"{doc['device']}: {doc['preset']}, batch {doc['batch_size']}, {doc['image_size']} px, {doc['dtype']}",
             f"  training: {doc['train_images_per_s']:.2f} images/s, {doc['train_step_s']:.3f} s per step, MFU "
             + (f"{doc['mfu']:.1%}" if doc["mfu"] is not None else "n/a (no peak known: --peak-tflops)"),
             "  plain AdamW peak: " + (f"{doc['plain_adamw_peak_bytes'] / gib:.2f} GiB"
                                       if doc["plain_adamw_peak_bytes"] is not None else "n/a on a CPU"),
             f"  scoring: {doc['score_latency_s']:.3f} s per image at {doc['ddim_steps']} DDIM steps"]
    for name, z in (doc.get("zero_one_device") or {}).items():
        predicted = z["predicted_model_state_bytes"]
        peak = f"{z['device_peak_bytes'] / gib:.2f} GiB peak" if z["device_peak_bytes"] is not None else "no device"
        lines.append(f"  ZeRO {name}: {z['step_s']:.3f} s per step, {peak}, host {z['host_peak_rss_bytes'] / gib:.2f}"
                     f" GiB peak RSS; model state predicted {predicted['device'] / gib:.2f} GiB on the device + "
                     f"{predicted['host'] / gib:.2f} GiB on the host, counted {z['counted_bytes']['total'] / gib:.2f}"
                     " GiB")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
