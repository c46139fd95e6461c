"""How much work the benchmark does: the sections, their sizes and the targets they are held to."""

from __future__ import annotations

from dataclasses import dataclass

SECTIONS = ("ingest", "train_overhead", "zero_memory", "scoring", "metrics", "category_scaling", "gpu")
# Run only when named in --sections (minutes each): the first three train every method with the demo's
# budget; evaluation_memory evaluates 11,000 test images in fresh processes; serving times predict and
# a model server; tune_inference trains the demo and searches 50 inference settings of its model; onnx
# times exported ONNX graphs against PyTorch scoring.
OPTIONAL_SECTIONS = ("methods", "proad_ablation", "drdc_refinement", "evaluation_memory", "serving", "tune_inference",
                     "onnx")
SCALING_CATEGORIES = (10, 40, 160)
SCORING_DDIM_STEPS = 10
# Overrides that build the sd15 preset from random weights: memory and speed do not depend on them.
RANDOM_WEIGHTS = ("model.pretrained=null", "model.backbone.pretrained=null")
TARGETS = {"train_overhead_ratio_max": 1.10, "zero_stage3_over_stage0_max": 0.55, "ingest_160_over_10_tolerance": 0.10,
           "ingest_per_cpu_64_min": 0.5, "ingest_per_cpu_256_min": 0.8}


@dataclass(frozen=True)
class Sizes:
    """How much work each section does; ``quick`` fits in 5 minutes on 2 cores."""

    train_images: int = 6400  # per scaling dataset, split evenly over its categories
    stored_size: int = 128  # pixels of the synthetic shards; decoding resizes them to the tiny preset's 64
    test_per_category: int = 8  # of the 10-category dataset (scoring reads it)
    ingest_batch: int = 32
    large_ingest_images: int = 1600  # training images of the 256 px ingest shards
    repeats: int = 3
    train_batch: int = 8
    train_rounds: int = 6  # plain and DeepSpeed blocks of train_steps, alternated
    train_steps: int = 8
    warmup_steps: int = 5
    scaling_steps: int = 30
    zero_preset: str = "small"
    # The small preset's layout at half its UNet width (84M parameters: two full-width fp32 ranks
    # with their Adam state do not fit this machine's 24 GB) and 128 px (at 64 px its fourth level
    # would be 1x1, too small for GroupNorm).
    zero_overrides: tuple[str, ...] = ("model.unet.block_out_channels=[64,128,256,256]",
                                       "model.unet.cross_attention_dim=256", "model.image_size=128",
                                       "model.vae.sample_size=128", "model.unet.sample_size=16")
    zero_batch: int = 2
    scoring_images: int = 64
    scoring_batch: int = 8
    metric_maps: int = 10_000
    metric_size: int = 256


QUICK = Sizes(
    train_images=960, stored_size=96, test_per_category=4, repeats=1, train_rounds=3, train_steps=6, warmup_steps=2,
    scaling_steps=6,
    zero_preset="tiny",
    zero_overrides=("model.unet.block_out_channels=[32,128,128]", "model.unet.cross_attention_dim=128",
                    "model.unet.norm_num_groups=16", "model.image_size=32", "model.vae.sample_size=32",
                    "model.unet.sample_size=8"),
    scoring_images=16, metric_maps=200, large_ingest_images=480,
)
