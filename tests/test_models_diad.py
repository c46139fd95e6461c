import json

import numpy as np
import pytest
import torch

from anomdiff import scoring
from anomdiff.data.synthetic import category_specs, paste_anomaly, render_normal
from anomdiff.models import build_model, load_model
from anomdiff.models.config import ModelConfig, load_preset
from anomdiff.models.context import CategoryTokens, ConcatContext, ContextProvider
from anomdiff.models.diad import DiADModel
from anomdiff.models.pretrained import PretrainedNotFoundError
from anomdiff.models.train_loop import fit

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def tiny_cfg(overrides=None) -> ModelConfig:
    return ModelConfig.from_dict(overrides or {}, base=load_preset("tiny"))


def tiny(overrides=None, num_categories=2) -> DiADModel:
    torch.manual_seed(0)
    return build_model(tiny_cfg(overrides), num_categories)


def to_tensor(images) -> torch.Tensor:
    """H x W x 3 uint8 images to a B x 3 x H x W batch in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def synthetic_batch(n=8, category=0, seed=0, size=SIZE) -> dict:
    spec = category_specs(category + 1, seed=0)[category]
    rng = np.random.default_rng(seed)
    x = to_tensor([render_normal(spec, rng, size) for _ in range(n)])
    return {"image": x, "category_index": torch.full((n,), category, dtype=torch.long)}


def held_out_loss(model, batch, draws=4) -> float:
    """The training objective averaged over fixed noise and timestep draws."""
    torch.manual_seed(7)
    with torch.no_grad():
        return float(np.mean([model.training_loss(batch)["loss"].item() for _ in range(draws)]))


def test_tiny_models_loss_falls_on_a_handful_of_synthetic_images():
    model = tiny()
    batch = synthetic_batch()
    before = held_out_loss(model, batch)
    torch.manual_seed(1)
    losses = fit(model, [batch], steps=15, lr=2e-3)
    assert all(np.isfinite(losses))
    # The preset trains on timesteps 0-400, the low-noise end, where the objective falls more slowly
    # than over the full range (0.80x here after 15 steps, 0.61x over all 1000 timesteps).
    assert held_out_loss(model, batch) < 0.85 * before


def test_vae_stage_trains_only_the_autoencoder_and_fits_the_latent_scale():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = fit(model, [synthetic_batch()], steps=5, lr=1e-3, stage="vae")
    after = model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"vae", "latent_scale"}
    assert len(losses) == 5 and model.stage == "denoiser"


def test_the_perceptual_term_trains_the_autoencoder_through_the_frozen_backbone():
    model = tiny({"vae": {"feature_weight": 0.5}})
    model.set_stage("vae")
    batch = synthetic_batch(n=2)
    out = model.vae_loss(batch)
    assert out["vae_feature"] > 0
    assert out["loss"].item() == pytest.approx(
        (out["vae_rec"] + model.cfg.vae.kl_weight * out["vae_kl"] + 0.5 * out["vae_feature"]).item(), rel=1e-5)
    out["loss"].backward()
    assert all(p.grad is None for p in model.features.parameters())
    decoder_grad = model.vae.decoder.conv_out.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    model.cfg.vae.feature_weight = 0.0
    plain = model.vae_loss(batch)
    assert "vae_feature" not in plain
    plain["loss"].backward()
    assert not torch.allclose(model.vae.decoder.conv_out.weight.grad, decoder_grad)


def test_score_returns_image_resolution_maps_and_is_deterministic():
    model = tiny().eval()
    batch = synthetic_batch(n=3)
    first, second = model.score(batch), model.score(batch)
    assert first["anomaly_map"].shape == (3, SIZE, SIZE)
    assert first["image_score"].shape == (3,)
    assert first["reconstruction"].shape == batch["image"].shape
    assert torch.equal(first["anomaly_map"], second["anomaly_map"])


def test_pixel_weight_adds_the_smoothed_pixel_distance_to_the_feature_map():
    model = tiny({"scoring": {"pixel_weight": 0.0, "noise_samples": 1}}).eval()
    batch = synthetic_batch(n=2)
    features_only = model.score(batch)
    model.cfg.scoring.pixel_weight = 2.0
    combined = model.score(batch)
    pixel = scoring.pixel_distance(batch["image"], combined["reconstruction"])
    expected = features_only["anomaly_map"] + 2.0 * scoring.gaussian_smooth(pixel, model.cfg.scoring.sigma)
    assert torch.allclose(combined["anomaly_map"], expected, atol=1e-5)


def test_noise_samples_average_the_maps_of_independent_draws():
    batch = synthetic_batch(n=2)
    averaged = tiny({"scoring": {"noise_samples": 2}}).eval().score(batch)
    # One draw over the batch stacked twice takes the same noise as two draws over the batch.
    stacked = {k: torch.cat([v, v]) for k, v in batch.items()}
    single = tiny({"scoring": {"noise_samples": 1}}).eval().score(stacked)
    first, second = single["anomaly_map"][:2], single["anomaly_map"][2:]
    assert not torch.allclose(single["reconstruction"][:2], single["reconstruction"][2:], atol=1e-3)
    assert torch.allclose(averaged["anomaly_map"], (first + second) / 2, atol=1e-5)
    assert torch.equal(averaged["reconstruction"], single["reconstruction"][:2])
    s = tiny_cfg().scoring
    expected = scoring.image_score(averaged["anomaly_map"], rounds=s.pooling_rounds, kernel=s.pooling_kernel)
    assert torch.equal(averaged["image_score"], expected)


def test_noise_samples_below_one_are_refused():
    with pytest.raises(ValueError, match="noise_samples"):
        tiny_cfg({"scoring": {"noise_samples": 0}})


def test_guidance_at_scale_one_reconstructs_like_no_guidance():
    plain = tiny().eval()
    guided = tiny({"diffusion": {"guidance": True, "guidance_scale": 1.0}}).eval()
    batch = synthetic_batch(n=2)
    assert torch.allclose(plain.reconstruct(batch), guided.reconstruct(batch), atol=1e-5)


def test_start_timestep_and_steps_select_the_ddim_schedule():
    model = tiny({"diffusion": {"start_timestep": 999, "train_max_timestep": None, "ddim_steps": 10}})
    steps = model.inference_timesteps(model.scheduler)
    assert steps.tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    model = tiny({"diffusion": {"start_timestep": 499, "train_max_timestep": 499, "ddim_steps": 5}})
    steps = model.inference_timesteps(model.scheduler)
    assert len(steps) == 5 and steps[0] == 499
    for start in (400, 150, 37):  # rounding the schedule's length must never leave a step short
        for count in (1, 2, 3, 4, 7, 10):
            model.cfg.diffusion.start_timestep, model.cfg.diffusion.ddim_steps = start, count
            steps = model.inference_timesteps(model.scheduler)
            assert len(steps) == count and steps[0] <= start, (start, count, steps.tolist())
            assert (steps.diff() < 0).all()


def test_training_timesteps_span_zero_to_train_max_timestep(monkeypatch):
    model = tiny({"diffusion": {"start_timestep": 400, "train_max_timestep": 400}})
    drawn = []
    add_noise = model.scheduler.add_noise
    monkeypatch.setattr(model.scheduler, "add_noise", lambda z, n, t: drawn.append(t) or add_noise(z, n, t))
    batch = synthetic_batch(n=16)
    for _ in range(20):
        model.training_loss(batch)
    timesteps = torch.cat(drawn)  # 320 uniform draws from 0..400: both ends are reached
    assert 350 < timesteps.max() <= 400 and timesteps.min() < 50 and len(timesteps.unique()) > 150


def test_diads_default_trains_sg_decoder_and_tokens_with_the_unet_encoder_frozen():
    model = tiny({"trainable": ["sg", "unet_decoder", "context"]})
    model.training_loss(synthetic_batch(n=2))["loss"].backward()
    named = dict(model.named_parameters())
    assert named["unet.down_blocks.0.resnets.0.conv1.weight"].grad is None
    assert named["unet.mid_block.resnets.0.conv1.weight"].grad is None
    assert named["vae.encoder.conv_in.weight"].grad is None
    assert named["unet.up_blocks.0.resnets.0.conv1.weight"].grad is not None
    assert named["sg.controlnet.controlnet_mid_block.weight"].grad is not None
    assert named["context_provider.tokens"].grad is not None
    assert not any(p.requires_grad for p in model.features.parameters())
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.parameters() if p.requires_grad}


def test_unknown_trainable_part_is_rejected_by_name():
    with pytest.raises(ValueError, match="'unet_middle'"):
        tiny({"trainable": ["unet_middle"]})


def test_context_slot_accepts_tokens_from_another_provider():
    class Extra(ContextProvider):
        def __init__(self, dim):
            super().__init__()
            self.num_tokens, self.dim = 3, dim
            self.tokens = torch.nn.Parameter(torch.randn(3, dim))

        def forward(self, batch):
            return self.tokens.expand(len(batch["image"]), -1, -1)

    cfg = tiny_cfg()
    dim = cfg.unet.cross_attention_dim
    provider = ConcatContext(CategoryTokens(2, cfg.num_context_tokens, dim), Extra(dim))
    model = DiADModel(cfg, 2, context=provider)
    batch = synthetic_batch(n=2)
    assert model.context(batch).shape == (2, cfg.num_context_tokens + 3, dim)
    model.training_loss(batch)["loss"].backward()
    assert provider.providers[1].tokens.grad is not None
    assert model.context_provider.unconditional(batch).abs().sum() == 0


def test_context_of_the_wrong_width_is_rejected():
    cfg = tiny_cfg()
    with pytest.raises(ValueError, match="cross_attention_dim"):
        DiADModel(cfg, 2, context=CategoryTokens(2, 1, cfg.unet.cross_attention_dim + 1))


def test_category_index_out_of_range_is_named():
    batch = synthetic_batch(n=2, category=0)
    batch["category_index"] = torch.tensor([0, 5])
    with pytest.raises(IndexError, match="2 categories"):
        tiny({"conditioning": "category_aware"}).training_loss(batch)


@pytest.mark.parametrize("method", ["diad", "dpdiff"])
def test_the_default_protocol_never_reads_the_category(method):
    """Label-free (the seeds' unified protocol): the same image scores the same whatever category
    it is said to be, or with none at all; the category-aware option does read it."""
    batch = synthetic_batch(n=2, category=0)
    scores = {}
    for conditioning in ("label_free", "category_aware"):
        model = tiny({"method": method, "conditioning": conditioning, "diffusion": {"ddim_steps": 1}}).eval()
        with torch.no_grad():  # as after training: the context moves the reconstruction
            for p in model.context_provider.parameters():
                p.normal_(0, 3.0)
        told = model.score(batch)["anomaly_map"]
        other = model.score({**batch, "category_index": torch.tensor([1, 1])})["anomaly_map"]
        scores[conditioning] = (told - other).abs().max().item()
        if conditioning == "label_free":
            assert torch.equal(told, model.score({"image": batch["image"]})["anomaly_map"])
    assert scores["label_free"] == 0.0 and scores["category_aware"] > 1e-4


def test_image_size_must_fit_the_models_downsampling():
    batch = synthetic_batch(n=1)
    batch["image"] = batch["image"][..., :24, :24]
    with pytest.raises(ValueError, match="multiple of 16"):
        tiny().score(batch)


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="model.method must be one of .*, got 'nope'"):
        build_model(tiny_cfg({"method": "nope"}), 2)


def write_pretrained_folder(path):
    """A diffusers-format folder (unet/ and vae/) with recognisable random weights."""
    torch.manual_seed(123)
    source = build_model(tiny_cfg(), 1)
    source.unet.save_pretrained(path / "unet")
    source.vae.save_pretrained(path / "vae")
    return source


def test_pretrained_folder_initialises_unet_vae_and_sg_and_survives_save_and_load(tmp_path):
    source = write_pretrained_folder(tmp_path / "sd")
    model = tiny({"pretrained": str(tmp_path / "sd")})
    for name, value in source.unet.state_dict().items():
        assert torch.equal(model.unet.state_dict()[name], value), name
    for name, value in source.vae.state_dict().items():
        assert torch.equal(model.vae.state_dict()[name], value), name
    sg = model.sg.controlnet.state_dict()
    assert torch.equal(
        sg["down_blocks.1.attentions.0.proj_in.weight"], source.unet.down_blocks[1].attentions[0].proj_in.weight
    )

    fit(model, [synthetic_batch(n=4)], steps=2, lr=1e-3)  # move the weights off their initial values
    model.eval()
    batch = synthetic_batch(n=2)
    expected = model.score(batch)
    saved = model.save(tmp_path / "export", metadata={"categories": ["a", "b"]})
    assert {p.name for p in saved.iterdir()} == {"model.safetensors", "config.json"}
    assert json.loads((saved / "config.json").read_text())["method"] == "diad"

    loaded = load_model(saved)
    assert isinstance(loaded, DiADModel) and loaded.metadata == {"categories": ["a", "b"]}
    assert loaded.cfg == model.cfg
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    got = loaded.score(batch)
    assert torch.equal(got["anomaly_map"], expected["anomaly_map"])
    assert torch.equal(got["image_score"], expected["image_score"])


def test_missing_pretrained_weights_fail_with_a_clear_error(tmp_path):
    with pytest.raises(PretrainedNotFoundError, match="does not exist"):
        tiny({"pretrained": str(tmp_path / "missing")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedNotFoundError, match="unet/config.json"):
        tiny({"pretrained": str(tmp_path / "empty")})


def test_loading_a_folder_that_is_not_a_saved_model_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)


# --- end to end: a briefly trained tiny model sees a pasted defect ---------------------------


@pytest.fixture(scope="module")
def trained_on_stripes():
    """Tiny DiAD, autoencoder then denoiser, trained on 16 images of one 64 px stripe category."""
    torch.manual_seed(0)
    batches = [synthetic_batch(n=8, category=1, seed=seed, size=64) for seed in (0, 1)]
    for batch in batches:
        batch["category_index"].zero_()
    model = build_model(load_preset("tiny"), num_categories=1)
    fit(model, batches, steps=80, lr=2e-3, stage="vae")
    fit(model, batches, steps=120, lr=2e-3)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("pixel_weight", [0.0, 1.0], ids=["feature-map", "feature-plus-pixel-map"])
def test_pasted_defect_scores_higher_than_its_clean_image_and_its_region_is_hotter(trained_on_stripes, pixel_weight):
    model = trained_on_stripes
    model.cfg.scoring.pixel_weight = pixel_weight  # 0: DiAD's map, the feature distance alone
    spec = category_specs(2, seed=0)[1]
    rng = np.random.default_rng(42)
    clean = [render_normal(spec, rng, 64) for _ in range(4)]
    kinds = ("hole", "stain", "foreign", "hole")
    defective, masks = zip(
        *(paste_anomaly(image, rng, kind) for image, kind in zip(clean, kinds, strict=True)), strict=True
    )
    batch = {"image": to_tensor(clean + list(defective)), "category_index": torch.zeros(8, dtype=torch.long)}
    out = model.score(batch)
    scores, maps = out["image_score"].numpy(), out["anomaly_map"].numpy()
    assert (scores[4:] > scores[:4]).all(), scores
    for i, mask in enumerate(masks):
        heat = maps[4 + i]
        assert heat[mask].mean() > 2 * heat[~mask].mean()
        assert heat[mask].mean() > 2 * maps[i][mask].mean()  # hotter than the same pixels of the clean image


@pytest.mark.parametrize("method", ["diad", "drdc", "proad"])
def test_bf16_weights_train_and_score_on_a_cpu_under_autocast(method):
    """``train.precision: bf16`` on a CPU: the engine holds bf16 weights, the batch stays float32.
    The forward runs under CPU autocast and gives a finite loss and finite maps; float32 weights
    run without autocast (the same numbers as before the precision key existed)."""
    from anomdiff.models.precision import bf16_autocast

    model = tiny({"method": method})
    model.set_stage("denoiser")
    with bf16_autocast(model, torch.device("cpu"), True):
        assert not torch.is_autocast_enabled("cpu")
    model.to(torch.bfloat16)
    with bf16_autocast(model, torch.device("cpu"), True):
        assert torch.is_autocast_enabled("cpu")
    batch = synthetic_batch(2)
    loss = model(batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss.float()) and any(p.grad is not None for p in model.trainable_parameters())
    model.eval()
    with torch.no_grad():
        maps = model.score(batch)["anomaly_map"]
    assert torch.isfinite(torch.as_tensor(maps).float()).all()


def test_precision_decides_the_engines_weights():
    from anomdiff.config import CONF_DIR, load_config
    from pipelines.engine import deepspeed_config

    def bf16(*overrides):
        cfg = load_config(CONF_DIR / "experiment" / "demo.yaml", ["data.path=x", "output_dir=y", *overrides])
        return deepspeed_config(cfg, 1e-4, 2, 10)["bf16"]["enabled"]

    assert bf16() is False and bf16("train.use_gpu=true") is True
    assert bf16("train.precision=bf16") is True and bf16("train.use_gpu=true", "train.precision=fp32") is False
    with pytest.raises(ValueError, match="train.precision must be one of auto, bf16, fp32"):
        bf16("train.precision=fp16")


def test_zero_buckets_shrink_what_deepspeed_holds_at_once():
    from anomdiff.config import CONF_DIR, load_config
    from pipelines.engine import deepspeed_config

    def zero(stage, *overrides):
        cfg = load_config(CONF_DIR / "experiment" / "demo.yaml", ["data.path=x", "output_dir=y", *overrides])
        return deepspeed_config(cfg, 1e-4, stage, 10)["zero_optimization"]

    assert zero(3) == {"stage": 3}  # DeepSpeed's defaults
    assert zero(3, "train.zero.bucket_elements=50000000") == {
        "stage": 3, "reduce_bucket_size": 50_000_000, "stage3_prefetch_bucket_size": 50_000_000,
        "stage3_max_live_parameters": 50_000_000, "stage3_max_reuse_distance": 50_000_000}
    assert zero(2, "train.zero.bucket_elements=1000") == {"stage": 2, "reduce_bucket_size": 1000,
                                                          "allgather_bucket_size": 1000}
