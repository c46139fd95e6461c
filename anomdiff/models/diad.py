"""DiAD: Diffusion-based framework for multi-class Anomaly Detection (He et al., AAAI 2024,
arXiv 2312.06607).

The model ties together
- the latent autoencoder (``autoencoder.py``; fine-tuned first on normal images, ``vae_loss``),
- the denoiser (``unet.py``) and the Semantic-Guided network with SFF (``guide.py``, Sec. 3.2),
  conditioned on learned context tokens (``context.py``) instead of a text prompt,
- the frozen feature extractor (``features.py``) and the anomaly map / image score
  (``anomdiff.scoring``, Sec. 3.3).

Training (Sec. 3.1): epsilon-prediction MSE in latent space, ``|| eps - eps_theta(z_t, t, c, x0) ||^2``.
Inference: encode x0, noise it to ``start_timestep`` (999), denoise with DDIM in ``ddim_steps`` (10)
steps with the SG network guided by x0, decode, compare features of x0 and the reconstruction.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from diffusers import DDIMScheduler
from torch import nn

from anomdiff import scoring
from anomdiff.models.autoencoder import build_vae, check_vae_matches, vae_loss
from anomdiff.models.config import ModelConfig
from anomdiff.models.context import ContextProvider, condition_tokens
from anomdiff.models.features import FeatureExtractor
from anomdiff.models.guide import SemanticGuide
from anomdiff.models.precision import bf16_autocast
from anomdiff.models.pretrained import load_pretrained
from anomdiff.models.saved import load_weights, read_saved_config, save_model
from anomdiff.models.unet import UNET_PARTS, build_unet, check_unet_matches


def ddim_timesteps(scheduler: DDIMScheduler, start: int, steps: int, device=None) -> torch.Tensor:
    """``steps`` DDIM timesteps from ``start`` down: the tail of a trailing-spaced schedule over all
    training timesteps (so a start of 999 is the first step exactly), its length the smallest at or
    above the proportional one that leaves ``steps``."""
    total = max(steps, round(steps * scheduler.config.num_train_timesteps / (start + 1)))
    while True:  # rounding can fall short: 1 step from 400 gives round(2.5) = 2, [999, 499]
        scheduler.set_timesteps(total, device=device)
        timesteps = scheduler.timesteps[scheduler.timesteps <= start]
        if len(timesteps) >= steps:
            return timesteps[:steps]
        total += 1


class DiADModel(nn.Module):
    """DiAD with learned context tokens. ``batch``: ``image`` B x 3 x H x W in [-1, 1],
    ``category_index`` B (long; read only under ``conditioning: category_aware``), optionally
    ``mask`` B x 1 x H x W."""

    method = "diad"
    stages = ("vae", "denoiser")  # autoencoder fine-tuning (optional), then the denoiser
    loads_diffusion_weights = True  # model.pretrained: SD's UNet and VAE

    def __init__(self, cfg: ModelConfig, num_categories: int, context: ContextProvider | None = None):
        super().__init__()
        self.cfg, self.num_categories = cfg, num_categories
        if cfg.pretrained:
            unet, vae = load_pretrained(cfg.pretrained)
            check_unet_matches(unet, cfg, cfg.pretrained)
            check_vae_matches(vae, cfg, cfg.pretrained)
            scale = float(vae.config.scaling_factor)
        else:
            unet, vae, scale = build_unet(cfg), build_vae(cfg), cfg.vae.scaling_factor
        self.unet, self.vae = unet, vae
        self.sg = SemanticGuide.from_unet(unet, cfg.sg)  # DiAD copies the (pretrained) UNet encoder
        self.context_provider = context or condition_tokens(
            cfg.conditioning, num_categories, cfg.num_context_tokens, cfg.unet.cross_attention_dim
        )
        if self.context_provider.dim != cfg.unet.cross_attention_dim:
            raise ValueError(
                f"context tokens are {self.context_provider.dim} wide, the UNet attends to "
                f"{cfg.unet.cross_attention_dim} (model.unet.cross_attention_dim)"
            )
        self.features = FeatureExtractor(cfg.backbone)
        self.register_buffer("latent_scale", torch.tensor(scale, dtype=torch.float32))
        d = cfg.diffusion
        self.scheduler = DDIMScheduler(
            num_train_timesteps=d.num_train_timesteps,
            beta_start=d.beta_start,
            beta_end=d.beta_end,
            beta_schedule=d.beta_schedule,
            clip_sample=False,
            set_alpha_to_one=False,
            prediction_type="epsilon",
            timestep_spacing="trailing",
        )
        if cfg.unet.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            self.sg.controlnet.enable_gradient_checkpointing()
        self.metadata: dict = {}
        self.set_stage("denoiser")

    # --- parts and stages --------------------------------------------------------------------

    def _parts(self) -> dict[str, list[nn.Module]]:
        parts = {"unet": [self.unet], "sg": [self.sg], "context": [self.context_provider]}
        for name, children in UNET_PARTS.items():
            parts[name] = [getattr(self.unet, child) for child in children]
        return parts

    def set_stage(self, stage: str) -> None:
        """Select what trains: ``vae`` (autoencoder fine-tuning) or ``denoiser`` (``cfg.trainable``)."""
        if stage not in self.stages:
            raise ValueError(f"unknown training stage {stage!r}; choose from {self.stages}")
        parts = self._parts()
        self.requires_grad_(False)
        if stage == "vae":
            self.vae.requires_grad_(True)
        else:
            for name in self.cfg.trainable:
                if name not in parts:
                    hint = " (the VAE trains in its own stage, set_stage('vae'))" if name == "vae" else ""
                    raise ValueError(f"model.trainable: unknown part {name!r}{hint}; choose from {sorted(parts)}")
                for module in parts[name]:
                    module.requires_grad_(True)
        self.stage = stage

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the current stage trains (what an optimizer should get)."""
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per component; ``total`` is their sum (the frozen backbone and the context
        tokens, which depend on the number of categories, are not counted)."""
        counts = {
            "unet": sum(p.numel() for p in self.unet.parameters()),
            "sg": sum(p.numel() for p in self.sg.parameters()),
            "vae": sum(p.numel() for p in self.vae.parameters()),
            "prototypes": 0,
        }
        counts["total"] = sum(counts.values())
        return counts

    # --- building blocks ---------------------------------------------------------------------

    def _autocast(self, device: torch.device):
        return bf16_autocast(self, device, self.cfg.autocast)

    def context(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-attention tokens ``B x T x D`` for the batch (learned; shared or per category)."""
        return self.context_provider(batch)

    def encode(self, images: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        """Scaled latents of images in [-1, 1]: a posterior sample (training) or its mode."""
        factor = self.cfg.downsampling
        if images.shape[-1] % factor or images.shape[-2] % factor:
            raise ValueError(f"image size {tuple(images.shape[-2:])} must be a multiple of {factor} for this model")
        posterior = self.vae.encode(images).latent_dist
        latents = posterior.sample(generator) if sample else posterior.mode()
        return latents * self.latent_scale.to(latents.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.latent_scale.to(latents.dtype)).sample

    def predict_noise(
        self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, hint: torch.Tensor
    ) -> torch.Tensor:
        """eps_theta(z_t, t, c, x0): UNet with the SG network's residuals (Sec. 3.2)."""
        down, mid = self.sg(latents, timestep, context, hint)
        return self.unet_with_residuals(latents, timestep, context, down, mid)

    def unet_with_residuals(
        self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, down: list, mid: torch.Tensor
    ) -> torch.Tensor:
        """The denoising UNet's noise prediction with residuals added to its skip and middle features."""
        return self.unet(
            latents,
            timestep,
            encoder_hidden_states=context,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample

    @torch.no_grad()
    def fit_latent_scale(self, images: torch.Tensor) -> float:
        """Set the latent scale to 1 / std of the latents (LDM's ``scale_by_std``); for an
        autoencoder trained here rather than SD's, whose scale 0.18215 is known."""
        posterior = self.vae.encode(images).latent_dist
        scale = 1.0 / posterior.sample().float().std().clamp_min(1e-6)
        self.latent_scale.fill_(scale.item())
        return float(scale)

    # --- objectives --------------------------------------------------------------------------

    def forward(self, batch: dict[str, torch.Tensor], score: bool = False) -> dict[str, torch.Tensor]:
        """The training loss (what DeepSpeed's engine runs for a step), or with ``score`` the scores:
        validation runs through the engine too (``pipelines.engine.ScoresThroughEngine``)."""
        return self.score(batch) if score else self.training_loss(batch)

    def training_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Epsilon-prediction MSE in latent space with DiAD's noise schedule, timesteps drawn
        uniformly up to ``diffusion.train_max_timestep``."""
        x0 = batch["image"]
        with self._autocast(x0.device):
            with torch.no_grad():
                z0 = self.encode(x0, sample=True).float()
            noise = torch.randn_like(z0)
            top = self.cfg.diffusion.train_max_timestep
            high = self.scheduler.config.num_train_timesteps if top is None else top + 1
            t = torch.randint(0, high, (len(z0),), device=z0.device)
            zt = self.scheduler.add_noise(z0, noise, t)
            context = self.context(batch)
            p = self.cfg.diffusion.context_dropout
            if p > 0:  # classifier-free guidance training: sometimes the unconditional context
                drop = torch.rand(len(z0), 1, 1, device=context.device) < p
                context = torch.where(drop, self.context_provider.unconditional(batch).to(context.dtype), context)
            eps = self.predict_noise(zt, t, context, x0)
        loss = F.mse_loss(eps.float(), noise.float())
        return {"loss": loss, "mse": loss.detach()}

    def vae_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Autoencoder fine-tuning loss on normal images (stage ``vae``)."""
        x0 = batch["image"]
        with self._autocast(x0.device):
            return vae_loss(self.vae, x0, self.cfg.vae.kl_weight, self.features.differentiable,
                            self.cfg.vae.feature_weight)

    # --- inference ---------------------------------------------------------------------------

    def inference_timesteps(self, scheduler: DDIMScheduler, device=None) -> torch.Tensor:
        d = self.cfg.diffusion
        return ddim_timesteps(scheduler, d.start_timestep, d.ddim_steps, device)

    @torch.no_grad()
    def reconstruct(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """DDIM reconstruction of ``batch["image"]`` (B x 3 x H x W in [-1, 1]); deterministic for a
        fixed ``cfg.diffusion.seed`` unless a generator is given."""
        x0 = batch["image"]
        d = self.cfg.diffusion
        if generator is None:
            generator = torch.Generator(device=x0.device).manual_seed(d.seed)
        scheduler = DDIMScheduler.from_config(self.scheduler.config)
        timesteps = self.inference_timesteps(scheduler, device=x0.device)
        with self._autocast(x0.device):
            z0 = self.encode(x0).float()  # the DDIM chain stays in float32 under bf16 autocast
            noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
            z = scheduler.add_noise(z0, noise, timesteps[:1].repeat(len(z0)))
            context = self.context(batch)
            if d.guidance:  # DiAD's classifier-free guidance: an "empty" context, the same hint
                context = torch.cat([self.context_provider.unconditional(batch).to(context.dtype), context])
                hint = torch.cat([x0, x0])
            for t in timesteps:
                if d.guidance:
                    eps_uncond, eps_cond = self.predict_noise(torch.cat([z, z]), t, context, hint).chunk(2)
                    eps = eps_uncond + d.guidance_scale * (eps_cond - eps_uncond)
                else:
                    eps = self.predict_noise(z, t, context, x0)
                z = scheduler.step(eps.float(), t, z, eta=d.eta, generator=generator).prev_sample
            reconstruction = self.decode(z)
        return reconstruction.float().clamp(-1, 1)

    @torch.no_grad()
    def score(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``anomaly_map`` B x H x W, ``image_score`` B and the ``reconstruction`` (Sec. 3.3).

        With ``scoring.noise_samples`` K > 1 the batch is reconstructed K times in one pass (each
        copy from its own noise) and the K distance maps are averaged before smoothing; the
        ``reconstruction`` returned is the first draw's."""
        x0, n = batch["image"], len(batch["image"])
        s = self.cfg.scoring
        draws = s.noise_samples
        repeated = {k: v.repeat(draws, *[1] * (v.dim() - 1)) if isinstance(v, torch.Tensor) and v.dim() else v
                    for k, v in batch.items()}
        reconstruction = self.reconstruct(repeated)
        with self._autocast(x0.device):
            features = self.features(torch.cat([x0, reconstruction.to(x0.dtype)]))
        originals = [f[:n].repeat(draws, 1, 1, 1) for f in features]
        distance = scoring.feature_distance(originals, [f[n:] for f in features], tuple(x0.shape[-2:]))
        if s.pixel_weight:
            distance = distance + s.pixel_weight * scoring.pixel_distance(repeated["image"], reconstruction)
        maps = scoring.gaussian_smooth(distance.view(draws, n, *distance.shape[1:]).mean(0), s.sigma)
        return {
            "anomaly_map": maps,
            "image_score": scoring.image_score(maps, rounds=s.pooling_rounds, kernel=s.pooling_kernel),
            "reconstruction": reconstruction[:n],
        }

    # --- persistence -------------------------------------------------------------------------

    def save(self, directory: str | Path, metadata: dict | None = None) -> Path:
        """Write ``model.safetensors`` (every weight, backbone included) and ``config.json``."""
        return save_model(self, directory, metadata)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> DiADModel:
        """Rebuild from ``save``'s folder: built on the meta device, weights assigned from the file."""
        directory = Path(directory)
        info = read_saved_config(directory)
        cfg = ModelConfig.from_dict(info["config"])
        build_cfg = ModelConfig.from_dict({"pretrained": None, "backbone": {"pretrained": None}}, base=cfg)
        with init_empty_weights():
            model = cls(build_cfg, info["num_categories"])
        state = load_weights(directory, device, expected=model.state_dict())
        model.load_state_dict(state, strict=True, assign=True)
        model.cfg, model.metadata = cfg, info.get("metadata", {})
        model.set_stage("denoiser")
        return model.to(device).eval()
