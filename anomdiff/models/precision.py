"""Mixed precision for a model whose weights a DeepSpeed bf16 engine holds in bfloat16: the
forward passes run under ``torch.autocast`` in bf16 whenever the weights themselves are bf16
(``train.precision: bf16``, or a GPU), so inputs in float32 meet bf16 weights, and on CUDA also
for float32 weights when the model's ``autocast`` is on. Float32 weights on a CPU run in float32."""

from __future__ import annotations

import torch


def bf16_autocast(module: torch.nn.Module, device: torch.device, wanted: bool = True):
    """The autocast context for ``module``'s forward on ``device`` (see the module docstring)."""
    weights_bf16 = any(p.dtype == torch.bfloat16 for p in module.parameters())
    enabled = weights_bf16 or (wanted and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
