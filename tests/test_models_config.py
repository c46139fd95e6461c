import pytest

from anomdiff.models.config import ModelConfig, load_preset, preset_names
from anomdiff.models.params import count_parameters


def test_every_preset_loads():
    assert {"tiny", "small", "sd15", "proad_dinov2"} <= set(preset_names())
    for name in ("tiny", "small", "sd15"):
        assert load_preset(name).method == "diad"
    paper = load_preset("proad_dinov2")
    assert paper.method == "proad" and paper.backbone.name.startswith("vit_base_patch14_reg4_dinov2")
    assert paper.backbone.pretrained == "hub" and paper.backbone.img_size == paper.image_size


def test_the_paper_size_proad_counts_its_expanded_prototypes():
    counts = count_parameters("proad_dinov2")
    assert counts["prototypes"] == 256 * 768 and counts["unet"] == counts["sg"] == counts["vae"] == 0
    assert counts["total"] == counts["prototypes"] + counts["decoder"]


def test_the_knn_floor_counts_no_trained_parameters_and_bounds_its_bank():
    counts = count_parameters("tiny", "knn")
    assert counts["total"] == 0 and counts["memory"] == 1 * 2048 * (24 + 40)  # efficientnet_lite0 layers 1-2


def test_sd15_preset_states_diads_defaults_and_asks_for_its_pretrained_weights():
    preset = load_preset("sd15")
    assert preset.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5" and preset.backbone.pretrained == "hub"
    assert preset.refits_latent_scale is False  # SD's latent scale is kept after VAE fine-tuning
    same_weights = {"pretrained": None, "backbone": {"pretrained": None}, "knn": {"layers": None},
                    "drdc": {"pretrained": None}}
    assert ModelConfig.from_dict(same_weights, base=preset) == ModelConfig()


def test_only_a_randomly_initialised_autoencoder_refits_its_latent_scale():
    assert load_preset("tiny").refits_latent_scale is True
    assert ModelConfig.from_dict({"vae": {"refit_scale": True}}, base=load_preset("sd15")).refits_latent_scale


def test_unknown_key_is_named_with_its_dotted_path():
    with pytest.raises(ValueError, match=r"model\.unet\.block_out_chanels"):
        ModelConfig.from_dict({"unet": {"block_out_chanels": [1, 2]}})
    with pytest.raises(ValueError, match=r"model\.lr"):
        ModelConfig.from_dict({"lr": 1})


def test_wrong_value_type_is_named():
    with pytest.raises(TypeError, match=r"model\.diffusion\.ddim_steps"):
        ModelConfig.from_dict({"diffusion": {"ddim_steps": "ten"}})
    with pytest.raises(TypeError, match=r"model\.trainable"):
        ModelConfig.from_dict({"trainable": "sg"})


def test_yaml_style_exponent_strings_are_read_as_floats():
    cfg = ModelConfig.from_dict({"vae": {"kl_weight": "1e-6"}})
    assert cfg.vae.kl_weight == pytest.approx(1e-6)


def test_partial_dict_overrides_a_base_config_and_round_trips():
    base = load_preset("tiny")
    cfg = ModelConfig.from_dict({"diffusion": {"guidance": True}, "backbone": {"name": "resnet34", "pretrained": None}},
                                base=base)
    assert cfg.diffusion.guidance and cfg.backbone.name == "resnet34"
    assert cfg.unet == base.unet and not base.diffusion.guidance
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_hint_encoder_must_reach_the_latent_resolution():
    with pytest.raises(ValueError, match="hint_channels"):
        ModelConfig.from_dict({"sg": {"hint_channels": [16, 32]}})


def test_invalid_connection_and_start_timestep_are_rejected():
    with pytest.raises(ValueError, match="connect"):
        ModelConfig.from_dict({"sg": {"connect": "shallow"}})
    with pytest.raises(ValueError, match="start_timestep"):
        ModelConfig.from_dict({"diffusion": {"start_timestep": 1000}})
    with pytest.raises(ValueError, match="train_max_timestep must be in \\[start_timestep.*never trained on"):
        ModelConfig.from_dict({"diffusion": {"start_timestep": 400, "train_max_timestep": 300}})


def test_missing_preset_lists_the_available_ones():
    with pytest.raises(FileNotFoundError, match="tiny"):
        load_preset("huge")
