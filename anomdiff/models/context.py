"""Cross-attention context for the UNet and SG network: learned tokens instead of a text encoder.

A ``ContextProvider`` maps a batch to ``B x T x D`` tokens (D = the UNet's ``cross_attention_dim``).
DiAD conditions every image on the same (empty) text prompt through CLIP; with no text encoder the
condition here is a learned token set. Under the unified protocol the seeds evaluate (one model, not
told a test image's category; ``model.conditioning: label_free``, the default) that set is shared by
every image (``SharedTokens``); a production line that knows its product may ask for one set per
category (``category_aware``: ``CategoryTokens``). Other methods supply tokens from other sources
(DPDiff-AD's prototype tokens) by subclassing ``ContextProvider`` or joining providers with
``ConcatContext``.
"""

from __future__ import annotations

import torch
from torch import nn


class ContextProvider(nn.Module):
    """Interface: ``forward(batch) -> B x T x D`` and the unconditional context for guidance."""

    num_tokens: int
    dim: int

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement forward(batch) -> B x T x D tokens")

    def unconditional(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The "empty prompt" of classifier-free guidance: zeros, the same for every image."""
        reference = next(iter(self.parameters()), None)
        device = reference.device if reference is not None else batch["image"].device
        dtype = reference.dtype if reference is not None else torch.float32
        return torch.zeros(len(batch["image"]), self.num_tokens, self.dim, device=device, dtype=dtype)


class SharedTokens(ContextProvider):
    """``num_tokens`` learned tokens shared by every image: the label-free condition. It never reads
    ``batch["category_index"]``, so nothing about a test image's category can reach the model."""

    def __init__(self, num_tokens: int, dim: int):
        super().__init__()
        self.num_tokens, self.dim = num_tokens, dim
        self.tokens = nn.Parameter(torch.randn(num_tokens, dim) * dim**-0.5)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.tokens.expand(len(batch["image"]), -1, -1)


class CategoryTokens(ContextProvider):
    """``num_tokens`` learned tokens per category, selected by ``batch["category_index"]``."""

    def __init__(self, num_categories: int, num_tokens: int, dim: int):
        super().__init__()
        if num_categories < 1:
            raise ValueError(f"need at least one category, got {num_categories}")
        self.num_categories, self.num_tokens, self.dim = num_categories, num_tokens, dim
        self.tokens = nn.Parameter(torch.randn(num_categories, num_tokens, dim) * dim**-0.5)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        index = batch["category_index"].to(self.tokens.device).long()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_categories):
            raise IndexError(
                f"category_index out of range: got {index.tolist()}, the model has {self.num_categories} categories"
            )
        return self.tokens[index]


class ConcatContext(ContextProvider):
    """Several providers' tokens side by side along the token axis (same width D)."""

    def __init__(self, *providers: ContextProvider):
        super().__init__()
        dims = {p.dim for p in providers}
        if len(dims) != 1:
            raise ValueError(f"providers disagree on the token width: {sorted(dims)}")
        self.providers = nn.ModuleList(providers)
        self.dim = dims.pop()
        self.num_tokens = sum(p.num_tokens for p in providers)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([p(batch) for p in self.providers], dim=1)

    def unconditional(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([p.unconditional(batch) for p in self.providers], dim=1)


def condition_tokens(conditioning: str, num_categories: int, num_tokens: int, dim: int) -> ContextProvider:
    """The learned part of the context under ``model.conditioning``: shared (``label_free``) or one
    set per category (``category_aware``)."""
    if conditioning == "label_free":
        return SharedTokens(num_tokens, dim)
    if conditioning == "category_aware":
        return CategoryTokens(num_categories, num_tokens, dim)
    raise ValueError(f"model.conditioning must be 'label_free' or 'category_aware', got {conditioning!r}")
