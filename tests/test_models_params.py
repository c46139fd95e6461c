import pytest
import torch
from accelerate import init_empty_weights

from anomdiff.models import build_model
from anomdiff.models.config import ModelConfig, load_preset
from anomdiff.models.params import count_parameters


@pytest.fixture(scope="module")
def sd15_on_meta():
    with init_empty_weights():
        random = {"pretrained": None, "backbone": {"pretrained": None}}  # counts need no weights
        return build_model(ModelConfig.from_dict(random, base=load_preset("sd15")), num_categories=15)


def test_sd15_counts_are_stable_diffusion_15s_and_diads():
    # The paper sizes: UNet 859.52M, SG 471.87M (DiAD Table 11: 859M / 471M / 83.7M), VAE 83.65M
    assert count_parameters("sd15") == {
        "unet": 859_520_964,
        "sg": 471_871_120,
        "vae": 83_653_863,
        "prototypes": 0,
        "total": 1_415_045_947,
    }


def test_sd15_sg_network_is_a_controlnet_copy_plus_sff(sd15_on_meta):
    sg = sd15_on_meta.sg
    assert sum(p.numel() for p in sg.controlnet.parameters()) == 361_279_120
    assert sum(p.numel() for p in sg.sff.parameters()) == 110_592_000
    # SFF: 3 x 3 zero-initialised convs from SGEB3 (640, 1280, 1280 channels) to 1280 channels
    assert [m[0].in_channels for m in sg.sff.fuse] == [640, 1280, 1280] * 3


def test_sd15_is_built_on_the_meta_device(sd15_on_meta):
    model = sd15_on_meta
    assert all(p.is_meta for p in model.unet.parameters())
    assert all(p.is_meta for p in model.sg.parameters())
    assert all(p.is_meta for p in model.vae.parameters())
    assert model.features.backbone.feature_info.channels() == [256, 512, 1024]  # resnet50 layer1-3


def test_tiny_counts_equal_a_materialised_build():
    torch.manual_seed(0)
    model = build_model(load_preset("tiny"), num_categories=3)
    counts = count_parameters("tiny")
    assert counts == model.parameter_counts()
    assert counts["total"] == counts["unet"] + counts["sg"] + counts["vae"] + counts["prototypes"]
    assert counts["total"] < 5_000_000


def test_unknown_method_is_rejected_when_counting():
    with pytest.raises(ValueError, match="model.method must be one of .*, got 'prodiff'"):
        count_parameters("tiny", method="prodiff")


def test_drdc_at_paper_size_counts_sd_inpainting_unet_autoencoder_and_base():
    counts = count_parameters("sd15", method="drdc")
    sd15 = count_parameters("sd15")
    # SD inpainting's UNet: SD1.5's plus 5 more input channels into conv_in (320 filters of 3 x 3)
    assert counts["unet"] == sd15["unet"] + 5 * 320 * 9 == 859_535_364
    assert counts["vae"] == sd15["vae"] and counts["sg"] == 0
    assert counts["base"] == count_parameters("sd15", method="proad")["total"]
    assert counts["total"] == counts["unet"] + counts["vae"] + counts["base"] + counts["context"]
    tiny = count_parameters("tiny", method="drdc")
    assert tiny["vae"] == 0 and tiny["unet"] < 2_000_000  # pixel space at tiny: no autoencoder
