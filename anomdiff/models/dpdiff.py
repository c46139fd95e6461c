"""DPDiff-AD: DiAD's latent diffusion conditioned on dual prototypes (``method: dpdiff``).

On top of ``DiADModel`` (same VAE, UNet, SG network, anomaly map):
- the frozen backbone's multi-scale features of x0 pass the prototype banks (``prototypes.py``);
- the local bank's rebuilt map (normal patterns only) is added, through zero-initialised 1x1 convs,
  to the residuals the UNet receives: spatial conditioning that cannot carry an anomaly;
- prototype-aware attention: the cross-attention context is [learned tokens (shared, or the
  category's under ``category_aware``), K_G global prototype tokens scaled by the image's soft
  assignment];
- loss = eps-MSE + lambda_ot * Sinkhorn OT(image features, global bank) + lambda_local * commitment.

At initialisation (zero convs) the denoiser's output is DiAD's given the same context. The banks, the
projector and the prototype tokens train in the denoiser stage whatever ``model.trainable`` names:
they are what this method adds and have no pretrained state to keep.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from anomdiff.models.config import ModelConfig
from anomdiff.models.context import ConcatContext, condition_tokens
from anomdiff.models.diad import DiADModel
from anomdiff.models.guide import residual_channels
from anomdiff.models.prototypes import PrototypeBanks, PrototypeOutput, PrototypeTokens


class DPDiffModel(DiADModel):
    """DiAD + dual prototypes. ``batch`` as DiAD's; optionally ``prototype_source`` (B x 3 x H x W):
    the images whose prototypes condition the reconstruction (default: the images themselves)."""

    method = "dpdiff"

    def __init__(self, cfg: ModelConfig, num_categories: int):
        p = cfg.prototypes
        context = ConcatContext(
            condition_tokens(cfg.conditioning, num_categories, cfg.num_context_tokens, cfg.unet.cross_attention_dim),
            PrototypeTokens(p.num_global, cfg.unet.cross_attention_dim),
        )
        super().__init__(cfg, num_categories, context=context)
        unet_config = self.unet.config
        self.prototypes = PrototypeBanks(
            p, self.features.channels, residual_channels(unet_config), unet_config.block_out_channels[-1]
        )
        self._condition: PrototypeOutput | None = None
        self.set_stage("denoiser")

    # --- parts and stages --------------------------------------------------------------------

    def _prototype_modules(self) -> list[torch.nn.Module]:
        return [self.prototypes, self.context_provider.providers[1]]

    def _parts(self):
        parts = super()._parts()
        if "prototypes" in self._modules:  # DiADModel.__init__ sets the stage before the banks exist
            parts["prototypes"] = self._prototype_modules()
        return parts

    def set_stage(self, stage: str) -> None:
        super().set_stage(stage)
        if stage == "denoiser" and "prototypes" in self._modules:
            for module in self._prototype_modules():
                module.requires_grad_(True)

    def parameter_counts(self) -> dict[str, int]:
        """DiAD's counts plus ``prototypes``: projector, both banks, injection convs, prototype tokens."""
        counts = super().parameter_counts()
        counts["prototypes"] = sum(p.numel() for m in self._prototype_modules() for p in m.parameters())
        counts["total"] = sum(v for k, v in counts.items() if k != "total")
        return counts

    # --- conditioning ------------------------------------------------------------------------

    def prototype_condition(self, images: torch.Tensor, losses: bool = False) -> PrototypeOutput:
        """The banks' view of ``images`` on the latent grid (and their losses when ``losses``)."""
        vae_factor = 2 ** (len(self.cfg.vae.block_out_channels) - 1)
        grid = (images.shape[-2] // vae_factor, images.shape[-1] // vae_factor)
        with self._autocast(images.device):
            feature_maps = self.features(images)
        return self.prototypes(feature_maps, grid, losses=losses)

    @contextmanager
    def conditioned_on(self, condition: PrototypeOutput) -> Iterator[None]:
        """Within the block, ``context`` and ``predict_noise`` use ``condition`` instead of computing
        it from their inputs: one backbone pass per training step or per reconstruction, not per call."""
        previous, self._condition = self._condition, condition
        try:
            yield
        finally:
            self._condition = previous

    def context(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[learned tokens, global prototype tokens weighted by the image's assignment]."""
        condition = self._condition
        if condition is None:
            condition = self.prototype_condition(batch.get("prototype_source", batch["image"]))
        return self.context_provider({**batch, "prototype_weights": condition.weights})

    def predict_noise(
        self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, hint: torch.Tensor
    ) -> torch.Tensor:
        """DiAD's eps_theta with the rebuilt local map added to the SG residuals."""
        if self._condition is not None:
            local = self._condition.local
            local = local.repeat(len(latents) // len(local), 1, 1, 1)  # guidance runs the batch twice
        else:
            local = self.prototype_condition(hint).local
        down, mid = self.sg(latents, timestep, context, hint)
        down, mid = self.prototypes.residuals(local, down, mid)
        return self.unet_with_residuals(latents, timestep, context, down, mid)

    # --- objectives and inference ------------------------------------------------------------

    def training_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """eps-MSE (DiAD's step, conditioned on the prototypes) + lambda_ot * OT + lambda_local * commitment."""
        p = self.cfg.prototypes
        condition = self.prototype_condition(batch["image"], losses=True)
        with self.conditioned_on(condition):
            out = super().training_loss(batch)
        loss = out["loss"] + p.lambda_ot * condition.ot + p.lambda_local * condition.commitment
        terms = {"ot": condition.ot.detach(), "commitment": condition.commitment.detach()}
        return {"loss": loss, "mse": out["mse"], **terms}

    @torch.no_grad()
    def reconstruct(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """DiAD's DDIM reconstruction conditioned on the prototypes of ``batch["prototype_source"]``
        (default: the images being reconstructed)."""
        condition = self.prototype_condition(batch.get("prototype_source", batch["image"]))
        with self.conditioned_on(condition):
            return super().reconstruct(batch, generator)
