"""Model configuration: a plain dataclass tree, presets in ``conf/model/<name>.yaml``.

Defaults are DiAD's (He et al., AAAI 2024, arXiv 2312.06607) on Stable Diffusion 1.5 dimensions;
the presets restate them (``sd15``) or shrink them (``small``, ``tiny``). ``from_dict`` rejects
unknown keys by their dotted path so a typo in a YAML file fails loudly instead of being ignored.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from anomdiff.sections import Section, require_at_least

PRESET_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"
CONDITIONING = ("label_free", "category_aware")


@dataclass
class UNetConfig(Section):
    """diffusers ``UNet2DConditionModel`` dimensions (defaults: SD1.5, 859.52M parameters)."""

    block_out_channels: list[int] = field(default_factory=lambda: [320, 640, 1280, 1280])
    down_block_types: list[str] = field(
        default_factory=lambda: ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    )
    up_block_types: list[str] = field(
        default_factory=lambda: ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
    )
    layers_per_block: int = 2
    attention_head_dim: int = 8
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    sample_size: int = 64
    gradient_checkpointing: bool = False


@dataclass
class VAEConfig(Section):
    """diffusers ``AutoencoderKL`` dimensions (defaults: SD's KL-f8, 83.65M) and its fine-tuning loss.

    ``feature_weight``: weight of a perceptual term in the fine-tuning loss, the cosine distance
    between the anomaly map's backbone features of an image and of its reconstruction (0: LDM's L1 +
    KL only, as DiAD).

    ``refit_scale``: after VAE fine-tuning, rescale latents to unit variance (LDM's scale_by_std).
    ``null`` (default) refits an autoencoder trained from random weights and keeps a pretrained
    one's scale (SD's 0.18215); ``true`` or ``false`` decide either way."""

    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512])
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    kl_weight: float = 1.0e-6
    feature_weight: float = 0.0
    refit_scale: bool | None = None


@dataclass
class GuideConfig(Section):
    """Semantic-Guided network (DiAD Sec. 3.2) and its SFF block (Eq. 8, Fig. 3).

    ``hint_channels``: channels of the conv-SiLU hint encoder; it downsamples ``len - 1`` times,
    which must equal the VAE's downsampling. ``connect``: ``deepest`` feeds the SG residuals to the
    UNet middle block and deepest decoder block only (DiAD's ``only_mid_control``), ``all`` to every
    skip connection as in ControlNet.
    """

    hint_channels: list[int] = field(default_factory=lambda: [16, 32, 96, 256])
    sff: bool = True
    connect: str = "deepest"
    conditioning_scale: float = 1.0


@dataclass
class BackboneConfig(Section):
    """timm feature extractor for the anomaly map (DiAD Sec. 3.3).

    ``layers`` are timm ``features_only`` indices; ResNet's 1, 2, 3 are layer1-layer3, the maps
    DiAD's evaluation slices (``features[1:4]``). ``pretrained``: ``imagenet`` for the ImageNet
    EfficientNet-Lite0 installed with the project (``name: efficientnet_lite0``), ``hub`` for timm's
    default weights (needs network or a warm cache), a local weights file (loaded only when it holds
    every backbone tensor), or null for random initialisation with live residual branches.
    ``img_size``: the input size a ViT is built for (its position embeddings); null for CNNs.
    """

    name: str = "resnet50"
    layers: list[int] = field(default_factory=lambda: [1, 2, 3])
    pretrained: str | None = None
    img_size: int | None = None

    def __post_init__(self):
        if ":" in self.name:  # timm resolves "hf-hub:..." names on the network, even for random weights
            raise ValueError(f"model.backbone.name must be a timm architecture such as resnet18, got "
                             f"{self.name!r}; weights come from model.backbone.pretrained (imagenet, hub or a file)")
        if self.pretrained == "imagenet":
            from anomdiff.models.imagenet import PACKAGED

            if self.name not in PACKAGED:
                raise ValueError(f"model.backbone.pretrained: 'imagenet' weights are installed for "
                                 f"{', '.join(PACKAGED)} only, not {self.name!r}; set model.backbone.name "
                                 "accordingly, or pass a weights FILE")


@dataclass
class DiffusionConfig(Section):
    """Noise schedule (DiAD: 1000 steps, betas 0.00085-0.012, LDM's "linear" = diffusers'
    ``scaled_linear``) and DDIM reconstruction (start at ``start_timestep``, ``ddim_steps`` steps).

    ``guidance``: classifier-free guidance as DiAD's sampler runs it (an unconditional pass with an
    empty context beside the conditional one, so every step costs two). Off by default: the learned
    tokens need no amplification. Train with ``context_dropout > 0`` when it is on, so the model has
    seen the empty context.

    ``train_max_timestep``: the largest timestep drawn for the training loss (default: all of
    ``num_train_timesteps``). Reconstruction never visits a timestep above ``start_timestep``, so a
    model that starts there can spend all its training on the steps it will run."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    ddim_steps: int = 10
    start_timestep: int = 999
    eta: float = 0.0
    guidance: bool = False
    guidance_scale: float = 9.0
    context_dropout: float = 0.0
    train_max_timestep: int | None = None
    seed: int = 0


@dataclass
class ScoringConfig(Section):
    """Anomaly map smoothing (Gaussian sigma in pixels of the image; DiAD: 5 at 256 px) and the
    image score (max after ``pooling_rounds`` of ``pooling_kernel`` average pooling; DiAD: 8 x 8).

    ``pixel_weight`` adds that multiple of the per-pixel L1 distance between image and
    reconstruction to the feature distance before smoothing. DiAD's map is the feature distance
    alone (0, the default); small CPU models with randomly initialised backbones gain from it.

    ``noise_samples`` reconstructs each image from that many noise draws and averages their
    distance maps: the map of a normal image then carries less of one draw's reconstruction error.
    DiAD uses one draw (the default); every draw costs a full DDIM reconstruction."""

    sigma: float = 5.0
    pooling_rounds: int = 8
    pooling_kernel: int = 8
    pixel_weight: float = 0.0
    noise_samples: int = 1


@dataclass
class PrototypeConfig(Section):
    """DPDiff-AD's dual prototype banks (``method: dpdiff``; ``anomdiff/models/prototypes.py``).

    ``num_local`` (K_L) vectors rebuild every spatial feature from its ``top_k`` nearest, weighted by
    ``softmax(-distance / temperature)``; ``num_global`` (K_G) vectors are matched to the batch's
    image-level features by Sinkhorn OT with entropy ``ot_entropy`` (distances between unit vectors
    lie in [0, 4]). Loss: eps-MSE + ``lambda_ot`` * OT + ``lambda_local`` * commitment."""

    dim: int = 256
    num_local: int = 256
    num_global: int = 32
    top_k: int = 4
    temperature: float = 0.1
    ot_entropy: float = 0.05
    lambda_ot: float = 0.1
    lambda_local: float = 0.25

    def __post_init__(self):
        require_at_least("model.prototypes", self, ("dim", "num_local", "num_global", "top_k"))
        if self.top_k > self.num_local:
            raise ValueError(f"model.prototypes.top_k ({self.top_k}) exceeds num_local ({self.num_local})")
        for name in ("temperature", "ot_entropy"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.prototypes.{name} must be > 0, got {getattr(self, name)}")
        for name in ("lambda_ot", "lambda_local"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.prototypes.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class KNNConfig(Section):
    """PatchCore, the floor (``method: knn``; ``anomdiff/models/knn.py``; Roth et al., CVPR 2022).

    ``layers``: timm feature indices (null: ``backbone.layers``; PatchCore takes the mid-level 2
    and 3 of a wide ResNet-50). Each map is averaged over ``neighbourhood`` x ``neighbourhood``
    patches, and the concatenation pooled to at most ``dim`` channels. Each training category keeps
    a greedy coreset of ``coreset_ratio`` of its patches, at most ``max_per_category`` (the bank's
    bound), chosen in a projection to ``projection_dim``; the bank is searched in ``chunk`` rows.

    Scoring (Sec. 3.3): the map is each patch's nearest-bank distance, upsampled and smoothed with a
    Gaussian of ``sigma`` image pixels (PatchCore: 4 at 224 px); the image score is the largest patch
    distance, reweighted by Eq. 7 over the ``reweight_neighbours`` nearest bank entries of its match
    (0: the plain maximum). ``bank``: how a test image, whose category is not given, finds its normal
    patches: ``all`` searches every category's coreset as one bank; ``nearest_category`` first picks
    the category whose coreset lies nearest to the image's patches on average, then searches that
    category's coreset alone."""

    layers: list[int] | None = None
    neighbourhood: int = 3
    dim: int = 1024
    coreset_ratio: float = 0.1
    max_per_category: int = 2048
    projection_dim: int = 128
    chunk: int = 16384
    seed: int = 0
    sigma: float = 4.0
    reweight_neighbours: int = 3
    bank: str = "all"

    def __post_init__(self):
        require_at_least("model.knn", self, ("neighbourhood", "dim", "max_per_category", "projection_dim", "chunk"))
        if self.neighbourhood % 2 == 0:
            raise ValueError(f"model.knn.neighbourhood must be odd (a window centred on its patch), "
                             f"got {self.neighbourhood}")
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise ValueError(f"model.knn.coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.reweight_neighbours == 1 or self.reweight_neighbours < 0 or self.sigma < 0:
            raise ValueError(f"model.knn.reweight_neighbours must be 0 (the plain maximum) or at least 2 (Eq. 7 over "
                             f"the match and its neighbours; 1 would weigh every score to 0), and model.knn.sigma "
                             f">= 0; got {self.reweight_neighbours} and {self.sigma}")
        if self.bank not in KNN_BANKS:
            raise ValueError(f"model.knn.bank must be one of {', '.join(KNN_BANKS)}, got {self.bank!r}")


KNN_BANKS = ("all", "nearest_category")


@dataclass
class ProADConfig(Section):
    """Pro-AD (``method: proad``; ``anomdiff/models/proad.py``). ``layers``: encoder feature indices
    (null: ``backbone.layers``), each a target level; ``dim``-wide tokens on the finest level's grid;
    ``num_prototypes`` expanded prototypes; ``decoder_layers`` bidirectional blocks of ``heads``
    heads. Ablations: ``bidirectional: false`` keeps the prototypes static (a one-way decoder),
    ``constraint: false`` adds the residual path around the prototype reconstruction (also at
    inference, on the same weights). Loss: hard-mined cosine (the easiest ``easy_fraction`` of the
    points at ``easy_weight``, the rest at full weight; Dinomaly: 0.9 and 0.1) + ``coherence_weight``
    x coherence; bottleneck ``dropout``; image score: mean of the top ``top_fraction`` of the map."""

    layers: list[int] | None = None
    dim: int = 768
    num_prototypes: int = 256
    decoder_layers: int = 8
    heads: int = 12
    bidirectional: bool = True
    constraint: bool = True
    dropout: float = 0.2
    easy_fraction: float = 0.9
    easy_weight: float = 0.1
    coherence_weight: float = 0.2
    top_fraction: float = 0.01

    def __post_init__(self):
        require_at_least("model.proad", self, ("dim", "num_prototypes", "decoder_layers", "heads"))
        if self.dim % self.heads:
            raise ValueError(f"model.proad.dim ({self.dim}) must be a multiple of model.proad.heads ({self.heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.proad.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.easy_weight <= 1.0:
            raise ValueError(f"model.proad.easy_weight must be in [0, 1], got {self.easy_weight}")
        if self.coherence_weight < 0:
            raise ValueError(f"model.proad.coherence_weight must be >= 0, got {self.coherence_weight}")
        if not 0.0 <= self.easy_fraction < 1.0:
            raise ValueError(f"model.proad.easy_fraction must be in [0, 1), got {self.easy_fraction}")
        if not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"model.proad.top_fraction must be in (0, 1], got {self.top_fraction}")


DRDC_SPACES = ("pixel", "latent")


@dataclass
class DRDCConfig(Section):
    """DRDC (``method: drdc``; ``anomdiff/models/drdc.py``): a base model's heatmap refined by inpainting.

    Training: ``base_method`` (Pro-AD, a one-stage method) trains in the same stage as the inpainting
    UNet and a category head (``category_weight`` x its cross-entropy), or ``base_model``, a model
    folder exported by ``anomdiff train`` (any method), gives the base map frozen. The inpainter
    works in ``space``: ``latent`` (SD inpainting's layout: noisy latent, masked-image latent
    and mask in, ``2 x latent_channels + 1`` channels; weights from ``pretrained``, a diffusers folder or
    Hub id with ``unet/`` and ``vae/``) or ``pixel`` (3 + 3 + 1 channels; the tiny preset, whose small
    autoencoder would blur every texture it rebuilds).

    ``trainable``: what the denoiser stage trains: ``base`` (what the base model trains; nothing when
    it is frozen), ``inpainter`` (all of it) or ``inpainter_encoder`` / ``inpainter_mid`` /
    ``inpainter_decoder``, ``context`` (the category tokens and head). Default: all three whole.

    Inference (keys a search tunes on a frozen model): ``mask_sets`` (n_s) disjoint sets of
    ``patch`` x ``patch`` cells cover the image; ``timesteps`` (n_t) inpaintings from ``start_timestep``
    (t_nt) down in equal strides, each a DDIM chain of ``ddim_steps``; the high-pass (``highpass_sigma``)
    difference at each of ``scales``; a mean filter of ``filter_size`` (m); the maps fused with the
    base's by ``gamma``. Image score: mean of the top ``top_fraction`` of the fused map."""

    base_method: str = "proad"
    base_model: str | None = None
    space: str = "latent"
    pretrained: str | None = None
    mask_sets: int = 4
    patch: int = 32
    timesteps: int = 3
    start_timestep: int = 600
    ddim_steps: int = 10
    filter_size: int = 9
    gamma: float = 0.5
    scales: list[int] = field(default_factory=lambda: [1, 2, 4])
    highpass_sigma: float = 8.0
    category_weight: float = 0.1
    top_fraction: float = 0.01
    mask_seed: int = 0
    trainable: list[str] = field(default_factory=lambda: ["base", "inpainter", "context"])

    def __post_init__(self):
        require_at_least("model.drdc", self, ("patch", "timesteps", "ddim_steps", "filter_size"))
        require_at_least("model.drdc", self, ("mask_sets",), low=2)
        if self.space not in DRDC_SPACES:
            raise ValueError(f"model.drdc.space must be one of {', '.join(DRDC_SPACES)}, got {self.space!r}")
        if self.filter_size % 2 == 0:
            raise ValueError(f"model.drdc.filter_size must be odd (a centred mean filter), got {self.filter_size}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"model.drdc.gamma must be in [0, 1], got {self.gamma}")
        if not self.scales or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.scales):
            raise ValueError(f"model.drdc.scales must be a non-empty list of integers >= 1, got {self.scales}")
        if self.highpass_sigma < 0 or self.category_weight < 0:
            raise ValueError("model.drdc: highpass_sigma and category_weight must be >= 0")
        if not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"model.drdc.top_fraction must be in (0, 1], got {self.top_fraction}")


# The keys that change how a trained model scores, not what it learned: evaluate and inference-time
# searches may set them on an exported model (dotted, below ``model.``).
INFERENCE_KEYS = frozenset({
    "diffusion.ddim_steps", "diffusion.start_timestep", "diffusion.eta", "diffusion.guidance",
    "diffusion.guidance_scale", "diffusion.seed",
    "scoring.sigma", "scoring.pooling_rounds", "scoring.pooling_kernel", "scoring.pixel_weight",
    "scoring.noise_samples",
    "sg.conditioning_scale", "proad.top_fraction", "knn.sigma", "knn.reweight_neighbours", "knn.bank",
    "drdc.mask_sets", "drdc.patch", "drdc.timesteps", "drdc.start_timestep", "drdc.ddim_steps",
    "drdc.filter_size", "drdc.gamma", "drdc.scales", "drdc.highpass_sigma", "drdc.top_fraction",
    "drdc.mask_seed",
})


@dataclass
class ModelConfig(Section):
    """Everything that defines a model. ``trainable`` names the parts the denoiser stage trains:
    ``unet`` (all of it) or ``unet_encoder`` / ``unet_mid`` / ``unet_decoder``, ``sg``, ``context``;
    DiAD trains the SG network and the SD decoder and keeps the SD encoder frozen.

    ``conditioning``: ``label_free`` (default), the seeds' unified protocol: one model that is never
    told a test image's category; ``category_aware`` gives each category its own context tokens and
    feeds ``category_index`` at scoring, for lines that know their product. Every metrics document
    names the protocol that produced it."""

    config_path: typing.ClassVar[str] = "model"

    method: str = "diad"
    conditioning: str = "label_free"
    image_size: int = 256
    num_context_tokens: int = 1
    pretrained: str | None = None
    trainable: list[str] = field(default_factory=lambda: ["sg", "unet_decoder", "context"])
    autocast: bool = True
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    sg: GuideConfig = field(default_factory=GuideConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    prototypes: PrototypeConfig = field(default_factory=PrototypeConfig)
    knn: KNNConfig = field(default_factory=KNNConfig)
    proad: ProADConfig = field(default_factory=ProADConfig)
    drdc: DRDCConfig = field(default_factory=DRDCConfig)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` for combinations the model cannot be built from."""
        from anomdiff.models import METHODS, model_class  # the registry imports this module

        u, v, g = self.unet, self.vae, self.sg
        if self.method not in METHODS:
            raise ValueError(f"model.method must be one of {', '.join(sorted(METHODS))}, got {self.method!r}")
        kind = model_class(self.method)
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) \
                or not 16 <= self.image_size <= 8192:
            raise ValueError(f"model.image_size must be an integer in [16, 8192], got {self.image_size!r}")
        if "vae" in kind.stages and self.image_size % self.downsampling:
            raise ValueError(f"model.image_size must be a multiple of {self.downsampling} (the autoencoder's and "
                             f"UNet's downsampling), got {self.image_size}")
        if not (len(u.block_out_channels) == len(u.down_block_types) == len(u.up_block_types)):
            raise ValueError(
                "model.unet: block_out_channels, down_block_types and up_block_types need the same length, "
                f"got {len(u.block_out_channels)}, {len(u.down_block_types)}, {len(u.up_block_types)}"
            )
        if len(u.block_out_channels) < 2:
            raise ValueError("model.unet: SFF fuses the two deepest encoder blocks, so at least 2 blocks are needed")
        if len(g.hint_channels) != len(v.block_out_channels):
            hint, vae = len(g.hint_channels), len(v.block_out_channels)
            raise ValueError(
                f"model.sg.hint_channels has {hint} stages (downsampling x{2 ** (hint - 1)}) but the VAE has"
                f" {vae} (downsampling x{2 ** (vae - 1)}); the hint must reach the latent resolution"
            )
        if self.conditioning not in CONDITIONING:
            raise ValueError(f"model.conditioning must be one of {', '.join(CONDITIONING)}, got {self.conditioning!r}")
        if g.connect not in ("deepest", "all"):
            raise ValueError(f"model.sg.connect must be 'deepest' or 'all', got {g.connect!r}")
        if not 0 <= self.diffusion.start_timestep < self.diffusion.num_train_timesteps:
            raise ValueError(
                f"model.diffusion.start_timestep must be in [0, {self.diffusion.num_train_timesteps}),"
                f" got {self.diffusion.start_timestep}"
            )
        top = self.diffusion.train_max_timestep
        if top is not None and not self.diffusion.start_timestep <= top < self.diffusion.num_train_timesteps:
            raise ValueError(
                f"model.diffusion.train_max_timestep must be in [start_timestep, num_train_timesteps) ="
                f" [{self.diffusion.start_timestep}, {self.diffusion.num_train_timesteps}), got {top}:"
                " reconstruction would run timesteps the model never trained on"
            )
        if self.diffusion.ddim_steps < 1:
            raise ValueError(f"model.diffusion.ddim_steps must be >= 1, got {self.diffusion.ddim_steps}")
        if not 0.0 <= self.diffusion.context_dropout < 1.0:
            raise ValueError(f"model.diffusion.context_dropout must be in [0, 1), got {self.diffusion.context_dropout}")
        if self.num_context_tokens < 1:
            raise ValueError(f"model.num_context_tokens must be >= 1, got {self.num_context_tokens}")
        if self.scoring.pooling_kernel < 1 or self.scoring.pooling_rounds < 0:
            raise ValueError("model.scoring: pooling_kernel must be >= 1 and pooling_rounds >= 0")
        if self.scoring.noise_samples < 1:
            raise ValueError(f"model.scoring.noise_samples must be >= 1, got {self.scoring.noise_samples}")
        if self.method == "drdc":
            self._validate_drdc()

    def _validate_drdc(self) -> None:
        d = self.drdc
        if d.base_method != "proad":
            raise ValueError(f"model.drdc.base_method: the base trained in the same run is proad (one stage, beside "
                             f"the inpainter), got {d.base_method!r}; give any other method's exported model as "
                             "model.drdc.base_model")
        top = self.diffusion.train_max_timestep
        top = self.diffusion.num_train_timesteps - 1 if top is None else top
        if not d.timesteps <= d.start_timestep <= top:
            raise ValueError(f"model.drdc.start_timestep must be in [timesteps, train_max_timestep] = "
                             f"[{d.timesteps}, {top}], got {d.start_timestep}: the inpainter trains on timesteps up to "
                             "model.diffusion.train_max_timestep")
        cells = math.ceil(self.image_size / d.patch) ** 2
        if d.mask_sets > cells:
            raise ValueError(f"model.drdc.mask_sets ({d.mask_sets}) exceeds the {cells} mask cells of "
                             f"{d.patch} px in a {self.image_size} px image")

    @property
    def refits_latent_scale(self) -> bool:
        """Whether VAE fine-tuning ends by refitting the latent scale (``vae.refit_scale``)."""
        pretrained = self.drdc.pretrained if self.method == "drdc" else self.pretrained
        return not pretrained if self.vae.refit_scale is None else self.vae.refit_scale

    @property
    def downsampling(self) -> int:
        """Image pixels per latent-grid cell at the UNet's deepest level."""
        return 2 ** (len(self.vae.block_out_channels) - 1 + len(self.unet.block_out_channels) - 1)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> ModelConfig:
    """The model preset ``conf/model/<name>.yaml``."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no model preset {name!r} in {PRESET_DIR} (available: {', '.join(preset_names())})")
    with path.open() as f:
        data = yaml.safe_load(f) or {}
    return ModelConfig.from_dict(data)
