"""The denoiser: diffusers ``UNet2DConditionModel`` (SD1.5 dimensions in the ``sd15`` preset).

DiAD (Sec. 3.1) keeps Stable Diffusion's latent-diffusion UNet; there is no text encoder here, so
``cross_attention_dim`` is the width of the learned context tokens (768, as in SD1.5).
"""

from __future__ import annotations

from diffusers import UNet2DConditionModel

from anomdiff.models.config import ModelConfig

# Parameter groups the config's ``trainable`` list can name, as UNet submodule prefixes.
UNET_PARTS = {
    "unet_encoder": ("conv_in", "time_embedding", "down_blocks"),
    "unet_mid": ("mid_block",),
    "unet_decoder": ("up_blocks", "conv_norm_out", "conv_out"),
}


def build_unet(cfg: ModelConfig) -> UNet2DConditionModel:
    """A randomly initialised UNet with the preset's dimensions, latent channels in and out."""
    u = cfg.unet
    unet = UNet2DConditionModel(
        sample_size=u.sample_size,
        in_channels=cfg.vae.latent_channels,
        out_channels=cfg.vae.latent_channels,
        down_block_types=tuple(u.down_block_types),
        up_block_types=tuple(u.up_block_types),
        block_out_channels=tuple(u.block_out_channels),
        layers_per_block=u.layers_per_block,
        attention_head_dim=u.attention_head_dim,
        cross_attention_dim=u.cross_attention_dim,
        norm_num_groups=u.norm_num_groups,
    )
    return unet


def check_unet_matches(unet: UNet2DConditionModel, cfg: ModelConfig, source: str) -> None:
    """Raise ``ValueError`` when a loaded UNet's dimensions differ from the preset's."""
    got = unet.config
    want = {
        "block_out_channels": list(cfg.unet.block_out_channels),
        "layers_per_block": cfg.unet.layers_per_block,
        "cross_attention_dim": cfg.unet.cross_attention_dim,
        "in_channels": cfg.vae.latent_channels,
    }
    for key, value in want.items():
        have = list(got[key]) if isinstance(got[key], list | tuple) else got[key]
        if have != value:
            raise ValueError(f"pretrained UNet from {source!r} has {key}={have}, but the model config says {value}")
