"""DPDiff-AD's dual prototype banks: local (nearest-prototype aggregation) and global (optimal transport).

Both banks live in one feature space: multi-scale maps of the frozen timm backbone, resized to the
latent grid, concatenated and projected by a learnable 1x1 conv to ``dim`` channels, L2-normalised.
The backbone is the one DiAD already runs for its anomaly map, so the banks cost no extra network,
get no gradient into it, and see features that do not drift as the denoiser trains (SG-encoder
features would move under the banks at every step).

- Local bank (K_L vectors): every spatial feature is rebuilt from its ``top_k`` nearest prototypes,
  weighted by ``softmax(-distance / temperature)``. The bank holds normal patterns only, so an
  anomalous region is rebuilt as the nearest normal pattern, not as itself. A commitment loss
  (VQ-VAE's codebook term) pulls the prototypes toward the features they rebuild.
- Global bank (K_G vectors): image-level features (the pooled map) are matched to the bank by entropic
  optimal transport with uniform marginals (POT's ``sinkhorn2`` on the torch backend). Uniform
  marginals make every prototype carry an equal share of the batch, so none dies, and the images of
  different categories settle on different prototypes as the number of categories grows. An image's
  soft assignment ``softmax(-distance / temperature)`` weights the prototype tokens it attends to.

Both losses see the features detached: the banks follow the features, the projector learns from the
denoising objective only. Letting the bank losses move the projector too has a trivial joint minimum
(features and prototypes collapsing together), the codebook collapse known from VQ models.
"""

from __future__ import annotations

from dataclasses import dataclass

import ot
import torch
import torch.nn.functional as F
from torch import nn

from anomdiff.models.config import PrototypeConfig
from anomdiff.models.context import ContextProvider


def squared_distances(x: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """``N x K`` squared Euclidean distances between the rows of ``x`` (N x D) and ``bank`` (K x D)."""
    return (x.pow(2).sum(-1, keepdim=True) - 2 * x @ bank.T + bank.pow(2).sum(-1)).clamp_min(0)


def soft_topk_aggregate(x: torch.Tensor, bank: torch.Tensor, top_k: int, temperature: float) -> torch.Tensor:
    """Rebuild every row of ``x`` (N x D) from its ``top_k`` nearest rows of ``bank`` (K x D), weighted
    by ``softmax(-distance / temperature)`` over those k (DPDiff-AD's local prototype aggregation)."""
    distances = squared_distances(x, bank)
    nearest, index = distances.topk(min(top_k, len(bank)), dim=-1, largest=False)
    weights = torch.softmax(-nearest / temperature, dim=-1)
    return (weights.unsqueeze(-1) * bank[index]).sum(1)


def sinkhorn_cost(features: torch.Tensor, bank: torch.Tensor, reg: float) -> torch.Tensor:
    """Entropic OT cost ``<P*, M>`` between ``features`` (B x D) and ``bank`` (K x D), uniform
    marginals, ``M`` the squared Euclidean cost; differentiable (POT, torch backend)."""
    cost = squared_distances(features, bank)
    a = torch.full((len(features),), 1.0 / len(features), dtype=cost.dtype, device=cost.device)
    b = torch.full((len(bank),), 1.0 / len(bank), dtype=cost.dtype, device=cost.device)
    return ot.sinkhorn2(a, b, cost, reg, method="sinkhorn_log", numItermax=200, stopThr=1e-7)


def usage_entropy(assignments: torch.Tensor) -> float:
    """Normalised entropy (0: one prototype serves everything, 1: all serve equally) of the mean of
    ``assignments`` (N x K, soft weights or one-hot rows)."""
    usage = assignments.float().mean(0)
    usage = usage / usage.sum()
    entropy = -(usage * usage.clamp_min(1e-12).log()).sum()
    return float(entropy / torch.log(torch.tensor(float(assignments.shape[1]))))


@dataclass
class PrototypeOutput:
    """What the banks give the denoiser (``local``, ``weights``) and the losses that train them."""

    local: torch.Tensor  # B x D x h x w, features rebuilt from the local bank
    weights: torch.Tensor  # B x K_G, each image's soft assignment to the global bank
    features: torch.Tensor  # B x D x h x w, the projected (normalised) features themselves
    commitment: torch.Tensor
    ot: torch.Tensor


class PrototypeBanks(nn.Module):
    """Projector, local and global banks, and the zero-initialised 1x1 convs that add the rebuilt
    local map to the UNet's additional residuals (one per SG residual, plus the middle block's)."""

    def __init__(
        self, cfg: PrototypeConfig, feature_channels: list[int], residual_channels: list[int], mid_channels: int
    ):
        super().__init__()
        self.cfg = cfg
        self.project = nn.Conv2d(sum(feature_channels), cfg.dim, kernel_size=1)
        self.local_bank = nn.Parameter(torch.randn(cfg.num_local, cfg.dim))
        self.global_bank = nn.Parameter(torch.randn(cfg.num_global, cfg.dim))
        self.inject = nn.ModuleList(nn.Conv2d(cfg.dim, c, kernel_size=1) for c in [*residual_channels, mid_channels])
        for conv in self.inject:  # ControlNet's zero convolutions: at initialisation DPDiff-AD is DiAD
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def embed(self, feature_maps: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        """Multi-scale backbone maps -> one ``B x dim x grid`` map, L2-normalised per position."""
        resized = [F.interpolate(f.float(), size=grid, mode="bilinear", align_corners=False) for f in feature_maps]
        return F.normalize(self.project(torch.cat(resized, dim=1)), dim=1)

    def forward(self, feature_maps: list[torch.Tensor], grid: tuple[int, int], losses: bool = True) -> PrototypeOutput:
        c = self.cfg
        features = self.embed(feature_maps, grid)
        b, d, h, w = features.shape
        flat = features.permute(0, 2, 3, 1).reshape(-1, d)
        local_bank = F.normalize(self.local_bank, dim=-1)
        global_bank = F.normalize(self.global_bank, dim=-1)
        local = soft_topk_aggregate(flat, local_bank, c.top_k, c.temperature)
        image_level = F.normalize(features.mean((2, 3)), dim=-1)
        weights = torch.softmax(-squared_distances(image_level, global_bank) / c.temperature, dim=-1)
        zero = features.new_zeros(())
        commitment, transport = zero, zero
        if losses:
            detached = flat.detach()
            commitment = F.mse_loss(soft_topk_aggregate(detached, local_bank, c.top_k, c.temperature), detached)
            transport = sinkhorn_cost(image_level.detach(), global_bank, c.ot_entropy)
        local = local.reshape(b, h, w, d).permute(0, 3, 1, 2)
        return PrototypeOutput(local=local, weights=weights, features=features, commitment=commitment, ot=transport)

    def residuals(
        self, local: torch.Tensor, down: tuple[torch.Tensor, ...], mid: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Add the rebuilt local map, pooled to each residual's resolution, to the UNet's residuals.
        It carries only normal patterns, so unlike the SG residuals it goes to every skip connection."""
        out = []
        for conv, r in zip(self.inject, [*down, mid], strict=True):
            pooled = F.adaptive_avg_pool2d(local, r.shape[-2:]).to(r.dtype)
            out.append(r + conv(pooled))
        return tuple(out[:-1]), out[-1]


class PrototypeTokens(ContextProvider):
    """Prototype-aware attention context: one learned token per global prototype, each scaled by the
    image's assignment to it (``batch["prototype_weights"]``, B x K_G) times K_G, so an image attends
    to its own region of the normality space and the tokens keep unit scale on average."""

    def __init__(self, num_prototypes: int, dim: int):
        super().__init__()
        self.num_tokens, self.dim = num_prototypes, dim
        self.tokens = nn.Parameter(torch.randn(num_prototypes, dim) * dim**-0.5)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "prototype_weights" not in batch:
            raise KeyError("PrototypeTokens needs batch['prototype_weights'] (B x K_G), the global assignment")
        weights = batch["prototype_weights"].to(self.tokens)
        if weights.shape[-1] != self.num_tokens:
            raise ValueError(f"prototype_weights has {weights.shape[-1]} columns, the bank has {self.num_tokens}")
        return (weights * self.num_tokens).unsqueeze(-1) * self.tokens
