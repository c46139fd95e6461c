"""Pro-AD: expanded prototypes, a dynamic bidirectional decoder and a prototype-based constraint
(Zhou et al., arXiv 2506.13097; ``method: proad``). A feature-reconstruction method: no diffusion.

The paper has no public code; the shape follows its abstract, and the parts it leaves open follow
the closest public designs, Dinomaly (Guo et al., CVPR 2025) and INP-Former (Luo et al., CVPR 2025):

- a frozen encoder (timm; DINOv2 ViT-B/14 with registers at paper size) gives the target features
  at several levels, each position's channels standardised (:func:`standardise_channels`; needed on
  CNN features, docs/experiments.md); a noisy bottleneck (Dinomaly: an MLP with dropout) turns
  their mean into the decoder's input tokens;
- expanded learnable prototypes (Pro-AD, idea 1): ``num_prototypes`` vectors shared by every
  category, so no category label is ever needed;
- the dynamic bidirectional decoder (Pro-AD, idea 2). Prototypes <- features: each decoder layer
  first lets the prototypes attend to the image's tokens of every encoder level, so they become this
  image's normal prototypes. Features <- prototypes: the tokens then attend to their own context
  (self-attention) and are rebuilt from the dynamic prototypes;
- the prototype-based constraint (Pro-AD, idea 3), as INP-Former restricts its decoder: a token is
  rebuilt only as a combination of prototypes, weighted by ReLU(cosine) normalised to sum 1, with
  no residual path around it, so an anomalous token cannot be copied through attention (the "soft
  identity mapping"); switched off, the block adds its input back (``constraint: false``);
- losses: Dinomaly's hard-mined cosine distance per level (the easiest ``easy_fraction`` of the
  points count ``easy_weight`` times) plus INP-Former's coherence term, the mean cosine distance of
  each bottleneck token to its nearest dynamic prototype (``coherence_weight``);
- anomaly map: 1 - cosine between target and rebuilt features per level, upsampled to the image,
  averaged over levels, Gaussian-smoothed; image score: the mean of the top ``top_fraction`` of the
  map's pixels (INP-Former: 1%).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from anomdiff import scoring
from anomdiff.models.config import ModelConfig
from anomdiff.models.features import FeatureExtractor
from anomdiff.models.precision import bf16_autocast
from anomdiff.models.saved import load_weights, read_saved_config, save_model


def hard_mined_cosine_loss(target: torch.Tensor, rebuilt: torch.Tensor, easy_fraction: float,
                           easy_weight: float) -> torch.Tensor:
    """Dinomaly's hard-mined reconstruction loss for B x C x H x W maps: the cosine distance of every
    point, the easiest ``easy_fraction`` of them (Dinomaly: 0.9) weighted by ``easy_weight`` (0.1),
    so training dwells on what is still rebuilt badly."""
    distance = 1.0 - F.cosine_similarity(target.float(), rebuilt.float(), dim=1).flatten()
    if easy_fraction <= 0.0 or easy_weight == 1.0:
        return distance.mean()
    threshold = torch.quantile(distance.detach(), easy_fraction)
    weight = torch.where(distance >= threshold, 1.0, easy_weight)
    return (weight * distance).sum() / weight.sum()


def standardise_channels(features: torch.Tensor) -> torch.Tensor:
    """Each position's channel vector of a B x C x H x W map shifted to mean 0 and scaled to variance 1
    (a LayerNorm without parameters). CNN features after a ReLU are all positive and share one large
    component, so their raw cosine barely tells positions apart and the decoder's queries are nearly
    alike; ViT block outputs are centred like this by their own LayerNorms."""
    x = features.float().movedim(1, -1)
    return F.layer_norm(x, x.shape[-1:]).movedim(-1, 1)


def prototype_attention(queries: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """INP-Former's restricted attention weights: ReLU of the cosine similarity between each query
    (... x N x D) and each prototype (... x K x D), normalised to sum 1 over the prototypes (no
    softmax: a token unlike every prototype gets small weights instead of a forced choice)."""
    similarity = F.relu(F.normalize(queries, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(-1, -2))
    return similarity / (similarity.sum(dim=-1, keepdim=True) + 1e-6)


class PrototypeReconstruction(nn.Module):
    """Tokens rebuilt from prototypes only (Pro-AD's constraint): multi-head attention with learned
    query, key and value projections whose weights are :func:`prototype_attention`'s, so the output
    of a token lies in the span of the prototypes' values whatever the token holds."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        def split(x: torch.Tensor) -> torch.Tensor:  # B x N x D -> B x heads x N x D/heads
            return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        weights = prototype_attention(split(self.query(tokens)), split(self.key(prototypes)))
        return self.out((weights @ split(self.value(prototypes))).transpose(1, 2).flatten(2))


class NoisyBottleneck(nn.Module):
    """Dinomaly's noisy bottleneck: an MLP whose dropout perturbs normal features during training, so
    the decoder learns to restore, not to copy."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim),
                                 nn.Dropout(dropout))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)


class BidirectionalBlock(nn.Module):
    """One decoder layer: prototypes <- the image's multi-level tokens (``bidirectional``), tokens <-
    their context (self-attention), then tokens <- the prototypes (constrained or residual)."""

    def __init__(self, dim: int, heads: int, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        if bidirectional:
            self.norm_p, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.aggregate = nn.MultiheadAttention(dim, heads, batch_first=True)
            # LayerScale (CaiT), small at the start: a fresh attention hands every prototype nearly the same
            # image mean, which would make them alike; the update grows as it learns to select
            self.aggregate_scale = nn.Parameter(torch.full((dim,), 0.1))
        self.norm_ctx = nn.LayerNorm(dim)
        self.context = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.rebuild = PrototypeReconstruction(dim, heads)
        self.norm_out = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, tokens: torch.Tensor, prototypes: torch.Tensor, levels: torch.Tensor,
                constraint: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bidirectional:  # prototypes aggregate normal information from every level of this image
            kv = self.norm_kv(levels)
            gathered = self.aggregate(self.norm_p(prototypes), kv, kv, need_weights=False)[0]
            prototypes = prototypes + self.aggregate_scale * gathered
        h = self.norm_ctx(tokens)
        h = tokens + self.context(h, h, h, need_weights=False)[0]
        rebuilt = self.rebuild(h, prototypes)
        if not constraint:  # the residual path that lets an anomaly through
            rebuilt = rebuilt + h
        return rebuilt + self.mlp(self.norm_out(rebuilt)), prototypes


class ProADModel(nn.Module):
    """Pro-AD over a frozen timm encoder. ``batch``: ``image`` B x 3 x H x W in [-1, 1]; nothing reads
    a category."""

    method = "proad"
    stages = ("denoiser",)  # one stage: the decoder (there is no autoencoder to fine-tune)

    def __init__(self, cfg: ModelConfig, num_categories: int):
        super().__init__()
        if cfg.conditioning != "label_free":
            raise ValueError("model.conditioning: proad's prototypes serve every category and it never reads one; "
                             "leave it label_free")
        self.cfg, self.num_categories = cfg, num_categories
        p = cfg.proad
        self.features = FeatureExtractor.with_layers(cfg.backbone, p.layers)
        channels = self.features.channels
        self.grid_level = 0  # tokens live on the finest level's grid: the map keeps its resolution
        self.project = nn.ModuleList(nn.Conv2d(c, p.dim, 1) for c in channels)
        self.bottleneck = NoisyBottleneck(p.dim, p.dropout)
        self.prototypes = nn.Parameter(torch.randn(p.num_prototypes, p.dim))
        self.blocks = nn.ModuleList(BidirectionalBlock(p.dim, p.heads, p.bidirectional)
                                    for _ in range(p.decoder_layers))
        self.unproject = nn.ModuleList(nn.Conv2d(p.dim, c, 1) for c in channels)
        self.metadata: dict = {}
        self.set_stage("denoiser")

    # --- the training interface --------------------------------------------------------------------

    def set_stage(self, stage: str) -> None:
        if stage not in self.stages:
            raise ValueError(f"proad trains in one stage, 'denoiser' (the decoder), not {stage!r}")
        self.requires_grad_(True)
        self.features.requires_grad_(False)
        self.stage = stage

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_counts(self) -> dict[str, int]:
        """``prototypes`` (the expanded bank) and ``decoder`` (projections, bottleneck, blocks, output convs);
        the frozen encoder is not counted."""
        decoder = sum(p.numel() for m in (self.project, self.bottleneck, self.blocks, self.unproject)
                      for p in m.parameters())
        counts = {"unet": 0, "sg": 0, "vae": 0, "prototypes": self.prototypes.numel(), "decoder": decoder}
        counts["total"] = sum(counts.values())
        return counts

    # --- encoder -> bottleneck -> decoder -----------------------------------------------------------

    def reconstruct(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
        """Target features per level, their reconstructions, and the decoder's bottleneck tokens and
        final dynamic prototypes (for the coherence term); under bf16 autocast on CUDA or with bf16
        weights (:mod:`anomdiff.models.precision`)."""
        with bf16_autocast(self, images.device, self.cfg.autocast):
            return self._reconstruct(images)

    def _reconstruct(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
        targets = [standardise_channels(t) for t in self.features(images)]
        grid = targets[self.grid_level].shape[-2:]
        projected = [F.interpolate(proj(t), size=grid, mode="bilinear", align_corners=False)
                     if t.shape[-2:] != grid else proj(t) for proj, t in zip(self.project, targets, strict=True)]
        b, d = len(images), self.cfg.proad.dim
        levels = torch.cat([x.flatten(2).transpose(1, 2) for x in projected], dim=1)  # B x (L*N) x D
        tokens = self.bottleneck(torch.stack(projected).mean(0).flatten(2).transpose(1, 2))
        prototypes = self.prototypes.unsqueeze(0).expand(b, -1, -1)
        x = tokens
        for block in self.blocks:
            x, prototypes = block(x, prototypes, levels, self.cfg.proad.constraint)
        decoded = x.transpose(1, 2).reshape(b, d, *grid)
        rebuilt = [out(decoded) if t.shape[-2:] == grid else
                   out(F.interpolate(decoded, size=t.shape[-2:], mode="bilinear", align_corners=False))
                   for out, t in zip(self.unproject, targets, strict=True)]
        return targets, rebuilt, {"tokens": tokens, "prototypes": prototypes}

    def forward(self, batch: dict[str, torch.Tensor], score: bool = False) -> dict[str, torch.Tensor]:
        """The training loss (what DeepSpeed's engine runs for a step), or with ``score`` the scores:
        validation runs through the engine too (``pipelines.engine.ScoresThroughEngine``)."""
        return self.score(batch) if score else self.training_loss(batch)

    def training_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hard-mined cosine reconstruction loss averaged over levels + ``coherence_weight`` x the
        distance of each bottleneck token to its nearest dynamic prototype."""
        p = self.cfg.proad
        targets, rebuilt, inner = self.reconstruct(batch["image"])
        reconstruction = torch.stack([hard_mined_cosine_loss(t, r, p.easy_fraction, p.easy_weight)
                                      for t, r in zip(targets, rebuilt, strict=True)]).mean()
        similarity = F.normalize(inner["tokens"], dim=-1) @ F.normalize(inner["prototypes"], dim=-1).transpose(1, 2)
        coherence = (1.0 - similarity.amax(dim=-1)).mean()
        loss = reconstruction + p.coherence_weight * coherence
        return {"loss": loss, "reconstruction": reconstruction.detach(), "coherence": coherence.detach()}

    # --- inference ----------------------------------------------------------------------------------

    @torch.no_grad()
    def score(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``anomaly_map`` B x H x W (mean over levels of the upsampled 1 - cosine, smoothed) and
        ``image_score`` B (mean of the top ``top_fraction`` of the map)."""
        images = batch["image"]
        targets, rebuilt, _ = self.reconstruct(images)
        rebuilt = [r.float() for r in rebuilt]
        distance = scoring.feature_distance(targets, rebuilt, tuple(images.shape[-2:])) / len(targets)
        maps = scoring.gaussian_smooth(distance, self.cfg.scoring.sigma)
        return {"anomaly_map": maps, "image_score": scoring.top_fraction_mean(maps, self.cfg.proad.top_fraction)}

    # --- persistence --------------------------------------------------------------------------------

    def save(self, directory: str | Path, metadata: dict | None = None) -> Path:
        return save_model(self, directory, metadata)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> ProADModel:
        info = read_saved_config(directory)
        cfg = ModelConfig.from_dict(info["config"])
        model = cls(ModelConfig.from_dict({"backbone": {"pretrained": None}}, base=cfg), info["num_categories"])
        model.load_state_dict(load_weights(directory, device, expected=model.state_dict()), strict=True)
        model.cfg, model.metadata = cfg, info.get("metadata", {})
        return model.to(device).eval()
