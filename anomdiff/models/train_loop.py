"""A small single-process training loop for unit tests, debugging and the CPU demo.

The distributed loop (Ray Train + DeepSpeed) lives in ``pipelines/train.py``; this one runs the same
model objectives (``vae_loss`` for stage ``vae``, ``training_loss`` for stage ``denoiser``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def fit(
    model,
    batches: Iterable[dict],
    steps: int,
    lr: float,
    stage: str = "denoiser",
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    schedule: str = "cosine",
    calibrate_latents: bool = True,
) -> list[float]:
    """Train ``model`` for ``steps`` AdamW steps on ``batches`` (re-iterated when exhausted);
    returns the loss of every step.

    ``schedule``: ``cosine`` warms up over the first 10% of the steps and anneals to zero (a short
    run gets much further than at a constant rate), or ``constant``. After the ``vae`` stage the
    latent scale is fitted to the last batch (``calibrate_latents``), so the denoiser sees
    unit-variance latents."""
    model.set_stage(stage)
    model.train()
    params = model.trainable_parameters()
    if not params:
        raise ValueError(f"stage {stage!r} has nothing to train")
    device = params[0].device
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    elif schedule == "constant":
        scheduler = None
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose 'cosine' or 'constant'")
    objective = model.vae_loss if stage == "vae" else model.training_loss
    losses, iterator, batch = [], iter(batches), None
    for _ in range(steps):
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(batches)
            batch = next(iterator, None)
            if batch is None:
                raise ValueError(
                    f"batches ran out after {len(losses)} steps; pass a re-iterable (a list) to cycle over it"
                ) from None
        batch = _to_device(batch, device)
        loss = objective(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(float(loss.detach()))
    if stage == "vae" and calibrate_latents and model.cfg.refits_latent_scale and batch is not None:
        model.fit_latent_scale(batch["image"])
    model.set_stage("denoiser")
    model.eval()
    return losses
