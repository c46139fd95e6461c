"""The latent autoencoder: diffusers ``AutoencoderKL`` and its fine-tuning objective.

DiAD fine-tunes the SD autoencoder on the normal training images before training the denoiser
(Sec. 4.1). The objective here is LDM's without the perceptual and adversarial terms: per-pixel L1
reconstruction plus ``kl_weight`` times the KL of the posterior to N(0, I), both per image pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from anomdiff.models.config import ModelConfig


def build_vae(cfg: ModelConfig) -> AutoencoderKL:
    """A randomly initialised ``AutoencoderKL`` with the preset's dimensions."""
    v = cfg.vae
    n = len(v.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(v.block_out_channels),
        layers_per_block=v.layers_per_block,
        latent_channels=v.latent_channels,
        norm_num_groups=v.norm_num_groups,
        sample_size=v.sample_size,
        scaling_factor=v.scaling_factor,
    )


def check_vae_matches(vae: AutoencoderKL, cfg: ModelConfig, source: str) -> None:
    """Raise ``ValueError`` when a loaded VAE's dimensions differ from the preset's."""
    want = {"block_out_channels": list(cfg.vae.block_out_channels), "latent_channels": cfg.vae.latent_channels}
    for key, value in want.items():
        have = list(vae.config[key]) if isinstance(vae.config[key], list | tuple) else vae.config[key]
        if have != value:
            raise ValueError(f"pretrained VAE from {source!r} has {key}={have}, but the model config says {value}")


def vae_loss(vae: AutoencoderKL, images: torch.Tensor, kl_weight: float, features=None,
             feature_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """Fine-tuning loss on normal images in [-1, 1]: L1 reconstruction + ``kl_weight`` * KL, plus
    ``feature_weight`` times the mean over layers of the cosine distance between the ``features``
    (a callable returning feature maps, gradients flowing) of the images and of their reconstruction:
    a perceptual term in the feature space the anomaly map is measured in, so that the autoencoder
    keeps the texture the map would otherwise count as an anomaly."""
    posterior = vae.encode(images).latent_dist
    reconstruction = vae.decode(posterior.sample()).sample
    rec = F.l1_loss(reconstruction.float(), images.float())
    # posterior.kl() sums over latent elements; spread it over image pixels like the L1 term.
    kl = posterior.kl().float().mean() / images[0].numel()
    out = {"vae_rec": rec.detach(), "vae_kl": kl.detach()}
    loss = rec + kl_weight * kl
    if feature_weight:
        with torch.no_grad():
            wanted = features(images)
        got = features(reconstruction)
        perceptual = torch.stack([(1 - F.cosine_similarity(a.float(), b.float(), dim=1)).mean()
                                  for a, b in zip(wanted, got, strict=True)]).mean()
        loss = loss + feature_weight * perceptual
        out["vae_feature"] = perceptual.detach()
    return {"loss": loss, **out}
