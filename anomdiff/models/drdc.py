"""DRDC: a base model's heatmap refined by diffusion inpainting (Zhan et al., arXiv 2407.01905; the
paper has no public code, so the pieces below follow its text and figures).

- Base heatmap: a feature-reconstruction model (Pro-AD, ``proad.py``, by default) trained in the same
  run, its map at image resolution.
- Refinement (the paper's diffusion refinement branch): the image is covered by n_s disjoint sets of
  square cells (:func:`mask_sets`); for each set the masked pixels are replaced by a fill computed from
  the unmasked pixels only, noised to a timestep and inpainted by an inpainting UNet (diffusers
  ``UNet2DConditionModel`` in SD inpainting's layout: noisy input, masked input and mask stacked as
  channels). No masked pixel of the input reaches its own inpainting, so an anomaly cannot be copied
  through (the paper's "identical shortcut").
- Dual conditioning: model conditioning, cross-attention tokens mixed by a learned category head's
  estimate from the masked image (never told the label under ``label_free``); test-time conditioning,
  the unmasked pixels of the test image as input channels at every step and, RePaint-style, put back
  on the sampling trajectory after each step.
- Spatio-temporal fusion: each pixel's high-pass difference to its inpainting, from the set that masked
  it, averaged over ``scales`` and over n_t timesteps starting at t_nt, a mean filter of size m, then
  ``(1 - gamma) x base + gamma x refinement``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch import nn
from torchvision.transforms.v2.functional import gaussian_blur

from anomdiff import scoring
from anomdiff.models.autoencoder import build_vae, check_vae_matches, vae_loss
from anomdiff.models.config import ModelConfig
from anomdiff.models.diad import ddim_timesteps
from anomdiff.models.precision import bf16_autocast
from anomdiff.models.pretrained import load_pretrained
from anomdiff.models.saved import load_weights, read_saved_config, save_model
from anomdiff.models.unet import UNET_PARTS


def mask_sets(height: int, width: int, count: int, patch: int, seed: int, device=None) -> torch.Tensor:
    """``count x H x W`` masks (1 = masked) of ``patch`` x ``patch`` cells, each cell in exactly one set:
    a seeded shuffle of the cells dealt round-robin, so the sets differ in size by one cell at most."""
    rows, cols = math.ceil(height / patch), math.ceil(width / patch)
    if count > rows * cols:
        raise ValueError(f"{count} mask sets need at least as many {patch} px cells; a {height} x {width} image has "
                         f"{rows * cols}")
    generator = torch.Generator().manual_seed(seed)
    owner = (torch.randperm(rows * cols, generator=generator) % count).view(rows, cols)
    owner = owner.repeat_interleave(patch, 0).repeat_interleave(patch, 1)[:height, :width].to(device)
    return (owner[None] == torch.arange(count, device=device)[:, None, None]).float()


def random_masks(batch: int, height: int, width: int, patch: int, device=None) -> torch.Tensor:
    """``B x 1 x H x W`` training masks: for each image one set of a random partition into 2-8 sets, so the
    inpainter sees the cell masks of every ``mask_sets`` a search may pick."""
    rows, cols = math.ceil(height / patch), math.ceil(width / patch)
    counts = torch.randint(2, 9, (batch, 1, 1), device=device)
    cells = torch.randint(0, 2 ** 20, (batch, rows, cols), device=device) % counts == 0
    masks = cells.repeat_interleave(patch, 1).repeat_interleave(patch, 2)[:, :height, :width]
    return masks[:, None].float()


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur, kernel radius 3 sigma, shrunk to fit the image."""
    radius = max(1, min(int(3 * sigma + 0.5), min(images.shape[-2:]) // 2 - 1))
    return gaussian_blur(images, kernel_size=[2 * radius + 1] * 2, sigma=[sigma, sigma])


def context_fill(images: torch.Tensor, masks: torch.Tensor, sigma: float) -> torch.Tensor:
    """The images with masked pixels replaced by a normalised Gaussian average of the unmasked ones
    around them (the inpainting's starting point; no masked pixel contributes)."""
    keep = 1.0 - masks
    weight = _blur(keep, sigma)
    local = _blur(images * keep, sigma) / weight.clamp_min(1e-6)
    overall = (images * keep).sum((2, 3), keepdim=True) / keep.sum((2, 3), keepdim=True).clamp_min(1.0)
    fill = torch.where(weight > 1e-3, local, overall)  # cells far from any unmasked pixel: the image mean
    return images * keep + fill * masks


def highpass(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """``images`` minus their Gaussian low-pass: what an inpainting can be asked to get right (an
    inpainted cell may carry the right texture at a slightly different overall brightness)."""
    return images if sigma <= 0 else images - _blur(images, sigma)


def refinement_distance(images: torch.Tensor, inpainted: torch.Tensor, scales: list[int], sigma: float) -> torch.Tensor:
    """``B x H x W``: the channel-mean absolute high-pass difference, averaged over ``scales`` (the
    difference average-pooled by each scale before the absolute value, then upsampled)."""
    difference = highpass(images.float() - inpainted.float(), sigma)
    size = difference.shape[-2:]
    maps = []
    for scale in scales:
        pooled = F.avg_pool2d(difference, scale) if scale > 1 else difference
        level = pooled.abs().mean(1, keepdim=True)
        maps.append(F.interpolate(level, size=size, mode="bilinear", align_corners=False) if scale > 1 else level)
    return torch.stack(maps).mean(0)[:, 0]


def mean_filter(maps: torch.Tensor, size: int) -> torch.Tensor:
    """A centred ``size`` x ``size`` mean filter over ``B x H x W`` maps (borders average what they have)."""
    if size <= 1:
        return maps
    return F.avg_pool2d(maps[:, None], size, stride=1, padding=size // 2, count_include_pad=False)[:, 0]


def refinement_timesteps(count: int, start: int) -> list[int]:
    """n_t timesteps from t_nt down in equal strides: ``start, start - start/n_t, ...``."""
    return [round(start * (count - i) / count) for i in range(count)]


def build_inpainting_unet(cfg: ModelConfig, channels: int) -> UNet2DConditionModel:
    """A randomly initialised inpainting UNet with the preset's dimensions: ``2 x channels + 1`` in
    (noisy input, masked input, mask), ``channels`` out."""
    u = cfg.unet
    return UNet2DConditionModel(
        sample_size=u.sample_size, in_channels=2 * channels + 1, out_channels=channels,
        down_block_types=tuple(u.down_block_types), up_block_types=tuple(u.up_block_types),
        block_out_channels=tuple(u.block_out_channels), layers_per_block=u.layers_per_block,
        attention_head_dim=u.attention_head_dim, cross_attention_dim=u.cross_attention_dim,
        norm_num_groups=u.norm_num_groups,
    )


class DRDCModel(nn.Module):
    """DRDC. ``batch``: ``image`` B x 3 x H x W in [-1, 1]; ``category_index`` B is read in training (the
    category head's target) and, under ``conditioning: category_aware`` only, at scoring."""

    method = "drdc"
    stages = ("vae", "denoiser")  # latent space; a pixel-space instance has the denoiser stage only
    loads_diffusion_weights = False  # its inpainting weights come from model.drdc.pretrained

    def __init__(self, cfg: ModelConfig, num_categories: int, base: nn.Module | None = None):
        super().__init__()
        from anomdiff.models import build_model, load_model  # the registry imports this module

        self.cfg, self.num_categories = cfg, num_categories
        d = cfg.drdc
        # An exported base (or the one a saved DRDC model holds) stays frozen; otherwise it trains here.
        self.base_frozen = base is not None or d.base_model is not None
        if base is None and d.base_model is not None:
            base = load_model(Path(d.base_model).expanduser())
        if base is None:
            base = build_model(ModelConfig.from_dict({"method": d.base_method, "conditioning": "label_free"},
                                                     base=cfg), num_categories)
        elif base.cfg.image_size != cfg.image_size:
            raise ValueError(f"model.drdc.base_model: the base model scores {base.cfg.image_size} px images, this "
                             f"model.image_size is {cfg.image_size}")
        self.base = base
        if d.space == "latent":
            if d.pretrained:
                unet, vae = load_pretrained(d.pretrained, "model.drdc.pretrained")
                check_vae_matches(vae, cfg, d.pretrained)
                want = 2 * cfg.vae.latent_channels + 1
                if unet.config.in_channels != want:
                    raise ValueError(f"model.drdc.pretrained: the UNet of {d.pretrained!r} takes "
                                     f"{unet.config.in_channels} input channels, an inpainting UNet takes {want} "
                                     "(use an inpainting checkpoint, e.g. stable-diffusion-inpainting)")
                scale = float(vae.config.scaling_factor)
            else:
                unet, vae, scale = build_inpainting_unet(cfg, cfg.vae.latent_channels), build_vae(cfg), \
                    cfg.vae.scaling_factor
            self.vae: AutoencoderKL | None = vae
            self.stages = ("vae", "denoiser")
        else:
            unet, self.vae, scale = build_inpainting_unet(cfg, 3), None, 1.0
            self.stages = ("denoiser",)
        self.inpainter = unet
        width = cfg.unet.cross_attention_dim
        self.category_tokens = nn.Parameter(torch.randn(num_categories, cfg.num_context_tokens, width) * 0.02)
        self.category_head = nn.Linear(self.base.features.channels[-1], num_categories)
        self.register_buffer("latent_scale", torch.tensor(scale, dtype=torch.float32))
        f = cfg.diffusion
        self.scheduler = DDIMScheduler(
            num_train_timesteps=f.num_train_timesteps, beta_start=f.beta_start, beta_end=f.beta_end,
            beta_schedule=f.beta_schedule, clip_sample=False, set_alpha_to_one=False, prediction_type="epsilon",
            timestep_spacing="trailing",
        )
        if cfg.unet.gradient_checkpointing:
            self.inpainter.enable_gradient_checkpointing()
        self.metadata: dict = {}
        self.set_stage("denoiser")

    # --- stages --------------------------------------------------------------------------------------

    def _parts(self) -> dict[str, list[nn.Module | nn.Parameter]]:
        parts: dict[str, list] = {"inpainter": [self.inpainter], "context": [self.category_head, self.category_tokens]}
        for name, children in UNET_PARTS.items():
            parts[name.replace("unet", "inpainter")] = [getattr(self.inpainter, child) for child in children]
        return parts

    def set_stage(self, stage: str) -> None:
        """``vae``: the autoencoder alone (latent space); ``denoiser``: what ``model.drdc.trainable``
        names of the base model, the inpainter and the category tokens and head, together (each with
        its own loss, summed)."""
        if stage not in self.stages:
            raise ValueError(f"drdc in {self.cfg.drdc.space} space trains in {self.stages}, not {stage!r}")
        self.requires_grad_(False)
        if stage == "vae":
            self.vae.requires_grad_(True)
        else:
            parts = self._parts()
            for name in self.cfg.drdc.trainable:
                if name == "base":
                    if not self.base_frozen:
                        self.base.set_stage("denoiser")
                    continue
                if name not in parts:
                    raise ValueError(f"model.drdc.trainable: unknown part {name!r}; choose from "
                                     f"{sorted(['base', *parts])}")
                for part in parts[name]:
                    part.requires_grad_(True)
        self.stage = stage

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_counts(self) -> dict[str, int]:
        """``base`` (what the base model trains), ``unet`` (the inpainter), ``vae``, ``context`` (the
        category head and tokens; they grow with the categories); the frozen backbone is not counted."""
        base = self.base.parameter_counts()["total"]
        counts = {"unet": sum(p.numel() for p in self.inpainter.parameters()), "sg": 0,
                  "vae": sum(p.numel() for p in self.vae.parameters()) if self.vae is not None else 0,
                  "base": base,
                  "context": self.category_tokens.numel() + sum(p.numel() for p in self.category_head.parameters())}
        counts["total"] = sum(counts.values())
        return counts

    # --- the inpainter's space -----------------------------------------------------------------------

    def _autocast(self, device: torch.device):
        return bf16_autocast(self, device, self.cfg.autocast)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return images
        return self.vae.encode(images).latent_dist.mode() * self.latent_scale.to(images.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents
        return self.vae.decode(latents / self.latent_scale.to(latents.dtype)).sample

    def to_grid(self, masks: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Pixel masks on the inpainter's grid: a latent cell is masked if any of its pixels is."""
        factor = masks.shape[-1] // like.shape[-1]
        return F.max_pool2d(masks, factor) if factor > 1 else masks

    @torch.no_grad()
    def fit_latent_scale(self, images: torch.Tensor) -> float:
        """1 / std of the latents (LDM's ``scale_by_std``), for an autoencoder trained here."""
        latents = self.vae.encode(images).latent_dist.sample().float()
        self.latent_scale.fill_(1.0 / latents.std().clamp_min(1e-6).item())
        return float(self.latent_scale)

    # --- dual conditioning ---------------------------------------------------------------------------

    def category_logits(self, filled: torch.Tensor) -> torch.Tensor:
        """The category head on the pooled deepest backbone features of the masked-and-filled image."""
        with self._autocast(filled.device):
            with torch.no_grad():
                deepest = self.base.features(filled)[-1]
            return self.category_head(deepest.mean((2, 3))).float()

    def context(self, logits: torch.Tensor, category_index: torch.Tensor | None) -> torch.Tensor:
        """Model conditioning: the category tokens mixed by the head's estimate (``label_free``; the
        estimate is not trained through the inpainter) or the given category's (``category_aware``);
        ``B x T x D``."""
        if self.cfg.conditioning == "category_aware":
            if category_index is None:
                raise ValueError("conditioning category_aware: the batch needs category_index")
            weights = F.one_hot(category_index.long(), self.num_categories).to(self.category_tokens.dtype)
        else:
            weights = logits.softmax(-1).detach().to(self.category_tokens.dtype)
        return torch.einsum("bk,ktd->btd", weights, self.category_tokens)

    # --- objectives ----------------------------------------------------------------------------------

    def forward(self, batch: dict[str, torch.Tensor], score: bool = False) -> dict[str, torch.Tensor]:
        """The training loss (what DeepSpeed's engine runs for a step), or with ``score`` the scores:
        validation runs through the engine too (``pipelines.engine.ScoresThroughEngine``)."""
        return self.score(batch) if score else self.training_loss(batch)

    def training_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The base model's loss + the inpainter's epsilon MSE over the masked cells of random cell masks
        (timesteps up to ``diffusion.train_max_timestep``) + ``category_weight`` x the category head's
        cross-entropy."""
        x0, d = batch["image"], self.cfg.drdc
        trains_base = not self.base_frozen and "base" in self.cfg.drdc.trainable
        base = self.base.training_loss(batch)["loss"] if trains_base else x0.new_zeros(())
        masks = random_masks(len(x0), *x0.shape[-2:], d.patch, device=x0.device)
        filled = context_fill(x0, masks, d.patch / 2)
        logits = self.category_logits(filled)
        category = F.cross_entropy(logits.float(), batch["category_index"].long())
        with self._autocast(x0.device):
            with torch.no_grad():
                z0, known = self.encode(x0).float(), self.encode(filled).float()
            grid = self.to_grid(masks, z0)
            noise = torch.randn_like(z0)
            top = self.cfg.diffusion.train_max_timestep
            high = self.scheduler.config.num_train_timesteps if top is None else top + 1
            t = torch.randint(0, high, (len(z0),), device=z0.device)
            context = self.context(logits, batch["category_index"])
            eps = self.inpainter(torch.cat([self.scheduler.add_noise(z0, noise, t), known, grid], 1), t,
                                 encoder_hidden_states=context).sample
        inpainting = ((eps.float() - noise) ** 2 * grid).sum() / (grid.sum() * z0.shape[1]).clamp_min(1.0)
        loss = base + inpainting + d.category_weight * category
        return {"loss": loss, "base": base.detach(), "inpainting": inpainting.detach(),
                "category": category.detach()}

    def vae_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Autoencoder fine-tuning on normal images (stage ``vae``, latent space)."""
        x0 = batch["image"]
        with self._autocast(x0.device):
            return vae_loss(self.vae, x0, self.cfg.vae.kl_weight, self.base.features.differentiable,
                            self.cfg.vae.feature_weight)

    # --- inference -----------------------------------------------------------------------------------

    @torch.no_grad()
    def inpaint(self, known: torch.Tensor, grid: torch.Tensor, start: int, context: torch.Tensor,
                generator: torch.Generator) -> torch.Tensor:
        """Images whose masked cells are rebuilt by a DDIM chain of ``ddim_steps`` from timestep
        ``start``: ``known`` is the context-filled images in the inpainter's space, ``grid`` their mask
        there. Only the masked cells of the result are the inpainting."""
        scheduler = DDIMScheduler.from_config(self.scheduler.config)
        timesteps = ddim_timesteps(scheduler, start, self.cfg.drdc.ddim_steps, device=known.device)
        with self._autocast(known.device):
            noise = torch.randn(known.shape, generator=generator, device=known.device, dtype=known.dtype)
            z = scheduler.add_noise(known, noise, timesteps[:1].repeat(len(known)))
            for i, t in enumerate(timesteps):
                eps = self.inpainter(torch.cat([z, known, grid], 1), t, encoder_hidden_states=context).sample
                z = scheduler.step(eps.float(), t, z, eta=0.0).prev_sample
                # test-time conditioning: the unmasked context back on the trajectory at the next level
                later = timesteps[i + 1] if i + 1 < len(timesteps) else None
                on_path = known if later is None else scheduler.add_noise(known, noise, later.repeat(len(known)))
                z = grid * z + (1 - grid) * on_path
            return self.decode(z).float().clamp(-1, 1)

    @torch.no_grad()
    def inpaintings(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image inpainted under each of the n_s mask sets from each of the n_t timesteps, batched
        over the sets: ``B x n_t x n_s x 3 x H x W``, and the sets ``n_s x H x W``."""
        images, d = batch["image"], self.cfg.drdc
        b, _, h, w = images.shape
        sets = mask_sets(h, w, d.mask_sets, d.patch, d.mask_seed, device=images.device)  # S x H x W
        s = len(sets)
        masks = sets.repeat(b, 1, 1)[:, None]
        filled = context_fill(images.repeat_interleave(s, 0), masks, d.patch / 2)  # image-major: B*S, a set each
        category = batch.get("category_index")
        context = self.context(self.category_logits(filled),
                               None if category is None else category.repeat_interleave(s, 0))
        with self._autocast(images.device):
            known = self.encode(filled).float()  # the same for every timestep
        grid = self.to_grid(masks, known)
        generator = torch.Generator(device=images.device).manual_seed(self.cfg.diffusion.seed)
        runs = [(filled * (1 - masks) + self.inpaint(known, grid, start, context, generator) * masks)
                .view(b, s, *images.shape[1:]) for start in refinement_timesteps(d.timesteps, d.start_timestep)]
        return torch.stack(runs, 1), sets

    @torch.no_grad()
    def refinement_map(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``B x H x W``: every pixel's difference to its inpainting under the mask set that hid it,
        averaged over the n_t timesteps, then mean-filtered (the paper's spatio-temporal fusion)."""
        images, d = batch["image"], self.cfg.drdc
        inpainted, sets = self.inpaintings(batch)
        b, steps, s = inpainted.shape[:3]
        repeated = images[:, None, None].expand_as(inpainted).reshape(-1, *images.shape[1:])
        distance = refinement_distance(repeated, inpainted.reshape(-1, *images.shape[1:]), d.scales,
                                       d.highpass_sigma).view(b, steps, s, *images.shape[-2:])
        fused = (distance * sets).sum(2).mean(1)  # each pixel from its own set, then over timesteps
        return mean_filter(fused, d.filter_size)

    @torch.no_grad()
    def maps(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``base``, ``refinement`` (absent when gamma is 0: it would not count) and ``fused`` maps."""
        gamma = self.cfg.drdc.gamma
        base = self.base.score({"image": batch["image"]})["anomaly_map"].float()
        if gamma == 0:
            return {"base": base, "fused": base}
        refinement = self.refinement_map(batch)
        return {"base": base, "refinement": refinement, "fused": (1 - gamma) * base + gamma * refinement}

    @torch.no_grad()
    def score(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``anomaly_map`` B x H x W (the fused map) and ``image_score`` B (mean of its top ``top_fraction``)."""
        fused = self.maps(batch)["fused"]
        return {"anomaly_map": fused, "image_score": scoring.top_fraction_mean(fused, self.cfg.drdc.top_fraction)}

    # --- persistence ---------------------------------------------------------------------------------

    def save(self, directory: str | Path, metadata: dict | None = None) -> Path:
        """The base model in ``base/`` (a model folder of its own method), the rest beside it."""
        return save_model(self, directory, metadata, parts=("base",))

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> DRDCModel:
        from anomdiff.models import load_model

        info = read_saved_config(directory)
        cfg = ModelConfig.from_dict(info["config"])
        plain = ModelConfig.from_dict({"backbone": {"pretrained": None},
                                       "drdc": {"pretrained": None, "base_model": None}}, base=cfg)
        model = cls(plain, info["num_categories"], base=load_model(Path(directory) / "base", device))
        own = {k: v for k, v in model.state_dict().items() if not k.startswith("base.")}
        model.load_state_dict(load_weights(directory, device, expected=own), strict=False)
        model.cfg, model.metadata = cfg, info.get("metadata", {})
        return model.to(device).eval()
