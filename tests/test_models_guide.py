import pytest
import torch

from anomdiff.models import build_model
from anomdiff.models.config import ModelConfig, load_preset
from anomdiff.models.guide import residual_channels, residual_groups


def tiny(overrides=None):
    torch.manual_seed(0)
    return build_model(ModelConfig.from_dict(overrides or {}, base=load_preset("tiny")), num_categories=2)


def inputs(model, size=32):
    x = torch.rand(2, 3, size, size) * 2 - 1
    batch = {"image": x, "category_index": torch.tensor([0, 1])}
    with torch.no_grad():
        z = model.encode(x)
    return z, torch.tensor([10, 700]), model.context(batch), x


@pytest.mark.parametrize("connect", ["deepest", "all"])
def test_at_initialisation_the_sg_network_adds_nothing(connect):
    model = tiny({"sg": {"connect": connect}})
    z, t, context, x = inputs(model)
    with torch.no_grad():
        alone = model.unet(z, t, encoder_hidden_states=context).sample
        guided = model.predict_noise(z, t, context, x)
    assert torch.equal(alone, guided)


def test_sff_fuses_the_second_deepest_block_into_the_deepest_only():
    model = tiny()
    z, t, context, x = inputs(model)
    with torch.no_grad():
        for p in model.sg.parameters():  # wake up every zero-initialised conv
            if p.abs().sum() == 0:
                p.normal_(std=0.05)
        down, mid = model.sg(z, t, context, x)
    deep = set(model.sg.deep)
    assert all((r.abs().sum() == 0) == (i not in deep) for i, r in enumerate(down))
    assert mid.abs().sum() > 0
    # SFF's output passes a SiLU, so it is bounded below by SiLU's minimum
    assert all(down[i].min() >= -0.2785 for i in deep)


def test_disabling_sff_removes_its_parameters_and_changes_the_deepest_residuals():
    with_sff, without = tiny(), tiny({"sg": {"sff": False}})
    assert without.sg.sff is None

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert count(with_sff.sg) - count(without.sg) == count(with_sff.sg.sff) > 0


def test_residual_bookkeeping_matches_the_controlnet_outputs():
    model = tiny({"sg": {"connect": "all"}})
    z, t, context, x = inputs(model)
    with torch.no_grad():
        down, _ = model.sg.controlnet(z, t, encoder_hidden_states=context, controlnet_cond=x, return_dict=False)
    config = model.sg.controlnet.config
    assert [r.shape[1] for r in down] == residual_channels(config)
    groups = residual_groups(config)
    assert sum(len(g) for g in groups) == len(down)
    # the deepest group sits at half the resolution of the one before it
    assert down[groups[-1][0]].shape[-1] * 2 == down[groups[-2][-1]].shape[-1]


def test_sg_network_starts_as_a_copy_of_the_unet_encoder():
    model = tiny()
    unet, sg = model.unet.state_dict(), model.sg.controlnet.state_dict()
    for name in ("conv_in.weight", "down_blocks.0.resnets.0.conv1.weight", "mid_block.resnets.0.conv2.weight"):
        assert torch.equal(unet[name], sg[name])


def test_the_fused_deepest_residuals_depend_on_the_shallower_block():
    """SFF (Eq. 8) adds the second-deepest block's outputs into the deepest ones: the SG network's
    deepest residuals are SFF's fusion of the ControlNet outputs, not a plain SiLU of the deep
    outputs, and change when only the shallower outputs change."""
    model = tiny()
    z, t, context, x = inputs(model)
    with torch.no_grad():
        for p in model.sg.parameters():  # as after training: ControlNet's zero convs and SFF's are awake
            if p.abs().sum() == 0:
                p.normal_(std=0.05)
        raw, _ = model.sg.controlnet(z, t, encoder_hidden_states=context, controlnet_cond=x, return_dict=False)
        down, _ = model.sg(z, t, context, x)
        shallow, deep = [raw[i] for i in model.sg.shallow], [raw[i] for i in model.sg.deep]
        fused = model.sg.sff(shallow, deep)
        moved = model.sg.sff([h + torch.randn_like(h) for h in shallow], deep)
    for i, f, m, d in zip(model.sg.deep, fused, moved, deep, strict=True):
        assert torch.allclose(down[i], f)
        assert (f - torch.nn.functional.silu(d)).abs().max() > 1e-3
        assert (f - m).abs().max() > 1e-3
