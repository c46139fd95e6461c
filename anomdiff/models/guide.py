"""The Semantic-Guided (SG) network with Spatial-aware Feature Fusion (DiAD Sec. 3.2, Eq. 8, Fig. 3).

The SG network is a trainable copy of the UNet encoder and middle block (diffusers
``ControlNetModel.from_unet``) whose hint is the input image x0, embedded by ControlNet's conv-SiLU
hint encoder. Its outputs pass zero-initialised 1x1 convs, so at initialisation it adds nothing.

SFF (Eq. 8): each output of the second-deepest encoder block (SGEB3 in SD1.5: one downsample and two
resnets) goes through a zero-initialised 3x3 stride-2 conv, InstanceNorm and SiLU and is added to
each output of the deepest block (SGEB4); the sums pass a SiLU. The fused deepest outputs and the
middle-block output are the residuals DiAD feeds to the UNet middle block and its deepest decoder
block (``connect="deepest"``).
"""

from __future__ import annotations

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from torch import nn

from anomdiff.models.config import GuideConfig


def residual_groups(unet_config) -> list[list[int]]:
    """Indices of the encoder residuals per encoder block, for a UNet/ControlNet config.

    Block 0 yields conv_in and its resnets; every later block yields the previous block's
    downsample and its own resnets: ``layers_per_block + 1`` residuals per block.
    """
    per_block = unet_config.layers_per_block + 1
    blocks = len(unet_config.block_out_channels)
    return [list(range(b * per_block, (b + 1) * per_block)) for b in range(blocks)]


def residual_channels(unet_config) -> list[int]:
    """Channels of every encoder residual, in the order the UNet yields them."""
    channels = list(unet_config.block_out_channels)
    out = [channels[0]]
    for i, c in enumerate(channels):
        out += [c] * unet_config.layers_per_block
        if i < len(channels) - 1:
            out.append(c)
    return out


class SpatialFeatureFusion(nn.Module):
    """SFF block, Eq. 8: ``y_j = SiLU(x_j + sum_i SiLU(IN(Conv3x3_s2_ij(h_i))))``.

    ``h_i`` are the second-deepest block's outputs, ``x_j`` the deepest block's. One conv per
    (i, j) pair, zero-initialised, no bias; InstanceNorm without affine parameters (as DiAD).
    """

    def __init__(self, in_channels: list[int], out_channels: int, num_outputs: int):
        super().__init__()
        self.num_inputs, self.num_outputs = len(in_channels), num_outputs
        self.fuse = nn.ModuleList()
        for _ in range(num_outputs):
            for c in in_channels:
                conv = nn.Conv2d(c, out_channels, kernel_size=3, stride=2, padding=1, bias=False)
                nn.init.zeros_(conv.weight)
                self.fuse.append(nn.Sequential(conv, nn.InstanceNorm2d(out_channels), nn.SiLU()))
        self.act = nn.SiLU()

    def forward(self, shallow: list[torch.Tensor], deep: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for j, x in enumerate(deep):
            total = x
            for i, h in enumerate(shallow):
                total = total + self.fuse[j * self.num_inputs + i](h)
            out.append(self.act(total))
        return out


class SemanticGuide(nn.Module):
    """SG network = ControlNet copy of the UNet encoder + middle block, hint = x0, plus SFF."""

    def __init__(self, controlnet: ControlNetModel, cfg: GuideConfig):
        super().__init__()
        self.controlnet = controlnet
        self.connect = cfg.connect
        self.conditioning_scale = cfg.conditioning_scale
        groups = residual_groups(controlnet.config)
        channels = residual_channels(controlnet.config)
        self.shallow, self.deep = groups[-2], groups[-1]
        self.sff = (
            SpatialFeatureFusion(
                in_channels=[channels[i] for i in self.shallow],
                out_channels=channels[self.deep[0]],
                num_outputs=len(self.deep),
            )
            if cfg.sff
            else None
        )

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, cfg: GuideConfig) -> SemanticGuide:
        """Copy the UNet's encoder and middle block into a new SG network, as DiAD initialises it."""
        controlnet = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=tuple(cfg.hint_channels), load_weights_from_unet=True
        )
        return cls(controlnet, cfg)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, hint: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Residuals for ``UNet2DConditionModel(down_block_additional_residuals=...,
        mid_block_additional_residual=...)``; with ``connect="deepest"`` the shallower ones are zero."""
        down, mid = self.controlnet(
            sample,
            timestep,
            encoder_hidden_states=context,
            controlnet_cond=hint,
            conditioning_scale=self.conditioning_scale,
            return_dict=False,
        )
        down = list(down)
        if self.sff is not None:
            fused = self.sff([down[i] for i in self.shallow], [down[i] for i in self.deep])
            for i, f in zip(self.deep, fused, strict=True):
                down[i] = f
        if self.connect == "deepest":
            deep = set(self.deep)
            down = [r if i in deep else torch.zeros_like(r) for i, r in enumerate(down)]
        return tuple(down), mid
