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


def residuals_to_the_unet(model, z, t, context, x):
    """The SG residuals ``predict_noise`` hands to the UNet (down, mid), caught on their way in."""
    caught = {}

    def catch(_module, _args, kwargs):
        caught["down"] = kwargs["down_block_additional_residuals"]
        caught["mid"] = kwargs["mid_block_additional_residual"]

    handle = model.unet.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            model.predict_noise(z, t, context, x)
    finally:
        handle.remove()
    return caught["down"], caught["mid"]


def with_and_without_sff(wake_sff_convs):
    """Two models with the same weights apart from SFF, the ControlNet's zero convs awake (as after
    training); SFF's own zero-initialised convs woken too when asked."""
    with_sff = tiny()
    with torch.no_grad():
        for p in with_sff.sg.controlnet.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.05)
        if wake_sff_convs:
            for p in with_sff.sg.sff.parameters():
                p.normal_(std=0.05)
    without = tiny({"sg": {"sff": False}})
    skipped = without.load_state_dict(with_sff.state_dict(), strict=False)
    assert not skipped.missing_keys and all(k.startswith("sg.sff.") for k in skipped.unexpected_keys)
    return with_sff, without


def test_trained_sff_convs_fuse_the_shallower_block_into_the_deepest_residuals_the_unet_receives():
    with_sff, without = with_and_without_sff(wake_sff_convs=True)
    z, t, context, x = inputs(with_sff)
    down, mid = residuals_to_the_unet(with_sff, z, t, context, x)
    plain_down, plain_mid = residuals_to_the_unet(without, z, t, context, x)
    deep = set(with_sff.sg.deep)
    for i, (r, plain) in enumerate(zip(down, plain_down, strict=True)):
        if i in deep:  # changed, and by more than SFF's output SiLU: the fused shallower features moved them
            assert (r - plain).abs().max() > 1e-3, i
            assert (r - torch.nn.functional.silu(plain)).abs().max() > 1e-3, i
        else:
            assert torch.equal(r, plain), i
    assert torch.equal(mid, plain_mid)


def test_zero_initialised_sff_convs_add_nothing_but_the_output_silu_to_the_residuals():
    """Eq. 8 with its convs still zero: the fusion term vanishes, so the deepest residuals are the
    SiLU of those without SFF and every other residual is unchanged."""
    with_sff, without = with_and_without_sff(wake_sff_convs=False)
    z, t, context, x = inputs(with_sff)
    down, mid = residuals_to_the_unet(with_sff, z, t, context, x)
    plain_down, plain_mid = residuals_to_the_unet(without, z, t, context, x)
    deep = set(with_sff.sg.deep)
    assert all(plain_down[i].abs().max() > 1e-2 for i in deep)  # the ControlNet's deepest outputs are awake
    for i, (r, plain) in enumerate(zip(down, plain_down, strict=True)):
        assert torch.allclose(r, torch.nn.functional.silu(plain) if i in deep else plain, atol=1e-6), i
    assert torch.equal(mid, plain_mid)


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
